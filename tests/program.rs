//! The program's promises outside the request path: `check-config`,
//! `${VAR}` expansion, reload through the admin API, and the drain on
//! SIGTERM. Gatehouse runs as a real process; the provider is real too, so
//! that health can turn SERVING.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};
use gatehouse::grpc::pb::admin_client::AdminClient;
use gatehouse::grpc::pb::{GetConfigVersionRequest, ReloadRequest};
use support::forge::{self, OPAQUE_RESOURCE};
use support::{GatehousePorts, WEB, free_port};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn check_config(path: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .arg("check-config")
        .arg(path)
        .env_remove("REDIS_URL")
        .envs(env.iter().copied())
        .output()
        .expect("run gatehouse check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a config file");
    path
}

fn shipped_config() -> String {
    std::fs::read_to_string(support::root().join("config/gatehouse.yaml"))
        .expect("read the shipped config")
}

#[test]
fn check_config_accepts_the_shipped_file() {
    let (ok, text) = check_config(&support::root().join("config/gatehouse.yaml"), &[]);

    assert!(ok, "{text}");
    assert!(text.contains(": ok (version "), "{text}");
}

#[test]
fn check_config_names_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = shipped_config().replace(
        "    scopes: [stations:read]",
        "    scopes: [stations:read]\n    timeout: 3",
    );
    let path = write(dir.path(), "bad.yaml", &text);
    let line = text
        .lines()
        .position(|l| l.contains("timeout: 3"))
        .expect("inserted line")
        + 1;

    let (ok, output) = check_config(&path, &[]);

    assert!(!ok, "an unknown key must fail");
    let expected = format!("{}:{line}: routes[3]", path.display());
    assert!(
        output.starts_with(&expected),
        "expected {expected:?} in:\n{output}"
    );
    assert!(output.contains("unknown field `timeout`"), "{output}");
}

#[test]
fn check_config_warns_of_a_public_limit_counted_by_the_tcp_peer() {
    let (_, shipped) = check_config(&support::root().join("config/gatehouse.yaml"), &[]);
    assert!(!shipped.contains("warning:"), "{shipped}");

    let dir = tempfile::tempdir().expect("tempdir");
    let text = shipped_config().replace("client_address_header: x-gatehouse-client-address", "");
    assert!(!text.contains("client_address_header"), "the key is gone");
    let path = write(dir.path(), "peer.yaml", &text);
    let line = text
        .lines()
        .position(|l| l.trim() == "rate_limit: public")
        .expect("the public route's limit")
        + 1;

    let (ok, output) = check_config(&path, &[]);

    assert!(ok, "a warning does not fail the check: {output}");
    let expected = format!("warning: {}:{line}: routes[", path.display());
    assert!(
        output.contains(&expected),
        "expected {expected:?} in:\n{output}"
    );
    assert!(
        output.contains("counts clients by the TCP peer"),
        "{output}"
    );
    assert!(
        output.contains("client_address_header is not set"),
        "{output}"
    );
}

#[test]
fn check_config_refuses_a_metrics_address_taken_by_another_listener() {
    let path = support::root().join("config/gatehouse.yaml");
    let line = shipped_config()
        .lines()
        .position(|l| l.trim_start().starts_with("metrics_listen:"))
        .expect("the shipped file sets metrics_listen")
        + 1;

    let taken = [
        ("GATEHOUSE_ADMIN_LISTEN", "127.0.0.1:50052"),
        ("GATEHOUSE_METRICS_LISTEN", "127.0.0.1:50052"),
    ];
    let (ok, output) = check_config(&path, &taken);

    assert!(!ok, "{output}");
    let expected = format!(
        "{}:{line}: server.metrics_listen: must differ from server.listen and \
         server.admin_listen",
        path.display()
    );
    assert!(
        output.lines().any(|l| l == expected),
        "expected {expected:?} in:\n{output}"
    );
}

#[test]
fn check_config_reports_every_broken_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = shipped_config()
        .replace("    rate_limit: stations", "    rate_limit: nope")
        .replace("    profile: partner", "    profile: tablet");
    let path = write(dir.path(), "refs.yaml", &text);
    let line_of = |needle: &str| {
        let index = text.lines().position(|l| l.ends_with(needle));
        index.expect("the replaced line") + 1
    };

    let (ok, output) = check_config(&path, &[]);

    assert!(!ok);
    let file = path.display();
    let expected = [
        format!(
            "{file}:{}: routes[3].rate_limit: no rate limit named \"nope\"",
            line_of("rate_limit: nope")
        ),
        format!(
            "{file}:{}: clients.demo-partner.profile: no profile named \"tablet\"",
            line_of("profile: tablet")
        ),
    ];
    for line in expected {
        assert!(
            output.lines().any(|l| l == line),
            "expected {line:?} in:\n{output}"
        );
    }
}

