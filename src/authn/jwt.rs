//! Reading a JWT before and after its signature is checked: the strict
//! shape checks (three base64url parts, no duplicate member names, a known
//! `typ`), the issuer it claims, and the identity its claims describe.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::{AuthnError, Identity};

/// `typ` values accepted; RFC 9068 names `at+jwt`, and many providers still
/// send `JWT` or nothing. Other types (ID tokens, logout tokens, security
/// events) are JWTs meant for something else and are refused.
const ACCEPTED_TYPES: [&str; 4] = ["jwt", "at+jwt", "application/at+jwt", "application/jwt"];

/// What a JWT says about itself before anything is trusted.
pub struct Peeked {
    /// The unverified `iss`, used only to pick the provider whose rules and
    /// keys then verify the token.
    pub issuer: Option<String>,
}

/// Checks the token's shape and reads its claimed issuer.
///
/// RFC 8725 asks for strict parsing: exactly three parts, each base64url
/// without padding, header and claims JSON objects whose member names are
/// unique (RFC 7515 section 4 and RFC 7519 section 4 allow refusing
/// duplicates, and refusing them is the only safe choice when parsers
/// disagree on which one wins).
///
/// # Errors
///
/// [`AuthnError::NotAJwt`] or [`AuthnError::DuplicateNames`].
pub fn peek(token: &str) -> Result<Peeked, AuthnError> {
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, signature] = parts[..] else {
        return Err(AuthnError::NotAJwt);
    };
    if signature.is_empty() {
        return Err(AuthnError::NotAJwt);
    }

    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthnError::NotAJwt)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| AuthnError::NotAJwt)?;
    URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| AuthnError::NotAJwt)?;

    check_unique_names(&header)?;
    check_unique_names(&payload)?;

    let header: Map<String, Value> =
        serde_json::from_slice(&header).map_err(|_| AuthnError::NotAJwt)?;
    if let Some(typ) = header.get("typ") {
        let accepted = typ
            .as_str()
            .is_some_and(|typ| ACCEPTED_TYPES.contains(&typ.to_ascii_lowercase().as_str()));
        if !accepted {
            return Err(AuthnError::WrongType);
        }
    }

    let claims: Map<String, Value> =
        serde_json::from_slice(&payload).map_err(|_| AuthnError::BadClaims)?;
    let issuer = claims.get("iss").and_then(Value::as_str).map(str::to_owned);
    Ok(Peeked { issuer })
}

/// Refuses a JSON object that names a member twice.
fn check_unique_names(json: &[u8]) -> Result<(), AuthnError> {
    let mut de = serde_json::Deserializer::from_slice(json);

    match de.deserialize_map(UniqueNames) {
        Ok(true) => Ok(()),
        Ok(false) => Err(AuthnError::DuplicateNames),
        Err(_) => Err(AuthnError::NotAJwt),
    }
}

/// Walks one object's members; `false` when a name repeats.
struct UniqueNames;

impl<'de> Visitor<'de> for UniqueNames {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut seen = HashSet::new();
        let mut unique = true;

        while let Some(name) = map.next_key::<String>()? {
            map.next_value::<IgnoredAny>()?;
            unique &= seen.insert(name);
        }
        Ok(unique)
    }
}

/// The identity described by verified claims.
///
/// # Errors
///
/// [`AuthnError::BadClaims`] when no client is named or a claim has the
/// wrong type.
pub fn identity_from(
    claims: Map<String, Value>,
    issuer: &str,
    key_id: Option<String>,
) -> Result<Identity, AuthnError> {
    let text = |name: &str| -> Result<Option<String>, AuthnError> {
        match claims.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(value)) => Ok(Some(value.clone())),
            Some(_) => Err(AuthnError::BadClaims),
        }
    };

    // RFC 9068 names `client_id`; some providers only set `azp`.
    let client_id = text("client_id")?
        .or(text("azp")?)
        .ok_or(AuthnError::BadClaims)?;
    let subject = text("sub")?.unwrap_or_else(|| client_id.clone());
    let expires_at = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or(AuthnError::BadClaims)?;

    // Scopes come from `scope` (space separated, RFC 8693 and RFC 9068) and
    // `scp` (an array, as some providers send).
    let mut scopes: Vec<String> = text("scope")?
        .unwrap_or_default()
        .split(' ')
        .filter(|scope| !scope.is_empty())
        .map(str::to_owned)
        .collect();
    match claims.get("scp") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                let scope = item.as_str().ok_or(AuthnError::BadClaims)?;
                scopes.push(scope.to_owned());
            }
        }
        Some(Value::String(scope)) => scopes.extend(scope.split(' ').map(str::to_owned)),
        Some(_) => return Err(AuthnError::BadClaims),
    }
    scopes.retain(|scope| !scope.is_empty());
    scopes.dedup();

    Ok(Identity {
        issuer: issuer.to_owned(),
        client_id,
        subject,
        scopes,
        expires_at,
        key_id,
        claims: Arc::new(claims),
    })
}

