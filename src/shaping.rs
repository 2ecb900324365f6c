//! What happens to a response on its way back: whether its body is worth
//! buffering and reshaping, and the reshaping itself.
//!
//! Only responses a profile (or a sparse fieldset) applies to are buffered;
//! everything else (downloads, streams, large or non-JSON bodies, errors,
//! Envoy's own local replies) passes through without its body ever reaching
//! Gatehouse, and is counted.

use std::sync::Arc;

use crate::decision::Metadata;
use crate::metrics::Counter;
use crate::reshape::{self, Step, encoding};
use crate::state::Runtime;

/// The response headers that decide whether a body is reshaped.
#[derive(Debug, Default, Clone)]
pub struct ResponseHead<'a> {
    /// `:status`.
    pub status: Option<u16>,
    /// `content-type`.
    pub content_type: Option<&'a str>,
    /// `content-length`, when present and numeric.
    pub content_length: Option<u64>,
    /// `content-encoding`.
    pub content_encoding: Option<&'a str>,
    /// Whether the headers end the response (no body follows).
    pub end_of_stream: bool,
}

/// Why a response is left alone; logged at debug and useful in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassReason {
    /// Check chose no profile, the profile does not shape this route, and
    /// no sparse fieldset was asked for.
    NoProfile,
    /// No body follows the headers (HEAD, 204, 304).
    NoBody,
    /// The status is not a plain success (or an error the profile shapes).
    Status,
    /// The body is not JSON.
    NotJson,
    /// The body is in an encoding Gatehouse does not decode.
    Encoded,
    /// The length is above the limit.
    Size,
}

/// How the body on the wire is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// As is.
    Identity,
    /// `content-encoding: gzip`: decoded, reshaped and encoded again.
    Gzip,
}

/// What to do with one response's body.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The profile's steps, then a `keep` for the sparse fieldset.
    pub steps: Vec<Step>,
    /// The body's content encoding.
    pub encoding: Encoding,
    /// Whether the length is unknown (a chunked upstream response), so
    /// Envoy must hand over at most its buffer limit.
    pub unknown_length: bool,
    /// The most bytes reshaped, encoded or decoded.
    pub max_body_bytes: u64,
}

/// The steps to apply to this response's body, or why there are none.
/// Every response left alone here is counted, and never reaches the body
/// phase.
///
/// # Errors
///
/// The reason the body is passed through untouched.
pub fn plan(
    runtime: &Runtime,
    metadata: &Metadata,
    head: &ResponseHead<'_>,
) -> Result<Plan, PassReason> {
    let result = decide(runtime, metadata, head);
    if let Err(reason) = result {
        Counter::ReshapeSkipped.inc();
        match reason {
            PassReason::Size => {
                Counter::PassedTooLarge.inc();
                tracing::info!(
                    request.id = %metadata.request_id,
                    reshape.skip = ?reason,
                    "response body is larger than the reshape limit; passing it unchanged",
                );
            }
            PassReason::Encoded => {
                Counter::PassedEncoded.inc();
                tracing::info!(
                    request.id = %metadata.request_id,
                    reshape.skip = ?reason,
                    "response body is in an encoding not decoded here; passing it unchanged",
                );
            }
            PassReason::NotJson if has_steps(runtime, metadata) => {
                Counter::PassedNotJson.inc();
                tracing::info!(
                    request.id = %metadata.request_id,
                    reshape.skip = ?reason,
                    "response body is not JSON; passing it unchanged",
                );
            }
            _ => {}
        }
    }
    result
}

fn has_steps(runtime: &Runtime, metadata: &Metadata) -> bool {
    profile_steps(runtime, metadata).is_some() || metadata.fields.is_some()
}

fn profile_steps(runtime: &Runtime, metadata: &Metadata) -> Option<Arc<[Step]>> {
    let (Some(profile), Some(route)) = (&metadata.profile, &metadata.route) else {
        return None;
    };
    runtime.config.steps(profile, route)
}

