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
mod source;

use std::collections::HashSet;
use std::sync::Arc;

use moka::future::Cache;
use serde_json::{Map, Value};

use crate::config::{Provider, TokenKind, Tokens};
use crate::metrics::Counter;
use cache::{Digest, Rules, UntilExpiry, Verified, digest, unix_now};
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
    tokens: Tokens,
    issuers: Vec<Arc<Issuer>>,
    verified: Cache<Digest, Verified>,
    /// The provider that introspects opaque tokens, with its client.
    introspection: Option<(Arc<Issuer>, Arc<Introspector>)>,
}

impl Authenticator {
    /// An authenticator for these settings; call
    /// [`Authenticator::spawn_refresh`] to start fetching keys.
    ///
    /// With the authenticator of the configuration in force as `previous`,
    /// whatever these settings leave valid carries over: a provider's key
    /// source (its keys, even the last good ones of a provider that is
    /// down, and its refresh) while its key settings are unchanged; its
    /// cached verified tokens while none of its settings changed; the
    /// introspection verdicts likewise. `tokens` never touches either, so a
    /// change there keeps everything.
    ///
    /// # Errors
    ///
    /// When an HTTP client cannot be built.
    pub fn new(
        providers: &[Provider],
        tokens: &Tokens,
        previous: Option<&Authenticator>,
    ) -> Result<Self, reqwest::Error> {
        let verified = match previous {
            Some(previous) => previous.verified.clone(),
            None => Cache::builder()
                .max_capacity(CACHE_CAPACITY)
                .expire_after(UntilExpiry)
                .support_invalidation_closures()
                .build(),
        };

        let mut issuers = Vec::with_capacity(providers.len());
        let mut introspection = None;
        for (index, provider) in providers.iter().enumerate() {
            let before = previous.and_then(|previous| previous.issuer(&provider.issuer));
            let issuer = match before {
                Some(before) if before.serves(provider) => {
                    if let Some(source) = before.source() {
                        source.set_index(index);
                    }
                    before.clone()
                }
                _ => {
                    let kept = before.and_then(|before| before.source());
                    Arc::new(Issuer::new(provider, index, verified.clone(), kept)?)
                }
            };

            if let Some(settings) = &provider.introspection {
                let introspector = match previous.and_then(|p| p.introspection.as_ref()) {
                    Some((before, introspector)) if before.provider() == provider => {
                        introspector.clone()
                    }
                    _ => Arc::new(Introspector::new(provider, settings)?),
                };
                introspection = Some((issuer.clone(), introspector));
            }
            issuers.push(issuer);
        }

        // Tokens verified under rules no longer in force would be refused
        // on their next use anyway (see `cached`); dropping them now frees
        // their room.
        if previous.is_some() {
            let live: HashSet<Rules> = issuers.iter().map(|issuer| issuer.rules()).collect();
            let dropped =
                verified.invalidate_entries_if(move |_, entry| !live.contains(&entry.rules));
            if let Err(err) = dropped {
                tracing::warn!(error = %err, "could not drop tokens verified under old rules");
            }
        }

        Ok(Self {
            tokens: tokens.clone(),
            issuers,
            verified,
            introspection,
        })
    }

    /// Starts the background key refresh of each provider's key source that
    /// does not run one yet.
    pub fn spawn_refresh(&self) {
        for source in self.issuers.iter().filter_map(|issuer| issuer.source()) {
            source.spawn_refresh();
        }
    }

    /// Whether every provider can verify its tokens (JWKS keys loaded, or
    /// only HMAC with its secret), which readiness reports.
    pub fn has_keys(&self) -> bool {
        self.issuers.iter().all(|issuer| issuer.has_keys())
    }

    /// The issuer configured for `iss`.
    fn issuer(&self, iss: &str) -> Option<&Arc<Issuer>> {
        self.issuers
            .iter()
            .find(|issuer| issuer.provider().issuer == iss)
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
        let issuer = peeked
            .issuer
            .as_deref()
            .and_then(|iss| self.issuer(iss))
            .ok_or(AuthnError::WrongIssuer)?;

        let identity = Arc::new(issuer.verify(&token).await?);
        issuer.remember(digest, identity.clone()).await;
        Ok(identity)
    }

