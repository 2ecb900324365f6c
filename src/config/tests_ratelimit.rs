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
