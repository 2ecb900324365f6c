//! Wiring: the gRPC server Envoy calls, the admin server, health, and the
//! drain on SIGTERM or SIGINT (a second signal ends it at once).

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};

use envoy_types::ext_authz::v3::pb::AuthorizationServer;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::Config;
use crate::grpc::admin::AdminService;
use crate::grpc::authz::AuthorizationService;
use crate::grpc::pb::admin_server::AdminServer;
use crate::grpc::proc::ProcessorService;
use crate::grpc::ratelimit::RateLimitServer;
use crate::state::State;

/// After the drain period, in-flight requests get this long to finish.
const FINISH_GRACE: Duration = Duration::from_secs(10);

/// How often readiness is re-evaluated.
const READINESS_PERIOD: Duration = Duration::from_millis(500);

/// The service names health reports on, besides the overall `""`.
const SERVICES: [&str; 3] = [
    "envoy.service.auth.v3.Authorization",
    "envoy.service.ext_proc.v3.ExternalProcessor",
    "envoy.service.ratelimit.v3.RateLimitService",
];

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The shared state could not be built.
    #[error(transparent)]
    State(#[from] crate::state::StateError),

    /// A listen address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },

    /// The metrics endpoint could not be started.
    #[error(transparent)]
    Metrics(#[from] crate::telemetry::MetricsError),

    /// The gRPC server failed.
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves until SIGTERM or SIGINT, then drains and returns; a second signal
/// during the drain returns at once.
///
/// # Errors
///
/// When a listener cannot be bound or a server fails.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    serve_until(config, shutdown_signals()).await
}

/// Serves until `stops` yields (or ends), then drains and returns. Should
/// `stops` yield again before the drain and the grace for in-flight calls
/// are over, it returns at once, dropping the calls still open.
///
/// # Errors
///
/// As for [`serve`].
pub async fn serve_until(config: Config, stops: impl Stream<Item = ()>) -> Result<(), ServeError> {
    tokio::pin!(stops);
    let listen = config.server.listen;
    let admin_listen = config.server.admin_listen;
    let drain = config.server.drain;

    // Metrics first, so that they are served by the time Envoy can call,
    // and nothing recorded before the recorder is lost.
    if let Some(address) = config.server.metrics_listen {
        crate::telemetry::serve_metrics(address)?;
        tracing::info!(metrics.address = %address, "serving metrics for prometheus at /metrics");
    }

    let listener = bind(listen).await?;
    let admin_listener = bind(admin_listen).await?;
    if !admin_listen.ip().is_loopback() {
        tracing::warn!(admin.address = %admin_listen, "the admin API listens on a non-loopback address");
    }

    let state = Arc::new(State::new(config)?);
    let (reporter, health) = tonic_health::server::health_reporter();
    let gate = HealthGate::new(reporter);
    gate.set_ready(false).await;
    tokio::spawn(track_readiness(state.clone(), gate.clone()));
    tokio::spawn(reload_on_hangup(state.clone()));

    let (finish_tx, finish) = watch::channel(false);
    let finished = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|done| *done).await;
    };

    let main = Server::builder()
        .add_service(health)
        .add_service(AuthorizationServer::new(AuthorizationService::new(
            state.clone(),
        )))
        .add_service(ExternalProcessorServer::new(ProcessorService::new(
            state.clone(),
        )))
        .add_service(RateLimitServiceServer::new(RateLimitServer::new(
            state.clone(),
        )))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), finished(finish.clone()));
    let admin = Server::builder()
        .add_service(AdminServer::new(AdminService::new(state.clone())))
        .serve_with_incoming_shutdown(TcpListenerStream::new(admin_listener), finished(finish));

    tracing::info!(grpc.address = %listen, admin.address = %admin_listen, config.version = %state.load().config.version, "gatehouse serving");

    let servers = async { tokio::try_join!(main, admin) };
    tokio::pin!(servers);

    tokio::select! {
        result = &mut servers => { result?; return Ok(()); }
        _ = stops.next() => {}
    }

    // Drain: report NOT_SERVING at once so that health-checking callers move
    // away, keep answering for the drain period, then stop accepting and let
    // in-flight requests finish.
    tracing::info!(
        drain.seconds = drain.as_secs(),
        "shutdown requested; draining"
    );
    gate.drain().await;

    tokio::select! {
        result = &mut servers => { result?; return Ok(()); }
        () = tokio::time::sleep(drain) => {}
        Some(()) = stops.next() => return stopped_at_once(),
    }

    let _ = finish_tx.send(true);
    tokio::select! {
        finished = tokio::time::timeout(FINISH_GRACE, &mut servers) => match finished {
            Ok(result) => {
                result?;
            }
            Err(_) => tracing::warn!("in-flight requests did not finish in time; exiting anyway"),
        },
        Some(()) = stops.next() => return stopped_at_once(),
    }

    tracing::info!("gatehouse stopped");
    Ok(())
}

/// A second signal: whoever sent it would rather lose the calls still open
/// than wait for the drain to end.
fn stopped_at_once() -> Result<(), ServeError> {
    tracing::warn!("second shutdown signal; stopping at once, without finishing the drain");
    Ok(())
}

