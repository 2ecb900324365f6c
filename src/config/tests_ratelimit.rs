//! The `rate_limits`, `rate_limit_service` and route rate-limit keys.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::{Config, ConfigError, LimitAlgorithm};

fn file(rate_limits: &str, extra: &str, route: &str) -> String {
    format!(
        "provider:
  issuer: http://127.0.0.1:3000
  audiences: [a]
redis:
  url: redis://127.0.0.1:7000
  cluster: true
rate_limits:
{rate_limits}
{extra}
routes:
  - name: r
    prefix: /r
    public: true
{route}
"
    )
}

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(Path::new("gatehouse.yaml"), text, HashMap::new())
}

fn problems(text: &str) -> String {
    match load(text) {
        Ok(_) => panic!("expected the file to be refused:\n{text}"),
        Err(err) => err.to_string(),
    }
}

#[test]
fn a_policy_with_several_limits_tiers_cost_and_group_compiles() {
    let text = file(
        "  api:
    algorithm: gcra
    shadow: true
    x_ratelimit_headers: true
    limits:
      - {requests: 10, window_seconds: 1, burst: 20}
      - {requests: 1000, window_seconds: 3600}
    tiers:
      gold:
        limits: [{requests: 100, window_seconds: 1}]",
        "clients:
  app: {tier: gold}
rate_limit_service:
  descriptors:
    - domain: edge
      entries: [{key: remote_address}, {key: path, value: /r}]
      rate_limit: api",
        "    rate_limit: api\n    rate_limit_cost: 5\n    rate_limit_group: writes",
    );
    let config = load(&text).expect("valid");

    let limit = config.routes[0].rate_limit.as_ref().expect("a limit");
    assert_eq!((limit.cost, limit.group.as_deref()), (5, Some("writes")));
    let policy = &limit.policy;
    assert_eq!(policy.algorithm, LimitAlgorithm::Gcra);
    assert!(policy.shadow && policy.x_ratelimit_headers);
    assert_eq!(policy.limits.len(), 2);
    assert_eq!(policy.limits[0].burst, 20);
    assert_eq!(policy.limits[1].burst, 1000, "burst defaults to requests");
    assert_eq!(policy.limits[1].window, Duration::from_secs(3600));
    assert_eq!(policy.limits_for(Some("gold")).1[0].requests, 100);
    assert_eq!(config.clients["app"].tier.as_deref(), Some("gold"));
    assert!(config.redis.as_ref().expect("redis").cluster);
    assert_eq!(
        config.descriptors[0].entries[1],
        ("path".to_owned(), Some("/r".to_owned()))
    );
}

#[test]
fn inconsistent_policies_are_refused_with_their_key() {
    let cases = [
        (
            "  p: {requests: 5}",
            "requests and window_seconds go together",
        ),
        (
            "  p: {requests: 5, window_seconds: 1, limits: [{requests: 1, window_seconds: 2}]}",
            "give either requests and window_seconds, or limits",
        ),
        (
            "  p: {failure_mode: open}",
            "a policy needs at least one limit",
        ),
        ("  p: {limits: []}", "at least one limit is required"),
        (
            "  p: {requests: 5, window_seconds: 1, burst: 9, algorithm: fixed_window}",
            "burst applies to the gcra algorithm only",
        ),
        (
            "  p: {limits: [{requests: 1, window_seconds: 2}, {requests: 3, window_seconds: 2}]}",
            "two limits have the same window",
        ),
        (
            "  p: {requests: 5, window_seconds: 99999999}",
            "window_seconds must be at most",
        ),
        (
            "  p: {requests: 5, window_seconds: 1, algorithm: sliding}",
            "unknown variant",
        ),
    ];

    for (policy, expected) in cases {
        let err = problems(&file(policy, "", "    rate_limit: p"));
        assert!(err.contains("rate_limits.p"), "{policy}: {err}");
        assert!(err.contains(expected), "{policy}: {err}");
    }
}

