//! The provider's keys through the real provider: rotation, withdrawal, the
//! provider stopped or down at start, and a flood of random `kid`s, counted
//! at the provider.
//!
//! Each test runs its own provider and Gatehouse and calls Check as Envoy
//! would, because each restarts or stops the provider.

mod support;

use std::time::Duration;

use support::forge::{self, Gate, description, sign_like_provider};
use support::{API_RESOURCE, WEB};
use tonic_health::pb::health_check_response::ServingStatus;

/// A Gatehouse config with one provider and the given key timings.
fn config(refresh_seconds: u64, min_refetch_seconds: u64) -> String {
    config_bounded(refresh_seconds, 1, refresh_seconds, min_refetch_seconds)
}

/// The same, with the bounds on `max-age` set apart.
fn config_bounded(refresh: u64, min_refresh: u64, max_refresh: u64, min_refetch: u64) -> String {
    format!(
        "
server:
  listen: ${{GATEHOUSE_LISTEN}}
  admin_listen: ${{GATEHOUSE_ADMIN_LISTEN}}
  drain_seconds: 1
provider:
  issuer: ${{GATEHOUSE_ISSUER}}
  audiences: [{API_RESOURCE}]
  refresh_seconds: {refresh}
  min_refresh_seconds: {min_refresh}
  max_refresh_seconds: {max_refresh}
  min_refetch_seconds: {min_refetch}
routes:
  - name: vehicles
    prefix: /vehicles
    scopes: [vehicles:read]
"
    )
}

fn issuer(gate: &Gate) -> String {
    format!("http://127.0.0.1:{}", gate.provider_port)
}

async fn jwt(gate: &Gate) -> String {
    forge::token_for(gate.provider_port, WEB, "vehicles:read", API_RESOURCE).await
}

async fn jwks_fetches(gate: &Gate) -> u64 {
    forge::provider_stats(gate.provider_port).await["jwks"]
        .as_u64()
        .expect("a jwks count")
}

/// Gatehouse's verified-token cache counts so far: (hits, misses).
async fn cache_counts(gate: &Gate) -> (u64, u64) {
    let counters = forge::gatehouse_counters(gate.ports.admin).await;
    let count = |name: &str| {
        *counters
            .get(name)
            .unwrap_or_else(|| panic!("gatehouse reports {name}"))
    };
    (count("token_cache_hits"), count("token_cache_misses"))
}

async fn health(gate: &Gate) -> Option<i32> {
    gate.health().await
}

async fn wait_for_health(gate: &Gate, want: ServingStatus) {
    gate.wait_for_health(want).await;
}

#[tokio::test]
async fn rotation_accepts_the_new_key_after_one_refetch_and_keeps_the_old() {
    let mut gate = Gate::start(&config(300, 10), true);
    wait_for_health(&gate, ServingStatus::Serving).await;
    let old_key = forge::provider_keys(&gate.keys).remove(0);
    let old_token = jwt(&gate).await;
    assert_eq!(gate.check("/vehicles", &old_token).await.status, 200);

    // Stage the rotation: a new key signs, the old one stays published.
    let mut jwks = forge::read_key_file(&gate.keys);
    jwks.insert(0, forge::new_private_jwk());
    forge::write_key_file(&gate.keys, &jwks);
    gate.start_provider();
    let new_token = jwt(&gate).await;
    assert_eq!(
        jwks_fetches(&gate).await,
        0,
        "the restarted provider counts afresh"
    );

    let checked = gate.check("/vehicles", &new_token).await;
    assert_eq!(checked.status, 200, "{}", checked.body);
    assert_eq!(jwks_fetches(&gate).await, 1, "one refetch for the new kid");

    // The old key still verifies: the cached token, and a token it signs now.
    assert_eq!(gate.check("/vehicles", &old_token).await.status, 200);
    let fresh_old = sign_like_provider(&issuer(&gate), &old_key, &old_key.kid);
    let checked = gate.check("/vehicles", &fresh_old).await;
    assert_eq!(checked.status, 200, "{}", checked.body);
    assert_eq!(jwks_fetches(&gate).await, 1, "known keys need no fetch");
}

