//! Forged and malformed tokens, each sent through the real Envoy and straight
//! to Check, and each refused with the right status and error code.
//!
//! Tokens that need a valid signature are signed with the provider's real
//! private key, read from its key file, so that every refusal is for the
//! reason the case names and not for a bad signature.

mod support;

use std::sync::OnceLock;

use jsonwebtoken::{Algorithm, EncodingKey};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::forge::{self, SigningKey, b64, now, sign_raw};
use support::{Stack, WEB};

fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(Stack::start)
}

fn signing_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let file = stack().dir.path().join("provider-keys.json");
        forge::provider_keys(&file).remove(0)
    })
}

fn issuer() -> String {
    format!("http://127.0.0.1:{}", stack().provider_port)
}

/// Claims the provider would issue for `demo-web`.
fn good_claims() -> Value {
    json!({
        "iss": issuer(),
        "aud": support::API_RESOURCE,
        "sub": "demo-web",
        "client_id": "demo-web",
        "scope": "vehicles:read stations:read",
        "iat": now(),
        "exp": now() + 300,
        "jti": format!("forged-{}", now()),
    })
}

fn good_header() -> Value {
    json!({ "alg": "RS256", "typ": "at+jwt", "kid": signing_key().kid })
}

/// Signs JSON values with the provider's key.
fn signed(header: &Value, claims: &Value) -> String {
    sign_raw(
        &header.to_string(),
        &claims.to_string(),
        &signing_key().encoding(),
        Algorithm::RS256,
    )
}

fn with(mut value: Value, key: &str, new: Value) -> Value {
    value[key] = new;
    value
}

fn without(mut value: Value, key: &str) -> Value {
    value.as_object_mut().expect("an object").remove(key);
    value
}

/// One forged or malformed token and what Gatehouse must answer.
struct Case {
    name: &'static str,
    token: String,
    status: u16,
    code: &'static str,
    /// Part of the error description, proving the refusal is for the reason
    /// the case names.
    why: &'static str,
}

fn case(
    name: &'static str,
    token: String,
    status: u16,
    code: &'static str,
    why: &'static str,
) -> Case {
    Case {
        name,
        token,
        status,
        code,
        why,
    }
}