#[test]
fn variables_are_expanded_and_unset_ones_without_default_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = shipped_config().replace("${REDIS_URL:-redis://127.0.0.1:6379}", "${REDIS_URL}");
    let path = write(dir.path(), "vars.yaml", &text);

    let (ok, output) = check_config(&path, &[]);
    assert!(!ok, "REDIS_URL is unset");
    assert!(output.contains("REDIS_URL"), "{output}");

    let (ok, output) = check_config(&path, &[("REDIS_URL", "redis://cache.internal:6379")]);
    assert!(ok, "{output}");

    let (ok, output) = check_config(&path, &[("REDIS_URL", "not a url")]);
    assert!(!ok);
    assert!(
        output.contains("redis.url: must be a redis URL"),
        "{output}"
    );
}

#[test]
fn check_config_refuses_a_quoted_reference_instead_of_keeping_its_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let written =
        "    client_secret: ${GATEHOUSE_INTROSPECTION_SECRET:-gatehouse-introspection-secret}";
    let quoted = "    client_secret: \"${GATEHOUSE_INTROSPECTION_SECRET}\"";
    let text = shipped_config().replace(written, quoted);
    assert_ne!(text, shipped_config());
    let path = write(dir.path(), "quoted.yaml", &text);
    let line = text
        .lines()
        .position(|l| l == quoted)
        .expect("the quoted line")
        + 1;

    let secret = ("GATEHOUSE_INTROSPECTION_SECRET", "s3cret");
    let (ok, output) = check_config(&path, &[secret]);

    assert!(!ok, "a quoted reference must fail:\n{output}");
    let expected = format!(
        "{}:{line}: provider.introspection.client_secret: `${{` is not expanded",
        path.display()
    );
    assert!(
        output.starts_with(&expected),
        "expected {expected:?} in:\n{output}"
    );
}

/// A Gatehouse on free ports with the shipped config, a real provider and
/// the given environment on top.
struct Running {
    gatehouse: support::Proc,
    ports: GatehousePorts,
    provider_port: u16,
    _provider: support::Proc,
    _redis: support::Proc,
    dir: tempfile::TempDir,
}

fn start(config_text: &str, direct: bool) -> Running {
    start_with(config_text, direct, &[])
}

/// As [`start`], with `overrides` replacing variables of the usual
/// environment.
fn start_with(config_text: &str, direct: bool, overrides: &[(&str, &str)]) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let (redis, redis_port) = support::redis(dir.path());
    let (provider, provider_port) =
        support::provider(dir.path(), &dir.path().join("keys.json"), None);
    let config = write(dir.path(), "gatehouse.yaml", config_text);

    let ports = GatehousePorts {
        grpc: free_port(),
        admin: free_port(),
    };
    let mut env = support::gatehouse_env(ports, provider_port, redis_port);
    for (name, value) in overrides {
        let slot = env.iter_mut().find(|(key, _)| key == name);
        slot.expect("a variable of the usual environment").1 = (*value).to_owned();
    }
    let (gatehouse, ports) = support::gatehouse(dir.path(), &config, &env, direct);

    Running {
        gatehouse,
        ports,
        provider_port,
        _provider: provider,
        _redis: redis,
        dir,
    }
}

async fn health(port: u16) -> Option<i32> {
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(response.into_inner().status)
}

async fn wait_for_health(port: u16, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if health(port).await == Some(want as i32) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("health never reported {want:?}");
}

fn check_request(path: &str) -> CheckRequest {
    check_request_with(path, &[])
}

