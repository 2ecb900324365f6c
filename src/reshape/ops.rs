//! What each step does to a parsed body. Every operation skips data that
//! its paths do not match; the ones that walk whole subtrees stop at
//! [`MAX_DEPTH`] and leave anything deeper as it is.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Number, Value};

use super::MAX_DEPTH;
use super::case;
use super::path::{self, Path, Segment};
use super::step::{Case, Convert, KeyCase, MAX_ROUND, Rename, Step};
use super::timestamp;

/// What one step may still add, in bytes of written JSON. The steps whose
/// output can outgrow their input by more than a small factor draw on it:
/// `flatten` repeats the keys above every key it lifts, `defaults` copies
/// its value into every element a path reaches, and `rename` creates the
/// objects on the way to `to` in every element. Each step gets its own, so
/// a profile is bounded by the number of its steps.
///
/// The others are not charged. `wrap` adds one key; `case` at most doubles
/// a key (one `_` per letter); `convert` and `timestamp` replace a value in
/// its place, at worst with a string of 30 bytes, so the value in memory
/// stays within a small factor of the parsed body, and the bounded write
/// refuses the output if it is too long.
pub(crate) struct Budget {
    left: u64,
    exceeded: bool,
}

impl Budget {
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            left: max_bytes,
            exceeded: false,
        }
    }

    /// Whether a step wanted more than was left; the result is then unusable.
    pub(crate) fn exceeded(&self) -> bool {
        self.exceeded
    }

    /// Takes `bytes`, or marks the budget exceeded and returns false.
    fn take(&mut self, bytes: u64) -> bool {
        match self.left.checked_sub(bytes) {
            Some(left) if !self.exceeded => {
                self.left = left;
                true
            }
            _ => {
                self.exceeded = true;
                false
            }
        }
    }
}

/// The bytes a new field adds to the written JSON besides its key and
/// value: the key's quotes, the colon and the comma before the next field.
const FIELD_BYTES: u64 = 4;

/// Runs one step. Steps that fail [`Step::check`] are skipped where acting
/// on them would be ambiguous (a rename across arrays, or one that overlaps
/// itself).
pub(crate) fn apply_step(step: &Step, body: &mut Value, budget: &mut Budget) {
    match step {
        Step::Keep(paths) => keep(body, paths),
        Step::Drop(paths) => {
            for path in paths {
                drop_path(body, path.segments());
            }
        }
        Step::Rename(spec) => rename(body, spec, budget),
        Step::Extract(path) => extract(body, path.segments()),
        Step::Wrap(key) => wrap(body, key),
        Step::Flatten(spec) => {
            at(body, spec.path.as_ref(), &mut |v| {
                flatten(v, &spec.separator, budget)
            });
        }
        Step::DropNulls(spec) => {
            at(body, spec.path.as_ref(), &mut |v| {
                drop_nulls(v, spec.recursive, 0)
            });
        }
        Step::Defaults(defaults) => {
            // Shallow paths first: a deeper default then only creates
            // objects on its way, never a place a shallower one would have
            // filled, so one pass is final and a second changes nothing.
            let mut ordered: Vec<&(Path, Value)> = defaults.0.iter().collect();
            ordered.sort_by_key(|(path, _)| path.segments().len());
            for (path, value) in ordered {
                let default = Fill {
                    bytes: written_len(value),
                    value,
                };
                fill(body, path.segments(), &default, budget);
                if budget.exceeded() {
                    return;
                }
            }
        }
        Step::Convert(spec) => {
            path::visit_mut(body, spec.path.segments(), &mut |v| convert(v, spec));
        }
        Step::Timestamp(spec) => {
            path::visit_mut(body, spec.path.segments(), &mut |v| {
                if let Some(new) = timestamp::convert(v, spec.from, spec.to) {
                    *v = new;
                }
            });
        }
        Step::Case(Case { to, path }) => at(body, path.as_ref(), &mut |v| recase(v, *to, 0)),
    }
}

/// Runs `f` on the body, or on each value at `path` when one is given.
fn at(body: &mut Value, path: Option<&Path>, f: &mut dyn FnMut(&mut Value)) {
    match path {
        Some(path) => path::visit_mut(body, path.segments(), f),
        None => f(body),
    }
}

/// Frees a value without recursion. serde_json's own drop recurses once
/// per level, so a deep value built by a caller could overflow the stack
/// when a step removes it.
pub(crate) fn discard(value: Value) {
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

// === keep ===

/// The kept paths merged into a tree, so one walk handles all of them.
#[derive(Default)]
struct KeepNode<'a> {
    /// A listed path ends here: keep the whole value.
    all: bool,
    keys: BTreeMap<&'a str, KeepNode<'a>>,
    each: Option<Box<KeepNode<'a>>>,
}

