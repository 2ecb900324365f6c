//! The token side of the configuration: providers (`providers:`, or the
//! single-provider shorthand `provider:`), bearer-token settings (`tokens:`)
//! and a route's token requirements, as written and as compiled.

use std::fmt;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::file::unplaced;
use super::strict::strict;
use super::{Problems, check_url, placed};

/// The longest discovery or JWKS request allowed: two in a row stay well
/// under Envoy's 1 s ext_authz timeout.
const MAX_FETCH_TIMEOUT_MS: u64 = 400;

/// The longest introspection call allowed, under Envoy's 1 s timeout.
const MAX_INTROSPECTION_MS: u64 = 800;

/// The longest a Check may wait for one provider, and why: an unknown `kid`
/// costs a JWKS fetch, after a discovery fetch when discovery is used (a
/// provider with only HMAC algorithms fetches nothing); an opaque token
/// costs one introspection call. The slowest provider counts.
pub(super) fn slowest_token_check(providers: &[Provider]) -> Option<(Duration, String)> {
    let mut slowest: Option<(Duration, String)> = None;

    for provider in providers {
        let discovers = provider.jwks_uri.is_none()
            || provider
                .introspection
                .as_ref()
                .is_some_and(|introspection| introspection.endpoint.is_none());
        let (fetches, what) = if !provider.uses_jwks() {
            (0, "no key fetch")
        } else if discovers {
            (2, "discovery and JWKS fetched in a row")
        } else {
            (1, "a JWKS fetch")
        };
        let mut worst = (provider.fetch_timeout * fetches, what);
        if let Some(introspection) = &provider.introspection
            && introspection.timeout > worst.0
        {
            worst = (introspection.timeout, "an introspection call");
        }

        if slowest
            .as_ref()
            .is_none_or(|(longest, _)| worst.0 > *longest)
        {
            let why = format!("{} at {}", worst.1, provider.issuer);
            slowest = Some((worst.0, why));
        }
    }
    slowest
}

/// The key refresh period when neither the file nor the JWKS sets one.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);

/// The most clock skew a provider may be granted: five minutes is already
/// generous, and the time checks subtract it from the clock.
pub const MAX_LEEWAY_SECONDS: u64 = 300;

// === file format ===

/// One entry of `providers:`, or the whole of `provider:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSection {
    /// The issuer URL; tokens must carry exactly this `iss`.
    pub issuer: Spanned<String>,

    /// Accepted audiences; a token's `aud` must contain one of them.
    pub audiences: Spanned<Vec<String>>,

    /// Where the signing keys are; found by OIDC discovery when absent.
    /// Refused on a provider whose algorithms are all HMAC, which fetches
    /// no keys.
    #[serde(default)]
    pub jwks_uri: Option<Spanned<String>>,

    /// Accepted clock skew for `exp`, `nbf` and `iat`, in seconds (0 to 300).
    #[serde(default = "default_leeway", deserialize_with = "strict")]
    pub leeway_seconds: Spanned<u64>,

    /// Budget for one discovery or JWKS request, in milliseconds.
    #[serde(default = "default_fetch_timeout", deserialize_with = "strict")]
    pub fetch_timeout_ms: Spanned<u64>,

    /// Key refresh period when the JWKS response sets no `max-age`, in
    /// seconds; within `min_refresh_seconds` and `max_refresh_seconds`.
    /// When absent, 300 moved into those bounds.
    #[serde(default, deserialize_with = "strict")]
    pub refresh_seconds: Option<Spanned<u64>>,

    /// Lower bound on the refresh period, whatever `max-age` says, in seconds.
    #[serde(default = "default_min_refresh", deserialize_with = "strict")]
    pub min_refresh_seconds: Spanned<u64>,

    /// Upper bound on the refresh period, whatever `max-age` says, in seconds.
    #[serde(default = "default_max_refresh", deserialize_with = "strict")]
    pub max_refresh_seconds: Spanned<u64>,

    /// The minimum time between two refetches caused by an unknown `kid`, in
    /// seconds; at least 1, so the throttle can never be turned off.
    #[serde(default = "default_refetch", deserialize_with = "strict")]
    pub min_refetch_seconds: Spanned<u64>,

    /// Accepted signature algorithms; every asymmetric one when empty.
    #[serde(default)]
    pub algorithms: Vec<Spanned<Algorithm>>,

    /// The shared secret for HMAC tokens; HS256/384/512 are refused without it.
    /// A provider with only HMAC algorithms is ready from the start: its key
    /// is this secret, so it needs no JWKS and no discovery.
    #[serde(default)]
    pub hmac_secret: Option<Spanned<String>>,

    /// Claims a token must carry besides `exp`, `iss` and `aud`.
    #[serde(default)]
    pub required_claims: Vec<String>,

    /// Checking opaque tokens with RFC 7662 introspection.
    #[serde(default)]
    pub introspection: Option<Spanned<IntrospectionSection>>,
}

