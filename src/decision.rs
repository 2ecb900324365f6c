//! The outcome of a Check, and the one place where a refusal becomes an HTTP
//! answer.
//!
//! Every refusal Gatehouse has a policy for is a successful Check that carries
//! a denied HTTP response (400 for a bad sparse fieldset, 401, 403, 404, 429,
//! or 503 with `Retry-After`): Envoy then sends exactly that answer. Only
//! failures Gatehouse has no policy for (a bug, a panic caught at the edge)
//! become a gRPC error, which leaves Envoy's own `failure_mode_allow` and
//! `status_on_error` in charge. Keeping the mapping here means the status
//! codes, headers and error codes stay consistent across every reason.
//!
//! Envoy's rate-limit service API has no way to ask for a 503, so there a
//! fail-closed policy is the one policy that answers with a gRPC error
//! (`UNAVAILABLE`, in `grpc/ratelimit.rs`), and Envoy's `failure_mode_deny`
//! and `status_on_error` turn it into the 503.

use std::time::Duration;

use serde_json::json;

use crate::authn::AuthnError;

/// The default identity header names (`tokens.forward` may change them).
///
/// Envoy removes each of these from incoming requests before Check runs, and
/// Check's answer removes them, and every configured forwarded name, again,
/// so a client can never supply them.
pub const CLIENT_ID_HEADER: &str = "x-gatehouse-client-id";
/// See [`CLIENT_ID_HEADER`].
pub const SUBJECT_HEADER: &str = "x-gatehouse-subject";
/// Every reserved identity header name, removed from every allowed request.
pub const IDENTITY_HEADERS: [&str; 5] = [
    CLIENT_ID_HEADER,
    SUBJECT_HEADER,
    "x-gatehouse-scopes",
    "x-gatehouse-profile",
    "x-gatehouse-route",
];

/// What Check decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Forward the request, changed as described. Boxed: an allow carries
    /// several lists and the metadata, a denial only a status and a body.
    Allow(Box<Allow>),
    /// Answer the client directly.
    Deny(Deny),
}

/// An allowed request and what changes on its way upstream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allow {
    /// Headers set on the upstream request, replacing any existing value.
    pub set_headers: Vec<(String, String)>,
    /// Headers appended to the upstream request's existing values.
    pub add_headers: Vec<(String, String)>,
    /// Headers removed from the upstream request.
    pub remove_headers: Vec<String>,
    /// Query parameters removed from the upstream request's path.
    pub remove_query: Vec<String>,
    /// Headers added to the response the client gets.
    pub response_headers: Vec<(String, String)>,
    /// What ext_proc needs to know later about this request.
    pub metadata: Metadata,
}

/// What Check hands on to ext_proc through Envoy's dynamic metadata.
///
/// ext_proc reads this instead of parsing the token or matching the route
/// again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// The request id Envoy assigned.
    pub request_id: String,
    /// The matched route's name.
    pub route: Option<String>,
    /// The authenticated client's id.
    pub client_id: Option<String>,
    /// The profile chosen for this client on this route, if any.
    pub profile: Option<String>,
    /// The sparse fieldset the client asked for, as written in the query.
    pub fields: Option<String>,
    /// A request header that chose (or could have chosen) the profile, for
    /// the response's `Vary`.
    pub vary: Option<String>,
}

/// A direct answer to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deny {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// JSON body.
    pub body: String,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No configured route matches the method and path.
    #[error("no route matches the request")]
    NoRoute,

    /// The token was missing or not acceptable.
    #[error(transparent)]
    Token(#[from] AuthnError),

    /// The token lacks a scope the route requires.
    #[error("token lacks required scopes")]
    InsufficientScope {
        /// The scopes the route requires, space separated.
        required: String,
    },

    /// A claim does not satisfy the route's condition on it.
    #[error("token claim {claim} does not satisfy the route")]
    ClaimMismatch {
        /// The claim's name (from the configuration, never the token).
        claim: String,
    },

    /// The client used up a rate limit.
    #[error("rate limit {policy} exceeded")]
    RateLimited {
        /// The policy's name.
        policy: String,
        /// When the client may try again.
        retry_after: Duration,
        /// Headers describing the limit.
        headers: Vec<(String, String)>,
    },

    /// The sparse fieldset in the query is not a list of field paths.
    #[error("the {param} parameter is not a list of field paths")]
    BadFields {
        /// The query parameter's name.
        param: String,
    },

    /// A fail-closed rate limit's store could not answer.
    #[error("rate limit store unavailable for policy {policy}")]
    LimiterUnavailable {
        /// The policy's name.
        policy: String,
    },
}

