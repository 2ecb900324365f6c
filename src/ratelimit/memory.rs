//! Counters kept in this process, for a single Gatehouse instance.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::Verdict;
use crate::config::RateLimitPolicy;

/// Expired windows are swept once the map holds this many entries.
const SWEEP_AT: usize = 10_000;

/// Fixed windows per (policy, client), starting at the client's first request.
#[derive(Default)]
pub struct MemoryStore {
    windows: Mutex<HashMap<(String, String), Window>>,
}

struct Window {
    count: u64,
    resets_at: Instant,
}

impl MemoryStore {
    /// Counts a request; the same rules as the Redis script.
    pub fn check(&self, policy: &RateLimitPolicy, client: &str, cost: u64) -> Verdict {
        let now = Instant::now();
        // A poisoned lock only means another request panicked mid-update;
        // the counters are still usable.
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());

        if windows.len() >= SWEEP_AT {
            windows.retain(|_, window| window.resets_at > now);
        }

        let key = (policy.name.clone(), client.to_owned());
        let window = windows.entry(key).or_insert(Window {
            count: 0,
            resets_at: now + policy.window,
        });
        if window.resets_at <= now {
            *window = Window {
                count: 0,
                resets_at: now + policy.window,
            };
        }

        let allowed = window.count + cost <= policy.requests;
        if allowed {
            window.count += cost;
        }

        Verdict {
            allowed,
            limit: policy.requests,
            remaining: policy.requests.saturating_sub(window.count),
            reset: window
                .resets_at
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FailureMode;

    fn policy(requests: u64, window: u64) -> RateLimitPolicy {
        RateLimitPolicy {
            name: "p".to_owned(),
            requests,
            window: Duration::from_secs(window),
            failure_mode: FailureMode::Closed,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn admits_the_limit_then_refuses_until_the_window_resets() {
        let store = MemoryStore::default();
        let policy = policy(3, 60);

        for remaining in [2, 1, 0] {
            let verdict = store.check(&policy, "c", 1);
            assert!(verdict.allowed);
            assert_eq!(verdict.remaining, remaining);
        }

        let refused = store.check(&policy, "c", 1);
        assert!(!refused.allowed);
        assert_eq!(refused.reset, Duration::from_secs(60));

        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(store.check(&policy, "c", 1).allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn clients_and_policies_count_separately() {
        let store = MemoryStore::default();
        let policy = policy(1, 60);

        assert!(store.check(&policy, "a", 1).allowed);
        assert!(store.check(&policy, "b", 1).allowed);
        assert!(!store.check(&policy, "a", 1).allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_requests_consume_nothing() {
        let store = MemoryStore::default();
        let policy = policy(3, 60);

        assert!(store.check(&policy, "c", 2).allowed);
        assert!(!store.check(&policy, "c", 2).allowed);
        assert!(store.check(&policy, "c", 1).allowed);
    }
}