async fn bind(address: std::net::SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| ServeError::Bind { address, source })
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for service in SERVICES {
        reporter.set_service_status(service, status).await;
    }
}

/// SERVING once the signing keys are loaded, until the drain starts.
async fn track_readiness(state: Arc<State>, gate: HealthGate) {
    let mut ready = false;

    while !gate.is_draining().await {
        let now_ready = state.load().authn.has_keys();
        if now_ready != ready {
            ready = now_ready;
            tracing::info!(ready, "readiness changed");
            if !gate.set_ready(ready).await {
                return;
            }
        }

        tokio::time::sleep(READINESS_PERIOD).await;
    }
}

// === impl HealthGate ===

/// The one writer of health: SERVING only while ready and not draining.
///
/// The readiness loop and the drain both report through one lock, so a
/// SERVING that the loop computed just before the drain began cannot land
/// after the drain's NOT_SERVING; once draining, nothing turns it back.
#[derive(Clone)]
struct HealthGate {
    reporter: HealthReporter,
    draining: Arc<tokio::sync::Mutex<bool>>,
}

impl HealthGate {
    fn new(reporter: HealthReporter) -> Self {
        Self {
            reporter,
            draining: Arc::new(tokio::sync::Mutex::new(false)),
        }
    }

    /// Reports readiness, unless the drain has begun; returns whether it
    /// still reports (false: draining, health stays NOT_SERVING).
    async fn set_ready(&self, ready: bool) -> bool {
        let draining = self.draining.lock().await;
        if *draining {
            return false;
        }

        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        set_health(&self.reporter, status).await;
        true
    }

    /// Whether the drain has begun.
    async fn is_draining(&self) -> bool {
        *self.draining.lock().await
    }

    /// NOT_SERVING from now on.
    async fn drain(&self) {
        let mut draining = self.draining.lock().await;
        *draining = true;
        set_health(&self.reporter, ServingStatus::NotServing).await;
    }
}

#[cfg(unix)]
async fn reload_on_hangup(state: Arc<State>) {
    use tokio::signal::unix::{SignalKind, signal};

    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload through the admin API only");
        return;
    };

    while hangups.recv().await.is_some() {
        if let Err(err) = state.reload() {
            tracing::warn!(error = %err, "reload refused; the running configuration stays");
        }
    }
}

#[cfg(not(unix))]
async fn reload_on_hangup(_state: Arc<State>) {}

/// One item per SIGTERM or SIGINT, from the moment this is called: the
/// first starts the drain, a second ends it.
fn shutdown_signals() -> impl Stream<Item = ()> {
    futures::stream::unfold(ShutdownSignals::new(), |mut signals| async move {
        signals.recv().await;
        Some(((), signals))
    })
}

// === impl ShutdownSignals ===

/// SIGTERM and SIGINT, listened for from start to exit, so that a signal
/// during the drain is seen too (it would otherwise end the process with
/// the default action, or not at all).
struct ShutdownSignals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    #[cfg(unix)]
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};

        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(signals) => Some(signals),
            Err(err) => {
                tracing::warn!(signal = name, error = %err, "cannot listen for a shutdown signal");
                None
            }
        };
        Self {
            terminate: listen(SignalKind::terminate(), "SIGTERM"),
            interrupt: listen(SignalKind::interrupt(), "SIGINT"),
        }
    }

    #[cfg(not(unix))]
    fn new() -> Self {
        Self {}
    }

    /// Waits for the next signal; a signal that cannot be listened for
    /// never comes.
    #[cfg(unix)]
    async fn recv(&mut self) {
        async fn next(signals: &mut Option<tokio::signal::unix::Signal>) {
            let received = match signals {
                Some(signals) => signals.recv().await,
                None => None,
            };
            if received.is_none() {
                std::future::pending::<()>().await;
            }
        }

        let Self {
            terminate,
            interrupt,
        } = self;
        tokio::select! {
            () = next(terminate) => {}
            () = next(interrupt) => {}
        }
    }

    #[cfg(not(unix))]
    async fn recv(&mut self) {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Request;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_server::Health;
    use tonic_health::server::HealthService;

    use super::*;

    async fn status(service: &HealthService, name: &str) -> i32 {
        let request = Request::new(HealthCheckRequest {
            service: name.to_owned(),
        });
        let response = service.check(request).await.expect("a known service");
        response.into_inner().status
    }

    #[tokio::test]
    async fn readiness_reported_after_the_drain_began_changes_nothing() {
        let reporter = HealthReporter::new();
        let service = HealthService::from_health_reporter(reporter.clone());
        let gate = HealthGate::new(reporter);

        assert!(gate.set_ready(true).await);
        assert_eq!(status(&service, "").await, ServingStatus::Serving as i32);

        // The readiness loop's late SERVING, after the drain's NOT_SERVING.
        gate.drain().await;
        assert!(!gate.set_ready(true).await, "the loop is told to stop");
        for name in std::iter::once("").chain(SERVICES) {
            let got = status(&service, name).await;
            assert_eq!(got, ServingStatus::NotServing as i32, "{name:?}");
        }
    }
}
