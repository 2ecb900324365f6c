//! The policy decision for one request: route, token, scopes, rate limit.
//!
//! Everything Gatehouse decides about a request happens here, once. What
//! ext_proc needs later (the client, its profile) leaves through
//! [`Metadata`], so the response path never parses the token again.

use std::collections::HashMap;

use crate::authz;
use crate::config::Route;
use crate::decision::{
    Allow, CLIENT_ID_HEADER, Decision, IDENTITY_HEADERS, Metadata, Refusal, SUBJECT_HEADER,
};
use crate::ratelimit::{Outcome, Query};
use crate::route;
use crate::state::Runtime;

/// The parts of an HTTP request that Check looks at.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Upper-case method.
    pub method: &'a str,
    /// The normalised path, possibly with a query.
    pub path: &'a str,
    /// Request headers, names in lower case.
    pub headers: &'a HashMap<String, String>,
    /// The client's address as Envoy established it.
    pub client_address: Option<&'a str>,
    /// The request id Envoy assigned.
    pub request_id: &'a str,
}

/// Decides what happens to `request`.
pub async fn decide(runtime: &Runtime, request: Request<'_>) -> Decision {
    match evaluate(runtime, request).await {
        Ok(allow) => Decision::Allow(allow),
        Err(refusal) => {
            tracing::info!(authz.decision = "deny", authz.reason = refusal.code(), error = %refusal);
            Decision::Deny(refusal.into_deny(request.request_id))
        }
    }
}

async fn evaluate(runtime: &Runtime, request: Request<'_>) -> Result<Allow, Refusal> {
    let config = &runtime.config;
    let span = tracing::Span::current();

    let route =
        route::find(&config.routes, request.method, request.path).ok_or(Refusal::NoRoute)?;
    span.record("route", route.name.as_str());

    let identity = if route.public {
        None
    } else {
        let authorization = request.headers.get("authorization").map(String::as_str);
        let identity = runtime.authn.authenticate(authorization).await?;
        span.record("client.id", identity.client_id.as_str());
        authz::authorize(route, &identity)?;
        Some(identity)
    };

    let client_key = match &identity {
        Some(identity) => format!("client:{}", identity.client_id),
        None => format!("addr:{}", client_address(config, &request)),
    };
    let client_id = identity
        .as_ref()
        .map(|identity| identity.client_id.as_str());
    let response_headers = limit(runtime, route, &client_key, client_id).await?;

    let mut allow = Allow {
        response_headers,
        ..Allow::default()
    };

    // The token stops here: services behind the gateway get the identity
    // headers instead, and no client-supplied copy of those survives.
    allow.remove_headers.push("authorization".to_owned());
    if let Some(identity) = &identity {
        allow
            .set_headers
            .push((CLIENT_ID_HEADER.to_owned(), identity.client_id.clone()));
        allow
            .set_headers
            .push((SUBJECT_HEADER.to_owned(), identity.subject.clone()));
    }
    for name in IDENTITY_HEADERS {
        if !allow.set_headers.iter().any(|(set, _)| set == name) {
            allow.remove_headers.push(name.to_owned());
        }
    }

    let client_id = identity.as_ref().map(|identity| identity.client_id.clone());
    let profile = client_id
        .as_ref()
        .and_then(|id| config.clients.get(id))
        .and_then(|client| client.profile.clone())
        .or_else(|| route.profile.clone())
        .filter(|profile| config.steps(profile, &route.name).is_some());

    allow.metadata = Metadata {
        request_id: request.request_id.to_owned(),
        route: Some(route.name.clone()),
        client_id,
        profile,
    };

    tracing::debug!(authz.decision = "allow", reshape.profile = ?allow.metadata.profile);
    Ok(allow)
}

/// The address a public route counts by: the one Envoy established from
/// `x-forwarded-for` and passed in the configured header (Envoy overwrites
/// any copy a client sends), else the TCP peer Envoy reports.
fn client_address<'a>(config: &'a crate::config::Config, request: &Request<'a>) -> &'a str {
    config
        .client_address_header
        .as_ref()
        .and_then(|name| request.headers.get(name))
        .map(String::as_str)
        .or(request.client_address)
        .unwrap_or("unknown")
}

/// Counts the request against the route's policy and returns the headers
/// that describe the limit.
///
/// The client's tier is the one set for it under `clients`.
/// TODO: tiers from a token claim need the claim on the verified identity,
/// which it does not carry yet; until then tiers are set per client only.
async fn limit(
    runtime: &Runtime,
    route: &Route,
    client_key: &str,
    client_id: Option<&str>,
) -> Result<Vec<(String, String)>, Refusal> {
    let Some(limit) = &route.rate_limit else {
        return Ok(Vec::new());
    };
    let policy = &limit.policy;
    let tier = client_id
        .and_then(|id| runtime.config.clients.get(id))
        .and_then(|client| client.tier.as_deref());

    let query = Query::new(policy, client_key, tier, limit.group.as_deref(), limit.cost);
    match runtime.limiter.decide(&query).await {
        Outcome::Allowed(verdict) => Ok(verdict.headers(policy)),
        Outcome::FailedOpen => Ok(Vec::new()),
        Outcome::Refused(verdict) => Err(Refusal::RateLimited {
            policy: policy.name.clone(),
            retry_after: verdict.retry_after,
            headers: verdict.headers(policy),
        }),
        Outcome::FailedClosed => Err(Refusal::LimiterUnavailable {
            policy: policy.name.clone(),
        }),
    }
}