impl Refusal {
    /// A stable, machine-readable code for logs and the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoRoute => "not_found",
            Self::Token(err) if err.is_transient() => "temporarily_unavailable",
            Self::Token(err) if err.is_missing() => "missing_token",
            Self::Token(_) => "invalid_token",
            Self::InsufficientScope { .. } => "insufficient_scope",
            Self::BadFields { .. } => "invalid_request",
            Self::ClaimMismatch { .. } => "claim_mismatch",
            Self::RateLimited { .. } => "rate_limited",
            Self::LimiterUnavailable { .. } => "temporarily_unavailable",
        }
    }

    /// The HTTP answer for this refusal.
    ///
    /// Bodies never repeat what the client sent (no token, no header value),
    /// so a reflected-content attack through an error page is not possible.
    pub fn into_deny(self, request_id: &str) -> Deny {
        let code = self.code();
        let description = self.to_string();
        let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];

        let status = match &self {
            Self::NoRoute => 404,
            Self::BadFields { .. } => 400,
            Self::Token(err) if err.is_transient() => {
                headers.push(("retry-after".to_owned(), "1".to_owned()));
                503
            }
            Self::Token(err) => {
                // RFC 6750 section 3: no error attribute when no token was sent.
                let challenge = if err.is_missing() {
                    "Bearer".to_owned()
                } else {
                    format!(
                        "Bearer error=\"invalid_token\", error_description=\"{}\"",
                        err.public()
                    )
                };
                headers.push(("www-authenticate".to_owned(), challenge));
                401
            }
            Self::InsufficientScope { required } => {
                let challenge =
                    format!("Bearer error=\"insufficient_scope\", scope=\"{required}\"");
                headers.push(("www-authenticate".to_owned(), challenge));
                403
            }
            Self::ClaimMismatch { claim } => {
                // RFC 6750 has no code of its own for this: the token lacks
                // the privileges the route needs, which is insufficient_scope.
                let claim = claim.replace('"', "'");
                let challenge = format!(
                    "Bearer error=\"insufficient_scope\", \
                     error_description=\"token claim {claim} does not satisfy the route\""
                );
                headers.push(("www-authenticate".to_owned(), challenge));
                403
            }
            Self::RateLimited {
                retry_after,
                headers: limit_headers,
                ..
            } => {
                headers.push(retry_after_header(*retry_after));
                headers.extend(limit_headers.iter().cloned());
                429
            }
            Self::LimiterUnavailable { .. } => {
                headers.push(("retry-after".to_owned(), "1".to_owned()));
                503
            }
        };

        let mut body = json!({
            "error": code,
            "error_description": description,
            "request_id": request_id,
        });
        if let Self::RateLimited { policy, .. } | Self::LimiterUnavailable { policy } = &self {
            body["policy"] = json!(policy);
        }

        Deny {
            status,
            headers,
            body: body.to_string(),
        }
    }
}

/// `Retry-After` in whole seconds, at least 1.
///
/// Envoy's own rate-limit filter builds its 429 from the headers the
/// rate-limit service returns, so that path takes its `Retry-After` from here
/// too.
pub fn retry_after_header(wait: Duration) -> (String, String) {
    let seconds = seconds_up(wait).max(1);
    ("retry-after".to_owned(), seconds.to_string())
}

/// Whole seconds, rounded up so that a client retrying on time is admitted.
pub fn seconds_up(duration: Duration) -> u64 {
    let secs = duration.as_secs();
    if duration.subsec_nanos() > 0 {
        secs + 1
    } else {
        secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(deny: &'a Deny, name: &str) -> Option<&'a str> {
        deny.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    #[test]
    fn missing_token_gets_a_bare_bearer_challenge() {
        let deny = Refusal::Token(AuthnError::Missing).into_deny("r-1");

        assert_eq!(deny.status, 401);
        assert_eq!(header(&deny, "www-authenticate"), Some("Bearer"));
        let body: serde_json::Value = serde_json::from_str(&deny.body).expect("json body");
        assert_eq!(body["error"], "missing_token");
        assert_eq!(body["request_id"], "r-1");
    }

    #[test]
    fn invalid_token_names_the_error_in_the_challenge() {
        let deny = Refusal::Token(AuthnError::Expired).into_deny("r-2");

        assert_eq!(deny.status, 401);
        let challenge = header(&deny, "www-authenticate").expect("challenge");
        assert!(
            challenge.starts_with("Bearer error=\"invalid_token\""),
            "{challenge}"
        );
    }

    #[test]
    fn rate_limited_rounds_retry_after_up_and_names_the_policy() {
        let refusal = Refusal::RateLimited {
            policy: "standard".to_owned(),
            retry_after: Duration::from_millis(1500),
            headers: Vec::new(),
        };
        let deny = refusal.into_deny("r-3");

        assert_eq!(deny.status, 429);
        assert_eq!(header(&deny, "retry-after"), Some("2"));
        let body: serde_json::Value = serde_json::from_str(&deny.body).expect("json body");
        assert_eq!(body["policy"], "standard");
    }

    #[test]
    fn unavailable_introspection_is_503_with_retry_after() {
        let deny = Refusal::Token(AuthnError::IntrospectionUnavailable).into_deny("r-5");

        assert_eq!(deny.status, 503);
        assert_eq!(header(&deny, "retry-after"), Some("1"));
        assert!(header(&deny, "www-authenticate").is_none());
        let body: serde_json::Value = serde_json::from_str(&deny.body).expect("json body");
        assert_eq!(body["error"], "temporarily_unavailable");
    }

    #[test]
    fn claim_mismatch_is_403_insufficient_scope() {
        let deny = Refusal::ClaimMismatch {
            claim: "tenant".to_owned(),
        }
        .into_deny("r-6");

        assert_eq!(deny.status, 403);
        let challenge = header(&deny, "www-authenticate").expect("challenge");
        assert!(challenge.starts_with("Bearer error=\"insufficient_scope\""));
        let body: serde_json::Value = serde_json::from_str(&deny.body).expect("json body");
        assert_eq!(body["error"], "claim_mismatch");
    }

    #[test]
    fn unknown_route_is_not_found() {
        let deny = Refusal::NoRoute.into_deny("r-4");

        assert_eq!(deny.status, 404);
        assert!(header(&deny, "www-authenticate").is_none());
    }
}
