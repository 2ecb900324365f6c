//! The in-memory store on paused time: the same rules the Redis scripts
//! follow, checked without a clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::{FailureMode, Limit, LimitAlgorithm, RateLimitPolicy};

fn limit(requests: u64, window_secs: u64, burst: u64) -> Limit {
    Limit {
        requests,
        window: Duration::from_secs(window_secs),
        burst,
    }
}

fn policy(algorithm: LimitAlgorithm, limits: Vec<Limit>) -> RateLimitPolicy {
    RateLimitPolicy {
        name: "p".to_owned(),
        tier_claim: None,
        algorithm,
        limits,
        tiers: HashMap::new(),
        failure_mode: FailureMode::Closed,
        shadow: false,
        x_ratelimit_headers: false,
    }
}

async fn decide(limiter: &Limiter, policy: &RateLimitPolicy, client: &str, cost: u64) -> Verdict {
    let query = Query::new(policy, client, None, None, cost);
    limiter.check(&query).await.expect("memory never fails")
}

fn memory() -> Limiter {
    Limiter::new(None, &config::MemoryStore::default()).expect("memory limiter")
}

#[tokio::test(start_paused = true)]
async fn gcra_admits_the_burst_then_one_per_interval() {
    let limiter = memory();
    let policy = policy(LimitAlgorithm::Gcra, vec![limit(4, 4, 4)]);

    for remaining in [3, 2, 1, 0] {
        let verdict = decide(&limiter, &policy, "c", 1).await;
        assert!(verdict.allowed);
        assert_eq!(verdict.limits[0].remaining, remaining);
    }
    let refused = decide(&limiter, &policy, "c", 1).await;
    assert!(!refused.allowed);
    assert_eq!(refused.retry_after, Duration::from_secs(1));

    // Half a window later two requests' worth has come back, not a whole
    // new burst: no window edge to exploit.
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(decide(&limiter, &policy, "c", 1).await.allowed);
    assert!(decide(&limiter, &policy, "c", 1).await.allowed);
    assert!(!decide(&limiter, &policy, "c", 1).await.allowed);
}

#[tokio::test(start_paused = true)]
async fn fixed_window_resets_whole_at_the_window_end() {
    let limiter = memory();
    let policy = policy(LimitAlgorithm::FixedWindow, vec![limit(3, 60, 3)]);

    for _ in 0..3 {
        assert!(decide(&limiter, &policy, "c", 1).await.allowed);
    }
    let refused = decide(&limiter, &policy, "c", 1).await;
    assert!(!refused.allowed);
    assert_eq!(refused.retry_after, Duration::from_secs(60));

    tokio::time::advance(Duration::from_secs(60)).await;
    for _ in 0..3 {
        assert!(decide(&limiter, &policy, "c", 1).await.allowed);
    }
}

#[tokio::test(start_paused = true)]
async fn several_limits_are_all_or_nothing_with_the_longest_wait() {
    let limiter = memory();
    for algorithm in [LimitAlgorithm::Gcra, LimitAlgorithm::FixedWindow] {
        // 2 a second and 3 a minute.
        let policy = policy(algorithm, vec![limit(2, 1, 2), limit(3, 60, 3)]);
        let client = format!("{algorithm:?}");

        assert!(decide(&limiter, &policy, &client, 2).await.allowed);
        // The per-second limit refuses; the per-minute one must not be
        // charged for it.
        let refused = decide(&limiter, &policy, &client, 1).await;
        assert!(!refused.allowed, "{algorithm:?}");
        assert_eq!(refused.limits[1].remaining, 1, "{algorithm:?}");

        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            decide(&limiter, &policy, &client, 1).await.allowed,
            "{algorithm:?}"
        );

        // Now the minute is used up: the wait is the minute's, the longer.
        tokio::time::advance(Duration::from_secs(1)).await;
        let refused = decide(&limiter, &policy, &client, 1).await;
        assert!(!refused.allowed, "{algorithm:?}");
        assert!(
            refused.retry_after > Duration::from_secs(10),
            "{algorithm:?}: {refused:?}"
        );
    }
}

fn counters(limiter: &Limiter) -> HashMap<String, (u64, tokio::time::Instant)> {
    match &limiter.store {
        Store::Memory(store) => store.snapshot(),
        Store::Redis(_) => panic!("a memory limiter"),
    }
}

