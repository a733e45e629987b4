//! Compiles `proto/halfmq.proto`, `proto/raft.proto` and `proto/rocketmq/v2.proto` with a vendored protoc: a fresh machine needs
//! nothing installed beyond the Rust toolchain.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded, and this only tells
    // prost-build which protoc to run.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/halfmq.proto");
    println!("cargo:rerun-if-changed=proto/raft.proto");
    println!("cargo:rerun-if-changed=proto/rocketmq/v2.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".")
        .compile_protos(
            &[
                "proto/halfmq.proto",
                "proto/raft.proto",
                "proto/rocketmq/v2.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
