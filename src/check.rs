//! The policy decision for one request: route, token, scopes, rate limit.
//!
//! Everything Gatehouse decides about a request happens here, once. What
//! ext_proc needs later (the client, its profile) leaves through
//! [`Metadata`], so the response path never parses the token again.

use std::collections::HashMap;
use std::time::Instant;

use crate::authn::{Credentials, Identity, bearer};
use crate::authz;
use crate::config::{Forward, Route, RouteLimit};
use crate::decision::{Allow, Decision, IDENTITY_HEADERS, Metadata, Refusal};
use crate::metrics;
use crate::profile;
use crate::ratelimit::{Outcome, Query};
use crate::reshape;
use crate::route;
use crate::shaping;
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

/// Decides what happens to `request`, and counts the answer and its time
/// in the one place every Check passes.
pub async fn decide(runtime: &Runtime, request: Request<'_>) -> Decision {
    let started = Instant::now();
    let route = route::find(&runtime.config.routes, request.method, request.path);
    let result = match route {
        Some(route) => evaluate(runtime, route, request).await,
        None => Err(Refusal::NoRoute),
    };

    let route = route.map_or("", |route| route.name.as_str());
    let reason = result.as_ref().map_or_else(Refusal::code, |_| "ok");
    metrics::check_decided(route, result.is_ok(), reason, started.elapsed());

    match result {
        Ok(allow) => Decision::Allow(Box::new(allow)),
        Err(refusal) => {
            tracing::info!(authz.decision = "deny", authz.reason = refusal.code(), error = %refusal);
            Decision::Deny(refusal.into_deny(request.request_id))
        }
    }
}

async fn evaluate(
    runtime: &Runtime,
    route: &Route,
    request: Request<'_>,
) -> Result<Allow, Refusal> {
    let config = &runtime.config;
    let span = tracing::Span::current();
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
        None => format!("addr:{}", client_address(config, &request)),
    };
    let fields = sparse_fieldset(runtime, request.path)?;
    let response_headers = limit(runtime, route, &client_key, identity.as_deref()).await?;

    let client_id = identity.as_ref().map(|identity| identity.client_id.clone());
    let choice = choose_profile(runtime, route, &request, identity.as_deref());
    let mut allow = Allow {
        response_headers,
        metadata: Metadata {
            request_id: request.request_id.to_owned(),
            route: Some(route.name.clone()),
            client_id,
            profile: choice.profile,
            fields,
            vary: choice.vary,
        },
        ..Allow::default()
    };

    // The token stops here: services behind the gateway get the identity
    // headers instead, and no client-supplied copy of those survives. A
    // token sent in the query is cut from the path too, or it would reach
    // the services' own access logs.
    // Public routes read no token, but one sent there must not reach a
    // service either.
    allow.remove_headers.push("authorization".to_owned());
    allow.remove_query.push(bearer::QUERY_PARAMETER.to_owned());
    let forward = &config.tokens.forward;
    if let Some(identity) = &identity {
        allow.set_headers = identity_headers(forward, identity);
    }
    if shaping::has_steps(runtime, &allow.metadata) {
        keep_the_body_reshapeable(request.headers, &mut allow);
    }
    route_headers(route, &mut allow);
    protect_identity_headers(forward, &mut allow);

    tracing::debug!(authz.decision = "allow", reshape.profile = ?allow.metadata.profile);
    Ok(allow)
}

/// Keeps a client from turning its own profile off through the upstream.
///
/// A response Gatehouse cannot decode (`br`, `zstd`, `deflate`) or only a
/// range of passes unchanged, so a client whose profile drops fields could
/// otherwise ask for the full body in one of those forms. The upstream is
/// only offered gzip (when the client takes it) or plain bodies, and never
/// asked for a range.
fn keep_the_body_reshapeable(headers: &HashMap<String, String>, allow: &mut Allow) {
    let takes_gzip = headers.get("accept-encoding").is_some_and(|accepted| {
        accepted.split(',').any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or_default().trim();
            // `q=0` (RFC 9110 section 12.4.2) says "not acceptable".
            let refused = parts.any(|param| {
                let weight = param
                    .trim()
                    .strip_prefix("q=")
                    .or(param.trim().strip_prefix("Q="));
                weight.and_then(|weight| weight.trim().parse::<f32>().ok()) == Some(0.0)
            });
            name.eq_ignore_ascii_case("gzip") && !refused
        })
    });

    if takes_gzip {
        allow
            .set_headers
            .push(("accept-encoding".to_owned(), "gzip".to_owned()));
    } else {
        allow.remove_headers.push("accept-encoding".to_owned());
    }
    allow.remove_headers.push("range".to_owned());
    allow.remove_headers.push("if-range".to_owned());
}

