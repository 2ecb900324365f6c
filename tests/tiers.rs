//! Rate-limit tiers: set per client in the config, or named by a claim of
//! the verified token for clients the config puts on no tier.

mod support;

use serde_json::json;
use support::API_RESOURCE;
use support::forge::{self, Gate, now, sign_claims};

fn config() -> String {
    format!(
        "
server:
  listen: ${{GATEHOUSE_LISTEN}}
  admin_listen: ${{GATEHOUSE_ADMIN_LISTEN}}
providers:
  - issuer: ${{GATEHOUSE_ISSUER}}
    audiences: [{API_RESOURCE}]
rate_limits:
  plans:
    requests: 1
    window_seconds: 3600
    tier_claim: plan
    tiers:
      gold:
        limits:
          - {{requests: 3, window_seconds: 3600}}
      bronze:
        limits:
          - {{requests: 2, window_seconds: 3600}}
clients:
  pinned:
    tier: bronze
routes:
  - name: vehicles
    prefix: /vehicles
    rate_limit: plans
"
    )
}

/// How many requests in a row `client` gets before a 429, with `plan` as
/// its token's claim (none when `None`).
async fn admitted(gate: &Gate, key: &forge::SigningKey, client: &str, plan: Option<&str>) -> usize {
    let mut claims = json!({
        "iss": format!("http://127.0.0.1:{}", gate.provider_port),
        "aud": API_RESOURCE,
        "sub": client,
        "client_id": client,
        "iat": now(),
        "exp": now() + 300,
    });
    if let Some(plan) = plan {
        claims["plan"] = json!(plan);
    }
    let token = sign_claims(key, &claims);

    for n in 0..10 {
        let checked = gate.check("/vehicles", &token).await;
        match checked.status {
            200 => continue,
            429 => return n,
            other => panic!("unexpected {other}: {}", checked.body),
        }
    }
    panic!("{client} was never limited");
}

#[tokio::test]
async fn the_tier_comes_from_the_config_first_then_the_claim() {
    let gate = Gate::start(&config(), true);
    let key = forge::provider_keys(&gate.keys).remove(0);

    // Keys load in the background; wait until a token is accepted.
    let probe = sign_claims(
        &key,
        &json!({
            "iss": format!("http://127.0.0.1:{}", gate.provider_port),
            "aud": API_RESOURCE, "client_id": "probe", "iat": now(), "exp": now() + 300,
            "plan": "gold",
        }),
    );
    gate.wait_for_status("/vehicles", &probe, 200).await;

    assert_eq!(admitted(&gate, &key, "gold-client", Some("gold")).await, 3);
    assert_eq!(admitted(&gate, &key, "no-plan", None).await, 1);
    assert_eq!(
        admitted(&gate, &key, "unknown-plan", Some("platinum")).await,
        1
    );

    // The config's tier wins over the token's claim.
    assert_eq!(admitted(&gate, &key, "pinned", Some("gold")).await, 2);
}