/// The profile's steps for this route, then a `keep` for the sparse
/// fieldset, if any.
pub fn steps_for(runtime: &Runtime, metadata: &Metadata) -> Vec<Step> {
    let mut steps: Vec<Step> = profile_steps(runtime, metadata)
        .map(|steps| steps.to_vec())
        .unwrap_or_default();

    // The fieldset narrows what the profile produced: it is a `keep` over
    // the profile's output, so it can never bring back a field the profile
    // removed.
    if let Some(fields) = &metadata.fields
        && let Ok(paths) = reshape::sparse_fieldset(fields)
    {
        steps.push(Step::Keep(paths));
    }
    steps
}

fn decide(
    runtime: &Runtime,
    metadata: &Metadata,
    head: &ResponseHead<'_>,
) -> Result<Plan, PassReason> {
    let steps = steps_for(runtime, metadata);
    if steps.is_empty() {
        return Err(PassReason::NoProfile);
    }

    if head.end_of_stream {
        return Err(PassReason::NoBody);
    }
    let reshape_errors = metadata
        .profile
        .as_deref()
        .and_then(|name| runtime.config.profile(name))
        .is_some_and(|profile| profile.reshape_errors);
    // 206 and 304 carry partial or no representations; 204 has no body.
    match head.status {
        Some(200..=203) => {}
        Some(400..=599) if reshape_errors => {}
        _ => return Err(PassReason::Status),
    }
    if !head.content_type.is_some_and(is_json) {
        return Err(PassReason::NotJson);
    }
    let encoding = match head.content_encoding.map(str::trim) {
        None => Encoding::Identity,
        Some(name) if name.eq_ignore_ascii_case("identity") => Encoding::Identity,
        Some(name) if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") => {
            Encoding::Gzip
        }
        Some(_) => return Err(PassReason::Encoded),
    };

    let max_body_bytes = runtime.config.reshape.max_body_bytes;
    match head.content_length {
        Some(length) if length > max_body_bytes => Err(PassReason::Size),
        length => Ok(Plan {
            steps,
            encoding,
            unknown_length: length.is_none(),
            max_body_bytes,
        }),
    }
}

/// Reshapes a whole body; `None` when it must pass unchanged (not JSON,
/// larger than the limit, undecodable), which is logged and counted.
pub fn reshape_body(plan: &Plan, body: &[u8], request_id: &str) -> Option<Vec<u8>> {
    if body.len() as u64 > plan.max_body_bytes {
        Counter::PassedTooLarge.inc();
        tracing::info!(
            request.id = %request_id,
            body.bytes = body.len(),
            "response body is larger than the reshape limit; passing it unchanged",
        );
        return None;
    }

    let decoded = match plan.encoding {
        Encoding::Identity => None,
        Encoding::Gzip => match encoding::gunzip_bounded(body, plan.max_body_bytes) {
            Ok(decoded) => Some(decoded),
            Err(err) => {
                let counter = match err {
                    encoding::DecodeError::TooLarge { .. } => Counter::PassedTooLarge,
                    encoding::DecodeError::Corrupt(_) => Counter::PassedEncoded,
                };
                counter.inc();
                tracing::info!(
                    request.id = %request_id,
                    error = %err,
                    "gzip response body cannot be reshaped; passing it unchanged",
                );
                return None;
            }
        },
    };

    let json = decoded.as_deref().unwrap_or(body);
    let reshaped = match reshape::apply_to_bytes(&plan.steps, json) {
        Ok(reshaped) => reshaped,
        Err(err) => {
            Counter::PassedNotJson.inc();
            tracing::info!(
                request.id = %request_id,
                error = %err,
                "response body is not valid JSON; passing it unchanged",
            );
            return None;
        }
    };

    let encoded = match plan.encoding {
        Encoding::Identity => reshaped,
        Encoding::Gzip => match encoding::gzip(&reshaped) {
            Ok(encoded) => encoded,
            Err(err) => {
                tracing::warn!(
                    request.id = %request_id,
                    error = %err,
                    "reshaped body could not be gzipped; passing the original",
                );
                return None;
            }
        },
    };
    Counter::Reshaped.inc();
    Some(encoded)
}

/// `application/json` and `application/*+json`, with any parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();

    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn recognises_json_media_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/problem+json"));
        assert!(!is_json("text/json-ish"));
        assert!(!is_json("application/octet-stream"));
        assert!(!is_json(""));
    }
}
