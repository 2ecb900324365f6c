//! The policy decision for one request: route, token, scopes, rate limit.
//!
//! Everything Gatehouse decides about a request happens here, once. What
//! ext_proc needs later (the client, its profile) leaves through
//! [`Metadata`], so the response path never parses the token again.

use std::collections::HashMap;

use crate::authn::{Credentials, Identity};
use crate::authz;
use crate::config::{FailureMode, Forward, Route};
use crate::decision::{Allow, Decision, IDENTITY_HEADERS, Metadata, Refusal};
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
        let credentials = Credentials {
            authorization: request.headers.get("authorization").map(String::as_str),
            path: request.path,
        };
        let identity = runtime
            .authn
            .authenticate(credentials, &route.token_kinds)
            .await?;
        span.record("client.id", identity.client_id.as_str());
        authz::authorize(route, &identity)?;
        Some(identity)
    };

    let client_key = match &identity {
        Some(identity) => format!("client:{}", identity.client_id),
        None => format!("addr:{}", request.client_address.unwrap_or("unknown")),
    };
    let response_headers = limit(runtime, route, &client_key).await?;

    let mut allow = Allow {
        response_headers,
        ..Allow::default()
    };

    // The token stops here: services behind the gateway get the identity
    // headers instead, and no client-supplied copy of those survives.
    allow.remove_headers.push("authorization".to_owned());
    let forward = &config.tokens.forward;
    if let Some(identity) = &identity {
        allow.set_headers = identity_headers(forward, identity);
    }
    for name in IDENTITY_HEADERS.into_iter().chain(forward.names()) {
        let set = allow.set_headers.iter().any(|(set, _)| set == name);
        if !set && !allow.remove_headers.iter().any(|removed| removed == name) {
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

/// The identity headers `forward` names, with this identity's values.
///
/// A value that could not travel safely in a header (control characters,
/// non-ASCII) is left out, and the header is then removed like any other.
fn identity_headers(forward: &Forward, identity: &Identity) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    let mut put = |name: &Option<String>, value: String| {
        if let Some(name) = name {
            headers.push((name.clone(), value));
        }
    };

    put(&forward.client_id, identity.client_id.clone());
    put(&forward.subject, identity.subject.clone());
    put(&forward.scopes, identity.scopes.join(" "));
    for (claim, header) in &forward.claims {
        if let Some(values) = identity.claim_values(claim) {
            put(&Some(header.clone()), values.join(","));
        }
    }

    headers.retain(|(name, value)| {
        let safe = value.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
        if !safe {
            tracing::debug!(header = %name, "identity value not forwarded: unsafe in a header");
        }
        safe
    });
    headers
}

/// Counts the request against the route's policy and returns the headers
/// that describe the limit.
async fn limit(
    runtime: &Runtime,
    route: &Route,
    client_key: &str,
) -> Result<Vec<(String, String)>, Refusal> {
    let Some(policy) = &route.rate_limit else {
        return Ok(Vec::new());
    };

    match runtime.limiter.check(policy, client_key, 1).await {
        Ok(verdict) if verdict.allowed => Ok(verdict.headers(policy)),
        Ok(verdict) => Err(Refusal::RateLimited {
            policy: policy.name.clone(),
            retry_after: verdict.reset,
            headers: verdict.headers(policy),
        }),
        Err(err) => match policy.failure_mode {
            FailureMode::Open => {
                tracing::warn!(ratelimit.policy = %policy.name, error = %err, "rate limit store failed; allowing (fail open)");
                Ok(Vec::new())
            }
            FailureMode::Closed => {
                tracing::warn!(ratelimit.policy = %policy.name, error = %err, "rate limit store failed; refusing (fail closed)");
                Err(Refusal::LimiterUnavailable {
                    policy: policy.name.clone(),
                })
            }
        },
    }
}
