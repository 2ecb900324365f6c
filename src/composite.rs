//! Composite endpoints: one client request answered from several services'
//! JSON, fetched in parallel through the loopback Envoy listener, merged,
//! shaped by the client's profile, and returned as ext_proc's immediate
//! response. A part that fails or is too slow is reported, not fatal.

use std::sync::OnceLock;
use std::time::Duration;

use futures::future::join_all;
use serde_json::{Map, Value, json};

use crate::config::{Composite, Forward, MergeMode, Part};
use crate::decision::IDENTITY_HEADERS;
use crate::metrics::Counter;
use crate::reshape::{self, BodyError, Step};
use crate::shaping::OUTPUT_FACTOR;

/// The response header that lists the parts that did not arrive.
pub const PARTIAL_HEADER: &str = "x-gatehouse-partial";

/// The body field that says why each missing part is missing.
pub const PARTIAL_FIELD: &str = "partial_failures";

/// The request id header, forwarded so every part logs the same id.
const REQUEST_ID_HEADER: &str = "x-request-id";

/// The answer to send the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// HTTP status: 200 when any part arrived, 502 when none did (or the
    /// shaped answer would be too large).
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
/// Building it fails only when TLS cannot start; the error is logged once
/// and every part is then reported unreachable.
fn client() -> Option<&'static reqwest::Client> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    let built = CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_millis(250))
            .build()
            .map_err(|err| {
                tracing::error!(
                    error = %err,
                    "composite http client cannot start; every part will be unreachable",
                );
                err.to_string()
            })
    });
    built.as_ref().ok()
}

/// The request headers a part may see: the ones Check vouches for (the
/// reserved identity names and every `tokens.forward` name, which Check
/// sets or removes on every request it allows) and the request id. Any
/// other header the client sent stays at the edge.
pub fn forwarded(headers: Vec<(String, String)>, forward: &Forward) -> Vec<(String, String)> {
    let vouched = |name: &str| {
        name == REQUEST_ID_HEADER
            || IDENTITY_HEADERS.contains(&name)
            || forward.names().any(|configured| configured == name)
    };
    headers
        .into_iter()
        .filter(|(name, _)| vouched(name))
        .collect()
}

/// The steps that shape a composite answer.
#[derive(Debug, Clone, Default)]
pub struct Shaping {
    /// For each part, in the composite's order, the steps that shape it
    /// before the merge (the client's profile for the part's own route).
    pub parts: Vec<Vec<Step>>,
    /// The steps for the merged body (the profile for the composite route,
    /// then the sparse fieldset).
    pub whole: Vec<Step>,
}

/// Fetches every part with `forward` headers (identity, request id), shapes
/// each, merges them, shapes the whole and reports what is missing.
pub async fn answer(
    composite: &Composite,
    forward: &[(String, String)],
    shaping: Shaping,
    max_body_bytes: u64,
) -> Answer {
    answer_with(client(), composite, forward, shaping, max_body_bytes).await
}

async fn answer_with(
    client: Option<&reqwest::Client>,
    composite: &Composite,
    forward: &[(String, String)],
    shaping: Shaping,
    max_body_bytes: u64,
) -> Answer {
    let Shaping {
        parts: mut part_steps,
        whole: steps,
    } = shaping;
    part_steps.resize_with(composite.parts.len(), Vec::new);

    let fetches = composite
        .parts
        .iter()
        .map(|part| fetch(client, part, forward, max_body_bytes));
    let results = join_all(fetches).await;

    let mut failures = Map::new();
    let mut arrived = Vec::new();
    for ((part, result), steps) in composite.parts.iter().zip(results).zip(part_steps) {
        match result {
            Ok(value) => arrived.push((part.key.clone(), value, steps)),
            Err(err) => {
                Counter::CompositeBackendFailed.inc();
                tracing::info!(composite.part = %part.key, error = %err, "composite part missing");
                failures.insert(part.key.clone(), json!(err.to_string()));
            }
        }
    }

    // Merging and shaping up to a few bodies of the limit is CPU work:
    // it runs on the blocking pool, off the workers that serve Check.
    let parts = composite.parts.len();
    let max_output = max_body_bytes
        .saturating_mul(OUTPUT_FACTOR)
        .saturating_mul(parts.max(1) as u64);
    let merge_mode = composite.merge;
    let part_output = max_body_bytes.saturating_mul(OUTPUT_FACTOR);
    let build = move || {
        let arrived = shape_parts(arrived, &mut failures, part_output);
        build(merge_mode, arrived, failures, &steps, parts, max_output)
    };
    let answer = match tokio::task::spawn_blocking(build).await {
        Ok(answer) => answer,
        Err(err) => {
            tracing::warn!(error = %err, "composite answer could not be built");
            failed("composite_failed")
        }
    };
    Counter::CompositeAnswered.inc();
    answer
}

