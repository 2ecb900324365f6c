//! Reshaping through the real Envoy with the real sample services: every
//! operation on lists and single objects, profile choice and its limits,
//! sparse fieldsets, encodings, chunked and large bodies, and what passes
//! unchanged.
//!
//! The stack serves `config/gatehouse.yaml` plus one profile per operation
//! (see [`OPERATION_PROFILES`]) that the web client may pick with the
//! profile header. Tests that read counters run one at a time.

mod support;

use std::io::Read;
use std::sync::OnceLock;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{KIOSK, MOBILE, PARTNER, Stack, WEB};
use tokio::sync::{Mutex, MutexGuard};

/// Appended to the profiles of `config/gatehouse.yaml`.
const OPERATION_PROFILES: &str = r#"
  op-keep:
    routes:
      vehicles:
        - keep: [count, "items[].id", "items[].battery.soc", id, battery.soc]
  op-drop:
    routes:
      vehicles:
        - drop: ["items[].owner", "items[].vin", owner, vin]
  op-rename:
    routes:
      vehicles:
        - rename: {from: "items[].battery.soc", to: "items[].charge"}
        - rename: {from: battery.soc, to: charge}
  op-extract:
    routes:
      vehicles:
        - extract: "items[].id"
        - extract: battery
  op-wrap:
    routes:
      vehicles:
        - wrap: data
  op-flatten:
    routes:
      vehicles:
        - flatten: {path: "items[]", separator: _}
        - flatten: {separator: _}
  op-drop-nulls:
    routes:
      vehicles:
        - drop_nulls: {}
  op-defaults:
    routes:
      vehicles:
        - defaults:
            "items[].fleet": private
            fleet: private
            "items[].internal_notes": none
            internal_notes: none
  op-convert:
    routes:
      vehicles:
        - convert: {path: "items[].battery.capacity_wh", factor: 0.001, round: 1}
        - convert: {path: battery.capacity_wh, factor: 0.001, round: 1}
  op-timestamp:
    routes:
      vehicles:
        - timestamp: {path: "items[].updated_at", from: rfc3339, to: epoch_seconds}
        - timestamp: {path: updated_at, from: rfc3339, to: epoch_millis}
  op-case:
    routes:
      vehicles:
        - case: {to: camel}
  op-errors:
    reshape_errors: true
    routes:
      vehicles:
        - drop: [internal_notes, vin]
"#;

/// Put before the other routes: a composite with one part that times out,
/// one whose slow part still arrives, and one that merges its parts'
/// fields. The slow parts' timeouts are longer than Envoy's default message
/// timeout (0.5 s), so their answers only arrive if Gatehouse's raise of
/// that timeout works; the 1.3 s part shows that nothing else in Envoy's
/// config cuts a composite short. Then a route that adds and removes
/// request headers.
const EXTRA_ROUTES: &str = r#"
  - name: overview-slow
    prefix: /overview/slow
    methods: [GET]
    scopes: [vehicles:read]
    composite:
      parts:
        - {key: vehicles, path: /vehicles, timeout_ms: 1500}
        - {key: stations, path: "/stations/slow?ms=1300", timeout_ms: 1500}
  - name: overview-degraded
    prefix: /overview/degraded
    methods: [GET]
    scopes: [vehicles:read]
    composite:
      parts:
        - {key: vehicles, path: /vehicles, timeout_ms: 1000}
        - {key: stations, path: "/stations/slow?ms=3000", timeout_ms: 800}
  - name: overview-flat
    prefix: /overview/flat
    methods: [GET]
    scopes: [vehicles:read]
    composite:
      merge: top_level
      parts:
        - {key: vehicle, path: /vehicles/v-1}
        - {key: station, path: /stations/s-1}
  - name: vehicle-status
    prefix: /vehicles/status
    methods: [GET]
    scopes: [vehicles:read]
    request_headers:
      add:
        x-caller: "{client_id}"
        x-request-tag: "req-{request_id}"
      remove: [x-debug-token]
"#;

/// Forwarded to the services besides the reserved identity names, so a
/// test can see that composite parts get configured names too.
const FORWARDED_CLAIM: &str = "    claims:\n      client_id: x-caller-client\n";

