//! Counters in a shared Redis, standalone or Cluster.
//!
//! The connection is made in the background and re-made by the redis crate
//! after a failure (a connection manager for one server, the cluster
//! connection for a Cluster; both multiplex every request over one
//! connection per node). A request never waits for a connection: each call
//! has its own time budget, well inside Envoy's ext_authz timeout.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, Script};
use tracing::Instrument;

use super::memory::interval;
use super::{LimitStatus, Query, StoreError, Verdict, keys, scripts};
use crate::config::{self, LimitAlgorithm};

/// How long to wait between attempts at the first connection.
const CONNECT_RETRY: Duration = Duration::from_millis(500);

/// Connection attempts get at least this long, whatever the call budget.
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);

/// A multiplexed connection to one server or to a Cluster.
#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

/// How to connect, kept for the background task.
enum Target {
    Standalone(Client),
    Cluster(Box<ClusterClient>),
}

/// Rate-limit counters in Redis.
pub struct RedisStore {
    connection: Arc<ArcSwapOption<Connection>>,
    gcra: Script,
    fixed_window: Script,
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
        let connect_timeout = redis.timeout.max(MIN_CONNECT_TIMEOUT);
        let target = if redis.cluster {
            let client = ClusterClient::builder(vec![redis.url.as_str()])
                .connection_timeout(connect_timeout)
                .response_timeout(connect_timeout)
                .retries(2)
                .min_retry_wait(20)
                .max_retry_wait(200)
                .build()?;
            Target::Cluster(Box::new(client))
        } else {
            Target::Standalone(Client::open(redis.url.as_str())?)
        };

        let connection = Arc::new(ArcSwapOption::empty());
        tokio::spawn(connect(target, connect_timeout, connection.clone()));

        Ok(Self {
            connection,
            gcra: Script::new(scripts::GCRA),
            fixed_window: Script::new(scripts::FIXED_WINDOW),
            timeout: redis.timeout,
            key_prefix: redis.key_prefix.clone(),
        })
    }

    /// Whether a connection has been made.
    pub fn is_connected(&self) -> bool {
        self.connection.load().is_some()
    }

    /// Decides `query` in one round trip: one script over every limit.
    pub async fn check(&self, query: &Query<'_>) -> Result<Verdict, StoreError> {
        let Some(connection) = self.connection.load_full() else {
            return Err(StoreError::NotConnected);
        };
        let algorithm = query.policy.algorithm;
        let limits = query.limits();

        // Build the invocation: one key per limit, two numbers per limit.
        let script = match algorithm {
            LimitAlgorithm::Gcra => &self.gcra,
            LimitAlgorithm::FixedWindow => &self.fixed_window,
        };
        let mut invocation = script.prepare_invoke();
        invocation.arg(query.cost);
        for limit in limits {
            invocation.key(keys::counter(
                &self.key_prefix,
                &query.subject,
                algorithm,
                limit,
            ));
            match algorithm {
                LimitAlgorithm::Gcra => {
                    let micros = u64::try_from(interval(limit).as_micros()).unwrap_or(u64::MAX);
                    invocation.arg(micros).arg(limit.burst)
                }
                LimitAlgorithm::FixedWindow => {
                    let millis = u64::try_from(limit.window.as_millis()).unwrap_or(u64::MAX);
                    invocation.arg(limit.requests).arg(millis)
                }
            };
        }

        let call = async {
            match (*connection).clone() {
                Connection::Standalone(mut conn) => invoke(&invocation, &mut conn).await,
                Connection::Cluster(mut conn) => invoke(&invocation, &mut conn).await,
            }
        };
        let span = tracing::debug_span!("redis.evalsha", ratelimit.policy = %query.policy.name);
        let reply = tokio::time::timeout(self.timeout, call)
            .instrument(span)
            .await
            .map_err(|_| StoreError::Timeout)??;

        verdict(&reply, limits)
    }
}

async fn invoke(
    invocation: &redis::ScriptInvocation<'_>,
    connection: &mut impl ConnectionLike,
) -> Result<Vec<i64>, StoreError> {
    Ok(invocation.invoke_async::<Vec<i64>>(connection).await?)
}

/// Reads the scripts' reply: `{allowed, retry ms, (remaining, reset ms)…}`.
fn verdict(reply: &[i64], limits: &[config::Limit]) -> Result<Verdict, StoreError> {
    let [allowed, retry_ms, pairs @ ..] = reply else {
        return Err(StoreError::BadReply);
    };
    if pairs.len() != limits.len() * 2 {
        return Err(StoreError::BadReply);
    }
    let millis = |value: i64| Duration::from_millis(u64::try_from(value).unwrap_or(0));

    let statuses = limits
        .iter()
        .zip(pairs.chunks_exact(2))
        .map(|(limit, pair)| LimitStatus {
            limit: *limit,
            remaining: u64::try_from(pair[0]).unwrap_or(0),
            reset: millis(pair[1]),
        })
        .collect();

    Ok(Verdict {
        allowed: *allowed == 1,
        retry_after: millis(*retry_ms),
        limits: statuses,
    })
}

async fn connect(target: Target, timeout: Duration, slot: Arc<ArcSwapOption<Connection>>) {
    // After a failure the manager reconnects on the next call, waiting at
    // most a few hundred milliseconds between attempts, so decisions resume
    // within a second of Redis coming back.
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(200));

    loop {
        // Only this task holds the slot once a reload dropped the store.
        if Arc::strong_count(&slot) == 1 {
            return;
        }

        let attempt = match &target {
            Target::Standalone(client) => {
                ConnectionManager::new_with_config(client.clone(), config.clone())
                    .await
                    .map(Connection::Standalone)
            }
            Target::Cluster(client) => client.get_async_connection().await.map(Connection::Cluster),
        };
        match attempt {
            Ok(connection) => {
                tracing::info!("connected to redis");
                slot.store(Some(Arc::new(connection)));
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
    use super::*;
    use crate::config::Limit;

    fn limits() -> Vec<Limit> {
        let limit = |secs| Limit {
            requests: 10,
            window: Duration::from_secs(secs),
            burst: 10,
        };
        vec![limit(1), limit(60)]
    }

    #[test]
    fn a_reply_gives_one_status_per_limit_in_order() {
        let verdict = verdict(&[0, 1500, 3, 200, 0, 59_000], &limits()).expect("a verdict");

        assert!(!verdict.allowed);
        assert_eq!(verdict.retry_after, Duration::from_millis(1500));
        assert_eq!(verdict.limits[0].remaining, 3);
        assert_eq!(verdict.limits[1].reset, Duration::from_secs(59));
    }

    #[test]
    fn a_reply_of_the_wrong_shape_is_an_error_not_a_guess() {
        assert!(matches!(
            verdict(&[1, 0, 3, 200], &limits()),
            Err(StoreError::BadReply)
        ));
        assert!(matches!(
            verdict(&[1], &limits()),
            Err(StoreError::BadReply)
        ));
        assert!(!StoreError::BadReply.is_transient());
    }
}
