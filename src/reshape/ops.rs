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

/// What one step may still build. Only `flatten` draws on it: it is the one
/// step whose output can grow faster than its input, since every flattened
/// key repeats the keys above it. Each step gets its own, so a profile with
/// several `flatten` steps is bounded by the number of its steps.
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
        Step::Rename(spec) => rename(body, spec),
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
                fill(body, path.segments(), value);
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
fn rename(body: &mut Value, spec: &Rename) {
    let Ok(parts) = spec.split() else {
        return;
    };

    path::visit_mut(body, parts.prefix, &mut |scope| {
        let Some(moved) = path::take_keys(scope, parts.from) else {
            return;
        };
        match path::put_keys(scope, parts.to, moved) {
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

/// Sets the default where the path leads to a missing field or `null`.
/// Missing objects are created only after the path's last `[]`: there is
/// no sensible array element to invent.
fn fill(value: &mut Value, segments: &[Segment], default: &Value) {
    let Some((first, rest)) = segments.split_first() else {
        if value.is_null() {
            *value = default.clone();
        }
        return;
    };

    match (first, value) {
        (Segment::Key(key), Value::Object(map)) => {
            let child = if rest.contains(&Segment::Each) {
                map.get_mut(key)
            } else {
                let blank = match rest.is_empty() {
                    true => Value::Null,
                    false => Value::Object(Map::new()),
                };
                Some(map.entry(key.as_str()).or_insert(blank))
            };
            if let Some(child) = child {
                fill(child, rest, default);
            }
        }
        (Segment::Each, Value::Array(items)) => {
            items.iter_mut().for_each(|item| fill(item, rest, default));
        }
        _ => {}
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
