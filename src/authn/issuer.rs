//! One provider's live state: its signing keys, refreshed in the background
//! and refetched (single-flight, throttled) for an unknown `kid`, and the
//! verification of the JWTs it signs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use moka::future::Cache;
use serde_json::{Map, Value};
use tokio::sync::Mutex;

use super::cache::{Digest, unix_now};
use super::jwt::{check_not_future, check_required, identity_from, map_jwt_error};
use super::keys::{FetchError, KeyFetcher, KeySet};
use super::{AuthnError, Identity};
use crate::config::{Provider, is_hmac};

/// How soon a failed background key refresh is retried.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(2);

/// A provider and the keys it publishes.
pub struct Issuer {
    provider: Provider,
    fetcher: KeyFetcher,
    keys: ArcSwap<KeySet>,
    /// The introspection endpoint discovery named, when none is configured.
    discovered_introspection: ArcSwapOption<String>,
    /// When keys were last fetched because of an unknown `kid`; the lock also
    /// makes that refetch single-flight.
    last_refetch: Mutex<Option<Instant>>,
    /// The verified-token cache shared by every provider, so that a
    /// withdrawn key's tokens can be dropped from it.
    verified: Cache<Digest, Arc<Identity>>,
    hmac: Option<DecodingKey>,
}

impl Issuer {
    /// An issuer with no keys yet.
    ///
    /// # Errors
    ///
    /// When the HTTP client cannot be built.
    pub fn new(
        provider: &Provider,
        verified: Cache<Digest, Arc<Identity>>,
    ) -> Result<Self, reqwest::Error> {
        // Building an HMAC key only copies the bytes; should it ever fail,
        // HMAC tokens are refused, which is the safe side.
        let hmac = provider
            .hmac_secret
            .as_ref()
            .and_then(|secret| DecodingKey::from_secret(secret.as_bytes()).ok());

        Ok(Self {
            provider: provider.clone(),
            fetcher: KeyFetcher::new(provider)?,
            keys: ArcSwap::from_pointee(KeySet::default()),
            discovered_introspection: ArcSwapOption::empty(),
            last_refetch: Mutex::new(None),
            verified,
            hmac,
        })
    }

    /// The provider's settings.
    pub fn provider(&self) -> &Provider {
        &self.provider
    }

    /// Whether keys are loaded, which readiness reports.
    pub fn has_keys(&self) -> bool {
        !self.keys.load().is_empty()
    }

    /// Where opaque tokens are introspected: the configured endpoint, or
    /// the one discovery named.
    pub fn introspection_endpoint(&self) -> Option<String> {
        let introspection = self.provider.introspection.as_ref()?;
        match &introspection.endpoint {
            Some(endpoint) => Some(endpoint.clone()),
            None => self
                .discovered_introspection
                .load_full()
                .map(|e| (*e).clone()),
        }
    }

    /// Fetches the keys now and swaps them in; returns how long they may be
    /// kept (the response's `max-age` within the configured bounds).
    ///
    /// Cached tokens signed by a key that is no longer published are dropped
    /// at once, so a withdrawn key stops working at the next refresh.
    ///
    /// # Errors
    ///
    /// When the provider cannot be reached; the previous keys stay in force.
    pub async fn refresh(&self) -> Result<Duration, FetchError> {
        let fetched = self.fetcher.fetch().await?;
        let count = fetched.keys.keys.len();

        self.install(fetched.keys);
        if let Some(endpoint) = fetched.introspection_endpoint {
            self.discovered_introspection
                .store(Some(Arc::new(endpoint)));
        }

        let (low, high) = self.provider.refresh_bounds;
        let keep = fetched
            .max_age
            .unwrap_or(self.provider.refresh)
            .clamp(low, high);
        tracing::debug!(
            provider.issuer = %self.provider.issuer,
            keys.count = count,
            keys.next_refresh = ?keep,
            "signing keys refreshed"
        );
        Ok(keep)
    }

