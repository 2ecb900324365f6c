//! Per-client rate limits: policies with one or more limits, a key layout,
//! and a store that decides atomically.
//!
//! With Redis (standalone or Cluster) every Gatehouse pod shares the
//! counters; without it they live in this process and hold for one instance
//! only. Check and Envoy's rate-limit API both decide through [`Limiter`].

pub mod descriptor;
pub mod keys;
mod memory;
mod redis;
pub mod scripts;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::{self, FailureMode, Limit, RateLimitPolicy};
use crate::metrics::{self, LimitOutcome};
use memory::MemoryStore;
use redis::RedisStore;

pub use keys::Subject;

/// One request to count: who, under which policy, and how much it costs.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// The policy.
    pub policy: &'a RateLimitPolicy,
    /// Who is counted.
    pub subject: Subject<'a>,
    /// What the request counts as.
    pub cost: u64,
}

impl<'a> Query<'a> {
    /// A query for `client` under `policy`, with the limits of `tier` when
    /// the policy defines that tier.
    pub fn new(
        policy: &'a RateLimitPolicy,
        client: &'a str,
        tier: Option<&'a str>,
        group: Option<&'a str>,
        cost: u64,
    ) -> Self {
        let (tier, _) = policy.limits_for(tier);
        Self {
            policy,
            subject: Subject {
                policy: &policy.name,
                client,
                group,
                tier,
            },
            cost,
        }
    }

    /// The limits that apply.
    pub fn limits(&self) -> &'a [Limit] {
        self.policy.limits_for(self.subject.tier).1
    }
}

/// Where one limit stands after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitStatus {
    /// The limit.
    pub limit: Limit,
    /// Requests that would still be admitted now.
    pub remaining: u64,
    /// Time until the limit is whole again (GCRA) or its window resets.
    pub reset: Duration,
}

/// The outcome of counting one request against every limit of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether every limit admits the request (if not, none was consumed).
    pub allowed: bool,
    /// The longest wait among the limits that refused.
    pub retry_after: Duration,
    /// Each limit, in the policy's order.
    pub limits: Vec<LimitStatus>,
}

impl Verdict {
    /// The headers describing this verdict.
    ///
    /// `RateLimit-Policy` and `RateLimit` follow the IETF httpapi draft
    /// "RateLimit header fields for HTTP" (draft-ietf-httpapi-ratelimit-headers-10),
    /// one list member per limit. `X-RateLimit-*` describe the limit with the
    /// fewest requests left, when the policy asks for them.
    pub fn headers(&self, policy: &RateLimitPolicy) -> Vec<(String, String)> {
        let name = |index: usize, limit: &Limit| {
            if self.limits.len() == 1 {
                policy.name.clone()
            } else {
                format!("{}-{index}-{}s", policy.name, limit.window.as_secs())
            }
        };

        let mut policies = Vec::with_capacity(self.limits.len());
        let mut states = Vec::with_capacity(self.limits.len());
        for (index, status) in self.limits.iter().enumerate() {
            let name = name(index, &status.limit);
            let quota = status.limit.requests;
            let window = status.limit.window.as_secs();
            let reset = crate::decision::seconds_up(status.reset);
            policies.push(format!("\"{name}\";q={quota};w={window}"));
            states.push(format!("\"{name}\";r={};t={reset}", status.remaining));
        }

        let mut headers = vec![
            ("ratelimit-policy".to_owned(), policies.join(", ")),
            ("ratelimit".to_owned(), states.join(", ")),
        ];

        let tightest = self.limits.iter().min_by_key(|status| status.remaining);
        if let (true, Some(status)) = (policy.x_ratelimit_headers, tightest) {
            let reset = crate::decision::seconds_up(status.reset);
            headers.push((
                "x-ratelimit-limit".to_owned(),
                status.limit.requests.to_string(),
            ));
            headers.push((
                "x-ratelimit-remaining".to_owned(),
                status.remaining.to_string(),
            ));
            headers.push(("x-ratelimit-reset".to_owned(), reset.to_string()));
        }
        headers
    }
}

/// What a policy decided for one request, its failure mode and shadow mode
/// applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted (or over the limit under a shadow policy, which only reports).
    Allowed(Verdict),
    /// Over the limit; nothing was consumed.
    Refused(Verdict),
    /// The store failed and the policy fails open: admitted, not counted.
    FailedOpen,
    /// The store failed and the policy fails closed: refused.
    FailedClosed,
}