/// `introspection:` inside a provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionSection {
    /// The endpoint; found by OIDC discovery when absent.
    #[serde(default)]
    pub endpoint: Option<Spanned<String>>,

    /// The client Gatehouse authenticates as (HTTP Basic).
    pub client_id: String,

    /// That client's secret.
    pub client_secret: String,

    /// Accepted audiences of opaque tokens; the provider's when empty.
    #[serde(default)]
    pub audiences: Vec<String>,

    /// Budget for one introspection call, in milliseconds.
    #[serde(default = "default_introspection_timeout", deserialize_with = "strict")]
    pub timeout_ms: Spanned<u64>,

    /// The longest an active result is reused, in seconds (never past `exp`).
    #[serde(default = "default_active_cache", deserialize_with = "strict")]
    pub cache_seconds: u64,

    /// How long an inactive result is reused, in seconds.
    #[serde(default = "default_inactive_cache", deserialize_with = "strict")]
    pub inactive_cache_seconds: u64,
}

/// `tokens:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokensSection {
    /// The largest `Authorization` value accepted, in bytes.
    #[serde(deserialize_with = "strict")]
    pub max_bytes: Spanned<usize>,

    /// Whether a token in the `access_token` query parameter is accepted.
    #[serde(deserialize_with = "strict")]
    pub allow_query: bool,

    /// The identity headers set on allowed requests.
    pub forward: ForwardSection,
}

impl Default for TokensSection {
    fn default() -> Self {
        Self {
            max_bytes: unplaced(8 * 1024),
            allow_query: false,
            forward: ForwardSection::default(),
        }
    }
}

/// `tokens.forward:`; a name set to `null` is not forwarded.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardSection {
    /// Header carrying the client id.
    pub client_id: Option<Spanned<String>>,
    /// Header carrying the subject.
    pub subject: Option<Spanned<String>>,
    /// Header carrying the granted scopes, space separated.
    pub scopes: Option<Spanned<String>>,
    /// Headers carrying chosen claims, by claim name.
    pub claims: std::collections::BTreeMap<String, Spanned<String>>,
}

impl Default for ForwardSection {
    fn default() -> Self {
        Self {
            client_id: Some(unplaced("x-gatehouse-client-id".to_owned())),
            subject: Some(unplaced("x-gatehouse-subject".to_owned())),
            scopes: Some(unplaced("x-gatehouse-scopes".to_owned())),
            claims: std::collections::BTreeMap::new(),
        }
    }
}

/// One entry of a route's `claims:`; exactly one test is set.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimSection {
    /// The claim's name.
    pub claim: Spanned<String>,
    /// The claim must be exactly this.
    #[serde(default)]
    pub equals: Option<String>,
    /// The claim must be one of these.
    #[serde(default)]
    pub one_of: Option<Vec<String>>,
    /// The claim must match this regular expression, whole.
    #[serde(default)]
    pub pattern: Option<String>,
}

/// The kinds of token a route accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Signed JWT access tokens, checked against the provider's keys.
    Jwt,
    /// Opaque tokens, checked by introspection.
    Opaque,
}

fn default_leeway() -> Spanned<u64> {
    unplaced(30)
}

fn default_fetch_timeout() -> Spanned<u64> {
    unplaced(300)
}

fn default_min_refresh() -> Spanned<u64> {
    unplaced(30)
}

