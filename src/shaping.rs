//! What happens to a response on its way back: whether its body is worth
//! buffering and reshaping, and the reshaping itself.
//!
//! Only responses a profile (or a sparse fieldset) applies to are buffered;
//! everything else (downloads, streams, large or non-JSON bodies, errors,
//! Envoy's own local replies) passes through without its body ever reaching
//! Gatehouse, and is counted.

use std::sync::Arc;
use std::time::Instant;

use crate::config::Composite;
use crate::decision::Metadata;
use crate::metrics::{self, Counter};
use crate::reshape::{self, Step, encoding};
use crate::route;
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

/// How many times `reshape.max_body_bytes` a reshaped body may be. The Envoy
/// config holds twice the limit per connection (see docs/reshape.md, tuning
/// Envoy), so a larger result could not be handed back; it passes unchanged.
pub const OUTPUT_FACTOR: u64 = 2;

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

impl Plan {
    /// The most bytes a reshaped body (and the keys `flatten` builds on the
    /// way) may take: [`OUTPUT_FACTOR`] times the input limit.
    pub fn max_output_bytes(&self) -> u64 {
        self.max_body_bytes.saturating_mul(OUTPUT_FACTOR)
    }
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

/// Whether Check's decision gives this response anything to reshape: the
/// profile lists steps for the route, or a sparse fieldset was asked for.
pub fn has_steps(runtime: &Runtime, metadata: &Metadata) -> bool {
    profile_steps(runtime, metadata).is_some() || metadata.fields.is_some()
}

fn profile_steps(runtime: &Runtime, metadata: &Metadata) -> Option<Arc<[Step]>> {
    let (Some(profile), Some(route)) = (&metadata.profile, &metadata.route) else {
        return None;
    };
    runtime.config.steps(profile, route)
}

/// For each part of `composite`, the client's profile steps for the route
/// that serves the part's path on its own (none where no plain route does,
/// or the profile lists no steps for it).
///
/// They shape each part before the merge, so a composite never shows a
/// client more of a service than that service's own route would: a partner
/// whose profile drops personal data from `/vehicles` gets it dropped from
/// the vehicles part too, whether or not the profile names the composite.
pub fn part_steps(runtime: &Runtime, metadata: &Metadata, composite: &Composite) -> Vec<Vec<Step>> {
    let config = &runtime.config;

    composite
        .parts
        .iter()
        .map(|part| {
            let own_route = route::part_route(&config.routes, &part.path);
            let steps = metadata
                .profile
                .as_deref()
                .zip(own_route)
                .and_then(|(profile, route)| config.steps(profile, &route.name));
            steps.map(|steps| steps.to_vec()).unwrap_or_default()
        })
        .collect()
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

/// [`reshape_body`] on tokio's blocking pool: parsing, reshaping and gzip
/// of a body up to the limit take milliseconds of CPU, which on a runtime
/// worker would stall every other stream and Check on that worker.
pub async fn reshape_body_blocking(
    plan: Plan,
    body: Vec<u8>,
    request_id: String,
) -> Option<Vec<u8>> {
    let id = request_id.clone();
    let started = Instant::now();
    let work = move || reshape_body(&plan, &body, &request_id);
    let reshaped = off_the_worker(&id, work).await.flatten();
    metrics::reshape_took(started.elapsed());
    reshaped
}

/// Runs `work` on the blocking pool; `None` (and a warning) if it could
/// not finish, such as when it panicked.
async fn off_the_worker<T, F>(request_id: &str, work: F) -> Option<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => Some(result),
        Err(err) => {
            tracing::warn!(
                request.id = %request_id,
                error = %err,
                "reshaping did not finish; passing the body unchanged",
            );
            None
        }
    }
}

