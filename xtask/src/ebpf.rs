//! Builds the eBPF programs with the nightly toolchain for
//! `bpfel-unknown-none`; `mesh-node`'s build script embeds the object.

use std::path::PathBuf;

use crate::run::{self, cargo_nightly, root, step};

/// Where the object lands (what `mesh-node/build.rs` embeds by default).
pub fn object() -> PathBuf {
    root().join("target/ebpf/bpfel-unknown-none/release/mesh-ebpf")
}

/// Builds the programs.
pub fn build() -> anyhow::Result<()> {
    step("building the eBPF programs (nightly, bpfel-unknown-none)");
    let ebpf = root().join("mesh-ebpf");
    run::run(
        cargo_nightly()
            .current_dir(&ebpf)
            .args(["build", "--release", "--target-dir"])
            .arg(root().join("target/ebpf")),
    )?;
    println!("    {}", object().display());
    Ok(())
}
