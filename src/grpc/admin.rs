//! Gatehouse's own admin API: which configuration is in force, and reload.
//!
//! It listens on its own (loopback) address, never on the port Envoy calls.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tonic::{Request, Response, Status};

use super::pb::admin_server::Admin;
use super::pb::{
    ConfigVersion, Counters, GetConfigVersionRequest, GetCountersRequest, GetRateLimitStatsRequest,
    RateLimitStats, ReloadRequest, ReloadResponse,
};
use crate::state::State;

/// Serves the admin API.
pub struct AdminService {
    state: Arc<State>,
}

impl AdminService {
    /// An admin API over `state`.
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }

    fn version(&self) -> ConfigVersion {
        let config = &self.state.load().config;
        let loaded_at = config
            .loaded_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();

        ConfigVersion {
            version: config.version.clone(),
            path: config.path.display().to_string(),
            loaded_at_unix: i64::try_from(loaded_at.as_secs()).unwrap_or(i64::MAX),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_config_version(
        &self,
        _request: Request<GetConfigVersionRequest>,
    ) -> Result<Response<ConfigVersion>, Status> {
        Ok(Response::new(self.version()))
    }

    async fn get_counters(
        &self,
        _request: Request<GetCountersRequest>,
    ) -> Result<Response<Counters>, Status> {
        let values = crate::metrics::snapshot()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect();
        Ok(Response::new(Counters { values }))
    }

    async fn reload(
        &self,
        _request: Request<ReloadRequest>,
    ) -> Result<Response<ReloadResponse>, Status> {
        match self.state.reload() {
            Ok(changed) => Ok(Response::new(ReloadResponse {
                current: Some(self.version()),
                changed,
            })),
            Err(err) => {
                tracing::warn!(error = %err, "reload refused; the running configuration stays");
                Err(Status::failed_precondition(err.to_string()))
            }
        }
    }

    async fn get_rate_limit_stats(
        &self,
        _request: Request<GetRateLimitStatsRequest>,
    ) -> Result<Response<RateLimitStats>, Status> {
        let limiter = &self.state.load().limiter;
        Ok(Response::new(RateLimitStats {
            fallbacks: limiter.fallbacks(),
            ready: limiter.is_ready(),
        }))
    }
}
