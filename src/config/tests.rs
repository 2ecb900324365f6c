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

    assert_eq!(config.providers[0].issuer, "http://127.0.0.1:3000");
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

    assert_eq!(config.providers[0].issuer, "https://id.example.com");
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
    assert!(err.contains("need hmac_secret"), "{err}");
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

    assert!(
        err.contains("profiles.mobile.routes.vehicles[1].rename: rename path `b[]` ends in `[]`"),
        "{err}"
    );
}

#[test]
fn step_problems_and_parse_errors_count_steps_alike() {
    // A path that does not parse is a serde error inside the first step...
    let parse = problems(&GOOD.replace("        - keep: [id]", "        - keep: [\"a..b\"]"));
    assert!(
        parse.contains("profiles.mobile.routes.vehicles[0].keep[0]"),
        "{parse}"
    );

    // ...and a step that parses but cannot work is named the same way.
    let check = problems(&GOOD.replace("        - keep: [id]", "        - keep: []"));
    assert!(
        check.contains("profiles.mobile.routes.vehicles[0].keep: keep lists no paths"),
        "{check}"
    );
}

#[test]
fn overlapping_rename_is_refused_naming_profile_and_step() {
    for (from, to) in [("a", "a.b"), ("a.b", "a")] {
        let step = format!("        - keep: [id]\n        - rename: {{from: {from}, to: {to}}}");
        let err = problems(&GOOD.replace("        - keep: [id]", &step));

        let expected = format!(
            "profiles.mobile.routes.vehicles[1].rename: rename from `{from}` to `{to}` overlaps"
        );
        assert!(err.contains(&expected), "{err}");
    }
}

#[test]
fn bad_reshape_path_is_refused_at_load() {
    let err = problems(&GOOD.replace("        - keep: [id]", "        - keep: [\"a..b\"]"));

    assert!(err.contains("a..b"), "{err}");
    assert!(err.contains("profiles.mobile.routes.vehicles"), "{err}");
}

// === profiles, request headers and composites ===

#[test]
fn allowed_profiles_must_exist() {
    let text = GOOD.replace(
        "    profile: mobile\n",
        "    profile: mobile\n    allowed_profiles: [tablet]\n",
    );
    let message = problems(&text);

    assert!(
        message.contains("clients.demo-mobile.allowed_profiles[0]: no profile named \"tablet\""),
        "{message}"
    );
}

#[test]
fn request_headers_refuse_managed_names_and_unknown_placeholders() {
    let text = GOOD.replace(
        "    rate_limit: standard\n",
        r#"    rate_limit: standard
    request_headers:
      set: {authorization: x, x-who: "{user}"}
      remove: ["bad name"]
"#,
    );
    let message = problems(&text);

    assert!(
        message
            .contains("routes[0].request_headers.set: \"authorization\" is managed by Gatehouse"),
        "{message}"
    );
    assert!(
        message.contains("unknown placeholder \"{user}\""),
        "{message}"
    );
    assert!(
        message.contains("\"bad name\" is not a valid header name"),
        "{message}"
    );
}

/// GOOD with `request_headers` (YAML lines at route depth) on `vehicles`,
/// and a `tokens` section in front.
fn with_route_headers(headers: &str, tokens: &str) -> String {
    let text = GOOD.replace(
        "    rate_limit: standard\n",
        &format!("    rate_limit: standard\n    request_headers:\n{headers}"),
    );
    format!("{tokens}{text}")
}

#[test]
fn request_headers_refuse_identity_names_except_setting_route_and_profile() {
    let key = "routes[0].request_headers";
    for (headers, field, name) in [
        (
            "      add: {x-gatehouse-profile: p}\n",
            "add",
            "x-gatehouse-profile",
        ),
        (
            "      add: {X-Gatehouse-Route: r}\n",
            "add",
            "x-gatehouse-route",
        ),
        (
            "      set: {x-gatehouse-scopes: all}\n",
            "set",
            "x-gatehouse-scopes",
        ),
        (
            "      set: {x-gatehouse-client-id: c}\n",
            "set",
            "x-gatehouse-client-id",
        ),
        (
            "      remove: [x-gatehouse-subject]\n",
            "remove",
            "x-gatehouse-subject",
        ),
        (
            "      remove: [x-gatehouse-route]\n",
            "remove",
            "x-gatehouse-route",
        ),
    ] {
        let message = problems(&with_route_headers(headers, ""));
        let expected = format!("{key}.{field}: \"{name}\" is an identity header");
        assert!(message.contains(&expected), "{expected}: {message}");
    }

    // Names `tokens.forward` configures are refused in every form, even the
    // two a route may otherwise set.
    let tokens = "tokens:\n  forward:\n    claims: {tenant: x-tenant, team: x-gatehouse-route}\n";
    for (headers, field, name) in [
        ("      add: {x-tenant: acme}\n", "add", "x-tenant"),
        ("      set: {x-tenant: acme}\n", "set", "x-tenant"),
        ("      remove: [x-tenant]\n", "remove", "x-tenant"),
        (
            "      set: {x-gatehouse-route: r}\n",
            "set",
            "x-gatehouse-route",
        ),
    ] {
        let message = problems(&with_route_headers(headers, tokens));
        let expected = format!("{key}.{field}: \"{name}\" is forwarded by tokens.forward");
        assert!(message.contains(&expected), "{expected}: {message}");
    }

    // The documented use: the route and profile names, set.
    let text = with_route_headers(
        "      set: {x-gatehouse-profile: \"{profile}\", x-gatehouse-route: \"{route}\"}\n",
        "",
    );
    let config = load(&text, &[("REDIS_URL", "redis://127.0.0.1:6379")]).expect("valid");
    let route = config.route("vehicles").expect("route");
    let set: Vec<&str> = route
        .request_headers
        .set
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(set, ["x-gatehouse-profile", "x-gatehouse-route"]);
}

