//! Configuration: the YAML file, `${VAR}` expansion, validation, and the
//! compiled form that the rest of Gatehouse reads.
//!
//! Loading reports every problem it finds with the file, line and key at
//! fault, so that `gatehouse check-config` can be used in CI before a rollout.

mod file;
mod parse;
mod providers;
pub(crate) mod strict;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_messages;
#[cfg(test)]
mod tests_ratelimit;
mod unexpanded;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_saphyr::{Location, Spanned};
use sha2::{Digest, Sha256};

pub use file::{FailureMode, LimitAlgorithm, LogFormat, MergeMode};
use file::{FileConfig, RouteSection};
pub use providers::{
    ClaimRule, ClaimTest, Forward, Introspection, Provider, TokenKind, Tokens, is_hmac,
};

use crate::reshape::Step;

/// The most requests or burst one limit may name.
const MAX_REQUESTS: u64 = 1_000_000_000;

/// The longest window one limit may have.
const MAX_WINDOW_SECONDS: u64 = 366 * 24 * 3600;

/// GCRA's horizon (burst × window / requests: how long a whole burst takes
/// to come back) is at most this, so the scripts' microsecond arithmetic
/// stays exact in Lua's doubles.
const MAX_REFILL_SECONDS: u64 = 10 * 366 * 24 * 3600;

/// A configuration larger than this is refused before it is parsed.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Envoy's ext_authz timeout, `grpc_service.timeout` in `envoy/envoy.yaml`:
/// every budget a Check may spend must fit in it, so that a slow part is
/// answered by Gatehouse's own rule and not by Envoy giving up.
pub const EXT_AUTHZ_TIMEOUT: Duration = Duration::from_millis(1000);

/// What a Check keeps of [`EXT_AUTHZ_TIMEOUT`] for its own work and the hop
/// from Envoy, beyond the budgets of its calls.
const CHECK_HEADROOM: Duration = Duration::from_millis(100);

/// The default budget of one Redis call.
const DEFAULT_REDIS_TIMEOUT_MS: u64 = 20;

/// The longest budget one Redis call may have: half of Envoy's ext_authz
/// timeout, leaving the other half to the token checks.
const MAX_REDIS_TIMEOUT_MS: u64 = 500;

/// How many entries the in-memory rate-limit store keeps by default: about
/// 70 MB, at roughly 0.7 KB an entry.
pub const DEFAULT_MEMORY_ENTRIES: u64 = 100_000;

/// The fewest entries the in-memory store may keep: fewer would let modest
/// traffic push out counters that are still running.
const MIN_MEMORY_ENTRIES: u64 = 1_000;

/// The most entries the in-memory store may keep, about 7 GB.
const MAX_MEMORY_ENTRIES: u64 = 10_000_000;

/// Policy, tier and route group names are at most this long.
const MAX_NAME_CHARS: usize = 64;

/// The longest drain after SIGTERM or SIGINT: past five minutes a stop that
/// never ends looks the same as one that takes its time.
const MAX_DRAIN_SECONDS: u64 = 300;

/// The configuration in force, compiled and validated.
#[derive(Debug)]
pub struct Config {
    /// Short hex digest of the file's bytes, reported by the admin API.
    pub version: String,

    /// The file it was read from.
    pub path: PathBuf,

    /// When it was read.
    pub loaded_at: SystemTime,

    /// Listen addresses and shutdown behaviour.
    pub server: Server,

    /// The token issuers, each matched by `iss`.
    pub providers: Vec<Provider>,

    /// Bearer-token settings and forwarded identity headers.
    pub tokens: Tokens,

    /// The shared rate-limit store, if any.
    pub redis: Option<Redis>,

    /// The in-process store, used when `redis` is `None`.
    pub memory_store: MemoryStore,

    /// Limits on reshaped bodies.
    pub reshape: ReshapeLimits,

    /// Profiles by name.
    pub profiles: HashMap<String, Profile>,

    /// Per-client settings by client id.
    pub clients: HashMap<String, Client>,

    /// Routes in match order.
    pub routes: Vec<Route>,

    /// Descriptors that Envoy's rate-limit service API answers for.
    pub descriptors: Vec<Descriptor>,

    /// Settings that load but probably do not do what was meant;
    /// `check-config` prints them and `serve` logs them.
    pub warnings: Vec<Problem>,

    /// The header holding the client address Envoy established, lower case;
    /// the TCP peer Envoy reports is used when `None`.
    pub client_address_header: Option<String>,
}

/// Where Gatehouse listens and how it stops.
#[derive(Debug, Clone)]
pub struct Server {
    /// The address Envoy calls.
    pub listen: SocketAddr,
    /// The admin API's address.
    pub admin_listen: SocketAddr,
    /// Where `/metrics` is served; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// How long requests are still answered after SIGTERM.
    pub drain: Duration,
    /// Log line format.
    pub log_format: LogFormat,
}

/// The Redis that holds rate-limit counters.
#[derive(Clone)]
pub struct Redis {
    /// Connection URL; may hold a password, so `Debug` hides it.
    pub url: String,
    /// Budget for one round trip.
    pub timeout: Duration,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Whether `url` is a node of a Redis Cluster.
    pub cluster: bool,
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redis")
            .field("url", &redact_url(&self.url))
            .field("timeout", &self.timeout)
            .field("key_prefix", &self.key_prefix)
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// The in-process rate-limit store's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStore {
    /// Entries (one per client, policy, route group and tier) kept at once.
    pub max_entries: u64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MEMORY_ENTRIES,
        }
    }
}

