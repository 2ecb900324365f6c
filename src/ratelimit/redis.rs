//! Counters in a shared Redis, standalone or Cluster.
//!
//! The connection is made in the background and re-made by the redis crate
//! after a failure (a connection manager for one server, the cluster
//! connection for a Cluster; both multiplex every request over one
//! connection per node). A request never waits for a connection: each call
//! has its own time budget, well inside Envoy's ext_authz timeout.
//!
//! Every Redis call runs on a runtime of its own, one thread, so that the
//! budget measures Redis and not Gatehouse's run queue: on the shared
//! runtime, a burst of Checks kept the task that reads Redis's replies
//! waiting for its turn long after Redis had answered.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, Cmd, ErrorKind, Script, ServerErrorKind};
use tokio::runtime::Runtime;
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

/// A Lua script with its SHA1, as `EVALSHA` names it.
struct Lua {
    body: &'static str,
    hash: String,
}

impl Lua {
    fn new(body: &'static str) -> Self {
        let hash = Script::new(body).get_hash().to_owned();
        Self { body, hash }
    }
}

/// Rate-limit counters in Redis.
pub struct RedisStore {
    /// Runs the connection and every call; shut down when the store goes.
    io: Option<Runtime>,
    connection: Arc<ArcSwapOption<Connection>>,
    gcra: Arc<Lua>,
    fixed_window: Arc<Lua>,
    timeout: Duration,
    key_prefix: String,
}

impl RedisStore {
    /// A store for `redis`; connects in the background.
    ///
    /// # Errors
    ///
    /// When the URL cannot be parsed, or the Redis thread cannot start.
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

        // The redis crate spawns its connection tasks on the runtime that
        // makes the connection, so they live on this one too.
        let io = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("gatehouse-redis")
            .enable_all()
            .build()?;
        let connection = Arc::new(ArcSwapOption::empty());
        io.spawn(connect(target, connect_timeout, connection.clone()));

        Ok(Self {
            io: Some(io),
            connection,
            gcra: Arc::new(Lua::new(scripts::GCRA)),
            fixed_window: Arc::new(Lua::new(scripts::FIXED_WINDOW)),
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
        let (Some(io), Some(connection)) = (&self.io, self.connection.load_full()) else {
            return Err(StoreError::NotConnected);
        };
        let algorithm = query.policy.algorithm;
        let limits = query.limits();

        // The script's arguments: one key per limit, the cost, then two
        // numbers per limit.
        let script = match algorithm {
            LimitAlgorithm::Gcra => self.gcra.clone(),
            LimitAlgorithm::FixedWindow => self.fixed_window.clone(),
        };
        let keys: Vec<String> = limits
            .iter()
            .map(|limit| keys::counter(&self.key_prefix, &query.subject, algorithm, limit))
            .collect();
        let mut args = Vec::with_capacity(1 + 2 * limits.len());
        args.push(query.cost);
        for limit in limits {
            match algorithm {
                LimitAlgorithm::Gcra => {
                    let micros = u64::try_from(interval(limit).as_micros()).unwrap_or(u64::MAX);
                    args.extend([micros, limit.burst]);
                }
                LimitAlgorithm::FixedWindow => {
                    let millis = u64::try_from(limit.window.as_millis()).unwrap_or(u64::MAX);
                    args.extend([limit.requests, millis]);
                }
            }
        }

        // The budget runs on the Redis thread, whose clock and turn are not
        // held up by other Checks.
        let budget = self.timeout;
        let call = async move {
            let call = run(&connection, &script, &keys, &args);
            tokio::time::timeout(budget, call)
                .await
                .map_err(|_| StoreError::Timeout)?
        };
        let span = tracing::debug_span!("redis.evalsha", ratelimit.policy = %query.policy.name);
        let reply = io
            .spawn(call.instrument(span))
            .await
            .map_err(|_| StoreError::Stopped)??;

        verdict(&reply, limits)
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // Dropping a runtime waits for its tasks, which an async context
        // may not do; the calls in flight end with the store.
        if let Some(io) = self.io.take() {
            io.shutdown_background();
        }
    }
}

/// Runs `script` by its hash. When Redis has lost it (a restart, a failover,
/// `SCRIPT FLUSH`), `EVAL` sends the body, which runs it and caches it again
/// in one command, so a flush can never fall between a load and its use.
async fn run(
    connection: &Connection,
    script: &Lua,
    keys: &[String],
    args: &[u64],
) -> Result<Vec<i64>, StoreError> {
    let command = |name: &str, script: &str| {
        let mut command = Cmd::new();
        command
            .arg(name)
            .arg(script)
            .arg(keys.len())
            .arg(keys)
            .arg(args);
        command
    };

    let by_hash = command("EVALSHA", &script.hash);
    match query(connection, &by_hash).await {
        Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            tracing::debug!("script not cached in redis; sending it whole");
            Ok(query(connection, &command("EVAL", script.body)).await?)
        }
        reply => Ok(reply?),
    }
}

async fn query(connection: &Connection, command: &Cmd) -> redis::RedisResult<Vec<i64>> {
    match connection.clone() {
        Connection::Standalone(mut conn) => command.query_async(&mut conn).await,
        Connection::Cluster(mut conn) => command.query_async(&mut conn).await,
    }
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
