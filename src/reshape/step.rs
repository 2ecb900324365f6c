//! The reshape steps as they appear in config, and the checks that serde
//! alone cannot express (such as a rename that would leave its array).

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use super::path::{Path, Segment};
use crate::config::strict::strict;

/// The most decimals `convert` may round to; beyond this f64 has no digits
/// left to round and scaling by 10^n stops being exact enough to matter.
pub const MAX_ROUND: u32 = 15;

/// One reshape operation. Written in config as a one-key map, e.g.
/// `- drop: [internal_id]`; see the module docs for every form.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// `- keep: [id, items[].battery.soc]`: keep only these paths and their
    /// ancestors. A value a path runs through that is not the expected
    /// object or array is removed, so upstream shape changes cannot leak.
    Keep(Vec<Path>),
    /// `- drop: [internal_id, items[].debug]`; `a[]` empties the array `a`.
    Drop(Vec<Path>),
    /// `- rename: {from: soc, to: battery.soc}`; see [`Rename`].
    Rename(Rename),
    /// `- extract: data`: the body becomes the value there; `data.items[].id`
    /// gives an array of every match. Missing: the body is left unchanged.
    Extract(Path),
    /// `- wrap: data`: the body becomes `{"data": body}`.
    Wrap(String),
    /// `- flatten: {path: battery, separator: "_"}`, both optional; see
    /// [`Flatten`].
    #[serde(deserialize_with = "null_as_default")]
    Flatten(Flatten),
    /// `- drop_nulls: {}` (or `{recursive: false, path: items[]}`); see
    /// [`DropNulls`].
    #[serde(deserialize_with = "null_as_default")]
    DropNulls(DropNulls),
    /// `- defaults: {status: unknown, "items[].tags": []}`: fill fields that
    /// are missing or `null`; see [`Defaults`].
    Defaults(Defaults),
    /// `- convert: {path: energy_wh, factor: 0.001, offset: 0, round: 2}`;
    /// see [`Convert`].
    Convert(Convert),
    /// `- timestamp: {path: seen_at, from: epoch_millis, to: rfc3339}`; see
    /// [`Timestamp`].
    Timestamp(Timestamp),
    /// `- case: {to: camel, path: data}`, `path` optional; see [`Case`].
    Case(Case),
}

/// `rename: {from, to}`. A missing `from` is not an error: the step does
/// nothing. An existing `to` is overwritten.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rename {
    /// Where the value is now.
    pub from: Path,
    /// Where it goes; missing objects on the way are created.
    pub to: Path,
}

/// `flatten: {path, separator}`: `{a: {b: 1}}` becomes `{"a.b": 1}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flatten {
    /// The objects to flatten; the whole body when absent.
    #[serde(default)]
    pub path: Option<Path>,
    /// Put between the keys of each level.
    #[serde(default = "default_separator")]
    pub separator: String,
}

/// `drop_nulls: {recursive, path}`; `drop_nulls: {}` or a bare
/// `drop_nulls:` (YAML null) cleans the whole body recursively.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropNulls {
    /// The objects to clean; the whole body when absent.
    #[serde(default)]
    pub path: Option<Path>,
    /// Also clean nested objects, including objects inside arrays.
    #[serde(default = "default_true", deserialize_with = "strict")]
    pub recursive: bool,
}

/// `defaults: {path: value, ...}`. Shorter paths are filled first, so
/// `{a: {}, a.b: 1}` gives `{a: {b: 1}}` whichever is written first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Defaults(pub Vec<(Path, Value)>);

/// `convert: {path, factor, offset, round}`: `value * factor + offset`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Convert {
    /// The numbers to convert; other values there are left alone.
    pub path: Path,
    /// Multiplier, 1 by default.
    #[serde(default = "default_factor", deserialize_with = "strict")]
    pub factor: f64,
    /// Added after multiplying, 0 by default.
    #[serde(default, deserialize_with = "strict")]
    pub offset: f64,
    /// Decimals to round to, half away from zero; unrounded when absent.
    #[serde(default, deserialize_with = "strict")]
    pub round: Option<u32>,
}

