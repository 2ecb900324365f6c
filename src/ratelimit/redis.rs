//! Counters in a shared Redis.
//!
//! The connection is made in the background and re-made by the connection
//! manager after a failure; a request never waits for a connection. Each call
//! has its own time budget, well inside Envoy's ext_authz timeout.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::{StoreError, Verdict, scripts};
use crate::config::{self, RateLimitPolicy};

/// How long to wait between attempts at the first connection.
const CONNECT_RETRY: Duration = Duration::from_millis(500);

/// Rate-limit counters in Redis.
pub struct RedisStore {
    connection: Arc<ArcSwapOption<ConnectionManager>>,
    script: Script,
    timeout: Duration,
    key_prefix: String,
}

impl RedisStore {
    /// A store for `redis`; connects in the background.
    ///
    /// # Errors
    ///
    /// When the URL cannot be parsed.
    pub fn new(redis: &config::Redis) -> Result<Self, redis::RedisError> {
        let client = Client::open(redis.url.as_str())?;
        let connection = Arc::new(ArcSwapOption::empty());

        tokio::spawn(connect(client, redis.timeout, connection.clone()));

        Ok(Self {
            connection,
            script: Script::new(scripts::FIXED_WINDOW),
            timeout: redis.timeout,
            key_prefix: redis.key_prefix.clone(),
        })
    }

    /// Whether a connection has been made.
    pub fn is_connected(&self) -> bool {
        self.connection.load().is_some()
    }

    /// Counts one request in one round trip.
    pub async fn check(
        &self,
        policy: &RateLimitPolicy,
        client: &str,
        cost: u64,
    ) -> Result<Verdict, StoreError> {
        let Some(connection) = self.connection.load_full() else {
            return Err(StoreError::NotConnected);
        };
        let mut connection = (*connection).clone();

        let key = counter_key(&self.key_prefix, &policy.name, client);
        let window_ms = u64::try_from(policy.window.as_millis()).unwrap_or(u64::MAX);
        let mut invocation = self.script.key(key);
        invocation.arg(cost).arg(policy.requests).arg(window_ms);

        let call = invocation.invoke_async::<(u8, u64, i64)>(&mut connection);
        let span = tracing::debug_span!("redis.evalsha", ratelimit.policy = %policy.name);
        let (allowed, count, ttl_ms) =
            tracing::Instrument::instrument(tokio::time::timeout(self.timeout, call), span)
                .await
                .map_err(|_| StoreError::Timeout)??;

        Ok(Verdict {
            allowed: allowed == 1,
            limit: policy.requests,
            remaining: policy.requests.saturating_sub(count),
            reset: Duration::from_millis(u64::try_from(ttl_ms.max(1)).unwrap_or(1)),
        })
    }
}

/// The counter key for a client under a policy.
///
/// The hash tag (`{…}`) keeps every key of one client and policy in one Redis
/// Cluster slot. The client id comes from a verified token or from Envoy's
/// view of the client address, so it is bounded; it is length-limited anyway.
fn counter_key(prefix: &str, policy: &str, client: &str) -> String {
    let client: String = client.chars().take(256).collect();
    format!("{prefix}:rl:{{{policy}:{client}}}")
}

async fn connect(client: Client, timeout: Duration, slot: Arc<ArcSwapOption<ConnectionManager>>) {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
        .set_response_timeout(Some(timeout.max(Duration::from_millis(250))))
        .set_number_of_retries(2);

    loop {
        // Only this task holds the slot once a reload dropped the store.
        if Arc::strong_count(&slot) == 1 {
            return;
        }

        match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
            Ok(manager) => {
                tracing::info!("connected to redis");
                slot.store(Some(Arc::new(manager)));
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot connect to redis; retrying");
                tokio::time::sleep(CONNECT_RETRY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::counter_key;

    #[test]
    fn keys_carry_a_hash_tag_per_client_and_policy() {
        assert_eq!(
            counter_key("gh", "standard", "app-1"),
            "gh:rl:{standard:app-1}"
        );
    }
}