/// Makes sure every identity header reaching a service is Gatehouse's own.
///
/// A name Gatehouse sets replaces the client's copy (Envoy overwrites every
/// value of a set header). Every other reserved or forwarded name is
/// removed, even one a route appends to (which the config refuses): Envoy
/// applies removals last, so an appended value never travels beside a
/// client's.
fn protect_identity_headers(forward: &Forward, allow: &mut Allow) {
    for name in IDENTITY_HEADERS.into_iter().chain(forward.names()) {
        let set = allow.set_headers.iter().any(|(set, _)| set == name);
        if !set && !allow.remove_headers.iter().any(|removed| removed == name) {
            allow.remove_headers.push(name.to_owned());
        }
    }
}

/// The profile for this client on this route; see [`crate::profile`].
fn choose_profile(
    runtime: &Runtime,
    route: &Route,
    request: &Request<'_>,
    identity: Option<&Identity>,
) -> profile::Choice {
    let reshape = &runtime.config.reshape;
    let client_id = identity.map(|identity| identity.client_id.as_str());
    let claim = reshape
        .profile_claim
        .as_deref()
        .and_then(|claim| identity?.claim_values(claim)?.into_iter().next());
    let header = reshape
        .profile_header
        .as_ref()
        .and_then(|name| request.headers.get(name))
        .map(String::as_str);

    let asked = profile::Asked {
        client_id: client_id.filter(|_| !route.public),
        claim: claim.as_deref(),
        header,
    };
    profile::choose(&runtime.config, route, asked)
}

/// The sparse fieldset in the query, checked now so a bad one is a 400
/// rather than a silently unshaped body later.
fn sparse_fieldset(runtime: &Runtime, path: &str) -> Result<Option<String>, Refusal> {
    let param = &runtime.config.reshape.fields_param;
    let Some((_, query)) = path.split_once('?') else {
        return Ok(None);
    };

    let values: Vec<String> = form_urlencoded::parse(query.as_bytes())
        .filter(|(key, _)| key == param)
        .map(|(_, value)| value.into_owned())
        .filter(|value| !value.trim().is_empty())
        .collect();
    if values.is_empty() {
        return Ok(None);
    }

    let joined = values.join(",");
    match reshape::sparse_fieldset(&joined) {
        Ok(_) => Ok(Some(joined)),
        Err(_) => Err(Refusal::BadFields {
            param: param.clone(),
        }),
    }
}

/// The route's own request header changes, with placeholders filled from
/// the decision so far. A header whose value ends up empty is not sent.
fn route_headers(route: &Route, allow: &mut Allow) {
    let metadata = &allow.metadata;
    let fill = |value: &str| {
        fill_placeholders(value, |name| match name {
            "{request_id}" => Some(metadata.request_id.as_str()),
            "{route}" => Some(route.name.as_str()),
            "{client_id}" => Some(metadata.client_id.as_deref().unwrap_or_default()),
            "{profile}" => Some(metadata.profile.as_deref().unwrap_or_default()),
            _ => None,
        })
    };

    let headers = &route.request_headers;
    let filled = |pairs: &[(String, String)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| (name.clone(), fill(value)))
            .filter(|(_, value)| !value.is_empty())
            .collect()
    };
    let set = filled(&headers.set);
    let add = filled(&headers.add);

    allow.set_headers.extend(set);
    allow.add_headers.extend(add);
    allow.remove_headers.extend(headers.remove.iter().cloned());
}

