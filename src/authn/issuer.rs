//! One provider's rules: the verification of the JWTs it signs, against
//! the keys of its [`KeySource`] or, for HMAC, its configured secret.
//!
//! A provider whose algorithms are all HMAC has no key source: its key is
//! the secret, so it is ready from the start and fetches nothing.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use moka::future::Cache;
use serde_json::{Map, Value};

use super::cache::{Digest, Rules, Verified, unix_now};
use super::jwt::{check_not_future, check_required, identity_from, map_jwt_error};
use super::keys::KeySettings;
use super::source::KeySource;
use super::{AuthnError, Identity};
use crate::config::{Provider, is_hmac};

/// A provider, its rules and where its keys come from.
pub struct Issuer {
    provider: Provider,
    /// This version of the rules; cached tokens verified under another
    /// version no longer count.
    rules: Rules,
    /// The published keys; `None` when every accepted algorithm is HMAC.
    source: Option<Arc<KeySource>>,
    /// The verified-token cache shared by every provider.
    verified: Cache<Digest, Verified>,
    hmac: Option<DecodingKey>,
}

impl Issuer {
    /// An issuer for the `index`th configured provider, with new rules.
    ///
    /// `kept` is the key source the previous configuration had for this
    /// provider: it is used when its settings still match, so the keys and
    /// their refresh carry over; otherwise a new source starts with no keys.
    ///
    /// # Errors
    ///
    /// When the HTTP client of a new key source cannot be built.
    pub fn new(
        provider: &Provider,
        index: usize,
        verified: Cache<Digest, Verified>,
        kept: Option<&Arc<KeySource>>,
    ) -> Result<Self, reqwest::Error> {
        // Building an HMAC key only copies the bytes; should it ever fail,
        // HMAC tokens are refused, which is the safe side.
        let hmac = provider
            .hmac_secret
            .as_ref()
            .and_then(|secret| DecodingKey::from_secret(secret.as_bytes()).ok());

        let source = if provider.uses_jwks() {
            let settings = KeySettings::of(provider);
            match kept {
                Some(kept) if *kept.settings() == settings => {
                    kept.set_index(index);
                    Some(kept.clone())
                }
                _ => Some(Arc::new(KeySource::new(settings, index, verified.clone())?)),
            }
        } else {
            None
        };

        Ok(Self {
            provider: provider.clone(),
            rules: Rules::next(),
            source,
            verified,
            hmac,
        })
    }

    /// The provider's settings.
    pub fn provider(&self) -> &Provider {
        &self.provider
    }

    /// Whether this issuer was built for exactly these settings, so that a
    /// reload can keep it, rules version and all.
    pub fn serves(&self, provider: &Provider) -> bool {
        self.provider == *provider
    }

    /// This version of the rules.
    pub fn rules(&self) -> Rules {
        self.rules
    }

    /// The key source, when the provider uses a JWKS.
    pub fn source(&self) -> Option<&Arc<KeySource>> {
        self.source.as_ref()
    }

    /// Whether tokens can be verified: the JWKS keys are loaded, or, for a
    /// provider with only HMAC algorithms, the secret is held.
    pub fn has_keys(&self) -> bool {
        match &self.source {
            Some(source) => source.has_keys(),
            None => self.hmac.is_some(),
        }
    }