/// The kiosk has an entry of its own (mobile), which its token's profile
/// claim (partner) outranks.
const KIOSK_CLIENT: &str = "  demo-kiosk:\n    profile: mobile\n";

const OPERATIONS: [&str; 12] = [
    "op-keep",
    "op-drop",
    "op-rename",
    "op-extract",
    "op-wrap",
    "op-flatten",
    "op-drop-nulls",
    "op-defaults",
    "op-convert",
    "op-timestamp",
    "op-case",
    "op-errors",
];

struct Fixture {
    stack: Stack,
    _config_dir: support::Scratch,
}

fn stack() -> &'static Stack {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    &FIXTURE
        .get_or_init(|| {
            let base = std::fs::read_to_string(support::root().join("config/gatehouse.yaml"))
                .expect("read config/gatehouse.yaml");
            assert!(
                base.contains("\nclients:"),
                "the config has a clients section"
            );
            let allowed = "    allowed_profiles: [mobile]\n";
            assert!(
                base.contains(allowed),
                "demo-web may pick the mobile profile"
            );

            let scopes = "    scopes: x-gatehouse-scopes\n";
            assert!(
                base.contains(scopes),
                "tokens.forward names the scopes header"
            );
            let limit = "  max_body_bytes: 1048576\n";
            assert!(base.contains(limit), "the reshape limit is 1 MiB");

            let config = base
                .replacen("\nclients:", &format!("{OPERATION_PROFILES}\nclients:"), 1)
                .replacen("\nclients:\n", &format!("\nclients:\n{KIOSK_CLIENT}"), 1)
                .replacen("\nroutes:\n", &format!("\nroutes:{EXTRA_ROUTES}"), 1)
                .replacen(scopes, &format!("{scopes}{FORWARDED_CLAIM}"), 1)
                .replacen(limit, &format!("{limit}  profile_claim: app_profile\n"), 1)
                .replacen(
                    allowed,
                    &format!(
                        "    allowed_profiles: [mobile, {}]\n",
                        OPERATIONS.join(", ")
                    ),
                    1,
                );
            let dir = support::Scratch::new("reshape-config");
            let path = dir.path().join("gatehouse.yaml");
            std::fs::write(&path, config).expect("write the test config");

            Fixture {
                stack: Stack::start_with_config(&path),
                _config_dir: dir,
            }
        })
        .stack
}

/// Counter-reading tests hold this, and so does every other test, so no
/// request from another test lands between a test's two readings.
async fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::const_new(());
    LOCK.lock().await
}

async fn token(client: (&str, &str)) -> String {
    support::token(&stack().token_endpoint(), client, "vehicles:read").await
}

/// A GET through Envoy with `token` and, when given, the profile header.
async fn get(
    method: reqwest::Method,
    path: &str,
    token: &str,
    profile: Option<&str>,
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .request(method, stack().url(path))
        .bearer_auth(token);
    if let Some(profile) = profile {
        request = request.header("x-client-type", profile);
    }
    request.send().await.expect("request through envoy")
}

async fn json_as(path: &str, token: &str, profile: Option<&str>) -> Value {
    let response = get(reqwest::Method::GET, path, token, profile).await;
    assert_eq!(response.status(), StatusCode::OK, "{path} as {profile:?}");
    checked_json(response).await
}