fn check_request_with(path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let mut headers: HashMap<String, String> = headers
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    headers.insert("x-request-id".to_owned(), "test-1".to_owned());
    let http = attribute_context::HttpRequest {
        id: "test-1".to_owned(),
        method: "GET".to_owned(),
        path: path.to_owned(),
        headers,
        ..Default::default()
    };
    let source = attribute_context::Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "192.0.2.7".to_owned(),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };

    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(source),
            request: Some(attribute_context::Request {
                http: Some(http),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn check_status(port: u16, path: &str) -> Result<i32, tonic::Status> {
    let mut client = AuthorizationClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let response = client.check(check_request(path)).await?.into_inner();
    Ok(response.status.map(|status| status.code).unwrap_or(-1))
}

#[tokio::test]
async fn reload_swaps_a_valid_file_and_refuses_a_broken_one() {
    let mut running = start(&shipped_config(), false);
    let config = running.dir.path().join("gatehouse.yaml");
    running
        .gatehouse
        .wait_for_log("rate limits are kept in redis");
    let log = running.gatehouse.log();
    assert!(!log.contains("kept in memory"), "{log}");
    let mut admin = AdminClient::connect(format!("http://127.0.0.1:{}", running.ports.admin))
        .await
        .expect("admin API");

    let before = admin
        .get_config_version(GetConfigVersionRequest {})
        .await
        .expect("version")
        .into_inner();
    assert_eq!(before.path, config.display().to_string());

    // A public route for /stations/status is in the shipped file; without it
    // the path falls to the protected /stations route, so the same Check
    // without a token gets 401, which shows the swap took effect.
    assert_eq!(
        check_status(running.ports.grpc, "/stations/status")
            .await
            .expect("check"),
        0
    );
    let without_public = shipped_config().replace("  - name: station-status\n    prefix: /stations/status\n    methods: [GET, HEAD]\n    public: true\n    rate_limit: public\n", "");
    assert_ne!(without_public, shipped_config());
    std::fs::write(&config, &without_public).expect("rewrite config");

    let reloaded = admin
        .reload(ReloadRequest {})
        .await
        .expect("reload")
        .into_inner();
    assert!(reloaded.changed);
    let current = reloaded.current.expect("current version");
    assert_ne!(current.version, before.version);
    let checked = forge::check(running.ports.grpc, "GET", "/stations/status", &[]).await;
    assert_eq!(checked.status, 401, "{}", checked.body);

    std::fs::write(&config, "routes: [\n").expect("break config");
    let refused = admin
        .reload(ReloadRequest {})
        .await
        .expect_err("a broken file is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("gatehouse.yaml:"),
        "{}",
        refused.message()
    );

    let after = admin
        .get_config_version(GetConfigVersionRequest {})
        .await
        .expect("version")
        .into_inner();
    assert_eq!(
        after.version, current.version,
        "the running configuration stays"
    );
}

#[tokio::test]
async fn without_redis_the_log_says_limits_are_kept_in_memory() {
    let redis_section = "redis:\n  url: ${REDIS_URL:-redis://127.0.0.1:6379}\n  timeout_ms: 20\n  key_prefix: gatehouse\n\n";
    let config = shipped_config().replace(redis_section, "");
    assert_ne!(
        config,
        shipped_config(),
        "the shipped file has a redis section"
    );
    let mut running = start(&config, false);

    running
        .gatehouse
        .wait_for_log("no redis configured: rate limits are kept in memory");
    let log = running.gatehouse.log();
    assert!(!log.contains("kept in redis"), "{log}");

    // The public route's limit is counted, in memory, and the Check passes.
    let status = check_status(running.ports.grpc, "/stations/status")
        .await
        .expect("check");
    assert_eq!(status, 0);
}

/// The drain period of the drain tests: long enough to tell an exit at its
/// end from one at the signal.
const DRAIN: Duration = Duration::from_secs(3);

/// How slow the provider's introspection answers during the drain tests,
/// inside the 800 ms introspection budget they configure.
const SLOW_INTROSPECTION: Duration = Duration::from_millis(600);

/// Signals Gatehouse with `signal`, then checks the whole drain: health
/// NOT_SERVING at once, Checks answered meanwhile, a Check started just
/// before the drain ends answered after it, and exit 0 no earlier than the
/// drain period.
async fn drains_then_exits_cleanly(signal: &str) {
    let config = shipped_config().replace(
        "    timeout_ms: 300\n    cache_seconds: 60",
        "    timeout_ms: 800\n    cache_seconds: 60",
    );
    assert_ne!(config, shipped_config(), "the introspection budget is set");
    let drain = DRAIN.as_secs().to_string();
    let mut running = start_with(&config, true, &[("GATEHOUSE_DRAIN_SECONDS", &drain)]);
    let port = running.ports.grpc;
    wait_for_health(port, ServingStatus::Serving).await;

    // An opaque token is introspected on first use, so its Check lasts as
    // long as the provider takes to answer. The connection is opened now:
    // a new one may be refused once the drain ends.
    let token =
        forge::token_for(running.provider_port, WEB, "stations:read", OPAQUE_RESOURCE).await;
    let delay = format!("/__delay?ms={}", SLOW_INTROSPECTION.as_millis());
    forge::provider_control(running.provider_port, &delay).await;
    let mut slow_client = AuthorizationClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect for the slow check");

    let signalled = Instant::now();
    running.gatehouse.signal(signal);

    // NOT_SERVING at once, while requests are still answered.
    wait_for_health(port, ServingStatus::NotServing).await;
    let status = check_status(port, "/stations/status")
        .await
        .expect("answered while draining");
    assert_eq!(status, 0);

    // Just before the drain ends, a Check that needs longer than is left.
    let started = signalled + DRAIN - Duration::from_millis(400);
    tokio::time::sleep_until(started.into()).await;
    let auth = format!("Bearer {token}");
    let request = check_request_with("/stations", &[("authorization", &auth)]);
    let answer = slow_client
        .check(request)
        .await
        .expect("the in-flight check is answered")
        .into_inner();
    let answered = signalled.elapsed();
    assert!(
        answered >= DRAIN,
        "the slow check must still be in flight when the drain ends ({answered:?})"
    );
    let code = answer.status.as_ref().map(|status| status.code);
    assert_eq!(code, Some(0), "the slow check is allowed: {answer:?}");

    // Exit 0, not before the drain period, and without needing the grace
    // period for unfinished calls.
    let exited = running.gatehouse.wait_exit(Duration::from_secs(20));
    let stopped = signalled.elapsed();
    let log = running.gatehouse.log();
    assert_eq!(
        exited,
        Some(true),
        "gatehouse must exit with 0; log:\n{log}"
    );
    assert!(
        stopped >= DRAIN,
        "exited {stopped:?} after the signal; log:\n{log}"
    );
    assert!(
        stopped < DRAIN + Duration::from_secs(5),
        "exited {stopped:?} after the signal; log:\n{log}"
    );
    assert!(log.contains("shutdown requested; draining"), "{log}");
    assert!(log.contains("gatehouse stopped"), "{log}");
    assert!(!log.contains("did not finish in time"), "{log}");
}

#[tokio::test]
async fn sigterm_drains_then_exits_cleanly() {
    drains_then_exits_cleanly("TERM").await;
}

#[tokio::test]
async fn sigint_drains_then_exits_cleanly() {
    drains_then_exits_cleanly("INT").await;
}

/// Signals Gatehouse with `first`, and once it drains, with `second`: the
/// second ends the longest drain allowed at once, with a warning.
async fn a_second_signal_stops_the_drain_at_once(first: &str, second: &str) {
    let mut running = start_with(
        &shipped_config(),
        true,
        &[("GATEHOUSE_DRAIN_SECONDS", "300")],
    );
    let port = running.ports.grpc;
    wait_for_health(port, ServingStatus::Serving).await;

    running.gatehouse.signal(first);
    wait_for_health(port, ServingStatus::NotServing).await;
    let status = check_status(port, "/stations/status")
        .await
        .expect("answered while draining");
    assert_eq!(status, 0);

    // 300 s of drain are left; the second signal must not wait for them.
    running.gatehouse.signal(second);
    let exited = running.gatehouse.wait_exit(Duration::from_secs(10));
    let log = running.gatehouse.log();
    assert_eq!(
        exited,
        Some(true),
        "gatehouse must exit at once with 0; log:\n{log}"
    );

    let warning = log
        .lines()
        .find(|line| line.contains("second shutdown signal"))
        .unwrap_or_else(|| panic!("no warning in:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(log.contains("shutdown requested; draining"), "{log}");
    assert!(
        !log.contains("gatehouse stopped"),
        "the drain did not end: {log}"
    );
}

#[tokio::test]
async fn a_second_sigint_during_the_drain_stops_at_once() {
    a_second_signal_stops_the_drain_at_once("TERM", "INT").await;
}

#[tokio::test]
async fn a_second_sigterm_during_the_drain_stops_at_once() {
    a_second_signal_stops_the_drain_at_once("INT", "TERM").await;
}

#[test]
fn check_config_refuses_a_file_that_never_ends() {
    // /dev/zero reports no size, so only the read itself can stop.
    let started = Instant::now();
    let (ok, output) = check_config(Path::new("/dev/zero"), &[]);

    assert!(!ok, "{output}");
    assert_eq!(
        output.trim_end(),
        "/dev/zero: file is larger than 4194304 bytes"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn check_config_refuses_a_drain_longer_than_five_minutes() {
    let path = support::root().join("config/gatehouse.yaml");
    let line = shipped_config()
        .lines()
        .position(|l| l.trim_start().starts_with("drain_seconds:"))
        .expect("the shipped file sets drain_seconds")
        + 1;

    let (ok, output) = check_config(&path, &[("GATEHOUSE_DRAIN_SECONDS", "300")]);
    assert!(ok, "{output}");

    let (ok, output) = check_config(
        &path,
        &[("GATEHOUSE_DRAIN_SECONDS", "18446744073709551615")],
    );
    assert!(!ok, "{output}");
    let expected = format!(
        "{}:{line}: server.drain_seconds: must be between 0 and 300",
        path.display()
    );
    assert_eq!(output.trim_end(), expected);
}

/// Every `$ gatehouse check-config FILE` in docs/config.md with the lines
/// shown after it, as (indentation removed) they appear in its code block.
fn documented_check_config_runs() -> Vec<(String, Vec<String>)> {
    let doc = std::fs::read_to_string(support::root().join("docs/config.md"))
        .expect("read docs/config.md");
    let mut runs: Vec<(String, Vec<String>)> = Vec::new();
    let mut block: Option<usize> = None;
    let mut current: Option<(String, Vec<String>)> = None;

    for line in doc.lines() {
        let indent = line.len() - line.trim_start().len();
        if line.trim_start().starts_with("```") {
            block = if block.is_some() { None } else { Some(indent) };
            runs.extend(current.take());
            continue;
        }
        let Some(indent) = block else { continue };
        let text = line.get(indent..).unwrap_or_default();

        if let Some(command) = text.strip_prefix("$ gatehouse check-config ") {
            runs.extend(current.take());
            let file = command.split(" #").next().unwrap_or_default().trim();
            current = Some((file.to_owned(), Vec::new()));
        } else if text.trim().is_empty() {
            runs.extend(current.take());
        } else if let Some((_, output)) = current.as_mut() {
            output.push(text.to_owned());
        }
    }
    runs
}

#[test]
fn the_check_config_examples_in_the_docs_are_what_it_prints() {
    let runs = documented_check_config_runs();
    assert!(runs.len() >= 10, "the examples were not found: {runs:?}");

    for (file, expected) in runs {
        // Shipped files are named from the repository root, the others
        // from docs/examples; no variable is set, so defaults apply.
        let dir = if file.starts_with("config/") {
            support::root()
        } else {
            support::root().join("docs/examples")
        };
        let output = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .arg("check-config")
            .arg(&file)
            .current_dir(dir)
            .env_clear()
            .output()
            .expect("run gatehouse check-config");

        // A terminal shows the warnings (standard error) before `ok`.
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        let printed: Vec<&str> = printed.lines().collect();
        assert_eq!(
            printed, expected,
            "docs/config.md shows another output for {file}"
        );
    }
}

#[test]
fn the_complete_example_in_the_docs_is_the_shipped_file() {
    let doc = std::fs::read_to_string(support::root().join("docs/config.md"))
        .expect("read docs/config.md");
    let start = doc
        .find("## A complete example")
        .and_then(|at| {
            doc[at..]
                .find("```yaml\n")
                .map(|open| at + open + "```yaml\n".len())
        })
        .expect("the complete example's code block");
    let end = doc[start..].find("```").expect("its end") + start;

    assert_eq!(
        &doc[start..end],
        shipped_config(),
        "docs/config.md must show config/gatehouse.yaml as it is"
    );
}

#[test]
fn envoy_config_passes_validation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rendered = dir.path().join("envoy.yaml");
    std::fs::write(
        &rendered,
        support::render_envoy_config(10001, 9902, 50053, 8083, 8084),
    )
    .expect("write");

    for config in [support::root().join("envoy/envoy.yaml"), rendered] {
        let output = Command::new(support::envoy_binary())
            .args(["--mode", "validate", "-c"])
            .arg(&config)
            .output()
            .expect("run envoy --mode validate");
        assert!(
            output.status.success(),
            "{} is invalid:\n{}{}",
            config.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