impl<'a> KeepNode<'a> {
    fn build(paths: &'a [Path]) -> Self {
        let mut root = Self::default();
        for path in paths {
            let mut node = &mut root;
            for segment in path.segments() {
                node = match segment {
                    Segment::Key(key) => node.keys.entry(key.as_str()).or_default(),
                    Segment::Each => node.each.get_or_insert_with(Box::default).as_mut(),
                };
            }
            node.all = true;
        }
        root
    }
}

/// Keeps only the listed paths. A value the paths go through must be the
/// container they expect; anything else (a scalar where `a.b` needs an
/// object) is removed, so a shape change upstream cannot leak fields.
fn keep(body: &mut Value, paths: &[Path]) {
    let tree = KeepNode::build(paths);
    if prune(body, &tree) {
        return;
    }

    // The body itself cannot be removed, so it is emptied instead.
    let empty = match body {
        Value::Array(_) => Value::Array(Vec::new()),
        Value::Object(_) => Value::Object(Map::new()),
        _ => Value::Null,
    };
    discard(std::mem::replace(body, empty));
}

/// Trims `value` to what `node` allows; false means remove it entirely.
/// Recursion follows the tree, so it is bounded by the path length.
fn prune(value: &mut Value, node: &KeepNode<'_>) -> bool {
    if node.all {
        return true;
    }

    match value {
        Value::Object(map) if !node.keys.is_empty() => {
            for (key, mut child) in std::mem::take(map) {
                match node.keys.get(key.as_str()) {
                    Some(next) if prune(&mut child, next) => {
                        map.insert(key, child);
                    }
                    _ => discard(child),
                }
            }
            true
        }
        Value::Array(items) => {
            let Some(each) = &node.each else {
                return false;
            };
            for mut item in std::mem::take(items) {
                if prune(&mut item, each) {
                    items.push(item);
                } else {
                    discard(item);
                }
            }
            true
        }
        _ => false,
    }
}

// === drop, rename, extract, wrap ===

/// Removes the value at a path; `a[]` empties the array `a`.
fn drop_path(body: &mut Value, segments: &[Segment]) {
    let Some((last, parents)) = segments.split_last() else {
        return;
    };

    path::visit_mut(body, parents, &mut |parent| match (last, parent) {
        (Segment::Key(key), Value::Object(map)) => {
            if let Some(old) = map.remove(key) {
                discard(old);
            }
        }
        (Segment::Each, Value::Array(items)) => std::mem::take(items).into_iter().for_each(discard),
        _ => {}
    });
}

/// Moves a field within each element the shared array prefix reaches. When
/// the destination runs through a non-object, the field stays where it was
/// rather than being lost.
///
/// What each move adds (the objects it creates, a longer key) is charged
/// to `budget` before it is put; past it, the field goes back where it
/// was and the budget is marked.
fn rename(body: &mut Value, spec: &Rename, budget: &mut Budget) {
    let Ok(parts) = spec.split() else {
        return;
    };
    // The field taken from `from` no longer takes its key's bytes.
    let freed = match parts.from.last() {
        Some(Segment::Key(key)) => key.len() as u64 + FIELD_BYTES,
        _ => 0,
    };

    path::visit_mut(body, parts.prefix, &mut |scope| {
        if budget.exceeded() {
            return;
        }
        let Some(moved) = path::take_keys(scope, parts.from) else {
            return;
        };

        let adds = put_bytes(scope, parts.to).saturating_sub(freed);
        let put = if budget.take(adds) {
            path::put_keys(scope, parts.to, moved)
        } else {
            Err(moved)
        };
        match put {
            Ok(replaced) => replaced.into_iter().for_each(discard),
            Err(moved) => {
                // Taking only removed the last key, so its parent is still
                // there and putting it back cannot fail.
                if let Err(lost) = path::put_keys(scope, parts.from, moved) {
                    discard(lost);
                }
            }
        }
    });
}

/// The bytes that putting a value at `keys` adds to the written body: the
/// objects created on the way and the last field if it is new. Zero when
/// a value on the way is not an object, since nothing is put then.
fn put_bytes(scope: &Value, keys: &[Segment]) -> u64 {
    let Some((Segment::Key(last), parents)) = keys.split_last() else {
        return 0;
    };

    // Once a key is missing, every object below it is created.
    let mut current = Some(scope);
    let mut bytes = 0u64;
    for segment in parents {
        let Segment::Key(key) = segment else {
            return 0;
        };
        current = match current {
            Some(Value::Object(map)) => map.get(key),
            Some(_) => return 0,
            None => None,
        };
        if current.is_none() {
            // The key, its field bytes, and the new object's braces.
            bytes = bytes.saturating_add(key.len() as u64 + FIELD_BYTES + 2);
        }
    }

    match current {
        Some(Value::Object(map)) if map.contains_key(last) => bytes,
        Some(Value::Object(_)) | None => bytes.saturating_add(last.len() as u64 + FIELD_BYTES),
        Some(_) => 0,
    }
}

