//! End to end through the real Envoy: a client, Envoy, Gatehouse (ext_authz
//! and ext_proc), the sample services, the OAuth2 provider and Redis.
//!
//! The tests share one stack; each uses its own client or route where counts
//! could collide.

mod support;

use std::sync::OnceLock;

use reqwest::StatusCode;
use serde_json::Value;
use support::{MOBILE, PARTNER, Stack, WEB};

fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(Stack::start)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().build().expect("http client")
}

async fn token(client: (&str, &str)) -> String {
    support::token(
        &stack().token_endpoint(),
        client,
        "vehicles:read stations:read",
    )
    .await
}

async fn get(path: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = client().get(stack().url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("request through envoy")
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

#[tokio::test]
async fn no_token_gets_401_with_a_bearer_challenge_and_json() {
    let response = get("/vehicles", None).await;

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(&response, "www-authenticate"), Some("Bearer"));
    let body: Value = response.json().await.expect("json body");
    assert_eq!(body["error"], "missing_token");
}

#[tokio::test]
async fn valid_token_reaches_the_upstream_with_identity_and_without_the_token() {
    let token = token(WEB).await;
    let marker = "valid-token-marker";

    let response = client()
        .get(stack().url("/vehicles"))
        .bearer_auth(&token)
        .header("x-test-marker", marker)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json body");
    assert_eq!(body["count"], 3);
    assert!(
        body["items"][0]["owner"].is_object(),
        "the web profile keeps the service's shape"
    );

    let seen = support::upstream_requests(stack().vehicles_port).await;
    let request = seen
        .iter()
        .rev()
        .find(|r| r["headers"]["x-test-marker"] == marker)
        .expect("the upstream saw the request");
    assert_eq!(request["headers"]["x-gatehouse-client-id"], "demo-web");
    assert_eq!(request["headers"]["x-gatehouse-subject"], "demo-web");
    assert!(
        request["headers"].get("authorization").is_none(),
        "the token must not reach services"
    );
}

#[tokio::test]
async fn tampered_signature_is_refused() {
    let token = token(WEB).await;
    let signature_start = token.rfind('.').expect("a JWT") + 1;
    let middle = signature_start + (token.len() - signature_start) / 2;
    let mut bytes = token.into_bytes();
    bytes[middle] = if bytes[middle] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(bytes).expect("ascii");

    let response = get("/vehicles", Some(&tampered)).await;

    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let challenge = header(&response, "www-authenticate")
        .expect("challenge")
        .to_owned();
    assert!(challenge.contains("invalid_token"), "{challenge}");
    let body: Value = response.json().await.expect("json body");
    assert_eq!(body["error"], "invalid_token");
}

#[tokio::test]
async fn spoofed_identity_headers_never_reach_the_upstream() {
    let token = token(WEB).await;

    // Protected route: Gatehouse's own value wins.
    let response = client()
        .get(stack().url("/vehicles/v-1"))
        .bearer_auth(&token)
        .header("x-gatehouse-client-id", "admin")
        .header("x-test-marker", "spoof-protected")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);

    // Public route: nobody sets it.
    let response = client()
        .get(stack().url("/stations/status"))
        .header("x-gatehouse-client-id", "admin")
        .header("x-gatehouse-subject", "root")
        .header("x-test-marker", "spoof-public")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);

    // Underscored variants are refused by Envoy outright: a 400, or on
    // HTTP/1.1 a closed connection, and never a forwarded request.
    let response = client()
        .get(stack().url("/stations/status"))
        .header("x_gatehouse_client_id", "admin")
        .send()
        .await;
    if let Ok(response) = response {
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }

    let vehicles = support::upstream_requests(stack().vehicles_port).await;
    let protected = vehicles
        .iter()
        .find(|r| r["headers"]["x-test-marker"] == "spoof-protected")
        .expect("protected request seen");
    assert_eq!(protected["headers"]["x-gatehouse-client-id"], "demo-web");

    let stations = support::upstream_requests(stack().stations_port).await;
    let public = stations
        .iter()
        .find(|r| r["headers"]["x-test-marker"] == "spoof-public")
        .expect("public request seen");
    assert!(
        public["headers"].get("x-gatehouse-client-id").is_none(),
        "{public}"
    );
    assert!(
        public["headers"].get("x-gatehouse-subject").is_none(),
        "{public}"
    );
    assert!(
        stations
            .iter()
            .all(|r| r["headers"].get("x_gatehouse_client_id").is_none())
    );
}

