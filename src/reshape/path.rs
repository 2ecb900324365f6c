//! Field paths such as `items[].battery.soc`: parsing, and walking them
//! over a JSON value. Walks follow the path, so their depth is bounded by
//! the path's length, which parsing caps at [`MAX_DEPTH`] segments.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde_json::Value;

use super::MAX_DEPTH;

/// A parsed field path, kept with its text so errors and logs can quote it.
///
/// Built only through [`Path::parse`] (or deserialization, which calls it),
/// so every `Path` in a step is known to be well formed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    text: String,
    segments: Vec<Segment>,
}

/// One step of a path: into an object's field, or into every array element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// The field with this name, when the value is an object.
    Key(String),
    /// Each element, when the value is an array; written `[]`.
    Each,
}

/// A path string that is not well formed, with where the problem starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid path `{path}` at byte {at}: {problem}")]
pub struct PathError {
    /// The text as given.
    pub path: String,
    /// Byte offset into `path` where the problem was found.
    pub at: usize,
    /// What is wrong.
    pub problem: PathProblem,
}

/// What makes a path string invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathProblem {
    /// Nothing to address; the whole body is not a path.
    #[error("the path is empty")]
    Empty,
    /// `a..b`, or a leading or trailing dot.
    #[error("empty segment between dots")]
    EmptySegment,
    /// `a[` or `a]`.
    #[error("unbalanced bracket")]
    UnbalancedBracket,
    /// `a[0]`, `a[*]`: only "each element" exists.
    #[error("only `[]` is allowed inside brackets")]
    BracketContent,
    /// `a[]b`: text after the brackets within one segment.
    #[error("`[]` must end its segment; use `.` before the next key")]
    TextAfterBrackets,
    /// `a.[]`: only the first segment may be a bare `[]`.
    #[error("`[]` must follow a key, except at the start of the path")]
    BracketWithoutKey,
    /// Too many segments to walk safely.
    #[error("more than {MAX_DEPTH} segments")]
    TooLong,
}

// === impl Path ===

impl Path {
    /// Parses dot-separated keys, each optionally followed by `[]` ("every
    /// element"); the first may be a bare `[]` for an array body. Keys may
    /// hold any character but `.`, `[` and `]`.
    pub fn parse(text: &str) -> Result<Self, PathError> {
        let fail = |at: usize, problem: PathProblem| PathError {
            path: text.to_owned(),
            at,
            problem,
        };
        if text.is_empty() {
            return Err(fail(0, PathProblem::Empty));
        }

        let mut segments = Vec::new();
        let mut start = 0;
        for (index, part) in text.split('.').enumerate() {
            parse_part(part, index == 0, &mut segments).map_err(|(at, p)| fail(start + at, p))?;
            start += part.len() + 1;

            // Checked as we go, so a hostile path cannot make us build a
            // huge vector before refusing it.
            if segments.len() > MAX_DEPTH {
                return Err(fail(start.min(text.len()), PathProblem::TooLong));
            }
        }

        Ok(Self {
            text: text.to_owned(),
            segments,
        })
    }

    /// The path as it was written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed segments, outermost first.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// True if the path passes through an array (`[]` anywhere).
    pub fn has_each(&self) -> bool {
        self.segments.contains(&Segment::Each)
    }
}

/// Parses one dot-separated part: an optional key followed by any number of
/// `[]`. Errors carry the byte offset within the part.
fn parse_part(
    part: &str,
    first: bool,
    segments: &mut Vec<Segment>,
) -> Result<(), (usize, PathProblem)> {
    if part.is_empty() {
        return Err((0, PathProblem::EmptySegment));
    }

    let key_end = part.find(['[', ']']).unwrap_or(part.len());
    let key = &part[..key_end];
    let mut rest = &part[key_end..];
    if key.is_empty() && !first {
        return Err((0, PathProblem::BracketWithoutKey));
    }
    if !key.is_empty() {
        segments.push(Segment::Key(key.to_owned()));
    }

    // Whatever follows the key must be a run of `[]`.
    while !rest.is_empty() {
        let at = part.len() - rest.len();
        if let Some(after) = rest.strip_prefix("[]") {
            segments.push(Segment::Each);
            rest = after;
        } else if rest.starts_with(']') {
            return Err((at, PathProblem::UnbalancedBracket));
        } else if let Some(inner) = rest.strip_prefix('[') {
            let problem = match inner.find(']') {
                Some(_) => PathProblem::BracketContent,
                None => PathProblem::UnbalancedBracket,
            };
            return Err((at, problem));
        } else {
            return Err((at, PathProblem::TextAfterBrackets));
        }
    }
    Ok(())
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Path {
    type Err = PathError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

/// Paths are written as strings in config; parsing here means a bad path
/// fails when the config loads, with the path text in the message.
impl<'de> Deserialize<'de> for Path {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(PathVisitor)
    }
}

struct PathVisitor;

impl Visitor<'_> for PathVisitor {
    type Value = Path;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field path such as `items[].battery.soc`")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Path, E> {
        Path::parse(text).map_err(E::custom)
    }
}

// === walking ===

/// Calls `f` on every existing value the segments lead to. Parts of the
/// data that do not match (a missing key, a number where an array was
/// expected) are skipped, never created.
pub(crate) fn visit_mut(value: &mut Value, segments: &[Segment], f: &mut dyn FnMut(&mut Value)) {
    let Some((first, rest)) = segments.split_first() else {
        f(value);
        return;
    };

    match (first, value) {
        (Segment::Key(key), Value::Object(map)) => {
            if let Some(child) = map.get_mut(key) {
                visit_mut(child, rest, f);
            }
        }
        (Segment::Each, Value::Array(items)) => {
            for item in items {
                visit_mut(item, rest, f);
            }
        }
        _ => {}
    }
}

/// True if at least one value exists at the path. `a[]` exists only when
/// `a` is a non-empty array.
#[cfg(test)]
pub(crate) fn exists(value: &Value, segments: &[Segment]) -> bool {
    let Some((first, rest)) = segments.split_first() else {
        return true;
    };

    match (first, value) {
        (Segment::Key(key), Value::Object(map)) => {
            map.get(key).is_some_and(|child| exists(child, rest))
        }
        (Segment::Each, Value::Array(items)) => items.iter().any(|item| exists(item, rest)),
        _ => false,
    }
}

/// Removes and returns the value at a path made only of keys.
pub(crate) fn take_keys(value: &mut Value, keys: &[Segment]) -> Option<Value> {
    let (last, parents) = keys.split_last()?;
    let Segment::Key(last) = last else {
        return None;
    };

    let mut current = value;
    for segment in parents {
        let Segment::Key(key) = segment else {
            return None;
        };
        current = current.as_object_mut()?.get_mut(key)?;
    }
    current.as_object_mut()?.remove(last)
}

/// Stores `new` at a path made only of keys, creating missing objects on
/// the way and returning what it replaced. Gives `new` back when a value
/// on the way is not an object, so the caller can put it back.
pub(crate) fn put_keys(
    value: &mut Value,
    keys: &[Segment],
    new: Value,
) -> Result<Option<Value>, Value> {
    let Some((Segment::Key(last), parents)) = keys.split_last() else {
        return Err(new);
    };

    let mut current = value;
    for segment in parents {
        let Segment::Key(key) = segment else {
            return Err(new);
        };
        let Value::Object(map) = current else {
            return Err(new);
        };
        current = map
            .entry(key.as_str())
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
    }

    match current {
        Value::Object(map) => Ok(map.insert(last.clone(), new)),
        _ => Err(new),
    }
}