/// Why a store could not decide.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No answer within the time budget.
    #[error("rate limit store timed out")]
    Timeout,

    /// Not connected (yet, or any more).
    #[error("rate limit store is not connected")]
    NotConnected,

    /// Redis answered with an error, or the connection failed.
    #[error("rate limit store failed: {0}")]
    Redis(#[from] ::redis::RedisError),

    /// Redis answered something the scripts never return.
    #[error("rate limit store gave an unexpected answer")]
    BadReply,

    /// The thread that talks to Redis stopped before the call ended.
    #[error("rate limit store stopped")]
    Stopped,
}

impl StoreError {
    /// Whether a retry may succeed: timeouts and connection trouble are
    /// transient, a script error or a bad reply is not.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Timeout | Self::NotConnected => true,
            Self::Redis(err) => {
                err.is_timeout() || err.is_connection_dropped() || err.is_io_error()
            }
            Self::BadReply | Self::Stopped => false,
        }
    }
}

/// The store behind a [`Limiter`].
enum Store {
    Redis(RedisStore),
    Memory(MemoryStore),
}

/// Counts requests in Redis or in memory, and applies each policy's failure
/// and shadow modes.
pub struct Limiter {
    store: Store,
    /// Decisions that fell back to a failure mode since start.
    fallbacks: AtomicU64,
}

impl Limiter {
    /// A limiter on the configured Redis, or in memory within `memory`'s
    /// bounds when none is configured.
    ///
    /// # Errors
    ///
    /// When the Redis URL cannot be parsed, or Redis's thread cannot start.
    pub fn new(
        redis: Option<&config::Redis>,
        memory: &config::MemoryStore,
    ) -> Result<Self, ::redis::RedisError> {
        let store = match redis {
            Some(redis) => Store::Redis(RedisStore::new(redis)?),
            None => Store::Memory(MemoryStore::new(memory)),
        };
        Ok(Self {
            store,
            fallbacks: AtomicU64::new(0),
        })
    }

    /// Counts `query` and applies the policy's modes.
    pub async fn decide(&self, query: &Query<'_>) -> Outcome {
        let policy = query.policy;

        let counted = |outcome| metrics::ratelimit_decided(&policy.name, outcome);

        match self.check(query).await {
            Ok(verdict) if verdict.allowed => {
                counted(LimitOutcome::Allowed);
                Outcome::Allowed(verdict)
            }
            Ok(verdict) if policy.shadow => {
                counted(LimitOutcome::ShadowLimited);
                tracing::info!(
                    ratelimit.policy = %policy.name,
                    ratelimit.shadow = true,
                    "over the limit; allowed because the policy is in shadow mode"
                );
                Outcome::Allowed(verdict)
            }
            Ok(verdict) => {
                counted(LimitOutcome::Limited);
                Outcome::Refused(verdict)
            }
            Err(err) => {
                let total = self.fallbacks.fetch_add(1, Ordering::Relaxed) + 1;
                let open = policy.failure_mode == FailureMode::Open;
                tracing::warn!(
                    ratelimit.policy = %policy.name,
                    ratelimit.fail_open = open,
                    ratelimit.fallbacks = total,
                    error.transient = err.is_transient(),
                    error = %err,
                    "rate limit store failed; policy failure mode applied"
                );
                if open {
                    counted(LimitOutcome::FailedOpen);
                    Outcome::FailedOpen
                } else {
                    counted(LimitOutcome::FailedClosed);
                    Outcome::FailedClosed
                }
            }
        }
    }

    /// Counts `query` in the store, without applying any mode.
    ///
    /// # Errors
    ///
    /// When the store cannot answer.
    pub async fn check(&self, query: &Query<'_>) -> Result<Verdict, StoreError> {
        let started = Instant::now();
        let (store, result) = match &self.store {
            Store::Redis(store) => ("redis", store.check(query).await),
            Store::Memory(store) => ("memory", Ok(store.check(query).await)),
        };
        metrics::ratelimit_store_called(store, started.elapsed());
        result
    }

    /// Decisions that fell back to a failure mode since this limiter started.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Whether the store has been reached at least once. A Redis that goes
    /// away later still counts as ready: each call then fails within its
    /// budget and the policy's failure mode decides.
    pub fn is_ready(&self) -> bool {
        match &self.store {
            Store::Redis(store) => store.is_connected(),
            Store::Memory(_) => true,
        }
    }
}

#[cfg(test)]
mod tests;
