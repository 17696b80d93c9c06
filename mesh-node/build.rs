//! Embeds the eBPF object built by `cargo xtask build-ebpf`, so the
//! `mesh-node` binary is self-contained.

use std::path::PathBuf;

fn main() {
    let object = match std::env::var_os("MESH_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/ebpf/bpfel-unknown-none/release/mesh-ebpf"),
    };
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "the eBPF object {} does not exist: build it with `cargo xtask build-ebpf` \
             (or point MESH_EBPF_OBJECT at one)",
            object.display()
        );
    }
    println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", object.display());
}