/// A named rate-limit policy: limits that all apply to each client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitPolicy {
    /// The policy's name, used in keys, headers and bodies.
    pub name: String,
    /// How requests are counted.
    pub algorithm: LimitAlgorithm,
    /// The limits for clients on no tier, never empty.
    pub limits: Vec<Limit>,
    /// Limits by tier name, for clients on a tier.
    pub tiers: HashMap<String, Vec<Limit>>,
    /// What to do when the store fails.
    pub failure_mode: FailureMode,
    /// Count and report, but never refuse.
    pub shadow: bool,
    /// The token claim that names a client's tier, when the config names none.
    pub tier_claim: Option<String>,
    /// Also send the `X-RateLimit-*` headers.
    pub x_ratelimit_headers: bool,
}

impl RateLimitPolicy {
    /// The tier that applies and its limits: the client's tier when this
    /// policy defines it, else the policy's own limits (tier `None`).
    pub fn limits_for<'a>(&'a self, tier: Option<&'a str>) -> (Option<&'a str>, &'a [Limit]) {
        match tier.and_then(|tier| self.tiers.get_key_value(tier)) {
            Some((name, limits)) => (Some(name.as_str()), limits),
            None => (None, &self.limits),
        }
    }
}

/// `requests` per `window`, with up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Requests allowed per window.
    pub requests: u64,
    /// The window's length.
    pub window: Duration,
    /// Requests allowed at once (GCRA); equals `requests` for a fixed window.
    pub burst: u64,
}

/// How a route uses a policy.
#[derive(Debug, Clone)]
pub struct RouteLimit {
    /// The policy.
    pub policy: Arc<RateLimitPolicy>,
    /// What one request counts as.
    pub cost: u64,
    /// Counters are per group when set, else shared by the policy's routes.
    pub group: Option<String>,
}

/// A descriptor of Envoy's rate-limit API and the policy that counts it.
#[derive(Debug, Clone)]
pub struct Descriptor {
    /// The domain Envoy's filter sends.
    pub domain: String,
    /// Keys in order, each with the value it must have, if any.
    pub entries: Vec<(String, Option<String>)>,
    /// The policy.
    pub policy: Arc<RateLimitPolicy>,
}

/// Limits on what ext_proc reshapes, and how a profile is asked for.
#[derive(Debug, Clone)]
pub struct ReshapeLimits {
    /// Larger bodies pass through unchanged (encoded and decoded size).
    pub max_body_bytes: u64,
    /// The lower-case request header that picks among allowed profiles.
    pub profile_header: Option<String>,
    /// The token claim that names the client's profile.
    pub profile_claim: Option<String>,
    /// The query parameter holding a sparse fieldset.
    pub fields_param: String,
}

/// A named response shape.
#[derive(Debug, Clone)]
pub struct Profile {
    /// What the profile is for.
    pub description: Option<String>,
    /// Steps by route name.
    pub routes: HashMap<String, Arc<[Step]>>,
    /// Whether 4xx and 5xx bodies are reshaped too.
    pub reshape_errors: bool,
}

/// Per-client settings.
#[derive(Debug, Clone)]
pub struct Client {
    /// The client's own profile.
    pub profile: Option<String>,
    /// Other profiles the client may pick with the profile header.
    pub allowed_profiles: Vec<String>,
    /// The client's rate-limit tier.
    pub tier: Option<String>,
}

/// Request headers a route changes on the way upstream. Values may hold
/// the placeholders in [`HEADER_PLACEHOLDERS`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestHeaders {
    /// Appended to any existing value.
    pub add: Vec<(String, String)>,
    /// Replacing any existing value.
    pub set: Vec<(String, String)>,
    /// Removed.
    pub remove: Vec<String>,
}

/// What a `request_headers` value may refer to; each is replaced by the
/// request's value, and a header whose value ends up empty is not sent.
pub const HEADER_PLACEHOLDERS: [&str; 4] = ["{request_id}", "{route}", "{client_id}", "{profile}"];

/// Headers a route may not change: the token and what Envoy routes on. The
/// identity headers are guarded apart, see [`identity_header_use`].
const PROTECTED_HEADERS: [&str; 2] = ["authorization", "host"];

/// The reserved names a route may `set` (never `add` or `remove`): they
/// carry the route and profile Gatehouse chose, and a `set` replaces any
/// copy the client sent.
const ROUTE_SETTABLE_HEADERS: [&str; 2] = ["x-gatehouse-profile", "x-gatehouse-route"];

/// A compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Unique name.
    pub name: String,
    /// Path prefix without a trailing slash (`""` for the root route).
    pub prefix: String,
    /// Accepted methods, upper case; any when empty.
    pub methods: Vec<String>,
    /// No token needed.
    pub public: bool,
    /// Scopes the token must all carry.
    pub scopes: Vec<String>,
    /// Scopes of which the token must carry one; no condition when empty.
    pub any_scopes: Vec<String>,
    /// Conditions on claims, all of which must hold.
    pub claims: Vec<ClaimRule>,
    /// Token kinds accepted.
    pub token_kinds: Vec<TokenKind>,
    /// The rate limit that applies.
    pub rate_limit: Option<RouteLimit>,
    /// The profile for clients that have none of their own.
    pub profile: Option<String>,
    /// Request headers changed on the way upstream.
    pub request_headers: RequestHeaders,
    /// Set when Gatehouse answers the route from several services.
    pub composite: Option<Arc<Composite>>,
}

