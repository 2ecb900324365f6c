//! What Gatehouse's own work costs on the request path, without the gRPC hop:
//! a whole Check decision (route, token, scopes, rate limit, profile) with a
//! token seen for the first time, the same decision once the token is cached,
//! a public route that needs no token, and the reshaping of a typical body.
//!
//! Run it with `cargo bench --bench check_path`. It prints the time per
//! decision for each case and the ratios that matter: how much the verified
//! token cache saves, and how a cached decision compares with a public one.
//!
//! The keys come from a small local HTTP server serving a test-only JWKS
//! (`benches/fixtures`), so no provider has to run; rate limits are kept in
//! memory, since a Redis round trip would measure the network, not us.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gatehouse::check::{self, Request};
use gatehouse::config::Config;
use gatehouse::decision::Decision;
use gatehouse::reshape;
use gatehouse::state::{Runtime, State};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const JWKS: &str = include_str!("fixtures/bench-jwks.json");
const PRIVATE_KEY: &[u8] = include_bytes!("fixtures/bench-rsa-private.der");
const KID: &str = "bench-1";
const AUDIENCE: &str = "https://api.gatehouse.test";

/// Distinct tokens for the first-verification case; each is verified once.
const FRESH_TOKENS: usize = 2_000;

/// Decisions timed for each of the cached cases.
const CACHED_ROUNDS: usize = 50_000;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let jwks_port = serve_jwks().await;
    let issuer = format!("http://127.0.0.1:{jwks_port}");
    let state = State::new(config(&issuer)).expect("build the state");
    let runtime = wait_for_keys(&state).await;

    println!("gatehouse check path, one thread, no gRPC hop");

    let fresh: Vec<String> = (0..FRESH_TOKENS).map(|n| token(&issuer, n)).collect();
    let first = time_decisions(&runtime, "/vehicles/v-1", &fresh, true).await;
    report("decide, token verified for the first time", first);

    let one = vec![token(&issuer, FRESH_TOKENS)];
    let warm = repeat(&one, CACHED_ROUNDS);
    let cached = time_decisions(&runtime, "/vehicles/v-1", &warm, true).await;
    report("decide, token from the verified cache", cached);

    let none = repeat(&[String::new()], CACHED_ROUNDS);
    let public = time_decisions(&runtime, "/stations/status", &none, false).await;
    report("decide, public route (no token)", public);

    let reshaped = time_reshape(&runtime);
    report("reshape, 50 vehicles for the mobile profile", reshaped);

    println!();
    println!("ratio first / cached: {:.1}x", ratio(first, cached));
    println!("ratio cached / public: {:.2}x", ratio(cached, public));
}

/// A config with one provider (explicit `jwks_uri`, so no discovery), a
/// protected and a public route, and limits far above what the bench sends.
fn config(issuer: &str) -> Config {
    let yaml = format!(
        "
server:
  listen: 127.0.0.1:0
  admin_listen: 127.0.0.1:1
provider:
  issuer: {issuer}
  jwks_uri: {issuer}/jwks
  audiences: [{AUDIENCE}]
rate_limits:
  roomy:
    requests: 1000000000
    window_seconds: 60
profiles:
  mobile:
    routes:
      vehicles:
        - keep: [count, \"items[].id\", \"items[].battery.soc\"]
clients:
  bench-client:
    profile: mobile
routes:
  - name: status
    prefix: /stations/status
    public: true
    rate_limit: roomy
  - name: vehicles
    prefix: /vehicles
    scopes: [vehicles:read]
    rate_limit: roomy
"
    );
    Config::from_yaml(Path::new("bench.yaml"), &yaml, HashMap::new()).expect("a valid config")
}

/// Serves the bench JWKS to every request on a free loopback port.
async fn serve_jwks() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("local address").port();

    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0_u8; 4096];
                let _ = stream.read(&mut request).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{JWKS}",
                    JWKS.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    port
}

async fn wait_for_keys(state: &State) -> Arc<Runtime> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let runtime = state.load();
        if runtime.authn.has_keys() {
            return runtime;
        }
        assert!(Instant::now() < deadline, "the bench JWKS never loaded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An RS256 access token for `bench-client`, unique by its `jti`.
fn token(issuer: &str, n: usize) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let claims = serde_json::json!({
        "iss": issuer,
        "aud": AUDIENCE,
        "sub": "bench-client",
        "client_id": "bench-client",
        "scope": "vehicles:read",
        "jti": format!("bench-{n}"),
        "iat": now,
        "exp": now + 3600,
    });
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(KID.to_owned());
    header.typ = Some("at+jwt".to_owned());

    let key = EncodingKey::from_rsa_der(PRIVATE_KEY);
    jsonwebtoken::encode(&header, &claims, &key).expect("sign a bench token")
}

fn repeat(tokens: &[String], rounds: usize) -> Vec<String> {
    tokens.iter().cycle().take(rounds).cloned().collect()
}

/// The mean time of one decision, each with the next token; every decision
/// must allow, or the bench would time a denial's shortcut.
async fn time_decisions(
    runtime: &Runtime,
    path: &str,
    tokens: &[String],
    send_token: bool,
) -> Duration {
    let mut headers = HashMap::new();
    let started = Instant::now();

    for token in tokens {
        if send_token {
            headers.insert("authorization".to_owned(), format!("Bearer {token}"));
        }
        let request = Request {
            method: "GET",
            path,
            headers: &headers,
            client_address: Some("192.0.2.1"),
            request_id: "bench",
        };
        match check::decide(runtime, request).await {
            Decision::Allow(allow) => {
                black_box(allow);
            }
            Decision::Deny(deny) => panic!("the bench request was denied: {deny:?}"),
        }
    }
    started.elapsed() / u32::try_from(tokens.len()).expect("a small count")
}

/// The mean time to parse, reshape and write a 50-vehicle list.
fn time_reshape(runtime: &Runtime) -> Duration {
    let steps = runtime
        .config
        .steps("mobile", "vehicles")
        .expect("the mobile profile has vehicles steps");
    let items: Vec<serde_json::Value> = (0..50)
        .map(|n| {
            serde_json::json!({
                "id": format!("v-{n}"),
                "model": "Model 3",
                "vin": "5YJ3E1EA7KF000000",
                "owner": {"name": "A. Driver", "email": "driver@example.com"},
                "battery": {"soc": 81, "capacity_wh": 75000, "health": 0.97},
                "location": {"lat": 48.137, "lon": 11.575},
                "updated_at": "2026-12-01T10:00:00Z",
            })
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({"count": 50, "items": items}))
        .expect("serialise the body");

    let rounds = 5_000_u32;
    let started = Instant::now();
    for _ in 0..rounds {
        let shaped = reshape::apply_to_bytes(&steps, &body, 2 * 1024 * 1024).expect("valid JSON");
        black_box(shaped);
    }
    started.elapsed() / rounds
}

fn report(case: &str, per_op: Duration) {
    let per_second = 1.0 / per_op.as_secs_f64();
    println!(
        "{case:<48} {:>10.2} µs/op {per_second:>12.0} op/s",
        micros(per_op)
    );
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}