#[test]
fn request_headers_and_composites_compile() {
    let text = GOOD
        .replace(
            "    rate_limit: standard\n",
            r#"    rate_limit: standard
    request_headers:
      add: {X-Profile: "{profile}"}
      remove: [x-debug]
    composite:
      merge: top_level
      parts:
        - {key: a, path: /a, timeout_ms: 900}
        - {key: b, path: /b}
"#,
        )
        .replace(
            "profiles:\n",
            "composite:\n  upstream: http://127.0.0.1:10002/\nprofiles:\n",
        );
    let config = load(&text, &[("REDIS_URL", "redis://127.0.0.1:6379")]).expect("valid");

    let route = config.route("vehicles").expect("route");
    let headers = &route.request_headers;
    assert_eq!(
        headers.add,
        vec![("x-profile".to_owned(), "{profile}".to_owned())]
    );
    assert_eq!(headers.remove, vec!["x-debug".to_owned()]);

    let composite = route.composite.as_ref().expect("composite");
    assert_eq!(composite.parts[0].url, "http://127.0.0.1:10002/a");
    assert_eq!(composite.parts[1].timeout.as_millis(), 300);
    assert_eq!(composite.budget.as_millis(), 900);
}

#[test]
fn composites_need_an_upstream_and_sane_parts() {
    let text = GOOD.replace(
        "    rate_limit: standard\n",
        r#"    rate_limit: standard
    composite:
      parts:
        - {key: a, path: a, timeout_ms: 5000}
        - {key: a, path: /b}
"#,
    );
    let message = problems(&text);

    assert!(
        message.contains("needs the top-level composite.upstream"),
        "{message}"
    );
    assert!(
        message.contains("routes[0].composite.parts[0].path: must start with '/'"),
        "{message}"
    );
    assert!(
        message.contains("parts[0].timeout_ms: must be between 1 and 1500 ms"),
        "{message}"
    );
    assert!(
        message.contains("parts[1].key: duplicate part key"),
        "{message}"
    );
}

#[test]
fn a_policy_can_take_tiers_from_a_claim() {
    let text = GOOD.replace(
        "    failure_mode: open\n",
        "    failure_mode: open\n    tier_claim: plan\n    tiers:\n      gold:\n        limits:\n          - {requests: 50, window_seconds: 60}\n",
    );
    let config = load(&text, &[("REDIS_URL", "redis://127.0.0.1:6379")]).expect("valid file");
    let policy = &config.routes[0].rate_limit.as_ref().expect("policy").policy;

    assert_eq!(policy.tier_claim.as_deref(), Some("plan"));
    assert_eq!(policy.limits_for(Some("gold")).0, Some("gold"));
}

#[test]
fn quoted_and_block_references_are_refused_with_line_and_key() {
    let vars = [
        ("ISSUER", "https://id.example.com"),
        ("REDIS_URL", "redis://r:6379"),
        ("PREFIX", "gh"),
    ];
    let issuer = "issuer: ${ISSUER:-http://127.0.0.1:3000}";
    let prefix = "key_prefix: ${PREFIX:-gatehouse}";
    let cases = [
        (issuer, "issuer: \"${ISSUER}\"", "7: provider.issuer"),
        (issuer, "issuer: '${ISSUER}'", "7: provider.issuer"),
        // A block value's line is its first line of text, as elsewhere.
        (issuer, "issuer: |\n    ${ISSUER}", "8: provider.issuer"),
        (issuer, "issuer: >-\n    ${ISSUER}", "8: provider.issuer"),
        (
            prefix,
            "key_prefix: \"gh-${PREFIX}\"",
            "11: redis.key_prefix",
        ),
        (
            "audiences: [https://api.gatehouse.test]",
            "audiences: [a, \"${AUDIENCE:-b}\"]",
            "8: provider.audiences[1]",
        ),
        ("  demo-mobile:", "  ${CLIENT}:", "23: clients.${CLIENT}"),
    ];

    for (from, to, at) in cases {
        let text = GOOD.replace(from, to);
        assert_ne!(text, GOOD, "{from}");
        let err = load(&text, &vars).expect_err(to).to_string();

        // Other rules may refuse the text too (an issuer that is no URL).
        let expected = format!("gatehouse.yaml:{at}: `${{` is not expanded");
        assert!(
            err.lines().any(|line| line.starts_with(&expected)),
            "{to}: {err}"
        );
    }
}

#[test]
fn every_unexpanded_reference_is_reported() {
    let text = GOOD
        .replace(
            "key_prefix: ${PREFIX:-gatehouse}",
            "key_prefix: \"${PREFIX}\"",
        )
        .replace("    prefix: /status", "    prefix: '/${STATUS}'");
    let err = problems(&text);

    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].starts_with("gatehouse.yaml:11: redis.key_prefix: "),
        "{err}"
    );
    assert!(
        lines[1].starts_with("gatehouse.yaml:32: routes[1].prefix: "),
        "{err}"
    );
}

#[test]
fn other_dollars_stay_literal() {
    let vars = [("REDIS_URL", "redis://r:6379")];

    // The escape gives the text `${PREFIX}`; a quoted `$` without a brace
    // is an ordinary character.
    for (written, value) in [("$${PREFIX}", "${PREFIX}"), ("\"pa$word\"", "pa$word")] {
        let text = GOOD.replace("${PREFIX:-gatehouse}", written);
        let config = load(&text, &vars).expect(written);

        assert_eq!(config.redis.expect("redis").key_prefix, value);
    }
}