/// `timestamp: {path, from, to}`: rewrite instants between notations.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timestamp {
    /// The values to rewrite; those not in the `from` notation are kept.
    pub path: Path,
    /// How the upstream writes them.
    pub from: TimeFormat,
    /// How the client wants them.
    pub to: TimeFormat,
}

/// The notations `timestamp` reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    /// A string such as `2024-05-01T12:00:00Z`; written back in UTC.
    Rfc3339,
    /// A number of seconds since 1970-01-01T00:00:00Z.
    EpochSeconds,
    /// A number of milliseconds since 1970-01-01T00:00:00Z.
    EpochMillis,
}

/// `case: {to, path}`: rename object keys, recursively.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// The key style wanted.
    pub to: KeyCase,
    /// The subtree to convert; the whole body when absent.
    #[serde(default)]
    pub path: Option<Path>,
}

/// Key styles that `case` converts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyCase {
    /// `batterySoc`.
    Camel,
    /// `battery_soc`.
    Snake,
}

/// A step that deserialized but cannot work as written, with its position
/// so config errors can point at it.
///
/// The message reads as the rest of a config key, `[1].rename: ...`, with
/// the 0-based index that parse errors also use (`vehicles[1].keep[0]`), so
/// every message about one step names it the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("[{index}].{op}: {problem}")]
pub struct StepError {
    /// 0-based position in the list.
    pub index: usize,
    /// The step's config name, such as `rename`.
    pub op: &'static str,
    /// What is wrong.
    pub problem: StepProblem,
}

/// Why a single step is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepProblem {
    /// `keep: []` would blank every body.
    #[error("keep lists no paths, which would remove the whole body")]
    EmptyKeep,
    /// A rename must move a field, not array elements.
    #[error("rename path `{0}` ends in `[]`; it must end in a key")]
    RenameEndsInArray(String),
    /// Moving a field out of (or into) an array element has no single
    /// destination.
    #[error(
        "rename from `{from}` to `{to}` crosses an array: both must share the part up to their \
         last `[]` and have no `[]` after it"
    )]
    RenameAcrossArrays {
        /// The `from` path.
        from: String,
        /// The `to` path.
        to: String,
    },
    /// One path inside the other: `{from: a, to: a.b}` would nest the value
    /// one level deeper on every run, and `{from: a.b, to: a}` would replace
    /// `a` and lose its other fields.
    #[error("rename from `{from}` to `{to}` overlaps: one path lies inside the other")]
    RenameOverlaps {
        /// The `from` path.
        from: String,
        /// The `to` path.
        to: String,
    },
    /// `wrap: ""`.
    #[error("wrap key is empty")]
    EmptyWrapKey,
    /// `flatten: {separator: ""}` would glue keys together ambiguously.
    #[error("flatten separator is empty")]
    EmptySeparator,
    /// NaN or infinity can only produce values JSON cannot hold.
    #[error("convert {0} is not a finite number")]
    NotFinite(&'static str),
    /// More decimals than f64 can round meaningfully.
    #[error("convert round of {0} decimals is above the maximum of {MAX_ROUND}")]
    RoundTooFine(u32),
    /// The same path twice in one `defaults` map.
    #[error("defaults lists `{0}` twice")]
    DuplicateDefault(String),
}

// === impl Step ===

impl Step {
    /// The step's name as written in config.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Keep(_) => "keep",
            Self::Drop(_) => "drop",
            Self::Rename(_) => "rename",
            Self::Extract(_) => "extract",
            Self::Wrap(_) => "wrap",
            Self::Flatten(_) => "flatten",
            Self::DropNulls(_) => "drop_nulls",
            Self::Defaults(_) => "defaults",
            Self::Convert(_) => "convert",
            Self::Timestamp(_) => "timestamp",
            Self::Case(_) => "case",
        }
    }

    /// Checks what deserialization cannot. Config loading can call this on
    /// every step to report all problems at once, not just the first.
    pub fn check(&self) -> Result<(), StepProblem> {
        match self {
            Self::Keep(paths) if paths.is_empty() => Err(StepProblem::EmptyKeep),
            Self::Rename(rename) => rename.split().map(|_| ()),
            Self::Wrap(key) if key.is_empty() => Err(StepProblem::EmptyWrapKey),
            Self::Flatten(flatten) if flatten.separator.is_empty() => {
                Err(StepProblem::EmptySeparator)
            }
            Self::Convert(convert) => convert.check(),
            Self::Defaults(defaults) => defaults.check(),
            _ => Ok(()),
        }
    }
}

