//! Process-wide counters of what ext_proc did with responses and of how
//! often a verified token came from the cache, read through the admin API's
//! `GetCounters`.
//!
//! Counters are plain atomics: they only grow, reset on restart, and cost
//! one relaxed add where they are counted.

use std::sync::atomic::{AtomicU64, Ordering};

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
}

const ALL: [Counter; 10] = [
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
        }
    }

    /// Adds one.
    pub fn inc(self) {
        VALUES[self as usize].fetch_add(1, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

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