    /// Puts `keys` in force and drops every cached token signed by a key
    /// they no longer hold.
    fn install(&self, keys: KeySet) {
        let keys = Arc::new(keys);
        let previous = self.keys.swap(keys.clone());
        let withdrawn = previous.withdrawn_in(&keys);
        if withdrawn.is_empty() {
            return;
        }

        tracing::info!(
            provider.issuer = %self.provider.issuer,
            keys.withdrawn = ?withdrawn,
            "signing keys withdrawn by the provider"
        );
        let issuer = self.provider.issuer.clone();
        let dropped = self.verified.invalidate_entries_if(move |_, identity| {
            identity.issuer == issuer
                && identity
                    .key_id
                    .as_ref()
                    .is_some_and(|kid| withdrawn.contains(kid))
        });
        if let Err(err) = dropped {
            tracing::warn!(error = %err, "could not drop tokens of withdrawn keys");
        }
    }

    /// Caches a token this issuer verified, unless its key has been
    /// withdrawn meanwhile.
    ///
    /// A verification may still hold the old key set when a refresh installs
    /// the new one and drops the withdrawn key's tokens; inserting after that
    /// would keep the token until its `exp`. So the key is looked up again
    /// once the entry is in: if it is gone, the entry goes too. If it is
    /// still there, any later withdrawal finds the entry, because the cache
    /// drops every entry inserted before the withdrawal.
    pub async fn remember(&self, digest: Digest, identity: Arc<Identity>) {
        let key_id = identity.key_id.clone();
        self.verified.insert(digest, identity).await;

        if let Some(kid) = key_id
            && !self.keys.load().publishes(&kid)
        {
            self.verified.invalidate(&digest).await;
        }
    }

    /// Refreshes the keys when the last fetch says they go stale, and soon
    /// after a failure, keeping the last good keys meanwhile.
    ///
    /// The loop holds only a weak reference, so it ends once a reload has
    /// replaced this issuer and the last request using it is done.
    pub async fn run_refresh(this: std::sync::Weak<Self>) {
        loop {
            let Some(issuer) = this.upgrade() else { return };
            let wait = match issuer.refresh().await {
                Ok(keep) => keep,
                Err(err) => {
                    tracing::warn!(
                        provider.issuer = %issuer.provider.issuer,
                        error = %err,
                        "cannot fetch signing keys; keeping the last good ones"
                    );
                    RETRY_AFTER_FAILURE
                }
            };
            drop(issuer);

            tokio::time::sleep(wait).await;
        }
    }

    /// Verifies a JWT that claims to come from this provider.
    ///
    /// # Errors
    ///
    /// Why the token is not acceptable.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthnError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthnError::NotAJwt)?;

        // The allow-list, not the token, decides which algorithms count.
        if !self.provider.algorithms.contains(&header.alg) {
            return Err(AuthnError::AlgorithmRefused);
        }

        // Gatehouse implements no header extension, so any `crit` (an empty
        // one is invalid too, RFC 7515 section 4.1.11) is refused.
        if header.crit.is_some() {
            return Err(AuthnError::UnsupportedCritical);
        }

        // The kind of key follows the algorithm the configuration allows:
        // HMAC only ever uses the configured secret, never a JWKS key.
        // The identity records the `kid` the key is published under (even
        // for a token that names none), so that withdrawing the key drops it.
        // HMAC tokens name no published key.
        let kid = header.kid.as_deref();
        let keys;
        let (decoding, key_id) = if is_hmac(header.alg) {
            let secret = self.hmac.as_ref().ok_or(AuthnError::AlgorithmRefused)?;
            (secret, None)
        } else {
            keys = self.keys_for(kid).await?;
            let (published, key) = keys.find(kid).ok_or(AuthnError::UnknownKey)?;
            if key.algorithm.is_some_and(|pinned| pinned != header.alg) {
                return Err(AuthnError::AlgorithmRefused);
            }
            (&key.decoding, Some(published.to_owned()))
        };

