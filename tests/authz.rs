//! Per-route authorization and forwarded identity, with several providers:
//! all-of and any-of scopes, claim conditions, the identity headers set and
//! removed, query tokens where enabled, a smaller token limit, and a second
//! provider (matched by `iss`) that signs with a shared secret and so needs
//! no JWKS, not even to be ready.

mod support;

use std::sync::OnceLock;

use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use support::API_RESOURCE;
use support::forge::{self, Checked, Gate, SigningKey, description, now, sign_claims, sign_raw};
use tonic_health::pb::health_check_response::ServingStatus;

const HMAC_ISSUER: &str = "https://internal.gatehouse.test";
const HMAC_SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

fn config() -> String {
    format!(
        "
server:
  listen: ${{GATEHOUSE_LISTEN}}
  admin_listen: ${{GATEHOUSE_ADMIN_LISTEN}}
providers:
  - issuer: ${{GATEHOUSE_ISSUER}}
    audiences: [{API_RESOURCE}]
  - issuer: {HMAC_ISSUER}
    audiences: [internal]
    algorithms: [HS256]
    hmac_secret: {HMAC_SECRET}
    required_claims: [jti]
tokens:
  max_bytes: 4096
  allow_query: true
  forward:
    client_id: x-client
    subject: null
    scopes: x-scopes
    claims: {{tenant: x-tenant, groups: x-groups, note: x-note}}
routes:
  - name: reports
    prefix: /reports
    any_scopes: [vehicles:read, stations:read]
  - name: admin
    prefix: /admin
    scopes: [vehicles:read, vehicles:write]
  - name: tenant
    prefix: /tenant
    claims:
      - {{claim: tenant, equals: acme}}
      - {{claim: groups, one_of: [ops, admin]}}
      - {{claim: sub, pattern: 'demo-[a-z]+'}}
"
    )
}

struct Setup {
    gate: Gate,
    key: SigningKey,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let gate = Gate::start(&config(), true);
        let key = forge::provider_keys(&gate.keys).remove(0);
        Setup { gate, key }
    })
}

fn issuer() -> String {
    format!("http://127.0.0.1:{}", setup().gate.provider_port)
}

fn claims(scope: &str) -> Value {
    json!({
        "iss": issuer(),
        "aud": API_RESOURCE,
        "sub": "demo-web",
        "client_id": "demo-web",
        "scope": scope,
        "iat": now(),
        "exp": now() + 300,
        "tenant": "acme",
        "groups": ["dev", "ops"],
    })
}

async fn check(path: &str, token: &str) -> Checked {
    // Keys load in the background; the first call may come too early.
    setup()
        .gate
        .wait_for_status(
            "/reports",
            &sign_claims(&setup().key, &claims("vehicles:read")),
            200,
        )
        .await;
    setup().gate.check(path, token).await
}

/// Envoy with the repository's config in front of the Gatehouse above,
/// started on first use. Its routes know nothing of `/tenant` or `/admin`:
/// ext_authz runs first on every route, so Gatehouse's answer is what the
/// client gets.
fn envoy_port() -> u16 {
    static ENVOY: OnceLock<(support::Proc, u16)> = OnceLock::new();
    ENVOY
        .get_or_init(|| {
            let gate = &setup().gate;
            let (proc, ports) = support::envoy(
                gate.dir.path(),
                gate.ports.grpc,
                support::free_port(),
                support::free_port(),
                None,
            );
            (proc, ports.listener)
        })
        .1
}

fn challenge(checked: &Checked) -> &str {
    checked
        .headers
        .get("www-authenticate")
        .map_or("", String::as_str)
}