/// A route answered from several services' JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Composite {
    /// How the parts become one body.
    pub merge: MergeMode,
    /// The parts, fetched in parallel.
    pub parts: Vec<Part>,
    /// The longest part timeout: the whole composite's budget.
    pub budget: Duration,
}

/// One service call of a composite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Key in the merged body and in failure reports.
    pub key: String,
    /// The full URL on the composite upstream.
    pub url: String,
    /// How long the call may take.
    pub timeout: Duration,
    /// The path as configured, by which the route that serves the part on
    /// its own is found (see `shaping::part_steps`).
    pub path: String,
}

/// Composite parts may not take longer than this: Envoy's ext_proc
/// `max_message_timeout` in `envoy/envoy.yaml` must stay above it.
pub const MAX_PART_TIMEOUT: Duration = Duration::from_millis(1500);

impl Config {
    /// Reads, expands, validates and compiles the file at `path`.
    ///
    /// # Errors
    ///
    /// Every problem found, each with the file, line and key at fault.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_file(path)?;
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::from_yaml(path, &text, env)
    }

    /// Parses `text` as if read from `path`, expanding `${VAR}` from `env`.
    ///
    /// # Errors
    ///
    /// As for [`Config::load`].
    pub fn from_yaml(
        path: &Path,
        text: &str,
        env: HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let raw = parse::parse(path, text, env)?;
        let version = hex_digest(text.as_bytes());

        // A `${` the parser left as text is refused with the other problems.
        let unexpanded = unexpanded::scan(text).problems;
        compile(path, raw, version, unexpanded)
    }

    /// The route that `name` names, if any.
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|route| route.name == name)
    }

    /// The profile that `name` names, if any.
    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.get(name)
    }

    /// The warnings as `file:line: key: message`, to print or log.
    pub fn rendered_warnings(&self) -> Vec<String> {
        self.warnings
            .iter()
            .map(|warning| render_problem(&self.path, warning))
            .collect()
    }

    /// The reshape steps for a profile on a route, if that profile shapes it.
    pub fn steps(&self, profile: &str, route: &str) -> Option<Arc<[Step]>> {
        self.profiles.get(profile)?.routes.get(route).cloned()
    }
}

// === errors ===

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when known.
    pub line: Option<u64>,
    /// The key at fault, as a path such as `routes[2].rate_limit`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },

    /// The file is larger than any sensible configuration.
    #[error("{path}: file is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },

    /// The file was read but is not a valid configuration.
    #[error("{}", render_problems(path, problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found, in file order.
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|problem| render_problem(path, problem))
        .collect();
    lines.join("\n")
}

/// `file:line: key: message`, or `file: key: message` without a line.
fn render_problem(path: &Path, problem: &Problem) -> String {
    match problem.line {
        Some(line) => format!(
            "{}:{line}: {}: {}",
            path.display(),
            problem.key,
            problem.message
        ),
        None => format!("{}: {}: {}", path.display(), problem.key, problem.message),
    }
}

// === loading ===

fn read_file(path: &Path) -> Result<String, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };

    let too_large = || ConfigError::TooLarge {
        path: path.to_owned(),
    };

    // The size on record refuses an ordinary large file before it is read.
    let file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }

    // A device or a pipe reports no size (`/dev/zero`, a FIFO), so the read
    // itself stops one byte past the limit.
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_FILE_BYTES {
        return Err(too_large());
    }

    String::from_utf8(bytes).map_err(|err| {
        read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            err.utf8_error(),
        ))
    })
}

