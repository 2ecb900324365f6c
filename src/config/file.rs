//! The configuration file's format, exactly as written in YAML.
//!
//! Every struct denies unknown keys so that a typo is an error and not a
//! silently ignored setting. Nothing outside `config` reads these types: the
//! rest of the program reads the compiled form in [`super::Config`].

use std::collections::BTreeMap;

use std::net::SocketAddr;
use std::num::NonZeroU64;

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::reshape::Step;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where Gatehouse listens and how it stops.
    #[serde(default)]
    pub server: ServerSection,

    /// The OAuth2 provider that issues the access tokens.
    pub provider: ProviderSection,

    /// The shared rate-limit store; without it counters live in this process.
    #[serde(default)]
    pub redis: Option<RedisSection>,

    /// Named rate-limit policies that routes refer to.
    #[serde(default)]
    pub rate_limits: BTreeMap<String, RateLimitSection>,

    /// The request header in which Envoy passes the client address it
    /// established; public routes count per this address.
    #[serde(default)]
    pub client_address_header: Option<String>,

    /// Envoy's rate-limit service: descriptors and the policies they use.
    #[serde(default)]
    pub rate_limit_service: RateLimitServiceSection,

    /// Limits on the bodies that ext_proc reshapes.
    #[serde(default)]
    pub reshape: ReshapeSection,

    /// Named response shapes, each with the steps to apply per route.
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileSection>,

    /// Per-client settings, keyed by OAuth2 client id.
    #[serde(default)]
    pub clients: BTreeMap<String, ClientSection>,

    /// The routes, matched in order; the first match wins.
    pub routes: Vec<RouteSection>,
}

/// `server:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// The address Envoy calls for ext_authz and ext_proc.
    pub listen: SocketAddr,

    /// The admin API's address; loopback unless there is a reason not to.
    pub admin_listen: SocketAddr,

    /// How long requests are still answered after SIGTERM, in seconds.
    pub drain_seconds: u64,

    /// `text` for people, `json` for log collectors.
    pub log_format: LogFormat,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            drain_seconds: 5,
            log_format: LogFormat::Text,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `provider:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSection {
    /// The issuer URL; tokens must carry exactly this `iss`.
    pub issuer: Spanned<String>,

    /// Accepted audiences; a token's `aud` must contain one of them.
    pub audiences: Vec<String>,

    /// Where the signing keys are; found by OIDC discovery when absent.
    #[serde(default)]
    pub jwks_uri: Option<Spanned<String>>,

    /// Accepted clock skew for `exp`, `nbf` and `iat`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,

    /// Budget for one discovery or JWKS request, in milliseconds.
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout_ms: u64,

    /// How often the keys are refreshed in the background, in seconds.
    #[serde(default = "default_refresh")]
    pub refresh_seconds: u64,

    /// The minimum time between two refetches caused by an unknown `kid`, in seconds.
    #[serde(default = "default_refetch")]
    pub min_refetch_seconds: u64,

    /// Accepted signature algorithms; every asymmetric one when empty.
    #[serde(default)]
    pub algorithms: Vec<Spanned<Algorithm>>,
}

fn default_leeway() -> u64 {
    30
}

fn default_fetch_timeout() -> u64 {
    300
}

fn default_refresh() -> u64 {
    300
}

fn default_refetch() -> u64 {
    10
}

/// `redis:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    /// A `redis://` URL.
    pub url: Spanned<String>,

    /// Budget for one Redis round trip, in milliseconds.
    #[serde(default = "default_redis_timeout")]
    pub timeout_ms: u64,

    /// Prefix of every key Gatehouse writes.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,

    /// `url` is one node of a Redis Cluster, which tells of the others.
    #[serde(default)]
    pub cluster: bool,
}

fn default_redis_timeout() -> u64 {
    20
}

fn default_key_prefix() -> String {
    "gatehouse".to_owned()
}

