//! Compiles Gatehouse's own gRPC API (the admin service) from `proto/`.
//!
//! `protoc` comes from the `protoc-bin-vendored` crate so that a clean clone
//! builds without a system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/gatehouse/admin/v1/admin.proto"],
        &["proto"],
    )?;

    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
