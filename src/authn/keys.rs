//! The provider's signing keys: OIDC discovery, JWKS fetches and the key set
//! that verification reads.

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use crate::config::Provider;

/// Largest discovery document or JWKS accepted, in bytes.
const MAX_DOCUMENT_BYTES: usize = 512 * 1024;

/// One usable verification key.
pub struct Key {
    /// The key, ready for verification.
    pub decoding: DecodingKey,
    /// The algorithm the JWK pins, if it names one.
    pub algorithm: Option<Algorithm>,
}

/// The keys published by the provider, by `kid`.
#[derive(Default)]
pub struct KeySet {
    /// Keys by `kid`; keys without a `kid` are stored under `""`.
    pub keys: HashMap<String, Key>,
}

impl KeySet {
    /// The key a token names, or the only key when the token names none,
    /// with the `kid` it is published under: what a verified token records,
    /// so that withdrawing the key drops the token whatever its header said.
    pub fn find(&self, kid: Option<&str>) -> Option<(&str, &Key)> {
        let found = match kid {
            Some(kid) => self.keys.get_key_value(kid),
            None if self.keys.len() == 1 => self.keys.iter().next(),
            None => None,
        };
        found.map(|(kid, key)| (kid.as_str(), key))
    }

    /// Whether a key is published under `kid`.
    pub fn publishes(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// Whether any key is loaded.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `kid`s present here and absent from `newer`.
    pub fn withdrawn_in(&self, newer: &KeySet) -> Vec<String> {
        self.keys
            .keys()
            .filter(|kid| !newer.keys.contains_key(*kid))
            .cloned()
            .collect()
    }
}

/// Why keys could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The HTTP request failed or timed out.
    #[error("request to {url} failed: {source}")]
    Http {
        /// The URL requested.
        url: String,
        /// The client's error.
        source: reqwest::Error,
    },

    /// The provider answered with something other than 200.
    #[error("{url} answered {status}")]
    Status {
        /// The URL requested.
        url: String,
        /// The status received.
        status: u16,
    },

    /// The document was too large or not the expected JSON.
    #[error("{url} returned an invalid document: {reason}")]
    Invalid {
        /// The URL requested.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
    #[serde(default)]
    introspection_endpoint: Option<String>,
}

/// What one fetch learnt from the provider.
pub struct Fetched {
    /// The keys.
    pub keys: KeySet,
    /// The introspection endpoint, when discovery named one.
    pub introspection_endpoint: Option<String>,
    /// `max-age` from the JWKS response's `Cache-Control`, if any; zero for
    /// `no-cache` or `no-store`.
    pub max_age: Option<Duration>,
}

/// What fetching and refreshing one provider's keys depends on. A reload
/// that leaves these equal keeps the provider's keys and their refresh.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySettings {
    /// The issuer, whose discovery document names the JWKS.
    pub issuer: String,
    /// The explicit JWKS location; discovery when `None`.
    pub jwks_uri: Option<String>,
    /// Whether discovery is needed for the introspection endpoint.
    pub discover_introspection: bool,
    /// Budget for one discovery or JWKS request.
    pub fetch_timeout: Duration,
    /// Background refresh period when the JWKS sets no `max-age`.
    pub refresh: Duration,
    /// Bounds on the refresh period.
    pub refresh_bounds: (Duration, Duration),
    /// Minimum time between refetches caused by an unknown `kid`.
    pub min_refetch: Duration,
}

impl KeySettings {
    /// The key settings of `provider`.
    pub fn of(provider: &Provider) -> Self {
        Self {
            issuer: provider.issuer.clone(),
            jwks_uri: provider.jwks_uri.clone(),
            discover_introspection: provider
                .introspection
                .as_ref()
                .is_some_and(|introspection| introspection.endpoint.is_none()),
            fetch_timeout: provider.fetch_timeout,
            refresh: provider.refresh,
            refresh_bounds: provider.refresh_bounds,
            min_refetch: provider.min_refetch,
        }
    }
}

/// Fetches documents from the provider within its time budget.
#[derive(Clone)]
pub struct KeyFetcher {
    http: reqwest::Client,
    issuer: String,
    jwks_uri: Option<String>,
    /// Whether discovery is needed for the introspection endpoint.
    discover_introspection: bool,
}

impl KeyFetcher {
    /// A fetcher for these settings, each request bounded by their fetch
    /// timeout.
    ///
    /// # Errors
    ///
    /// When the HTTP client cannot be built (no TLS roots, say).
    pub fn new(settings: &KeySettings) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(settings.fetch_timeout)
            .connect_timeout(settings.fetch_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;

        Ok(Self {
            http,
            issuer: settings.issuer.clone(),
            jwks_uri: settings.jwks_uri.clone(),
            discover_introspection: settings.discover_introspection,
        })
    }