fn hex_digest(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest
        .iter()
        .take(8)
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Hides the password in a Redis URL for logs and `Debug`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

// === compiling ===

/// Collects problems while the file is compiled, so that all are reported.
struct Problems(Vec<Problem>);

impl Problems {
    fn add(
        &mut self,
        location: Option<&Location>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let line = location
            .map(|location| location.line())
            .filter(|line| *line > 0);
        self.0.push(Problem {
            line,
            key: key.into(),
            message: message.into(),
        });
    }
}

/// Compiles the parsed file; `found` holds problems found before this step.
fn compile(
    path: &Path,
    raw: FileConfig,
    version: String,
    found: Vec<Problem>,
) -> Result<Config, ConfigError> {
    let mut problems = Problems(found);

    let section = &raw.server;
    let server = Server {
        listen: section.listen.value,
        admin_listen: section.admin_listen.value,
        metrics_listen: section.metrics_listen.as_ref().map(|spanned| spanned.value),
        drain: Duration::from_secs(section.drain_seconds.value.min(MAX_DRAIN_SECONDS)),
        log_format: section.log_format,
    };
    if server.listen == server.admin_listen {
        // Two keys: the line is admin_listen's, or listen's when the admin
        // address is the default.
        let location =
            placed(&section.admin_listen.referenced).unwrap_or(&section.listen.referenced);
        let message = "must differ from server.listen";
        problems.add(Some(location), "server.admin_listen", message);
    }
    if section.drain_seconds.value > MAX_DRAIN_SECONDS {
        let message = format!("must be between 0 and {MAX_DRAIN_SECONDS}");
        let location = Some(&section.drain_seconds.referenced);
        problems.add(location, "server.drain_seconds", message);
    }
    if let Some(metrics) = &raw.server.metrics_listen
        && [server.listen, server.admin_listen].contains(&metrics.value)
    {
        problems.add(
            Some(&metrics.referenced),
            "server.metrics_listen",
            "must differ from server.listen and server.admin_listen",
        );
    }

    let providers = providers::compile_providers(raw.provider, raw.providers, &mut problems);
    let tokens = providers::compile_tokens(raw.tokens, &mut problems);
    let redis = raw
        .redis
        .map(|redis| compile_redis(redis, &providers, &mut problems));
    let mut warnings = Problems(Vec::new());
    let memory_store = compile_memory_store(
        raw.memory_store,
        redis.is_some(),
        &mut problems,
        &mut warnings,
    );

    let rate_limits: HashMap<String, Arc<RateLimitPolicy>> = raw
        .rate_limits
        .into_iter()
        .map(|(name, section)| {
            let policy = compile_policy(&name, section, &mut problems);
            (name.0.value, Arc::new(policy))
        })
        .collect();
    let descriptors = compile_descriptors(raw.rate_limit_service, &rate_limits, &mut problems);

    let profile_names: HashSet<String> = raw.profiles.keys().cloned().collect();
    let upstream = raw.composite.map(|section| {
        check_url(
            &section.upstream,
            &["http", "https"],
            "composite.upstream",
            &mut problems,
        );
        section.upstream.value.trim_end_matches('/').to_owned()
    });
    let context = RouteContext {
        rate_limits: &rate_limits,
        profiles: &profile_names,
        upstream: upstream.as_deref(),
        counts_by_peer: raw.client_address_header.is_none(),
        forwarded: &tokens.forward,
    };
    // Two keys: the line is that of the first route's `opaque`.
    let opaque = raw.routes.iter().enumerate().find_map(|(index, route)| {
        let kind = route
            .tokens
            .iter()
            .find(|kind| kind.value == TokenKind::Opaque)?;
        Some((format!("routes[{index}].tokens"), kind.referenced))
    });
    if let Some((key, location)) = opaque
        && !providers.iter().any(|p| p.introspection.is_some())
    {
        let message = "a route accepts opaque tokens but no provider has introspection";
        problems.add(Some(&location), key, message);
    }
    let routes = compile_routes(raw.routes, &context, &mut problems, &mut warnings);
    let route_names: HashSet<&str> = routes.iter().map(|route| route.name.as_str()).collect();

    let mut profiles = HashMap::new();
    for (name, section) in raw.profiles {
        let mut steps_by_route = HashMap::new();
        for (route, steps) in section.routes {
            if !route_names.contains(route.as_str()) {
                let key = format!("profiles.{name}.routes.{route}");
                problems.add(Some(&steps.referenced), key, "no route has this name");
            }
            // Keyed like a parse error inside the step (`r[1].rename`),
            // at the line of the route's step list.
            if let Err(err) = crate::reshape::validate(&steps.value) {
                let key = format!("profiles.{name}.routes.{route}[{}].{}", err.index, err.op);
                problems.add(Some(&steps.referenced), key, err.problem.to_string());
            }
            steps_by_route.insert(route, Arc::from(steps.value));
        }
        let profile = Profile {
            description: section.description,
            routes: steps_by_route,
            reshape_errors: section.reshape_errors,
        };
        profiles.insert(name, profile);
    }

    let reshape = compile_reshape(raw.reshape, &mut problems);

    let mut clients = HashMap::new();
    for (id, section) in raw.clients {
        if let Some(profile) = &section.profile
            && !profiles.contains_key(&profile.value)
        {
            let key = format!("clients.{id}.profile");
            problems.add(
                Some(&profile.referenced),
                key,
                format!("no profile named {:?}", profile.value),
            );
        }
        for (index, allowed) in section.allowed_profiles.iter().enumerate() {
            if !profiles.contains_key(&allowed.value) {
                let key = format!("clients.{id}.allowed_profiles[{index}]");
                let message = format!("no profile named {:?}", allowed.value);
                problems.add(Some(&allowed.referenced), key, message);
            }
        }
        if let Some(tier) = &section.tier
            && !rate_limits
                .values()
                .any(|policy| policy.tiers.contains_key(&tier.value))
        {
            let key = format!("clients.{id}.tier");
            let message = format!("no rate limit defines tier {:?}", tier.value);
            problems.add(Some(&tier.referenced), key, message);
        }
        clients.insert(
            id,
            Client {
                profile: section.profile.map(|profile| profile.value),
                allowed_profiles: section
                    .allowed_profiles
                    .into_iter()
                    .map(|allowed| allowed.value)
                    .collect(),
                tier: section.tier.map(|tier| tier.value),
            },
        );
    }

    if !problems.0.is_empty() {
        problems.0.sort_by_key(|problem| problem.line);
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems: problems.0,
        });
    }

    Ok(Config {
        version,
        path: path.to_owned(),
        loaded_at: SystemTime::now(),
        server,
        providers,
        tokens,
        redis,
        memory_store,
        reshape,
        profiles,
        clients,
        routes,
        descriptors,
        warnings: warnings.0,
        client_address_header: raw
            .client_address_header
            .map(|header| header.to_ascii_lowercase()),
    })
}

/// The location, when the file gave the value (not a default).
fn placed(location: &Location) -> Option<&Location> {
    Some(location).filter(|location| location.line() > 0)
}