fn default_max_refresh() -> Spanned<u64> {
    unplaced(3600)
}

fn default_refetch() -> Spanned<u64> {
    unplaced(10)
}

fn default_introspection_timeout() -> Spanned<u64> {
    unplaced(300)
}

fn default_active_cache() -> u64 {
    60
}

fn default_inactive_cache() -> u64 {
    5
}

// === compiled form ===

/// An OAuth2 provider whose tokens are accepted.
#[derive(Clone, PartialEq)]
pub struct Provider {
    /// Exact `iss` value.
    pub issuer: String,
    /// Accepted `aud` values.
    pub audiences: Vec<String>,
    /// Explicit JWKS location; OIDC discovery when `None`.
    pub jwks_uri: Option<String>,
    /// Clock skew allowed on time claims.
    pub leeway: Duration,
    /// Budget for one discovery or JWKS request.
    pub fetch_timeout: Duration,
    /// Background refresh period when the JWKS sets no `max-age`.
    pub refresh: Duration,
    /// Bounds on the refresh period.
    pub refresh_bounds: (Duration, Duration),
    /// Minimum time between refetches caused by an unknown `kid`.
    pub min_refetch: Duration,
    /// Accepted signature algorithms.
    pub algorithms: Vec<Algorithm>,
    /// Shared secret for HMAC algorithms; `Debug` hides it.
    pub hmac_secret: Option<String>,
    /// Claims required besides `exp`, `iss` and `aud`.
    pub required_claims: Vec<String>,
    /// Introspection of opaque tokens.
    pub introspection: Option<Introspection>,
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provider")
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("jwks_uri", &self.jwks_uri)
            .field("algorithms", &self.algorithms)
            .field("hmac_secret", &self.hmac_secret.as_ref().map(|_| "***"))
            .field("introspection", &self.introspection)
            .finish_non_exhaustive()
    }
}

/// How opaque tokens are introspected.
#[derive(Clone, PartialEq)]
pub struct Introspection {
    /// The endpoint; from discovery when `None`.
    pub endpoint: Option<String>,
    /// Client id for HTTP Basic.
    pub client_id: String,
    /// Client secret for HTTP Basic; `Debug` hides it.
    pub client_secret: String,
    /// Accepted audiences of opaque tokens.
    pub audiences: Vec<String>,
    /// Budget for one call.
    pub timeout: Duration,
    /// Longest reuse of an active result.
    pub cache: Duration,
    /// Reuse of an inactive result.
    pub inactive_cache: Duration,
}

impl fmt::Debug for Introspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Introspection")
            .field("endpoint", &self.endpoint)
            .field("client_id", &self.client_id)
            .field("client_secret", &"***")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Bearer-token settings shared by every provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// The largest `Authorization` value accepted, in bytes.
    pub max_bytes: usize,
    /// Whether `?access_token=` is accepted.
    pub allow_query: bool,
    /// Identity headers set upstream.
    pub forward: Forward,
}

/// Header names for the identity forwarded upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Header for the client id.
    pub client_id: Option<String>,
    /// Header for the subject.
    pub subject: Option<String>,
    /// Header for the scopes.
    pub scopes: Option<String>,
    /// (claim, header) pairs.
    pub claims: Vec<(String, String)>,
}

impl Forward {
    /// Every header name Gatehouse may set, so that all are first removed.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        [&self.client_id, &self.subject, &self.scopes]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .chain(self.claims.iter().map(|(_, header)| header.as_str()))
    }
}

/// A route's test on one claim.
#[derive(Debug, Clone)]
pub struct ClaimRule {
    /// The claim's name.
    pub claim: String,
    /// What its value must satisfy.
    pub test: ClaimTest,
}

/// What a claim's value must satisfy.
#[derive(Debug, Clone)]
pub enum ClaimTest {
    /// Exactly this.
    Equals(String),
    /// One of these.
    OneOf(Vec<String>),
    /// A whole match of this expression.
    Pattern(regex::Regex),
}

// === compiling ===

