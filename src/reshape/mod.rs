//! Reshaping JSON response bodies for mobile and partner clients.
//!
//! A profile is a list of [`Step`]s read from config and applied in order.
//! Steps never fail on data: a path that does not match is skipped. Only
//! config ([`validate`]) and unparsable bodies ([`apply_to_bytes`]) fail.

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

/// A response body that could not be reshaped; the caller should pass the
/// original bytes through unchanged.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Not JSON, or nested more than 128 levels deep.
    #[error("response body is not valid json")]
    InvalidJson(#[source] serde_json::Error),
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

/// Applies the steps in order. Never panics and never fails: parts of the
/// data a step's paths do not reach are left alone, and steps that
/// [`validate`] would refuse are skipped or clamped.
pub fn apply(steps: &[Step], body: &mut Value) {
    for step in steps {
        ops::apply_step(step, body);
    }
}

/// Parses a body, applies the steps and writes compact JSON.
///
/// # Errors
///
/// [`BodyError::InvalidJson`] when the body is not JSON (including empty
/// bodies and nesting past serde_json's limit of 128).
pub fn apply_to_bytes(steps: &[Step], bytes: &[u8]) -> Result<Vec<u8>, BodyError> {
    let mut body: Value = serde_json::from_slice(bytes).map_err(BodyError::InvalidJson)?;

    apply(steps, &mut body);

    serde_json::to_vec(&body).map_err(BodyError::Serialize)
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
