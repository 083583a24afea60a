//! Compiles the gRPC APIs (`proto/admin.proto`, `proto/peer.proto`) with
//! tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/admin.proto");
    println!("cargo:rerun-if-changed=proto/peer.proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/admin.proto", "proto/peer.proto"], &["proto"])?;
    Ok(())
}