fn table() -> Vec<Case> {
    let key = signing_key();
    let rsa = key.encoding();
    let header = good_header();
    let claims = good_claims();
    let good = signed(&header, &claims);
    let (good_message, good_signature) = good.rsplit_once('.').expect("three parts");
    let (good_header_b64, _) = good_message.split_once('.').expect("three parts");

    let hmac_with_public_key = sign_raw(
        &json!({ "alg": "HS256", "typ": "at+jwt", "kid": key.kid }).to_string(),
        &claims.to_string(),
        &EncodingKey::from_secret(key.public_pem.as_bytes()).expect("an HMAC key"),
        Algorithm::HS256,
    );

    let mut tampered = claims.clone();
    tampered["scope"] = json!("vehicles:read stations:read vehicles:write");
    let tampered = format!(
        "{good_header_b64}.{}.{good_signature}",
        b64(tampered.to_string())
    );

    // A valid-looking claim set with `iss` twice: the first names an
    // attacker's issuer, the last the real one. Parsers disagree on which one
    // wins, so the only safe answer is to refuse it.
    let claims_text = claims.to_string();
    let duplicate_claim = claims_text.replacen('{', "{\"iss\":\"https://evil.example\",", 1);
    let duplicate_claim = sign_raw(
        &header.to_string(),
        &duplicate_claim,
        &rsa,
        Algorithm::RS256,
    );
    let duplicate_header = format!(
        "{{\"alg\":\"RS256\",\"alg\":\"HS256\",\"typ\":\"at+jwt\",\"kid\":\"{}\"}}",
        key.kid
    );
    let duplicate_header = sign_raw(&duplicate_header, &claims_text, &rsa, Algorithm::RS256);

    // `+` and `/` are legal in a bearer token and illegal in a JWS part.
    let standard_b64 = format!(
        "{good_header_b64}.{}+/x.{good_signature}",
        b64(claims_text.clone())
    );

    let attacker_jwk = json!({ "kty": "oct", "k": b64("attacker") });

    vec![
        case(
            "alg none",
            {
                let h = b64(json!({ "alg": "none", "typ": "at+jwt" }).to_string());
                format!("{h}.{}.", b64(claims_text.clone()))
            },
            401,
            "invalid_token",
            "not a valid JWT",
        ),
        case(
            "alg none with a signature",
            {
                let h = b64(json!({ "alg": "none", "kid": key.kid }).to_string());
                format!("{h}.{}.{good_signature}", b64(claims_text.clone()))
            },
            401,
            "invalid_token",
            "not a valid JWT",
        ),
        case(
            "HMAC signed with the provider's public key",
            hmac_with_public_key,
            401,
            "invalid_token",
            "algorithm is not accepted",
        ),
        case(
            "alg ES256 with the RSA key's kid",
            sign_raw(
                &with(header.clone(), "alg", json!("ES256")).to_string(),
                &claims_text,
                &rsa,
                Algorithm::RS256,
            ),
            401,
            "invalid_token",
            "algorithm is not accepted",
        ),
        case(
            "unknown kid",
            signed(&with(header.clone(), "kid", json!("no-such-key")), &claims),
            401,
            "invalid_token",
            "unknown key",
        ),
        case(
            "kid naming a path",
            signed(
                &with(header.clone(), "kid", json!("../../../../etc/passwd")),
                &claims,
            ),
            401,
            "invalid_token",
            "unknown key",
        ),
        case(
            "kid naming a URL",
            signed(
                &with(
                    header.clone(),
                    "kid",
                    json!("https://evil.example/jwks.json"),
                ),
                &claims,
            ),
            401,
            "invalid_token",
            "unknown key",
        ),
        case(
            "jku pointing elsewhere",
            signed(
                &with(
                    with(header.clone(), "kid", json!("evil")),
                    "jku",
                    json!("https://evil.example/jwks"),
                ),
                &claims,
            ),
            401,
            "invalid_token",
            "unknown key",
        ),
        case(
            "embedded jwk",
            signed(
                &with(
                    with(header.clone(), "kid", json!("evil")),
                    "jwk",
                    attacker_jwk,
                ),
                &claims,
            ),
            401,
            "invalid_token",
            "unknown key",
        ),
        case(
            "wrong iss",
            signed(
                &header,
                &with(claims.clone(), "iss", json!("https://evil.example")),
            ),
            401,
            "invalid_token",
            "issuer is not accepted",
        ),
        case(
            "iss with a trailing slash",
            signed(
                &header,
                &with(claims.clone(), "iss", json!(format!("{}/", issuer()))),
            ),
            401,
            "invalid_token",
            "issuer is not accepted",
        ),
        case(
            "iss missing",
            signed(&header, &without(claims.clone(), "iss")),
            401,
            "invalid_token",
            "issuer is not accepted",
        ),
        case(
            "aud missing",
            signed(&header, &without(claims.clone(), "aud")),
            401,
            "invalid_token",
            "claims are invalid",
        ),
        case(
            "aud wrong",
            signed(
                &header,
                &with(
                    claims.clone(),
                    "aud",
                    json!("https://opaque.gatehouse.test"),
                ),
            ),
            401,
            "invalid_token",
            "audience is not accepted",
        ),
        case(
            "aud array without ours",
            signed(
                &header,
                &with(
                    claims.clone(),
                    "aud",
                    json!(["https://a.example", "https://b.example"]),
                ),
            ),
            401,
            "invalid_token",
            "audience is not accepted",
        ),
        case(
            "expired",
            signed(
                &header,
                &with(
                    with(claims.clone(), "exp", json!(now() - 300)),
                    "iat",
                    json!(now() - 900),
                ),
            ),
            401,
            "invalid_token",
            "expired",
        ),
        case(
            "not yet valid",
            signed(&header, &with(claims.clone(), "nbf", json!(now() + 600))),
            401,
            "invalid_token",
            "not valid yet",
        ),
        case(
            "issued in the future",
            signed(&header, &with(claims.clone(), "iat", json!(now() + 600))),
            401,
            "invalid_token",
            "issued in the future",
        ),
        case(
            "exp missing",
            signed(&header, &without(claims.clone(), "exp")),
            401,
            "invalid_token",
            "claims are invalid",
        ),
        case(
            "exp not a number",
            signed(&header, &with(claims.clone(), "exp", json!("tomorrow"))),
            401,
            "invalid_token",
            "claims are invalid",
        ),
        case(
            "client_id missing",
            signed(&header, &without(claims.clone(), "client_id")),
            401,
            "invalid_token",
            "claims are invalid",
        ),
        case(
            "modified payload, old signature",
            tampered,
            401,
            "invalid_token",
            "signature is invalid",
        ),
        case(
            "signature stripped",
            format!("{good_message}."),
            401,
            "invalid_token",
            "not a valid JWT",
        ),
        case(
            "payload in standard base64",
            standard_b64,
            401,
            "invalid_token",
            "not a valid JWT",
        ),
        case(
            "header not JSON",
            format!(
                "{}.{}.{good_signature}",
                b64("not json"),
                b64(claims_text.clone())
            ),
            401,
            "invalid_token",
            "not a valid JWT",
        ),
        case(
            "payload not JSON",
            sign_raw(&header.to_string(), "not json", &rsa, Algorithm::RS256),
            401,
            "invalid_token",
            "not a valid JWT",
        ),
        case(
            "payload a JSON array",
            sign_raw(&header.to_string(), "[1,2]", &rsa, Algorithm::RS256),
            401,
            "invalid_token",
            "not a valid JWT",
        ),
        case(
            "extra dot",
            format!("{good}.{good_signature}"),
            401,
            "invalid_token",
            "not a valid JWT",
        ),
        case(
            "four parts",
            format!("{good_header_b64}.{good}"),
            401,
            "invalid_token",
            "not a valid JWT",
        ),
        case(
            "one dot",
            good_message.to_owned(),
            401,
            "invalid_token",
            "not a valid JWT",
        ),
        case(
            "no dots",
            good_header_b64.to_owned(),
            401,
            "invalid_token",
            "not a valid JWT",
        ),
        case(
            "empty parts",
            "..".to_owned(),
            401,
            "invalid_token",
            "not a valid JWT",
        ),
        case(
            "duplicate claim name",
            duplicate_claim,
            401,
            "invalid_token",
            "duplicate",
        ),
        case(
            "duplicate header name",
            duplicate_header,
            401,
            "invalid_token",
            "duplicate",
        ),
        case(
            "unknown crit",
            signed(
                &with(
                    with(header.clone(), "crit", json!(["urn:example:x"])),
                    "urn:example:x",
                    json!(1),
                ),
                &claims,
            ),
            401,
            "invalid_token",
            "critical",
        ),
        case(
            "empty crit",
            signed(&with(header.clone(), "crit", json!([])), &claims),
            401,
            "invalid_token",
            "critical",
        ),
        case(
            "typ of an ID token",
            signed(&with(header.clone(), "typ", json!("id_token+jwt")), &claims),
            401,
            "invalid_token",
            "not an access token",
        ),
        case(
            "9 KiB token",
            signed(
                &header,
                &with(claims.clone(), "pad", json!("x".repeat(9 * 1024))),
            ),
            401,
            "invalid_token",
            "too large",
        ),
    ]
}