/// The body as JSON, after checking that any content-length matches it.
async fn checked_json(response: reqwest::Response) -> Value {
    let length = header(&response, "content-length").map(|v| v.parse::<usize>().expect("length"));
    let bytes = response.bytes().await.expect("body");
    if let Some(length) = length {
        assert_eq!(bytes.len(), length, "content-length matches the body");
    }
    serde_json::from_slice(&bytes).expect("json body")
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    let values: Vec<&str> = response
        .headers()
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

async fn direct(path: &str) -> (reqwest::header::HeaderMap, Vec<u8>) {
    let url = format!("http://127.0.0.1:{}{path}", stack().vehicles_port);
    let response = reqwest::get(url).await.expect("direct request");
    let headers = response.headers().clone();
    (
        headers,
        response.bytes().await.expect("direct body").to_vec(),
    )
}

/// The last request `path` (with its query) that the service on `port` saw.
async fn last_request(port: u16, path: &str) -> Value {
    support::upstream_requests(port)
        .await
        .into_iter()
        .rev()
        .find(|request| request["path"] == path)
        .unwrap_or_else(|| panic!("{path} reached the service"))
}

async fn counters() -> std::collections::HashMap<String, u64> {
    support::forge::gatehouse_counters(stack().gatehouse_ports.admin).await
}

async fn counter_delta(before: &std::collections::HashMap<String, u64>, name: &str) -> u64 {
    let after = counters().await;
    after.get(name).copied().unwrap_or_default() - before.get(name).copied().unwrap_or_default()
}

/// Envoy's own count of messages it sent to Gatehouse over ext_proc.
async fn envoy_ext_proc_messages() -> u64 {
    let url = format!(
        "http://127.0.0.1:{}/stats?filter=ext_proc.stream_msgs_sent",
        stack().envoy_ports.admin
    );
    let text = reqwest::get(url)
        .await
        .expect("envoy stats")
        .text()
        .await
        .expect("stats text");
    text.lines()
        .find(|line| line.contains("ext_proc.stream_msgs_sent: "))
        .and_then(|line| line.rsplit(": ").next())
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ext_proc stream_msgs_sent in {text:?}"))
}

// === operations ===

#[tokio::test]
async fn every_operation_shapes_lists_and_single_objects() {
    let _serial = serial().await;
    let token = token(WEB).await;
    let list = |profile| json_as("/vehicles", &token, Some(profile));
    let one = |profile| json_as("/vehicles/v-1", &token, Some(profile));

    let keep = list("op-keep").await;
    assert_eq!(
        keep["items"][0],
        json!({"id": "v-1", "battery": {"soc": 81.5}})
    );
    assert_eq!(keep["count"], 3);
    assert_eq!(
        one("op-keep").await,
        json!({"id": "v-1", "battery": {"soc": 81.5}})
    );

    let dropped = list("op-drop").await;
    for item in dropped["items"].as_array().expect("items") {
        assert!(
            item.get("owner").is_none() && item.get("vin").is_none(),
            "{item}"
        );
        assert!(item["model"].is_string(), "{item}");
    }
    let dropped = one("op-drop").await;
    assert!(dropped.get("owner").is_none() && dropped["model"] == "Atlas E7");

    let renamed = list("op-rename").await;
    assert_eq!(renamed["items"][1]["charge"], 34.0);
    assert!(renamed["items"][1]["battery"].get("soc").is_none());
    assert_eq!(one("op-rename").await["charge"], 81.5);

    assert_eq!(list("op-extract").await, json!(["v-1", "v-2", "v-3"]));
    assert_eq!(
        one("op-extract").await,
        json!({"soc": 81.5, "capacity_wh": 75000, "health": 0.97})
    );

    let wrapped = list("op-wrap").await;
    assert_eq!(wrapped["data"]["count"], 3);
    assert_eq!(one("op-wrap").await["data"]["id"], "v-1");

    let flat = list("op-flatten").await;
    assert_eq!(flat["items"][0]["battery_soc"], 81.5);
    assert_eq!(flat["items"][0]["owner_email"], "ada.park@example.com");
    assert_eq!(one("op-flatten").await["location_lat"], 52.5208);

    let cleaned = list("op-drop-nulls").await;
    assert!(cleaned["items"][0].get("internal_notes").is_none());
    assert!(cleaned["items"][1]["internal_notes"].is_string());
    assert!(one("op-drop-nulls").await.get("internal_notes").is_none());

    let defaulted = list("op-defaults").await;
    assert_eq!(defaulted["items"][0]["internal_notes"], "none");
    assert_eq!(defaulted["items"][2]["fleet"], "private");
    assert_ne!(defaulted["items"][1]["internal_notes"], "none");
    assert_eq!(one("op-defaults").await["fleet"], "private");

    let converted = list("op-convert").await;
    assert_eq!(converted["items"][0]["battery"]["capacity_wh"], 75.0);
    assert_eq!(converted["items"][1]["battery"]["capacity_wh"], 42.0);
    assert_eq!(one("op-convert").await["battery"]["capacity_wh"], 75.0);

    // 2026-11-30T10:00:00Z
    let timed = list("op-timestamp").await;
    assert_eq!(timed["items"][0]["updated_at"], 1_796_032_800);
    assert_eq!(
        one("op-timestamp").await["updated_at"],
        1_796_032_800_000u64
    );

    let cased = list("op-case").await;
    assert_eq!(cased["items"][0]["updatedAt"], "2026-11-30T10:00:00Z");
    assert_eq!(cased["items"][0]["battery"]["capacityWh"], 75000);
    assert_eq!(one("op-case").await["internalNotes"], Value::Null);
}

// === choosing the profile ===

#[tokio::test]
async fn the_profile_header_picks_only_among_allowed_profiles() {
    let _serial = serial().await;

    // The web client may use the mobile shape, and the answer says it
    // depends on the header.
    let web = token(WEB).await;
    let response = get(reqwest::Method::GET, "/vehicles", &web, Some("mobile")).await;
    let vary = header(&response, "vary").unwrap_or_default();
    assert!(
        vary.to_ascii_lowercase().contains("x-client-type"),
        "vary: {vary}"
    );
    let body = checked_json(response).await;
    assert!(body["items"][0].get("owner").is_none(), "{body}");
    assert_eq!(body["items"][0]["battery"], json!({"soc": 81.5}));

    // Without the header, the web client's own profile.
    let own = json_as("/vehicles", &web, None).await;
    assert_eq!(own["items"][0]["owner"]["name"], "Ada Park");

    // A partner asking for the web (or mobile) shape keeps its own.
    let partner = token(PARTNER).await;
    for asked in ["web", "mobile", "op-keep"] {
        let response = get(reqwest::Method::GET, "/vehicles", &partner, Some(asked)).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(&response, "vary").as_deref(),
            Some("authorization"),
            "one allowed profile: the shape varies by token only"
        );
        let body = checked_json(response).await;
        let first = &body["items"][0];
        assert!(
            first.get("owner").is_none() && first.get("vin").is_none(),
            "{body}"
        );
        assert!(
            first.get("updatedAt").is_some(),
            "partner keys are camelCase: {body}"
        );
    }
}

