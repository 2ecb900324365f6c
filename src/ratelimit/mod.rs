//! Per-client rate limits: a policy, a key per client and policy, and a
//! store that counts atomically.
//!
//! With Redis every Gatehouse pod shares the counters; without it the counts
//! live in this process and hold for one instance only.

mod memory;
mod redis;
mod scripts;

use std::time::Duration;

use crate::config::{self, RateLimitPolicy};
use memory::MemoryStore;
use redis::RedisStore;

/// The outcome of counting one request against one policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the request fits in the limit.
    pub allowed: bool,
    /// The policy's limit per window.
    pub limit: u64,
    /// Requests left in the current window.
    pub remaining: u64,
    /// Time until the window resets.
    pub reset: Duration,
}

impl Verdict {
    /// The standard headers describing this verdict.
    ///
    /// `RateLimit-Policy` and `RateLimit` follow the IETF httpapi draft
    /// "RateLimit header fields for HTTP" (draft-ietf-httpapi-ratelimit-headers-09).
    pub fn headers(&self, policy: &RateLimitPolicy) -> Vec<(String, String)> {
        let reset = crate::decision::seconds_up(self.reset);
        vec![
            (
                "ratelimit-policy".to_owned(),
                format!(
                    "\"{}\";q={};w={}",
                    policy.name,
                    self.limit,
                    policy.window.as_secs()
                ),
            ),
            (
                "ratelimit".to_owned(),
                format!("\"{}\";r={};t={reset}", policy.name, self.remaining),
            ),
        ]
    }
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

    /// Redis answered with an error.
    #[error("rate limit store failed: {0}")]
    Redis(#[from] ::redis::RedisError),
}

/// Counts requests in Redis or in memory.
pub enum Limiter {
    /// Shared counters in Redis.
    Redis(RedisStore),
    /// Counters in this process.
    Memory(MemoryStore),
}

impl Limiter {
    /// A limiter on the configured Redis, or in memory when none is configured.
    ///
    /// # Errors
    ///
    /// When the Redis URL cannot be parsed.
    pub fn new(redis: Option<&config::Redis>) -> Result<Self, ::redis::RedisError> {
        match redis {
            Some(redis) => Ok(Self::Redis(RedisStore::new(redis)?)),
            None => Ok(Self::Memory(MemoryStore::default())),
        }
    }

    /// Counts a request of `cost` by `client` against `policy`.
    ///
    /// # Errors
    ///
    /// When the store cannot answer; the policy's failure mode decides then.
    pub async fn check(
        &self,
        policy: &RateLimitPolicy,
        client: &str,
        cost: u64,
    ) -> Result<Verdict, StoreError> {
        match self {
            Self::Redis(store) => store.check(policy, client, cost).await,
            Self::Memory(store) => Ok(store.check(policy, client, cost)),
        }
    }

    /// Whether decisions can be made now, which readiness reports.
    pub fn is_ready(&self) -> bool {
        match self {
            Self::Redis(store) => store.is_connected(),
            Self::Memory(_) => true,
        }
    }
}
