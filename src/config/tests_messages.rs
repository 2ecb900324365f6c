//! What loading says about a bad file: a line for every rule about one
//! key, plain sentences instead of the parser's internals, the same words
//! whether or not the file expands variables, and strict scalar types.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::{Config, ConfigError};

/// A file that sets every number and boolean Gatehouse reads, one to a
/// line, each line marked with a comment naming the key.
const EVERY_SCALAR: &str = "server:
  drain_seconds: 5 # drain_seconds
provider:
  issuer: http://127.0.0.1:3000
  audiences: [api]
  leeway_seconds: 30 # leeway_seconds
  fetch_timeout_ms: 300 # fetch_timeout_ms
  refresh_seconds: 300 # refresh_seconds
  min_refresh_seconds: 30 # min_refresh_seconds
  max_refresh_seconds: 3600 # max_refresh_seconds
  min_refetch_seconds: 10 # min_refetch_seconds
  introspection:
    client_id: gatehouse
    client_secret: s3cret
    timeout_ms: 300 # introspection.timeout_ms
    cache_seconds: 60 # cache_seconds
    inactive_cache_seconds: 5 # inactive_cache_seconds
tokens:
  max_bytes: 8192 # max_bytes
  allow_query: false # allow_query
redis:
  url: redis://127.0.0.1:6379
  timeout_ms: 20 # redis.timeout_ms
  cluster: false # cluster
rate_limits:
  inline:
    requests: 10 # inline.requests
    window_seconds: 60 # inline.window_seconds
    burst: 20 # inline.burst
    shadow: false # shadow
    x_ratelimit_headers: true # x_ratelimit_headers
  listed:
    limits:
      - requests: 10 # limits.requests
        window_seconds: 1 # limits.window_seconds
        burst: 10 # limits.burst
reshape:
  max_body_bytes: 1048576 # max_body_bytes
composite:
  upstream: http://127.0.0.1:10002
profiles:
  mobile:
    reshape_errors: true # reshape_errors
    routes:
      vehicles:
        - drop_nulls:
            recursive: false # recursive
        - convert:
            path: energy
            factor: 0.001 # factor
            offset: 1 # offset
            round: 2 # round
routes:
  - name: vehicles
    prefix: /vehicles
    rate_limit: inline
    rate_limit_cost: 2 # rate_limit_cost
  - name: status
    prefix: /status
    public: true # public
  - name: overview
    prefix: /overview
    composite:
      parts:
        - key: vehicles
          path: /vehicles
          timeout_ms: 300 # part.timeout_ms
";

fn load(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let env = vars
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect::<HashMap<_, _>>();
    Config::from_yaml(Path::new("g.yaml"), text, env)
}

fn problems(text: &str, vars: &[(&str, &str)]) -> String {
    match load(text, vars) {
        Ok(_) => panic!("expected the file to be refused:\n{text}"),
        Err(err) => err.to_string(),
    }
}

/// `text` with `from` replaced, which must be there.
fn with(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in the file");
    text.replacen(from, to, 1)
}

/// The 1-based line of the first line of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    let index = text.lines().position(|line| line.contains(needle));
    index.unwrap_or_else(|| panic!("{needle:?} is not in the file")) + 1
}

#[test]
fn the_file_with_every_scalar_loads() {
    let config = load(EVERY_SCALAR, &[]).expect("valid");

    assert_eq!(config.server.drain, Duration::from_secs(5));
    assert_eq!(config.tokens.max_bytes, 8192);
    assert!(config.profile("mobile").expect("profile").reshape_errors);
    assert!(config.route("status").expect("route").public);
}

#[test]
fn every_number_and_boolean_refuses_a_quoted_value() {
    let marked: Vec<&str> = EVERY_SCALAR
        .lines()
        .filter(|line| line.contains(" # "))
        .collect();
    assert_eq!(marked.len(), 31, "the file names every scalar key");

    for line in marked {
        let (setting, _) = line.split_once(" # ").expect("a marked line");
        let (key, value) = setting.rsplit_once(": ").expect("key: value");
        let quoted = format!("{key}: \"{value}\"");
        let text = with(EVERY_SCALAR, setting, &quoted);

        let err = problems(&text, &[]);
        let at = format!("g.yaml:{}: ", line_of(&text, &quoted));
        assert!(err.starts_with(&at), "{quoted}: {err}");
        assert!(
            err.contains(&format!("string \"{value}\"")),
            "{quoted}: {err}"
        );
    }
}

