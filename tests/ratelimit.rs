//! Rate limits against a real Redis: exactness across several Gatehouse
//! processes (standalone and Cluster), several limits decided all or
//! nothing, the smooth algorithm at a window's edge, shadow mode and costs.
//!
//! Windows are real and short, because Redis's clock cannot be paused; the
//! margins allow for a loaded machine.

mod limits;
mod support;

use std::time::Duration;

use futures::future::join_all;
use limits::{Answer, Running, assert_every_key_has_a_ttl, channel, check, fallbacks};
use tonic::transport::Channel;

/// The call budget for the exactness runs. 1000 concurrent calls on a
/// shared 2-core test machine queue far longer than the production default
/// of 20 ms; the budget is raised so that the count, not the machine's
/// speed, is what these tests measure.
const LOADED_BUDGET_MS: u64 = 2000;

fn routes() -> &'static str {
    "  - {name: hourly, prefix: /hourly, public: true, rate_limit: hourly}
  - {name: fixed, prefix: /fixed, public: true, rate_limit: fixed}"
}

fn hourly_limits() -> &'static str {
    "  hourly: {requests: 100, window_seconds: 3600, burst: 100, failure_mode: closed}
  fixed: {requests: 100, window_seconds: 3600, algorithm: fixed_window, failure_mode: closed}"
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
    assert!(assert_every_key_has_a_ttl(redis_ports).await >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gatehouses_on_one_redis_admit_exactly_the_burst() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (_redis, port) = support::redis(dir.path());
    let redis = format!("  url: ${{REDIS_URL}}\n  timeout_ms: {LOADED_BUDGET_MS}");
    let yaml = limits::config(&redis, hourly_limits(), routes());

    let running = limits::gatehouses(dir.path(), &yaml, 3, port);
    assert_exactly_the_burst(&running, &[port]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gatehouses_on_a_redis_cluster_admit_exactly_the_burst() {
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

#[tokio::test]
async fn smooth_algorithm_gives_no_second_burst_at_a_window_edge() {
    // 4 per 2 s: one request's worth comes back every 0.5 s.
    let single = single(
        "  smooth: {requests: 4, window_seconds: 2}",
        "  - {name: smooth, prefix: /smooth, public: true, rate_limit: smooth}",
    )
    .await;
    let channel = &single.channel;
    let admitted = |n| async move {
        let mut allowed = 0;
        for _ in 0..n {
            if check(channel, "/smooth", "192.0.2.1").await.status == 200 {
                allowed += 1;
            }
        }
        allowed
    };

    assert_eq!(admitted(6).await, 4, "the burst, then refusals");

    // Half a window later only what trickled back is admitted; a fixed
    // window ending here would admit a whole second burst.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let again = admitted(6).await;
    assert!(
        (1..=3).contains(&again),
        "{again} admitted after half a window"
    );

    // After a whole quiet window the full burst is back.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(admitted(4).await, 4);

    assert_eq!(fallbacks(&single.running).await, 0);
    assert!(assert_every_key_has_a_ttl(&[single.port]).await >= 1);
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
