//! Counters kept in this process, for a single Gatehouse instance.
//!
//! The same algorithms and the same all-or-nothing rule as the Redis
//! scripts, on tokio's clock so that tests can pause time. A bounded moka
//! cache holds them: a decision touches one entry, and memory stays within
//! `memory_store.max_entries` whatever keys clients make up.

use std::sync::Arc;
use std::time::Duration;

use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use tokio::time::Instant;

use super::{LimitStatus, Query, Verdict, keys};
use crate::config::{self, Limit, LimitAlgorithm};
use crate::metrics;

/// How long moka keeps an entry past the moment its last counter lapses.
///
/// Moka times entries on the std clock, the counters run on tokio's. In a
/// server the two advance together and this only frees an entry a little
/// later; with tokio's clock paused (tests) it keeps moka from dropping an
/// entry whose counters tokio's clock still counts as running.
const LINGER: Duration = Duration::from_secs(5);

/// Counters by subject (policy, client, route group, tier and algorithm),
/// each subject's limits in one entry.
///
/// One entry per subject is what keeps a decision all or nothing: moka
/// runs the computations on one key one at a time, so reading, deciding
/// and writing every limit of a subject is atomic without any lock of our
/// own, and subjects never wait for each other.
///
/// Once the cache is full, moka's TinyLFU policy admits a new entry only
/// when its key has been asked for more often than the entries it would
/// push out, so keys seen once (a client rotating addresses) lose to
/// clients in steady use. An entry dropped while a counter still runs is
/// counted in [`metrics::Counter::RatelimitMemoryEvicted`].
pub struct MemoryStore {
    entries: Cache<String, Entry>,
}

/// The counters of one subject.
#[derive(Clone)]
struct Entry {
    /// Each limit's counter, by the limit's window (unique within a policy,
    /// and what the Redis key of a counter ends with).
    counters: Arc<[(Duration, Counter)]>,
    /// From the write until the last of them lapses.
    lasts: Duration,
}

/// A counter and when it lapses: for GCRA the value is the TAT's offset
/// from `expires` (always zero), for a fixed window the count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counter {
    count: u64,
    expires: Instant,
}

// === impl MemoryStore ===

impl MemoryStore {
    /// An empty store that keeps at most `bounds.max_entries` subjects.
    pub fn new(bounds: &config::MemoryStore) -> Self {
        let entries = Cache::builder()
            .max_capacity(bounds.max_entries)
            .expire_after(UntilLapsed)
            .eviction_listener(|_key, entry: Entry, cause| {
                // Lapsed counters cost nobody anything when they go; running
                // ones forget what a client has spent.
                if cause == RemovalCause::Size && entry.is_running(Instant::now()) {
                    metrics::Counter::RatelimitMemoryEvicted.inc();
                }
            })
            .build();
        Self { entries }
    }

    /// Decides `query` against every limit at once.
    pub async fn check(&self, query: &Query<'_>) -> Verdict {
        let algorithm = query.policy.algorithm;
        let limits = query.limits();
        let key = keys::subject_part("mem", &query.subject, algorithm);

        // Moka runs this once, while no other computation on the key runs:
        // read every counter, decide, and write all of them or none. The
        // clock is read inside, after any earlier decision on the key.
        let mut decided = None;
        self.entries
            .entry(key)
            .and_compute_with(|entry| {
                let now = Instant::now();
                let entry = entry.map(moka::Entry::into_value);
                let current: Vec<Option<Counter>> = limits
                    .iter()
                    .map(|limit| entry.as_ref().and_then(|e| e.running(limit.window, now)))
                    .collect();

                let (verdict, updated) = match algorithm {
                    LimitAlgorithm::Gcra => gcra(now, query.cost, limits, &current),
                    LimitAlgorithm::FixedWindow => fixed_window(now, query.cost, limits, &current),
                };
                let op = if verdict.allowed {
                    Op::Put(Entry::new(limits, updated, now))
                } else {
                    Op::Nop
                };

                decided = Some(verdict);
                std::future::ready(op)
            })
            .await;

        decided.expect("moka runs the computation once before and_compute_with returns")
    }
}

#[cfg(test)]
impl MemoryStore {
    /// Every running counter's count and expiry by its Redis-style key, to
    /// see what a decision wrote.
    pub(super) fn snapshot(&self) -> std::collections::HashMap<String, (u64, Instant)> {
        let now = Instant::now();
        self.entries
            .iter()
            .flat_map(|(key, entry)| {
                entry
                    .counters
                    .iter()
                    .filter(|(_, counter)| counter.is_running(now))
                    .map(|(window, counter)| {
                        let key = format!("{key}:{}", window.as_millis());
                        (key, (counter.count, counter.expires))
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Lets moka finish its pending admissions, evictions and expiries.
    pub(super) async fn settle(&self) {
        self.entries.run_pending_tasks().await;
    }

    /// Entries admitted, as of the last [`Self::settle`] or housekeeping.
    pub(super) fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Entries in moka's table right now, admitted or still pending.
    pub(super) fn stored(&self) -> usize {
        self.entries.iter().count()
    }
}

// === impl Entry ===

impl Entry {
    /// The counters the decision wrote, one per limit.
    fn new(limits: &[Limit], counters: Vec<Counter>, now: Instant) -> Self {
        let lasts = counters
            .iter()
            .map(|counter| counter.expires.saturating_duration_since(now))
            .max()
            .unwrap_or_default();
        let counters = limits.iter().map(|limit| limit.window).zip(counters);
        Self {
            counters: counters.collect(),
            lasts,
        }
    }

    /// The counter of the limit with this window, if it is still running.
    fn running(&self, window: Duration, now: Instant) -> Option<Counter> {
        self.counters
            .iter()
            .find(|(of, _)| *of == window)
            .map(|(_, counter)| *counter)
            .filter(|counter| counter.is_running(now))
    }

    /// Whether any of its counters still runs.
    fn is_running(&self, now: Instant) -> bool {
        self.counters
            .iter()
            .any(|(_, counter)| counter.is_running(now))
    }
}

/// Moka drops an entry a little after its last counter lapses, as a Redis
/// key's TTL would.
struct UntilLapsed;

impl Expiry<String, Entry> for UntilLapsed {
    fn expire_after_create(
        &self,
        _key: &String,
        entry: &Entry,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(entry.lasts + LINGER)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        entry: &Entry,
        _updated_at: std::time::Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.lasts + LINGER)
    }
}

// === impl Counter ===

#[cfg(test)]
thread_local! {
    /// How many times this thread asked whether a counter runs: every look
    /// at a counter asks, so this shows how much of the store a call saw.
    pub(super) static LOOKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl Counter {
    /// Whether the counter still holds anything at `now`.
    fn is_running(&self, now: Instant) -> bool {
        #[cfg(test)]
        LOOKS.with(|looks| looks.set(looks.get() + 1));

        self.expires > now
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