        let validation = self.validation(header.alg);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, decoding, &validation)
            .map_err(|err| map_jwt_error(err.kind()))?;
        let claims = data.claims;

        self.check_claims(&claims)?;

        identity_from(claims, &self.provider.issuer, key_id)
    }

    /// The checks `jsonwebtoken` leaves to the caller: `iat` not in the
    /// future (`nbf` too, which it has checked already), and the configured
    /// required claims.
    fn check_claims(&self, claims: &Map<String, Value>) -> Result<(), AuthnError> {
        check_not_future(claims, self.provider.leeway.as_secs(), unix_now())?;
        check_required(claims, &self.provider.required_claims)
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
                tracing::warn!(
                    provider.issuer = %self.provider.issuer,
                    error = %err,
                    "refetching signing keys for an unknown kid failed"
                );
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;
    use crate::authn::cache::{UntilExpiry, digest};
    use crate::authn::keys::Key;

    /// A throwaway Ed25519 key pair made for these tests: the PKCS#8 private
    /// key and the public key's `x`.
    const PRIVATE_PKCS8: &str = "MC4CAQAwBQYDK2VwBCIEICh8LOOGuQ+YMl2Y2ZIGSvaGa/vlS/P5DxBvo/PKnEzV";
    const PUBLIC_X: &str = "b0eg97FWOnyuDioc6LhlUANg2lgWUM4HSlxRFi9vTCs";
    const ISSUER: &str = "https://issuer.test";

    fn provider() -> Provider {
        Provider {
            issuer: ISSUER.to_owned(),
            audiences: vec!["api".to_owned()],
            jwks_uri: Some(format!("{ISSUER}/jwks")),
            leeway: Duration::from_secs(30),
            fetch_timeout: Duration::from_millis(100),
            refresh: Duration::from_secs(300),
            refresh_bounds: (Duration::from_secs(1), Duration::from_secs(300)),
            min_refetch: Duration::from_secs(60),
            algorithms: vec![Algorithm::EdDSA],
            hmac_secret: None,
            required_claims: Vec::new(),
            introspection: None,
        }
    }

    fn issuer() -> Issuer {
        let verified = Cache::builder()
            .expire_after(UntilExpiry)
            .support_invalidation_closures()
            .build();
        Issuer::new(&provider(), verified).expect("an issuer")
    }

    /// A key set holding the test key under `kid`.
    fn key_set(kid: &str) -> KeySet {
        let decoding = DecodingKey::from_ed_components(PUBLIC_X).expect("the public key");
        let key = Key {
            decoding,
            algorithm: None,
        };
        KeySet {
            keys: HashMap::from([(kid.to_owned(), key)]),
        }
    }

    /// A token signed with the test key, naming `kid` when given.
    fn token(kid: Option<&str>) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = kid.map(str::to_owned);
        let claims = json!({
            "iss": ISSUER,
            "aud": "api",
            "client_id": "c",
            "exp": unix_now() + 300,
        });
        let der = STANDARD.decode(PRIVATE_PKCS8).expect("base64");
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&der)).expect("a token")
    }

    /// Whether the shared cache still holds `token`'s verdict.
    async fn cached(issuer: &Issuer, token: &str) -> bool {
        issuer.verified.run_pending_tasks().await;
        issuer.verified.get(&digest(token)).await.is_some()
    }

    #[tokio::test]
    async fn a_token_without_kid_is_dropped_when_its_only_key_is_withdrawn() {
        let issuer = issuer();
        issuer.install(key_set("only-key"));
        let token = token(None);

        let identity = Arc::new(issuer.verify(&token).await.expect("verified"));
        assert_eq!(identity.key_id.as_deref(), Some("only-key"));
        issuer.remember(digest(&token), identity).await;
        assert!(cached(&issuer, &token).await);

        issuer.install(key_set("next-key"));
        assert!(!cached(&issuer, &token).await, "dropped with its key");
    }

    #[tokio::test]
    async fn a_verification_that_outlives_its_key_leaves_nothing_cached() {
        let issuer = issuer();
        issuer.install(key_set("old"));
        let token = token(Some("old"));
        let identity = Arc::new(issuer.verify(&token).await.expect("verified"));

        // The refresh withdraws the key while the verification is still on
        // its way to the cache, then the verification files its result.
        issuer.install(key_set("new"));
        issuer.remember(digest(&token), identity).await;

        assert!(!cached(&issuer, &token).await, "a withdrawn key's token");
    }

    #[tokio::test]
    async fn a_token_whose_key_stays_published_stays_cached() {
        let issuer = issuer();
        issuer.install(key_set("kept"));
        let token = token(Some("kept"));
        let identity = Arc::new(issuer.verify(&token).await.expect("verified"));
        issuer.remember(digest(&token), identity).await;

        let mut both = key_set("kept");
        both.keys.extend(key_set("added").keys);
        issuer.install(both);

        assert!(cached(&issuer, &token).await);
    }
}