#[test]
fn numbers_take_yaml_1_2_spellings_only() {
    let setting = "  timeout_ms: 20 # redis.timeout_ms";
    let line = line_of(EVERY_SCALAR, setting);

    for refused in [
        "'20'", "\" 20 \"", "2_0", "020", "20.0", "-20", "yes", "[20]",
    ] {
        let text = with(EVERY_SCALAR, setting, &format!("  timeout_ms: {refused}"));
        let err = problems(&text, &[]);
        let at = format!("g.yaml:{line}: redis.timeout_ms: ");
        assert!(err.starts_with(&at), "{refused}: {err}");
    }

    // YAML 1.2's core schema also writes integers these ways.
    for (accepted, millis) in [("0x14", 20), ("0o24", 20), ("+20", 20)] {
        let text = with(EVERY_SCALAR, setting, &format!("  timeout_ms: {accepted}"));
        let config = load(&text, &[]).expect(accepted);
        let redis = config.redis.expect("redis");
        assert_eq!(redis.timeout, Duration::from_millis(millis), "{accepted}");
    }
}

#[test]
fn booleans_are_true_or_false_unquoted() {
    let setting = "  allow_query: false # allow_query";
    let line = line_of(EVERY_SCALAR, setting);

    for refused in ["yes", "no", "on", "off", "y", "\"true\"", "'false'", "1"] {
        let text = with(EVERY_SCALAR, setting, &format!("  allow_query: {refused}"));
        let err = problems(&text, &[]);
        let at = format!("g.yaml:{line}: tokens.allow_query: invalid type: ");
        assert!(err.starts_with(&at), "{refused}: {err}");
        assert!(err.contains("expected true or false (unquoted)"), "{err}");
    }

    for (accepted, value) in [("true", true), ("True", true), ("FALSE", false)] {
        let text = with(EVERY_SCALAR, setting, &format!("  allow_query: {accepted}"));
        let config = load(&text, &[]).expect(accepted);
        assert_eq!(config.tokens.allow_query, value, "{accepted}");
    }
}

#[test]
fn expanded_numbers_and_booleans_keep_their_type() {
    let text = with(
        EVERY_SCALAR,
        "  drain_seconds: 5",
        "  drain_seconds: ${DRAIN:-7}",
    );
    let text = with(
        &text,
        "  allow_query: false",
        "  allow_query: ${QUERY:-true}",
    );

    let defaults = load(&text, &[]).expect("defaults");
    assert_eq!(defaults.server.drain, Duration::from_secs(7));
    assert!(defaults.tokens.allow_query);

    let set = load(&text, &[("DRAIN", "9"), ("QUERY", "false")]).expect("set");
    assert_eq!(set.server.drain, Duration::from_secs(9));
    assert!(!set.tokens.allow_query);

    // An expansion is read as if written plain: `yes` is still no boolean.
    let err = problems(&text, &[("QUERY", "yes")]);
    let line = line_of(&text, "allow_query");
    assert!(
        err.starts_with(&format!("g.yaml:{line}: tokens.allow_query: ")),
        "{err}"
    );
}

#[test]
fn the_drain_is_at_most_five_minutes() {
    let setting = "  drain_seconds: 5";
    let line = line_of(EVERY_SCALAR, setting);

    let config = load(&with(EVERY_SCALAR, setting, "  drain_seconds: 300"), &[]).expect("300");
    assert_eq!(config.server.drain, Duration::from_secs(300));
    let zero = load(&with(EVERY_SCALAR, setting, "  drain_seconds: 0"), &[]).expect("0");
    assert_eq!(zero.server.drain, Duration::ZERO);

    for too_long in ["301", "18446744073709551615"] {
        let text = with(
            EVERY_SCALAR,
            setting,
            &format!("  drain_seconds: {too_long}"),
        );
        let err = problems(&text, &[]);
        assert_eq!(
            err,
            format!("g.yaml:{line}: server.drain_seconds: must be between 0 and 300")
        );
    }
}