/// Refuses a token whose `nbf` or `iat` lies beyond `now` plus `leeway`
/// seconds, or is not a number: the time rules JWTs and introspected tokens
/// share (`exp` is checked where each kind keeps it).
///
/// # Errors
///
/// [`AuthnError::NotYetValid`], [`AuthnError::IssuedInFuture`] or
/// [`AuthnError::BadClaims`].
pub fn check_not_future(
    claims: &Map<String, Value>,
    leeway: u64,
    now: u64,
) -> Result<(), AuthnError> {
    let latest = now.saturating_add(leeway);

    for (name, refusal) in [
        ("nbf", AuthnError::NotYetValid),
        ("iat", AuthnError::IssuedInFuture),
    ] {
        match claims.get(name) {
            None => {}
            Some(value) => {
                let at = value.as_u64().ok_or(AuthnError::BadClaims)?;
                if at > latest {
                    return Err(refusal);
                }
            }
        }
    }
    Ok(())
}

/// Refuses a token lacking one of the provider's `required_claims` (or
/// carrying it as null).
///
/// # Errors
///
/// [`AuthnError::BadClaims`].
pub fn check_required(claims: &Map<String, Value>, required: &[String]) -> Result<(), AuthnError> {
    let missing = required
        .iter()
        .any(|name| claims.get(name).is_none_or(Value::is_null));
    if missing {
        return Err(AuthnError::BadClaims);
    }
    Ok(())
}

/// What a `jsonwebtoken` failure means for the client.
pub fn map_jwt_error(kind: &jsonwebtoken::errors::ErrorKind) -> AuthnError {
    use jsonwebtoken::errors::ErrorKind;

    match kind {
        ErrorKind::InvalidSignature => AuthnError::BadSignature,
        ErrorKind::ExpiredSignature => AuthnError::Expired,
        ErrorKind::ImmatureSignature => AuthnError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthnError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthnError::WrongAudience,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => AuthnError::AlgorithmRefused,
        ErrorKind::MissingRequiredClaim(_)
        | ErrorKind::InvalidClaimFormat(_)
        | ErrorKind::Json(_) => AuthnError::BadClaims,
        _ => AuthnError::NotAJwt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(json: &str) -> String {
        URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn refuses_duplicate_names_in_header_and_claims() {
        let header = part(r#"{"alg":"RS256","alg":"none"}"#);
        let claims = part(r#"{"iss":"a"}"#);
        assert!(matches!(
            peek(&format!("{header}.{claims}.c2ln")),
            Err(AuthnError::DuplicateNames)
        ));

        let header = part(r#"{"alg":"RS256"}"#);
        let claims = part(r#"{"iss":"a","iss":"b"}"#);
        assert!(matches!(
            peek(&format!("{header}.{claims}.c2ln")),
            Err(AuthnError::DuplicateNames)
        ));
    }

    #[test]
    fn refuses_the_wrong_shape() {
        let header = part(r#"{"alg":"RS256"}"#);
        let claims = part(r#"{"iss":"a"}"#);
        for token in [
            format!("{header}.{claims}"),
            format!("{header}.{claims}.c2ln.c2ln"),
            format!("{header}.{claims}."),
            format!("{header}=.{claims}.c2ln"),
            format!("{header}.{claims}+/.c2ln"),
        ] {
            assert!(peek(&token).is_err(), "{token}");
        }
        assert_eq!(
            peek(&format!("{header}.{claims}.c2ln"))
                .ok()
                .and_then(|p| p.issuer),
            Some("a".to_owned())
        );
    }

    #[test]
    fn accepts_access_token_types_only() {
        let claims = part(r#"{"iss":"a"}"#);
        for (typ, ok) in [("at+jwt", true), ("JWT", true), ("id_token+jwt", false)] {
            let header = part(&format!(r#"{{"alg":"RS256","typ":"{typ}"}}"#));
            assert_eq!(
                peek(&format!("{header}.{claims}.c2ln")).is_ok(),
                ok,
                "{typ}"
            );
        }
    }

    #[test]
    fn time_claims_in_the_future_are_refused_beyond_the_leeway() {
        let claims =
            |json: &str| -> Map<String, Value> { serde_json::from_str(json).expect("json") };
        let now = 1_000;

        assert!(check_not_future(&claims(r#"{"nbf":1030,"iat":1030}"#), 30, now).is_ok());
        assert!(matches!(
            check_not_future(&claims(r#"{"nbf":1031}"#), 30, now),
            Err(AuthnError::NotYetValid)
        ));
        assert!(matches!(
            check_not_future(&claims(r#"{"iat":1031}"#), 30, now),
            Err(AuthnError::IssuedInFuture)
        ));
        assert!(matches!(
            check_not_future(&claims(r#"{"nbf":"soon"}"#), 30, now),
            Err(AuthnError::BadClaims)
        ));
        assert!(check_not_future(&claims("{}"), 0, now).is_ok());
    }

    #[test]
    fn required_claims_must_be_present_and_not_null() {
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"jti":"x","tenant":null}"#).expect("json");

        assert!(check_required(&claims, &["jti".to_owned()]).is_ok());
        assert!(check_required(&claims, &["tenant".to_owned()]).is_err());
        assert!(check_required(&claims, &["sub".to_owned()]).is_err());
    }

    #[test]
    fn reads_scope_and_scp() {
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"client_id":"c","exp":9,"scope":"a b","scp":["c"]}"#)
                .expect("json");
        let identity = identity_from(claims, "i", None).expect("identity");

        assert_eq!(identity.scopes, ["a", "b", "c"]);
        assert_eq!(identity.subject, "c");
    }
}