#[tokio::test]
async fn services_see_the_request_id_route_and_profile() {
    let _serial = serial().await;
    let token = token(MOBILE).await;

    let response = get(reqwest::Method::GET, "/vehicles/v-2", &token, None).await;
    assert_eq!(response.status(), StatusCode::OK);

    let requests = support::upstream_requests(stack().vehicles_port).await;
    let seen = requests
        .iter()
        .rev()
        .find(|request| request["path"] == "/vehicles/v-2")
        .expect("the upstream saw the request");
    assert_eq!(seen["headers"]["x-gatehouse-profile"], "mobile");
    assert_eq!(seen["headers"]["x-gatehouse-route"], "vehicles");
    assert!(seen["headers"]["x-request-id"].is_string(), "{seen}");
}

#[tokio::test]
async fn a_route_adds_and_removes_request_headers() {
    let _serial = serial().await;
    let token = token(WEB).await;

    let response = reqwest::Client::new()
        .get(stack().url("/vehicles/status"))
        .bearer_auth(&token)
        .header("x-debug-token", "let-me-in")
        .header("x-trace-note", "kept")
        .send()
        .await
        .expect("request through envoy");
    assert_eq!(response.status(), StatusCode::OK);

    let seen = last_request(stack().vehicles_port, "/vehicles/status").await;
    let headers = &seen["headers"];
    assert_eq!(headers["x-caller"], "demo-web", "{seen}");
    let request_id = headers["x-request-id"].as_str().expect("a request id");
    assert_eq!(headers["x-request-tag"], format!("req-{request_id}"));
    assert!(headers.get("x-debug-token").is_none(), "removed: {seen}");
    assert_eq!(
        headers["x-trace-note"], "kept",
        "other client headers pass: {seen}"
    );
}