#[tokio::test]
async fn paths_get_the_decision_of_the_route_envoy_serves() {
    let token = token(WEB).await;

    // Normalised by Envoy to /vehicles and /vehicles/v-1: the vehicles route.
    assert_eq!(
        get("//vehicles", Some(&token)).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        get("/stations/../vehicles/v-1", Some(&token))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        get("//vehicles", None).await.status(),
        StatusCode::UNAUTHORIZED
    );

    // Not the vehicles route, and no other route: denied.
    for path in ["/vehicles/../admin", "/vehiclesX", "/VEHICLES", "/admin"] {
        let response = get(path, Some(&token)).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }

    // Escaped slashes are refused before anything else.
    assert_eq!(
        get("/vehicles%2Fv-1", Some(&token)).await.status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn request_past_the_limit_gets_429_with_retry_after() {
    // The stations policy allows 5 per minute; only this test uses the
    // partner client on stations.
    let token = token(PARTNER).await;

    for n in 1..=5 {
        let response = get("/stations", Some(&token)).await;
        assert_eq!(response.status(), StatusCode::OK, "request {n}");
        assert!(
            header(&response, "ratelimit").is_some(),
            "allowed responses describe the limit"
        );
    }

    let response = get("/stations", Some(&token)).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = header(&response, "retry-after")
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: Value = response.json().await.expect("json body");
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["policy"], "stations");
}

#[tokio::test]
async fn mobile_client_gets_the_reshaped_body_with_a_correct_length() {
    let token = token(MOBILE).await;

    let response = get("/vehicles", Some(&token)).await;
    assert_eq!(response.status(), StatusCode::OK);

    // The upstream's content-length described the full body; the reshaped
    // one is sent with its own length, never the old one and never chunked.
    let length: usize = header(&response, "content-length")
        .expect("a reshaped body of known length keeps a content-length")
        .parse()
        .expect("number");
    let bytes = response.bytes().await.expect("body");
    assert_eq!(bytes.len(), length);
    let direct = reqwest::get(format!(
        "http://127.0.0.1:{}/vehicles",
        stack().vehicles_port
    ))
    .await
    .expect("direct")
    .bytes()
    .await
    .expect("direct body");
    assert!(bytes.len() < direct.len(), "the reshaped body is smaller");

    let body: Value = serde_json::from_slice(&bytes).expect("json");
    let first = &body["items"][0];
    assert!(
        first["id"].is_string() && first["battery"]["soc"].is_number(),
        "{body}"
    );
    assert!(
        first.get("owner").is_none() && first.get("vin").is_none(),
        "{body}"
    );
    assert!(first["battery"].get("capacity_wh").is_none(), "{body}");
}

#[tokio::test]
async fn large_bodies_reach_a_mobile_client_intact() {
    let token = token(MOBILE).await;

    for path in ["/vehicles/download", "/vehicles/big"] {
        let direct = reqwest::get(format!("http://127.0.0.1:{}{path}", stack().vehicles_port))
            .await
            .expect("direct")
            .bytes()
            .await
            .expect("direct body");
        assert!(direct.len() >= 5 * 1024 * 1024, "{path} is at least 5 MiB");

        let response = get(path, Some(&token)).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let through = response.bytes().await.expect("body");
        assert!(through == direct, "{path} changed on the way");
    }
}

#[tokio::test]
async fn non_json_bodies_pass_unchanged_for_a_mobile_client() {
    let token = token(MOBILE).await;

    let response = get("/vehicles/text", Some(&token)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let direct = reqwest::get(format!(
        "http://127.0.0.1:{}/vehicles/text",
        stack().vehicles_port
    ))
    .await
    .expect("direct")
    .text()
    .await
    .expect("text");
    assert_eq!(response.text().await.expect("text"), direct);
}

#[tokio::test]
async fn cors_preflight_needs_no_token_and_denials_carry_cors_headers() {
    let origin = "https://web.gatehouse.test";

    let preflight = client()
        .request(reqwest::Method::OPTIONS, stack().url("/vehicles"))
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .expect("preflight");
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(
        header(&preflight, "access-control-allow-origin"),
        Some(origin)
    );

    let denied = client()
        .get(stack().url("/vehicles"))
        .header("origin", origin)
        .send()
        .await
        .expect("get");
    assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(&denied, "access-control-allow-origin"), Some(origin));
}

#[tokio::test]
async fn slow_responses_outlast_gatehouse_time_budgets() {
    // Longer than ext_authz's and ext_proc's per-message timeouts: those
    // bound Gatehouse's answers, never the upstream's.
    for client in [WEB, MOBILE] {
        let token = token(client).await;
        let response = get("/vehicles/slow?ms=1500", Some(&token)).await;

        assert_eq!(response.status(), StatusCode::OK, "{}", client.0);
        let body: Value = response.json().await.expect("json body");
        if client == WEB {
            assert_eq!(body["slept_ms"], 1500);
        } else {
            // The mobile profile keeps only vehicle fields; the body was
            // still buffered and reshaped after the slow upstream answered.
            assert_eq!(body, serde_json::json!({}));
        }
    }
}
