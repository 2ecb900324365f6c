//! Gatehouse: a policy sidecar for Envoy.
//!
//! Envoy calls Gatehouse over gRPC: ext_authz's Check decides each request
//! (route, OAuth2 token, scopes, per-client rate limit) and ext_proc reshapes
//! responses for the clients whose profile asks for it. See `docs/` for the
//! whole picture.

pub mod authn;
pub mod authz;
pub mod check;
pub mod composite;
pub mod config;
pub mod decision;
pub mod grpc;
pub mod metrics;
pub mod profile;
pub mod ratelimit;
pub mod reshape;
pub mod route;
pub mod server;
pub mod shaping;
pub mod state;
pub mod telemetry;
