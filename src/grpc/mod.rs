//! Thin gRPC adapters: Envoy's ext_authz, ext_proc and rate-limit service,
//! health, and
//! Gatehouse's own admin API.
//!
//! This is the only place (with the server wiring) that touches tonic and
//! Envoy's protobuf types; each adapter converts to the core's own types and
//! back, and nothing more.

pub mod admin;
pub mod authz;
pub mod proc;
pub mod ratelimit;

/// Gatehouse's own protobuf API, generated from `proto/`.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("gatehouse.admin.v1");
}

/// The namespace under which Envoy files Check's dynamic metadata, and from
/// which ext_proc receives it when configured to forward it.
pub const METADATA_NAMESPACE: &str = "envoy.filters.http.ext_authz";