#[test]
fn every_rule_about_one_key_reports_its_line() {
    // What to change, the key the problem names, and text on its line.
    let cases = [
        (
            "fetch_timeout_ms: 300",
            "fetch_timeout_ms: 401",
            "provider.fetch_timeout_ms",
            "401",
        ),
        (
            "    timeout_ms: 300 #",
            "    timeout_ms: 801 #",
            "provider.introspection.timeout_ms",
            "801",
        ),
        (
            "min_refresh_seconds: 30",
            "min_refresh_seconds: 0",
            "provider.min_refresh_seconds",
            "min_refresh_seconds: 0",
        ),
        (
            "audiences: [api]",
            "audiences: []",
            "provider.audiences",
            "audiences: []",
        ),
        (
            "max_bytes: 8192",
            "max_bytes: 10",
            "tokens.max_bytes",
            "max_bytes: 10",
        ),
        (
            "allow_query: false # allow_query",
            "allow_query: false\n  forward:\n    subject: Bad_Name",
            "tokens.forward.subject",
            "Bad_Name",
        ),
        (
            "allow_query: false # allow_query",
            "allow_query: false\n  forward:\n    claims: {tenant: host}",
            "tokens.forward.claims.tenant",
            "{tenant: host}",
        ),
        (
            "max_body_bytes: 1048576",
            "max_body_bytes: 1\n  fields_param: a&b",
            "reshape.fields_param",
            "a&b",
        ),
        (
            "max_body_bytes: 1048576",
            "max_body_bytes: 1\n  profile_header: x client",
            "reshape.profile_header",
            "x client",
        ),
        (
            "  inline:\n",
            "  in line:\n",
            "rate_limits.in line",
            "in line:",
        ),
        (
            "  listed:\n",
            "  empty:\n    shadow: true\n  listed:\n",
            "rate_limits.empty.limits",
            "empty:",
        ),
        (
            "    requests: 10 # inline.requests\n    window_seconds: 60 # inline.window_seconds\n",
            "",
            "rate_limits.inline.requests",
            "inline.burst",
        ),
        (
            "    window_seconds: 60 # inline.window_seconds\n",
            "",
            "rate_limits.inline.requests",
            "inline.requests",
        ),
        (
            "    limits:\n",
            "    tiers:\n      g old:\n        limits: [{requests: 1, window_seconds: 1}]\n\
             \x20   limits:\n",
            "rate_limits.listed.tiers.g old",
            "g old:",
        ),
        (
            "          timeout_ms: 300 # part.timeout_ms",
            "          timeout_ms: 0",
            "routes[2].composite.parts[0].timeout_ms",
            "timeout_ms: 0",
        ),
        (
            "          timeout_ms: 300 # part.timeout_ms",
            "        - {key: vehicles, path: /again}",
            "routes[2].composite.parts[1].key",
            "/again",
        ),
        (
            "\nroutes:\n",
            "\nclients:\n  app:\n    tier: gold\nroutes:\n",
            "clients.app.tier",
            "tier: gold",
        ),
    ];

    for (from, to, key, on_line) in cases {
        let text = with(EVERY_SCALAR, from, to);
        let err = problems(&text, &[]);

        let expected = format!("g.yaml:{}: {key}: ", line_of(&text, on_line));
        assert!(
            err.lines().any(|line| line.starts_with(&expected)),
            "expected {expected:?} in:\n{err}"
        );
    }
}

#[test]
fn rules_about_two_keys_name_one_of_their_lines() {
    let text = format!(
        "server:\n  listen: 127.0.0.1:7000\n  admin_listen: 127.0.0.1:7000\n{}",
        &EVERY_SCALAR["server:\n".len()..]
    );
    let err = problems(&text, &[]);
    assert!(
        err.contains("g.yaml:3: server.admin_listen: must differ from server.listen"),
        "{err}"
    );

    // Without admin_listen, the default clashes with the listen address.
    let text = format!(
        "server:\n  listen: 127.0.0.1:50052\n{}",
        &EVERY_SCALAR["server:\n".len()..]
    );
    let err = problems(&text, &[]);
    assert!(
        err.contains("g.yaml:2: server.admin_listen: must differ from server.listen"),
        "{err}"
    );

    // Without introspection, the route that takes opaque tokens is named.
    let lines: Vec<&str> = EVERY_SCALAR.lines().collect();
    let (from, to) = (
        line_of(EVERY_SCALAR, "introspection:"),
        line_of(EVERY_SCALAR, "inactive"),
    );
    let text = [&lines[..from - 1], &lines[to..]].concat().join("\n");
    let text = with(&text, "    rate_limit_cost: 2", "    tokens: [jwt, opaque]");
    let line = line_of(&text, "tokens: [jwt, opaque]");
    let err = problems(&text, &[]);
    assert!(
        err.contains(&format!(
            "g.yaml:{line}: routes[0].tokens: a route accepts opaque tokens but no provider \
             has introspection"
        )),
        "{err}"
    );

    // The second provider with introspection is the one named, at the
    // first line of its section.
    let text = with(
        EVERY_SCALAR,
        "provider:\n  issuer: http://127.0.0.1:3000\n",
        "providers:\n- issuer: http://127.0.0.1:3001\n  audiences: [api]\n  introspection: \
         {client_id: a, client_secret: b}\n- issuer: http://127.0.0.1:3000\n",
    );
    let line = line_of(&text, "client_id: gatehouse");
    let err = problems(&text, &[]);
    assert!(
        err.contains(&format!(
            "g.yaml:{line}: providers[1].introspection: only one provider may have introspection"
        )),
        "{err}"
    );
}

