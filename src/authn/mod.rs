//! Authentication: from a request's bearer token to a verified identity.
//!
//! JWT access tokens are matched to their provider by `iss` and verified
//! against its JWKS; opaque tokens are introspected. A verified JWT is
//! cached by its SHA-256 until it expires, so the steady state verifies each
//! token's signature once; no token is ever stored in clear.

pub mod bearer;
mod cache;
mod introspection;
mod issuer;
mod jwt;
mod keys;

use std::sync::{Arc, Weak};

use moka::future::Cache;
use serde_json::{Map, Value};

use crate::config::{Provider, TokenKind, Tokens};
use crate::metrics::Counter;
use cache::{Digest, UntilExpiry, digest, unix_now};
use introspection::Introspector;
use issuer::Issuer;
pub use keys::FetchError;

/// Verified tokens kept at most; older entries are evicted first.
const CACHE_CAPACITY: u64 = 100_000;

/// Who is calling, as established by a verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The provider that issued the token.
    pub issuer: String,
    /// The OAuth2 client the token was issued to.
    pub client_id: String,
    /// The token's subject; for client-credentials tokens, the client itself.
    pub subject: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// `exp`, in seconds since the Unix epoch.
    pub expires_at: u64,
    /// The `kid` of the key that signed a JWT; `None` for opaque tokens.
    pub key_id: Option<String>,
    /// Every claim, for route conditions and forwarded claim headers.
    pub claims: Arc<Map<String, Value>>,
}

impl Identity {
    /// Whether the token grants `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|granted| granted == scope)
    }

    /// A claim's value as text: strings as they are, numbers and booleans
    /// written out, arrays as their string members; `None` when absent.
    pub fn claim_values(&self, name: &str) -> Option<Vec<String>> {
        let scalar = |value: &Value| match value {
            Value::String(text) => Some(text.clone()),
            Value::Number(number) => Some(number.to_string()),
            Value::Bool(flag) => Some(flag.to_string()),
            _ => None,
        };

        match self.claims.get(name)? {
            Value::Array(items) => Some(items.iter().filter_map(scalar).collect()),
            value => scalar(value).map(|text| vec![text]),
        }
    }
}

/// Why a request carries no acceptable token.
///
/// Messages are safe to show to the client: none repeats any part of the
/// token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthnError {
    /// No `Authorization` header.
    #[error("no bearer token")]
    Missing,

    /// The header is not exactly one well-formed bearer token.
    #[error("{0}")]
    Malformed(&'static str),

    /// The token is not a well-formed JWT.
    #[error("token is not a valid JWT")]
    NotAJwt,

    /// The header or the claims name a member twice.
    #[error("token has duplicate header or claim names")]
    DuplicateNames,

    /// `typ` names a kind of JWT that is not an access token.
    #[error("token type is not an access token")]
    WrongType,

    /// The token's algorithm is not in the provider's allow-list.
    #[error("token algorithm is not accepted")]
    AlgorithmRefused,

    /// The token has a critical header extension Gatehouse does not implement.
    #[error("token has an unsupported critical header")]
    UnsupportedCritical,

    /// No published key has the token's `kid`.
    #[error("token is signed by an unknown key")]
    UnknownKey,

    /// The signature does not verify.
    #[error("token signature is invalid")]
    BadSignature,

    /// `exp` is in the past.
    #[error("token has expired")]
    Expired,

    /// `nbf` is in the future.
    #[error("token is not valid yet")]
    NotYetValid,

    /// `iat` is in the future.
    #[error("token was issued in the future")]
    IssuedInFuture,

    /// `iss` names no configured provider.
    #[error("token issuer is not accepted")]
    WrongIssuer,

    /// `aud` names none of the configured audiences.
    #[error("token audience is not accepted")]
    WrongAudience,

    /// A required claim is absent or of the wrong type.
    #[error("token claims are invalid")]
    BadClaims,

    /// The route does not accept this kind of token.
    #[error("{0}")]
    KindRefused(&'static str),

    /// The provider says the opaque token is not active.
    #[error("token is not active")]
    Inactive,

    /// No keys could be obtained from the provider; the caller may retry.
    #[error("token keys are unavailable")]
    KeysUnavailable,

    /// The introspection endpoint failed or timed out; the caller may retry.
    #[error("token introspection is unavailable")]
    IntrospectionUnavailable,
}

impl AuthnError {
    /// Whether no credentials were presented at all.
    pub fn is_missing(&self) -> bool {
        matches!(self, Self::Missing)
    }

    /// Whether the failure is on Gatehouse's side and a retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::KeysUnavailable | Self::IntrospectionUnavailable)
    }

    /// The description for `WWW-Authenticate`; never contains a quote.
    pub fn public(&self) -> String {
        self.to_string().replace('"', "'")
    }
}

