//! Redis failing under a running Gatehouse: killed while requests flow and
//! restarted on the same port, frozen (SIGSTOP) and thawed, and its script
//! cache flushed, once and over and over while calls are in flight. Each
//! policy's failure mode decides meanwhile, every answer comes within the
//! budget, nothing panics, and correct decisions resume by themselves.

mod limits;
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use futures::future::join_all;
use limits::{FALLBACK_LOG, assert_every_key_has_a_ttl, channel, check, fallbacks, redis_cli};
use tokio::sync::watch;
use tonic::transport::Channel;

const RATE_LIMITS: &str = "  open: {requests: 5, window_seconds: 60, failure_mode: open}
  closed: {requests: 5, window_seconds: 60, failure_mode: closed}";

const ROUTES: &str = "  - {name: open, prefix: /open, public: true, rate_limit: open}
  - {name: closed, prefix: /closed, public: true, rate_limit: closed}";

/// The production budget.
const BUDGET: Duration = Duration::from_millis(20);

/// How much later than the budget an answer may come on a loaded machine.
const SLACK: Duration = Duration::from_millis(500);

/// One Check that was sent while Redis was being broken.
#[derive(Debug)]
struct Sent {
    path: &'static str,
    status: u16,
    started: Instant,
    ended: Instant,
}

