//! The one place that names what Gatehouse measures: the counters the admin
//! API's `GetCounters` reads, and every metric the Prometheus endpoint
//! (`server.metrics_listen`) exports, all under `gatehouse_`.
//!
//! Recording goes through the `metrics` facade: with no recorder installed
//! (unit tests, no `metrics_listen`) it does nothing; with one, it is a
//! lookup in the recorder's sharded registry (written only when a series
//! first appears) and an atomic add, never I/O or an await. Labels come
//! from the configuration or the code (route, policy, reason), never from
//! a request: no client id, token or path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::metrics::{Unit, counter, describe_counter, describe_histogram, histogram};

/// One thing worth counting on the request or response path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// A response's headers reached ext_proc and its body was left alone
    /// without ever being sent to Gatehouse.
    ReshapeSkipped,
    /// A body was buffered to be reshaped.
    ReshapeBuffered,
    /// A body was reshaped and replaced.
    Reshaped,
    /// A body that a profile applies to was not JSON (by its type, or by
    /// failing to parse) and passed unchanged.
    PassedNotJson,
    /// A body was larger than the limit (before or after decoding), or would
    /// have been once reshaped, and passed unchanged.
    PassedTooLarge,
    /// A body in an encoding Gatehouse cannot decode passed unchanged.
    PassedEncoded,
    /// A composite endpoint was answered.
    CompositeAnswered,
    /// A backend of a composite endpoint failed or timed out.
    CompositeBackendFailed,
    /// A JWT was found in the verified-token cache: no signature check.
    TokenCacheHit,
    /// A JWT was not in the verified-token cache and went on to be verified.
    TokenCacheMiss,
    /// The in-memory rate-limit store was full and dropped a client's
    /// counters while they were still running: that client's spending so
    /// far is forgotten.
    RatelimitMemoryEvicted,
}

const ALL: [Counter; 11] = [
    Counter::ReshapeSkipped,
    Counter::ReshapeBuffered,
    Counter::Reshaped,
    Counter::PassedNotJson,
    Counter::PassedTooLarge,
    Counter::PassedEncoded,
    Counter::CompositeAnswered,
    Counter::CompositeBackendFailed,
    Counter::TokenCacheHit,
    Counter::TokenCacheMiss,
    Counter::RatelimitMemoryEvicted,
];

static VALUES: [AtomicU64; ALL.len()] = [const { AtomicU64::new(0) }; ALL.len()];

impl Counter {
    /// The counter's stable name, as the admin API reports it.
    pub fn name(self) -> &'static str {
        match self {
            Self::ReshapeSkipped => "reshape_skipped",
            Self::ReshapeBuffered => "reshape_buffered",
            Self::Reshaped => "reshaped",
            Self::PassedNotJson => "reshape_passed_not_json",
            Self::PassedTooLarge => "reshape_passed_too_large",
            Self::PassedEncoded => "reshape_passed_encoded",
            Self::CompositeAnswered => "composite_answered",
            Self::CompositeBackendFailed => "composite_backend_failed",
            Self::TokenCacheHit => "token_cache_hits",
            Self::TokenCacheMiss => "token_cache_misses",
            Self::RatelimitMemoryEvicted => "ratelimit_memory_evictions",
        }
    }

    /// The counter's name on the Prometheus endpoint.
    pub fn exported_name(self) -> &'static str {
        match self {
            Self::ReshapeSkipped => "gatehouse_reshape_skipped_total",
            Self::ReshapeBuffered => "gatehouse_reshape_buffered_total",
            Self::Reshaped => "gatehouse_reshaped_total",
            Self::PassedNotJson => "gatehouse_reshape_passed_not_json_total",
            Self::PassedTooLarge => "gatehouse_reshape_passed_too_large_total",
            Self::PassedEncoded => "gatehouse_reshape_passed_encoded_total",
            Self::CompositeAnswered => "gatehouse_composite_answered_total",
            Self::CompositeBackendFailed => "gatehouse_composite_backend_failed_total",
            Self::TokenCacheHit => "gatehouse_token_cache_hits_total",
            Self::TokenCacheMiss => "gatehouse_token_cache_misses_total",
            Self::RatelimitMemoryEvicted => "gatehouse_ratelimit_memory_evictions_total",
        }
    }

    /// What the counter means, for the endpoint's `# HELP`.
    fn help(self) -> &'static str {
        match self {
            Self::ReshapeSkipped => "Responses whose body ext_proc left alone unseen.",
            Self::ReshapeBuffered => "Response bodies buffered to be reshaped.",
            Self::Reshaped => "Response bodies reshaped and replaced.",
            Self::PassedNotJson => "Bodies a profile applies to that were not JSON.",
            Self::PassedTooLarge => "Bodies passed unchanged for being over the size limit.",
            Self::PassedEncoded => "Bodies passed unchanged for an undecodable encoding.",
            Self::CompositeAnswered => "Composite endpoints answered.",
            Self::CompositeBackendFailed => "Parts of composite endpoints that failed.",
            Self::TokenCacheHit => "JWTs found in the verified-token cache.",
            Self::TokenCacheMiss => "JWTs not in the verified-token cache.",
            Self::RatelimitMemoryEvicted => {
                "Running rate-limit counters the full in-memory store dropped."
            }
        }
    }

    /// Adds one, to the admin API's value and to the exported counter.
    pub fn inc(self) {
        VALUES[self as usize].fetch_add(1, Ordering::Relaxed);
        counter!(self.exported_name()).increment(1);
    }

    /// The current value.
    pub fn get(self) -> u64 {
        VALUES[self as usize].load(Ordering::Relaxed)
    }
}