fn compile_redis(
    raw: file::RedisSection,
    providers: &[Provider],
    problems: &mut Problems,
) -> Redis {
    // TODO: TLS to Redis (`rediss://`) is not built in yet, so only plain
    // connections are accepted; use a local TLS tunnel meanwhile.
    check_url(&raw.url, &["redis"], "redis.url", problems);

    // The Redis budget and the slowest token check can both fall in one
    // Check, so together they must end before Envoy gives up on it.
    let millis = raw
        .timeout_ms
        .as_ref()
        .map_or(DEFAULT_REDIS_TIMEOUT_MS, |timeout| timeout.value);
    // Without timeout_ms, the default is at fault: the line is `url`'s.
    let location = Some(
        raw.timeout_ms
            .as_ref()
            .map_or(&raw.url.referenced, |timeout| &timeout.referenced),
    );
    let timeout = Duration::from_millis(millis);
    let room = EXT_AUTHZ_TIMEOUT - CHECK_HEADROOM;
    if millis == 0 || millis > MAX_REDIS_TIMEOUT_MS {
        let message = format!("must be between 1 and {MAX_REDIS_TIMEOUT_MS}");
        problems.add(location, "redis.timeout_ms", message);
    } else if let Some((token, why)) = providers::slowest_token_check(providers)
        && timeout + token > room
    {
        let message = format!(
            "{millis} ms plus the slowest token check ({} ms: {why}) is more than the {} ms \
             a Check may spend inside Envoy's {} ms ext_authz timeout",
            token.as_millis(),
            room.as_millis(),
            EXT_AUTHZ_TIMEOUT.as_millis(),
        );
        problems.add(location, "redis.timeout_ms", message);
    }

    Redis {
        url: raw.url.value,
        timeout,
        key_prefix: raw.key_prefix,
        cluster: raw.cluster,
    }
}

fn compile_memory_store(
    raw: Option<file::MemoryStoreSection>,
    with_redis: bool,
    problems: &mut Problems,
    warnings: &mut Problems,
) -> MemoryStore {
    let Some(max_entries) = raw.and_then(|raw| raw.max_entries) else {
        return MemoryStore::default();
    };
    let location = Some(&max_entries.referenced);

    if !(MIN_MEMORY_ENTRIES..=MAX_MEMORY_ENTRIES).contains(&max_entries.value) {
        let message = format!("must be between {MIN_MEMORY_ENTRIES} and {MAX_MEMORY_ENTRIES}");
        problems.add(location, "memory_store.max_entries", message);
    }

    // Harmless, but the operator probably thinks it bounds something.
    if with_redis {
        let message = "has no effect: with a redis section the counters are kept in redis";
        warnings.add(location, "memory_store.max_entries", message);
    }

    MemoryStore {
        max_entries: max_entries.value,
    }
}

/// A name that travels in Redis keys and in quoted header strings: ASCII
/// letters, digits, `_`, `.` and `-`, and not `_` alone, which keys use for
/// "none".
fn check_name(name: &str, key: &str, location: Option<&Location>, problems: &mut Problems) {
    let safe = name
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || b"_.-".contains(&byte));
    if name.is_empty() || name == "_" || name.chars().count() > MAX_NAME_CHARS || !safe {
        let message = format!(
            "{name:?} is not a valid name: use 1 to {MAX_NAME_CHARS} of A-Z, a-z, 0-9, '_', '.' \
             and '-' (not '_' alone)"
        );
        problems.add(location, key, message);
    }
}

/// What routes may refer to.
struct RouteContext<'a> {
    rate_limits: &'a HashMap<String, Arc<RateLimitPolicy>>,
    profiles: &'a HashSet<String>,
    upstream: Option<&'a str>,
    /// No `client_address_header`: public routes count by the TCP peer.
    counts_by_peer: bool,
    /// The identity headers `tokens.forward` names.
    forwarded: &'a Forward,
}