/// Checks alternating between `/open` and `/closed` until `stop` turns true,
/// each from an address of its own (`prefix.N`), so that no limit of 5 can
/// be reached by them: any 429 would be a wrong decision.
fn flow(channel: &Channel, prefix: &'static str, stop: watch::Receiver<bool>) -> FlowTask {
    let channel = channel.clone();
    tokio::spawn(async move {
        let mut sent = Vec::new();
        for n in 0.. {
            if *stop.borrow() {
                break;
            }
            let path = if n % 2 == 0 { "/open" } else { "/closed" };
            let address = format!("{prefix}.{}.{}", n / 250, n % 250);
            let started = Instant::now();
            let status = check(&channel, path, &address).await.status;
            let ended = Instant::now();
            sent.push(Sent {
                path,
                status,
                started,
                ended,
            });
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sent
    })
}

type FlowTask = tokio::task::JoinHandle<Vec<Sent>>;

/// The rules every answer follows, whatever Redis does: an answer within
/// the budget and some slack, never a 429, and `/open` always allowed.
fn assert_every_answer_is_timely_and_possible(sent: &[Sent]) {
    // A loose floor: on a busy 2-core machine a debug-build Check can take
    // tens of milliseconds, so the count says only that requests flowed.
    assert!(sent.len() >= 10, "requests flowed: {}", sent.len());
    for one in sent {
        let took = one.ended - one.started;
        assert!(took < BUDGET + SLACK, "{one:?} took {took:?}");
        assert_ne!(one.status, 429, "no budget could be exceeded: {one:?}");
        match one.path {
            "/open" => assert_eq!(one.status, 200, "fails open: {one:?}"),
            _ => assert!([200, 503].contains(&one.status), "{one:?}"),
        }
    }
}

/// `/closed` answers sent wholly before `from`, and wholly between `from`
/// and `to`.
fn closed_before_and_during(sent: &[Sent], from: Instant, to: Instant) -> (Vec<u16>, Vec<u16>) {
    let closed = sent.iter().filter(|one| one.path == "/closed");
    let before = closed
        .clone()
        .filter(|one| one.ended < from)
        .map(|one| one.status)
        .collect();
    let during = closed
        .filter(|one| one.started > from && one.ended < to)
        .map(|one| one.status)
        .collect();
    (before, during)
}

/// Polls `/closed` from a fresh address until it is decided again, failing
/// if that takes a second, then checks that the count is right: the limit
/// of 5 admits four more and refuses the next.
async fn assert_correct_again_within_a_second(channel: &Channel, since: Instant, address: &str) {
    let first = loop {
        let answer = check(channel, "/closed", address).await;
        if answer.status != 503 {
            break answer;
        }
        assert!(
            since.elapsed() < Duration::from_secs(1),
            "still failing closed a second after redis came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(first.status, 200);

    for n in 0..4 {
        assert_eq!(check(channel, "/closed", address).await.status, 200, "{n}");
    }
    assert_eq!(check(channel, "/closed", address).await.status, 429);
}

// Two workers, so that requests keep flowing while this test's own thread
// waits for Redis to go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let port = support::free_port();
    let redis = support::redis_on(dir.path(), "redis", port, &[]);
    let yaml = limits::config("  url: ${REDIS_URL}\n  timeout_ms: 20", RATE_LIMITS, ROUTES);
    let mut running = limits::gatehouses(dir.path(), &yaml, 1, port);
    let channel = channel(running[0].ports.grpc).await;

    // Requests flow while Redis is killed.
    assert_eq!(check(&channel, "/closed", "192.0.2.10").await.status, 200);
    let (stop, stopped) = watch::channel(false);
    let flowing = flow(&channel, "10.1", stopped);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    limits::stop_redis(redis, port);
    let down = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).expect("the flow listens");
    let sent = flowing.await.expect("requests kept flowing");

    // Exact per path: `/open` always 200; `/closed` 200 while Redis was
    // up, 503 once it was gone, either while it went.
    assert_every_answer_is_timely_and_possible(&sent);
    let (before, _) = closed_before_and_during(&sent, killed, Instant::now());
    assert!(
        !before.is_empty() && before.iter().all(|s| *s == 200),
        "{before:?}"
    );
    let gone: Vec<u16> = sent
        .iter()
        .filter(|one| one.path == "/closed" && one.started > down)
        .map(|one| one.status)
        .collect();
    assert!(
        !gone.is_empty() && gone.iter().all(|s| *s == 503),
        "{gone:?}"
    );

    // With Redis gone: open allows uncounted, closed answers 503 with
    // Retry-After.
    let open = check(&channel, "/open", "192.0.2.11").await;
    assert_eq!(open.status, 200);
    assert!(
        !open.headers.contains_key("ratelimit"),
        "nothing was counted"
    );
    let closed = check(&channel, "/closed", "192.0.2.11").await;
    assert_eq!(closed.status, 503);
    assert_eq!(closed.headers["retry-after"], "1");
    running[0].proc.assert_running();
    assert!(fallbacks(&running).await >= 2, "fallbacks are logged");

    // Redis back on the same port: correct decisions within a second,
    // without restarting Gatehouse (the restarted Redis starts empty).
    let _redis = support::redis_on(dir.path(), "redis-again", port, &[]);
    assert_correct_again_within_a_second(&channel, Instant::now(), "192.0.2.12").await;

    running[0].proc.assert_running();
    assert!(!running[0].proc.log().contains("panicked"));
    assert!(assert_every_key_has_a_ttl(&[port]).await >= 1);
}

/// A Redis stopped with SIGSTOP: its connections stay open, and nothing it
/// is sent is answered. Dropping it sends SIGCONT, so a failing test never
/// leaves a stopped Redis behind.
struct Frozen {
    pid: String,
}

impl Frozen {
    fn new(port: u16) -> Self {
        // The guard in front of Redis is not Redis: ask Redis for its pid.
        let info = redis_cli(port, &["INFO", "server"]);
        let pid = info
            .lines()
            .find_map(|line| line.trim().strip_prefix("process_id:"))
            .expect("redis reports its process id")
            .to_owned();

        signal(&pid, "-STOP");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !Self::stopped(&pid) {
            assert!(Instant::now() < deadline, "redis {pid} did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
        Self { pid }
    }

    /// Whether the kernel reports the process as stopped.
    fn stopped(pid: &str) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next());
        state == Some("T")
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(&self.pid, "-CONT");
    }
}

fn signal(pid: &str, signal: &str) {
    let status = Command::new("kill")
        .arg(signal)
        .arg(pid)
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_and_thawed_under_load() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (_redis, port) = support::redis(dir.path());
    let yaml = limits::config("  url: ${REDIS_URL}\n  timeout_ms: 20", RATE_LIMITS, ROUTES);
    let mut running = limits::gatehouses(dir.path(), &yaml, 1, port);
    let channel = channel(running[0].ports.grpc).await;

    // Requests flow; Redis is frozen for a second, then thawed.
    let (stop, stopped) = watch::channel(false);
    let flowing = flow(&channel, "10.2", stopped);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = Frozen::new(port);
    let froze = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let thawing = Instant::now();
    drop(frozen);
    let thawed = Instant::now();

    // Correct again within a second of the thaw, while requests still flow.
    assert_correct_again_within_a_second(&channel, thawed, "192.0.2.13").await;
    stop.send(true).expect("the flow listens");
    let sent = flowing.await.expect("requests kept flowing");

    // Exact per path: `/open` always 200; `/closed` 200 before the freeze
    // and 503 during it, each within the budget, not after Redis wakes.
    assert_every_answer_is_timely_and_possible(&sent);
    let (before, during) = closed_before_and_during(&sent, froze, thawing);
    assert!(
        !before.is_empty() && before.iter().all(|s| *s == 200),
        "{before:?}"
    );
    assert!(
        during.len() >= 10,
        "requests flowed while frozen: {during:?}"
    );
    assert!(during.iter().all(|s| *s == 503), "{during:?}");
    let frozen_calls = sent
        .iter()
        .filter(|one| one.started > froze && one.ended < thawing)
        .count();
    let fell_back = fallbacks(&running).await;
    assert!(
        fell_back >= frozen_calls as u64,
        "each frozen decision fell back, /open's too: {fell_back} of {frozen_calls}"
    );

    running[0].proc.assert_running();
    assert!(!running[0].proc.log().contains("panicked"));
    assert!(assert_every_key_has_a_ttl(&[port]).await >= 1);
}

/// The hash by which Gatehouse calls a script, as Redis's `SCRIPT EXISTS`
/// knows it.
fn hash(script: &str) -> String {
    redis::Script::new(script).get_hash().to_owned()
}

/// `SCRIPT EXISTS` for the GCRA and fixed-window scripts: `1` or `0` each.
fn scripts_cached(port: u16) -> Vec<String> {
    use gatehouse::ratelimit::scripts::{FIXED_WINDOW, GCRA};
    let (gcra, fixed) = (hash(GCRA), hash(FIXED_WINDOW));
    let answer = redis_cli(port, &["SCRIPT", "EXISTS", &gcra, &fixed]);
    answer.split_whitespace().map(str::to_owned).collect()
}

/// One field of a command's line in `INFO commandstats`, such as
/// `failed_calls` of `evalsha`.
fn command_stat(port: u16, command: &str, field: &str) -> u64 {
    let info = redis_cli(port, &["INFO", "commandstats"]);
    let line = info
        .lines()
        .find(|line| line.starts_with(&format!("cmdstat_{command}:")));
    line.and_then(|line| {
        line.split([':', ','])
            .find_map(|pair| pair.strip_prefix(&format!("{field}=")))
    })
    .map_or(0, |value| value.parse().expect("a count"))
}

const FLUSHED_LIMITS: &str = "  open: {requests: 5, window_seconds: 60, failure_mode: open}
  closed: {requests: 5, window_seconds: 60, failure_mode: closed}
  smooth: {requests: 30, window_seconds: 3600, failure_mode: closed}
  fixed: {requests: 30, window_seconds: 3600, algorithm: fixed_window, failure_mode: closed}";

const FLUSHED_ROUTES: &str = "  - {name: open, prefix: /open, public: true, rate_limit: open}
  - {name: closed, prefix: /closed, public: true, rate_limit: closed}
  - {name: smooth, prefix: /smooth, public: true, rate_limit: smooth}
  - {name: fixed, prefix: /fixed, public: true, rate_limit: fixed}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_mid_run_stays_exact() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (_redis, port) = support::redis(dir.path());
    let yaml = limits::config(
        "  url: ${REDIS_URL}\n  timeout_ms: 500",
        FLUSHED_LIMITS,
        FLUSHED_ROUTES,
    );
    let running = limits::gatehouses(dir.path(), &yaml, 1, port);
    let channel = channel(running[0].ports.grpc).await;

    // Flushed once: the script is gone, then back after the next decision,
    // and the counters carry on.
    for _ in 0..3 {
        assert_eq!(check(&channel, "/closed", "192.0.2.20").await.status, 200);
    }
    assert_eq!(scripts_cached(port), ["1", "0"], "GCRA in use");
    assert_eq!(redis_cli(port, &["SCRIPT", "FLUSH"]).trim(), "OK");
    assert_eq!(scripts_cached(port), ["0", "0"], "flushed");
    assert_eq!(check(&channel, "/closed", "192.0.2.20").await.status, 200);
    assert_eq!(scripts_cached(port), ["1", "0"], "cached again");
    assert_eq!(check(&channel, "/closed", "192.0.2.20").await.status, 200);
    assert_eq!(check(&channel, "/closed", "192.0.2.20").await.status, 429);

    // Flushed over and over while 200 Checks of one client are in flight,
    // on both scripts: still exactly the limit of 30 each.
    let flushes_before = command_stat(port, "evalsha", "failed_calls");
    let (stop, stopped) = watch::channel(false);
    let (flushing, first_flush) = tokio::sync::oneshot::channel();
    let flusher = tokio::spawn(async move {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("url");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        let mut flushing = Some(flushing);
        let mut flushes = 0;
        while !*stopped.borrow() {
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut connection)
                .await
                .expect("script flush");
            flushes += 1;
            if let Some(flushing) = flushing.take() {
                let _ = flushing.send(());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        flushes
    });
    first_flush.await.expect("the flusher started");
    let calls = (0..200).map(|n| {
        let channel = channel.clone();
        let path = if n % 2 == 0 { "/smooth" } else { "/fixed" };
        tokio::spawn(async move { (path, check(&channel, path, "192.0.2.21").await.status) })
    });
    let answers: Vec<(&str, u16)> = join_all(calls)
        .await
        .into_iter()
        .map(|answer| answer.expect("check task"))
        .collect();
    stop.send(true).expect("the flusher listens");
    let flushes = flusher.await.expect("flusher");

    for path in ["/smooth", "/fixed"] {
        let count = |status: u16| answers.iter().filter(|a| **a == (path, status)).count();
        assert_eq!((count(200), count(429), count(503)), (30, 70, 0), "{path}");
    }
    let missed = command_stat(port, "evalsha", "failed_calls") - flushes_before;
    assert!(
        missed > 0 && command_stat(port, "eval", "calls") >= missed,
        "{flushes} flushes: {missed} calls found their script gone and were resent whole"
    );

    assert_eq!(fallbacks(&running).await, 0, "no {FALLBACK_LOG:?} line");
    assert!(assert_every_key_has_a_ttl(&[port]).await >= 2);
}
