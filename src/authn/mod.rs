//! Authentication: from an `Authorization` header to a verified identity.
//!
//! JWT access tokens are verified against the provider's JWKS. A verified
//! token is cached by its SHA-256 until it expires, so the steady state
//! verifies each token's signature once; the token itself is never stored.

pub mod bearer;
mod keys;

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use jsonwebtoken::{Algorithm, Validation};
use moka::Expiry;
use moka::future::Cache;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::config::Provider;
pub use keys::FetchError;
use keys::{KeyFetcher, KeySet};

/// Verified tokens kept at most; older entries are evicted first.
const CACHE_CAPACITY: u64 = 100_000;

/// How soon a failed background key refresh is retried.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(2);

/// Who is calling, as established by a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The OAuth2 client the token was issued to.
    pub client_id: String,
    /// The token's subject; for client-credentials tokens, the client itself.
    pub subject: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// `exp`, in seconds since the Unix epoch.
    pub expires_at: u64,
    /// The `kid` of the key that signed the token.
    pub key_id: Option<String>,
}

impl Identity {
    /// Whether the token grants `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|granted| granted == scope)
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

    /// `iss` differs from the configured issuer.
    #[error("token issuer is not accepted")]
    WrongIssuer,

    /// `aud` names none of the configured audiences.
    #[error("token audience is not accepted")]
    WrongAudience,

    /// A required claim is absent or of the wrong type.
    #[error("token claims are invalid")]
    BadClaims,

    /// No keys could be obtained from the provider; the caller may retry.
    #[error("token keys are unavailable")]
    KeysUnavailable,
}

impl AuthnError {
    /// Whether no credentials were presented at all.
    pub fn is_missing(&self) -> bool {
        matches!(self, Self::Missing)
    }

    /// Whether the failure is on Gatehouse's side and a retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::KeysUnavailable)
    }

    /// The description for `WWW-Authenticate`; never contains a quote.
    pub fn public(&self) -> String {
        self.to_string().replace('"', "'")
    }
}

#[derive(Deserialize)]
struct Claims {
    exp: u64,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Vec<String>>,
}

/// Verifies bearer tokens for one provider.
pub struct Authenticator {
    provider: Provider,
    fetcher: KeyFetcher,
    keys: ArcSwap<KeySet>,
    /// When keys were last fetched because of an unknown `kid`; the lock also
    /// makes that refetch single-flight.
    last_refetch: Mutex<Option<Instant>>,
    verified: Cache<[u8; 32], Arc<Identity>>,
    max_token_bytes: usize,
}

impl Authenticator {
    /// An authenticator with no keys yet; call [`Authenticator::refresh`] or
    /// spawn [`Authenticator::run_refresh`].
    ///
    /// # Errors
    ///
    /// When the HTTP client cannot be built.
    pub fn new(provider: &Provider) -> Result<Self, reqwest::Error> {
        let verified = Cache::builder()
            .max_capacity(CACHE_CAPACITY)
            .expire_after(UntilExpiry)
            .support_invalidation_closures()
            .build();

        Ok(Self {
            provider: provider.clone(),
            fetcher: KeyFetcher::new(provider)?,
            keys: ArcSwap::from_pointee(KeySet::default()),
            last_refetch: Mutex::new(None),
            verified,
            max_token_bytes: bearer::DEFAULT_MAX_TOKEN_BYTES,
        })
    }

    /// The provider this authenticator serves.
    pub fn provider(&self) -> &Provider {
        &self.provider
    }

    /// Whether keys are loaded, which readiness reports.
    pub fn has_keys(&self) -> bool {
        !self.keys.load().is_empty()
    }

    /// Fetches the keys now and swaps them in.
    ///
    /// Cached tokens signed by a key that is no longer published are dropped
    /// at once, so a withdrawn key stops working at the next refresh.
    ///
    /// # Errors
    ///
    /// When the provider cannot be reached; the previous keys stay in force.
    pub async fn refresh(&self) -> Result<(), FetchError> {
        let fresh = self.fetcher.fetch().await?;
        let withdrawn = self.keys.load().withdrawn_in(&fresh);
        let count = fresh.keys.len();

        self.keys.store(Arc::new(fresh));

        if !withdrawn.is_empty() {
            tracing::info!(keys.withdrawn = ?withdrawn, "signing keys withdrawn by the provider");
            let dropped = self.verified.invalidate_entries_if(move |_, identity| {
                identity
                    .key_id
                    .as_ref()
                    .is_some_and(|kid| withdrawn.contains(kid))
            });
            if let Err(err) = dropped {
                tracing::warn!(error = %err, "could not drop tokens of withdrawn keys");
            }
        }

        tracing::debug!(keys.count = count, "signing keys refreshed");
        Ok(())
    }

