//! Redis failing under a running Gatehouse: killed while requests flow,
//! restarted on the same port, and its script cache flushed. Each policy's
//! failure mode decides meanwhile; nothing panics, and correct decisions
//! resume by themselves.

mod limits;
mod support;

use std::time::{Duration, Instant};

use limits::{FALLBACK_LOG, assert_every_key_has_a_ttl, channel, check, fallbacks, redis_cli};

const RATE_LIMITS: &str = "  open: {requests: 5, window_seconds: 60, failure_mode: open}
  closed: {requests: 5, window_seconds: 60, failure_mode: closed}";

const ROUTES: &str = "  - {name: open, prefix: /open, public: true, rate_limit: open}
  - {name: closed, prefix: /closed, public: true, rate_limit: closed}";

// Two workers, so that requests keep flowing while this test's own thread
// waits for Redis to go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let port = support::free_port();
    let redis = support::redis_on(dir.path(), "redis", port, &[]);
    // The production budget: 20 ms.
    let yaml = limits::config("  url: ${REDIS_URL}\n  timeout_ms: 20", RATE_LIMITS, ROUTES);
    let mut running = limits::gatehouses(dir.path(), &yaml, 1, port);
    let channel = channel(running[0].ports.grpc).await;

    // Requests flow while Redis is killed.
    assert_eq!(check(&channel, "/closed", "192.0.2.10").await.status, 200);
    let flowing = {
        let channel = channel.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for n in 0..200 {
                let path = if n % 2 == 0 { "/open" } else { "/closed" };
                let address = format!("192.0.2.{}", 100 + n % 50);
                statuses.push(check(&channel, path, &address).await.status);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    limits::stop_redis(redis, port);
    let statuses = flowing.await.expect("requests kept flowing");
    assert!(
        statuses
            .iter()
            .all(|status| [200, 429, 503].contains(status))
    );
    assert!(
        statuses.contains(&503),
        "closed refused while redis was gone"
    );

    // With Redis gone: open allows, closed answers 503 with Retry-After.
    let open = check(&channel, "/open", "192.0.2.11").await;
    assert_eq!(open.status, 200);
    assert!(
        !open.headers.contains_key("ratelimit"),
        "nothing was counted"
    );
    let closed = check(&channel, "/closed", "192.0.2.11").await;
    assert_eq!(closed.status, 503);
    assert_eq!(closed.headers["retry-after"], "1");
    running[0].proc.assert_running();
    assert!(fallbacks(&running).await >= 2, "fallbacks are logged");

    // Redis back on the same port: correct decisions within a second,
    // without restarting Gatehouse.
    let _redis = support::redis_on(dir.path(), "redis-again", port, &[]);
    let restarted = Instant::now();
    let first = loop {
        let answer = check(&channel, "/closed", "192.0.2.12").await;
        if answer.status != 503 {
            break answer;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(1),
            "still failing closed a second after redis came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(first.status, 200);

    // The counts are right again (the restarted Redis started empty): four
    // more fit in the limit of five, the next is refused.
    for n in 0..4 {
        assert_eq!(
            check(&channel, "/closed", "192.0.2.12").await.status,
            200,
            "{n}"
        );
    }
    assert_eq!(check(&channel, "/closed", "192.0.2.12").await.status, 429);

    running[0].proc.assert_running();
    assert!(!running[0].proc.log().contains("panicked"));
    assert!(assert_every_key_has_a_ttl(&[port]).await >= 1);
}

#[tokio::test]
async fn script_flush_mid_run_stays_exact() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (_redis, port) = support::redis(dir.path());
    let yaml = limits::config(
        "  url: ${REDIS_URL}\n  timeout_ms: 500",
        RATE_LIMITS,
        ROUTES,
    );
    let running = limits::gatehouses(dir.path(), &yaml, 1, port);
    let channel = channel(running[0].ports.grpc).await;

    for _ in 0..3 {
        assert_eq!(check(&channel, "/closed", "192.0.2.20").await.status, 200);
    }
    assert_eq!(redis_cli(port, &["SCRIPT", "FLUSH"]).trim(), "OK");
    assert_eq!(redis_cli(port, &["SCRIPT", "EXISTS", "0"]).trim(), "0");

    // The script is reloaded transparently and the counters carry on.
    for _ in 0..2 {
        assert_eq!(check(&channel, "/closed", "192.0.2.20").await.status, 200);
    }
    assert_eq!(check(&channel, "/closed", "192.0.2.20").await.status, 429);

    assert_eq!(fallbacks(&running).await, 0, "no {FALLBACK_LOG:?} line");
    assert!(assert_every_key_has_a_ttl(&[port]).await >= 1);
}