/// Shapes each part by its own route's steps. A part that would grow past
/// `max_output` is left out and reported, never merged unshaped: its
/// steps may be what removes private fields.
fn shape_parts(
    arrived: Vec<(String, Value, Vec<Step>)>,
    failures: &mut Map<String, Value>,
    max_output: u64,
) -> Vec<(String, Value)> {
    let mut shaped = Vec::with_capacity(arrived.len());
    for (key, mut value, steps) in arrived {
        match reshape::apply(&steps, &mut value, max_output) {
            Ok(()) => shaped.push((key, value)),
            Err(err) => {
                Counter::CompositeBackendFailed.inc();
                tracing::info!(composite.part = %key, error = %err, "composite part too large once shaped");
                failures.insert(key, json!("too large once shaped"));
            }
        }
    }
    shaped
}

/// Merges what arrived, shapes it and adds the failures.
fn build(
    mode: MergeMode,
    arrived: Vec<(String, Value)>,
    mut failures: Map<String, Value>,
    steps: &[Step],
    parts: usize,
    max_output: u64,
) -> Answer {
    let mut body = merge(mode, arrived, &mut failures);
    if let Err(err) = reshape::apply(steps, &mut body, max_output) {
        // Unshaped data may hold what the profile removes, so it is not
        // sent; the client learns why instead.
        tracing::info!(error = %err, "composite answer would be too large once shaped");
        return failed("composite_too_large");
    }

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

    // Each step is bounded on its own, so several of them (and the
    // failures added above) can still pass the limit together: the write
    // stops there rather than holding the whole answer.
    let written = match reshape::to_bytes_bounded(&body, max_output) {
        Ok(written) => written,
        Err(err @ BodyError::TooLarge(_)) => {
            tracing::info!(error = %err, "composite answer would be too large once shaped");
            return failed("composite_too_large");
        }
        Err(err) => {
            tracing::warn!(error = %err, "composite answer could not be written");
            return failed("composite_failed");
        }
    };

    let status = if failures.len() == parts { 502 } else { 200 };
    Answer {
        status,
        headers,
        body: written,
    }
}

/// A 502 that names why no composite answer could be made.
fn failed(error: &str) -> Answer {
    Answer {
        status: 502,
        headers: Vec::new(),
        body: json!({ "error": error }).to_string().into_bytes(),
    }
}

/// One body from the parts: each under its key, or their fields together.
fn merge(
    mode: MergeMode,
    arrived: Vec<(String, Value)>,
    failures: &mut Map<String, Value>,
) -> Value {
    let mut merged = Map::new();
    for (key, value) in arrived {
        match (mode, value) {
            (MergeMode::Keyed, value) => {
                merged.insert(key, value);
            }
            (MergeMode::TopLevel, Value::Object(fields)) => {
                for (field, value) in fields {
                    merged.entry(field).or_insert(value);
                }
            }
            (MergeMode::TopLevel, _) => {
                failures.insert(key, json!("answered with JSON that is not an object"));
            }
        }
    }
    Value::Object(merged)
}