/// Where a request's token may be.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// The `Authorization` header, as Envoy passed it.
    pub authorization: Option<&'a str>,
    /// The request path with its query.
    pub path: &'a str,
}

/// Verifies bearer tokens for every configured provider.
pub struct Authenticator {
    providers: Vec<Provider>,
    tokens: Tokens,
    issuers: Vec<Arc<Issuer>>,
    verified: Cache<Digest, Arc<Identity>>,
    /// The provider that introspects opaque tokens, with its client.
    introspection: Option<(Arc<Issuer>, Introspector)>,
}

impl Authenticator {
    /// An authenticator with no keys yet; call [`Authenticator::spawn_refresh`].
    ///
    /// # Errors
    ///
    /// When an HTTP client cannot be built.
    pub fn new(providers: &[Provider], tokens: &Tokens) -> Result<Self, reqwest::Error> {
        let verified = Cache::builder()
            .max_capacity(CACHE_CAPACITY)
            .expire_after(UntilExpiry)
            .support_invalidation_closures()
            .build();

        let mut issuers = Vec::with_capacity(providers.len());
        let mut introspection = None;
        for provider in providers {
            let issuer = Arc::new(Issuer::new(provider, verified.clone())?);
            if let Some(settings) = &provider.introspection {
                let introspector = Introspector::new(provider, settings)?;
                introspection = Some((issuer.clone(), introspector));
            }
            issuers.push(issuer);
        }

        Ok(Self {
            providers: providers.to_vec(),
            tokens: tokens.clone(),
            issuers,
            verified,
            introspection,
        })
    }

    /// Whether this authenticator was built for these settings, so a reload
    /// that changes none of them keeps its keys and caches.
    pub fn serves(&self, providers: &[Provider], tokens: &Tokens) -> bool {
        self.providers == providers && &self.tokens == tokens
    }

    /// Starts each provider's background key refresh.
    pub fn spawn_refresh(&self) {
        for issuer in &self.issuers {
            let weak: Weak<Issuer> = Arc::downgrade(issuer);
            tokio::spawn(Issuer::run_refresh(weak));
        }
    }

    /// Whether every provider's keys are loaded, which readiness reports.
    pub fn has_keys(&self) -> bool {
        self.issuers.iter().all(|issuer| issuer.has_keys())
    }

    /// Verifies the request's bearer token, of a kind in `kinds`, and
    /// returns who it names.
    ///
    /// # Errors
    ///
    /// Why the request carries no acceptable token.
    pub async fn authenticate(
        &self,
        credentials: Credentials<'_>,
        kinds: &[TokenKind],
    ) -> Result<Arc<Identity>, AuthnError> {
        let token = bearer::extract(
            credentials.authorization,
            credentials.path,
            self.tokens.max_bytes,
            self.tokens.allow_query,
        )?;
        let digest = digest(&token);

        // Access-token JWTs always have three dot-separated parts; opaque
        // tokens have none. Anything with a dot is held to the JWT rules.
        if !token.contains('.') {
            return match &self.introspection {
                Some((issuer, introspector)) if kinds.contains(&TokenKind::Opaque) => {
                    let endpoint = issuer.introspection_endpoint();
                    introspector.introspect(&token, digest, endpoint).await
                }
                _ => Err(AuthnError::NotAJwt),
            };
        }
        if !kinds.contains(&TokenKind::Jwt) {
            return Err(AuthnError::KindRefused(
                "this route accepts only opaque tokens",
            ));
        }

        if let Some(identity) = self.cached(&digest).await {
            Counter::TokenCacheHit.inc();
            return Ok(identity);
        }
        Counter::TokenCacheMiss.inc();

        let peeked = jwt::peek(&token)?;
        let issuer = self
            .issuers
            .iter()
            .find(|issuer| peeked.issuer.as_deref() == Some(issuer.provider().issuer.as_str()))
            .ok_or(AuthnError::WrongIssuer)?;

        let identity = Arc::new(issuer.verify(&token).await?);
        issuer.remember(digest, identity.clone()).await;
        Ok(identity)
    }

    /// A verified identity for this token, while it is within its `exp`.
    async fn cached(&self, digest: &Digest) -> Option<Arc<Identity>> {
        let identity = self.verified.get(digest).await?;

        // The same leeway as verification, so a token in its grace period is
        // not verified again on every request.
        let leeway = self
            .issuers
            .iter()
            .find(|issuer| issuer.provider().issuer == identity.issuer)
            .map(|issuer| issuer.provider().leeway.as_secs())?;
        (identity.expires_at.saturating_add(leeway) > unix_now()).then_some(identity)
    }
}
