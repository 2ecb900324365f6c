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
use super::jwt::{check_not_future, check_required, identity_from};
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
    /// The provider's `required_claims`, which opaque tokens must carry too.
    required_claims: Vec<String>,
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
            required_claims: provider.required_claims.clone(),
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

        self.admit(&verdict, unix_now())
    }

    /// Whether a verdict, fresh or cached, admits the token at `now`: the
    /// time claims are read again on every use, as a JWT's would be.
    fn admit(&self, verdict: &Introspected, now: u64) -> Result<Arc<Identity>, AuthnError> {
        match verdict {
            Introspected::Active(identity) => {
                if identity.expires_at.saturating_add(self.leeway) <= now {
                    return Err(AuthnError::Expired);
                }
                check_not_future(&identity.claims, self.leeway, now)?;
                Ok(identity.clone())
            }
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
    ///
    /// An active token is held to the JWT rules that apply to it: the
    /// provider's issuer and audiences, an access token used as a bearer
    /// token, the required claims, and (in [`Introspector::admit`]) `exp`,
    /// `nbf` and `iat`.
    fn judge(&self, claims: Map<String, Value>) -> Introspected {
        if claims.get("active") != Some(&Value::Bool(true)) {
            return Introspected::Inactive;
        }

        // RFC 7662 `token_type` is an RFC 6749 token type. Gatehouse checks
        // no proof of possession, so only a bearer token may pass: a DPoP-
        // bound token must not be usable without its proof.
        if let Some(token_type) = claims.get("token_type") {
            let bearer = token_type
                .as_str()
                .is_some_and(|kind| kind.eq_ignore_ascii_case("bearer"));
            if !bearer {
                return Introspected::Refused(AuthnError::WrongType);
            }
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

        if let Err(err) = check_required(&claims, &self.required_claims) {
            return Introspected::Refused(err);
        }

        match identity_from(claims, &self.issuer, None) {
            Ok(identity) => Introspected::Active(Arc::new(identity)),
            Err(err) => Introspected::Refused(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn introspector(required_claims: &[&str]) -> Introspector {
        let settings = Introspection {
            endpoint: Some("https://issuer.test/introspect".to_owned()),
            client_id: "gatehouse".to_owned(),
            client_secret: "secret".to_owned(),
            audiences: vec!["opaque".to_owned()],
            timeout: Duration::from_millis(100),
            cache: Duration::from_secs(60),
            inactive_cache: Duration::from_secs(5),
        };
        let provider = Provider {
            issuer: "https://issuer.test".to_owned(),
            audiences: vec!["api".to_owned()],
            jwks_uri: None,
            leeway: Duration::from_secs(30),
            fetch_timeout: Duration::from_millis(100),
            refresh: Duration::from_secs(300),
            refresh_bounds: (Duration::from_secs(1), Duration::from_secs(300)),
            min_refetch: Duration::from_secs(10),
            algorithms: Vec::new(),
            hmac_secret: None,
            required_claims: required_claims.iter().map(|c| (*c).to_owned()).collect(),
            introspection: Some(settings.clone()),
        };
        Introspector::new(&provider, &settings).expect("an introspector")
    }

    /// An active response, as the provider gives it, with `extra` merged in.
    fn active(extra: Value) -> Map<String, Value> {
        let mut claims = json!({
            "active": true,
            "iss": "https://issuer.test",
            "aud": "opaque",
            "client_id": "demo",
            "token_type": "Bearer",
            "iat": NOW,
            "exp": NOW + 600,
        });
        for (name, value) in extra.as_object().expect("an object") {
            claims[name] = value.clone();
        }
        claims.as_object().expect("an object").clone()
    }

    fn outcome(introspector: &Introspector, extra: Value) -> Result<String, String> {
        let verdict = introspector.judge(active(extra));
        introspector
            .admit(&verdict, NOW)
            .map(|identity| identity.client_id.clone())
            .map_err(|err| err.to_string())
    }

    #[test]
    fn an_active_bearer_token_is_admitted() {
        let introspector = introspector(&[]);

        assert_eq!(outcome(&introspector, json!({})), Ok("demo".to_owned()));
        assert_eq!(
            outcome(&introspector, json!({"token_type": "bearer"})),
            Ok("demo".to_owned())
        );
        let untyped = introspector.judge({
            let mut claims = active(json!({}));
            claims.remove("token_type");
            claims
        });
        assert!(introspector.admit(&untyped, NOW).is_ok());
    }

    #[test]
    fn only_bearer_tokens_pass() {
        let introspector = introspector(&[]);

        for kind in [
            json!("DPoP"),
            json!("refresh_token"),
            json!("N_A"),
            json!(1),
        ] {
            assert_eq!(
                outcome(&introspector, json!({ "token_type": kind })),
                Err("token type is not an access token".to_owned()),
                "{kind}"
            );
        }
    }

    #[test]
    fn nbf_and_iat_follow_the_jwt_rules() {
        let introspector = introspector(&[]);

        assert!(outcome(&introspector, json!({"nbf": NOW + 5, "iat": NOW + 5})).is_ok());
        assert_eq!(
            outcome(&introspector, json!({"nbf": NOW + 600})),
            Err("token is not valid yet".to_owned())
        );
        assert_eq!(
            outcome(&introspector, json!({"iat": NOW + 600})),
            Err("token was issued in the future".to_owned())
        );
        assert_eq!(
            outcome(&introspector, json!({"nbf": "later"})),
            Err("token claims are invalid".to_owned())
        );

        // Checked on each use: the same verdict admits the token once its
        // `nbf` has come.
        let verdict = introspector.judge(active(json!({"nbf": NOW + 600})));
        assert!(introspector.admit(&verdict, NOW).is_err());
        assert!(introspector.admit(&verdict, NOW + 600).is_ok());
    }

    #[test]
    fn required_claims_apply_to_opaque_tokens() {
        let introspector = introspector(&["jti"]);

        assert_eq!(
            outcome(&introspector, json!({})),
            Err("token claims are invalid".to_owned())
        );
        assert!(outcome(&introspector, json!({"jti": "t-1"})).is_ok());
    }
}