#[test]
fn a_route_prefix_must_be_a_path_envoy_can_send() {
    let setting = "    prefix: /vehicles";
    let line = line_of(EVERY_SCALAR, setting);

    for prefix in [
        "/a/../vehicles",
        "/a/./b",
        "/..",
        "/a//b",
        "/a%2Fb",
        "/a%2e%2e/b",
        "/a?b",
        "'/a b'",
        "/véhicules",
    ] {
        let text = with(EVERY_SCALAR, setting, &format!("    prefix: {prefix}"));
        let err = problems(&text, &[]);
        let expected = format!(
            "g.yaml:{line}: routes[0].prefix: must be a path as Envoy forwards it once \
             normalised"
        );
        assert!(err.starts_with(&expected), "{prefix}: {err}");
    }

    for prefix in ["/", "/a.b/..c/.d", "/v1/vehicles/", "/~user/a-b_c"] {
        let text = with(EVERY_SCALAR, setting, &format!("    prefix: {prefix}"));
        load(&text, &[]).expect(prefix);
    }
}

#[test]
fn an_unclosed_reference_is_refused_at_its_line_and_key() {
    let setting = "    client_secret: s3cret";
    let line = line_of(EVERY_SCALAR, setting);

    for written in ["${SECRET", "${SECRET:-${OTHER}", "a-${A}-${B", "${A}${"] {
        let text = with(
            EVERY_SCALAR,
            setting,
            &format!("    client_secret: {written}"),
        );
        let err = problems(&text, &[("SECRET", "x"), ("A", "a"), ("OTHER", "o")]);
        assert!(
            err.starts_with(&format!(
                "g.yaml:{line}: provider.introspection.client_secret: `${{` is not closed"
            )),
            "{written}: {err}"
        );
    }

    // Closed references, escapes and other dollars are fine.
    for (written, value) in [
        ("${SECRET}", "x"),
        ("${NONE:-${SECRET}}", "x"),
        ("$${SECRET", "${SECRET"),
        ("a}b", "a}b"),
    ] {
        let text = with(
            EVERY_SCALAR,
            setting,
            &format!("    client_secret: {written}"),
        );
        let config = load(&text, &[("SECRET", "x")]).expect(written);
        let introspection = config.providers[0].introspection.as_ref().expect("set");
        assert_eq!(introspection.client_secret, value, "{written}");
    }
}

/// `text` as written with `${...}` references, and the same file with each
/// reference replaced by its default: both must give the same problem.
#[test]
fn messages_are_the_same_with_and_without_variables() {
    let plain = EVERY_SCALAR;
    let expanding = with(
        plain,
        "  issuer: http://127.0.0.1:3000",
        "  issuer: ${ISSUER:-http://127.0.0.1:3000}",
    );
    let expanding = with(
        &expanding,
        "  url: redis://127.0.0.1:6379",
        "  url: ${REDIS_URL:-redis://127.0.0.1:6379}",
    );

    let mistakes = [
        ("tokens:\n", "logging: 1\ntokens:\n"),
        ("    window_seconds: 60 #", "    window_seconds: 0 #"),
        ("  cluster: false", "  cluster: maybe"),
        ("    requests: 10 # inline", "    requests: \"10\" # inline"),
        ("    prefix: /status", "    prefix: [/status]"),
        ("    public: true", "    public: true\n    timeout: 3"),
        ("  inline:\n", "  inline:\n    algorithm: leaky\n"),
        ("            recursive: false", "            recursive: no"),
    ];
    for (from, to) in mistakes {
        let without = problems(&with(plain, from, to), &[]);
        let with_vars = problems(&with(&expanding, from, to), &[]);

        assert_eq!(with_vars, without, "{to}");
        for hidden in ["interpolated", "${"] {
            assert!(!with_vars.contains(hidden), "{to}: {with_vars}");
        }
    }
}

