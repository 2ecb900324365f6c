//! Counters kept in this process, for a single Gatehouse instance.
//!
//! The same algorithms and the same all-or-nothing rule as the Redis
//! scripts, on tokio's clock so that tests can pause time. A bounded moka
//! cache holds them: a decision touches one entry, and memory stays within
//! `memory_store.max_entries` whatever keys clients make up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::{LimitStatus, Query, Verdict, keys};
use crate::config::{self, Limit, LimitAlgorithm};
use crate::metrics;

/// How much longer than its horizon moka keeps an entry after a read.
///
/// Moka reads its own (std) clock when it renews an entry, and the decision
/// reads tokio's a moment later; in a server the two advance together and
/// this covers that moment many times over. With tokio's clock paused
/// (tests) it keeps moka from dropping an entry that tokio's clock still
/// counts as running.
const LINGER: Duration = Duration::from_secs(5);

/// Counters by subject (policy, client, route group, tier and algorithm),
/// each subject's limits in one entry.
///
/// A decision finds its subject's entry (making it if missing) and then
/// holds that entry's own lock while it reads, decides and writes every
/// limit: all or nothing, and subjects never wait for each other. Moka is
/// only written when an entry is made, so a decision on a known client
/// costs one read of the cache.
///
/// Once the cache is full, moka's TinyLFU policy admits a new entry only
/// when its key has been asked for more often than the entries it would
/// push out, so keys seen once (a client rotating addresses) lose to
/// clients in steady use. An entry dropped while a counter still runs is
/// counted in [`metrics::Counter::RatelimitMemoryEvicted`].
pub struct MemoryStore {
    entries: Cache<String, Arc<Slot>>,
}

/// The counters of one subject, changed in place under their own lock.
///
/// Never call moka while holding the lock: moka's housekeeping runs inside
/// its calls and calls the eviction listener, which takes it.
struct Slot {
    /// Each limit's counter, by the limit's window (unique within a policy,
    /// and what the Redis key of a counter ends with).
    counters: Mutex<Vec<(Duration, Counter)>>,
    /// The subject's [`horizon`] in microseconds, as of its last decision.
    horizon_micros: AtomicU64,
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
            .expire_after(UntilQuiet)
            .eviction_listener(|_key, slot: Arc<Slot>, cause| {
                // Lapsed counters cost nobody anything when they go; running
                // ones forget what a client has spent.
                if cause == RemovalCause::Size && slot.is_running(Instant::now()) {
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
        let horizon = horizon(limits);
        let key = keys::subject_part("mem", &query.subject, algorithm);

        // Reading the entry renews it in moka for the horizon; a missing one
        // is made once, however many decisions ask for it at the same time.
        let slot = self
            .entries
            .get_with_by_ref(key.as_str(), async { Arc::new(Slot::new(horizon)) })
            .await;
        if slot.widen(horizon) {
            // The limits grew longer (a reload): read again, so that moka
            // keeps the entry for the new horizon.
            self.entries.get(key.as_str()).await;
        }

        // From reading the counters to writing them, under the entry's lock.
        let mut counters = slot.counters.lock();
        let now = Instant::now();
        let current: Vec<Option<Counter>> = limits
            .iter()
            .map(|limit| running(&counters, limit.window, now))
            .collect();

        let (verdict, updated) = match algorithm {
            LimitAlgorithm::Gcra => gcra(now, query.cost, limits, &current),
            LimitAlgorithm::FixedWindow => fixed_window(now, query.cost, limits, &current),
        };
        if verdict.allowed {
            counters.clear();
            counters.extend(limits.iter().map(|limit| limit.window).zip(updated));
        }
        verdict
    }
}

#[cfg(test)]
impl MemoryStore {
    /// Every running counter's count and expiry by its Redis-style key, to
    /// see what a decision wrote.
    pub(super) fn snapshot(&self) -> std::collections::HashMap<String, (u64, Instant)> {
        let now = Instant::now();
        let mut snapshot = std::collections::HashMap::new();
        for (key, slot) in self.entries.iter() {
            for (window, counter) in slot.counters.lock().iter() {
                if counter.is_running(now) {
                    let key = format!("{key}:{}", window.as_millis());
                    snapshot.insert(key, (counter.count, counter.expires));
                }
            }
        }
        snapshot
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

/// The counter of the limit with this window, if it is still running.
fn running(counters: &[(Duration, Counter)], window: Duration, now: Instant) -> Option<Counter> {
    counters
        .iter()
        .find(|(of, _)| *of == window)
        .map(|(_, counter)| *counter)
        .filter(|counter| counter.is_running(now))
}

/// The longest any counter can run after a decision under `limits`: a fixed
/// window's length, or the time a whole GCRA burst takes to come back (a
/// decision that would push the TAT further is refused).
pub(super) fn horizon(limits: &[Limit]) -> Duration {
    limits
        .iter()
        .map(|limit| limit.window.max(times(interval(limit), limit.burst)))
        .max()
        .unwrap_or_default()
}

// === impl Slot ===

impl Slot {
    fn new(horizon: Duration) -> Self {
        Self {
            counters: Mutex::new(Vec::new()),
            horizon_micros: AtomicU64::new(micros(horizon)),
        }
    }

    /// Records the horizon of the limits that now apply, and whether it is
    /// longer than the one moka renewed the entry for.
    fn widen(&self, horizon: Duration) -> bool {
        let horizon = micros(horizon);
        self.horizon_micros.swap(horizon, Ordering::Relaxed) < horizon
    }

    /// How long moka keeps the entry after a read: no decision made then
    /// can leave a counter running for longer.
    fn keep(&self) -> Duration {
        Duration::from_micros(self.horizon_micros.load(Ordering::Relaxed)) + LINGER
    }

    /// Whether any of its counters still runs.
    fn is_running(&self, now: Instant) -> bool {
        let counters = self.counters.lock();
        counters.iter().any(|(_, counter)| counter.is_running(now))
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Moka drops an entry once its subject has been quiet for longer than any
/// of its counters can run: like a Redis key's TTL, but renewed on reads so
/// that a decision never has to write to moka.
struct UntilQuiet;

impl Expiry<String, Arc<Slot>> for UntilQuiet {
    fn expire_after_create(
        &self,
        _key: &String,
        slot: &Arc<Slot>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(slot.keep())
    }

    fn expire_after_read(
        &self,
        _key: &String,
        slot: &Arc<Slot>,
        _read_at: std::time::Instant,
        _left: Option<Duration>,
        _last_modified_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(slot.keep())
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