/// Replaces the body with the value at the path. A path through `[]`
/// collects every match into an array. If the path does not reach a value
/// (or, with `[]`, an array), the body is left as it was: an error body
/// from upstream should reach the client intact, not as `null`.
fn extract(body: &mut Value, segments: &[Segment]) {
    let first_each = segments.iter().position(|s| *s == Segment::Each);
    let head = &segments[..first_each.unwrap_or(segments.len())];
    let Some(found) = keys_mut(body, head) else {
        return;
    };

    let new = match first_each {
        None => std::mem::take(found),
        Some(_) if !found.is_array() => return,
        Some(_) => {
            let mut matches = Vec::new();
            path::visit_mut(body, segments, &mut |v| matches.push(std::mem::take(v)));
            Value::Array(matches)
        }
    };
    discard(std::mem::replace(body, new));
}

/// Follows a path of keys only.
fn keys_mut<'v>(value: &'v mut Value, keys: &[Segment]) -> Option<&'v mut Value> {
    keys.iter()
        .try_fold(value, |current, segment| match segment {
            Segment::Key(key) => current.as_object_mut()?.get_mut(key),
            Segment::Each => None,
        })
}

fn wrap(body: &mut Value, key: &str) {
    let inner = std::mem::take(body);
    let mut map = Map::new();
    map.insert(key.to_owned(), inner);
    *body = Value::Object(map);
}

// === flatten, drop_nulls, case ===

/// `{a: {b: 1}, c: []}` becomes `{"a.b": 1, c: []}`. Arrays and empty
/// objects are leaves. When two fields end up with the same key, the one
/// met first in the object's order is kept.
///
/// The new keys are measured first and charged to `budget`; an object whose
/// keys do not fit is left as it is, and the budget marked exceeded.
fn flatten(value: &mut Value, separator: &str, budget: &mut Budget) {
    let Value::Object(map) = value else {
        return;
    };
    if budget.exceeded() {
        return;
    }

    let mut measure = |bytes: usize| budget.take(bytes as u64);
    if !flat_key_bytes(map, None, separator.len(), 0, &mut measure) {
        return;
    }

    let mut flat = Map::new();
    lift(std::mem::take(map), None, separator, &mut flat, 0);
    *map = flat;
}

/// Walks the object as [`lift`] will and reports each key length it would
/// write to `take`, stopping when `take` refuses; false means it refused.
/// Nothing is allocated, so a hostile body costs one walk over its nodes.
fn flat_key_bytes(
    map: &Map<String, Value>,
    prefix: Option<usize>,
    separator: usize,
    depth: usize,
    take: &mut dyn FnMut(usize) -> bool,
) -> bool {
    for (key, child) in map {
        let joined = match prefix {
            Some(prefix) => prefix.saturating_add(separator).saturating_add(key.len()),
            None => key.len(),
        };

        let fits = match child {
            Value::Object(inner) if !inner.is_empty() && depth < MAX_DEPTH => {
                flat_key_bytes(inner, Some(joined), separator, depth + 1, take)
            }
            _ => take(joined),
        };
        if !fits {
            return false;
        }
    }
    true
}

fn lift(
    map: Map<String, Value>,
    prefix: Option<&str>,
    separator: &str,
    out: &mut Map<String, Value>,
    depth: usize,
) {
    for (key, child) in map {
        let joined = match prefix {
            Some(prefix) => format!("{prefix}{separator}{key}"),
            None => key,
        };

        match child {
            Value::Object(inner) if !inner.is_empty() && depth < MAX_DEPTH => {
                lift(inner, Some(&joined), separator, out, depth + 1);
            }
            leaf if out.contains_key(&joined) => discard(leaf),
            leaf => {
                out.insert(joined, leaf);
            }
        }
    }
}

/// Removes object fields that are `null`. Nulls inside arrays stay, since
/// removing them would shift the positions of the other elements.
fn drop_nulls(value: &mut Value, recursive: bool, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }

    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            if recursive {
                map.values_mut()
                    .for_each(|v| drop_nulls(v, true, depth + 1));
            }
        }
        Value::Array(items) if recursive => {
            items
                .iter_mut()
                .for_each(|v| drop_nulls(v, true, depth + 1));
        }
        _ => {}
    }
}

