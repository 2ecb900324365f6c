//! The configuration file's format, exactly as written in YAML.
//!
//! Every struct denies unknown keys so that a typo is an error and not a
//! silently ignored setting. Nothing outside `config` reads these types: the
//! rest of the program reads the compiled form in [`super::Config`].

use std::cmp::Ordering;
use std::collections::BTreeMap;

use std::net::SocketAddr;
use std::num::NonZeroU64;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use super::providers::{ClaimSection, ProviderSection, TokenKind, TokensSection};
use super::strict::strict;
use crate::reshape::Step;

/// A value that no line of the file gave: a default.
pub(super) fn unplaced<T>(value: T) -> Spanned<T> {
    Spanned::new(value, Location::UNKNOWN, Location::UNKNOWN)
}

/// A map key as written, with its place in the file, so that a rule about
/// the name can point at it; ordered by its text.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct Name(pub Spanned<String>);

impl Name {
    /// The key's text.
    pub fn text(&self) -> &str {
        &self.0.value
    }

    /// Where the key is written.
    pub fn location(&self) -> &Location {
        &self.0.referenced
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        self.text() == other.text()
    }
}

impl Eq for Name {}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Self) -> Ordering {
        self.text().cmp(other.text())
    }
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Where Gatehouse listens and how it stops.
    #[serde(default)]
    pub server: ServerSection,

    /// The OAuth2 provider that issues the access tokens (one provider).
    #[serde(default)]
    pub provider: Option<ProviderSection>,

    /// The OAuth2 providers whose tokens are accepted, matched by `iss`.
    #[serde(default)]
    pub providers: Option<Spanned<Vec<ProviderSection>>>,

    /// Bearer-token settings and the identity headers forwarded upstream.
    #[serde(default)]
    pub tokens: TokensSection,

    /// The shared rate-limit store; without it counters live in this process.
    #[serde(default)]
    pub redis: Option<RedisSection>,

    /// The in-process rate-limit store, used when there is no `redis`.
    #[serde(default)]
    pub memory_store: Option<MemoryStoreSection>,

    /// Named rate-limit policies that routes refer to.
    #[serde(default)]
    pub rate_limits: BTreeMap<Name, RateLimitSection>,

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

    /// Where composite routes fetch their parts.
    #[serde(default)]
    pub composite: Option<CompositeSection>,

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
    pub listen: Spanned<SocketAddr>,

    /// The admin API's address; loopback unless there is a reason not to.
    pub admin_listen: Spanned<SocketAddr>,

    /// Where Prometheus scrapes `/metrics` (plain HTTP, its own listener);
    /// absent, no metrics are served. Must differ from both other addresses.
    pub metrics_listen: Option<Spanned<SocketAddr>>,

    /// How long requests are still answered after SIGTERM or SIGINT, in
    /// seconds (0 to 300); a second signal ends the drain at once.
    #[serde(deserialize_with = "strict")]
    pub drain_seconds: Spanned<u64>,

    /// `text` for people, `json` for log collectors.
    pub log_format: LogFormat,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: unplaced(SocketAddr::from(([127, 0, 0, 1], 50051))),
            admin_listen: unplaced(SocketAddr::from(([127, 0, 0, 1], 50052))),
            metrics_listen: None,
            drain_seconds: unplaced(5),
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

/// `redis:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    /// A `redis://` URL.
    pub url: Spanned<String>,

    /// Budget for one Redis round trip, in milliseconds (default 20, at
    /// most 500); with the slowest token check it must fit in a Check.
    #[serde(default, deserialize_with = "strict")]
    pub timeout_ms: Option<Spanned<u64>>,

    /// Prefix of every key Gatehouse writes.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,

    /// `url` is one node of a Redis Cluster, which tells of the others.
    #[serde(default, deserialize_with = "strict")]
    pub cluster: bool,
}

fn default_key_prefix() -> String {
    "gatehouse".to_owned()
}

/// `memory_store:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryStoreSection {
    /// How many clients' counters (one entry per client, policy, route
    /// group and tier) are kept at once (default 100000, 1000 to 10000000).
    /// Memory stays bounded whatever clients send; once full, the entries
    /// least worth keeping are dropped and counted.
    #[serde(default)]
    pub max_entries: Option<Spanned<u64>>,
}

/// One entry of `rate_limits:`.
///
/// A policy holds one limit written inline (`requests`, `window_seconds`,
/// `burst`) or several under `limits`, all enforced together.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    /// Requests allowed per window, for a policy with one limit.
    #[serde(default, deserialize_with = "strict")]
    pub requests: Option<Spanned<NonZeroU64>>,

    /// The window's length in seconds, for a policy with one limit.
    #[serde(default, deserialize_with = "strict")]
    pub window_seconds: Option<Spanned<NonZeroU64>>,

    /// Requests allowed at once (GCRA only), for a policy with one limit.
    #[serde(default, deserialize_with = "strict")]
    pub burst: Option<Spanned<NonZeroU64>>,

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
    #[serde(default, deserialize_with = "strict")]
    pub shadow: bool,

    /// Also send `X-RateLimit-Limit`, `-Remaining` and `-Reset`.
    #[serde(default, deserialize_with = "strict")]
    pub x_ratelimit_headers: bool,

    /// Other numbers for clients on a named tier (`clients.ID.tier`).
    #[serde(default)]
    pub tiers: BTreeMap<Name, TierSection>,

    /// A token claim naming the client's tier, for clients the config puts
    /// on no tier.
    #[serde(default)]
    pub tier_claim: Option<String>,
}