/// Reshapes a whole body; `None` when it must pass unchanged (not JSON,
/// larger than the limit before or after reshaping, undecodable), which is
/// logged and counted. CPU-bound: async callers use
/// [`reshape_body_blocking`].
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
    let max_output = plan.max_output_bytes();
    let reshaped = match reshape::apply_to_bytes(&plan.steps, json, max_output) {
        Ok(reshaped) => reshaped,
        Err(err @ reshape::BodyError::TooLarge(_)) => {
            // A `flatten` of long keys over many leaves, or defaults filled
            // into many elements: the result would not fit Envoy's buffer.
            Counter::PassedTooLarge.inc();
            tracing::info!(
                request.id = %request_id,
                error = %err,
                "reshaped body would be too large; passing the original unchanged",
            );
            return None;
        }
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
    // gzip can add a few bytes to data that does not compress.
    if encoded.len() as u64 > max_output {
        Counter::PassedTooLarge.inc();
        tracing::info!(
            request.id = %request_id,
            body.bytes = encoded.len(),
            "reshaped body would be too large; passing the original unchanged",
        );
        return None;
    }
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
    use std::sync::Mutex;

    use serde_json::{Value, json};

    use super::*;

    /// Tests that read counters hold this, so their deltas are their own.
    static COUNTERS: Mutex<()> = Mutex::new(());

    fn plan(steps: &str, max_body_bytes: u64) -> Plan {
        Plan {
            steps: serde_json::from_str(steps).expect("test steps deserialize"),
            encoding: Encoding::Identity,
            unknown_length: false,
            max_body_bytes,
        }
    }

    /// How much `counter` grew while `f` ran.
    fn counted<T>(counter: Counter, f: impl FnOnce() -> T) -> (T, u64) {
        let _serial = COUNTERS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let before = counter.get();
        let result = f();
        (result, counter.get() - before)
    }

    #[test]
    fn recognises_json_media_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/problem+json"));
        assert!(!is_json("text/json-ish"));
        assert!(!is_json("application/octet-stream"));
        assert!(!is_json(""));
    }

    #[test]
    fn a_result_past_the_output_limit_passes_unchanged_and_is_counted() {
        // 100 empty elements (about 300 bytes) each get a 50-byte default:
        // over 6 KB out, for a limit of 1000 bytes in and 2000 out.
        let items: Vec<Value> = (0..100).map(|_| json!({})).collect();
        let body = serde_json::to_vec(&json!({ "items": items })).expect("json");
        let grows = format!(
            r#"[{{"defaults": {{"items[].pad": "{}"}}}}]"#,
            "x".repeat(50)
        );
        assert!(body.len() < 1000);

        let (out, passed) = counted(Counter::PassedTooLarge, || {
            reshape_body(&plan(&grows, 1000), &body, "r-1")
        });
        assert_eq!(out, None);
        assert_eq!(passed, 1);

        // The same body under a limit its result fits is reshaped.
        let (out, passed) = counted(Counter::PassedTooLarge, || {
            reshape_body(&plan(&grows, 4000), &body, "r-2")
        });
        assert!(out.is_some_and(|out| out.len() > 6000 && out.len() <= 8000));
        assert_eq!(passed, 0);
    }

    #[test]
    fn defaults_past_the_budget_stop_the_step_and_pass_the_body_unchanged() {
        // The filled body (over 5 KB) would be dropped again by the next
        // step, so its output would fit; the defaults step alone passes the
        // budget of 2000 bytes, and is stopped before it builds the rest.
        let items: Vec<Value> = (0..100).map(|_| json!({})).collect();
        let body = serde_json::to_vec(&json!({ "items": items })).expect("json");
        let grows = format!(
            r#"[{{"defaults": {{"items[].pad": "{}"}}}}, {{"drop": ["items[].pad"]}}]"#,
            "x".repeat(50)
        );

        let (out, passed) = counted(Counter::PassedTooLarge, || {
            reshape_body(&plan(&grows, 1000), &body, "r-7")
        });
        assert_eq!(out, None);
        assert_eq!(passed, 1);

        // With a budget that holds the filled body, the output is the input.
        let (out, passed) = counted(Counter::PassedTooLarge, || {
            reshape_body(&plan(&grows, 4000), &body, "r-8")
        });
        assert_eq!(out, Some(body));
        assert_eq!(passed, 0);
    }

    #[test]
    fn a_hostile_flatten_passes_unchanged_and_is_counted() {
        let leaves: serde_json::Map<String, Value> =
            (0..20_000).map(|i| (format!("k{i}"), json!(0))).collect();
        let mut hostile = serde_json::Map::new();
        hostile.insert("p".repeat(200_000), Value::Object(leaves));
        let body = serde_json::to_vec(&hostile).expect("json");

        let flatten = plan(r#"[{"flatten": {}}]"#, 1024 * 1024);
        let (out, passed) = counted(Counter::PassedTooLarge, || {
            reshape_body(&flatten, &body, "r-3")
        });
        assert_eq!(out, None);
        assert_eq!(passed, 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reshaping_runs_off_the_calling_thread() {
        let caller = std::thread::current().id();
        let worker = off_the_worker("r-4", || std::thread::current().id()).await;
        assert!(worker.is_some_and(|worker| worker != caller));

        let keep = plan(r#"[{"keep": ["id"]}]"#, 1024);
        let out = reshape_body_blocking(keep, br#"{"id":1,"x":2}"#.to_vec(), "r-5".into()).await;
        assert_eq!(out.as_deref(), Some(&br#"{"id":1}"#[..]));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn work_that_panics_passes_the_body_unchanged() {
        let out: Option<Vec<u8>> = off_the_worker("r-6", || panic!("a bug in a step")).await;
        assert_eq!(out, None);
    }
}
