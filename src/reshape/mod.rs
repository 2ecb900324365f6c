//! Reshaping JSON response bodies for mobile and partner clients.
//!
//! A profile is a list of [`Step`]s read from config and applied in order.
//! Steps never fail on data: a path that does not match is skipped. Only
//! config ([`validate`]), unparsable bodies ([`apply_to_bytes`]) and
//! results past the size limit ([`TooLarge`]) fail.

mod case;
pub mod encoding;
mod ops;
mod path;
mod step;
mod timestamp;

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

use serde_json::Value;

pub use path::{Path, PathError, PathProblem, Segment};
pub use step::{
    Case, Convert, Defaults, DropNulls, Flatten, KeyCase, MAX_ROUND, Rename, Step, StepError,
    StepProblem, TimeFormat, Timestamp,
};

/// How deep any walk goes: the most segments a path may have, and the
/// nesting below which whole-subtree steps (`flatten`, `drop_nulls`,
/// `case`) leave values untouched. Parsed bodies are already capped at 128
/// levels by serde_json; this guards values built by callers.
pub const MAX_DEPTH: usize = 128;

/// The ordered steps that shape one route's responses for one client kind.
pub type Profile = Vec<Step>;

/// Reshaping would build more than the limit allows: `flatten` copies each
/// key's whole prefix into every key below it, and `defaults` or `rename`
/// add the same fields to every element, so a small body can ask for
/// gigabytes. The caller should pass the original body unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("reshaped body would be larger than {limit} bytes")]
pub struct TooLarge {
    /// The limit in bytes.
    pub limit: u64,
}

/// A response body that could not be reshaped; the caller should pass the
/// original bytes through unchanged.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Not JSON, or nested more than 128 levels deep.
    #[error("response body is not valid json")]
    InvalidJson(#[source] serde_json::Error),
    /// A step, or the written result, would pass the limit.
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    /// Writing the result failed; not expected for values built from JSON.
    #[error("reshaped body could not be serialized")]
    Serialize(#[source] serde_json::Error),
}

/// Checks every step beyond what deserialization already did, stopping at
/// the first problem so config errors can name the profile and step.
/// Use [`Step::check`] directly to report every problem at once.
pub fn validate(steps: &[Step]) -> Result<(), StepError> {
    for (index, step) in steps.iter().enumerate() {
        step.check().map_err(|problem| StepError {
            index,
            op: step.op(),
            problem,
        })?;
    }
    Ok(())
}

/// Applies the steps in order. Never panics: parts of the data a step's
/// paths do not reach are left alone, and steps that [`validate`] would
/// refuse are skipped or clamped.
///
/// `max_bytes` bounds what each step that can grow a body adds to it, over
/// every place the step reaches: the keys a `flatten` writes, the fields
/// and values a `defaults` fills in, the objects a `rename` creates on its
/// way. Each is charged before it is built, so the work stays small
/// however hostile the body.
///
/// # Errors
///
/// [`TooLarge`] when one step would add more than `max_bytes`. The body
/// is then partly reshaped and should be discarded.
pub fn apply(steps: &[Step], body: &mut Value, max_bytes: u64) -> Result<(), TooLarge> {
    for step in steps {
        let mut budget = ops::Budget::new(max_bytes);
        ops::apply_step(step, body, &mut budget);
        if budget.exceeded() {
            return Err(TooLarge { limit: max_bytes });
        }
    }
    Ok(())
}

/// Parses a body, applies the steps and writes compact JSON of at most
/// `max_bytes`, which also bounds `flatten` (see [`apply`]).
///
/// # Errors
///
/// [`BodyError::InvalidJson`] when the body is not JSON (including empty
/// bodies and nesting past serde_json's limit of 128);
/// [`BodyError::TooLarge`] when a step or the result would pass
/// `max_bytes`. Writing stops at the limit, so a result that is too large
/// is never held in full.
pub fn apply_to_bytes(steps: &[Step], bytes: &[u8], max_bytes: u64) -> Result<Vec<u8>, BodyError> {
    let mut body: Value = serde_json::from_slice(bytes).map_err(BodyError::InvalidJson)?;

    let applied = apply(steps, &mut body, max_bytes);
    if let Err(err) = applied {
        ops::discard(body);
        return Err(err.into());
    }

    let written = write_bounded(&body, max_bytes, bytes.len());
    ops::discard(body);
    written
}

/// Writes a value as compact JSON of at most `max_bytes`, for bodies that
/// were built rather than parsed (a composite's merged parts). Writing
/// stops at the limit, so a value too large to send is never written in
/// full.
///
/// # Errors
///
/// [`BodyError::TooLarge`] when the JSON would pass `max_bytes`;
/// [`BodyError::Serialize`] if serde_json fails, which values built from
/// JSON do not make it do.
pub fn to_bytes_bounded(body: &Value, max_bytes: u64) -> Result<Vec<u8>, BodyError> {
    write_bounded(body, max_bytes, 0)
}

/// The one bounded write, starting with room for `capacity` bytes.
fn write_bounded(body: &Value, max_bytes: u64, capacity: usize) -> Result<Vec<u8>, BodyError> {
    let mut out = Bounded {
        bytes: Vec::with_capacity(capacity),
        limit: max_bytes,
        refused: false,
    };
    match serde_json::to_writer(&mut out, body) {
        Ok(()) => Ok(out.bytes),
        Err(_) if out.refused => Err(TooLarge { limit: max_bytes }.into()),
        Err(err) => Err(BodyError::Serialize(err)),
    }
}

/// A writer that refuses to grow past `limit`, so serializing an oversized
/// result stops early instead of filling memory.
struct Bounded {
    bytes: Vec<u8>,
    limit: u64,
    /// A write was refused for the limit, which tells this apart from
    /// serde_json's own errors.
    refused: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.limit.saturating_sub(self.bytes.len() as u64);
        if buf.len() as u64 > room {
            self.refused = true;
            return Err(std::io::Error::other("reshaped body passes the limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Parses a sparse fieldset query value such as `id,battery.soc`, with the
/// same path syntax as config (`items[].id`); blanks around commas are
/// ignored. Apply the result as an extra `keep` after the client's profile,
/// so a client can narrow what its profile allows but never widen it.
pub fn sparse_fieldset(param: &str) -> Result<Vec<Path>, PathError> {
    param
        .split(',')
        .map(|field| Path::parse(field.trim()))
        .collect()
}
