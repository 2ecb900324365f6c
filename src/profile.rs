//! Which profile shapes a client's responses on a route, chosen once in
//! Check, and which request header the answer depends on.
//!
//! Precedence, highest first: the profile header (only among the profiles
//! the client is allowed), the token's profile claim, the client's config
//! entry, the route's default. A client can never pick a profile it is not
//! allowed: a partner asking for the web profile keeps its own.

use crate::config::{Config, Route};

/// What the request offers towards a profile choice.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked<'a> {
    /// The authenticated client, if the route needs a token.
    pub client_id: Option<&'a str>,
    /// The token's profile claim, if one is configured and present.
    pub claim: Option<&'a str>,
    /// The profile header's value, if sent.
    pub header: Option<&'a str>,
}

/// The profile chosen, and the headers a cache must vary on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Choice {
    /// The chosen profile's name.
    pub profile: Option<String>,
    /// The request headers the shape depends on, as a `Vary` value: the
    /// profile header when its value could change the choice for this
    /// client, and `authorization` when the token does.
    pub vary: Option<String>,
}

/// Chooses the profile for `asked` on `route`.
pub fn choose(config: &Config, route: &Route, asked: Asked<'_>) -> Choice {
    let client = asked.client_id.and_then(|id| config.clients.get(id));

    // The provider signed the claim, so it is trusted as far as it names a
    // profile that exists.
    let claimed = asked
        .claim
        .filter(|name| config.profiles.contains_key(*name))
        .map(str::to_owned);
    let base = claimed
        .or_else(|| client.and_then(|client| client.profile.clone()))
        .or_else(|| route.profile.clone());

    // What a header may pick: the profile the client gets anyway, and the
    // ones its entry allows besides.
    let mut allowed: Vec<&str> = base.iter().map(String::as_str).collect();
    for name in client.iter().flat_map(|client| &client.allowed_profiles) {
        if !allowed.contains(&name.as_str()) {
            allowed.push(name);
        }
    }

    let header_name = config.reshape.profile_header.as_ref();
    let by_header = header_name
        .filter(|_| allowed.len() > 1)
        .map(String::as_str);

    // Where any profile reshapes this route, who asks decides the shape. The
    // services never see the token and may mark an answer as public, so the
    // answer must say it depends on `Authorization`, or a shared cache could
    // hand one client's shape (with its data) to another.
    let reshaped_here = config
        .profiles
        .values()
        .any(|profile| profile.routes.contains_key(&route.name));
    let by_token = (asked.client_id.is_some() && reshaped_here).then_some("authorization");
    let vary = match (by_header, by_token) {
        (Some(header), Some(token)) => Some(format!("{header}, {token}")),
        (one, other) => one.or(other).map(str::to_owned),
    };

    let picked = header_name.and(asked.header).map(str::trim);

    let profile = match picked {
        Some(name) if allowed.contains(&name) => Some(name.to_owned()),
        Some(_) => {
            tracing::debug!(
                client.id = ?asked.client_id,
                "profile header names a profile this client may not use; ignored",
            );
            base
        }
        None => base,
    };

    Choice { profile, vary }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;

    const CONFIG: &str = r#"
provider:
  issuer: http://127.0.0.1:9400
  audiences: [api]
profiles:
  web: {}
  mobile: {}
  partner: {}
  tablet: {}
reshape:
  profile_claim: app_profile
clients:
  app:
    profile: mobile
    allowed_profiles: [tablet]
  partner:
    profile: partner
  anonymous-ish: {}
routes:
  - name: vehicles
    prefix: /vehicles
  - name: stations
    prefix: /stations
    profile: web
"#;

    fn config() -> Config {
        Config::from_yaml(Path::new("test.yaml"), CONFIG, HashMap::new()).expect("valid config")
    }

    fn pick(route: &str, asked: Asked<'_>) -> Choice {
        let config = config();
        let route = config.route(route).expect("route").clone();
        choose(&config, &route, asked)
    }

    #[test]
    fn client_entry_comes_before_the_route_default() {
        let asked = Asked {
            client_id: Some("partner"),
            ..Asked::default()
        };
        assert_eq!(pick("stations", asked).profile.as_deref(), Some("partner"));

        let unknown = Asked {
            client_id: Some("unknown"),
            ..Asked::default()
        };
        assert_eq!(pick("stations", unknown).profile.as_deref(), Some("web"));
        assert_eq!(pick("vehicles", unknown).profile, None);
    }

    #[test]
    fn header_picks_only_among_allowed_profiles() {
        let tablet = Asked {
            client_id: Some("app"),
            header: Some("tablet"),
            ..Asked::default()
        };
        let choice = pick("vehicles", tablet);
        assert_eq!(choice.profile.as_deref(), Some("tablet"));
        assert_eq!(choice.vary.as_deref(), Some("x-client-type"));

        let web = Asked {
            header: Some("web"),
            ..tablet
        };
        assert_eq!(pick("vehicles", web).profile.as_deref(), Some("mobile"));
    }

    #[test]
    fn a_partner_cannot_ask_for_the_web_profile_and_gets_no_vary() {
        let asked = Asked {
            client_id: Some("partner"),
            header: Some("web"),
            ..Asked::default()
        };
        let choice = pick("vehicles", asked);

        assert_eq!(choice.profile.as_deref(), Some("partner"));
        assert_eq!(
            choice.vary, None,
            "one allowed profile: the header changes nothing"
        );
    }

    #[test]
    fn a_route_some_profile_reshapes_varies_on_the_token() {
        let yaml = CONFIG.replace(
            "  mobile: {}",
            "  mobile:\n    routes:\n      vehicles:\n        - drop: [vin]",
        );
        let config =
            Config::from_yaml(Path::new("test.yaml"), &yaml, HashMap::new()).expect("valid config");
        let choose_on = |route: &str, asked| {
            let route = config.route(route).expect("route").clone();
            choose(&config, &route, asked)
        };
        let partner = Asked {
            client_id: Some("partner"),
            ..Asked::default()
        };
        let app = Asked {
            client_id: Some("app"),
            ..Asked::default()
        };

        assert_eq!(
            choose_on("vehicles", partner).vary.as_deref(),
            Some("authorization")
        );
        assert_eq!(
            choose_on("vehicles", app).vary.as_deref(),
            Some("x-client-type, authorization")
        );
        // No profile reshapes stations, and nobody is known without a token.
        assert_eq!(choose_on("stations", partner).vary, None);
        assert_eq!(choose_on("vehicles", Asked::default()).vary, None);
    }

    #[test]
    fn claim_comes_before_the_client_entry_and_is_then_allowed() {
        let asked = Asked {
            client_id: Some("partner"),
            claim: Some("tablet"),
            ..Asked::default()
        };
        assert_eq!(pick("vehicles", asked).profile.as_deref(), Some("tablet"));

        let unknown_claim = Asked {
            claim: Some("nonexistent"),
            ..asked
        };
        assert_eq!(
            pick("vehicles", unknown_claim).profile.as_deref(),
            Some("partner")
        );
    }
}
