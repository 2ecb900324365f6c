//! Logging and metrics set-up.
//!
//! The level comes from `RUST_LOG` (default `info`); the format from the
//! configuration. Every request runs in a span carrying its request id.
//! Metrics are served for Prometheus on their own listener, when configured.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber; later calls do nothing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);

    // Only the first call in a process installs a subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Why the metrics endpoint could not be started.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listener could not be bound, or a recorder was installed already.
    #[error("cannot serve metrics on {address}: {source}")]
    Install {
        /// The configured `server.metrics_listen`.
        address: SocketAddr,
        /// The exporter's error.
        source: BuildError,
    },
}

/// Binds `address` and serves the Prometheus text format there (on any
/// path; `/metrics` by convention), recording every metric from now on.
///
/// Once per process: the recorder is global, and the listener lives as long
/// as the runtime it was started on. Must be called inside a tokio runtime.
///
/// # Errors
///
/// When the address cannot be bound, or a recorder is already installed.
pub fn serve_metrics(address: SocketAddr) -> Result<(), MetricsError> {
    let install = |source| MetricsError::Install { address, source };

    // Every `_seconds` metric is a real histogram with the same buckets
    // (without buckets, the exporter would render summaries).
    PrometheusBuilder::new()
        .with_http_listener(address)
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".to_owned()),
            &crate::metrics::DURATION_BUCKETS,
        )
        .and_then(PrometheusBuilder::install)
        .map_err(install)?;

    crate::metrics::describe();
    Ok(())
}
