//! Opaque tokens through the real Envoy, checked by introspection at the
//! real provider: active, revoked and expired tokens, one call for many
//! concurrent requests, a slow provider (introspection and JWKS), and a route
//! that takes both kinds.
//!
//! The tests share one stack and change the provider's settings, so they
//! take turns. The caching and failure tests run against a Gatehouse of
//! their own (no Envoy), with short cache lifetimes and calls counted at the
//! provider.

mod support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use support::forge::{self, Checked, Gate, OPAQUE_RESOURCE};
use support::{MOBILE, PARTNER, Stack, WEB};
use tokio::sync::Mutex;

/// The `gatehouse` client may ask for tokens too; it gives a fourth rate-limit
/// bucket on the stations route.
const INTROSPECTOR: (&str, &str) = ("gatehouse", "gatehouse-introspection-secret");

fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(Stack::start)
}

/// One test at a time: they change the provider's delay and token lifetime.
static TURN: Mutex<()> = Mutex::const_new(());

async fn opaque(client: (&str, &str)) -> String {
    forge::token_for(
        stack().provider_port,
        client,
        "stations:read",
        OPAQUE_RESOURCE,
    )
    .await
}

async fn introspections() -> u64 {
    forge::provider_stats(stack().provider_port).await["introspection"]
        .as_u64()
        .expect("an introspection count")
}

async fn jwks_fetches() -> u64 {
    forge::provider_stats(stack().provider_port).await["jwks"]
        .as_u64()
        .expect("a jwks count")
}

