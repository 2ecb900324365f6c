//! Composite endpoints: one client request answered from several services'
//! JSON, fetched in parallel through the loopback Envoy listener, merged,
//! shaped by the client's profile, and returned as ext_proc's immediate
//! response. A part that fails or is too slow is reported, not fatal.

use std::sync::OnceLock;
use std::time::Duration;

use futures::future::join_all;
use serde_json::{Map, Value, json};

use crate::config::{Composite, MergeMode, Part};
use crate::metrics::Counter;
use crate::reshape::{self, Step};

/// The response header that lists the parts that did not arrive.
pub const PARTIAL_HEADER: &str = "x-gatehouse-partial";

/// The body field that says why each missing part is missing.
pub const PARTIAL_FIELD: &str = "partial_failures";

/// The answer to send the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP status: 200 when any part arrived, 502 when none did.
    pub status: u16,
    /// Response headers besides `content-type`.
    pub headers: Vec<(String, String)>,
    /// The JSON body.
    pub body: Vec<u8>,
}

/// Why one part is missing; the text goes into [`PARTIAL_FIELD`].
#[derive(Debug, thiserror::Error)]
enum PartError {
    #[error("timed out after {0} ms")]
    Timeout(u128),
    #[error("unreachable")]
    Unreachable,
    #[error("answered with status {0}")]
    Status(u16),
    #[error("answered with more than {0} bytes")]
    TooLarge(u64),
    #[error("answered with a body that is not JSON")]
    NotJson,
}

/// One pooled client for every composite: the parts go to one loopback
/// listener, and keeping its connections warm saves a handshake per part.
fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_millis(250))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new())
    })
}

/// Fetches every part with `forward` headers (identity, request id), merges
/// them, applies `steps` and reports what is missing.
pub async fn answer(
    composite: &Composite,
    forward: &[(String, String)],
    steps: &[Step],
    max_body_bytes: u64,
) -> Answer {
    let fetches = composite
        .parts
        .iter()
        .map(|part| fetch(part, forward, max_body_bytes));
    let results = join_all(fetches).await;

    let mut failures = Map::new();
    let mut arrived = Vec::new();
    for (part, result) in composite.parts.iter().zip(results) {
        match result {
            Ok(value) => arrived.push((part.key.as_str(), value)),
            Err(err) => {
                Counter::CompositeBackendFailed.inc();
                tracing::info!(composite.part = %part.key, error = %err, "composite part missing");
                failures.insert(part.key.clone(), json!(err.to_string()));
            }
        }
    }

    let mut body = merge(composite.merge, arrived, &mut failures);
    reshape::apply(steps, &mut body);

    let mut headers = Vec::new();
    if !failures.is_empty() {
        let missing: Vec<&str> = failures.keys().map(String::as_str).collect();
        headers.push((PARTIAL_HEADER.to_owned(), missing.join(",")));
        // Added after the profile, so no profile can hide a failure.
        if let Value::Object(map) = &mut body {
            map.insert(PARTIAL_FIELD.to_owned(), Value::Object(failures.clone()));
        } else {
            body = json!({"data": body, PARTIAL_FIELD: failures.clone()});
        }
    }

    let status = if failures.len() == composite.parts.len() {
        502
    } else {
        200
    };
    Counter::CompositeAnswered.inc();
    Answer {
        status,
        headers,
        body: serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec()),
    }
}

/// One body from the parts: each under its key, or their fields together.
fn merge(mode: MergeMode, arrived: Vec<(&str, Value)>, failures: &mut Map<String, Value>) -> Value {
    let mut merged = Map::new();
    for (key, value) in arrived {
        match (mode, value) {
            (MergeMode::Keyed, value) => {
                merged.insert(key.to_owned(), value);
            }
            (MergeMode::TopLevel, Value::Object(fields)) => {
                for (field, value) in fields {
                    merged.entry(field).or_insert(value);
                }
            }
            (MergeMode::TopLevel, _) => {
                failures.insert(
                    key.to_owned(),
                    json!("answered with JSON that is not an object"),
                );
            }
        }
    }
    Value::Object(merged)
}

async fn fetch(
    part: &Part,
    forward: &[(String, String)],
    max_body_bytes: u64,
) -> Result<Value, PartError> {
    let call = async {
        let mut request = client().get(&part.url);
        for (name, value) in forward {
            request = request.header(name, value);
        }

        let mut response = request.send().await.map_err(|_| PartError::Unreachable)?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(PartError::Status(status));
        }

        // Read in chunks so an oversized answer stops at the limit.
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|_| PartError::Unreachable)? {
            body.extend_from_slice(&chunk);
            if body.len() as u64 > max_body_bytes {
                return Err(PartError::TooLarge(max_body_bytes));
            }
        }
        serde_json::from_slice(&body).map_err(|_| PartError::NotJson)
    };

    match tokio::time::timeout(part.timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(PartError::Timeout(part.timeout.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_merge_puts_each_part_under_its_key() {
        let mut failures = Map::new();
        let merged = merge(
            MergeMode::Keyed,
            vec![("a", json!([1])), ("b", json!({"x": 1}))],
            &mut failures,
        );

        assert_eq!(merged, json!({"a": [1], "b": {"x": 1}}));
        assert!(failures.is_empty());
    }

    #[test]
    fn top_level_merge_keeps_the_first_value_and_reports_non_objects() {
        let mut failures = Map::new();
        let merged = merge(
            MergeMode::TopLevel,
            vec![
                ("a", json!({"x": 1, "y": 2})),
                ("b", json!({"x": 9, "z": 3})),
                ("c", json!([1])),
            ],
            &mut failures,
        );

        assert_eq!(merged, json!({"x": 1, "y": 2, "z": 3}));
        assert!(failures.contains_key("c"));
    }
}
