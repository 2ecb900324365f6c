//! Rate limits through the real Envoy: public clients behind one proxy told
//! apart by `x-forwarded-for`, and Envoy's own rate-limit filter using
//! Gatehouse as its rate-limit service.

mod limits;
mod support;

use std::process::Command;

use reqwest::StatusCode;
use support::free_port;

const RATE_LIMITS: &str = "  public: {requests: 2, window_seconds: 60}
  edge: {requests: 3, window_seconds: 60, x_ratelimit_headers: true}";

const ROUTES: &str =
    "  - {name: station-status, prefix: /stations/status, public: true, rate_limit: public}";

const DESCRIPTORS: &str = "rate_limit_service:
  descriptors:
    - domain: edge
      entries: [{key: remote_address}]
      rate_limit: edge
";

async fn get(port: u16, path: &str, forwarded_for: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .header("x-forwarded-for", forwarded_for)
        .send()
        .await
        .expect("request through envoy")
}

#[test]
fn the_rate_limit_filter_config_is_valid_for_envoy() {
    let config = support::root().join("envoy/ratelimit-filter.yaml");
    let output = Command::new(support::envoy_binary())
        .args(["--mode", "validate", "-c"])
        .arg(&config)
        .output()
        .expect("run envoy --mode validate");

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn public_clients_behind_one_proxy_get_separate_budgets() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (_redis, redis_port) = support::redis(dir.path());
    let (_vehicles, vehicles_port) = support::upstream(dir.path(), "vehicles");
    let (_stations, stations_port) = support::upstream(dir.path(), "stations");
    let yaml = limits::config("  url: ${REDIS_URL}", RATE_LIMITS, ROUTES);
    let running = limits::gatehouses(dir.path(), &yaml, 1, redis_port);

    // The shipped Envoy config, trusting one proxy in front of it.
    let (listener, admin) = (free_port(), free_port());
    let rendered = support::render_envoy_config(
        listener,
        admin,
        running[0].ports.grpc,
        vehicles_port,
        stations_port,
    )
    .replace("xff_num_trusted_hops: 0", "xff_num_trusted_hops: 1");
    let _envoy = limits::envoy(dir.path(), "envoy", &rendered, admin).await;

    // Both clients reach Envoy through the same proxy (the TCP peer is
    // 127.0.0.1 for both); the proxy appends each one's address.
    let alice = "203.0.113.1";
    let bob = "203.0.113.2";
    for _ in 0..2 {
        let response = get(listener, "/stations/status", alice).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let refused = get(listener, "/stations/status", alice).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);

    // A client cannot escape by prepending addresses of its own: only the
    // entry the trusted proxy appended counts.
    let spoofed = get(
        listener,
        "/stations/status",
        &format!("198.51.100.7, {alice}"),
    )
    .await;
    assert_eq!(spoofed.status(), StatusCode::TOO_MANY_REQUESTS);

    // Nor by sending the header Envoy passes the address in: Envoy
    // overwrites it.
    let forged = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{listener}/stations/status"))
        .header("x-forwarded-for", alice)
        .header("x-gatehouse-client-address", "10.9.9.9")
        .send()
        .await
        .expect("request through envoy");
    assert_eq!(forged.status(), StatusCode::TOO_MANY_REQUESTS);

    let response = get(listener, "/stations/status", bob).await;
    assert_eq!(response.status(), StatusCode::OK, "bob has his own budget");

    let keys = limits::keys_with_ttl(redis_port).await;
    assert!(keys.iter().any(|(key, _)| key.contains(alice)), "{keys:?}");
    assert!(keys.iter().any(|(key, _)| key.contains(bob)), "{keys:?}");
    assert!(limits::assert_every_key_has_a_ttl(&[redis_port]).await >= 2);
}

#[tokio::test]
async fn envoys_rate_limit_filter_counts_with_gatehouse() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (redis, redis_port) = support::redis(dir.path());
    let (_stations, stations_port) = support::upstream(dir.path(), "stations");
    let yaml = limits::config("  url: ${REDIS_URL}", RATE_LIMITS, ROUTES) + DESCRIPTORS;
    let running = limits::gatehouses(dir.path(), &yaml, 1, redis_port);

    let (listener, admin) = (free_port(), free_port());
    let template = std::fs::read_to_string(support::root().join("envoy/ratelimit-filter.yaml"))
        .expect("read envoy/ratelimit-filter.yaml");
    let rendered = limits::render_ports(
        &template,
        &[
            (10001, listener),
            (9902, admin),
            (50051, running[0].ports.grpc),
            (8082, stations_port),
        ],
    );
    let _envoy = limits::envoy(dir.path(), "envoy-ratelimit", &rendered, admin).await;

    let carol = "203.0.113.3";
    for n in 0..3 {
        let response = get(listener, "/stations", carol).await;
        assert_eq!(response.status(), StatusCode::OK, "request {n}");
    }
    let refused = get(listener, "/stations", carol).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let header = |name: &str| {
        refused
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let retry_after: u64 = header("retry-after")
        .expect("retry-after from gatehouse")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(header("x-ratelimit-remaining").as_deref(), Some("0"));

    // Another address has its own count.
    let other = get(listener, "/stations", "203.0.113.4").await;
    assert_eq!(other.status(), StatusCode::OK);

    let keys = limits::keys_with_ttl(redis_port).await;
    assert!(
        keys.iter()
            .any(|(key, _)| key.contains("remote_address=203.0.113.3")),
        "{keys:?}"
    );
    assert!(limits::assert_every_key_has_a_ttl(&[redis_port]).await >= 2);

    // Redis gone: the edge policy fails closed, Gatehouse answers UNAVAILABLE
    // and Envoy's filter turns that into 503.
    limits::stop_redis(redis, redis_port);
    let unavailable = get(listener, "/stations", "203.0.113.5").await;
    assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(limits::fallbacks(&running).await >= 1);
}
