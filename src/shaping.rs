//! What happens to a response on its way back: whether its body is worth
//! buffering and reshaping, and the reshaping itself.
//!
//! Only responses a profile applies to are buffered; everything else
//! (downloads, streams, large or non-JSON bodies, Envoy's own local replies)
//! passes through without its body ever reaching Gatehouse.

use std::sync::Arc;

use crate::decision::Metadata;
use crate::reshape::{self, Step};
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
    /// Check chose no profile, or the profile does not shape this route.
    NoProfile,
    /// No body follows the headers.
    NoBody,
    /// The status is not a plain success.
    Status,
    /// The body is not JSON.
    NotJson,
    /// The body is encoded (compressed).
    Encoded,
    /// The length is unknown or above the limit.
    Size,
}

/// The steps to apply to this response's body, or why there are none.
///
/// # Errors
///
/// The reason the body is passed through untouched.
pub fn plan(
    runtime: &Runtime,
    metadata: &Metadata,
    head: &ResponseHead<'_>,
) -> Result<Arc<[Step]>, PassReason> {
    let (Some(profile), Some(route)) = (&metadata.profile, &metadata.route) else {
        return Err(PassReason::NoProfile);
    };
    let steps = runtime
        .config
        .steps(profile, route)
        .ok_or(PassReason::NoProfile)?;

    if head.end_of_stream {
        return Err(PassReason::NoBody);
    }
    // 206 and 304 carry partial or no representations; 204 has no body.
    if !matches!(head.status, Some(200..=203)) {
        return Err(PassReason::Status);
    }
    if !head.content_type.is_some_and(is_json) {
        return Err(PassReason::NotJson);
    }
    if head
        .content_encoding
        .is_some_and(|encoding| !encoding.eq_ignore_ascii_case("identity"))
    {
        return Err(PassReason::Encoded);
    }
    match head.content_length {
        Some(length) if length <= runtime.config.reshape.max_body_bytes => Ok(steps),
        _ => Err(PassReason::Size),
    }
}

/// Reshapes a JSON body; `None` when it is not valid JSON, in which case the
/// original passes unchanged.
pub fn reshape_body(steps: &[Step], body: &[u8]) -> Option<Vec<u8>> {
    match reshape::apply_to_bytes(steps, body) {
        Ok(reshaped) => Some(reshaped),
        Err(err) => {
            tracing::info!(error = %err, "response body is not valid JSON; passing it unchanged");
            None
        }
    }
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
