//! Authorization: a route's requirements against a verified identity.

use crate::authn::Identity;
use crate::config::Route;
use crate::decision::Refusal;

/// Checks that `identity` carries every scope `route` requires.
///
/// # Errors
///
/// [`Refusal::InsufficientScope`] naming all the route's scopes, as RFC 6750
/// asks for in the `scope` attribute of the challenge.
pub fn authorize(route: &Route, identity: &Identity) -> Result<(), Refusal> {
    if route.scopes.iter().all(|scope| identity.has_scope(scope)) {
        return Ok(());
    }

    Err(Refusal::InsufficientScope {
        required: route.scopes.join(" "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(scopes: &[&str]) -> Identity {
        Identity {
            client_id: "c".to_owned(),
            subject: "c".to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            expires_at: 0,
            key_id: None,
        }
    }

    fn route(scopes: &[&str]) -> Route {
        Route {
            name: "r".to_owned(),
            prefix: "/r".to_owned(),
            methods: Vec::new(),
            public: false,
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            rate_limit: None,
            profile: None,
            request_headers: Default::default(),
            composite: None,
        }
    }

    #[test]
    fn all_scopes_are_required() {
        let route = route(&["a", "b"]);

        assert!(authorize(&route, &identity(&["b", "a", "c"])).is_ok());
        assert!(authorize(&route, &identity(&["a"])).is_err());
        assert!(authorize(&route, &identity(&[])).is_err());
    }

    #[test]
    fn no_scopes_means_any_valid_token() {
        assert!(authorize(&route(&[]), &identity(&[])).is_ok());
    }
}