#[test]
fn a_bad_expanded_value_is_shown_as_written_never_as_its_secret() {
    let text = with(
        EVERY_SCALAR,
        "  timeout_ms: 20 # redis.timeout_ms",
        "  timeout_ms: ${TIMEOUT}",
    );
    let line = line_of(&text, "${TIMEOUT}");

    let err = problems(&text, &[("TIMEOUT", "hunter2-correct-horse")]);
    assert!(
        err.starts_with(&format!("g.yaml:{line}: redis.timeout_ms: invalid type: ")),
        "{err}"
    );
    assert!(err.contains("${TIMEOUT}"), "{err}");
    assert!(!err.contains("hunter2"), "the expansion leaked: {err}");

    // A later mistake, read again to name it, does not show the secret.
    let secret = with(
        EVERY_SCALAR,
        "    client_secret: s3cret",
        "    client_secret: ${SECRET}",
    );
    let mistake = ("  cluster: false", "  cluster: maybe");
    let err = problems(
        &with(&secret, mistake.0, mistake.1),
        &[("SECRET", "hunter2-correct-horse")],
    );
    assert_eq!(
        err,
        problems(&with(EVERY_SCALAR, mistake.0, mistake.1), &[])
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn the_parsers_own_errors_read_as_plain_sentences() {
    let duplicate = with(
        EVERY_SCALAR,
        "  cluster: false",
        "  cluster: false\n  timeout_ms: 33",
    );
    let line = line_of(&duplicate, "timeout_ms: 33");
    assert_eq!(
        problems(&duplicate, &[]),
        format!("g.yaml:{line}: redis: duplicate key `timeout_ms`")
    );

    let two_ops = with(
        EVERY_SCALAR,
        "        - drop_nulls:",
        "        - {drop: [a], keep: [b]}\n        - drop_nulls:",
    );
    let line = line_of(&two_ops, "{drop: [a], keep: [b]}");
    let err = problems(&two_ops, &[]);
    assert!(
        err.starts_with(&format!(
            "g.yaml:{line}: profiles.mobile.routes.vehicles[0]: a step has exactly one operation"
        )),
        "{err}"
    );

    let unset = with(
        EVERY_SCALAR,
        "  url: redis://127.0.0.1:6379",
        "  url: ${REDIS_URL}",
    );
    let line = line_of(&unset, "${REDIS_URL}");
    assert_eq!(
        problems(&unset, &[]),
        format!(
            "g.yaml:{line}: redis.url: environment variable `REDIS_URL` is not set and the \
             reference has no default"
        )
    );

    let pattern = with(
        EVERY_SCALAR,
        "    rate_limit_cost: 2 # rate_limit_cost",
        "    claims: [{claim: t, pattern: '('}]",
    );
    let line = line_of(&pattern, "pattern: '('");
    assert_eq!(
        problems(&pattern, &[]),
        format!(
            "g.yaml:{line}: routes[0].claims[0].pattern: not a valid regular expression: \
             unclosed group"
        )
    );

    let two_documents = format!("{EVERY_SCALAR}---\nroutes: []\n");
    let err = problems(&two_documents, &[]);
    assert!(err.contains("more than one YAML document"), "{err}");

    for err in [problems(&duplicate, &[]), problems(&two_ops, &[]), err] {
        for internal in ["Options", "Policy", "enum variant", "from_str"] {
            assert!(!err.contains(internal), "{err}");
        }
    }
}

#[test]
fn a_hostile_file_is_stopped_by_the_parsers_limits_in_plain_words() {
    // Nine levels of ten aliases each, 10^9 nodes once expanded, where any
    // value is welcome: a step's defaults.
    let indent = " ".repeat(14);
    let mut bomb = format!(
        "profiles:\n  p:\n    routes:\n      r:\n        - defaults:\n\
         {indent}a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    );
    for level in 1..=9 {
        let previous = format!("*a{}", level - 1);
        let items = [previous.as_str(); 10].join(", ");
        bomb.push_str(&format!("{indent}a{level}: &a{level} [{items}]\n"));
    }
    let err = problems(&bomb, &[]);
    assert!(
        err.contains(": the file has too many nodes (aliases expanded); at most 250000"),
        "{err}"
    );
    assert!(
        !err.contains("breached") && !err.contains("Nodes {"),
        "{err}"
    );

    let deep = format!(
        "profiles:\n  p:\n    routes:\n      r:\n        - defaults: {{a: {}{}}}\n",
        "[".repeat(100),
        "]".repeat(100)
    );
    let err = problems(&deep, &[]);
    assert!(
        err.contains("the file nests too deep; at most 64 levels"),
        "{err}"
    );
}