/// The providers from `providers:` and the `provider:` shorthand.
pub(super) fn compile_providers(
    single: Option<ProviderSection>,
    many: Option<Spanned<Vec<ProviderSection>>>,
    problems: &mut Problems,
) -> Vec<Provider> {
    let many = many.unwrap_or_else(|| unplaced(Vec::new()));
    if single.is_some() && !many.value.is_empty() {
        let message = "use either provider or providers, not both";
        problems.add(Some(&many.referenced), "providers", message);
    }

    let sections: Vec<(String, ProviderSection)> = match single {
        Some(section) => vec![("provider".to_owned(), section)],
        None => many
            .value
            .into_iter()
            .enumerate()
            .map(|(index, section)| (format!("providers[{index}]"), section))
            .collect(),
    };
    if sections.is_empty() {
        let message = "at least one provider is required";
        problems.add(Some(&many.referenced), "providers", message);
    }

    let mut providers: Vec<Provider> = Vec::new();
    let mut introspecting = false;
    for (key, section) in sections {
        if providers.iter().any(|p| p.issuer == section.issuer.value) {
            let message = "another provider has the same issuer";
            problems.add(
                Some(&section.issuer.referenced),
                format!("{key}.issuer"),
                message,
            );
        }

        // TODO: route opaque tokens to one of several introspecting providers
        // (by a route setting); until then only one provider may introspect.
        if let Some(introspection) = &section.introspection {
            if introspecting {
                let message = "only one provider may have introspection";
                let at = format!("{key}.introspection");
                problems.add(Some(&introspection.referenced), at, message);
            }
            introspecting = true;
        }
        providers.push(compile_provider(&key, section, problems));
    }
    providers
}