fn compile_routes(
    raw: Vec<RouteSection>,
    context: &RouteContext<'_>,
    problems: &mut Problems,
    warnings: &mut Problems,
) -> Vec<Route> {
    let (rate_limits, profiles) = (context.rate_limits, context.profiles);
    let mut names = HashSet::new();
    let mut routes = Vec::with_capacity(raw.len());

    for (index, section) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("routes[{index}].{field}");

        if !names.insert(section.name.value.clone()) {
            problems.add(
                Some(&section.name.referenced),
                key("name"),
                "duplicate route name",
            );
        }

        let prefix = section.prefix.value.trim_end_matches('/').to_owned();
        if !section.prefix.value.starts_with('/') {
            problems.add(
                Some(&section.prefix.referenced),
                key("prefix"),
                "must start with '/'",
            );
        }
        if !is_normalised_path(&section.prefix.value) {
            problems.add(
                Some(&section.prefix.referenced),
                key("prefix"),
                PREFIX_NOT_NORMALISED,
            );
        }

        let mut methods = Vec::new();
        for method in &section.methods {
            let upper = method.value.to_ascii_uppercase();
            if !KNOWN_METHODS.contains(&upper.as_str()) {
                let message = format!("unknown method {:?}", method.value);
                problems.add(Some(&method.referenced), key("methods"), message);
            }
            methods.push(upper);
        }

        let needs_token = !section.scopes.is_empty()
            || !section.any_scopes.is_empty()
            || !section.claims.is_empty()
            || !section.tokens.is_empty();
        if section.public && needs_token {
            let message = "a public route cannot require scopes, claims or token kinds";
            problems.add(Some(&section.name.referenced), key("scopes"), message);
        }
        let claims =
            providers::compile_claims(&format!("routes[{index}]"), section.claims, problems);
        let mut token_kinds: Vec<TokenKind> = section.tokens.iter().map(|t| t.value).collect();
        if token_kinds.is_empty() {
            token_kinds.push(TokenKind::Jwt);
        }

        let policy = section.rate_limit.as_ref().and_then(|name| {
            let policy = rate_limits.get(&name.value).cloned();
            if policy.is_none() {
                let message = format!("no rate limit named {:?}", name.value);
                problems.add(Some(&name.referenced), key("rate_limit"), message);
            }
            policy
        });
        if let Some(name) = &section.rate_limit
            && section.public
            && context.counts_by_peer
        {
            // Behind a load balancer the peer is the balancer: one budget
            // for every client of the route.
            let message = "this public route counts clients by the TCP peer Envoy reports, \
                           because client_address_header is not set; behind a load balancer \
                           or proxy all its clients share one budget";
            warnings.add(Some(&name.referenced), key("rate_limit"), message);
        }
        let cost = section
            .rate_limit_cost
            .as_ref()
            .map_or(1, |cost| cost.value);
        if let Some(spanned) = &section.rate_limit_cost {
            check_cost(
                policy.as_deref(),
                spanned,
                &key("rate_limit_cost"),
                problems,
            );
        }
        if let Some(group) = &section.rate_limit_group {
            let location = Some(&group.referenced);
            check_name(&group.value, &key("rate_limit_group"), location, problems);
        }
        let rate_limit = policy.map(|policy| RouteLimit {
            policy,
            cost,
            group: section
                .rate_limit_group
                .as_ref()
                .map(|group| group.value.clone()),
        });

        if let Some(profile) = &section.profile
            && !profiles.contains(&profile.value)
        {
            let message = format!("no profile named {:?}", profile.value);
            problems.add(Some(&profile.referenced), key("profile"), message);
        }

        let request_headers = compile_request_headers(
            section.request_headers,
            context.forwarded,
            &key("request_headers"),
            problems,
        );

        let composite = section.composite.map(|composite| {
            compile_composite(composite, context.upstream, &key("composite"), problems)
        });

        routes.push(Route {
            composite,
            name: section.name.value,
            prefix,
            methods,
            public: section.public,
            scopes: section.scopes,
            any_scopes: section.any_scopes,
            claims,
            token_kinds,
            rate_limit,
            profile: section.profile.map(|profile| profile.value),
            request_headers,
        });
    }

    routes
}

/// Why a route prefix can never match what Envoy sends.
const PREFIX_NOT_NORMALISED: &str = "must be a path as Envoy forwards it once normalised: no '.' \
    or '..' segments, no '//', and no '%', '?', '#', spaces or non-ASCII characters";

/// Whether `prefix` is a path that can survive Envoy's normalisation
/// (`normalize_path`, `merge_slashes`, escaped slashes refused): Envoy
/// removes dot segments and merges slashes, and Gatehouse matches the path
/// without decoding it, so a prefix holding any of them matches nothing.
fn is_normalised_path(prefix: &str) -> bool {
    let visible = prefix
        .chars()
        .all(|c| c.is_ascii_graphic() && !"%?#".contains(c));
    let dots = prefix
        .split('/')
        .any(|segment| segment == "." || segment == "..");

    visible && !dots && !prefix.contains("//")
}

fn compile_composite(
    raw: file::RouteCompositeSection,
    upstream: Option<&str>,
    key: &str,
    problems: &mut Problems,
) -> Arc<Composite> {
    let location = Some(&raw.parts.referenced);
    if upstream.is_none() {
        let message = "a composite route needs the top-level composite.upstream";
        problems.add(location, key, message);
    }
    if raw.parts.value.is_empty() {
        problems.add(
            location,
            format!("{key}.parts"),
            "at least one part is required",
        );
    }

    let mut keys = HashSet::new();
    let mut parts = Vec::new();
    for (index, part) in raw.parts.value.into_iter().enumerate() {
        let part_key = format!("{key}.parts[{index}]");
        if !keys.insert(part.key.value.clone()) {
            let at = Some(&part.key.referenced);
            problems.add(at, format!("{part_key}.key"), "duplicate part key");
        }
        if !part.path.value.starts_with('/') {
            let message = "must start with '/'";
            problems.add(
                Some(&part.path.referenced),
                format!("{part_key}.path"),
                message,
            );
        }
        let timeout = Duration::from_millis(part.timeout_ms.value);
        if timeout.is_zero() || timeout > MAX_PART_TIMEOUT {
            let message = format!("must be between 1 and {} ms", MAX_PART_TIMEOUT.as_millis());
            let at = Some(&part.timeout_ms.referenced);
            problems.add(at, format!("{part_key}.timeout_ms"), message);
        }
        parts.push(Part {
            key: part.key.value,
            url: format!("{}{}", upstream.unwrap_or_default(), part.path.value),
            timeout,
            path: part.path.value,
        });
    }

    let budget = parts
        .iter()
        .map(|part| part.timeout)
        .max()
        .unwrap_or_default();
    Arc::new(Composite {
        merge: raw.merge,
        parts,
        budget,
    })
}

