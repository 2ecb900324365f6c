//! End to end through the real Envoy: a client, Envoy, Gatehouse (ext_authz
//! and ext_proc), the sample services, the OAuth2 provider and Redis.
//!
//! The tests share one stack; each uses its own client or route where counts
//! could collide.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use gatehouse::config::Config;
use gatehouse::decision::IDENTITY_HEADERS;
use reqwest::StatusCode;
use serde_json::Value;
use support::{MOBILE, PARTNER, RawResponse, Stack, WEB};

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
async fn a_reshaped_client_cannot_ask_the_upstream_for_an_unshapeable_body() {
    // Gatehouse cannot decode brotli nor reshape a range, so a mobile client
    // asking for either must not get the full body past its profile.
    let mobile = token(MOBILE).await;
    let cases = [
        ("br", None, "br-only"),
        ("gzip;q=0, br", None, "gzip-refused"),
        ("br, gzip", Some("gzip"), "gzip-taken"),
    ];

    for (accept, offered, marker) in cases {
        let response = client()
            .get(stack().url("/vehicles"))
            .bearer_auth(&mobile)
            .header("accept-encoding", accept)
            .header("range", "bytes=0-40")
            .header("if-range", "\"list-v1\"")
            .header("x-test-marker", marker)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK, "{marker}");

        let request = seen_with_marker(stack().vehicles_port, marker)
            .await
            .expect("the upstream saw the request");
        let headers = &request["headers"];
        assert_eq!(headers["accept-encoding"].as_str(), offered, "{marker}");
        assert!(headers.get("range").is_none(), "{marker}: {headers}");
        assert!(headers.get("if-range").is_none(), "{marker}: {headers}");
    }

    // A client whose profile changes nothing keeps its own preferences.
    let web = token(WEB).await;
    let response = client()
        .get(stack().url("/vehicles"))
        .bearer_auth(&web)
        .header("accept-encoding", "br")
        .header("x-test-marker", "web-br")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let request = seen_with_marker(stack().vehicles_port, "web-br")
        .await
        .expect("the upstream saw the request");
    assert_eq!(request["headers"]["accept-encoding"], "br");
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
async fn a_token_short_of_the_scope_gets_403_naming_the_scope_to_ask_for() {
    let read_only = support::token(&stack().token_endpoint(), WEB, "vehicles:read").await;
    let marker = "short-of-scope";

    // `vehicles-write` (POST) needs vehicles:write, which this token lacks.
    let response = client()
        .post(stack().url("/vehicles"))
        .bearer_auth(&read_only)
        .header("content-type", "application/json")
        .header("x-test-marker", marker)
        .body(r#"{"model":"x"}"#)
        .send()
        .await
        .expect("request through envoy");

    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        header(&response, "www-authenticate"),
        Some("Bearer error=\"insufficient_scope\", scope=\"vehicles:write\"")
    );
    let body: Value = response.json().await.expect("json body");
    assert_eq!(body["error"], "insufficient_scope", "{body}");
    assert!(
        !body.to_string().contains(&read_only),
        "the body never echoes the token"
    );
    assert!(
        seen_with_marker(stack().vehicles_port, marker)
            .await
            .is_none(),
        "a refused request never reaches the service"
    );

    // The same token reads, so the 403 is about the scope alone.
    let response = get("/vehicles", Some(&read_only)).await;
    assert_eq!(response.status(), StatusCode::OK);
}

/// A GET through Envoy exactly as written: reqwest would resolve `..` and
/// `//` itself, so Envoy's normalisation would never be exercised.
fn raw(path: &str, token: Option<&str>, extra: &[(&str, &str)]) -> RawResponse {
    let auth = token.map(|token| format!("Bearer {token}"));
    let mut headers = extra.to_vec();
    if let Some(auth) = &auth {
        headers.push(("authorization", auth));
    }

    support::raw_get(stack().envoy_ports.listener, path, &headers)
        .unwrap_or_else(|| panic!("envoy closed the connection without answering {path}"))
}

/// The upstream request that carried `x-test-marker: marker`, if any.
async fn seen_with_marker(port: u16, marker: &str) -> Option<Value> {
    let seen = support::upstream_requests(port).await;
    seen.into_iter()
        .rev()
        .find(|r| r["headers"]["x-test-marker"] == marker)
}

