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
use support::{GatehousePorts, free_port};
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
fn check_config_reports_every_broken_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = shipped_config()
        .replace("    rate_limit: stations", "    rate_limit: nope")
        .replace("    profile: partner", "    profile: tablet");
    let path = write(dir.path(), "refs.yaml", &text);

    let (ok, output) = check_config(&path, &[]);

    assert!(!ok);
    assert!(
        output.contains("routes[3].rate_limit: no rate limit named \"nope\""),
        "{output}"
    );
    assert!(
        output.contains("clients.demo-partner.profile: no profile named \"tablet\""),
        "{output}"
    );
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

/// A Gatehouse on free ports with the shipped config, a real provider and
/// the given environment on top.
struct Running {
    gatehouse: support::Proc,
    ports: GatehousePorts,
    _provider: support::Proc,
    _redis: support::Proc,
    dir: tempfile::TempDir,
}

fn start(config_text: &str, direct: bool) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let (redis, redis_port) = support::redis(dir.path());
    let (provider, provider_port) =
        support::provider(dir.path(), &dir.path().join("keys.json"), None);
    let config = write(dir.path(), "gatehouse.yaml", config_text);

    let ports = GatehousePorts {
        grpc: free_port(),
        admin: free_port(),
    };
    let env = support::gatehouse_env(ports, provider_port, redis_port);
    let (gatehouse, ports) = support::gatehouse(dir.path(), &config, &env, direct);

    Running {
        gatehouse,
        ports,
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
    let http = attribute_context::HttpRequest {
        id: "test-1".to_owned(),
        method: "GET".to_owned(),
        path: path.to_owned(),
        headers: HashMap::from([("x-request-id".to_owned(), "test-1".to_owned())]),
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
    let running = start(&shipped_config(), false);
    let config = running.dir.path().join("gatehouse.yaml");
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
    // the same Check is refused with 404, which shows the swap took effect.
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
    assert_ne!(
        check_status(running.ports.grpc, "/stations/status")
            .await
            .expect("check"),
        0
    );

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
async fn sigterm_drains_then_exits_cleanly() {
    let mut running = start(&shipped_config(), true);
    let port = running.ports.grpc;
    wait_for_health(port, ServingStatus::Serving).await;

    running.gatehouse.terminate();

    // NOT_SERVING at once, while requests are still answered.
    wait_for_health(port, ServingStatus::NotServing).await;
    let status = check_status(port, "/stations/status")
        .await
        .expect("answered while draining");
    assert_eq!(status, 0);

    // The drain period in the test environment is one second.
    let exited = running.gatehouse.wait_exit(Duration::from_secs(15));
    assert_eq!(
        exited,
        Some(true),
        "gatehouse must exit with status 0; log:\n{}",
        running.gatehouse.log()
    );
    assert!(running.gatehouse.log().contains("draining"));
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
