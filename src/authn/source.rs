//! One provider's signing keys, live: the key set in force, its background
//! refresh, and the single-flight, throttled refetch for an unknown `kid`.
//!
//! A reload that leaves a provider's key settings alone keeps its source, so
//! the keys, the refresh and the last good keys of a provider that is down
//! all carry over to the new configuration.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use moka::future::Cache;
use tokio::sync::Mutex;

use super::AuthnError;
use super::cache::{Digest, Verified};
use super::keys::{FetchError, KeyFetcher, KeySet, KeySettings};
use crate::metrics;

/// How soon a failed background key refresh is retried.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(2);

/// A provider's published keys and how they are kept fresh.
pub struct KeySource {
    settings: KeySettings,
    /// The provider's position in the configuration in force, its metrics
    /// label; a reload that only moves the provider keeps the source.
    index: AtomicUsize,
    fetcher: KeyFetcher,
    keys: ArcSwap<KeySet>,
    /// The introspection endpoint discovery named, when none is configured.
    discovered_introspection: ArcSwapOption<String>,
    /// When keys were last fetched because of an unknown `kid`; the lock also
    /// makes that refetch single-flight.
    last_refetch: Mutex<Option<Instant>>,
    /// The verified-token cache shared by every provider, so that a
    /// withdrawn key's tokens can be dropped from it.
    verified: Cache<Digest, Verified>,
    /// Whether the background refresh has been started, so that a source
    /// kept across reloads runs exactly one.
    refreshing: AtomicBool,
}

impl KeySource {
    /// A source with no keys yet for the `index`th configured provider;
    /// [`KeySource::spawn_refresh`] fetches them.
    ///
    /// # Errors
    ///
    /// When the HTTP client cannot be built.
    pub fn new(
        settings: KeySettings,
        index: usize,
        verified: Cache<Digest, Verified>,
    ) -> Result<Self, reqwest::Error> {
        Ok(Self {
            fetcher: KeyFetcher::new(&settings)?,
            settings,
            index: AtomicUsize::new(index),
            keys: ArcSwap::from_pointee(KeySet::default()),
            discovered_introspection: ArcSwapOption::empty(),
            last_refetch: Mutex::new(None),
            verified,
            refreshing: AtomicBool::new(false),
        })
    }

    /// The settings this source was built for.
    pub fn settings(&self) -> &KeySettings {
        &self.settings
    }

    /// Records the provider's position in the configuration now in force.
    pub fn set_index(&self, index: usize) {
        self.index.store(index, Ordering::Relaxed);
    }

    /// Whether keys are loaded, which readiness reports.
    pub fn has_keys(&self) -> bool {
        !self.keys.load().is_empty()
    }

    /// Whether a key is published under `kid` now.
    pub fn publishes(&self, kid: &str) -> bool {
        self.keys.load().publishes(kid)
    }

    /// The introspection endpoint discovery named, if it has.
    pub fn discovered_introspection(&self) -> Option<String> {
        self.discovered_introspection
            .load_full()
            .map(|endpoint| (*endpoint).clone())
    }

    /// Starts the background refresh, unless it runs already.
    pub fn spawn_refresh(self: &Arc<Self>) {
        if !self.refreshing.swap(true, Ordering::AcqRel) {
            tokio::spawn(Self::run_refresh(Arc::downgrade(self)));
        }
    }

    /// Fetches the keys now and swaps them in; returns how long they may be
    /// kept (the response's `max-age` within the configured bounds).
    ///
    /// Cached tokens signed by a key that is no longer published are dropped
    /// at once, so a withdrawn key stops working at the next refresh.
    ///
    /// # Errors
    ///
    /// When the provider cannot be reached; the previous keys stay in force.
    pub async fn refresh(&self) -> Result<Duration, FetchError> {
        let fetched = self.fetcher.fetch().await;
        metrics::jwks_fetched(self.index.load(Ordering::Relaxed), fetched.is_ok());
        let fetched = fetched?;
        let count = fetched.keys.keys.len();

        self.install(fetched.keys);
        if let Some(endpoint) = fetched.introspection_endpoint {
            self.discovered_introspection
                .store(Some(Arc::new(endpoint)));
        }

        let (low, high) = self.settings.refresh_bounds;
        let keep = fetched
            .max_age
            .unwrap_or(self.settings.refresh)
            .clamp(low, high);
        tracing::debug!(
            provider.issuer = %self.settings.issuer,
            keys.count = count,
            keys.next_refresh = ?keep,
            "signing keys refreshed"
        );
        Ok(keep)
    }

    /// Puts `keys` in force and drops every cached token signed by a key
    /// they no longer hold.
    pub(super) fn install(&self, keys: KeySet) {
        let keys = Arc::new(keys);
        let previous = self.keys.swap(keys.clone());
        let withdrawn = previous.withdrawn_in(&keys);
        if withdrawn.is_empty() {
            return;
        }

        tracing::info!(
            provider.issuer = %self.settings.issuer,
            keys.withdrawn = ?withdrawn,
            "signing keys withdrawn by the provider"
        );
        let issuer = self.settings.issuer.clone();
        let dropped = self.verified.invalidate_entries_if(move |_, verified| {
            verified.identity.issuer == issuer
                && verified
                    .identity
                    .key_id
                    .as_ref()
                    .is_some_and(|kid| withdrawn.contains(kid))
        });
        if let Err(err) = dropped {
            tracing::warn!(error = %err, "could not drop tokens of withdrawn keys");
        }
    }

    /// Refreshes the keys when the last fetch says they go stale, and soon
    /// after a failure, keeping the last good keys meanwhile.
    ///
    /// The loop holds only a weak reference, so it ends once no
    /// configuration uses this source any more and the last request that
    /// did is done.
    async fn run_refresh(this: Weak<Self>) {
        loop {
            let Some(source) = this.upgrade() else { return };
            let wait = match source.refresh().await {
                Ok(keep) => keep,
                Err(err) => {
                    tracing::warn!(
                        provider.issuer = %source.settings.issuer,
                        error = %err,
                        "cannot fetch signing keys; keeping the last good ones"
                    );
                    RETRY_AFTER_FAILURE
                }
            };
            drop(source);

            tokio::time::sleep(wait).await;
        }
    }

    /// The current keys, refetched first when they lack `kid`.
    ///
    /// Refetches are single-flight and at most one per `min_refetch`, so a
    /// flood of tokens with random `kid`s cannot hammer the provider.
    ///
    /// # Errors
    ///
    /// [`AuthnError::KeysUnavailable`] when no keys have ever been loaded.
    pub async fn keys_for(&self, kid: Option<&str>) -> Result<Arc<KeySet>, AuthnError> {
        let keys = self.keys.load_full();
        if keys.find(kid).is_some() {
            return Ok(keys);
        }

        let mut last = self.last_refetch.lock().await;

        // Another request may have refetched while this one waited.
        let keys = self.keys.load_full();
        if keys.find(kid).is_some() {
            return Ok(keys);
        }

        let throttled = last.is_some_and(|at| at.elapsed() < self.settings.min_refetch);
        if !throttled {
            *last = Some(Instant::now());
            if let Err(err) = self.refresh().await {
                tracing::warn!(
                    provider.issuer = %self.settings.issuer,
                    error = %err,
                    "refetching signing keys for an unknown kid failed"
                );
            }
        }
        drop(last);

        let keys = self.keys.load_full();
        if keys.is_empty() {
            return Err(AuthnError::KeysUnavailable);
        }
        Ok(keys)
    }
}
