//! Matching a request to a configured route.
//!
//! Envoy has already normalised the path (dot segments resolved, slashes
//! merged, escaped slashes refused) before Check sees it, so matching here is
//! plain segment-aware prefix comparison on the path without its query.

use crate::config::Route;

/// The first route in `routes` whose prefix and method match, if any.
///
/// A prefix matches whole segments only: `/vehicles` matches `/vehicles` and
/// `/vehicles/v-1` but not `/vehiclesX`. The query and fragment are ignored.
pub fn find<'a>(routes: &'a [Route], method: &str, path: &str) -> Option<&'a Route> {
    routes.iter().find(|route| matches(route, method, path))
}

/// The route that serves a composite part's `path` on its own: the first
/// plain (not composite) route that takes `GET` there.
///
/// A composite answers with that route's data, so the client's profile for
/// it and its rate limit apply to the part as they would to the route.
pub fn part_route<'a>(routes: &'a [Route], path: &str) -> Option<&'a Route> {
    routes
        .iter()
        .filter(|route| route.composite.is_none())
        .find(|route| matches(route, "GET", path))
}

/// Whether `route` serves `method` on `path`, by the rules of [`find`].
pub fn matches(route: &Route, method: &str, path: &str) -> bool {
    prefix_matches(&route.prefix, path_only(path))
        && (route.methods.is_empty() || route.methods.iter().any(|m| m == method))
}

/// The path without its query string or fragment.
pub fn path_only(path: &str) -> &str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    &path[..end]
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    // The root route's prefix is stored as "" and matches every path.
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, prefix: &str, methods: &[&str]) -> Route {
        Route {
            name: name.to_owned(),
            prefix: prefix.to_owned(),
            methods: methods.iter().map(|m| (*m).to_owned()).collect(),
            public: false,
            scopes: Vec::new(),
            any_scopes: Vec::new(),
            claims: Vec::new(),
            token_kinds: vec![crate::config::TokenKind::Jwt],
            rate_limit: None,
            profile: None,
            request_headers: Default::default(),
            composite: None,
        }
    }

    #[test]
    fn prefix_matches_whole_segments_only() {
        let routes = [route("vehicles", "/vehicles", &[])];

        assert!(find(&routes, "GET", "/vehicles").is_some());
        assert!(find(&routes, "GET", "/vehicles/v-1").is_some());
        assert!(find(&routes, "GET", "/vehicles?page=2").is_some());
        assert!(find(&routes, "GET", "/vehicles/").is_some());
        assert!(find(&routes, "GET", "/vehiclesX").is_none());
        assert!(find(&routes, "GET", "/VEHICLES").is_none());
        assert!(find(&routes, "GET", "/").is_none());
        assert!(find(&routes, "GET", "/admin?x=/vehicles").is_none());
    }

    #[test]
    fn first_match_wins_and_methods_filter() {
        let routes = [
            route("write", "/vehicles", &["POST"]),
            route("read", "/vehicles", &["GET", "HEAD"]),
            route("root", "", &[]),
        ];

        assert_eq!(
            find(&routes, "POST", "/vehicles").map(|r| r.name.as_str()),
            Some("write")
        );
        assert_eq!(
            find(&routes, "GET", "/vehicles/1").map(|r| r.name.as_str()),
            Some("read")
        );
        assert_eq!(
            find(&routes, "DELETE", "/vehicles").map(|r| r.name.as_str()),
            Some("root")
        );
        assert_eq!(
            find(&routes, "GET", "/anything").map(|r| r.name.as_str()),
            Some("root")
        );
    }
}