fn compile_reshape(raw: file::ReshapeSection, problems: &mut Problems) -> ReshapeLimits {
    if let Some(name) = &raw.profile_header
        && !is_header_name(&name.value.to_ascii_lowercase())
    {
        let location = Some(&name.referenced);
        problems.add(
            location,
            "reshape.profile_header",
            "not a valid header name",
        );
    }
    let fields_param = &raw.fields_param;
    if fields_param.value.is_empty() || fields_param.value.contains(['&', '=', '#']) {
        let message = "must be a plain query parameter name";
        let location = Some(&fields_param.referenced);
        problems.add(location, "reshape.fields_param", message);
    }

    ReshapeLimits {
        max_body_bytes: raw.max_body_bytes,
        profile_header: raw
            .profile_header
            .map(|name| name.value.to_ascii_lowercase()),
        profile_claim: raw.profile_claim,
        fields_param: raw.fields_param.value,
    }
}

/// Whether a route's `field` (`add`, `set` or `remove`) may name `name`:
/// `Err` says why not when it is an identity header.
///
/// Check removes every identity header a route does not set, so that a
/// client's copy never reaches a service. A route that adds one would keep
/// the client's value beside its own, and one that removes it would drop
/// Gatehouse's; only the route and profile names may be set, replacing
/// whatever the client sent.
fn identity_header_use(name: &str, field: &str, forwarded: &Forward) -> Result<(), String> {
    let configured = forwarded.names().any(|forwarded| forwarded == name);
    let reserved = crate::decision::IDENTITY_HEADERS.contains(&name);

    if reserved && !(field == "set" && ROUTE_SETTABLE_HEADERS.contains(&name)) {
        return Err(format!(
            "{name:?} is an identity header; a route may only set {}",
            ROUTE_SETTABLE_HEADERS.join(" and ")
        ));
    }
    if configured {
        return Err(format!(
            "{name:?} is forwarded by tokens.forward and cannot be changed"
        ));
    }
    Ok(())
}

fn compile_request_headers(
    raw: file::RequestHeadersSection,
    forwarded: &Forward,
    key: &str,
    problems: &mut Problems,
) -> RequestHeaders {
    let check = |name: &str, location: Option<&Location>, field: &str, problems: &mut Problems| {
        let lower = name.to_ascii_lowercase();
        if !is_header_name(&lower) {
            let message = format!("{name:?} is not a valid header name");
            problems.add(location, format!("{key}.{field}"), message);
        } else if PROTECTED_HEADERS.contains(&lower.as_str()) {
            let message = format!("{name:?} is managed by Gatehouse and cannot be changed");
            problems.add(location, format!("{key}.{field}"), message);
        } else if let Err(message) = identity_header_use(&lower, field, forwarded) {
            problems.add(location, format!("{key}.{field}"), message);
        }
        lower
    };

    let mut compiled = RequestHeaders::default();
    for (field, map, out) in [
        ("add", raw.add, &mut compiled.add),
        ("set", raw.set, &mut compiled.set),
    ] {
        let Some(map) = map else { continue };
        for (name, value) in map.value {
            let name = check(&name, Some(&map.referenced), field, problems);
            for placeholder in unknown_placeholders(&value) {
                let message = format!("unknown placeholder {placeholder:?}");
                problems.add(
                    Some(&map.referenced),
                    format!("{key}.{field}.{name}"),
                    message,
                );
            }
            out.push((name, value));
        }
    }
    for name in raw.remove {
        let lower = check(&name.value, Some(&name.referenced), "remove", problems);
        compiled.remove.push(lower);
    }
    compiled
}

/// `{word}` sequences in a header value that are not known placeholders.
fn unknown_placeholders(value: &str) -> Vec<String> {
    let mut unknown = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        let candidate = &rest[start..start + len + 1];
        if !HEADER_PLACEHOLDERS.contains(&candidate) {
            unknown.push(candidate.to_owned());
        }
        rest = &rest[start + len + 1..];
    }
    unknown
}

/// An RFC 9110 token in lower case; pseudo-headers are not names here.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&byte)
        })
}

/// A cost must be at least 1 and fit in every burst, or no request could
/// ever pass.
fn check_cost(
    policy: Option<&RateLimitPolicy>,
    cost: &Spanned<u64>,
    key: &str,
    problems: &mut Problems,
) {
    if cost.value == 0 {
        problems.add(Some(&cost.referenced), key, "must be at least 1");
        return;
    }

    let Some(policy) = policy else { return };
    let all = policy.limits.iter().chain(policy.tiers.values().flatten());
    if let Some(limit) = all.into_iter().find(|limit| limit.burst < cost.value) {
        let message = format!(
            "is more than the {} requests policy {:?} ever admits at once",
            limit.burst, policy.name
        );
        problems.add(Some(&cost.referenced), key, message);
    }
}