#[tokio::test]
async fn a_token_claim_chooses_the_profile_before_the_client_entry() {
    let _serial = serial().await;
    let kiosk = token(KIOSK).await;

    // The kiosk's entry says mobile (ids, models and charge only); its
    // token's claim says partner, which wins: camelCase, no personal data.
    let body = json_as("/vehicles", &kiosk, None).await;
    let first = &body["items"][0];
    assert_eq!(first["updatedAt"], "2026-11-30T10:00:00Z", "{body}");
    assert!(
        first.get("owner").is_none() && first.get("vin").is_none(),
        "{body}"
    );

    // The header cannot bring the entry's profile back: the claim's is the
    // only one this client is allowed.
    let response = get(reqwest::Method::GET, "/vehicles", &kiosk, Some("mobile")).await;
    assert_eq!(header(&response, "vary").as_deref(), Some("authorization"));
    assert_eq!(checked_json(response).await, body);

    let seen = last_request(stack().vehicles_port, "/vehicles").await;
    assert_eq!(seen["headers"]["x-gatehouse-profile"], "partner", "{seen}");
}

// === sparse fieldsets ===

#[tokio::test]
async fn sparse_fieldsets_narrow_but_never_widen_the_profile() {
    let _serial = serial().await;

    // Mobile allows id, model and battery.soc; asking for vin as well
    // brings nothing back.
    let mobile = token(MOBILE).await;
    let body = json_as("/vehicles?fields=items[].id,items[].vin", &mobile, None).await;
    assert_eq!(
        body,
        json!({"items": [{"id": "v-1"}, {"id": "v-2"}, {"id": "v-3"}]})
    );

    // Encoded commas and brackets are the same request.
    let body = json_as("/vehicles/v-3?fields=id%2Cbattery.soc", &mobile, None).await;
    assert_eq!(body, json!({"id": "v-3", "battery": {"soc": 99}}));

    // Web has no steps of its own on this route: the fieldset alone applies.
    let web = token(WEB).await;
    let body = json_as("/vehicles/v-1?fields=owner.name", &web, None).await;
    assert_eq!(body, json!({"owner": {"name": "Ada Park"}}));

    // A fieldset that is not a list of paths is the client's error.
    let response = get(reqwest::Method::GET, "/vehicles?fields=items[", &web, None).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "invalid_request");
}

// === what passes unchanged ===

#[tokio::test]
async fn responses_no_profile_applies_to_never_reach_the_body_phase() {
    let _serial = serial().await;
    let web = token(WEB).await;
    let mobile = token(MOBILE).await;

    // Web has no steps on this route: one message (the headers), no body.
    let before = envoy_ext_proc_messages().await;
    let counted = counters().await;
    let body = json_as("/vehicles", &web, None).await;
    assert_eq!(body["items"][0]["vin"], "WVWZZZE1ZPP000101");
    assert_eq!(envoy_ext_proc_messages().await - before, 1);
    assert_eq!(counter_delta(&counted, "reshape_skipped").await, 1);
    assert_eq!(counter_delta(&counted, "reshape_buffered").await, 0);

    // Mobile does: the headers and the body.
    let before = envoy_ext_proc_messages().await;
    let counted = counters().await;
    json_as("/vehicles", &mobile, None).await;
    assert_eq!(envoy_ext_proc_messages().await - before, 2);
    assert_eq!(counter_delta(&counted, "reshape_buffered").await, 1);
    assert_eq!(counter_delta(&counted, "reshaped").await, 1);
}

#[tokio::test]
async fn invalid_json_and_non_json_pass_unchanged_and_are_counted() {
    let _serial = serial().await;
    let mobile = token(MOBILE).await;

    for path in ["/vehicles/invalid", "/vehicles/text"] {
        let counted = counters().await;
        let (_, direct) = direct(path).await;

        let response = get(reqwest::Method::GET, path, &mobile, None).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let through = response.bytes().await.expect("body");
        assert_eq!(through.as_ref(), direct.as_slice(), "{path} changed");
        assert_eq!(
            counter_delta(&counted, "reshape_passed_not_json").await,
            1,
            "{path}"
        );
    }
}