#[test]
fn costs_tiers_and_descriptors_must_name_what_exists() {
    let policy = "  p: {requests: 5, window_seconds: 1}";

    let err = problems(&file(
        policy,
        "",
        "    rate_limit: p\n    rate_limit_cost: 6",
    ));
    assert!(
        err.contains("gatehouse.yaml:15: routes[0].rate_limit_cost"),
        "{err}"
    );
    let err = problems(&file(
        policy,
        "",
        "    rate_limit: p\n    rate_limit_cost: 0",
    ));
    assert!(err.contains("must be at least 1"), "{err}");

    let err = problems(&file(policy, "clients:\n  app: {tier: gold}", ""));
    assert!(
        err.contains("clients.app.tier: no rate limit defines tier \"gold\""),
        "{err}"
    );

    let service = "rate_limit_service:
  descriptors:
    - {domain: edge, entries: [{key: k}], rate_limit: nope}";
    let err = problems(&file(policy, service, ""));
    assert!(
        err.contains("rate_limit_service.descriptors[0].rate_limit"),
        "{err}"
    );
}

/// A file with one public, rate-limited route, `redis` as the body of its
/// `redis:` section and `provider` as the body of its `provider:` section.
fn budgets(redis: &str, provider: &str) -> String {
    format!(
        "provider:
  issuer: http://127.0.0.1:3000
  audiences: [a]
{provider}
redis:
  url: redis://127.0.0.1:7000
{redis}
client_address_header: x-client-address
rate_limits:
  p: {{requests: 5, window_seconds: 1}}
routes:
  - {{name: r, prefix: /r, public: true, rate_limit: p}}
"
    )
}

#[test]
fn the_redis_budget_is_bounded_and_fits_with_the_token_checks_in_a_check() {
    let config = load(&budgets("", "")).expect("the default budget");
    let redis = config.redis.expect("redis");
    assert_eq!(redis.timeout, Duration::from_millis(20));

    for bad in [0, 501] {
        let err = problems(&budgets(&format!("  timeout_ms: {bad}"), ""));
        assert!(
            err.contains("gatehouse.yaml:7: redis.timeout_ms: must be between 1 and 500"),
            "{bad}: {err}"
        );
    }

    // Discovery and JWKS at 300 ms each, then 500 ms for Redis: 1100 ms.
    let err = problems(&budgets("  timeout_ms: 500", ""));
    assert!(
        err.contains("gatehouse.yaml:7: redis.timeout_ms: 500 ms"),
        "{err}"
    );
    assert!(
        err.contains("slowest token check (600 ms: discovery and JWKS"),
        "{err}"
    );
    assert!(err.contains("Envoy's 1000 ms ext_authz timeout"), "{err}");

    // Faster fetches, or one fetch with `jwks_uri`, leave room for 500 ms.
    let fast = budgets("  timeout_ms: 500", "  fetch_timeout_ms: 200");
    assert_eq!(
        load(&fast)
            .expect("200 + 200 + 500")
            .redis
            .expect("redis")
            .timeout,
        Duration::from_millis(500)
    );
    let direct = "  jwks_uri: http://127.0.0.1:3000/jwks";
    load(&budgets("  timeout_ms: 500", direct)).expect("300 + 500");

    // The longest introspection call with more than 100 ms for Redis.
    let introspection = "  jwks_uri: http://127.0.0.1:3000/jwks
  introspection:
    endpoint: http://127.0.0.1:3000/introspect
    client_id: gatehouse
    client_secret: secret
    timeout_ms: 800";
    load(&budgets("  timeout_ms: 100", introspection)).expect("800 + 100");
    let err = problems(&budgets("  timeout_ms: 101", introspection));
    assert!(
        err.contains("slowest token check (800 ms: an introspection call"),
        "{err}"
    );
}

#[test]
fn the_assumed_ext_authz_timeout_is_the_one_envoy_is_given() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/envoy/envoy.yaml");
    let envoy = std::fs::read_to_string(path).expect("envoy/envoy.yaml");

    let filter = envoy
        .split("- name: envoy.filters.http.ext_authz")
        .nth(1)
        .expect("the ext_authz filter");
    let timeout = filter
        .lines()
        .find_map(|line| line.trim().strip_prefix("timeout: "))
        .expect("its grpc_service timeout");
    let assumed = format!("{}s", super::EXT_AUTHZ_TIMEOUT.as_secs());
    assert_eq!(timeout, assumed);
}