fn compile_provider(key: &str, raw: ProviderSection, problems: &mut Problems) -> Provider {
    let at = |field: &str| format!("{key}.{field}");

    check_url(&raw.issuer, &["http", "https"], &at("issuer"), problems);
    if let Some(jwks_uri) = &raw.jwks_uri {
        check_url(jwks_uri, &["http", "https"], &at("jwks_uri"), problems);
    }
    if raw.audiences.value.is_empty() {
        let message = "at least one audience is required";
        problems.add(Some(&raw.audiences.referenced), at("audiences"), message);
    }

    // Two keys: the line is min_refresh_seconds', or max's when min is the
    // default.
    let (min_refresh, max_refresh) = (&raw.min_refresh_seconds, &raw.max_refresh_seconds);
    if min_refresh.value == 0 || min_refresh.value > max_refresh.value {
        let message = "must be at least 1 and at most max_refresh_seconds";
        let location = placed(&min_refresh.referenced).unwrap_or(&max_refresh.referenced);
        problems.add(Some(location), at("min_refresh_seconds"), message);
    } else if let Some(refresh) = &raw.refresh_seconds
        && (refresh.value < min_refresh.value || refresh.value > max_refresh.value)
    {
        // The period is clamped into the bounds like any `max-age`, so one
        // written outside them would silently mean another period.
        let message = "must be between min_refresh_seconds and max_refresh_seconds";
        problems.add(Some(&refresh.referenced), at("refresh_seconds"), message);
    }

    // The time checks compute `now - leeway`; a bound keeps that sane and
    // keeps a typo from accepting tokens long expired.
    let leeway = &raw.leeway_seconds;
    if leeway.value > MAX_LEEWAY_SECONDS {
        let message = format!("must be between 0 and {MAX_LEEWAY_SECONDS}");
        problems.add(Some(&leeway.referenced), at("leeway_seconds"), message);
    }

    // Zero would let every token with an unknown `kid` cause a fetch.
    let refetch = &raw.min_refetch_seconds;
    if refetch.value == 0 {
        let message = "must be at least 1";
        problems.add(
            Some(&refetch.referenced),
            at("min_refetch_seconds"),
            message,
        );
    }

    // Inside a Check, an unknown `kid` costs up to two fetches (discovery,
    // then the JWKS) and an opaque token one introspection call; each must
    // end before Envoy's 1 s ext_authz timeout so the answer is Gatehouse's.
    let fetch_timeout = &raw.fetch_timeout_ms;
    if fetch_timeout.value == 0 || fetch_timeout.value > MAX_FETCH_TIMEOUT_MS {
        let message = format!("must be between 1 and {MAX_FETCH_TIMEOUT_MS}");
        let location = Some(&fetch_timeout.referenced);
        problems.add(location, at("fetch_timeout_ms"), message);
    }
    if let Some(introspection) = &raw.introspection {
        let timeout = &introspection.value.timeout_ms;
        if timeout.value == 0 || timeout.value > MAX_INTROSPECTION_MS {
            let message = format!("must be between 1 and {MAX_INTROSPECTION_MS}");
            let location = placed(&timeout.referenced).unwrap_or(&introspection.referenced);
            problems.add(Some(location), at("introspection.timeout_ms"), message);
        }
    }

    let mut algorithms = Vec::new();
    for (index, alg) in raw.algorithms.iter().enumerate() {
        // A shared-secret algorithm is only safe with a secret configured
        // here: the JWKS is public, so its keys never verify HMAC tokens.
        if is_hmac(alg.value) && raw.hmac_secret.is_none() {
            let message = "HMAC algorithms need hmac_secret";
            problems.add(
                Some(&alg.referenced),
                at(&format!("algorithms[{index}]")),
                message,
            );
        }
        algorithms.push(alg.value);
    }
    if algorithms.is_empty() {
        use Algorithm::*;
        algorithms = vec![
            RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA,
        ];
    }
    // With only HMAC algorithms the secret is the whole key: nothing is
    // fetched, so a JWKS or discovery setting would be dead weight.
    let hmac_only = !raw.algorithms.is_empty() && algorithms.iter().copied().all(is_hmac);
    if hmac_only {
        if let Some(jwks_uri) = &raw.jwks_uri {
            let message = "a provider with only HMAC algorithms fetches no keys: remove jwks_uri";
            problems.add(Some(&jwks_uri.referenced), at("jwks_uri"), message);
        }
        // The endpoint is missing: the line is that of its section.
        if let Some(introspection) = &raw.introspection
            && introspection.value.endpoint.is_none()
        {
            let message =
                "a provider with only HMAC algorithms does no discovery: set the endpoint";
            let location = Some(&introspection.referenced);
            problems.add(location, at("introspection.endpoint"), message);
        }
    }
    if let Some(secret) = &raw.hmac_secret {
        if secret.value.len() < 32 {
            let message = "must be at least 32 bytes";
            problems.add(Some(&secret.referenced), at("hmac_secret"), message);
        }
        if !algorithms.iter().copied().any(is_hmac) {
            let message = "list the HMAC algorithms to accept in algorithms";
            problems.add(Some(&secret.referenced), at("hmac_secret"), message);
        }
    }

    let introspection = raw.introspection.map(|section| {
        let section = section.value;
        if let Some(endpoint) = &section.endpoint {
            let key = at("introspection.endpoint");
            check_url(endpoint, &["http", "https"], &key, problems);
        }
        let audiences = if section.audiences.is_empty() {
            raw.audiences.value.clone()
        } else {
            section.audiences
        };
        Introspection {
            endpoint: section.endpoint.map(|endpoint| endpoint.value),
            client_id: section.client_id,
            client_secret: section.client_secret,
            audiences,
            timeout: Duration::from_millis(section.timeout_ms.value),
            cache: Duration::from_secs(section.cache_seconds),
            inactive_cache: Duration::from_secs(section.inactive_cache_seconds),
        }
    });

    let bounds = (
        Duration::from_secs(raw.min_refresh_seconds.value.max(1)),
        Duration::from_secs(raw.max_refresh_seconds.value.max(1)),
    );
    let refresh = match &raw.refresh_seconds {
        Some(refresh) => Duration::from_secs(refresh.value),
        None => DEFAULT_REFRESH.max(bounds.0).min(bounds.1),
    };
    Provider {
        issuer: raw.issuer.value,
        audiences: raw.audiences.value,
        jwks_uri: raw.jwks_uri.map(|uri| uri.value),
        leeway: Duration::from_secs(raw.leeway_seconds.value.min(MAX_LEEWAY_SECONDS)),
        fetch_timeout: Duration::from_millis(raw.fetch_timeout_ms.value),
        refresh,
        refresh_bounds: bounds,
        min_refetch: Duration::from_secs(raw.min_refetch_seconds.value.max(1)),
        algorithms,
        hmac_secret: raw.hmac_secret.map(|secret| secret.value),
        required_claims: raw.required_claims,
        introspection,
    }
}