#[tokio::test]
async fn error_statuses_pass_unless_the_profile_asks() {
    let _serial = serial().await;
    let mobile = token(MOBILE).await;
    let (_, direct) = direct("/vehicles/error").await;

    let response = get(reqwest::Method::GET, "/vehicles/error", &mobile, None).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.bytes().await.expect("body").as_ref(),
        direct.as_slice()
    );

    let web = token(WEB).await;
    let response = get(
        reqwest::Method::GET,
        "/vehicles/error",
        &web,
        Some("op-errors"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        checked_json(response).await,
        json!({"error": "upstream_failed"})
    );
}

#[tokio::test]
async fn reshaped_bodies_drop_the_etag_and_head_is_never_reshaped() {
    let _serial = serial().await;
    let web = token(WEB).await;
    let mobile = token(MOBILE).await;

    let untouched = get(reqwest::Method::GET, "/vehicles", &web, None).await;
    assert_eq!(header(&untouched, "etag").as_deref(), Some("\"list-v1\""));
    let reshaped = get(reqwest::Method::GET, "/vehicles", &mobile, None).await;
    assert_eq!(reshaped.status(), StatusCode::OK);
    assert_eq!(header(&reshaped, "etag"), None);

    // HEAD describes the upstream's full representation.
    let (_, full) = direct("/vehicles").await;
    let counted = counters().await;
    let head = get(reqwest::Method::HEAD, "/vehicles", &mobile, None).await;
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        header(&head, "content-length"),
        Some(full.len().to_string())
    );
    assert_eq!(counter_delta(&counted, "reshape_buffered").await, 0);
}

#[tokio::test]
async fn partial_and_not_modified_responses_are_never_reshaped() {
    let _serial = serial().await;
    let mobile = token(MOBILE).await;
    let counted = counters().await;

    let (_, direct_partial) = direct("/vehicles/partial").await;
    let partial = get(reqwest::Method::GET, "/vehicles/partial", &mobile, None).await;
    assert_eq!(partial.status(), StatusCode::PARTIAL_CONTENT);
    assert!(header(&partial, "content-range").is_some());
    let through = partial.bytes().await.expect("body");
    assert_eq!(through.as_ref(), direct_partial.as_slice());

    let not_modified = reqwest::Client::new()
        .get(stack().url("/vehicles"))
        .bearer_auth(&mobile)
        .header("if-none-match", "\"list-v1\"")
        .send()
        .await
        .expect("conditional request");
    assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(counter_delta(&counted, "reshape_buffered").await, 0);
    assert_eq!(counter_delta(&counted, "reshape_skipped").await, 2);
}

// === encodings and sizes ===

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

#[tokio::test]
async fn gzip_bodies_are_decoded_reshaped_and_encoded_again() {
    let _serial = serial().await;
    let mobile = token(MOBILE).await;

    let response = get(reqwest::Method::GET, "/vehicles/gzip", &mobile, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "content-encoding").as_deref(),
        Some("gzip")
    );
    // The upstream sent a length, so the re-encoded body gets its own.
    let length = header(&response, "content-length").expect("a content-length");
    let bytes = response.bytes().await.expect("body");
    assert_eq!(length, bytes.len().to_string());
    let body: Value = serde_json::from_slice(&gunzip(&bytes)).expect("json inside gzip");
    assert_eq!(
        body["items"][0],
        json!({"id": "v-1", "model": "Atlas E7", "battery": {"soc": 81.5}})
    );
}

#[tokio::test]
async fn compression_bombs_and_unknown_encodings_pass_unchanged() {
    let _serial = serial().await;
    let mobile = token(MOBILE).await;

    let counted = counters().await;
    let (_, direct_bomb) = direct("/vehicles/bomb").await;
    let response = get(reqwest::Method::GET, "/vehicles/bomb", &mobile, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "content-encoding").as_deref(),
        Some("gzip")
    );
    let through = response.bytes().await.expect("body");
    assert!(
        through.as_ref() == direct_bomb.as_slice(),
        "the bomb passed as sent"
    );
    assert_eq!(counter_delta(&counted, "reshape_passed_too_large").await, 1);

    let counted = counters().await;
    let (_, direct_encoded) = direct("/vehicles/encoded").await;
    let response = get(reqwest::Method::GET, "/vehicles/encoded", &mobile, None).await;
    assert_eq!(
        header(&response, "content-encoding").as_deref(),
        Some("x-custom")
    );
    assert_eq!(
        response.bytes().await.expect("body").as_ref(),
        direct_encoded.as_slice()
    );
    assert_eq!(counter_delta(&counted, "reshape_passed_encoded").await, 1);
}