/// The controls: tokens made the same way that must pass, so that each
/// refusal above is for its own reason.
fn controls() -> Vec<(&'static str, String)> {
    let header = good_header();
    let claims = good_claims();

    vec![
        ("as issued", signed(&header, &claims)),
        (
            "typ JWT",
            signed(&with(header.clone(), "typ", json!("JWT")), &claims),
        ),
        (
            "aud array with ours",
            signed(
                &header,
                &with(
                    claims.clone(),
                    "aud",
                    json!(["https://a.example", support::API_RESOURCE]),
                ),
            ),
        ),
        (
            "scp array",
            signed(
                &header,
                &with(
                    without(claims.clone(), "scope"),
                    "scp",
                    json!(["vehicles:read"]),
                ),
            ),
        ),
        (
            "expired within leeway",
            signed(&header, &with(claims.clone(), "exp", json!(now() - 5))),
        ),
        (
            "not yet valid within leeway",
            signed(&header, &with(claims.clone(), "nbf", json!(now() + 5))),
        ),
        (
            "issued in the future within leeway",
            signed(&header, &with(claims.clone(), "iat", json!(now() + 5))),
        ),
    ]
}

async fn through_envoy(token: &str) -> (u16, Option<String>, String) {
    let response = reqwest::Client::new()
        .get(stack().url("/vehicles"))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("request through envoy");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, challenge, response.text().await.expect("body"))
}

