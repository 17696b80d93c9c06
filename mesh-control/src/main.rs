//! `mesh-control`: the mesh's control plane.
//!
//! The SQL store, the certificate authority and the configuration push land
//! here in the control-plane issues; today the binary only reports its
//! version, so deployments and scripts can already refer to it.

use clap::Parser;

/// The mesh's control plane.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {}

fn main() {
    let _ = Args::parse();
    eprintln!(
        "mesh-control {}: the control plane is not built yet (see docs/ARCHITECTURE.md)",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
