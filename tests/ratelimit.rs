//! Rate limits against a real Redis: exactness across several Gatehouse
//! processes (standalone and Cluster), several limits decided all or
//! nothing, both algorithms at a window's edge, a fixed window's reset,
//! route groups, shadow mode and costs.
//!
//! Windows are real and short, because Redis's clock cannot be paused; the
//! margins allow for a loaded machine, and where a count depends on time the
//! bound is computed from the time that really passed.

mod limits;
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use limits::{Answer, Running, assert_every_key_has_a_ttl, channel, check, fallbacks};
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// The call budget for the exactness runs: the most `check-config` allows.
/// Redis spends a few microseconds per decision; the rest of a call's time
/// under 1000 concurrent Checks is this machine's two shared cores, which
/// the Redis thread of each Gatehouse keeps out of the budget.
const LOADED_BUDGET_MS: u64 = 500;

/// Held by the tests that load the machine (1000 concurrent Checks) or that
/// time requests against a window's edge, so that none disturbs another.
static MACHINE: Mutex<()> = Mutex::const_new(());

fn routes() -> &'static str {
    "  - {name: hourly, prefix: /hourly, public: true, rate_limit: hourly, rate_limit_group: burst}
  - {name: fixed, prefix: /fixed, public: true, rate_limit: fixed, rate_limit_group: burst}"
}

/// 100 an hour with a burst of 100, and a looser limit beside it, so that
/// every decision is one script over two keys (on a Cluster, in one slot).
fn hourly_limits() -> &'static str {
    "  hourly:
    limits:
      - {requests: 100, window_seconds: 3600, burst: 100}
      - {requests: 1000, window_seconds: 60}
    failure_mode: closed
  fixed:
    limits:
      - {requests: 100, window_seconds: 3600}
      - {requests: 1000, window_seconds: 60}
    algorithm: fixed_window
    failure_mode: closed"
}

/// 1000 concurrent Checks for one client, spread over every Gatehouse.
async fn burst(channels: &[Channel], path: &str, address: &str) -> Vec<Answer> {
    let calls = (0..1000).map(|n| {
        let channel = channels[n % channels.len()].clone();
        let path = path.to_owned();
        let address = address.to_owned();
        tokio::spawn(async move { check(&channel, &path, &address).await })
    });
    join_all(calls)
        .await
        .into_iter()
        .map(|answer| answer.expect("check task"))
        .collect()
}

