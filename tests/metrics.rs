//! The Prometheus endpoint through the real stack: requests go through Envoy
//! to Gatehouse, then `/metrics` is scraped over HTTP as Prometheus would,
//! and the counts must match what was sent, exactly.
//!
//! One test drives the whole stack, so that nothing else moves the counts
//! between the two scrapes.

mod support;

use reqwest::StatusCode;
use support::forge::{self, OPAQUE_RESOURCE};
use support::scrape::{parse_sample, scrape};
use support::{MOBILE, PARTNER, Stack, WEB};

const DECISIONS: &str = "gatehouse_check_decisions_total";
const LIMITS: &str = "gatehouse_ratelimit_decisions_total";

async fn get(stack: &Stack, path: &str, token: Option<&str>) -> StatusCode {
    let mut request = reqwest::Client::new().get(stack.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request through envoy");
    let status = response.status();

    // The whole body, so that ext_proc has finished with the response.
    response.bytes().await.expect("response body");
    status
}

#[tokio::test]
async fn scrape_counts_what_was_allowed_denied_and_limited_and_names_no_client() {
    let stack = Stack::start();
    let endpoint = stack.token_endpoint();
    let scope = "vehicles:read stations:read";
    let web = support::token(&endpoint, WEB, scope).await;
    let mobile = support::token(&endpoint, MOBILE, scope).await;
    let opaque = forge::token_for(stack.provider_port, PARTNER, scope, OPAQUE_RESOURCE).await;
    let admin_before = forge::gatehouse_counters(stack.gatehouse_ports.admin).await;
    let before = scrape(stack.metrics_port).await;
    let address = format!("127.0.0.1:{}", stack.metrics_port);
    let log = stack.gatehouse.log();
    let started = log
        .lines()
        .find(|line| line.contains("serving metrics for prometheus"));
    assert!(started.is_some_and(|line| line.contains(&address)), "{log}");

    // Allowed: one plain, one reshaped for the mobile profile.
    assert_eq!(get(&stack, "/vehicles", Some(&web)).await, StatusCode::OK);
    assert_eq!(
        get(&stack, "/vehicles", Some(&mobile)).await,
        StatusCode::OK
    );

    // Denied before any limit is counted.
    let denied = get(&stack, "/vehicles", None).await;
    assert_eq!(denied, StatusCode::UNAUTHORIZED);

    // The stations policy admits a burst of 5 per client, then refuses.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(get(&stack, "/stations", Some(&web)).await);
    }
    let mut expected = vec![StatusCode::OK; 5];
    expected.push(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(statuses, expected);

    // An opaque token twice: the second answer comes from the cache.
    for _ in 0..2 {
        assert_eq!(
            get(&stack, "/stations", Some(&opaque)).await,
            StatusCode::OK
        );
    }

    let after = scrape(stack.metrics_port).await;
    let d = |name: &str, labels: &[(&str, &str)]| after.delta(&before, name, labels);

    let decision =
        |route, decision, reason| [("route", route), ("decision", decision), ("reason", reason)];
    assert_eq!(d(DECISIONS, &decision("vehicles", "allow", "ok")), 2.0);
    assert_eq!(
        d(DECISIONS, &decision("vehicles", "deny", "missing_token")),
        1.0
    );
    assert_eq!(d(DECISIONS, &decision("stations", "allow", "ok")), 7.0);
    assert_eq!(
        d(DECISIONS, &decision("stations", "deny", "rate_limited")),
        1.0
    );

    let outcome = |policy, outcome| [("policy", policy), ("outcome", outcome)];
    assert_eq!(d(LIMITS, &outcome("standard", "allowed")), 2.0);
    assert_eq!(d(LIMITS, &outcome("stations", "allowed")), 7.0);
    assert_eq!(d(LIMITS, &outcome("stations", "limited")), 1.0);
    assert_eq!(d(LIMITS, &outcome("stations", "failed_closed")), 0.0);

    // Every Check is timed under its route; every counted request is one
    // Redis call.
    let checks = "gatehouse_check_duration_seconds_count";
    assert_eq!(d(checks, &[("route", "vehicles")]), 3.0);
    assert_eq!(d(checks, &[("route", "stations")]), 8.0);
    let calls = "gatehouse_ratelimit_store_duration_seconds_count";
    assert_eq!(d(calls, &[("store", "redis")]), 10.0);
    let histogram = "gatehouse_check_duration_seconds";
    assert_eq!(after.kind(histogram), Some("histogram"), "{}", after.text);
    let sum = "gatehouse_check_duration_seconds_sum";
    assert!(d(sum, &[("route", "stations")]) > 0.0, "{}", after.text);
    let bucket = "gatehouse_check_duration_seconds_bucket";
    assert_eq!(d(bucket, &[("route", "stations"), ("le", "+Inf")]), 8.0);

    // Only the mobile response was reshaped, and only it was timed.
    assert_eq!(d("gatehouse_reshaped_total", &[]), 1.0);
    assert_eq!(d("gatehouse_reshape_duration_seconds_count", &[]), 1.0);

    // Two JWTs verified once each, then found in the cache; the admin API
    // reports the very same counters.
    assert_eq!(d("gatehouse_token_cache_misses_total", &[]), 2.0);
    assert_eq!(d("gatehouse_token_cache_hits_total", &[]), 6.0);
    let admin = forge::gatehouse_counters(stack.gatehouse_ports.admin).await;
    for name in ["token_cache_hits", "token_cache_misses", "reshaped"] {
        let exported = after.value(&format!("gatehouse_{name}_total"), &[]);
        assert_eq!(exported, admin[name] as f64, "{name}");
        assert!(
            admin[name] > admin_before[name],
            "{name} grew in the admin API"
        );
    }

    // One introspection call: the second use of the token was cached.
    let calls = "gatehouse_introspection_requests_total";
    assert_eq!(d(calls, &[("result", "active")]), 1.0);
    let fetched = [("provider", "0"), ("result", "ok")];
    assert!(after.value("gatehouse_jwks_fetches_total", &fetched) >= 1.0);

    // Labels come from the configuration and the code, never the request.
    let secrets = [web.as_str(), mobile.as_str(), opaque.as_str()];
    let clients = [WEB.0, MOBILE.0, PARTNER.0];
    for sample in &after.samples {
        assert!(sample.name.starts_with("gatehouse_"), "{sample:?}");
        for value in sample.labels.values() {
            let leaks = secrets.iter().chain(&clients).any(|s| value.contains(s));
            assert!(!leaks && !value.starts_with('/'), "{sample:?}");
        }
    }
}

#[test]
fn sample_lines_parse_with_and_without_labels() {
    let line = r#"gatehouse_x_total{route="a",reason="say \"hi\"\\"} 3"#;
    let sample = parse_sample(line).expect("a sample");
    assert_eq!(sample.name, "gatehouse_x_total");
    assert_eq!(sample.labels["route"], "a");
    assert_eq!(sample.labels["reason"], r#"say "hi"\"#);
    assert_eq!(sample.value, 3.0);

    let sample = parse_sample("gatehouse_y_seconds_sum 0.25").expect("a sample");
    assert!(sample.labels.is_empty());
    assert_eq!(sample.value, 0.25);
    assert_eq!(parse_sample("gatehouse_z{route=\"a} 1"), None);
}