impl Provider {
    /// Whether tokens are verified with keys from a JWKS: false only when
    /// every accepted algorithm is HMAC, whose key is the configured secret.
    pub fn uses_jwks(&self) -> bool {
        !self.algorithms.iter().copied().all(is_hmac)
    }
}

/// Whether `alg` is a shared-secret algorithm.
pub fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// The `tokens:` section.
pub(super) fn compile_tokens(raw: TokensSection, problems: &mut Problems) -> Tokens {
    if raw.max_bytes.value < 64 {
        let location = Some(&raw.max_bytes.referenced);
        problems.add(location, "tokens.max_bytes", "must be at least 64");
    }

    // Each header name with its key, in the order `Forward::names` gives.
    let section = raw.forward;
    let fixed = [
        ("client_id", section.client_id),
        ("subject", section.subject),
        ("scopes", section.scopes),
    ];
    let mut named: Vec<(String, Spanned<String>)> = fixed
        .into_iter()
        .filter_map(|(field, name)| Some((format!("tokens.forward.{field}"), name?)))
        .collect();
    let claims: Vec<(String, Spanned<String>)> = section.claims.into_iter().collect();
    for (claim, name) in &claims {
        named.push((format!("tokens.forward.claims.{claim}"), name.clone()));
    }

    let mut seen = std::collections::HashSet::new();
    for (key, spanned) in &named {
        let (name, location) = (spanned.value.as_str(), Some(&spanned.referenced));
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            let message = format!("{name:?} must be a lower-case header name (a-z, 0-9, -)");
            problems.add(location, key, message);
        }
        if matches!(name, "authorization" | "host" | "cookie") || name.starts_with(':') {
            problems.add(location, key, format!("{name:?} cannot be forwarded"));
        }
        if !seen.insert(name.to_owned()) {
            problems.add(location, key, format!("{name:?} is used twice"));
        }
    }

    let header = |field: &str| {
        let key = format!("tokens.forward.{field}");
        named
            .iter()
            .find(|(named, _)| *named == key)
            .map(|(_, name)| name.value.clone())
    };
    let forward = Forward {
        client_id: header("client_id"),
        subject: header("subject"),
        scopes: header("scopes"),
        claims: claims
            .into_iter()
            .map(|(claim, name)| (claim, name.value))
            .collect(),
    };
    Tokens {
        max_bytes: raw.max_bytes.value,
        allow_query: raw.allow_query,
        forward,
    }
}

/// A route's claim conditions.
pub(super) fn compile_claims(
    route_key: &str,
    raw: Vec<ClaimSection>,
    problems: &mut Problems,
) -> Vec<ClaimRule> {
    let mut rules = Vec::new();

    for (index, section) in raw.into_iter().enumerate() {
        let key = format!("{route_key}.claims[{index}]");
        let at = Some(&section.claim.referenced);

        // Checked as written, so that the message speaks of the user's
        // text; then anchored so that `pattern` describes the whole value.
        let pattern = match section.pattern.as_deref().map(regex::Regex::new) {
            Some(Err(err)) => {
                problems.add(at, format!("{key}.pattern"), regex_problem(&err));
                continue;
            }
            Some(Ok(_)) => section
                .pattern
                .and_then(|pattern| regex::Regex::new(&format!("^(?:{pattern})$")).ok()),
            None => None,
        };
        let tests = [
            section.equals.map(ClaimTest::Equals),
            section.one_of.map(ClaimTest::OneOf),
            pattern.map(ClaimTest::Pattern),
        ];
        let mut tests: Vec<ClaimTest> = tests.into_iter().flatten().collect();

        if tests.len() != 1 {
            problems.add(at, key, "needs exactly one of equals, one_of, pattern");
            continue;
        }
        rules.push(ClaimRule {
            claim: section.claim.value,
            test: tests.remove(0),
        });
    }
    rules
}