#[test]
fn names_in_keys_and_headers_are_plain_tokens() {
    let cases = [
        (
            "  \"a b\": {requests: 5, window_seconds: 1}",
            "",
            "rate_limits.a b: \"a b\" is not a valid name",
        ),
        (
            "  'x\";q=9': {requests: 5, window_seconds: 1}",
            "",
            "is not a valid name",
        ),
        (
            "  p:
    requests: 5
    window_seconds: 1
    tiers:
      \"gold|1\": {limits: [{requests: 9, window_seconds: 1}]}",
            "",
            "rate_limits.p.tiers.gold|1: \"gold|1\" is not a valid name",
        ),
        (
            "  p: {requests: 5, window_seconds: 1}",
            "    rate_limit: p\n    rate_limit_group: \"w}\"",
            "routes[0].rate_limit_group: \"w}\" is not a valid name",
        ),
        (
            "  p: {requests: 5, window_seconds: 1}",
            "    rate_limit: p\n    rate_limit_group: _",
            "(not '_' alone)",
        ),
    ];
    for (policy, route, expected) in cases {
        let err = problems(&file(policy, "", route));
        assert!(err.contains(expected), "{policy} {route}: {err}");
    }

    let good = file(
        "  api.v2-read_only: {requests: 5, window_seconds: 1}",
        "",
        "    rate_limit: api.v2-read_only\n    rate_limit_group: writes.eu-1",
    );
    load(&good).expect("letters, digits, '_', '.' and '-' are fine");
}

#[test]
fn a_burst_that_takes_more_than_ten_years_to_come_back_is_refused() {
    let err = problems(&file(
        "  p: {requests: 1, window_seconds: 31536000, burst: 11}",
        "",
        "",
    ));
    assert!(err.contains("rate_limits.p.limits"), "{err}");
    assert!(err.contains("must be at most 316224000 seconds"), "{err}");

    load(&file(
        "  p: {requests: 1, window_seconds: 31536000, burst: 10}",
        "",
        "",
    ))
    .expect("ten bursts of a year");
}

#[test]
fn a_public_limit_without_the_client_address_header_is_warned_about() {
    let counted = "    rate_limit: p";
    let text = file("  p: {requests: 5, window_seconds: 1}", "", counted);
    let config = load(&text).expect("valid, with a warning");
    let warnings = config.rendered_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("gatehouse.yaml:14: routes[0].rate_limit: this public route"),
        "{warnings:?}"
    );
    assert!(
        warnings[0].contains("client_address_header"),
        "{warnings:?}"
    );

    let with_header = file(
        "  p: {requests: 5, window_seconds: 1}",
        "client_address_header: x-client-address",
        counted,
    );
    assert!(load(&with_header).expect("valid").warnings.is_empty());

    let unlimited = file("  p: {requests: 5, window_seconds: 1}", "", "");
    assert!(load(&unlimited).expect("valid").warnings.is_empty());
}

/// A file without `redis`, `section` at line 4.
fn without_redis(section: &str) -> String {
    format!(
        "provider:
  issuer: http://127.0.0.1:3000
  audiences: [a]
{section}
routes:
  - {{name: r, prefix: /r}}
"
    )
}

#[test]
fn the_memory_store_is_bounded_by_default_and_within_bounds_when_set() {
    let config = load(&without_redis("")).expect("no memory_store section");
    assert_eq!(config.memory_store.max_entries, 100_000);

    let config = load(&without_redis("memory_store: {max_entries: 250000}")).expect("in bounds");
    assert_eq!(config.memory_store.max_entries, 250_000);
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);

    for bad in [0, 999, 10_000_001] {
        let text = without_redis(&format!("memory_store:\n  max_entries: {bad}"));
        let err = problems(&text);
        assert!(
            err.contains(
                "gatehouse.yaml:5: memory_store.max_entries: must be between 1000 and 10000000"
            ),
            "{bad}: {err}"
        );
    }

    let err = problems(&without_redis("memory_store: {max_keys: 5}"));
    assert!(err.contains("max_keys"), "unknown keys are errors: {err}");
}

#[test]
fn a_memory_store_beside_redis_is_warned_about() {
    let text = file(
        "  p: {requests: 5, window_seconds: 1}",
        "client_address_header: x-client-address\nmemory_store:\n  max_entries: 5000",
        "",
    );
    let config = load(&text).expect("valid, with a warning");
    let warnings = config.rendered_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("gatehouse.yaml:11: memory_store.max_entries: has no effect"),
        "{warnings:?}"
    );
}