#[tokio::test]
async fn a_known_length_body_over_the_limit_never_reaches_the_body_phase() {
    let _serial = serial().await;
    let mobile = token(MOBILE).await;

    // 5 MiB of JSON with a content-length: refused from the headers alone.
    let (headers, direct_big) = direct("/vehicles/big").await;
    assert!(headers.get("content-length").is_some());
    assert!(direct_big.len() as u64 > 1024 * 1024);

    let messages = envoy_ext_proc_messages().await;
    let counted = counters().await;
    let response = get(reqwest::Method::GET, "/vehicles/big", &mobile, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "content-length"),
        Some(direct_big.len().to_string())
    );
    let through = response.bytes().await.expect("body");
    assert!(
        through.as_ref() == direct_big.as_slice(),
        "the body changed"
    );

    assert_eq!(counter_delta(&counted, "reshape_passed_too_large").await, 1);
    assert_eq!(counter_delta(&counted, "reshape_skipped").await, 1);
    assert_eq!(counter_delta(&counted, "reshape_buffered").await, 0);
    assert_eq!(envoy_ext_proc_messages().await - messages, 1);
}

#[tokio::test]
async fn chunked_upstream_responses_are_reshaped_or_pass_whole() {
    let _serial = serial().await;
    let mobile = token(MOBILE).await;

    let (headers, _) = direct("/vehicles/chunked").await;
    assert!(
        headers.get("content-length").is_none(),
        "the upstream sends chunks"
    );
    let body = json_as("/vehicles/chunked", &mobile, None).await;
    assert_eq!(
        body["items"][2],
        json!({"id": "v-3", "model": "Atlas E5 Van", "battery": {"soc": 99}})
    );

    // Past Envoy's buffer the body streams on exactly as sent.
    let (_, direct_big) = direct("/vehicles/chunked-big").await;
    let response = get(reqwest::Method::GET, "/vehicles/chunked-big", &mobile, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let through = response.bytes().await.expect("body");
    assert!(
        through.as_ref() == direct_big.as_slice(),
        "large chunked body changed"
    );
}

#[tokio::test]
async fn a_body_of_almost_one_mebibyte_is_reshaped() {
    let _serial = serial().await;
    let mobile = token(MOBILE).await;

    let (_, direct_mib) = direct("/vehicles/mib").await;
    assert!(direct_mib.len() > 1_000_000 && direct_mib.len() <= 1024 * 1024);
    let upstream: Value = serde_json::from_slice(&direct_mib).expect("json");

    let body = json_as("/vehicles/mib", &mobile, None).await;
    let items = body["items"].as_array().expect("items");
    assert_eq!(
        items.len() as u64,
        upstream["count"].as_u64().expect("count")
    );
    assert!(items.iter().all(|item| item.get("owner").is_none()));
}

// === composite endpoints ===

#[tokio::test]
async fn a_composite_never_shows_more_of_a_part_than_its_own_route() {
    let _serial = serial().await;
    // The partner profile lists steps for `vehicles` only, none for the
    // composite: its vehicles part is still shaped as /vehicles would be.
    let token = support::token(
        &stack().token_endpoint(),
        PARTNER,
        "vehicles:read stations:read",
    )
    .await;

    let response = reqwest::Client::new()
        .get(stack().url("/overview"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request through envoy");
    assert_eq!(response.status(), StatusCode::OK);
    let body = checked_json(response).await;

    let own = json_as("/vehicles", &token, None).await;
    assert_eq!(body["vehicles"], own, "the part is what /vehicles gives");
    let text = body.to_string();
    for private in ["owner", "Ada Park", "vin", "internal"] {
        assert!(!text.contains(private), "{private} in {body}");
    }
    assert!(body["stations"]["items"].is_array(), "{body}");
}

#[tokio::test]
async fn a_composite_merges_both_services_for_the_caller_and_its_profile() {
    let _serial = serial().await;
    let token = support::token(
        &stack().token_endpoint(),
        MOBILE,
        "vehicles:read stations:read",
    )
    .await;

    // A client's own copy of a forwarded name, and a header Check does not
    // vouch for.
    let response = reqwest::Client::new()
        .get(stack().url("/overview"))
        .bearer_auth(&token)
        .header("x-caller-client", "forged")
        .header("x-not-vouched", "1")
        .send()
        .await
        .expect("request through envoy");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "x-gatehouse-partial"), None);
    let body = checked_json(response).await;
    assert_eq!(
        body["vehicles"]["items"][0],
        json!({"id": "v-1", "battery": {"soc": 81.5}})
    );
    assert_eq!(
        body["stations"]["items"][1],
        json!({"id": "s-2", "name": "Marienplatz Kerbside"})
    );

    // Both services saw who asked, under the same request id.
    let vehicles = last_request(stack().vehicles_port, "/vehicles").await;
    let stations = last_request(stack().stations_port, "/stations").await;
    for seen in [&vehicles, &stations] {
        let headers = &seen["headers"];
        assert_eq!(headers["x-gatehouse-client-id"], "demo-mobile", "{seen}");
        assert_eq!(headers["x-gatehouse-subject"], "demo-mobile", "{seen}");
        assert_eq!(
            headers["x-gatehouse-scopes"], "vehicles:read stations:read",
            "{seen}"
        );
        // Configured in tokens.forward, not reserved: forwarded too, with
        // Check's value rather than the client's.
        assert_eq!(headers["x-caller-client"], "demo-mobile", "{seen}");
        assert!(headers.get("x-not-vouched").is_none(), "{seen}");
    }
    assert!(vehicles["headers"]["x-request-id"].is_string());
    assert_eq!(
        vehicles["headers"]["x-request-id"],
        stations["headers"]["x-request-id"]
    );
    assert!(
        vehicles["headers"].get("authorization").is_none(),
        "the token stays at the edge"
    );
}

#[tokio::test]
async fn a_slow_part_is_reported_and_the_rest_still_arrives() {
    let _serial = serial().await;
    let token = token(WEB).await;
    let counted = counters().await;

    let response = get(reqwest::Method::GET, "/overview/degraded", &token, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "x-gatehouse-partial").as_deref(),
        Some("stations")
    );
    let body = checked_json(response).await;

    assert_eq!(body["vehicles"]["count"], 3);
    assert!(body.get("stations").is_none(), "{body}");
    let reason = body["partial_failures"]["stations"]
        .as_str()
        .expect("a reason");
    assert!(reason.contains("timed out"), "{reason}");
    assert_eq!(counter_delta(&counted, "composite_backend_failed").await, 1);
}