/// Every counter with its current value.
pub fn snapshot() -> Vec<(&'static str, u64)> {
    ALL.iter()
        .map(|counter| (counter.name(), counter.get()))
        .collect()
}

// === the exported metrics ===

// The metrics' names; docs/operations.md describes each one.
const CHECK_DECISIONS: &str = "gatehouse_check_decisions_total";
const CHECK_DURATION: &str = "gatehouse_check_duration_seconds";
const RATELIMIT_DECISIONS: &str = "gatehouse_ratelimit_decisions_total";
const RATELIMIT_STORE_DURATION: &str = "gatehouse_ratelimit_store_duration_seconds";
const JWKS_FETCHES: &str = "gatehouse_jwks_fetches_total";
const INTROSPECTION_REQUESTS: &str = "gatehouse_introspection_requests_total";
const RESHAPE_DURATION: &str = "gatehouse_reshape_duration_seconds";

/// The upper bounds of every `_seconds` histogram's buckets: from half a
/// millisecond (a cached token, an in-memory limit) to the seconds a slow
/// provider or Redis can take before its timeout.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One Check answered: `reason` is `ok` for an allow, else the refusal's
/// code; `route` is empty when no route matched.
pub fn check_decided(route: &str, allowed: bool, reason: &'static str, took: Duration) {
    let decision = if allowed { "allow" } else { "deny" };
    let route = route.to_owned();

    counter!(CHECK_DECISIONS, "route" => route.clone(), "decision" => decision, "reason" => reason)
        .increment(1);
    histogram!(CHECK_DURATION, "route" => route).record(took);
}

/// What a rate-limit policy decided for one request, its modes applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitOutcome {
    /// Within every limit.
    Allowed,
    /// Over a limit: refused.
    Limited,
    /// Over a limit, allowed because the policy is in shadow mode.
    ShadowLimited,
    /// The store failed and the policy fails open.
    FailedOpen,
    /// The store failed and the policy fails closed.
    FailedClosed,
}

impl LimitOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Limited => "limited",
            Self::ShadowLimited => "shadow_limited",
            Self::FailedOpen => "failed_open",
            Self::FailedClosed => "failed_closed",
        }
    }
}

/// One rate-limit decision under `policy`.
pub fn ratelimit_decided(policy: &str, outcome: LimitOutcome) {
    let policy = policy.to_owned();
    counter!(RATELIMIT_DECISIONS, "policy" => policy, "outcome" => outcome.label()).increment(1);
}

/// One call to the rate-limit store (`redis` or `memory`), failed or not.
pub fn ratelimit_store_called(store: &'static str, took: Duration) {
    histogram!(RATELIMIT_STORE_DURATION, "store" => store).record(took);
}

/// One fetch of a provider's keys (discovery and JWKS); `provider` is its
/// position in the configuration.
pub fn jwks_fetched(provider: usize, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    counter!(JWKS_FETCHES, "provider" => provider.to_string(), "result" => result).increment(1);
}

/// What one call to the introspection endpoint gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntrospectionResult {
    /// The token is active and acceptable here.
    Active,
    /// The provider says the token is not active.
    Inactive,
    /// Active, but not for this gateway (issuer, audience, type, claims).
    Rejected,
    /// The call failed or timed out.
    Error,
}

/// One call to the introspection endpoint (cache hits make none).
pub fn introspected(result: IntrospectionResult) {
    let result = match result {
        IntrospectionResult::Active => "active",
        IntrospectionResult::Inactive => "inactive",
        IntrospectionResult::Rejected => "rejected",
        IntrospectionResult::Error => "error",
    };
    counter!(INTROSPECTION_REQUESTS, "result" => result).increment(1);
}

/// One response body handed to the blocking pool to be reshaped, from the
/// hand-off to the result (whether reshaped or passed unchanged).
pub fn reshape_took(took: Duration) {
    histogram!(RESHAPE_DURATION).record(took);
}

/// Gives every metric its `# HELP`, and the admin API's counters their
/// values so far, so that they are scraped (at 0) before anything happened.
/// Call once, right after installing the recorder.
pub fn describe() {
    describe_counter!(
        CHECK_DECISIONS,
        "Check answers, by route, decision and reason."
    );
    describe_histogram!(
        CHECK_DURATION,
        Unit::Seconds,
        "Time to decide one Check, by route."
    );
    describe_counter!(
        RATELIMIT_DECISIONS,
        "Rate-limit decisions, by policy and outcome."
    );
    describe_histogram!(
        RATELIMIT_STORE_DURATION,
        Unit::Seconds,
        "Time of one call to the rate-limit store, by store."
    );
    describe_counter!(JWKS_FETCHES, "Key fetches from a provider, by result.");
    describe_counter!(
        INTROSPECTION_REQUESTS,
        "Calls to the introspection endpoint, by result."
    );
    describe_histogram!(
        RESHAPE_DURATION,
        Unit::Seconds,
        "Time to reshape one response body on the blocking pool."
    );

    for counter in ALL {
        describe_counter!(counter.exported_name(), counter.help());
        counter!(counter.exported_name()).absolute(counter.get());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_names_are_the_admin_names_in_the_namespace() {
        for counter in ALL {
            let expected = format!("gatehouse_{}_total", counter.name());
            assert_eq!(counter.exported_name(), expected);
        }
    }

    #[test]
    fn counters_are_indexed_by_their_own_position() {
        for (index, counter) in ALL.iter().enumerate() {
            assert_eq!(*counter as usize, index);
        }
        let before = Counter::Reshaped.get();
        Counter::Reshaped.inc();
        assert!(Counter::Reshaped.get() > before);
        assert!(snapshot().iter().any(|(name, _)| *name == "reshaped"));
    }
}