fn assert_refused(via: &str, case: &Case, status: u16, challenge: Option<&str>, body: &str) {
    let name = case.name;
    assert_eq!(status, case.status, "{name} via {via}: status; body {body}");

    let body_json: Value = serde_json::from_str(body)
        .unwrap_or_else(|_| panic!("{name} via {via}: a JSON body, got {body:?}"));
    assert_eq!(body_json["error"], case.code, "{name} via {via}: {body}");
    let description = body_json["error_description"].as_str().unwrap_or_default();
    assert!(
        description.contains(case.why),
        "{name} via {via}: {description}"
    );

    let challenge = challenge.unwrap_or_else(|| panic!("{name} via {via}: no challenge"));
    assert!(
        challenge.starts_with("Bearer error=\"invalid_token\""),
        "{name} via {via}: {challenge}"
    );

    // Neither the body nor the challenge repeats any part of the token.
    for part in case.token.split('.').filter(|part| part.len() >= 8) {
        assert!(
            !body.contains(part),
            "{name} via {via}: body echoes the token"
        );
        assert!(
            !challenge.contains(part),
            "{name} via {via}: challenge echoes the token"
        );
    }
}

#[tokio::test]
async fn controls_signed_with_the_real_key_pass_both_ways() {
    for (name, token) in controls() {
        let (status, _, body) = through_envoy(&token).await;
        assert_eq!(status, 200, "{name} via envoy: {body}");

        let auth = format!("Bearer {token}");
        let checked = forge::check(
            stack().gatehouse_ports.grpc,
            "GET",
            "/vehicles",
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(checked.status, 200, "{name} via check: {}", checked.body);
    }
}

#[tokio::test]
async fn every_forged_token_is_refused_through_envoy() {
    for case in table() {
        let (status, challenge, body) = through_envoy(&case.token).await;
        assert_refused("envoy", &case, status, challenge.as_deref(), &body);
    }
}

#[tokio::test]
async fn every_forged_token_is_refused_by_check() {
    for case in table() {
        let auth = format!("Bearer {}", case.token);
        let checked = forge::check(
            stack().gatehouse_ports.grpc,
            "GET",
            "/vehicles",
            &[("authorization", &auth)],
        )
        .await;
        let challenge = checked.headers.get("www-authenticate").map(String::as_str);
        assert_refused("check", &case, checked.status, challenge, &checked.body);
    }
}

#[tokio::test]
async fn a_real_token_stays_valid_after_the_forgeries() {
    // The forgeries share `kid`, `iss` and `sub` with real tokens; none of
    // them may poison the caches (or the key set) for the real thing.
    let check = |token: String| async move {
        let auth = format!("Bearer {token}");
        let port = stack().gatehouse_ports.grpc;
        forge::check(port, "GET", "/vehicles", &[("authorization", &auth)]).await
    };
    for case in table() {
        let checked = check(case.token.clone()).await;
        assert_eq!(
            checked.status, case.status,
            "{}: {}",
            case.name, checked.body
        );
    }

    let token = support::token(&stack().token_endpoint(), WEB, "vehicles:read").await;
    let checked = check(token.clone()).await;
    assert_eq!(checked.status, 200, "via check: {}", checked.body);
    let (status, _, body) = through_envoy(&token).await;
    assert_eq!(status, 200, "via envoy: {body}");
}

/// How many requests Envoy's access log shows refused for a header block
/// over its limit.
fn envoy_431s() -> usize {
    stack()
        .envoy
        .log()
        .lines()
        .filter(|line| line.contains("\"status\":431") && line.contains("headers_too_large"))
        .count()
}

fn wait_until(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited too long for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Sends a GET with `token` over a bare HTTP/1.1 connection to Envoy and
/// returns the status of whatever answer arrives before the connection ends.
fn raw_status(token: &str) -> Option<u16> {
    let request = format!(
        "GET /vehicles HTTP/1.1\r\nhost: api\r\nconnection: close\r\nauthorization: Bearer {token}\r\n\r\n"
    );
    support::raw_request(stack().envoy_ports.listener, request.as_bytes())
        .map(|response| response.status)
}

#[tokio::test]
async fn a_one_mebibyte_token_is_stopped_by_envoy_and_refused_by_check() {
    let token = "a".repeat(1024 * 1024);

    // Envoy stops at its 60 KiB header limit: it records a 431 and closes
    // the connection while the client is still sending, so the client sees
    // no answer at all, and Check never runs.
    let before = envoy_431s();
    let status = raw_status(&token);
    assert!(status.is_none_or(|status| status == 431), "{status:?}");
    wait_until(
        || envoy_431s() > before,
        "envoy to log a 431 for the header block",
    );

    let auth = format!("Bearer {token}");
    let checked = forge::check(
        stack().gatehouse_ports.grpc,
        "GET",
        "/vehicles",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(checked.status, 401, "{}", checked.body);
    let body: Value = serde_json::from_str(&checked.body).expect("json");
    assert_eq!(body["error"], "invalid_token");
}

#[tokio::test]
async fn malformed_headers_are_refused_with_a_clear_error() {
    let token = signed(&good_header(), &good_claims());
    let cases = [
        format!("Bearer {token}, Bearer {token}"),
        format!("Basic {}", b64("demo-web:demo-web-secret")),
        "Bearer ".to_owned(),
        "Bearer".to_owned(),
        format!("Bearer {token} extra"),
    ];

    for header in cases {
        let checked = forge::check(
            stack().gatehouse_ports.grpc,
            "GET",
            "/vehicles",
            &[("authorization", &header)],
        )
        .await;
        assert_eq!(checked.status, 401, "{header:.20}: {}", checked.body);
        let body: Value = serde_json::from_str(&checked.body).expect("json");
        assert_eq!(body["error"], "invalid_token", "{header:.20}");
        assert!(
            !checked.body.contains(&token[..20]),
            "body echoes the token"
        );
    }

    // Scheme in any case works.
    let checked = forge::check(
        stack().gatehouse_ports.grpc,
        "GET",
        "/vehicles",
        &[("authorization", &format!("bEaReR {token}"))],
    )
    .await;
    assert_eq!(checked.status, 200, "{}", checked.body);
}

#[tokio::test]
async fn duplicate_authorization_headers_through_envoy_are_refused() {
    let token = signed(&good_header(), &good_claims());

    let response = reqwest::Client::new()
        .get(stack().url("/vehicles"))
        .header("authorization", format!("Bearer {token}"))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("request");

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "invalid_token");
}

#[tokio::test]
async fn a_token_in_the_query_string_is_refused() {
    let token = signed(&good_header(), &good_claims());

    let response = reqwest::Client::new()
        .get(stack().url(&format!("/vehicles?access_token={token}")))
        .send()
        .await
        .expect("request");

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "invalid_token");
    assert!(!body.to_string().contains(&token[..20]));
}

#[tokio::test]
async fn no_log_holds_a_token_sent_in_the_query_or_the_header() {
    let marker = format!("leak-check-{}", forge::now());
    let claims = with(good_claims(), "jti", json!(marker));
    let token = signed(&good_header(), &claims);
    let (_, signature) = token.rsplit_once('.').expect("three parts");
    let client = reqwest::Client::new();

    // In the query (refused here, but logged by Envoy all the same), and in
    // the header (allowed, and seen by Gatehouse).
    let query = stack().url(&format!("/vehicles/{marker}-query?access_token={token}"));
    let response = client.get(query).send().await.expect("request");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let header = stack().url(&format!("/vehicles/{marker}-header"));
    let response = client
        .get(header)
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    assert_ne!(response.status(), StatusCode::UNAUTHORIZED);

    // Envoy writes its access log asynchronously: wait for both lines.
    wait_until(
        || {
            let log = stack().envoy.log();
            log.contains(&format!("{marker}-query")) && log.contains(&format!("{marker}-header"))
        },
        "envoy to log both requests",
    );

    for (name, log) in [
        ("envoy", stack().envoy.log()),
        ("gatehouse", stack().gatehouse.log()),
    ] {
        assert!(!log.contains(&token), "{name}'s log holds the token");
        assert!(
            !log.contains(signature),
            "{name}'s log holds the token's signature"
        );
    }
}
