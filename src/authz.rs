//! Authorization: a route's requirements (scopes, claim conditions) against
//! a verified identity.

use crate::authn::Identity;
use crate::config::{ClaimRule, ClaimTest, Route};
use crate::decision::Refusal;

/// Checks that `identity` satisfies everything `route` requires: all of
/// `scopes`, one of `any_scopes` (when set), and every claim condition.
///
/// # Errors
///
/// [`Refusal::InsufficientScope`] naming the scopes that would satisfy the
/// route, as RFC 6750 asks for in the challenge's `scope` attribute, or
/// [`Refusal::ClaimMismatch`] naming the claim that failed.
pub fn authorize(route: &Route, identity: &Identity) -> Result<(), Refusal> {
    let all = route.scopes.iter().all(|scope| identity.has_scope(scope));
    let any = route.any_scopes.is_empty()
        || route
            .any_scopes
            .iter()
            .any(|scope| identity.has_scope(scope));
    if !all || !any {
        return Err(Refusal::InsufficientScope {
            required: required_scopes(route),
        });
    }

    for rule in &route.claims {
        if !satisfies(rule, identity) {
            return Err(Refusal::ClaimMismatch {
                claim: rule.claim.clone(),
            });
        }
    }
    Ok(())
}

/// The scopes a client should ask for: every `scopes` entry, plus the first
/// `any_scopes` entry when none of those is already among them.
fn required_scopes(route: &Route) -> String {
    let mut scopes = route.scopes.clone();
    if let Some(first) = route.any_scopes.first()
        && !route.any_scopes.iter().any(|scope| scopes.contains(scope))
    {
        scopes.push(first.clone());
    }
    scopes.join(" ")
}

/// Whether the claim holds; an array claim holds when any member does.
fn satisfies(rule: &ClaimRule, identity: &Identity) -> bool {
    let Some(values) = identity.claim_values(&rule.claim) else {
        return false;
    };

    values.iter().any(|value| match &rule.test {
        ClaimTest::Equals(expected) => value == expected,
        ClaimTest::OneOf(allowed) => allowed.contains(value),
        ClaimTest::Pattern(regex) => regex.is_match(value),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::config::TokenKind;

    fn identity(scopes: &[&str], claims: serde_json::Value) -> Identity {
        Identity {
            issuer: "i".to_owned(),
            client_id: "c".to_owned(),
            subject: "c".to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            expires_at: 0,
            key_id: None,
            claims: Arc::new(claims.as_object().cloned().unwrap_or_default()),
        }
    }

    fn route(scopes: &[&str], any: &[&str], claims: Vec<ClaimRule>) -> Route {
        Route {
            name: "r".to_owned(),
            prefix: "/r".to_owned(),
            methods: Vec::new(),
            public: false,
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            any_scopes: any.iter().map(|s| (*s).to_owned()).collect(),
            claims,
            token_kinds: vec![TokenKind::Jwt],
            rate_limit: None,
            profile: None,
            request_headers: Default::default(),
            composite: None,
        }
    }

    fn rule(claim: &str, test: ClaimTest) -> ClaimRule {
        ClaimRule {
            claim: claim.to_owned(),
            test,
        }
    }

    #[test]
    fn all_scopes_are_required() {
        let route = route(&["a", "b"], &[], Vec::new());

        assert!(authorize(&route, &identity(&["b", "a", "c"], json!({}))).is_ok());
        assert!(authorize(&route, &identity(&["a"], json!({}))).is_err());
        assert!(authorize(&route, &identity(&[], json!({}))).is_err());
    }

    #[test]
    fn one_of_any_scopes_is_enough() {
        let route = route(&["a"], &["x", "y"], Vec::new());

        assert!(authorize(&route, &identity(&["a", "y"], json!({}))).is_ok());
        let err = authorize(&route, &identity(&["a"], json!({}))).expect_err("no x or y");
        assert!(
            matches!(&err, Refusal::InsufficientScope { required } if required == "a x"),
            "{err:?}"
        );
    }

    #[test]
    fn no_scopes_means_any_valid_token() {
        assert!(authorize(&route(&[], &[], Vec::new()), &identity(&[], json!({}))).is_ok());
    }

    #[test]
    fn claim_conditions_all_hold() {
        let pattern = regex::Regex::new("^(?:eu-[a-z]+)$").expect("regex");
        let route = route(
            &[],
            &[],
            vec![
                rule("tenant", ClaimTest::Equals("acme".to_owned())),
                rule(
                    "tier",
                    ClaimTest::OneOf(vec!["gold".to_owned(), "silver".to_owned()]),
                ),
                rule("regions", ClaimTest::Pattern(pattern)),
            ],
        );
        let good = json!({"tenant": "acme", "tier": "gold", "regions": ["us", "eu-west"]});

        assert!(authorize(&route, &identity(&[], good.clone())).is_ok());
        for (claim, value) in [
            ("tenant", json!("acme2")),
            ("tier", json!("bronze")),
            ("regions", json!(["us"])),
            ("tenant", json!(null)),
        ] {
            let mut claims = good.clone();
            claims[claim] = value;
            let err = authorize(&route, &identity(&[], claims)).expect_err(claim);
            assert!(
                matches!(&err, Refusal::ClaimMismatch { claim: c } if c == claim),
                "{err:?}"
            );
        }
    }
}