#[tokio::test(start_paused = true)]
async fn two_limits_refusing_at_once_wait_for_the_longer_and_consume_nothing() {
    // 2 a second and 2 a minute: after two requests both refuse.
    for (algorithm, longer) in [
        // The minute's window ends in 60 s.
        (LimitAlgorithm::FixedWindow, Duration::from_secs(60)),
        // One request of the minute's comes back every 30 s.
        (LimitAlgorithm::Gcra, Duration::from_secs(30)),
    ] {
        let limiter = memory();
        let policy = policy(algorithm, vec![limit(2, 1, 2), limit(2, 60, 2)]);

        assert!(decide(&limiter, &policy, "c", 1).await.allowed);
        assert!(decide(&limiter, &policy, "c", 1).await.allowed);
        let before = counters(&limiter);
        assert_eq!(before.len(), 2, "{algorithm:?}: one counter per limit");

        let refused = decide(&limiter, &policy, "c", 1).await;
        assert!(!refused.allowed, "{algorithm:?}");
        assert_eq!(
            refused.retry_after, longer,
            "{algorithm:?}: not the second's"
        );
        assert!(refused.limits.iter().all(|status| status.remaining == 0));
        assert_eq!(
            counters(&limiter),
            before,
            "{algorithm:?}: nothing consumed"
        );

        // A second on, the second's limit admits again but the minute's
        // still refuses, and the wait is what is left of the minute's.
        tokio::time::advance(Duration::from_secs(1)).await;
        let refused = decide(&limiter, &policy, "c", 1).await;
        assert!(!refused.allowed, "{algorithm:?}");
        assert_eq!(refused.retry_after, longer - Duration::from_secs(1));
        assert_eq!(
            counters(&limiter).len(),
            1,
            "{algorithm:?}: the second's lapsed"
        );

        // Once the minute's wait is over, one more is admitted: the two
        // refusals took nothing from it.
        tokio::time::advance(longer - Duration::from_secs(1)).await;
        assert!(
            decide(&limiter, &policy, "c", 1).await.allowed,
            "{algorithm:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn clients_tiers_and_groups_count_separately() {
    let limiter = memory();
    let mut policy = policy(LimitAlgorithm::Gcra, vec![limit(1, 60, 1)]);
    policy
        .tiers
        .insert("gold".to_owned(), vec![limit(3, 60, 3)]);

    assert!(decide(&limiter, &policy, "a", 1).await.allowed);
    assert!(decide(&limiter, &policy, "b", 1).await.allowed);
    assert!(!decide(&limiter, &policy, "a", 1).await.allowed);

    let grouped = Query::new(&policy, "a", None, Some("writes"), 1);
    assert!(limiter.check(&grouped).await.expect("verdict").allowed);

    let gold = Query::new(&policy, "g", Some("gold"), None, 1);
    for _ in 0..3 {
        assert!(limiter.check(&gold).await.expect("verdict").allowed);
    }
    assert!(!limiter.check(&gold).await.expect("verdict").allowed);

    // A tier the policy does not define falls back to its own limits.
    let unknown = Query::new(&policy, "u", Some("silver"), None, 1);
    assert_eq!(unknown.limits(), &policy.limits[..]);
}

#[tokio::test(start_paused = true)]
async fn shadow_mode_reports_but_never_refuses() {
    let limiter = memory();
    let mut policy = policy(LimitAlgorithm::Gcra, vec![limit(1, 60, 1)]);
    policy.shadow = true;
    let query = Query::new(&policy, "c", None, None, 1);

    assert!(matches!(limiter.decide(&query).await, Outcome::Allowed(_)));
    match limiter.decide(&query).await {
        Outcome::Allowed(verdict) => assert!(!verdict.allowed, "reported as over the limit"),
        other => panic!("shadow mode refused: {other:?}"),
    }
}

#[test]
fn headers_follow_the_draft_with_one_member_per_limit() {
    let mut policy = policy(
        LimitAlgorithm::Gcra,
        vec![limit(10, 1, 10), limit(1000, 3600, 1000)],
    );
    policy.name = "api".to_owned();
    policy.x_ratelimit_headers = true;
    let verdict = Verdict {
        allowed: true,
        retry_after: Duration::ZERO,
        limits: vec![
            LimitStatus {
                limit: policy.limits[0],
                remaining: 9,
                reset: Duration::from_millis(100),
            },
            LimitStatus {
                limit: policy.limits[1],
                remaining: 999,
                reset: Duration::from_millis(3_600),
            },
        ],
    };

    let headers: HashMap<String, String> = verdict.headers(&policy).into_iter().collect();
    assert_eq!(
        headers["ratelimit-policy"],
        "\"api-0-1s\";q=10;w=1, \"api-1-3600s\";q=1000;w=3600"
    );
    assert_eq!(
        headers["ratelimit"],
        "\"api-0-1s\";r=9;t=1, \"api-1-3600s\";r=999;t=4"
    );
    assert_eq!(headers["x-ratelimit-limit"], "10");
    assert_eq!(headers["x-ratelimit-remaining"], "9");
    assert_eq!(headers["x-ratelimit-reset"], "1");
}

fn memory_store(limiter: &Limiter) -> &memory::MemoryStore {
    match &limiter.store {
        Store::Memory(store) => store,
        Store::Redis(_) => panic!("a memory limiter"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_new_clients_stays_bounded_and_a_steady_client_keeps_its_count() {
    const CAPACITY: u64 = 1_000;
    let bounds = config::MemoryStore {
        max_entries: CAPACITY,
    };
    let limiter = Limiter::new(None, &bounds).expect("memory limiter");
    let store = memory_store(&limiter);
    // 5 an hour: one request's worth comes back every 720 s.
    let policy = policy(LimitAlgorithm::Gcra, vec![limit(5, 3600, 5)]);
    let interval = Duration::from_secs(720);

    for _ in 0..5 {
        assert!(decide(&limiter, &policy, "client:steady", 1).await.allowed);
    }
    let evicted_before = metrics::Counter::RatelimitMemoryEvicted.get();

    // Twenty times the capacity in addresses of one /64, each asking once
    // with its counter still running (the clock stands still).
    const FLOOD: u64 = 20_000;
    for i in 0..FLOOD {
        let client = format!("addr:2001:db8::{i:x}");
        let verdict = decide(&limiter, &policy, &client, 1).await;
        assert!(verdict.allowed, "a new client's first request");

        if i % 100 == 99 {
            // The steady client is still out of requests: its counter was
            // kept through the flood.
            let refused = decide(&limiter, &policy, "client:steady", 1).await;
            assert!(!refused.allowed, "after {i} new clients: {refused:?}");
            assert_eq!(refused.retry_after, interval, "after {i} new clients");
        }
        if i % 1_000 == 999 {
            // Without being asked to, moka applies its pending writes in
            // batches of a few hundred, so the table never gets far past
            // the capacity.
            let stored = store.stored();
            assert!(stored <= 2 * CAPACITY as usize, "after {i}: {stored}");
        }
    }

    // Settled, the bound is exact, and every entry that was pushed out
    // (or never let in) while it still ran was counted.
    store.settle().await;
    let kept = store.entry_count();
    assert!(kept <= CAPACITY, "{kept} entries kept");
    let evicted = metrics::Counter::RatelimitMemoryEvicted.get() - evicted_before;
    assert!(
        evicted >= FLOOD + 1 - kept,
        "{evicted} evictions counted, {kept} of {} entries kept",
        FLOOD + 1
    );

    // One interval on, exactly one request's worth is back.
    tokio::time::advance(interval).await;
    assert!(decide(&limiter, &policy, "client:steady", 1).await.allowed);
    assert!(!decide(&limiter, &policy, "client:steady", 1).await.allowed);
}

#[tokio::test(start_paused = true)]
async fn a_decision_looks_at_its_own_counters_only_however_many_are_stored() {
    let limiter = memory();
    let store = memory_store(&limiter);
    // Two limits, so each client holds two counters.
    let policy = policy(
        LimitAlgorithm::FixedWindow,
        vec![limit(1, 60, 1), limit(5, 3600, 5)],
    );

    // More live clients than the old store's sweep threshold, all of them
    // running (the clock stands still).
    const CLIENTS: u64 = 20_000;
    for i in 0..CLIENTS {
        let client = format!("addr:10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, i & 0xff);
        assert!(decide(&limiter, &policy, &client, 1).await.allowed);
    }
    store.settle().await;
    assert_eq!(
        store.entry_count(),
        CLIENTS,
        "all within the default capacity"
    );

    // Every look at a counter asks whether it still runs, and the store
    // keeps no list to walk: a decision sees its own client's counters,
    // whatever else is stored.
    let looks = || memory::LOOKS.with(std::cell::Cell::get);
    let before = looks();
    let refused = decide(&limiter, &policy, "addr:10.0.0.7", 1).await;
    assert!(!refused.allowed, "a stored client is still counted");
    assert_eq!(looks() - before, 2, "its two counters");

    let before = looks();
    assert!(decide(&limiter, &policy, "addr:192.0.2.1", 1).await.allowed);
    assert_eq!(looks() - before, 0, "a new client has none");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_arrives_during_a_flood_gets_in_after_a_few_requests() {
    const CAPACITY: u64 = 1_000;
    let bounds = config::MemoryStore {
        max_entries: CAPACITY,
    };
    let limiter = Limiter::new(None, &bounds).expect("memory limiter");
    let policy = policy(LimitAlgorithm::Gcra, vec![limit(5, 3600, 5)]);
    let flood = |from: u64| {
        let (limiter, policy) = (&limiter, &policy);
        async move {
            for i in from..from + CAPACITY {
                decide(limiter, policy, &format!("addr:2001:db8::{i:x}"), 1).await;
            }
        }
    };

    // The store is full of clients seen once when a new one arrives, and
    // a whole capacity of new clients comes between any two of its
    // requests. Forgetting the least recently used would forget it every
    // time (20 of 20 admitted); keeping what is asked for often lets it in
    // once its key has been seen more than the ones it pushes out.
    flood(0).await;
    let mut admitted = 0;
    for round in 1..=20 {
        if decide(&limiter, &policy, "client:late", 1).await.allowed {
            admitted += 1;
        }
        flood(round * CAPACITY).await;
    }
    assert!(
        (5..=10).contains(&admitted),
        "{admitted} of 20 admitted under a limit of 5"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_decisions_on_one_client_are_all_or_nothing() {
    for algorithm in [LimitAlgorithm::Gcra, LimitAlgorithm::FixedWindow] {
        let limiter = Arc::new(memory());
        // 100 an hour and 150 in two hours: nothing comes back during the
        // test, on the real clock.
        let policy = Arc::new(policy(
            algorithm,
            vec![limit(100, 3600, 100), limit(150, 7200, 150)],
        ));

        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (limiter, policy) = (limiter.clone(), policy.clone());
                tokio::spawn(async move {
                    let mut admitted = 0;
                    for _ in 0..50 {
                        if decide(&limiter, &policy, "c", 1).await.allowed {
                            admitted += 1;
                        }
                    }
                    admitted
                })
            })
            .collect();
        let mut admitted = 0;
        for task in tasks {
            admitted += task.await.expect("task");
        }

        assert_eq!(admitted, 100, "{algorithm:?}");
        // The refusals charged neither limit.
        let refused = decide(&limiter, &policy, "c", 1).await;
        assert_eq!(refused.limits[0].remaining, 0, "{algorithm:?}");
        assert_eq!(refused.limits[1].remaining, 50, "{algorithm:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn no_counter_runs_longer_than_the_horizon_moka_keeps_its_entry_for() {
    // A burst larger than the rate: the GCRA horizon is the 10 requests'
    // 7200 s, twice the window.
    let limits = vec![limit(5, 3600, 10), limit(2, 1, 2)];
    assert_eq!(memory::horizon(&limits), Duration::from_secs(7200));
    let fixed = vec![limit(5, 3600, 5), limit(2, 1, 2)];
    assert_eq!(memory::horizon(&fixed), Duration::from_secs(3600));

    for (algorithm, limits) in [
        (LimitAlgorithm::Gcra, limits),
        (LimitAlgorithm::FixedWindow, fixed),
    ] {
        let limiter = memory();
        let horizon = memory::horizon(&limits);
        let policy = policy(algorithm, limits);

        // Every decision renews the entry for the horizon from its own
        // moment; whatever it writes must lapse within that.
        for round in 0..40u64 {
            decide(&limiter, &policy, "c", 1 + round % 2).await;
            let latest = tokio::time::Instant::now() + horizon;
            for (key, (_, expires)) in counters(&limiter) {
                assert!(expires <= latest, "{algorithm:?} round {round}: {key}");
            }
            tokio::time::advance(Duration::from_millis(700)).await;
        }
    }
}