fn compile_policy(
    spanned_name: &file::Name,
    raw: file::RateLimitSection,
    problems: &mut Problems,
) -> RateLimitPolicy {
    let (name, name_at) = (spanned_name.text(), Some(spanned_name.location()));
    let key = |field: &str| format!("rate_limits.{name}.{field}");
    let algorithm = raw.algorithm;
    check_name(name, &format!("rate_limits.{name}"), name_at, problems);

    // One limit inline, or a list under `limits`, never both; an inline
    // limit is reported at its first key.
    let inline_at = [&raw.requests, &raw.window_seconds, &raw.burst]
        .into_iter()
        .flatten()
        .map(|value| value.referenced)
        .next();
    let inline = match (&raw.requests, &raw.window_seconds) {
        (Some(requests), Some(window_seconds)) => Some(file::LimitSection {
            requests: requests.value,
            window_seconds: window_seconds.value,
            burst: raw.burst.as_ref().map(|burst| burst.value),
        }),
        (None, None) if raw.burst.is_none() => None,
        _ => {
            let message = "requests and window_seconds go together (burst needs both)";
            problems.add(inline_at.as_ref(), key("requests"), message);
            None
        }
    };
    let limits = match (inline, raw.limits) {
        (Some(limit), None) => compile_limits(
            algorithm,
            &[limit],
            inline_at.as_ref(),
            &key("limits"),
            problems,
        ),
        (None, Some(list)) => compile_limits(
            algorithm,
            &list.value,
            Some(&list.referenced),
            &key("limits"),
            problems,
        ),
        (Some(_), Some(list)) => {
            let message = "give either requests and window_seconds, or limits";
            problems.add(Some(&list.referenced), key("limits"), message);
            Vec::new()
        }
        (None, None) => {
            let message = "a policy needs at least one limit";
            problems.add(name_at, key("limits"), message);
            Vec::new()
        }
    };

    let mut tiers = HashMap::new();
    for (tier, section) in raw.tiers {
        let tier_at = Some(tier.0.referenced);
        let tier = tier.0.value;
        let tier_key = key(&format!("tiers.{tier}.limits"));
        let list = &section.limits;
        check_name(
            &tier,
            &key(&format!("tiers.{tier}")),
            tier_at.as_ref(),
            problems,
        );
        let limits = compile_limits(
            algorithm,
            &list.value,
            Some(&list.referenced),
            &tier_key,
            problems,
        );
        tiers.insert(tier, limits);
    }

    RateLimitPolicy {
        name: name.to_owned(),
        algorithm,
        limits,
        tiers,
        failure_mode: raw.failure_mode,
        shadow: raw.shadow,
        tier_claim: raw.tier_claim,
        x_ratelimit_headers: raw.x_ratelimit_headers,
    }
}

fn compile_limits(
    algorithm: LimitAlgorithm,
    raw: &[file::LimitSection],
    location: Option<&Location>,
    key: &str,
    problems: &mut Problems,
) -> Vec<Limit> {
    if raw.is_empty() {
        problems.add(location, key, "at least one limit is required");
    }

    let mut limits: Vec<Limit> = Vec::with_capacity(raw.len());
    for section in raw {
        if algorithm == LimitAlgorithm::FixedWindow && section.burst.is_some() {
            problems.add(location, key, "burst applies to the gcra algorithm only");
        }
        let too_big = |value: NonZeroU64| value.get() > MAX_REQUESTS;
        if too_big(section.requests) || section.burst.is_some_and(too_big) {
            problems.add(
                location,
                key,
                format!("requests and burst must be at most {MAX_REQUESTS}"),
            );
        }
        if section.window_seconds.get() > MAX_WINDOW_SECONDS {
            let message = format!("window_seconds must be at most {MAX_WINDOW_SECONDS} (a year)");
            problems.add(location, key, message);
        }

        let limit = Limit {
            requests: section.requests.get(),
            window: Duration::from_secs(section.window_seconds.get()),
            burst: section.burst.unwrap_or(section.requests).get(),
        };
        let refill = u128::from(limit.burst) * u128::from(section.window_seconds.get())
            / u128::from(limit.requests);
        if refill > u128::from(MAX_REFILL_SECONDS) {
            let message = format!(
                "burst × window_seconds / requests (how long a whole burst takes to come \
                 back) must be at most {MAX_REFILL_SECONDS} seconds (ten years)"
            );
            problems.add(location, key, message);
        }

        // The window names the counter, so two limits cannot share one.
        if limits.iter().any(|other| other.window == limit.window) {
            problems.add(location, key, "two limits have the same window");
        }
        limits.push(limit);
    }
    limits
}

fn compile_descriptors(
    raw: file::RateLimitServiceSection,
    rate_limits: &HashMap<String, Arc<RateLimitPolicy>>,
    problems: &mut Problems,
) -> Vec<Descriptor> {
    let mut descriptors = Vec::new();

    for (index, section) in raw.descriptors.into_iter().enumerate() {
        let key = |field: &str| format!("rate_limit_service.descriptors[{index}].{field}");

        if section.entries.value.is_empty() {
            problems.add(
                Some(&section.entries.referenced),
                key("entries"),
                "no entries",
            );
        }
        let Some(policy) = rate_limits.get(&section.rate_limit.value) else {
            let message = format!("no rate limit named {:?}", section.rate_limit.value);
            problems.add(
                Some(&section.rate_limit.referenced),
                key("rate_limit"),
                message,
            );
            continue;
        };

        let entries = section
            .entries
            .value
            .into_iter()
            .map(|entry| (entry.key, entry.value))
            .collect();
        descriptors.push(Descriptor {
            domain: section.domain,
            entries,
            policy: policy.clone(),
        });
    }
    descriptors
}

const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
];

fn check_url(url: &Spanned<String>, schemes: &[&str], key: &str, problems: &mut Problems) {
    let ok = match reqwest::Url::parse(&url.value) {
        Ok(parsed) => schemes.contains(&parsed.scheme()) && parsed.host_str().is_some(),
        Err(_) => false,
    };

    if !ok {
        let message = format!("must be a {} URL", schemes.join(" or "));
        problems.add(Some(&url.referenced), key, message);
    }
}
