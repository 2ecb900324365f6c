//! Counters kept in this process, for a single Gatehouse instance.
//!
//! The same algorithms and the same all-or-nothing rule as the Redis
//! scripts, on tokio's clock so that tests can pause time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{LimitStatus, Query, Verdict, keys};
use crate::config::{Limit, LimitAlgorithm};

/// Expired counters are swept once the map holds this many entries.
const SWEEP_AT: usize = 10_000;

/// Counters by key (the Redis key layout), each expiring like a Redis key.
#[derive(Default)]
pub struct MemoryStore {
    counters: Mutex<HashMap<String, Counter>>,
}

/// A counter and when it lapses: for GCRA the value is the TAT's offset
/// from `expires` (always zero), for a fixed window the count.
#[derive(Clone, Copy)]
struct Counter {
    count: u64,
    expires: Instant,
}

impl MemoryStore {
    /// Decides `query` against every limit at once.
    pub fn check(&self, query: &Query<'_>) -> Verdict {
        let now = Instant::now();
        let algorithm = query.policy.algorithm;
        let limits = query.limits();
        let keys: Vec<String> = limits
            .iter()
            .map(|limit| keys::counter("mem", &query.subject, algorithm, limit))
            .collect();

        // A poisoned lock only means another request panicked mid-update;
        // the counters are still usable.
        let mut counters = self
            .counters
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if counters.len() >= SWEEP_AT {
            counters.retain(|_, counter| counter.expires > now);
        }

        let current: Vec<Option<Counter>> = keys
            .iter()
            .map(|key| counters.get(key).copied().filter(|c| c.expires > now))
            .collect();
        let (verdict, updated) = match algorithm {
            LimitAlgorithm::Gcra => gcra(now, query.cost, limits, &current),
            LimitAlgorithm::FixedWindow => fixed_window(now, query.cost, limits, &current),
        };

        if verdict.allowed {
            for (key, counter) in keys.into_iter().zip(updated) {
                counters.insert(key, counter);
            }
        }
        verdict
    }
}

#[cfg(test)]
impl MemoryStore {
    /// Every live counter's count and expiry, to see what a decision wrote.
    pub(super) fn snapshot(&self) -> HashMap<String, (u64, Instant)> {
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let now = Instant::now();
        counters
            .iter()
            .filter(|(_, counter)| counter.expires > now)
            .map(|(key, counter)| (key.clone(), (counter.count, counter.expires)))
            .collect()
    }
}

/// GCRA: a counter lapses at the limit's theoretical arrival time.
fn gcra(
    now: Instant,
    cost: u64,
    limits: &[Limit],
    current: &[Option<Counter>],
) -> (Verdict, Vec<Counter>) {
    let mut allowed = true;
    let mut retry_after = Duration::ZERO;
    let mut tats = Vec::with_capacity(limits.len());

    for (limit, counter) in limits.iter().zip(current) {
        let interval = interval(limit);
        let tat = counter.map_or(now, |counter| counter.expires.max(now));
        let new_tat = tat + times(interval, cost);
        let allow_at = new_tat.checked_sub(times(interval, limit.burst));
        if let Some(allow_at) = allow_at.filter(|at| *at > now) {
            allowed = false;
            retry_after = retry_after.max(allow_at - now);
        }
        tats.push((tat, new_tat));
    }

    let mut statuses = Vec::with_capacity(limits.len());
    let mut updated = Vec::with_capacity(limits.len());
    for (limit, (tat, new_tat)) in limits.iter().zip(tats) {
        let tat = if allowed { new_tat } else { tat };
        let full_at = now + times(interval(limit), limit.burst);
        let room = full_at.saturating_duration_since(tat);
        statuses.push(LimitStatus {
            limit: *limit,
            remaining: u64::try_from(room.as_micros() / interval(limit).as_micros().max(1))
                .unwrap_or(u64::MAX),
            reset: tat.saturating_duration_since(now),
        });
        updated.push(Counter {
            count: 0,
            expires: tat,
        });
    }

    let verdict = Verdict {
        allowed,
        retry_after,
        limits: statuses,
    };
    (verdict, updated)
}

/// Fixed windows that start at the first request counted in them.
fn fixed_window(
    now: Instant,
    cost: u64,
    limits: &[Limit],
    current: &[Option<Counter>],
) -> (Verdict, Vec<Counter>) {
    let windows: Vec<Counter> = limits
        .iter()
        .zip(current)
        .map(|(limit, counter)| {
            counter.unwrap_or(Counter {
                count: 0,
                expires: now + limit.window,
            })
        })
        .collect();

    let mut allowed = true;
    let mut retry_after = Duration::ZERO;
    for (limit, window) in limits.iter().zip(&windows) {
        if window.count + cost > limit.requests {
            allowed = false;
            retry_after = retry_after.max(window.expires - now);
        }
    }

    let mut statuses = Vec::with_capacity(limits.len());
    let mut updated = Vec::with_capacity(limits.len());
    for (limit, window) in limits.iter().zip(windows) {
        let count = if allowed {
            window.count + cost
        } else {
            window.count
        };
        statuses.push(LimitStatus {
            limit: *limit,
            remaining: limit.requests.saturating_sub(count),
            reset: window.expires - now,
        });
        updated.push(Counter { count, ..window });
    }

    let verdict = Verdict {
        allowed,
        retry_after,
        limits: statuses,
    };
    (verdict, updated)
}

/// The time one request uses up: window / requests, at least 1 µs.
pub(super) fn interval(limit: &Limit) -> Duration {
    let micros = limit.window.as_micros() / u128::from(limit.requests.max(1));
    Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX).max(1))
}

/// `interval` times `count`; configuration bounds keep this far from
/// overflow, and it saturates at a century anyway.
fn times(interval: Duration, count: u64) -> Duration {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    u32::try_from(count)
        .ok()
        .and_then(|count| interval.checked_mul(count))
        .map_or(CENTURY, |product| product.min(CENTURY))
}
