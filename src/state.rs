//! The live state: the compiled configuration with the key cache and the
//! rate-limit store built for it, swapped atomically on reload.
//!
//! A request loads the [`Runtime`] once and keeps that version until it ends,
//! so a reload never changes the rules under a request in flight.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::authn::Authenticator;
use crate::config::{Config, ConfigError};
use crate::ratelimit::Limiter;

/// One consistent version of everything a decision reads.
pub struct Runtime {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Token verification for `config.providers`.
    pub authn: Arc<Authenticator>,
    /// Rate limiting on `config.redis`.
    pub limiter: Arc<Limiter>,
}

/// Why the state could not be built or reloaded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// The HTTP client for the provider could not be built.
    #[error("cannot build the provider client: {0}")]
    Http(#[from] reqwest::Error),

    /// The Redis URL cannot be used.
    #[error("cannot use the redis url: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The shared state behind every service.
pub struct State {
    current: ArcSwap<Runtime>,
    path: PathBuf,
}

impl State {
    /// Builds the state for `config` and starts the background key refresh.
    ///
    /// # Errors
    ///
    /// When the provider client or the Redis client cannot be built.
    pub fn new(config: Config) -> Result<Self, StateError> {
        let path = config.path.clone();
        let runtime = build(config, None)?;

        Ok(Self {
            current: ArcSwap::from_pointee(runtime),
            path,
        })
    }

    /// The version in force now.
    pub fn load(&self) -> Arc<Runtime> {
        self.current.load_full()
    }

    /// Re-reads the file and swaps the new version in.
    ///
    /// Each provider's keys are kept while its key settings did not change,
    /// and the Redis connection while `redis` did not. Returns whether the
    /// file's contents changed.
    ///
    /// # Errors
    ///
    /// When the new file is invalid; the running version stays in force.
    pub fn reload(&self) -> Result<bool, StateError> {
        let config = Config::load(&self.path)?;
        let previous = self.current.load_full();
        let changed = config.version != previous.config.version;

        let runtime = build(config, Some(&previous))?;
        self.current.store(Arc::new(runtime));

        tracing::info!(config.version = %self.load().config.version, config.changed = changed, "configuration reloaded");
        Ok(changed)
    }
}

fn build(config: Config, previous: Option<&Runtime>) -> Result<Runtime, StateError> {
    // At start and at each reload: what loads but probably is not meant.
    for warning in config.rendered_warnings() {
        tracing::warn!(config.warning = %warning, "configuration loaded with a warning");
    }

    // Built anew each time, from the previous one's parts: each provider
    // keeps its keys while its key settings are unchanged (so a reload
    // while a provider is down keeps its last good keys), and its cached
    // tokens while all its settings are.
    let previous_authn = previous.map(|previous| previous.authn.as_ref());
    let authn = Authenticator::new(&config.providers, &config.tokens, previous_authn)?;
    authn.spawn_refresh();
    let authn = Arc::new(authn);

    let limiter = match previous {
        Some(previous) if same_store(&previous.config, &config) => previous.limiter.clone(),
        _ => {
            match &config.redis {
                Some(redis) => {
                    tracing::info!(redis.url = %crate::config::redact_url(&redis.url), "rate limits are kept in redis")
                }
                None => tracing::info!(
                    ratelimit.memory.max_entries = config.memory_store.max_entries,
                    "no redis configured: rate limits are kept in memory and hold for this instance only"
                ),
            }
            Arc::new(Limiter::new(config.redis.as_ref(), &config.memory_store)?)
        }
    };

    Ok(Runtime {
        config: Arc::new(config),
        authn,
        limiter,
    })
}

/// Whether `b` keeps the counters where `a` keeps them: the same Redis, or
/// memory with the same bounds (moka cannot change a cache's capacity).
fn same_store(a: &Config, b: &Config) -> bool {
    match (&a.redis, &b.redis) {
        (Some(a), Some(b)) => {
            a.url == b.url
                && a.timeout == b.timeout
                && a.key_prefix == b.key_prefix
                && a.cluster == b.cluster
        }
        (None, None) => a.memory_store == b.memory_store,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;

    fn config(store: &str) -> Config {
        let text = format!(
            "provider:\n  issuer: http://127.0.0.1:3000\n  audiences: [a]\n{store}\n\
             routes:\n  - {{name: r, prefix: /r}}\n"
        );
        Config::from_yaml(Path::new("gatehouse.yaml"), &text, HashMap::new()).expect("valid")
    }

    #[test]
    fn a_reload_keeps_in_memory_counters_only_within_the_same_bounds() {
        let default = config("");
        let spelled_out = config("memory_store: {max_entries: 100000}");
        let larger = config("memory_store: {max_entries: 200000}");
        let redis = config("redis: {url: 'redis://127.0.0.1:6379'}");

        assert!(
            same_store(&default, &spelled_out),
            "the default, written out"
        );
        assert!(!same_store(&default, &larger), "moka cannot grow a cache");
        assert!(!same_store(&default, &redis));
        assert!(!same_store(&redis, &default));
    }
}
