//! Compiles the gRPC APIs (`proto/admin.proto`, `proto/peer.proto`) with
//! tonic-prost-build and the protoc shipped by the crate protoc-bin-vendored,
//! so a machine with only Rust builds the relay.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/admin.proto");
    println!("cargo:rerun-if-changed=proto/peer.proto");
    // PROTOC from the environment wins (a distribution's own protoc).
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        .compile_protos(&["proto/admin.proto", "proto/peer.proto"], &["proto"])?;
    Ok(())
}