/// One limit of a policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSection {
    /// Requests allowed per window.
    #[serde(deserialize_with = "strict")]
    pub requests: NonZeroU64,

    /// The window's length in seconds.
    #[serde(deserialize_with = "strict")]
    pub window_seconds: NonZeroU64,

    /// Requests allowed at once (GCRA only); `requests` when absent.
    #[serde(default, deserialize_with = "strict")]
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
    /// Bodies longer than this pass through unchanged, in bytes; for gzip
    /// bodies this bounds both the encoded and the decoded size.
    #[serde(deserialize_with = "strict")]
    pub max_body_bytes: u64,

    /// The request header a client may send to pick one of its allowed
    /// profiles; `None` turns picking by header off.
    pub profile_header: Option<Spanned<String>>,

    /// A token claim naming the client's profile; `None` ignores claims.
    pub profile_claim: Option<String>,

    /// The query parameter that asks for a sparse fieldset.
    pub fields_param: Spanned<String>,
}

impl Default for ReshapeSection {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            profile_header: Some(unplaced("x-client-type".to_owned())),
            profile_claim: None,
            fields_param: unplaced("fields".to_owned()),
        }
    }
}

/// `composite:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositeSection {
    /// Base URL of the loopback-only Envoy listener the parts are fetched
    /// through, so they get Envoy's clusters, TLS and retries.
    pub upstream: Spanned<String>,
}

/// `routes[].composite:` the route is answered by Gatehouse from several
/// services' JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCompositeSection {
    /// `keyed` puts each part under its key; `top_level` merges the parts'
    /// top-level fields, earlier parts winning.
    #[serde(default)]
    pub merge: MergeMode,

    /// The parts, fetched in parallel.
    pub parts: Spanned<Vec<PartSection>>,
}

/// How a composite's parts become one body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMode {
    /// `{"<key>": <part>, ...}`.
    #[default]
    Keyed,
    /// The parts' fields side by side in one object.
    TopLevel,
}

/// One part of a composite.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartSection {
    /// The part's name: its key in a keyed merge, and in failure reports.
    pub key: Spanned<String>,

    /// Path and query on the composite upstream.
    pub path: Spanned<String>,

    /// How long this part may take, in milliseconds.
    #[serde(default = "default_part_timeout", deserialize_with = "strict")]
    pub timeout_ms: Spanned<u64>,
}

fn default_part_timeout() -> Spanned<u64> {
    unplaced(300)
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

    /// Whether 4xx and 5xx JSON bodies are reshaped too; by default an
    /// upstream's error passes unchanged.
    #[serde(default, deserialize_with = "strict")]
    pub reshape_errors: bool,
}

/// One entry of `clients:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    /// The profile this client's responses are shaped by.
    #[serde(default)]
    pub profile: Option<Spanned<String>>,

    /// Other profiles the client may pick with the profile header.
    #[serde(default)]
    pub allowed_profiles: Vec<Spanned<String>>,

    /// The rate-limit tier this client is on.
    #[serde(default)]
    pub tier: Option<Spanned<String>>,
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
    #[serde(default, deserialize_with = "strict")]
    pub public: bool,

    /// Scopes the token must all carry.
    #[serde(default)]
    pub scopes: Vec<String>,

    /// Scopes of which the token must carry at least one.
    #[serde(default)]
    pub any_scopes: Vec<String>,

    /// Conditions on the token's claims, all of which must hold.
    #[serde(default)]
    pub claims: Vec<ClaimSection>,

    /// The kinds of token accepted: `jwt`, `opaque`; `[jwt]` when absent.
    #[serde(default)]
    pub tokens: Vec<Spanned<TokenKind>>,

    /// The rate-limit policy that applies, by name.
    #[serde(default)]
    pub rate_limit: Option<Spanned<String>>,

    /// What one request on this route counts as.
    #[serde(default, deserialize_with = "strict")]
    pub rate_limit_cost: Option<Spanned<u64>>,

    /// Routes with the same group share counters; without one, a policy's
    /// counters are shared by every route that names it.
    #[serde(default)]
    pub rate_limit_group: Option<Spanned<String>>,

    /// The profile for clients that have none of their own.
    #[serde(default)]
    pub profile: Option<Spanned<String>>,

    /// Request headers changed on the way upstream.
    #[serde(default)]
    pub request_headers: RequestHeadersSection,

    /// Answer this route from several services (see `composite:`).
    #[serde(default)]
    pub composite: Option<RouteCompositeSection>,
}

/// `routes[].request_headers:` values may hold `{request_id}`, `{route}`,
/// `{client_id}` and `{profile}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestHeadersSection {
    /// Headers appended to any the request already has.
    #[serde(default)]
    pub add: Option<Spanned<BTreeMap<String, String>>>,

    /// Headers that replace any the request already has.
    #[serde(default)]
    pub set: Option<Spanned<BTreeMap<String, String>>>,

    /// Headers removed from the request.
    #[serde(default)]
    pub remove: Vec<Spanned<String>>,
}