async fn get(path: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(stack().url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("request through envoy")
}

async fn error_of(response: reqwest::Response) -> (String, String) {
    let body: Value = response.json().await.expect("a JSON body from gatehouse");
    let code = body["error"].as_str().unwrap_or_default().to_owned();
    let description = body["error_description"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (code, description)
}

#[tokio::test]
async fn an_active_opaque_token_passes_and_is_introspected_once() {
    let _turn = TURN.lock().await;
    let token = opaque(PARTNER).await;
    assert!(
        !token.contains('.'),
        "the provider issues opaque tokens here"
    );
    let before = introspections().await;

    let response = get("/stations", &token).await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = get("/stations", &token).await;
    assert_eq!(response.status(), StatusCode::OK);

    assert_eq!(introspections().await - before, 1, "the verdict is cached");
    let seen = support::upstream_requests(stack().stations_port).await;
    let last = seen.last().expect("the upstream saw the request");
    assert_eq!(last["headers"]["x-gatehouse-client-id"], "demo-partner");
    assert_eq!(last["headers"]["x-gatehouse-scopes"], "stations:read");
    assert!(last["headers"].get("authorization").is_none());
}

#[tokio::test]
async fn concurrent_requests_with_one_token_share_one_introspection() {
    let _turn = TURN.lock().await;
    let token = opaque(MOBILE).await;
    let before = introspections().await;

    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let token = token.clone();
        requests.spawn(async move { get("/stations", &token).await.status() });
    }
    let mut allowed = 0;
    while let Some(status) = requests.join_next().await {
        let status = status.expect("a request task");
        // The stations limit (5 a minute) turns the rest into 429s; none may
        // be a token failure.
        assert!(
            status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
            "{status}"
        );
        allowed += usize::from(status == StatusCode::OK);
    }

    assert!(allowed >= 1);
    assert_eq!(
        introspections().await - before,
        1,
        "one call for 20 requests"
    );
}

#[tokio::test]
async fn a_revoked_opaque_token_is_refused() {
    let _turn = TURN.lock().await;
    let token = opaque(WEB).await;
    forge::revoke(stack().provider_port, WEB, &token).await;

    let response = get("/stations", &token).await;

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let challenge = response.headers()["www-authenticate"]
        .to_str()
        .expect("ascii");
    assert!(challenge.contains("invalid_token"), "{challenge}");
    let (code, description) = error_of(response).await;
    assert_eq!(code, "invalid_token");
    assert!(description.contains("not active"), "{description}");
}

#[tokio::test]
async fn an_expired_opaque_token_is_refused_once_it_expires() {
    let _turn = TURN.lock().await;
    forge::provider_control(stack().provider_port, "/__opaque_ttl?seconds=2").await;
    let token = opaque(INTROSPECTOR).await;
    forge::provider_control(stack().provider_port, "/__opaque_ttl?seconds=0").await;

    let first = get("/stations", &token).await.status();
    assert_eq!(first, StatusCode::OK);

    // Cached until its `exp`, then asked again, and then inactive.
    let deadline = Instant::now() + Duration::from_secs(20);
    let response = loop {
        let response = get("/stations", &token).await;
        if response.status() == StatusCode::UNAUTHORIZED {
            break response;
        }
        assert!(
            Instant::now() < deadline,
            "still {} after expiry",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (code, _) = error_of(response).await;
    assert_eq!(code, "invalid_token");
}

#[tokio::test]
async fn a_slow_provider_gets_a_503_from_gatehouse_before_envoy_gives_up() {
    let _turn = TURN.lock().await;
    let token = opaque(WEB).await;
    forge::provider_control(stack().provider_port, "/__delay?ms=1500").await;

    let response = get("/stations", &token).await;

    // A JWT with a new `kid` makes Gatehouse refetch the keys from the slow
    // provider: the fetch gives up within its budget, and the answer is
    // Gatehouse's own 401.
    let keys = forge::provider_keys(&stack().dir.path().join("provider-keys.json"));
    let issuer = format!("http://127.0.0.1:{}", stack().provider_port);
    let stranger = forge::sign_like_provider(&issuer, &keys[0], "kid-from-the-future");
    let fetches = jwks_fetches().await;
    let refused = get("/vehicles", &stranger).await;
    forge::provider_control(stack().provider_port, "/__delay?ms=0").await;

    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let (_, description) = error_of(refused).await;
    assert!(description.contains("unknown key"), "{description}");
    assert_eq!(jwks_fetches().await, fetches + 1, "the refetch was tried");

    // Envoy's own timeout answer would have no body; this one is Gatehouse's.
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    let (code, description) = error_of(response).await;
    assert_eq!(code, "temporarily_unavailable");
    assert!(description.contains("introspection"), "{description}");

    // The failure was not cached: the retry succeeds.
    let response = get("/stations", &token).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_route_takes_the_kinds_it_lists() {
    let _turn = TURN.lock().await;

    // /stations takes both kinds.
    let jwt = support::token(&stack().token_endpoint(), PARTNER, "stations:read").await;
    assert_eq!(get("/stations", &jwt).await.status(), StatusCode::OK);

    // /vehicles takes JWTs only; an opaque token is never introspected there.
    let token = forge::token_for(
        stack().provider_port,
        PARTNER,
        "vehicles:read",
        OPAQUE_RESOURCE,
    )
    .await;
    let before = introspections().await;
    let response = get("/vehicles", &token).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(introspections().await, before);

    // A made-up opaque token is refused after introspection.
    let made_up = "a".repeat(43);
    let response = get("/stations", &made_up).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let (_, description) = error_of(response).await;
    assert!(description.contains("not active"), "{description}");
}

// === caching and failures, against a Gatehouse of their own ===

/// How long this Gatehouse reuses an active verdict, whatever the token's
/// `exp` (600 s at the provider).
const ACTIVE_CACHE: Duration = Duration::from_secs(3);

/// How long it reuses an inactive one.
const INACTIVE_CACHE: Duration = Duration::from_secs(2);

/// A Gatehouse that introspects at `endpoint` (`${GATEHOUSE_ISSUER}` names
/// the provider) on a route that takes only opaque tokens, unlimited.
fn gate_config(endpoint: &str) -> String {
    format!(
        "
server:
  listen: ${{GATEHOUSE_LISTEN}}
  admin_listen: ${{GATEHOUSE_ADMIN_LISTEN}}
  drain_seconds: 1
provider:
  issuer: ${{GATEHOUSE_ISSUER}}
  audiences: [{api}]
  introspection:
    endpoint: {endpoint}
    client_id: {id}
    client_secret: {secret}
    audiences: [{OPAQUE_RESOURCE}]
    cache_seconds: {active}
    inactive_cache_seconds: {inactive}
routes:
  - name: stations
    prefix: /stations
    tokens: [opaque]
",
        api = support::API_RESOURCE,
        id = INTROSPECTOR.0,
        secret = INTROSPECTOR.1,
        active = ACTIVE_CACHE.as_secs(),
        inactive = INACTIVE_CACHE.as_secs(),
    )
}

/// The Gatehouse and provider the caching tests share.
fn gate() -> &'static Gate {
    static GATE: OnceLock<Gate> = OnceLock::new();
    GATE.get_or_init(|| {
        Gate::start(
            &gate_config("${GATEHOUSE_ISSUER}/token/introspection"),
            true,
        )
    })
}

/// One caching test at a time: each counts the provider's calls.
static GATE_TURN: Mutex<()> = Mutex::const_new(());

async fn gate_opaque(client: (&str, &str)) -> String {
    forge::token_for(
        gate().provider_port,
        client,
        "stations:read",
        OPAQUE_RESOURCE,
    )
    .await
}

async fn gate_introspections() -> u64 {
    forge::provider_stats(gate().provider_port).await["introspection"]
        .as_u64()
        .expect("an introspection count")
}

/// Sends `token` to Check `times` times, each answered `status`; returns
/// when the first was sent.
async fn check_times(token: &str, times: usize, status: u16) -> Instant {
    let started = Instant::now();
    for _ in 0..times {
        let checked = gate().check("/stations", token).await;
        assert_eq!(checked.status, status, "{}", checked.body);
    }
    started
}

/// Fails loudly when the requests meant to fall inside a cache lifetime took
/// longer than it, rather than letting a slow machine prove nothing.
fn assert_within(started: Instant, lifetime: Duration) {
    let took = started.elapsed();
    assert!(
        took < lifetime,
        "the requests took {took:?}, longer than the {lifetime:?} cache they test"
    );
}

fn assert_unavailable(checked: &Checked) {
    assert_eq!(checked.status, 503, "{}", checked.body);
    assert_eq!(
        checked.headers.get("retry-after").map(String::as_str),
        Some("1")
    );
    let body: Value = serde_json::from_str(&checked.body).expect("a JSON body");
    assert_eq!(body["error"], "temporarily_unavailable");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|text| text.contains("introspection")),
        "{body}"
    );
}

#[tokio::test]
async fn an_active_token_is_asked_once_for_many_requests() {
    let _turn = GATE_TURN.lock().await;
    let token = gate_opaque(PARTNER).await;
    let before = gate_introspections().await;

    let started = check_times(&token, 6, 200).await;

    assert_within(started, ACTIVE_CACHE);
    assert_eq!(
        gate_introspections().await - before,
        1,
        "one call, six requests"
    );
}

#[tokio::test]
async fn an_inactive_verdict_is_reused_for_its_lifetime_then_asked_again() {
    let _turn = GATE_TURN.lock().await;
    let token = gate_opaque(WEB).await;
    forge::revoke(gate().provider_port, WEB, &token).await;
    let before = gate_introspections().await;

    let started = check_times(&token, 4, 401).await;
    assert_within(started, INACTIVE_CACHE);
    assert_eq!(
        gate_introspections().await - before,
        1,
        "the verdict is reused"
    );

    // Past inactive_cache_seconds the provider is asked again.
    tokio::time::sleep(INACTIVE_CACHE + Duration::from_millis(500)).await;
    check_times(&token, 2, 401).await;
    assert_eq!(gate_introspections().await - before, 2, "asked again, once");
}

#[tokio::test]
async fn cache_seconds_caps_an_active_verdict_whose_exp_is_far_away() {
    let _turn = GATE_TURN.lock().await;
    let token = gate_opaque(MOBILE).await;
    let before = gate_introspections().await;

    let started = check_times(&token, 3, 200).await;
    assert_within(started, ACTIVE_CACHE);
    assert_eq!(gate_introspections().await - before, 1);

    // The token is good for ten minutes, but the verdict only for
    // cache_seconds: then the provider is asked again (a revocation would
    // show now).
    tokio::time::sleep(ACTIVE_CACHE + Duration::from_millis(500)).await;
    check_times(&token, 2, 200).await;
    assert_eq!(gate_introspections().await - before, 2, "asked again, once");
}

#[tokio::test]
async fn an_endpoint_answering_500_gets_a_503_and_is_not_cached() {
    let _turn = GATE_TURN.lock().await;
    let token = gate_opaque(INTROSPECTOR).await;
    let port = gate().provider_port;
    let before = gate_introspections().await;

    forge::provider_control(port, "/__introspection_status?code=500").await;
    let checked = gate().check("/stations", &token).await;
    forge::provider_control(port, "/__introspection_status?code=0").await;

    assert_unavailable(&checked);
    assert_eq!(gate_introspections().await - before, 1, "the call was made");

    // The failure was not cached: the next request asks again, and passes.
    let checked = gate().check("/stations", &token).await;
    assert_eq!(checked.status, 200, "{}", checked.body);
    assert_eq!(gate_introspections().await - before, 2);
}

#[tokio::test]
async fn an_endpoint_refusing_connections_gets_a_503() {
    // Nothing listens on a port that was just free.
    let closed = support::free_port();
    let gate = Gate::start(
        &gate_config(&format!("http://127.0.0.1:{closed}/token/introspection")),
        true,
    );
    let token = forge::token_for(
        gate.provider_port,
        PARTNER,
        "stations:read",
        OPAQUE_RESOURCE,
    )
    .await;

    let checked = gate.check("/stations", &token).await;

    assert_unavailable(&checked);
    assert!(
        gate.gatehouse.log().contains("introspection failed"),
        "the failure is logged"
    );
}