#[tokio::test]
async fn a_token_in_the_query_never_reaches_a_service_even_on_a_public_route() {
    let token = token(WEB).await;

    let response = client()
        .get(stack().url(&format!(
            "/stations/status?region=north&access_token={token}"
        )))
        .header("x-test-marker", "query-token-public")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);

    let seen = seen_with_marker(stack().stations_port, "query-token-public")
        .await
        .expect("the service saw the request");
    let path = seen["path"].as_str().expect("the path it was asked for");
    assert!(
        path.contains("region=north"),
        "the rest of the query stays: {seen}"
    );
    assert!(!path.contains("access_token"), "{seen}");
    assert!(!seen.to_string().contains(&token), "{seen}");
}

/// Gatehouse's own 404 (Check matched no route). Envoy's catch-all route
/// answers `{"error":"not_found"}` too, but only Gatehouse's names the
/// request and says why.
fn assert_gatehouse_not_found(response: &RawResponse, path: &str) {
    assert_eq!(response.status, 404, "{path}: {response:?}");
    let body = response
        .json()
        .unwrap_or_else(|| panic!("{path}: a JSON body: {response:?}"));
    assert_eq!(body["error"], "not_found", "{path}: {body}");
    let request_id = body["request_id"].as_str().unwrap_or_default();
    assert!(
        !request_id.is_empty(),
        "{path}: not Gatehouse's 404: {body}"
    );
    assert!(body["error_description"].is_string(), "{path}: {body}");
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

    // Underscored variants are refused by Envoy outright, on protected and
    // public routes alike, so an upstream that folds `_` into `-` never
    // sees one.
    for (path, token) in [
        ("/vehicles/v-1", Some(token.as_str())),
        ("/stations/status", None),
    ] {
        let marker = format!("underscore {path}");
        let headers = [
            ("x_gatehouse_client_id", "admin"),
            ("x-test-marker", marker.as_str()),
        ];
        let response = raw(path, token, &headers);
        assert_eq!(response.status, 400, "{path}: {response:?}");
    }

    let protected = seen_with_marker(stack().vehicles_port, "spoof-protected")
        .await
        .expect("protected request seen");
    assert_eq!(protected["headers"]["x-gatehouse-client-id"], "demo-web");

    let public = seen_with_marker(stack().stations_port, "spoof-public")
        .await
        .expect("public request seen");
    assert!(
        public["headers"].get("x-gatehouse-client-id").is_none(),
        "{public}"
    );
    assert!(
        public["headers"].get("x-gatehouse-subject").is_none(),
        "{public}"
    );

    for port in [stack().vehicles_port, stack().stations_port] {
        let seen = support::upstream_requests(port).await;
        assert!(
            seen.iter()
                .all(|r| r["headers"].get("x_gatehouse_client_id").is_none()
                    && !r["headers"]["x-test-marker"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("underscore"))),
            "an underscored header reached port {port}"
        );
    }
}

/// Check removes the identity headers from what it allows, so the e2e test
/// above passes even without Envoy's removal. Envoy's own list is what
/// protects routes Check does not allow through and every later filter, so
/// it must name exactly Gatehouse's reserved names and forwarded headers.
#[test]
fn envoy_removes_exactly_the_identity_headers_gatehouse_reserves() {
    let text = std::fs::read_to_string(support::root().join("envoy/envoy.yaml"))
        .expect("read envoy/envoy.yaml");
    let envoy: Value = serde_saphyr::from_str(&text).expect("envoy.yaml parses");
    let filters = &envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ["http_filters"];
    let filters = filters.as_array().expect("the listener's http_filters");
    let mutation = filters
        .iter()
        .find(|f| f["name"] == "envoy.filters.http.header_mutation")
        .expect("a header_mutation filter");
    let first = filters.first().expect("a first filter");
    assert_eq!(first, mutation, "the removal runs before any other filter");

    let mutations = mutation["typed_config"]["mutations"]["request_mutations"]
        .as_array()
        .expect("request_mutations");
    let removed: BTreeSet<&str> = mutations
        .iter()
        .filter_map(|m| m["remove"].as_str())
        .collect();

    let config = Config::from_yaml(
        &support::root().join("config/gatehouse.yaml"),
        &std::fs::read_to_string(support::root().join("config/gatehouse.yaml"))
            .expect("read config/gatehouse.yaml"),
        HashMap::new(),
    )
    .expect("the shipped config loads");
    let reserved: BTreeSet<&str> = IDENTITY_HEADERS
        .into_iter()
        .chain(config.tokens.forward.names())
        .collect();

    assert_eq!(
        removed, reserved,
        "envoy/envoy.yaml header_mutation drifted"
    );
}