/// One entry of `rate_limits:`.
///
/// A policy holds one limit written inline (`requests`, `window_seconds`,
/// `burst`) or several under `limits`, all enforced together.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    /// Requests allowed per window, for a policy with one limit.
    #[serde(default)]
    pub requests: Option<NonZeroU64>,

    /// The window's length in seconds, for a policy with one limit.
    #[serde(default)]
    pub window_seconds: Option<NonZeroU64>,

    /// Requests allowed at once (GCRA only), for a policy with one limit.
    #[serde(default)]
    pub burst: Option<NonZeroU64>,

    /// Several limits, all enforced together.
    #[serde(default)]
    pub limits: Option<Spanned<Vec<LimitSection>>>,

    /// How requests are counted.
    #[serde(default)]
    pub algorithm: LimitAlgorithm,

    /// What happens when the store cannot answer in time.
    #[serde(default)]
    pub failure_mode: FailureMode,

    /// Count and report, but never refuse.
    #[serde(default)]
    pub shadow: bool,

    /// Also send `X-RateLimit-Limit`, `-Remaining` and `-Reset`.
    #[serde(default)]
    pub x_ratelimit_headers: bool,

    /// Other numbers for clients on a named tier (`clients.ID.tier`).
    #[serde(default)]
    pub tiers: BTreeMap<String, TierSection>,
}

/// One limit of a policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSection {
    /// Requests allowed per window.
    pub requests: NonZeroU64,

    /// The window's length in seconds.
    pub window_seconds: NonZeroU64,

    /// Requests allowed at once (GCRA only); `requests` when absent.
    #[serde(default)]
    pub burst: Option<NonZeroU64>,
}

/// A tier's own limits within a policy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSection {
    /// The limits for clients on this tier, replacing the policy's.
    pub limits: Spanned<Vec<LimitSection>>,
}

/// How a policy counts requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitAlgorithm {
    /// GCRA: a smooth rate with a burst, no window edges.
    #[default]
    Gcra,
    /// A fixed window that starts at a client's first request.
    FixedWindow,
}

/// One entry of `rate_limit_service.descriptors:` (Envoy's rate-limit API).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorSection {
    /// The domain Envoy's filter sends.
    pub domain: String,

    /// The descriptor's entries, in order.
    pub entries: Spanned<Vec<DescriptorEntrySection>>,

    /// The policy that counts matching descriptors, by name.
    pub rate_limit: Spanned<String>,
}

/// One entry of a descriptor.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorEntrySection {
    /// The entry's key.
    pub key: String,

    /// The value it must have; without it, each value counts separately.
    #[serde(default)]
    pub value: Option<String>,
}

/// `rate_limit_service:`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitServiceSection {
    /// Descriptors Gatehouse answers for, matched in order.
    #[serde(default)]
    pub descriptors: Vec<DescriptorSection>,
}

/// What a rate-limit policy does when its store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Allow the request, and log and count the failure.
    Open,
    /// Refuse the request with 503 and `Retry-After`.
    #[default]
    Closed,
}

/// `reshape:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReshapeSection {
    /// Bodies longer than this pass through unchanged, in bytes.
    pub max_body_bytes: u64,
}

impl Default for ReshapeSection {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// One entry of `profiles:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSection {
    /// What the profile is for, for people reading the file.
    #[serde(default)]
    pub description: Option<String>,

    /// Steps per route name; routes not listed are not reshaped.
    #[serde(default)]
    pub routes: BTreeMap<String, Spanned<Vec<Step>>>,
}

/// One entry of `clients:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    /// The profile this client's responses are shaped by.
    #[serde(default)]
    pub profile: Option<Spanned<String>>,

    /// The rate-limit tier this client is on.
    #[serde(default)]
    pub tier: Option<String>,
}

/// One entry of `routes:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// A name for logs, metrics and profiles; unique.
    pub name: Spanned<String>,

    /// The path prefix, matched on whole segments.
    pub prefix: Spanned<String>,

    /// Accepted methods; all when empty.
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,

    /// No token needed.
    #[serde(default)]
    pub public: bool,

    /// Scopes the token must all carry.
    #[serde(default)]
    pub scopes: Vec<String>,

    /// The rate-limit policy that applies, by name.
    #[serde(default)]
    pub rate_limit: Option<Spanned<String>>,

    /// What one request on this route counts as.
    #[serde(default)]
    pub rate_limit_cost: Option<Spanned<u64>>,

    /// Routes with the same group share counters; without one, a policy's
    /// counters are shared by every route that names it.
    #[serde(default)]
    pub rate_limit_group: Option<String>,

    /// The profile for clients that have none of their own.
    #[serde(default)]
    pub profile: Option<Spanned<String>>,
}