/// Replaces each `{name}` that `lookup` knows in one pass, so a value
/// filled in is never read again for placeholders.
fn fill_placeholders<'a>(template: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;

    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let end = tail.find('}').map(|end| end + 1).unwrap_or(tail.len());
        match lookup(&tail[..end]) {
            Some(value) => out.push_str(value),
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
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
/// The client's tier is the one set for it under `clients`; for a client
/// the config puts on no tier, the policy's `tier_claim` in its token.
async fn limit(
    runtime: &Runtime,
    route: &Route,
    client_key: &str,
    identity: Option<&Identity>,
) -> Result<Vec<(String, String)>, Refusal> {
    let headers = match &route.rate_limit {
        Some(limit) => limit_one(runtime, limit, client_key, identity).await?,
        None => Vec::new(),
    };

    // A composite answers with its parts' routes' data, so their limits
    // count too: otherwise `/overview` would read stations past the
    // stations policy. Each counter (policy and group) counts once per
    // request, so a part sharing the composite's own counter costs nothing
    // more; the answer carries the composite's own headers.
    // TODO: the composite's own limit and its parts' are decided one after
    // the other, so a part that refuses leaves the earlier ones consumed.
    if let Some(composite) = &route.composite {
        let counter = |limit: &RouteLimit| (limit.policy.name.clone(), limit.group.clone());
        let mut counted: Vec<_> = route.rate_limit.iter().map(counter).collect();
        for part in &composite.parts {
            let own = route::part_route(&runtime.config.routes, &part.path);
            let Some(limit) = own.and_then(|own| own.rate_limit.as_ref()) else {
                continue;
            };
            if counted.contains(&counter(limit)) {
                continue;
            }
            counted.push(counter(limit));
            limit_one(runtime, limit, client_key, identity).await?;
        }
    }
    Ok(headers)
}

/// Counts one request against `limit` for this client.
async fn limit_one(
    runtime: &Runtime,
    limit: &RouteLimit,
    client_key: &str,
    identity: Option<&Identity>,
) -> Result<Vec<(String, String)>, Refusal> {
    let policy = &limit.policy;
    let configured = identity
        .and_then(|identity| runtime.config.clients.get(&identity.client_id))
        .and_then(|client| client.tier.clone());
    let claimed = || {
        let claim = policy.tier_claim.as_deref()?;
        identity?.claim_values(claim)?.into_iter().next()
    };
    let tier = configured.or_else(claimed);
    let tier = tier.as_deref();

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

#[cfg(test)]
mod tests {
    use super::{Allow, Forward, fill_placeholders, protect_identity_headers};

    #[test]
    fn only_headers_gatehouse_sets_escape_removal() {
        let forward = Forward {
            client_id: Some("x-gatehouse-client-id".to_owned()),
            subject: None,
            scopes: Some("x-gatehouse-scopes".to_owned()),
            claims: vec![("tenant".to_owned(), "x-tenant".to_owned())],
        };
        let pair = |name: &str| (name.to_owned(), "value".to_owned());
        let mut allow = Allow {
            set_headers: vec![pair("x-gatehouse-client-id"), pair("x-gatehouse-route")],
            add_headers: vec![pair("x-gatehouse-profile"), pair("x-tenant")],
            ..Allow::default()
        };

        protect_identity_headers(&forward, &mut allow);

        // Set names replace the client's copy; every other identity name is
        // removed, appended ones too, since Envoy removes after it appends.
        let mut removed = allow.remove_headers.clone();
        removed.sort();
        assert_eq!(
            removed,
            [
                "x-gatehouse-profile",
                "x-gatehouse-scopes",
                "x-gatehouse-subject",
                "x-tenant",
            ]
        );
    }

    #[test]
    fn placeholders_are_filled_once() {
        let lookup = |name: &str| match name {
            "{request_id}" => Some("{profile}"),
            "{profile}" => Some("mobile"),
            _ => None,
        };

        assert_eq!(
            fill_placeholders("{request_id}/{profile}/{other}/{", lookup),
            "{profile}/mobile/{other}/{"
        );
    }
}