/// The `regex` crate's reason, without the pattern drawn over several
/// lines above it.
fn regex_problem(err: &regex::Error) -> String {
    let text = err.to_string();
    let reason = text.lines().last().unwrap_or_default().trim();
    let reason = reason.strip_prefix("error: ").unwrap_or(reason);
    format!("not a valid regular expression: {reason}")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    const ROUTES: &str = "
routes:
  - name: vehicles
    prefix: /vehicles
    scopes: [vehicles:read]
";

    fn load(text: &str) -> Result<Config, String> {
        Config::from_yaml(Path::new("g.yaml"), text, HashMap::new()).map_err(|e| e.to_string())
    }

    fn problems(text: &str) -> String {
        load(text).expect_err("expected the file to be refused")
    }

    #[test]
    fn several_providers_with_introspection_and_token_settings() {
        let text = format!(
            "
providers:
  - issuer: https://a.example
    audiences: [api]
    jwks_uri: https://a.example/keys
    algorithms: [ES256]
    required_claims: [sub]
  - issuer: https://b.example
    audiences: [api]
    min_refresh_seconds: 5
    max_refresh_seconds: 60
    introspection:
      client_id: gatehouse
      client_secret: s3cret
      audiences: [opaque]
tokens:
  max_bytes: 4096
  allow_query: true
  forward:
    subject: null
    claims: {{tenant: x-tenant}}
{ROUTES}  - name: both
    prefix: /both
    tokens: [jwt, opaque]
    any_scopes: [a, b]
    claims:
      - claim: tenant
        pattern: 'acme|globex'
"
        );
        let config = load(&text).expect("valid");

        assert_eq!(config.providers.len(), 2);
        assert_eq!(config.providers[0].algorithms, [Algorithm::ES256]);
        assert_eq!(config.providers[0].required_claims, ["sub"]);
        let introspection = config.providers[1].introspection.as_ref().expect("set");
        assert_eq!(introspection.audiences, ["opaque"]);
        assert!(!format!("{:?}", config.providers[1]).contains("s3cret"));
        assert_eq!(config.tokens.max_bytes, 4096);
        assert!(config.tokens.allow_query);
        let names: Vec<&str> = config.tokens.forward.names().collect();
        assert_eq!(
            names,
            ["x-gatehouse-client-id", "x-gatehouse-scopes", "x-tenant"]
        );
        let both = config.route("both").expect("route");
        assert_eq!(both.token_kinds, [TokenKind::Jwt, TokenKind::Opaque]);
        assert!(matches!(&both.claims[0].test, ClaimTest::Pattern(re) if !re.is_match("acme2")));
    }

    #[test]
    fn leeway_and_the_refetch_throttle_are_bounded() {
        let provider = |extra: &str| {
            format!("provider:\n  issuer: https://a.example\n  audiences: [api]\n{extra}{ROUTES}")
        };

        let err = problems(&provider(
            "  leeway_seconds: 301\n  min_refetch_seconds: 0\n",
        ));
        assert!(
            err.contains("g.yaml:4: provider.leeway_seconds: must be between 0 and 300"),
            "{err}"
        );
        assert!(
            err.contains("g.yaml:5: provider.min_refetch_seconds: must be at least 1"),
            "{err}"
        );

        let config = load(&provider(
            "  leeway_seconds: 300\n  min_refetch_seconds: 1\n",
        ))
        .expect("the bounds themselves are valid");
        assert_eq!(config.providers[0].leeway, Duration::from_secs(300));
        assert_eq!(config.providers[0].min_refetch, Duration::from_secs(1));

        let defaults = load(&provider("")).expect("valid");
        assert_eq!(defaults.providers[0].leeway, Duration::from_secs(30));
        assert_eq!(defaults.providers[0].min_refetch, Duration::from_secs(10));
    }

    #[test]
    fn the_refresh_period_must_lie_within_its_bounds() {
        let provider = |extra: &str| {
            format!("provider:\n  issuer: https://a.example\n  audiences: [api]\n{extra}{ROUTES}")
        };
        let expected = "provider.refresh_seconds: must be between min_refresh_seconds and \
                        max_refresh_seconds";

        // Below the default lower bound (30 s), and above a configured upper one.
        let below = problems(&provider("  refresh_seconds: 10\n"));
        assert!(below.contains(&format!("g.yaml:4: {expected}")), "{below}");
        let above = problems(&provider(
            "  max_refresh_seconds: 60\n  refresh_seconds: 61\n",
        ));
        assert!(above.contains(&format!("g.yaml:5: {expected}")), "{above}");

        let config = load(&provider(
            "  min_refresh_seconds: 5\n  max_refresh_seconds: 60\n  refresh_seconds: 5\n",
        ))
        .expect("a period on a bound is valid");
        assert_eq!(config.providers[0].refresh, Duration::from_secs(5));

        // Unwritten, the default (300 s) moves into the bounds instead.
        let config = load(&provider("  max_refresh_seconds: 60\n")).expect("valid");
        assert_eq!(config.providers[0].refresh, Duration::from_secs(60));
        let config = load(&provider("")).expect("valid");
        assert_eq!(config.providers[0].refresh, Duration::from_secs(300));
    }

    #[test]
    fn a_provider_with_only_hmac_algorithms_needs_no_jwks() {
        let secret = "a-shared-secret-of-at-least-32-bytes!";
        let provider = |algorithms: &str, extra: &str| {
            format!(
                "provider:\n  issuer: https://a.example\n  audiences: [api]\n  \
                 algorithms: {algorithms}\n  hmac_secret: {secret}\n{extra}{ROUTES}"
            )
        };

        let config = load(&provider("[HS256, HS512]", "")).expect("valid without jwks_uri");
        assert!(!config.providers[0].uses_jwks());
        let mixed = load(&provider("[HS256, RS256]", "")).expect("valid");
        assert!(mixed.providers[0].uses_jwks(), "RS256 still needs a JWKS");

        let err = problems(&provider("[HS256]", "  jwks_uri: https://a.example/keys\n"));
        assert!(
            err.contains("g.yaml:6: provider.jwks_uri: a provider with only HMAC algorithms"),
            "{err}"
        );
        let introspection = "  introspection:\n    client_id: g\n    client_secret: s\n";
        let err = problems(&provider("[HS256]", introspection));
        assert!(
            err.contains("provider.introspection.endpoint: a provider with only HMAC"),
            "{err}"
        );
        let endpoint = format!("{introspection}    endpoint: https://a.example/introspect\n");
        load(&provider("[HS256]", &endpoint)).expect("an explicit endpoint needs no discovery");
        load(&provider(
            "[HS256, RS256]",
            "  jwks_uri: https://a.example/keys\n",
        ))
        .expect("a mixed provider may name its JWKS");
    }

    #[test]
    fn bad_provider_and_route_settings_are_named() {
        let provider = "provider:\n  issuer: https://a.example\n  audiences: [api]\n";
        for (extra, expected) in [
            (
                "  hmac_secret: short\n  algorithms: [HS256]\n",
                "provider.hmac_secret",
            ),
            ("  min_refresh_seconds: 0\n", "provider.min_refresh_seconds"),
            (
                "tokens:\n  forward:\n    client_id: Bad_Name\n",
                "tokens.forward",
            ),
            (
                "tokens:\n  forward:\n    subject: x-gatehouse-client-id\n",
                "used twice",
            ),
        ] {
            let err = problems(&format!("{provider}{extra}{ROUTES}"));
            assert!(err.contains(expected), "{expected}: {err}");
        }

        let opaque = format!("{provider}{ROUTES}    tokens: [opaque]\n");
        assert!(problems(&opaque).contains("no provider has introspection"));

        let pattern =
            format!("{provider}{ROUTES}    claims:\n      - claim: t\n        pattern: '('\n");
        assert!(problems(&pattern).contains("routes[0].claims[0].pattern"));

        let two = format!(
            "{provider}{ROUTES}    claims:\n      - {{claim: t, equals: a, one_of: [b]}}\n"
        );
        assert!(problems(&two).contains("exactly one of"));

        let both = format!(
            "{provider}providers:\n  - issuer: https://b.example\n    audiences: [x]\n{ROUTES}"
        );
        assert!(problems(&both).contains("either provider or providers"));
        assert!(problems(ROUTES).contains("at least one provider"));
    }
}