    /// A verified identity for this token, while it is within its `exp` and
    /// its provider's rules are the ones that verified it.
    async fn cached(&self, digest: &Digest) -> Option<Arc<Identity>> {
        let Verified { identity, rules } = self.verified.get(digest).await?;

        // A reload may have changed the provider's audiences, claims or
        // keys since: then the token is verified again under the new rules.
        let issuer = self.issuer(&identity.issuer)?;
        if issuer.rules() != rules {
            return None;
        }

        // The same leeway as verification, so a token in its grace period is
        // not verified again on every request.
        let leeway = issuer.provider().leeway.as_secs();
        (identity.expires_at.saturating_add(leeway) > unix_now()).then_some(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::issuer::tests::{key_set, provider, token};
    use super::*;
    use crate::config::Forward;

    fn tokens(max_bytes: usize, client_id: &str) -> Tokens {
        Tokens {
            max_bytes,
            allow_query: false,
            forward: Forward {
                client_id: Some(client_id.to_owned()),
                subject: None,
                scopes: None,
                claims: Vec::new(),
            },
        }
    }

    async fn authenticate(authn: &Authenticator, token: &str) -> Result<Arc<Identity>, AuthnError> {
        let authorization = format!("Bearer {token}");
        let credentials = Credentials {
            authorization: Some(&authorization),
            path: "/vehicles",
        };
        authn.authenticate(credentials, &[TokenKind::Jwt]).await
    }

    #[tokio::test]
    async fn a_reload_keeps_the_keys_and_cached_tokens_its_changes_leave_valid() {
        let first = Authenticator::new(&[provider()], &tokens(8192, "x-a"), None).expect("built");
        let source = first.issuers[0].source().expect("a key source").clone();
        source.install(key_set("k"));
        let token = token(Some("k"));
        authenticate(&first, &token).await.expect("verified");
        assert!(first.cached(&digest(&token)).await.is_some());

        // Other forward names and another size limit leave the provider,
        // its keys and its cached tokens alone.
        let second =
            Authenticator::new(&[provider()], &tokens(4096, "x-b"), Some(&first)).expect("built");
        assert!(Arc::ptr_eq(&second.issuers[0], &first.issuers[0]));
        assert!(second.has_keys());
        assert!(
            second.cached(&digest(&token)).await.is_some(),
            "still cached"
        );

        // Other audiences keep the keys, but the cached verdict was reached
        // under the old ones: the token is checked again, and refused.
        let narrower = Provider {
            audiences: vec!["other".to_owned()],
            ..provider()
        };
        let third =
            Authenticator::new(&[narrower], &tokens(4096, "x-b"), Some(&second)).expect("built");
        assert!(Arc::ptr_eq(
            third.issuers[0].source().expect("a source"),
            &source
        ));
        assert!(third.has_keys(), "the keys are kept");
        assert!(third.cached(&digest(&token)).await.is_none());
        let refused = authenticate(&third, &token).await;
        assert!(
            matches!(refused, Err(AuthnError::WrongAudience)),
            "{refused:?}"
        );

        // The old version, still serving requests in flight, keeps its own
        // rules.
        assert!(authenticate(&second, &token).await.is_ok());
    }

    #[tokio::test]
    async fn a_reload_that_adds_a_provider_before_another_keeps_the_others_keys() {
        let first = Authenticator::new(&[provider()], &tokens(8192, "x-a"), None).expect("built");
        first.issuers[0]
            .source()
            .expect("a source")
            .install(key_set("k"));
        let token = token(Some("k"));
        authenticate(&first, &token).await.expect("verified");

        let added = Provider {
            issuer: "https://added.test".to_owned(),
            jwks_uri: Some("https://added.test/jwks".to_owned()),
            ..provider()
        };
        let both = [added, provider()];
        let second = Authenticator::new(&both, &tokens(8192, "x-a"), Some(&first)).expect("built");

        assert!(
            Arc::ptr_eq(&second.issuers[1], &first.issuers[0]),
            "moved, kept"
        );
        assert!(second.issuers[1].has_keys());
        assert!(!second.has_keys(), "the new provider has no keys yet");
        assert!(second.cached(&digest(&token)).await.is_some());
    }

    #[tokio::test]
    async fn a_reload_that_moves_the_jwks_starts_with_no_keys() {
        let first = Authenticator::new(&[provider()], &tokens(8192, "x-a"), None).expect("built");
        first.issuers[0]
            .source()
            .expect("a source")
            .install(key_set("k"));
        let token = token(Some("k"));
        authenticate(&first, &token).await.expect("verified");

        let moved = Provider {
            jwks_uri: Some("https://issuer.test/other".to_owned()),
            ..provider()
        };
        let second =
            Authenticator::new(&[moved], &tokens(8192, "x-a"), Some(&first)).expect("built");
        assert!(!second.has_keys(), "keys come from the new location");
        assert!(second.cached(&digest(&token)).await.is_none());
    }
}
