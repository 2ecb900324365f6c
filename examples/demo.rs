//! The whole stack on this machine, with a short demo of real requests.
//!
//! Run it with `scripts/demo`: it starts Redis, the OAuth2 provider, the two
//! sample services, Gatehouse and Envoy (on 127.0.0.1:10000), shows a few
//! requests, and keeps everything running until Ctrl-C.

#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::Value;
use support::{FixedPorts, MOBILE, PARTNER, Stack, WEB};

/// Envoy's listener, as the README documents it.
const ENVOY_PORT: u16 = 10000;
/// The provider's port, so its token endpoint stays the same between runs.
const PROVIDER_PORT: u16 = 9400;
/// Gatehouse's metrics, at the default of `config/gatehouse.yaml`.
const METRICS_PORT: u16 = 9464;

#[tokio::main]
async fn main() {
    println!("starting redis, the OAuth2 provider, the sample services, gatehouse and envoy...");
    let fixed = FixedPorts {
        envoy: Some(ENVOY_PORT),
        provider: Some(PROVIDER_PORT),
        metrics: Some(METRICS_PORT),
    };
    let stack = tokio::task::spawn_blocking(move || Stack::start_with(fixed))
        .await
        .expect("start the stack");

    println!();
    println!("envoy (the gateway):  {}", stack.url("/"));
    println!("token endpoint:       {}", stack.token_endpoint());
    println!("resource (audience):  {}", support::API_RESOURCE);
    println!(
        "gatehouse admin API:  127.0.0.1:{} (gatehouse reload --admin 127.0.0.1:{})",
        stack.gatehouse_ports.admin, stack.gatehouse_ports.admin
    );
    println!(
        "logs, while it runs:  {} (removed on Ctrl-C)",
        stack.dir.path().display()
    );
    println!("clients (id / secret / profile):");
    for (client, profile) in [(WEB, "web"), (MOBILE, "mobile"), (PARTNER, "partner")] {
        println!("  {:<13} {:<20} {profile}", client.0, client.1);
    }
    println!();

    let http = reqwest::Client::new();
    let scope = "vehicles:read stations:read";

    let response = http
        .get(stack.url("/vehicles"))
        .send()
        .await
        .expect("request");
    show("GET /vehicles without a token", response).await;

    for client in [WEB, MOBILE, PARTNER] {
        let token = support::token(&stack.token_endpoint(), client, scope).await;
        let response = http
            .get(stack.url("/vehicles/v-1"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("request");
        show(&format!("GET /vehicles/v-1 as {}", client.0), response).await;
    }

    // The web client may also ask for the mobile shape; a partner asking
    // for the web shape keeps its own.
    for (client, asked) in [(WEB, "mobile"), (PARTNER, "web")] {
        let token = support::token(&stack.token_endpoint(), client, scope).await;
        let response = http
            .get(stack.url("/vehicles/v-1"))
            .bearer_auth(&token)
            .header("x-client-type", asked)
            .send()
            .await
            .expect("request");
        let title = format!(
            "GET /vehicles/v-1 as {} with x-client-type: {asked}",
            client.0
        );
        show(&title, response).await;
    }

    let token = support::token(&stack.token_endpoint(), PARTNER, scope).await;
    let response = http
        .get(stack.url("/vehicles/v-1?fields=id,battery.soc"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    show(
        "GET /vehicles/v-1?fields=id,battery.soc as demo-partner",
        response,
    )
    .await;

    let token = support::token(&stack.token_endpoint(), MOBILE, scope).await;
    let response = http
        .get(stack.url("/overview"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    show(
        "GET /overview as demo-mobile (vehicles and stations in one answer)",
        response,
    )
    .await;

    // GCRA, the default algorithm: the burst of 5 goes through at once, the
    // sixth must wait for the next 12 s interval.
    let token = support::token(&stack.token_endpoint(), WEB, scope).await;
    for n in 1..=6 {
        let response = http
            .get(stack.url("/stations"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("request");
        if n == 6 {
            show(
                "GET /stations, the 6th time in a row (policy `stations`: 5 a minute, \
                 smoothed: a burst of 5, then one every 12 s)",
                response,
            )
            .await;
        }
    }

    println!("try it yourself:");
    println!(
        "  TOKEN=$(curl -s -u demo-mobile:demo-mobile-secret -d grant_type=client_credentials \\\n    -d resource={} -d 'scope=vehicles:read' {} | sed 's/.*\"access_token\":\"\\([^\"]*\\)\".*/\\1/')",
        support::API_RESOURCE,
        stack.token_endpoint()
    );
    println!(
        "  curl -s -H \"Authorization: Bearer $TOKEN\" {}",
        stack.url("/vehicles")
    );
    println!(
        "  curl -s http://127.0.0.1:{}/metrics | grep '^gatehouse_check'",
        stack.metrics_port
    );
    println!();
    println!("the stack keeps running; press Ctrl-C to stop it.");

    if let Err(err) = tokio::signal::ctrl_c().await {
        eprintln!("cannot wait for Ctrl-C: {err}");
    }
    println!("stopping...");
    drop(stack);
}

async fn show(title: &str, response: reqwest::Response) {
    let status = response.status();
    let interesting = [
        "www-authenticate",
        "retry-after",
        "ratelimit",
        "content-length",
        "vary",
        "x-gatehouse-partial",
    ];
    let headers: Vec<String> = interesting
        .iter()
        .filter_map(|name| {
            response
                .headers()
                .get(*name)
                .map(|v| format!("{name}: {}", v.to_str().unwrap_or("?")))
        })
        .collect();
    let body = response.text().await.unwrap_or_default();
    let body = match serde_json::from_str::<Value>(&body) {
        Ok(json) => json.to_string(),
        Err(_) => body,
    };

    println!("== {title}");
    println!("   {status}");
    for header in headers {
        println!("   {header}");
    }
    println!("   {}", body.chars().take(400).collect::<String>());
    println!();
}