    /// Fetches the current key set, through discovery when no JWKS URL is set.
    ///
    /// # Errors
    ///
    /// When the provider cannot be reached or answers with an invalid document.
    pub async fn fetch(&self) -> Result<Fetched, FetchError> {
        let discovery = if self.jwks_uri.is_none() || self.discover_introspection {
            Some(self.discover().await?)
        } else {
            None
        };
        let jwks_uri = self
            .jwks_uri
            .clone()
            .or_else(|| discovery.as_ref().map(|d| d.jwks_uri.clone()))
            .unwrap_or_default();

        let (jwks, max_age): (JwkSet, _) = self.get_json(&jwks_uri).await?;
        Ok(Fetched {
            keys: build_key_set(&jwks),
            introspection_endpoint: discovery.and_then(|d| d.introspection_endpoint),
            max_age,
        })
    }

    async fn discover(&self) -> Result<Discovery, FetchError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let (discovery, _): (Discovery, _) = self.get_json(&url).await?;

        // OpenID Connect Discovery 1.0, section 4.3: the document must name
        // exactly the issuer it was fetched for.
        if discovery.issuer != self.issuer {
            let reason = format!(
                "issuer {:?} differs from the configured one",
                discovery.issuer
            );
            return Err(FetchError::Invalid { url, reason });
        }

        Ok(discovery)
    }

    /// A JSON document and its `Cache-Control` max-age.
    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        url: &str,
    ) -> Result<(T, Option<Duration>), FetchError> {
        let http_err = |source| FetchError::Http {
            url: url.to_owned(),
            source,
        };
        let invalid = |reason: String| FetchError::Invalid {
            url: url.to_owned(),
            reason,
        };

        let response = self.http.get(url).send().await.map_err(http_err)?;
        if !response.status().is_success() {
            return Err(FetchError::Status {
                url: url.to_owned(),
                status: response.status().as_u16(),
            });
        }
        if response
            .content_length()
            .is_some_and(|len| len > MAX_DOCUMENT_BYTES as u64)
        {
            return Err(invalid("document too large".to_owned()));
        }

        let max_age = response
            .headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|value| value.to_str().ok())
            .and_then(max_age);

        let body = response.bytes().await.map_err(http_err)?;
        if body.len() > MAX_DOCUMENT_BYTES {
            return Err(invalid("document too large".to_owned()));
        }

        let document = serde_json::from_slice(&body).map_err(|err| invalid(err.to_string()))?;
        Ok((document, max_age))
    }
}

/// The freshness a `Cache-Control` value grants: `max-age`, or zero when
/// the response must not be reused.
fn max_age(cache_control: &str) -> Option<Duration> {
    let mut found = None;
    for directive in cache_control.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-cache" || lower == "no-store" {
            return Some(Duration::ZERO);
        }
        if let Some(seconds) = lower.strip_prefix("max-age=") {
            found = seconds
                .trim_matches('"')
                .parse()
                .ok()
                .map(Duration::from_secs);
        }
    }
    found
}

/// Keeps the keys that can verify signatures; skips encryption keys and keys
/// whose parameters do not parse, logging each.
fn build_key_set(jwks: &JwkSet) -> KeySet {
    let mut keys = HashMap::new();

    for jwk in &jwks.keys {
        let kid = jwk.common.key_id.clone().unwrap_or_default();

        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }

        match to_key(jwk) {
            Some(key) => {
                keys.insert(kid, key);
            }
            None => tracing::warn!(jwk.kid = %kid, "skipping a JWK that cannot verify signatures"),
        }
    }

    KeySet { keys }
}

fn to_key(jwk: &Jwk) -> Option<Key> {
    let algorithm = match jwk.common.key_algorithm {
        None => None,
        Some(alg) => Some(signing_algorithm(alg)?),
    };

    // Symmetric keys never come from a public JWKS: accepting one would let
    // whoever reads the JWKS mint tokens.
    if matches!(
        algorithm,
        Some(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
    ) {
        return None;
    }
    if matches!(
        jwk.algorithm,
        jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
    ) {
        return None;
    }

    let decoding = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key {
        decoding,
        algorithm,
    })
}

fn signing_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    let alg = match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        _ => return None,
    };
    Some(alg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_max_age_and_no_cache() {
        assert_eq!(
            max_age("public, max-age=120"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(max_age("Max-Age=\"60\""), Some(Duration::from_secs(60)));
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("private"), None);
        assert_eq!(max_age("max-age=abc"), None);
    }
}
