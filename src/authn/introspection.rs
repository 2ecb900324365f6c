//! Opaque tokens, checked with the provider's RFC 7662 introspection
//! endpoint.
//!
//! Verdicts are cached by the token's SHA-256: active ones until the earlier
//! of the token's `exp` and the configured TTL, inactive ones briefly.
//! Concurrent requests with the same token share one call. A failed or slow
//! call is never cached and becomes a 503 the caller may retry.

use std::sync::Arc;

use moka::future::Cache;
use serde_json::{Map, Value};

use super::cache::{Digest, Introspected, IntrospectionExpiry, unix_now};
use super::jwt::identity_from;
use super::{AuthnError, Identity};
use crate::config::{Introspection, Provider};

/// Introspection verdicts kept at most.
const CACHE_CAPACITY: u64 = 100_000;

/// Largest introspection response accepted, in bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Calls one provider's introspection endpoint and caches the verdicts.
pub struct Introspector {
    http: reqwest::Client,
    issuer: String,
    settings: Introspection,
    leeway: u64,
    verdicts: Cache<Digest, Arc<Introspected>>,
}

impl Introspector {
    /// An introspector for `provider`, which must have introspection set.
    ///
    /// # Errors
    ///
    /// When the HTTP client cannot be built.
    pub fn new(provider: &Provider, settings: &Introspection) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let verdicts = Cache::builder()
            .max_capacity(CACHE_CAPACITY)
            .expire_after(IntrospectionExpiry {
                ttl: settings.cache,
                inactive_ttl: settings.inactive_cache,
            })
            .build();

        Ok(Self {
            http,
            issuer: provider.issuer.clone(),
            settings: settings.clone(),
            leeway: provider.leeway.as_secs(),
            verdicts,
        })
    }

    /// The identity an opaque token stands for.
    ///
    /// # Errors
    ///
    /// [`AuthnError::Inactive`] when the provider says so,
    /// [`AuthnError::IntrospectionUnavailable`] when it cannot say in time,
    /// or why the active token is not acceptable here.
    pub async fn introspect(
        &self,
        token: &str,
        digest: Digest,
        endpoint: Option<String>,
    ) -> Result<Arc<Identity>, AuthnError> {
        let verdict = self
            .verdicts
            .try_get_with(digest, async {
                let endpoint = endpoint.ok_or(AuthnError::IntrospectionUnavailable)?;
                let budget = self.settings.timeout;

                // reqwest's own timeout bounds the call too; this one also
                // covers reading the body.
                match tokio::time::timeout(budget, self.call(token, &endpoint)).await {
                    Ok(verdict) => verdict.map(Arc::new),
                    Err(_) => {
                        tracing::warn!(introspection.timeout = ?budget, "introspection timed out");
                        Err(AuthnError::IntrospectionUnavailable)
                    }
                }
            })
            .await
            .map_err(|err: Arc<AuthnError>| err.as_ref().clone())?;

        match verdict.as_ref() {
            Introspected::Active(identity)
                if identity.expires_at.saturating_add(self.leeway) > unix_now() =>
            {
                Ok(identity.clone())
            }
            Introspected::Active(_) => Err(AuthnError::Expired),
            Introspected::Inactive => Err(AuthnError::Inactive),
            Introspected::Refused(err) => Err(err.clone()),
        }
    }

    async fn call(&self, token: &str, endpoint: &str) -> Result<Introspected, AuthnError> {
        let unavailable = |reason: &dyn std::fmt::Display| {
            tracing::warn!(
                introspection.endpoint = %endpoint,
                error = %reason,
                "introspection failed"
            );
            AuthnError::IntrospectionUnavailable
        };

        let response = self
            .http
            .post(endpoint)
            .basic_auth(&self.settings.client_id, Some(&self.settings.client_secret))
            .form(&[("token", token), ("token_type_hint", "access_token")])
            .send()
            .await
            .map_err(|err| unavailable(&err))?;
        let status = response.status();
        if !status.is_success() {
            return Err(unavailable(&format!("status {status}")));
        }
        let body = response.bytes().await.map_err(|err| unavailable(&err))?;
        if body.len() > MAX_RESPONSE_BYTES {
            return Err(unavailable(&"response too large"));
        }
        let claims: Map<String, Value> =
            serde_json::from_slice(&body).map_err(|err| unavailable(&err))?;

        Ok(self.judge(claims))
    }

    /// Turns an introspection response into a verdict.
    fn judge(&self, claims: Map<String, Value>) -> Introspected {
        if claims.get("active") != Some(&Value::Bool(true)) {
            return Introspected::Inactive;
        }

        // An active token must still be meant for this provider and for one
        // of the configured audiences; RFC 7662 makes both optional, so a
        // response without `aud` cannot prove the token is for us.
        if let Some(iss) = claims.get("iss")
            && iss.as_str() != Some(self.issuer.as_str())
        {
            return Introspected::Refused(AuthnError::WrongIssuer);
        }
        let audiences: Vec<&str> = match claims.get("aud") {
            Some(Value::String(aud)) => vec![aud.as_str()],
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !audiences
            .iter()
            .any(|aud| self.settings.audiences.iter().any(|ours| ours == aud))
        {
            return Introspected::Refused(AuthnError::WrongAudience);
        }

        match identity_from(claims, &self.issuer, None) {
            Ok(identity) => Introspected::Active(Arc::new(identity)),
            Err(err) => Introspected::Refused(err),
        }
    }
}