#[tokio::test]
async fn repeated_requests_with_one_token_verify_its_signature_once() {
    let gate = Gate::start(&config(300, 10), true);
    wait_for_health(&gate, ServingStatus::Serving).await;
    let token = jwt(&gate).await;
    let (hits, misses) = cache_counts(&gate).await;

    for _ in 0..5 {
        let checked = gate.check("/vehicles", &token).await;
        assert_eq!(checked.status, 200, "{}", checked.body);
    }

    let (new_hits, new_misses) = cache_counts(&gate).await;
    assert_eq!(new_misses - misses, 1, "verified on the first request only");
    assert_eq!(new_hits - hits, 4, "the other four came from the cache");
}

#[tokio::test]
async fn a_withdrawn_key_stops_working_at_the_next_refresh() {
    let mut gate = Gate::start(&config(1, 10), true);
    wait_for_health(&gate, ServingStatus::Serving).await;
    let token = jwt(&gate).await;
    assert_eq!(gate.check("/vehicles", &token).await.status, 200);
    let (hits, _) = cache_counts(&gate).await;
    assert_eq!(gate.check("/vehicles", &token).await.status, 200);

    // The token is cached now, so its refusal below proves that the cached
    // entry was dropped, not merely that a fresh check fails.
    let (cached_hits, misses) = cache_counts(&gate).await;
    assert_eq!(cached_hits - hits, 1, "the second request was a cache hit");

    // The provider now publishes only a new key.
    forge::write_key_file(&gate.keys, &[forge::new_private_jwk()]);
    gate.start_provider();

    let checked = gate.wait_for_status("/vehicles", &token, 401).await;
    assert!(
        description(&checked).contains("unknown key"),
        "{}",
        checked.body
    );
    let (_, after) = cache_counts(&gate).await;
    assert!(after > misses, "the refused token was checked afresh");

    let new_token = jwt(&gate).await;
    assert_eq!(gate.check("/vehicles", &new_token).await.status, 200);
}

#[tokio::test]
async fn with_the_provider_stopped_cached_keys_serve_and_unknown_kids_fail_cleanly() {
    let mut gate = Gate::start(&config(1, 1), true);
    wait_for_health(&gate, ServingStatus::Serving).await;
    let key = forge::provider_keys(&gate.keys).remove(0);
    let seen = jwt(&gate).await;
    let unseen = jwt(&gate).await;
    assert_eq!(gate.check("/vehicles", &seen).await.status, 200);

    gate.stop_provider();
    // Let several background refreshes fail.
    tokio::time::sleep(Duration::from_secs(3)).await;

    assert_eq!(gate.check("/vehicles", &seen).await.status, 200);
    let checked = gate.check("/vehicles", &unseen).await;
    assert_eq!(checked.status, 200, "keys kept: {}", checked.body);

    let stranger = sign_like_provider(
        &format!("http://127.0.0.1:{}", gate.provider_port),
        &key,
        "new-kid",
    );
    let checked = gate.check("/vehicles", &stranger).await;
    assert_eq!(checked.status, 401, "{}", checked.body);
    assert!(
        description(&checked).contains("unknown key"),
        "{}",
        checked.body
    );
    assert_eq!(health(&gate).await, Some(ServingStatus::Serving as i32));

    let log = gate.gatehouse.log();
    assert!(
        log.contains("keeping the last good ones"),
        "the failure is logged"
    );
}

#[tokio::test]
async fn a_reload_while_the_provider_is_down_keeps_the_last_good_keys() {
    let mut gate = Gate::start(&config(1, 1), true);
    wait_for_health(&gate, ServingStatus::Serving).await;
    let seen = jwt(&gate).await;
    let unseen = jwt(&gate).await;
    assert_eq!(gate.check("/vehicles", &seen).await.status, 200);

    gate.stop_provider();
    gate.gatehouse
        .wait_for_log("cannot fetch signing keys; keeping the last good ones");

    // Only the `tokens` section changes: other identity headers, a smaller
    // size limit. Neither has anything to do with the provider's keys.
    let reloaded = format!(
        "{}tokens:\n  max_bytes: 4096\n  forward:\n    client_id: x-reloaded-client\n",
        config(1, 1)
    );
    assert!(gate.reload(&reloaded).await, "the file changed");
    let (hits, misses) = cache_counts(&gate).await;

    // The cached token is still cached, with the new header names applied.
    let checked = gate.check("/vehicles", &seen).await;
    assert_eq!(checked.status, 200, "{}", checked.body);
    assert_eq!(
        checked.headers.get("x-reloaded-client").map(String::as_str),
        Some("demo-web"),
        "the reload is in force: {:?}",
        checked.headers
    );
    let (new_hits, new_misses) = cache_counts(&gate).await;
    assert_eq!(
        (new_hits - hits, new_misses - misses),
        (1, 0),
        "a cache hit"
    );

    // A token never seen is verified with the kept keys.
    let checked = gate.check("/vehicles", &unseen).await;
    assert_eq!(checked.status, 200, "keys kept: {}", checked.body);

    // Readiness is polled every 500 ms: after three polls, still ready.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(health(&gate).await, Some(ServingStatus::Serving as i32));
    assert!(
        !gate.gatehouse.log().contains("ready=false"),
        "readiness never dropped"
    );
}