// === impl Rename ===

impl Rename {
    /// Splits both paths into the shared array prefix and the key-only
    /// tails that are moved within each element the prefix reaches.
    pub(crate) fn split(&self) -> Result<RenameParts<'_>, StepProblem> {
        for path in [&self.from, &self.to] {
            if path.segments().last() == Some(&Segment::Each) {
                return Err(StepProblem::RenameEndsInArray(path.to_string()));
            }
        }

        let prefix_len = |path: &Path| {
            let segments = path.segments();
            segments
                .iter()
                .rposition(|s| *s == Segment::Each)
                .map_or(0, |i| i + 1)
        };
        let (from, to) = (self.from.segments(), self.to.segments());
        let len = prefix_len(&self.from);

        // The destination may not sit in another array, nor in a deeper
        // one, because each source element needs exactly one destination.
        if prefix_len(&self.to) != len || from[..len] != to[..len] {
            return Err(StepProblem::RenameAcrossArrays {
                from: self.from.to_string(),
                to: self.to.to_string(),
            });
        }

        // Equal paths count too: such a rename does nothing, which is not
        // what anyone who wrote it meant.
        if from.starts_with(to) || to.starts_with(from) {
            return Err(StepProblem::RenameOverlaps {
                from: self.from.to_string(),
                to: self.to.to_string(),
            });
        }

        Ok(RenameParts {
            prefix: &from[..len],
            from: &from[len..],
            to: &to[len..],
        })
    }
}

/// A rename taken apart by [`Rename::split`].
pub(crate) struct RenameParts<'a> {
    pub(crate) prefix: &'a [Segment],
    pub(crate) from: &'a [Segment],
    pub(crate) to: &'a [Segment],
}

// === impl Convert ===

impl Convert {
    fn check(&self) -> Result<(), StepProblem> {
        if !self.factor.is_finite() {
            return Err(StepProblem::NotFinite("factor"));
        }
        if !self.offset.is_finite() {
            return Err(StepProblem::NotFinite("offset"));
        }
        match self.round {
            Some(round) if round > MAX_ROUND => Err(StepProblem::RoundTooFine(round)),
            _ => Ok(()),
        }
    }
}

// === impl Defaults ===

impl Defaults {
    fn check(&self) -> Result<(), StepProblem> {
        for (index, (path, _)) in self.0.iter().enumerate() {
            if self.0[..index].iter().any(|(seen, _)| seen == path) {
                return Err(StepProblem::DuplicateDefault(path.to_string()));
            }
        }
        Ok(())
    }
}

/// Read as a map so the config can write `path: value` pairs, refusing a
/// path given twice rather than silently keeping one of the values.
impl<'de> Deserialize<'de> for Defaults {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(DefaultsVisitor)
    }
}

struct DefaultsVisitor;

impl<'de> Visitor<'de> for DefaultsVisitor {
    type Value = Defaults;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map from field path to default value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Defaults, A::Error> {
        let mut entries: Vec<(Path, Value)> = Vec::new();
        while let Some((path, value)) = map.next_entry::<Path, Value>()? {
            if entries.iter().any(|(seen, _)| *seen == path) {
                let problem = StepProblem::DuplicateDefault(path.to_string());
                return Err(de::Error::custom(problem));
            }
            entries.push((path, value));
        }
        Ok(Defaults(entries))
    }
}

// === serde helpers ===

impl Default for Flatten {
    fn default() -> Self {
        Self {
            path: None,
            separator: default_separator(),
        }
    }
}

impl Default for DropNulls {
    fn default() -> Self {
        Self {
            path: None,
            recursive: true,
        }
    }
}

/// Lets a YAML step with nothing after the colon (`- drop_nulls:`) mean
/// "all defaults", as `{}` does.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

fn default_separator() -> String {
    ".".to_owned()
}

fn default_true() -> bool {
    true
}

fn default_factor() -> f64 {
    1.0
}
