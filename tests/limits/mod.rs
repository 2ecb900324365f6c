//! Helpers for the rate-limit tests: a small Gatehouse configuration, several
//! Gatehouse processes on one Redis, Check calls straight over gRPC, and a
//! scan for keys without a TTL.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, attribute_context,
};
use gatehouse::grpc::pb::GetRateLimitStatsRequest;
use gatehouse::grpc::pb::admin_client::AdminClient;
use tonic::transport::Channel;

use crate::support::{self, GatehousePorts, Proc};

/// The log line Gatehouse writes whenever a decision falls back to a
/// policy's failure mode.
pub const FALLBACK_LOG: &str = "policy failure mode applied";

/// A Gatehouse configuration for rate-limit tests: no token routes, so no
/// provider is needed (its address is a closed port and only its key
/// refresh complains). `redis` is the body of the `redis:` section. The
/// provider's fetches are short so that Redis budgets up to the largest
/// allowed (500 ms) still fit in a Check with them.
pub fn config(redis: &str, rate_limits: &str, routes: &str) -> String {
    format!(
        "server:
  listen: ${{GATEHOUSE_LISTEN}}
  admin_listen: ${{GATEHOUSE_ADMIN_LISTEN}}
  drain_seconds: 1
provider:
  issuer: http://127.0.0.1:9
  audiences: [https://api.gatehouse.test]
  fetch_timeout_ms: 100
client_address_header: x-gatehouse-client-address
redis:
{redis}
rate_limits:
{rate_limits}
routes:
{routes}
"
    )
}

/// One running Gatehouse.
pub struct Running {
    pub proc: Proc,
    pub ports: GatehousePorts,
}

/// Starts `count` Gatehouse processes serving `yaml`, all pointed at the
/// Redis on `redis_port`, and waits until each has connected to it.
pub fn gatehouses(dir: &Path, yaml: &str, count: usize, redis_port: u16) -> Vec<Running> {
    let config = dir.join("gatehouse.yaml");
    std::fs::write(&config, yaml).expect("write the config");

    (0..count)
        .map(|index| {
            let ports = GatehousePorts {
                grpc: support::free_port(),
                admin: support::free_port(),
            };
            let env = support::gatehouse_env(ports, 9, redis_port);
            let name = format!("gatehouse-{index}");
            let (mut proc, ports) = support::gatehouse_named(&name, dir, &config, &env, false);
            proc.wait_for_log("connected to redis");
            Running { proc, ports }
        })
        .collect()
}

/// How many decisions fell back to a failure mode, over every process, as
/// each one's admin API counts them; checked against the warnings each one
/// logged.
pub async fn fallbacks(running: &[Running]) -> u64 {
    let mut total = 0;
    for gatehouse in running {
        let address = format!("http://127.0.0.1:{}", gatehouse.ports.admin);
        let mut admin = AdminClient::connect(address).await.expect("admin api");
        let stats = admin
            .get_rate_limit_stats(GetRateLimitStatsRequest {})
            .await
            .expect("rate limit stats")
            .into_inner();

        let logged = gatehouse.proc.log().matches(FALLBACK_LOG).count();
        assert_eq!(stats.fallbacks, logged as u64, "counted and logged alike");
        total += stats.fallbacks;
    }
    total
}

/// A gRPC channel to a Gatehouse.
pub async fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("a valid uri")
        .connect()
        .await
        .expect("connect to gatehouse")
}

/// What a Check answered: the HTTP status Envoy would send (200 for an
/// allowed request) and the headers it would add.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HashMap<String, String>,
}