#[tokio::test]
async fn a_provider_down_at_start_means_not_ready_and_503_until_keys_arrive() {
    let mut gate = Gate::start(&config(300, 10), false);

    wait_for_health(&gate, ServingStatus::NotServing).await;

    // A token naming the configured issuer can't be checked without keys:
    // the caller is told to retry, not that its token is bad.
    let stray = gate.dir.path().join("stray-key.json");
    forge::write_key_file(&stray, &[forge::new_private_jwk()]);
    let stray = forge::provider_keys(&stray).remove(0);
    let token = sign_like_provider(&issuer(&gate), &stray, &stray.kid);
    let checked = gate.check("/vehicles", &token).await;
    assert_eq!(checked.status, 503, "{}", checked.body);
    assert!(
        checked.headers.contains_key("retry-after"),
        "{:?}",
        checked.headers
    );
    assert!(
        gate.gatehouse.log().contains("cannot fetch signing keys"),
        "logged why"
    );

    gate.start_provider();
    wait_for_health(&gate, ServingStatus::Serving).await;
    let token = jwt(&gate).await;
    let checked = gate.check("/vehicles", &token).await;
    assert_eq!(checked.status, 200, "{}", checked.body);
}

#[tokio::test]
async fn a_flood_of_random_kids_costs_at_most_one_fetch_per_interval() {
    let gate = Gate::start(&config(300, 60), true);
    wait_for_health(&gate, ServingStatus::Serving).await;
    let key = forge::provider_keys(&gate.keys).remove(0);
    let issuer = issuer(&gate);
    let before = jwks_fetches(&gate).await;

    let mut flood = tokio::task::JoinSet::new();
    for n in 0..200 {
        let token = sign_like_provider(&issuer, &key, &format!("random-{n}-{}", forge::now()));
        let port = gate.ports.grpc;
        flood.spawn(async move {
            let auth = format!("Bearer {token}");
            forge::check(port, "GET", "/vehicles", &[("authorization", &auth)]).await
        });
    }
    while let Some(checked) = flood.join_next().await {
        let checked = checked.expect("a check task");
        assert_eq!(checked.status, 401, "{}", checked.body);
    }

    let fetched = jwks_fetches(&gate).await - before;
    assert!(fetched <= 1, "{fetched} JWKS fetches for 200 random kids");

    // The real key still works throughout.
    let token = jwt(&gate).await;
    assert_eq!(gate.check("/vehicles", &token).await.status, 200);
}

/// JWKS fetches in 4 seconds by a Gatehouse whose provider says
/// `max-age=<max_age>`, with the given bounds and `refresh_seconds` at the
/// upper one (which `max-age`, being set, overrides).
async fn fetches_with_max_age(max_age: u64, min_refresh: u64, max_refresh: u64) -> u64 {
    let config = config_bounded(max_refresh, min_refresh, max_refresh, 60);
    let mut gate = Gate::start(&config, false);
    gate.start_provider_with_max_age(max_age);
    wait_for_health(&gate, ServingStatus::Serving).await;

    let before = jwks_fetches(&gate).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    jwks_fetches(&gate).await - before
}

#[tokio::test]
async fn the_refresh_follows_max_age_within_the_bounds() {
    // refresh_seconds alone would mean no fetch at all in these seconds.
    let honoured = fetches_with_max_age(1, 1, 300).await;
    assert!(honoured >= 2, "max-age=1 gave {honoured} fetches in 4 s");

    let bounded = fetches_with_max_age(1, 60, 300).await;
    assert_eq!(bounded, 0, "min_refresh_seconds holds against max-age");

    // An hour's max-age, capped at one second: several fetches in 4 s.
    let capped = fetches_with_max_age(3600, 1, 1).await;
    assert!(
        capped >= 2,
        "max_refresh_seconds=1 gave {capped} fetches in 4 s"
    );
}