    /// Refreshes the keys on the configured period after success, and soon
    /// after a failure, keeping the last good keys meanwhile.
    ///
    /// The loop holds only a weak reference, so it ends once a reload has
    /// replaced this authenticator and the last request using it is done.
    pub async fn run_refresh(this: Weak<Self>) {
        loop {
            let Some(authn) = this.upgrade() else { return };
            let wait = match authn.refresh().await {
                Ok(()) => authn.provider.refresh,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot fetch signing keys; keeping the last good ones");
                    RETRY_AFTER_FAILURE
                }
            };
            drop(authn);

            tokio::time::sleep(wait).await;
        }
    }

    /// Verifies the bearer token in `authorization` and returns who it names.
    ///
    /// # Errors
    ///
    /// Why the request carries no acceptable token.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> Result<Arc<Identity>, AuthnError> {
        let token = bearer::parse(authorization, self.max_token_bytes)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();

        // The same leeway as verification, so a token in its grace period is
        // not verified again on every request.
        let leeway = self.provider.leeway.as_secs();
        if let Some(identity) = self.verified.get(&digest).await
            && identity.expires_at.saturating_add(leeway) > unix_now()
        {
            return Ok(identity);
        }

        let identity = Arc::new(self.verify(token).await?);
        self.verified.insert(digest, identity.clone()).await;
        Ok(identity)
    }

    async fn verify(&self, token: &str) -> Result<Identity, AuthnError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthnError::NotAJwt)?;

        // The allow-list, not the token, decides which algorithms count.
        if !self.provider.algorithms.contains(&header.alg) {
            return Err(AuthnError::AlgorithmRefused);
        }
        if header.crit.as_ref().is_some_and(|crit| !crit.is_empty()) {
            return Err(AuthnError::UnsupportedCritical);
        }

        let kid = header.kid.as_deref();
        let keys = self.keys_for(kid).await?;
        let key = keys.find(kid).ok_or(AuthnError::UnknownKey)?;
        if key.algorithm.is_some_and(|pinned| pinned != header.alg) {
            return Err(AuthnError::AlgorithmRefused);
        }

        let validation = self.validation(header.alg);
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
            .map_err(|err| map_jwt_error(err.kind()))?;

        // A key without a `kid` is stored under "", and so is the identity it
        // signed, so that withdrawing that key drops the identity too.
        identity_from(data.claims, Some(header.kid.unwrap_or_default()))
    }

    /// The current keys, refetched first when they lack `kid`.
    ///
    /// Refetches are single-flight and at most one per `min_refetch`, so a
    /// flood of tokens with random `kid`s cannot hammer the provider.
    async fn keys_for(&self, kid: Option<&str>) -> Result<Arc<KeySet>, AuthnError> {
        let keys = self.keys.load_full();
        if keys.find(kid).is_some() {
            return Ok(keys);
        }

        let mut last = self.last_refetch.lock().await;

        // Another request may have refetched while this one waited.
        let keys = self.keys.load_full();
        if keys.find(kid).is_some() {
            return Ok(keys);
        }

        let throttled = last.is_some_and(|at| at.elapsed() < self.provider.min_refetch);
        if !throttled {
            *last = Some(Instant::now());
            if let Err(err) = self.refresh().await {
                tracing::warn!(error = %err, "refetching signing keys for an unknown kid failed");
            }
        }
        drop(last);

        let keys = self.keys.load_full();
        if keys.is_empty() {
            return Err(AuthnError::KeysUnavailable);
        }
        Ok(keys)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.provider.issuer]);
        validation.set_audience(&self.provider.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = self.provider.leeway.as_secs();
        validation.validate_nbf = true;
        validation
    }
}

fn identity_from(claims: Claims, key_id: Option<String>) -> Result<Identity, AuthnError> {
    // RFC 9068 names `client_id`; some providers only set `azp`.
    let client_id = claims
        .client_id
        .or(claims.azp)
        .ok_or(AuthnError::BadClaims)?;
    let subject = claims.sub.unwrap_or_else(|| client_id.clone());

    let mut scopes: Vec<String> = claims
        .scope
        .as_deref()
        .unwrap_or_default()
        .split(' ')
        .filter(|scope| !scope.is_empty())
        .map(str::to_owned)
        .collect();
    scopes.extend(claims.scp.unwrap_or_default());

    Ok(Identity {
        client_id,
        subject,
        scopes,
        expires_at: claims.exp,
        key_id,
    })
}

fn map_jwt_error(kind: &jsonwebtoken::errors::ErrorKind) -> AuthnError {
    use jsonwebtoken::errors::ErrorKind;

    match kind {
        ErrorKind::InvalidSignature => AuthnError::BadSignature,
        ErrorKind::ExpiredSignature => AuthnError::Expired,
        ErrorKind::ImmatureSignature => AuthnError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthnError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthnError::WrongAudience,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => AuthnError::AlgorithmRefused,
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
            AuthnError::BadClaims
        }
        ErrorKind::Json(_) => AuthnError::BadClaims,
        _ => AuthnError::NotAJwt,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Cache entries live until the token's own `exp`.
struct UntilExpiry;

impl Expiry<[u8; 32], Arc<Identity>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        identity: &Arc<Identity>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(
            identity.expires_at.saturating_sub(unix_now()),
        ))
    }
}
