use std::collections::HashMap;
use std::path::Path;

use super::{Config, ConfigError, FailureMode};

const GOOD: &str = r#"
server:
  listen: 127.0.0.1:50051
  admin_listen: 127.0.0.1:50052
  drain_seconds: 2
provider:
  issuer: ${ISSUER:-http://127.0.0.1:3000}
  audiences: [https://api.gatehouse.test]
redis:
  url: ${REDIS_URL}
  key_prefix: ${PREFIX:-gatehouse}
rate_limits:
  standard:
    requests: 5
    window_seconds: 60
    failure_mode: open
profiles:
  mobile:
    routes:
      vehicles:
        - keep: [id]
clients:
  demo-mobile:
    profile: mobile
routes:
  - name: vehicles
    prefix: /vehicles/
    methods: [get]
    scopes: [vehicles:read]
    rate_limit: standard
  - name: status
    prefix: /status
    public: true
"#;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn load(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_yaml(Path::new("gatehouse.yaml"), text, env(vars))
}

fn problems(text: &str) -> String {
    match load(text, &[("REDIS_URL", "redis://127.0.0.1:6379")]) {
        Ok(_) => panic!("expected the file to be refused"),
        Err(err) => err.to_string(),
    }
}

#[test]
fn good_file_compiles_with_expansion_and_defaults() {
    let config = load(GOOD, &[("REDIS_URL", "redis://:pw@127.0.0.1:6379")]).expect("valid file");

    assert_eq!(config.provider.issuer, "http://127.0.0.1:3000");
    assert_eq!(config.routes[0].prefix, "/vehicles");
    assert_eq!(config.routes[0].methods, ["GET"]);
    let policy = config.routes[0].rate_limit.as_ref().expect("policy");
    assert_eq!(policy.policy.limits[0].requests, 5);
    assert_eq!(policy.cost, 1);
    assert_eq!(policy.policy.failure_mode, FailureMode::Open);
    assert!(config.routes[1].public);
    assert!(config.steps("mobile", "vehicles").is_some());
    assert!(config.steps("mobile", "status").is_none());

    let redis = config.redis.as_ref().expect("redis");
    assert_eq!(redis.url, "redis://:pw@127.0.0.1:6379");
    assert!(
        !format!("{redis:?}").contains("pw"),
        "Debug must hide the password"
    );
}

#[test]
fn variable_overrides_default() {
    let vars = [
        ("ISSUER", "https://id.example.com"),
        ("REDIS_URL", "redis://r:6379"),
    ];
    let config = load(GOOD, &vars).expect("valid file");

    assert_eq!(config.provider.issuer, "https://id.example.com");
}

#[test]
fn unset_variable_without_default_is_an_error() {
    let err = load(GOOD, &[]).expect_err("REDIS_URL is unset").to_string();

    assert!(err.contains("REDIS_URL"), "{err}");
    assert!(err.starts_with("gatehouse.yaml:10:"), "{err}");
}

#[test]
fn variable_cannot_inject_keys() {
    let vars = [("REDIS_URL", "redis://r:6379"), ("PREFIX", "gh\nrogue: 1")];
    let config = load(GOOD, &vars).expect("the value stays one string");

    assert_eq!(config.redis.expect("redis").key_prefix, "gh\nrogue: 1");
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let text = GOOD.replace("    scopes: [vehicles:read]", "    scope: [vehicles:read]");
    let err = problems(&text);

    assert!(err.starts_with("gatehouse.yaml:29: routes[0]"), "{err}");
    assert!(err.contains("scope"), "{err}");
}

#[test]
fn unknown_top_level_key_is_an_error() {
    let err = problems(&format!("{GOOD}\nlisten: 1\n"));

    assert!(err.contains("listen"), "{err}");
    assert!(err.contains("gatehouse.yaml:"), "{err}");
}

#[test]
fn wrong_type_names_the_key() {
    let text = GOOD.replace("requests: 5", "requests: many");
    let err = problems(&text);

    assert!(
        err.starts_with("gatehouse.yaml:14: rate_limits.standard.requests"),
        "{err}"
    );
}

#[test]
fn zero_requests_is_refused() {
    let err = problems(&GOOD.replace("requests: 5", "requests: 0"));

    assert!(err.contains("rate_limits.standard.requests"), "{err}");
}

#[test]
fn references_to_missing_names_are_all_reported() {
    let text = GOOD
        .replace("rate_limit: standard", "rate_limit: premium")
        .replace("    profile: mobile", "    profile: tablet")
        .replace("      vehicles:\n", "      trucks:\n");
    let err = problems(&text);

    assert!(
        err.contains(":30: routes[0].rate_limit: no rate limit named \"premium\""),
        "{err}"
    );
    assert!(err.contains(":24: clients.demo-mobile.profile"), "{err}");
    assert!(err.contains("profiles.mobile.routes.trucks"), "{err}");
    assert_eq!(err.lines().count(), 3, "{err}");
}

#[test]
fn bad_values_are_refused() {
    for (from, to, key) in [
        ("prefix: /vehicles/", "prefix: vehicles", "routes[0].prefix"),
        ("prefix: /status", "prefix: /a//b", "routes[1].prefix"),
        ("methods: [get]", "methods: [FETCH]", "routes[0].methods"),
        (
            "listen: 127.0.0.1:50051",
            "listen: nowhere",
            "server.listen",
        ),
        (
            "issuer: ${ISSUER:-http://127.0.0.1:3000}",
            "issuer: ftp://x",
            "provider.issuer",
        ),
        (
            "audiences: [https://api.gatehouse.test]",
            "audiences: []",
            "provider.audiences",
        ),
        ("failure_mode: open", "failure_mode: maybe", "failure_mode"),
        ("  - name: status", "  - name: vehicles", "routes[1].name"),
    ] {
        let text = GOOD.replace(from, to);
        assert_ne!(text, GOOD, "replacement {from:?} did not apply");

        let err = problems(&text);
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[test]
fn hmac_algorithms_are_refused() {
    let text = GOOD.replace("  audiences:", "  algorithms: [RS256, HS256]\n  audiences:");
    let err = problems(&text);

    assert!(err.contains("provider.algorithms[1]: HMAC"), "{err}");
}

#[test]
fn syntax_error_reports_a_line() {
    let err = problems("provider: [\n");

    assert!(err.starts_with("gatehouse.yaml:"), "{err}");
}

#[test]
fn missing_file_is_reported() {
    let err = Config::load(Path::new("/nonexistent/gatehouse.yaml")).expect_err("no file");

    assert!(err.to_string().contains("/nonexistent/gatehouse.yaml"));
}

#[test]
fn bad_reshape_step_names_profile_route_and_step() {
    let text = GOOD.replace(
        "        - keep: [id]",
        "        - keep: [id]\n        - rename: {from: a, to: \"b[]\"}",
    );
    let err = problems(&text);

    assert!(err.contains("profiles.mobile.routes.vehicles"), "{err}");
    assert!(err.contains("step 2 (rename)"), "{err}");
}

#[test]
fn bad_reshape_path_is_refused_at_load() {
    let err = problems(&GOOD.replace("        - keep: [id]", "        - keep: [\"a..b\"]"));

    assert!(err.contains("a..b"), "{err}");
    assert!(err.contains("profiles.mobile.routes.vehicles"), "{err}");
}