/// Calls Check for `GET path` from `address`, as Envoy would.
pub async fn check(channel: &Channel, path: &str, address: &str) -> Answer {
    let mut client = AuthorizationClient::new(channel.clone());
    let response = client
        .check(check_request(path, address))
        .await
        .expect("check answers")
        .into_inner();

    match response.http_response {
        Some(HttpResponse::OkResponse(ok)) => Answer {
            status: 200,
            headers: ok
                .response_headers_to_add
                .into_iter()
                .filter_map(|option| option.header)
                .map(|header| (header.key, header.value))
                .collect(),
        },
        Some(HttpResponse::DeniedResponse(denied)) => Answer {
            status: denied
                .status
                .and_then(|status| u16::try_from(status.code).ok())
                .unwrap_or(0),
            headers: denied
                .headers
                .into_iter()
                .filter_map(|option| option.header)
                .map(|header| (header.key, header.value))
                .collect(),
        },
        other => panic!("check gave no http response: {other:?}"),
    }
}

fn check_request(path: &str, address: &str) -> CheckRequest {
    let http = attribute_context::HttpRequest {
        id: "test".to_owned(),
        method: "GET".to_owned(),
        path: path.to_owned(),
        ..Default::default()
    };
    let source = attribute_context::Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: address.to_owned(),
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

/// A connection to the Redis at `port`, and every key under Gatehouse's
/// prefix there.
async fn gatehouse_keys(port: u16) -> (redis::aio::MultiplexedConnection, Vec<String>) {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("redis url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");

    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("gatehouse:rl:*")
        .query_async(&mut connection)
        .await
        .expect("list keys");
    (connection, keys)
}

/// Every key under Gatehouse's prefix on the Redis at `port`, with its TTL
/// in ms (-1: none, -2: gone meanwhile).
pub async fn keys_with_ttl(port: u16) -> Vec<(String, i64)> {
    let (mut connection, keys) = gatehouse_keys(port).await;
    let mut found = Vec::new();
    for key in keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .expect("pttl");
        found.push((key, ttl));
    }
    found
}

/// Every key under Gatehouse's prefix on the Redis at `port`, with its value
/// (a GCRA key holds its TAT, a fixed-window key its count).
pub async fn key_values(port: u16) -> HashMap<String, String> {
    let (mut connection, keys) = gatehouse_keys(port).await;
    let mut values = HashMap::new();
    for key in keys {
        let value: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .expect("get");
        if let Some(value) = value {
            values.insert(key, value);
        }
    }
    values
}

/// Fails when any key Gatehouse wrote on these Redis nodes lacks a TTL;
/// returns how many keys were seen.
pub async fn assert_every_key_has_a_ttl(ports: &[u16]) -> usize {
    let mut seen = 0;
    for port in ports {
        for (key, ttl) in keys_with_ttl(*port).await {
            assert!(ttl != -1, "key {key} on port {port} has no TTL");
            seen += 1;
        }
    }
    seen
}

/// Runs `redis-cli -p port args…` and returns its output.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = std::process::Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Envoy running `yaml` (already rendered with its ports), ready once its
/// admin interface on `admin` says so.
pub async fn envoy(dir: &Path, name: &str, yaml: &str, admin: u16) -> Proc {
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(&config, yaml).expect("write the envoy config");

    let binary = support::envoy_binary();
    let config_arg = config.display().to_string();
    let args = [
        "-c",
        config_arg.as_str(),
        "--concurrency",
        "1",
        "--use-dynamic-base-id",
        "--log-level",
        "warn",
    ];
    let mut proc = Proc::start(name, dir, &binary, &args, &[]);

    let ready = format!("http://127.0.0.1:{admin}/ready");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        proc.assert_running();
        if let Ok(response) = reqwest::get(&ready).await
            && response.status() == 200
        {
            return proc;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never became ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `text` with each `port_value: FIXED` replaced by its port; each fixed
/// port must appear exactly once.
pub fn render_ports(text: &str, ports: &[(u16, u16)]) -> String {
    let mut rendered = text.to_owned();
    for (fixed, port) in ports {
        let from = format!("port_value: {fixed}");
        assert_eq!(rendered.matches(&from).count(), 1, "{from} exactly once");
        rendered = rendered.replace(&from, &format!("port_value: {port}"));
    }
    rendered
}

/// Stops a Redis and waits until its port refuses connections: the guard
/// returns as soon as it has signalled Redis, which exits a moment later.
pub fn stop_redis(redis: Proc, port: u16) {
    drop(redis);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "redis on {port} did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