fn error(checked: &Checked) -> String {
    let body: Value = serde_json::from_str(&checked.body).unwrap_or_default();
    body["error"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn claim_and_scope_refusals_reach_the_client_through_envoy() {
    let key = &setup().key;
    // Keys loaded: Check answers with its verdicts, not with a 503.
    check("/reports", &sign_claims(key, &claims("vehicles:read"))).await;
    let port = envoy_port();
    let http = reqwest::Client::new();

    let mut wrong_tenant = claims("vehicles:read");
    wrong_tenant["tenant"] = json!("globex");
    let cases = [
        ("/tenant", sign_claims(key, &wrong_tenant), "claim_mismatch"),
        (
            "/admin",
            sign_claims(key, &claims("vehicles:read")),
            "insufficient_scope",
        ),
    ];
    for (path, token, code) in cases {
        let response = http
            .get(format!("http://127.0.0.1:{port}{path}"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("request through envoy");

        assert_eq!(response.status(), reqwest::StatusCode::FORBIDDEN, "{path}");
        let challenge = response
            .headers()
            .get("www-authenticate")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            challenge.starts_with("Bearer error=\"insufficient_scope\""),
            "{path}: {challenge}"
        );
        let body: Value = response.json().await.expect("json body");
        assert_eq!(body["error"], code, "{path}: {body}");
    }

    // The same client with the right tenant passes Envoy too (its route is
    // Envoy's catch-all 404, which only an allowed request reaches).
    let response = http
        .get(format!("http://127.0.0.1:{port}/tenant"))
        .bearer_auth(sign_claims(key, &claims("vehicles:read")))
        .send()
        .await
        .expect("request through envoy");
    assert_eq!(response.status(), reqwest::StatusCode::NOT_FOUND);
    let body: Value = response.json().await.expect("json body");
    assert_eq!(body, json!({"error": "not_found"}), "Envoy's own 404");
}

#[tokio::test]
async fn any_of_scopes_takes_one_and_names_what_to_ask_for() {
    let key = &setup().key;

    let one = check("/reports", &sign_claims(key, &claims("stations:read"))).await;
    assert_eq!(one.status, 200, "{}", one.body);

    let none = check("/reports", &sign_claims(key, &claims("other"))).await;
    assert_eq!(none.status, 403);
    assert_eq!(error(&none), "insufficient_scope");
    assert_eq!(
        challenge(&none),
        "Bearer error=\"insufficient_scope\", scope=\"vehicles:read\""
    );
}

#[tokio::test]
async fn all_of_scopes_needs_each() {
    let key = &setup().key;

    let partial = check("/admin", &sign_claims(key, &claims("vehicles:read"))).await;
    assert_eq!(partial.status, 403);
    assert!(challenge(&partial).contains("scope=\"vehicles:read vehicles:write\""));

    let scp = without_scope_with_scp(&["vehicles:read", "vehicles:write"]);
    let both = check("/admin", &sign_claims(key, &scp)).await;
    assert_eq!(both.status, 200, "scp counts like scope: {}", both.body);
}

fn without_scope_with_scp(scp: &[&str]) -> Value {
    let mut value = claims("");
    value.as_object_mut().expect("object").remove("scope");
    value["scp"] = json!(scp);
    value
}

#[tokio::test]
async fn claim_conditions_must_all_hold() {
    let key = &setup().key;

    let good = check("/tenant", &sign_claims(key, &claims(""))).await;
    assert_eq!(good.status, 200, "{}", good.body);

    for (claim, value) in [
        ("tenant", json!("acme-evil")),
        ("groups", json!(["dev"])),
        ("sub", json!("demo-web2")),
        ("tenant", Value::Null),
    ] {
        let mut bad = claims("");
        bad[claim] = value;
        let checked = check("/tenant", &sign_claims(key, &bad)).await;
        assert_eq!(checked.status, 403, "{claim}");
        assert_eq!(error(&checked), "claim_mismatch", "{claim}");
        assert!(
            description(&checked).contains(claim),
            "{claim}: {}",
            checked.body
        );
        assert!(challenge(&checked).starts_with("Bearer error=\"insufficient_scope\""));
    }
}

#[tokio::test]
async fn configured_identity_headers_are_set_and_every_other_name_removed() {
    let key = &setup().key;
    let mut token_claims = claims("vehicles:read stations:read");
    token_claims["note"] = json!("line\r\nx-injected: 1");

    let checked = check("/reports", &sign_claims(key, &token_claims)).await;

    assert_eq!(checked.status, 200, "{}", checked.body);
    assert_eq!(
        checked.headers.get("x-client").map(String::as_str),
        Some("demo-web")
    );
    assert_eq!(
        checked.headers.get("x-scopes").map(String::as_str),
        Some("vehicles:read stations:read")
    );
    assert_eq!(
        checked.headers.get("x-tenant").map(String::as_str),
        Some("acme")
    );
    assert_eq!(
        checked.headers.get("x-groups").map(String::as_str),
        Some("dev,ops")
    );
    assert!(
        !checked.headers.contains_key("x-note"),
        "an unsafe value is not forwarded"
    );
    assert!(!checked.headers.contains_key("x-gatehouse-subject"));
    for removed in [
        "authorization",
        "x-note",
        "x-gatehouse-client-id",
        "x-gatehouse-subject",
    ] {
        assert!(
            checked.removed.iter().any(|name| name == removed),
            "{removed}"
        );
    }
}

#[tokio::test]
async fn query_tokens_work_when_enabled_and_the_size_limit_is_configurable() {
    let key = &setup().key;
    let token = sign_claims(key, &claims("vehicles:read"));
    check("/reports", &token).await;

    let checked = forge::check(
        setup().gate.ports.grpc,
        "GET",
        &format!("/reports?x=1&access_token={token}"),
        &[],
    )
    .await;
    assert_eq!(checked.status, 200, "{}", checked.body);
    assert_eq!(
        checked.removed_query,
        ["access_token"],
        "the token is cut from the path the service gets"
    );

    let mut big = claims("vehicles:read");
    big["pad"] = json!("x".repeat(4096));
    let checked = check("/reports", &sign_claims(key, &big)).await;
    assert_eq!(checked.status, 401);
    assert!(
        description(&checked).contains("too large"),
        "{}",
        checked.body
    );
}

fn hmac_token(iss: &str, secret: &str) -> String {
    let claims = json!({
        "iss": iss,
        "aud": "internal",
        "client_id": "batch",
        "jti": "j-1",
        "iat": now(),
        "exp": now() + 300,
    });
    sign_raw(
        &json!({"alg": "HS256", "typ": "at+jwt"}).to_string(),
        &claims.to_string(),
        &EncodingKey::from_secret(secret.as_bytes()).expect("hmac key"),
        Algorithm::HS256,
    )
}

#[tokio::test]
async fn tokens_are_matched_to_their_provider_by_iss() {
    let key = &setup().key;

    // The second provider takes HMAC tokens made with its own secret.
    let internal = check("/reports", &hmac_token(HMAC_ISSUER, HMAC_SECRET)).await;
    assert_eq!(
        internal.status, 403,
        "verified, then short of scopes: {}",
        internal.body
    );
    assert_eq!(error(&internal), "insufficient_scope");

    let wrong_secret = check("/reports", &hmac_token(HMAC_ISSUER, &"b".repeat(40))).await;
    assert!(
        description(&wrong_secret).contains("signature"),
        "{}",
        wrong_secret.body
    );

    // The first provider never takes HMAC, whatever the secret.
    let hmac_for_first = check("/reports", &hmac_token(&issuer(), HMAC_SECRET)).await;
    assert!(
        description(&hmac_for_first).contains("algorithm"),
        "{}",
        hmac_for_first.body
    );

    // An RSA token claiming the HMAC provider is refused: HS256 only there.
    let mut rsa = claims("vehicles:read");
    rsa["iss"] = json!(HMAC_ISSUER);
    rsa["aud"] = json!("internal");
    let checked = check("/reports", &sign_claims(key, &rsa)).await;
    assert!(
        description(&checked).contains("algorithm"),
        "{}",
        checked.body
    );

    // Required claims are per provider: no `jti`, no entry.
    let mut no_jti: Value = json!({
        "iss": HMAC_ISSUER, "aud": "internal", "client_id": "batch",
        "iat": now(), "exp": now() + 300,
    });
    no_jti["scope"] = json!("vehicles:read");
    let token = sign_raw(
        &json!({"alg": "HS256"}).to_string(),
        &no_jti.to_string(),
        &EncodingKey::from_secret(HMAC_SECRET.as_bytes()).expect("hmac key"),
        Algorithm::HS256,
    );
    let checked = check("/reports", &token).await;
    assert!(
        description(&checked).contains("claims are invalid"),
        "{}",
        checked.body
    );

    // An issuer nobody configured.
    let mut stranger = claims("vehicles:read");
    stranger["iss"] = json!("https://elsewhere.example");
    let checked = check("/reports", &sign_claims(key, &stranger)).await;
    assert_eq!(checked.status, 401);
    assert!(description(&checked).contains("issuer"), "{}", checked.body);
}

#[tokio::test]
async fn a_provider_with_only_hmac_is_ready_with_no_jwks_anywhere() {
    // No OAuth2 provider runs, and the HMAC provider names no `jwks_uri`:
    // its secret is its key, so nothing needs fetching before it is ready.
    let config = format!(
        "
server:
  listen: ${{GATEHOUSE_LISTEN}}
  admin_listen: ${{GATEHOUSE_ADMIN_LISTEN}}
provider:
  issuer: {HMAC_ISSUER}
  audiences: [internal]
  algorithms: [HS256]
  hmac_secret: {HMAC_SECRET}
routes:
  - name: reports
    prefix: /reports
    scopes: [vehicles:read]
"
    );
    let gate = Gate::start(&config, false);

    gate.wait_for_health(ServingStatus::Serving).await;

    let mut claims = json!({
        "iss": HMAC_ISSUER, "aud": "internal", "client_id": "batch",
        "scope": "vehicles:read", "iat": now(), "exp": now() + 300,
    });
    let token = |claims: &Value| {
        sign_raw(
            &json!({"alg": "HS256", "typ": "at+jwt"}).to_string(),
            &claims.to_string(),
            &EncodingKey::from_secret(HMAC_SECRET.as_bytes()).expect("hmac key"),
            Algorithm::HS256,
        )
    };
    let checked = gate.check("/reports", &token(&claims)).await;
    assert_eq!(checked.status, 200, "{}", checked.body);
    assert_eq!(
        checked
            .headers
            .get("x-gatehouse-client-id")
            .map(String::as_str),
        Some("batch")
    );

    // Verified, not waved through: a wrong audience is still refused.
    claims["aud"] = json!("elsewhere");
    let checked = gate.check("/reports", &token(&claims)).await;
    assert_eq!(checked.status, 401, "{}", checked.body);
    assert!(!gate.gatehouse.log().contains("cannot fetch signing keys"));
}