#[tokio::test]
async fn a_part_slower_than_a_second_still_arrives_within_its_timeout() {
    let _serial = serial().await;
    let token = token(WEB).await;
    let counted = counters().await;

    // 1.3 s: past ext_proc's default message timeout (0.5 s) and past the
    // 1 s that ext_authz allows Check, inside the part's own 1.5 s.
    let started = std::time::Instant::now();
    let response = get(reqwest::Method::GET, "/overview/slow", &token, None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "x-gatehouse-partial"), None);
    let body = checked_json(response).await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(1300));

    assert_eq!(body["stations"], json!({"slept_ms": 1300}), "{body}");
    assert_eq!(body["vehicles"]["count"], 3, "{body}");
    assert!(body.get("partial_failures").is_none(), "{body}");
    assert_eq!(counter_delta(&counted, "composite_backend_failed").await, 0);
}

#[tokio::test]
async fn a_top_level_composite_merges_fields_with_the_first_part_winning() {
    let _serial = serial().await;
    let token = token(WEB).await;

    let body = json_as("/overview/flat", &token, None).await;
    assert_eq!(body["id"], "v-1", "the vehicle came first");
    assert_eq!(body["model"], "Atlas E7");
    assert_eq!(body["name"], "Alexanderplatz Garage");
    assert!(body["connectors"].is_array(), "{body}");
}