async fn assert_exactly_the_burst(running: &[Running], redis_ports: &[u16]) {
    let mut channels = Vec::new();
    for gatehouse in running {
        channels.push(channel(gatehouse.ports.grpc).await);
    }

    for (path, address) in [("/hourly", "198.51.100.1"), ("/fixed", "198.51.100.2")] {
        let answers = burst(&channels, path, address).await;
        let count = |status| answers.iter().filter(|a| a.status == status).count();

        assert_eq!(count(200), 100, "{path}: allowed");
        assert_eq!(count(429), 900, "{path}: refused");
        assert_eq!(count(503), 0, "{path}: failed closed");
    }
    assert_eq!(
        fallbacks(running).await,
        0,
        "no decision fell back to a failure mode"
    );
    assert_eq!(assert_every_key_has_a_ttl(redis_ports).await, 4);

    // Both limits' keys of a decision carry the group, and sit on one node.
    for policy in ["hourly", "fixed"] {
        let mut nodes = Vec::new();
        for port in redis_ports {
            for (key, _) in limits::keys_with_ttl(*port).await {
                if key.contains(&format!("{{{policy}|")) {
                    assert!(key.contains("}:burst:"), "{key}");
                    nodes.push((*port, key));
                }
            }
        }
        assert_eq!(nodes.len(), 2, "{policy}: {nodes:?}");
        assert_eq!(nodes[0].0, nodes[1].0, "{policy}: one slot: {nodes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gatehouses_on_one_redis_admit_exactly_the_burst() {
    let _machine = MACHINE.lock().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let (_redis, port) = support::redis(dir.path());
    let redis = format!("  url: ${{REDIS_URL}}\n  timeout_ms: {LOADED_BUDGET_MS}");
    let yaml = limits::config(&redis, hourly_limits(), routes());

    let running = limits::gatehouses(dir.path(), &yaml, 3, port);
    assert_exactly_the_burst(&running, &[port]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gatehouses_on_a_redis_cluster_admit_exactly_the_burst() {
    let _machine = MACHINE.lock().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let (_nodes, ports) = support::redis_cluster(dir.path());
    let redis = format!("  url: ${{REDIS_URL}}\n  cluster: true\n  timeout_ms: {LOADED_BUDGET_MS}");
    let yaml = limits::config(&redis, hourly_limits(), routes());

    let running = limits::gatehouses(dir.path(), &yaml, 3, ports[0]);
    assert_exactly_the_burst(&running, &ports).await;
}

/// One Gatehouse on its own Redis with `rate_limits` and `routes`.
struct Single {
    running: Vec<Running>,
    channel: Channel,
    port: u16,
    _redis: support::Proc,
    _dir: tempfile::TempDir,
}

async fn single(rate_limits: &str, routes: &str) -> Single {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (redis, port) = support::redis(dir.path());
    let yaml = limits::config(
        "  url: ${REDIS_URL}\n  timeout_ms: 500",
        rate_limits,
        routes,
    );
    let running = limits::gatehouses(dir.path(), &yaml, 1, port);
    let channel = channel(running[0].ports.grpc).await;
    Single {
        running,
        channel,
        port,
        _redis: redis,
        _dir: dir,
    }
}

impl Single {
    /// How many of `n` Checks in a row on `path` from `address` are allowed.
    async fn admitted(&self, n: usize, path: &str, address: &str) -> usize {
        let mut allowed = 0;
        for _ in 0..n {
            if check(&self.channel, path, address).await.status == 200 {
                allowed += 1;
            }
        }
        allowed
    }

    /// How many of `n` concurrent Checks on `path` from `address` are
    /// allowed.
    async fn concurrently(&self, n: usize, path: &str, address: &str) -> usize {
        let calls = (0..n).map(|_| check(&self.channel, path, address));
        let answers = join_all(calls).await;
        answers.iter().filter(|answer| answer.status == 200).count()
    }

    /// The one key of `policy` on this Redis and its TTL.
    async fn key_of(&self, policy: &str) -> (String, Duration) {
        let mut found = limits::keys_with_ttl(self.port).await;
        found.retain(|(key, _)| key.contains(&format!("{{{policy}|")));
        assert_eq!(found.len(), 1, "{policy}: {found:?}");
        let (key, ttl) = found.remove(0);
        let ttl = u64::try_from(ttl).unwrap_or_else(|_| panic!("{key} has no TTL"));
        (key, Duration::from_millis(ttl))
    }
}

/// How many requests a burst of `n` at a fixed window's end and another just
/// after got through, and how long the two took from first to last.
struct Edge {
    before: usize,
    after: usize,
    span: Duration,
}

impl Edge {
    fn total(&self) -> usize {
        self.before + self.after
    }

    /// The most any smooth limit of `n` with a burst of `n` per `window`
    /// admits within `span`: the burst, plus one request per interval that
    /// passed, plus one for a request landing just as an interval ends.
    fn smooth_bound(&self, n: usize, window: Duration) -> usize {
        let interval = window / u32::try_from(n).expect("a small n");
        let dripped = self.span.as_micros() / interval.as_micros();
        n + usize::try_from(dripped).expect("a short span") + 1
    }
}

/// How close to the edge each burst is sent.
const EDGE_MARGIN: Duration = Duration::from_millis(400);

/// One request opens the window, then a burst of `n` ends just before the
/// window does and another starts just after. For the fixed window the end
/// is read from Redis (its key's TTL), for GCRA it is where it would be.
async fn bursts_around_an_edge(single: &Single, policy: &str, window: Duration, n: usize) -> Edge {
    let (path, address) = (format!("/{policy}"), "192.0.2.30");
    let opened = Instant::now();
    assert_eq!(check(&single.channel, &path, address).await.status, 200);
    let end = if policy == "fixed" {
        Instant::now() + single.key_of(policy).await.1
    } else {
        opened + window
    };

    tokio::time::sleep_until((end - EDGE_MARGIN).into()).await;
    let started = Instant::now();
    let before = single.concurrently(n, &path, address).await;
    let took = started.elapsed();
    assert!(
        Instant::now() < end,
        "{policy}: the first burst took {took:?} and ran past the edge"
    );

    tokio::time::sleep_until((end + EDGE_MARGIN).into()).await;
    let after = single.concurrently(n, &path, address).await;
    Edge {
        before,
        after,
        span: started.elapsed(),
    }
}

#[tokio::test]
async fn at_a_window_edge_a_fixed_window_admits_two_bursts_and_gcra_one() {
    let _machine = MACHINE.lock().await;
    // 10 per 3 s: GCRA gives one request back every 300 ms.
    let (n, window) = (10, Duration::from_secs(3));
    let single = single(
        "  smooth: {requests: 10, window_seconds: 3}
  fixed: {requests: 10, window_seconds: 3, algorithm: fixed_window}",
        "  - {name: smooth, prefix: /smooth, public: true, rate_limit: smooth}
  - {name: fixed, prefix: /fixed, public: true, rate_limit: fixed}",
    )
    .await;

    // The fixed window admits what its first window had left, then a
    // whole new window: nearly twice the limit within a second.
    let fixed = bursts_around_an_edge(&single, "fixed", window, n).await;
    assert_eq!(fixed.before, n - 1, "the rest of the first window");
    assert_eq!(fixed.after, n, "a whole second window");
    assert!(
        fixed.total() > fixed.smooth_bound(n, window),
        "the smooth bound would catch a fixed window: {} admitted in {:?}",
        fixed.total(),
        fixed.span
    );

    // GCRA admits a full burst (the opening request came back long ago),
    // then only what dripped back in between.
    let smooth = bursts_around_an_edge(&single, "smooth", window, n).await;
    assert!(smooth.before >= n, "a full burst: {}", smooth.before);
    assert!(
        smooth.total() <= smooth.smooth_bound(n, window),
        "{} admitted in {:?}: a second burst at the edge",
        smooth.total(),
        smooth.span
    );

    assert_eq!(fallbacks(&single.running).await, 0);
    assert!(assert_every_key_has_a_ttl(&[single.port]).await >= 1);
}

#[tokio::test]
async fn a_fixed_window_resets_whole_when_redis_expires_it() {
    let single = single(
        "  resets: {requests: 3, window_seconds: 1, algorithm: fixed_window}",
        "  - {name: resets, prefix: /resets, public: true, rate_limit: resets}",
    )
    .await;
    let address = "192.0.2.31";

    assert_eq!(single.admitted(3, "/resets", address).await, 3);
    let refused = check(&single.channel, "/resets", address).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.headers["retry-after"], "1");
    let (_, ttl) = single.key_of("resets").await;
    assert!(ttl <= Duration::from_secs(1), "the window's TTL: {ttl:?}");

    // Once Redis has expired the window, a whole new one.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert!(limits::keys_with_ttl(single.port).await.is_empty());
    assert_eq!(single.admitted(3, "/resets", address).await, 3);
    assert_eq!(check(&single.channel, "/resets", address).await.status, 429);

    assert_eq!(fallbacks(&single.running).await, 0);
    assert_eq!(assert_every_key_has_a_ttl(&[single.port]).await, 1);
}

#[tokio::test]
async fn several_limits_refuse_all_or_nothing_with_the_longest_wait() {
    let single = single(
        "  layered:
    limits:
      - {requests: 2, window_seconds: 1}
      - {requests: 3, window_seconds: 60}
    x_ratelimit_headers: true",
        "  - {name: layered, prefix: /layered, public: true, rate_limit: layered}",
    )
    .await;
    let call = || check(&single.channel, "/layered", "192.0.2.2");

    assert_eq!(call().await.status, 200);
    let second = call().await;
    assert_eq!(second.status, 200);
    assert_eq!(second.headers["x-ratelimit-remaining"], "0");

    // The per-second limit refuses; the per-minute one keeps its last
    // request, so the refusal consumed nothing.
    let refused = call().await;
    assert_eq!(refused.status, 429);
    assert!(
        refused.headers["ratelimit"].contains("\"layered-1-60s\";r=1;"),
        "{:?}",
        refused.headers
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(call().await.status, 200, "the minute still had one left");

    // Now the minute is used up too: Retry-After is its wait, the longer.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refused = call().await;
    assert_eq!(refused.status, 429);
    let retry_after: u64 = refused.headers["retry-after"].parse().expect("seconds");
    assert!(
        (10..=60).contains(&retry_after),
        "retry-after {retry_after}"
    );

    // The per-second counter has lapsed by now; the minute's remains.
    assert_eq!(fallbacks(&single.running).await, 0);
    assert!(assert_every_key_has_a_ttl(&[single.port]).await >= 1);
}

#[tokio::test]
async fn two_limits_refusing_at_once_give_the_longer_wait_and_consume_nothing() {
    let single = single(
        "  both_gcra:
    limits: [{requests: 2, window_seconds: 1}, {requests: 2, window_seconds: 60}]
  both_fixed:
    limits: [{requests: 2, window_seconds: 1}, {requests: 2, window_seconds: 60}]
    algorithm: fixed_window",
        "  - {name: both_gcra, prefix: /both_gcra, public: true, rate_limit: both_gcra}
  - {name: both_fixed, prefix: /both_fixed, public: true, rate_limit: both_fixed}",
    )
    .await;

    // The minute's wait: one request's interval (30 s) for GCRA, the rest
    // of the window (60 s) for the fixed window. The second's would be 1.
    for (path, longer) in [("/both_gcra", 29..=30), ("/both_fixed", 59..=60)] {
        let address = "192.0.2.32";
        assert_eq!(single.admitted(2, path, address).await, 2, "{path}");
        let policy = &path[1..];
        let counters = || async {
            let mut values = limits::key_values(single.port).await;
            values.retain(|key, _| key.contains(&format!("{{{policy}|")));
            values
        };
        let before = counters().await;
        assert_eq!(before.len(), 2, "{path}: {before:?}");

        let refused = check(&single.channel, path, address).await;
        assert_eq!(refused.status, 429, "{path}");
        let retry_after: u64 = refused.headers["retry-after"].parse().expect("seconds");
        assert!(longer.contains(&retry_after), "{path}: {retry_after}");
        let state = &refused.headers["ratelimit"];
        assert!(state.contains("-0-1s\";r=0;"), "{path}: {state}");
        assert!(state.contains("-1-60s\";r=0;"), "{path}: {state}");

        // Neither counter moved.
        assert_eq!(counters().await, before, "{path}: the refusal consumed");
    }

    assert_eq!(fallbacks(&single.running).await, 0);
    assert!(assert_every_key_has_a_ttl(&[single.port]).await >= 2);
}

#[tokio::test]
async fn route_groups_count_apart_and_share_within_a_group() {
    let single = single(
        "  grouped: {requests: 2, window_seconds: 60}",
        "  - {name: read-a, prefix: /read-a, public: true, rate_limit: grouped,
     rate_limit_group: reads}
  - {name: read-b, prefix: /read-b, public: true, rate_limit: grouped,
     rate_limit_group: reads}
  - {name: write, prefix: /write, public: true, rate_limit: grouped,
     rate_limit_group: writes}
  - {name: plain, prefix: /plain, public: true, rate_limit: grouped}",
    )
    .await;
    let address = "192.0.2.33";
    let channel = &single.channel;
    let status = |path: &'static str| async move { check(channel, path, address).await.status };

    // `reads` is one budget across its two routes.
    assert_eq!(status("/read-a").await, 200);
    assert_eq!(status("/read-b").await, 200);
    assert_eq!(status("/read-a").await, 429);
    assert_eq!(status("/read-b").await, 429);

    // `writes` and the routes without a group have budgets of their own.
    for path in ["/write", "/plain"] {
        assert_eq!(single.admitted(3, path, address).await, 2, "{path}");
    }

    let keys: HashMap<String, i64> = limits::keys_with_ttl(single.port)
        .await
        .into_iter()
        .collect();
    let mut groups: Vec<&str> = keys
        .keys()
        .map(|key| {
            key.split("}:")
                .nth(1)
                .and_then(|rest| rest.split(':').next())
        })
        .map(|group| group.expect("a group part"))
        .collect();
    groups.sort_unstable();
    assert_eq!(groups, ["_", "reads", "writes"], "{keys:?}");

    assert_eq!(fallbacks(&single.running).await, 0);
    assert_eq!(assert_every_key_has_a_ttl(&[single.port]).await, 3);
}

#[tokio::test]
async fn shadow_policies_count_without_refusing_and_costs_count_more() {
    let single = single(
        "  shadow: {requests: 1, window_seconds: 60, shadow: true}
  costly: {requests: 4, window_seconds: 60, algorithm: fixed_window}",
        "  - {name: shadow, prefix: /shadow, public: true, rate_limit: shadow}
  - {name: costly, prefix: /costly, public: true, rate_limit: costly, rate_limit_cost: 2}",
    )
    .await;

    for _ in 0..3 {
        let answer = check(&single.channel, "/shadow", "192.0.2.3").await;
        assert_eq!(answer.status, 200);
    }
    let answer = check(&single.channel, "/shadow", "192.0.2.3").await;
    assert_eq!(
        answer.headers["ratelimit"], "\"shadow\";r=0;t=60",
        "still reported"
    );

    // Each request costs 2 of 4.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(check(&single.channel, "/costly", "192.0.2.3").await.status);
    }
    assert_eq!(statuses, [200, 200, 429]);

    assert_eq!(fallbacks(&single.running).await, 0);
    assert!(assert_every_key_has_a_ttl(&[single.port]).await >= 2);
}
