//! Compiles the protocol buffers with a pure-Rust compiler (protox), so
//! building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "mesh/v1/identity.proto",
        "mesh/v1/discovery.proto",
        "opentelemetry/proto/trace/v1/trace.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed=proto/{file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