    /// Where opaque tokens are introspected: the configured endpoint, or
    /// the one discovery named.
    pub fn introspection_endpoint(&self) -> Option<String> {
        let introspection = self.provider.introspection.as_ref()?;
        match &introspection.endpoint {
            Some(endpoint) => Some(endpoint.clone()),
            None => self.source.as_ref()?.discovered_introspection(),
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
        let verified = Verified {
            identity,
            rules: self.rules,
        };
        self.verified.insert(digest, verified).await;

        let withdrawn = match (&key_id, &self.source) {
            (Some(kid), Some(source)) => !source.publishes(kid),
            _ => false,
        };
        if withdrawn {
            self.verified.invalidate(&digest).await;
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
        // HMAC tokens name no published key. A provider without a key
        // source accepts only HMAC, so the allow-list has refused the rest.
        let kid = header.kid.as_deref();
        let keys;
        let (decoding, key_id) = if is_hmac(header.alg) {
            let secret = self.hmac.as_ref().ok_or(AuthnError::AlgorithmRefused)?;
            (secret, None)
        } else {
            let source = self.source.as_ref().ok_or(AuthnError::AlgorithmRefused)?;
            keys = source.keys_for(kid).await?;
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
pub(super) mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;
    use crate::authn::cache::{UntilExpiry, digest};
    use crate::authn::keys::{Key, KeySet};

    /// A throwaway Ed25519 key pair made for these tests: the PKCS#8 private
    /// key and the public key's `x`.
    const PRIVATE_PKCS8: &str = "MC4CAQAwBQYDK2VwBCIEICh8LOOGuQ+YMl2Y2ZIGSvaGa/vlS/P5DxBvo/PKnEzV";
    const PUBLIC_X: &str = "b0eg97FWOnyuDioc6LhlUANg2lgWUM4HSlxRFi9vTCs";
    const ISSUER: &str = "https://issuer.test";

    /// A provider of EdDSA tokens at [`ISSUER`], audience `api`.
    pub(in crate::authn) fn provider() -> Provider {
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
        Issuer::new(&provider(), 0, verified, None).expect("an issuer")
    }

    /// Puts `keys` in force at `issuer`'s key source.
    fn install(issuer: &Issuer, keys: KeySet) {
        issuer.source().expect("a key source").install(keys);
    }

    /// A key set holding the test key under `kid`.
    pub(in crate::authn) fn key_set(kid: &str) -> KeySet {
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
    pub(in crate::authn) fn token(kid: Option<&str>) -> String {
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
        install(&issuer, key_set("only-key"));
        let token = token(None);

        let identity = Arc::new(issuer.verify(&token).await.expect("verified"));
        assert_eq!(identity.key_id.as_deref(), Some("only-key"));
        issuer.remember(digest(&token), identity).await;
        assert!(cached(&issuer, &token).await);

        install(&issuer, key_set("next-key"));
        assert!(!cached(&issuer, &token).await, "dropped with its key");
    }

    #[tokio::test]
    async fn a_verification_that_outlives_its_key_leaves_nothing_cached() {
        let issuer = issuer();
        install(&issuer, key_set("old"));
        let token = token(Some("old"));
        let identity = Arc::new(issuer.verify(&token).await.expect("verified"));

        // The refresh withdraws the key while the verification is still on
        // its way to the cache, then the verification files its result.
        install(&issuer, key_set("new"));
        issuer.remember(digest(&token), identity).await;

        assert!(!cached(&issuer, &token).await, "a withdrawn key's token");
    }

    #[tokio::test]
    async fn a_token_whose_key_stays_published_stays_cached() {
        let issuer = issuer();
        install(&issuer, key_set("kept"));
        let token = token(Some("kept"));
        let identity = Arc::new(issuer.verify(&token).await.expect("verified"));
        issuer.remember(digest(&token), identity).await;

        let mut both = key_set("kept");
        both.keys.extend(key_set("added").keys);
        install(&issuer, both);

        assert!(cached(&issuer, &token).await);
    }

    #[tokio::test]
    async fn a_provider_with_only_hmac_algorithms_is_ready_without_fetching() {
        let secret = "a-shared-secret-of-at-least-32-bytes!";
        let hmac_only = Provider {
            jwks_uri: None,
            algorithms: vec![Algorithm::HS256],
            hmac_secret: Some(secret.to_owned()),
            ..provider()
        };
        let verified = Cache::builder().expire_after(UntilExpiry).build();
        let issuer = Issuer::new(&hmac_only, 0, verified, None).expect("an issuer");

        assert!(issuer.source().is_none(), "nothing to fetch");
        assert!(issuer.has_keys(), "ready from the start");
        let claims = json!({
            "iss": ISSUER, "aud": "api", "client_id": "c", "exp": unix_now() + 300,
        });
        let key = EncodingKey::from_secret(secret.as_bytes()).expect("an hmac key");
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).expect("a token");
        let identity = issuer
            .verify(&token)
            .await
            .expect("verified with the secret");
        assert_eq!(identity.key_id, None);

        // With an asymmetric algorithm too, the JWKS is needed again.
        let mixed = Provider {
            algorithms: vec![Algorithm::HS256, Algorithm::EdDSA],
            ..hmac_only
        };
        let verified = Cache::builder().expire_after(UntilExpiry).build();
        let issuer = Issuer::new(&mixed, 0, verified, None).expect("an issuer");
        assert!(issuer.source().is_some());
        assert!(!issuer.has_keys(), "not ready before the JWKS is fetched");
    }

    #[tokio::test]
    async fn a_new_issuer_keeps_the_key_source_while_its_settings_match() {
        let first = issuer();
        install(&first, key_set("kept"));
        let kept = first.source().expect("a key source");

        // Other audiences: new rules, the same keys.
        let audiences = Provider {
            audiences: vec!["other".to_owned()],
            ..provider()
        };
        let second =
            Issuer::new(&audiences, 0, first.verified.clone(), Some(kept)).expect("an issuer");
        assert!(Arc::ptr_eq(second.source().expect("a source"), kept));
        assert!(second.has_keys());
        assert_ne!(second.rules(), first.rules());

        // Another JWKS location: a new source, which has no keys yet.
        let moved = Provider {
            jwks_uri: Some(format!("{ISSUER}/other-jwks")),
            ..provider()
        };
        let third = Issuer::new(&moved, 0, first.verified.clone(), Some(kept)).expect("an issuer");
        assert!(!Arc::ptr_eq(third.source().expect("a source"), kept));
        assert!(!third.has_keys());
    }
}