#[tokio::test]
async fn paths_get_the_decision_of_the_route_envoy_serves() {
    let token = token(WEB).await;

    // Merged by Envoy to /vehicles: the vehicles route, with its decision
    // (401 without a token) and its service, which sees the clean path.
    let marker = [("x-test-marker", "path-merged")];
    let response = raw("//vehicles", Some(&token), &marker);
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.json().expect("json")["count"], 3);
    let seen = seen_with_marker(stack().vehicles_port, "path-merged")
        .await
        .expect("the vehicles service saw it");
    assert_eq!(seen["path"], "/vehicles");

    let response = raw("//vehicles", None, &[]);
    assert_eq!(response.status, 401, "{response:?}");
    assert_eq!(response.json().expect("json")["error"], "missing_token");

    // Dot segments resolved by Envoy: from stations into vehicles.
    let response = raw("/stations/../vehicles/v-1", Some(&token), &[]);
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.json().expect("json")["id"], "v-1");

    // Out of the vehicles route (also when the dots are percent-encoded),
    // and into no other route, or into none at all: Gatehouse denies them.
    for path in [
        "/vehicles/../admin",
        "/vehicles/%2e%2e/admin",
        "/vehicles/%2E%2E/admin",
        "/vehiclesX",
        "/VEHICLES",
        "/admin",
    ] {
        let response = raw(path, Some(&token), &[]);
        assert_gatehouse_not_found(&response, path);
    }

    // Escaped slashes are refused by Envoy before any filter runs.
    for path in ["/vehicles%2Fv-1", "/vehicles%2fv-1"] {
        let marker = [("x-test-marker", "escaped-slash")];
        let response = raw(path, Some(&token), &marker);
        assert_eq!(response.status, 400, "{path}: {response:?}");
        let body = response.json();
        assert!(
            body.is_none_or(|body| body.get("request_id").is_none()),
            "{path}: Envoy, not Gatehouse, refuses it"
        );
    }
    assert!(
        seen_with_marker(stack().vehicles_port, "escaped-slash")
            .await
            .is_none(),
        "an escaped slash reached the vehicles service"
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

    // The composite answers with stations' data too, so it cannot be a way
    // around the stations policy.
    let response = get("/overview", Some(&token)).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = response.json().await.expect("json body");
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
    let exposed = header(&denied, "access-control-expose-headers").unwrap_or_default();
    for name in ["www-authenticate", "retry-after", "ratelimit"] {
        assert!(exposed.contains(name), "{name} is readable: {exposed}");
    }
}

#[tokio::test]
async fn a_browser_can_call_the_composite_route_and_pick_a_profile() {
    let origin = "https://web.gatehouse.test";

    let preflight = client()
        .request(reqwest::Method::OPTIONS, stack().url("/overview"))
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header(
            "access-control-request-headers",
            "authorization,x-client-type",
        )
        .send()
        .await
        .expect("preflight");
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(
        header(&preflight, "access-control-allow-origin"),
        Some(origin)
    );
    let allowed = header(&preflight, "access-control-allow-headers").unwrap_or_default();
    assert!(allowed.contains("x-client-type"), "{allowed}");

    // Gatehouse answers the composite itself; the browser may read it.
    let token = token(WEB).await;
    let response = client()
        .get(stack().url("/overview"))
        .header("origin", origin)
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "access-control-allow-origin"),
        Some(origin)
    );
    let body: Value = response.json().await.expect("json body");
    assert!(
        body["vehicles"].is_object() && body["stations"].is_object(),
        "{body}"
    );
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