/// Converts the keys of every object in the subtree. On a clash (`fooBar`
/// and `foo_bar` both present), the key already in the target style wins.
fn recase(value: &mut Value, to: KeyCase, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }

    let map = match value {
        Value::Object(map) => map,
        Value::Array(items) => {
            items.iter_mut().for_each(|v| recase(v, to, depth + 1));
            return;
        }
        _ => return,
    };
    map.values_mut().for_each(|v| recase(v, to, depth + 1));

    let convert = |key: &str| match to {
        KeyCase::Camel => case::to_camel(key),
        KeyCase::Snake => case::to_snake(key),
    };
    if map.keys().all(|key| convert(key) == *key) {
        return;
    }

    // Rebuilt in the original order; keys already in style go first in
    // priority, whatever their position.
    let settled: BTreeSet<String> = map.keys().filter(|k| convert(k) == **k).cloned().collect();
    for (key, child) in std::mem::take(map) {
        let new = convert(&key);
        let clashes = new != key && (settled.contains(&new) || map.contains_key(&new));
        if clashes {
            discard(child);
        } else {
            map.insert(new, child);
        }
    }
}

// === defaults, convert ===

/// One default of a `defaults` step, with its written length measured
/// once for every place it fills.
struct Fill<'a> {
    value: &'a Value,
    bytes: u64,
}

/// Sets the default where the path leads to a missing field or `null`.
/// Missing objects are created only after the path's last `[]`: there is
/// no sensible array element to invent.
///
/// Each new field (its key and field bytes, and an object's braces) and
/// each value filled in is charged to `budget` before it is added; past
/// it, nothing more is added and the budget is marked.
fn fill(value: &mut Value, segments: &[Segment], default: &Fill<'_>, budget: &mut Budget) {
    let Some((first, rest)) = segments.split_first() else {
        if value.is_null() && budget.take(default.bytes) {
            *value = default.value.clone();
        }
        return;
    };

    match (first, value) {
        (Segment::Key(key), Value::Object(map)) => {
            if !map.contains_key(key) && !rest.contains(&Segment::Each) {
                let (blank, braces) = if rest.is_empty() {
                    (Value::Null, 0)
                } else {
                    (Value::Object(Map::new()), 2)
                };
                if !budget.take(key.len() as u64 + FIELD_BYTES + braces) {
                    return;
                }
                map.insert(key.clone(), blank);
            }
            if let Some(child) = map.get_mut(key) {
                fill(child, rest, default, budget);
            }
        }
        (Segment::Each, Value::Array(items)) => {
            for item in items {
                if budget.exceeded() {
                    return;
                }
                fill(item, rest, default, budget);
            }
        }
        _ => {}
    }
}

/// The length of `value` written as compact JSON, counted without building
/// it. A value serde_json cannot write counts as too large for any budget.
fn written_len(value: &Value) -> u64 {
    struct Count(u64);

    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len() as u64);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => u64::MAX,
    }
}

/// `value * factor + offset`, rounded if asked. Non-numbers, and results
/// JSON cannot hold (infinities), leave the value unchanged.
fn convert(value: &mut Value, spec: &Convert) {
    let Value::Number(number) = value else {
        return;
    };

    // The identity would only cost precision on large integers.
    if spec.factor == 1.0 && spec.offset == 0.0 && spec.round.is_none() {
        return;
    }
    let Some(x) = number.as_f64() else {
        return;
    };

    let mut result = x * spec.factor + spec.offset;
    if let Some(decimals) = spec.round {
        result = round_half_away(result, decimals.min(MAX_ROUND));
    }
    if let Some(number) = to_number(result) {
        *value = Value::Number(number);
    }
}

/// Rounds half away from zero on the binary value, so 1.005 (stored as
/// 1.00499…) rounds to 1 at two decimals, and [`to_number`] writes `1`.
fn round_half_away(x: f64, decimals: u32) -> f64 {
    // From 2^52 up an f64 has no fractional bits left to round.
    const NO_FRACTION: f64 = 4_503_599_627_370_496.0;
    if !x.is_finite() || x.abs() >= NO_FRACTION {
        return x;
    }

    let scale = 10f64.powi(decimals as i32);
    let scaled = x * scale;
    if !scaled.is_finite() {
        return x;
    }
    scaled.round() / scale
}

/// Integral results within i64 become integers, so `75000 * 0.001` is sent
/// as `75` rather than `75.0`.
fn to_number(x: f64) -> Option<Number> {
    // i64::MIN is exactly -2^63; i64::MAX rounds up to 2^63, hence `<`.
    const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
    if x.fract() == 0.0 && (-TWO_POW_63..TWO_POW_63).contains(&x) {
        return Some(Number::from(x as i64));
    }
    Number::from_f64(x)
}