async fn fetch(
    client: Option<&reqwest::Client>,
    part: &Part,
    forward: &[(String, String)],
    max_body_bytes: u64,
) -> Result<Value, PartError> {
    let client = client.ok_or(PartError::Unreachable)?;
    let call = async {
        let mut request = client.get(&part.url);
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

    fn owned(parts: Vec<(&str, Value)>) -> Vec<(String, Value)> {
        parts.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    fn composite(keys: &[&str]) -> Composite {
        let parts = keys
            .iter()
            .map(|key| Part {
                key: (*key).to_owned(),
                url: format!("http://127.0.0.1:9/{key}"),
                timeout: Duration::from_millis(200),
                path: format!("/{key}"),
            })
            .collect();
        Composite {
            merge: MergeMode::Keyed,
            parts,
            budget: Duration::from_millis(200),
        }
    }

    #[test]
    fn keyed_merge_puts_each_part_under_its_key() {
        let mut failures = Map::new();
        let merged = merge(
            MergeMode::Keyed,
            owned(vec![("a", json!([1])), ("b", json!({"x": 1}))]),
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
            owned(vec![
                ("a", json!({"x": 1, "y": 2})),
                ("b", json!({"x": 9, "z": 3})),
                ("c", json!([1])),
            ]),
            &mut failures,
        );

        assert_eq!(merged, json!({"x": 1, "y": 2, "z": 3}));
        assert!(failures.contains_key("c"));
    }

    #[test]
    fn only_headers_check_controls_are_forwarded() {
        let forward = Forward {
            client_id: Some("x-caller".to_owned()),
            subject: None,
            scopes: None,
            claims: vec![("tenant".to_owned(), "x-tenant".to_owned())],
        };
        let sent = [
            ("x-request-id", "r-1"),
            ("x-caller", "demo-web"),
            ("x-tenant", "t-9"),
            ("x-gatehouse-client-id", "demo-web"),
            ("x-gatehouse-profile", "mobile"),
            ("x-gatehouse-whatever", "forged"),
            ("cookie", "session"),
            ("x-client-type", "web"),
        ];
        let headers = sent
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();

        let names: Vec<String> = forwarded(headers, &forward)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(
            names,
            [
                "x-request-id",
                "x-caller",
                "x-tenant",
                "x-gatehouse-client-id",
                "x-gatehouse-profile"
            ]
        );
    }

    #[tokio::test]
    async fn without_an_http_client_every_part_is_unreachable() {
        let answer =
            answer_with(None, &composite(&["a", "b"]), &[], Shaping::default(), 1024).await;

        assert_eq!(answer.status, 502);
        assert_eq!(
            answer.headers,
            [(PARTIAL_HEADER.to_owned(), "a,b".to_owned())]
        );
        let body: Value = serde_json::from_slice(&answer.body).expect("json");
        assert_eq!(
            body[PARTIAL_FIELD],
            json!({"a": "unreachable", "b": "unreachable"})
        );
    }

    #[test]
    fn an_answer_too_large_once_shaped_is_not_sent_unshaped() {
        // One long key over many leaves: flattening repeats it in each.
        let leaves: Map<String, Value> = (0..2000).map(|i| (format!("k{i}"), json!(0))).collect();
        let mut long = Map::new();
        long.insert("p".repeat(10_000), Value::Object(leaves));
        let arrived = owned(vec![("a", Value::Object(long))]);
        let steps: Vec<Step> =
            serde_json::from_str(r#"[{"flatten": {}}]"#).expect("test steps deserialize");

        let answer = build(
            MergeMode::Keyed,
            arrived,
            Map::new(),
            &steps,
            1,
            1024 * 1024,
        );
        assert_eq!(answer.status, 502);
        assert_eq!(answer.body, br#"{"error":"composite_too_large"}"#);
    }

    #[test]
    fn each_part_is_shaped_by_its_own_route_before_the_merge() {
        let drop_owner: Vec<Step> =
            serde_json::from_str(r#"[{"drop": ["items[].owner"]}]"#).expect("steps");
        let arrived = vec![
            (
                "vehicles".to_owned(),
                json!({"items": [{"id": "v-1", "owner": {"name": "A"}}]}),
                drop_owner,
            ),
            (
                "stations".to_owned(),
                json!({"items": [{"id": "s-1"}]}),
                Vec::new(),
            ),
        ];
        let mut failures = Map::new();

        let shaped = shape_parts(arrived, &mut failures, 1024 * 1024);

        assert!(failures.is_empty());
        assert_eq!(
            shaped,
            owned(vec![
                ("vehicles", json!({"items": [{"id": "v-1"}]})),
                ("stations", json!({"items": [{"id": "s-1"}]})),
            ])
        );
    }

    #[test]
    fn a_part_too_large_once_shaped_is_left_out_not_merged_unshaped() {
        let leaves: Map<String, Value> = (0..2000).map(|i| (format!("k{i}"), json!(0))).collect();
        let mut long = Map::new();
        long.insert("p".repeat(10_000), Value::Object(leaves));
        let flatten: Vec<Step> = serde_json::from_str(r#"[{"flatten": {}}]"#).expect("steps");
        let arrived = vec![
            ("big".to_owned(), Value::Object(long), flatten),
            ("small".to_owned(), json!({"id": 1}), Vec::new()),
        ];
        let mut failures = Map::new();

        let shaped = shape_parts(arrived, &mut failures, 64 * 1024);

        assert_eq!(shaped, owned(vec![("small", json!({"id": 1}))]));
        assert_eq!(failures["big"], "too large once shaped");
    }

    /// One part, `a`, holding `{"items": [{}, {}, ...]}`.
    fn empty_items(n: usize) -> Vec<(String, Value)> {
        let items: Vec<Value> = (0..n).map(|_| json!({})).collect();
        owned(vec![("a", json!({ "items": items }))])
    }

    #[test]
    fn defaults_filled_into_many_elements_past_the_limit_are_not_sent() {
        // 2000 empty elements (6 KB of JSON) each get a 100-byte default:
        // over 200 KB once shaped, for a limit of 64 KiB.
        let text = format!(
            r#"[{{"defaults": {{"a.items[].pad": "{}"}}}}]"#,
            "x".repeat(100)
        );
        let steps: Vec<Step> = serde_json::from_str(&text).expect("test steps deserialize");

        let answer = build(
            MergeMode::Keyed,
            empty_items(2000),
            Map::new(),
            &steps,
            1,
            64 * 1024,
        );
        assert_eq!(answer.status, 502);
        assert_eq!(answer.body, br#"{"error":"composite_too_large"}"#);

        // With room for it, the same answer is sent whole.
        let answer = build(
            MergeMode::Keyed,
            empty_items(2000),
            Map::new(),
            &steps,
            1,
            1024 * 1024,
        );
        assert_eq!(answer.status, 200);
        assert!(answer.body.len() > 200_000, "{}", answer.body.len());
    }

    #[test]
    fn steps_that_each_fit_but_together_pass_the_limit_are_not_sent() {
        // Each step adds about 114 KB to 2000 empty elements, within its
        // own budget of 200 KB; the two together write about 232 KB.
        let text = format!(
            r#"[{{"defaults": {{"a.items[].p": "{}"}}}}, {{"defaults": {{"a.items[].q": "{}"}}}}]"#,
            "x".repeat(50),
            "y".repeat(50)
        );
        let steps: Vec<Step> = serde_json::from_str(&text).expect("test steps deserialize");
        let limit = 200_000;

        // No step passes its budget: only the written answer is too large.
        let mut merged = merge(MergeMode::Keyed, empty_items(2000), &mut Map::new());
        assert_eq!(reshape::apply(&steps, &mut merged, limit), Ok(()));
        let written = serde_json::to_vec(&merged).expect("json").len() as u64;
        assert!(written > limit, "{written}");

        let answer = build(
            MergeMode::Keyed,
            empty_items(2000),
            Map::new(),
            &steps,
            1,
            limit,
        );
        assert_eq!(answer.status, 502);
        assert_eq!(answer.body, br#"{"error":"composite_too_large"}"#);

        let answer = build(
            MergeMode::Keyed,
            empty_items(2000),
            Map::new(),
            &steps,
            1,
            written,
        );
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body.len() as u64, written);
    }
}
