//! `cargo xtask`: the project's automation. `setup` installs what the build
//! needs (idempotently), `build-ebpf` builds the kernel programs, `test` runs
//! every check and test, `cluster` manages a local cluster, `demo` shows the
//! mesh at work on one, `bench` and `soak` measure it.

mod bench;
mod cluster;
mod demo;
mod ebpf;
mod run;
mod setup;
mod soak;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Build, test and demonstrate the mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what the build needs: the nightly's rust-src, bpf-linker
    /// (against the nightly's own LLVM) and Debian packages. Idempotent.
    Setup,
    /// Build the eBPF programs (embedded into mesh-node at build time).
    BuildEbpf,
    /// Run every check and test: fmt, clippy, unit tests, then the root-only
    /// eBPF and cluster tests, serially.
    Test,
    /// Manage a local cluster of network namespaces.
    Cluster {
        #[command(subcommand)]
        command: cluster::Command,
    },
    /// Run benchmarks (release builds) and record them in docs/benchmarks.md.
    ///
    /// Example: cargo xtask bench --quick; cargo xtask bench datapath
    Bench {
        /// One benchmark (default: all).
        name: Option<String>,
        /// Short runs, recorded only in target/bench/results.json.
        #[arg(long)]
        quick: bool,
    },
    /// The mesh at work on a local 3-node cluster: mTLS on the wire,
    /// authorization, a canary, retries, a timeout, the circuit breaker,
    /// certificate rotation, golden signals and a trace, each step checked;
    /// tears everything down at the end or on Ctrl-C.
    Demo(demo::Args),
    /// The long runs of the resilience suite (steady load, configuration
    /// churn, idle connections), recorded in docs/resilience.md.
    ///
    /// Example: cargo xtask soak churn --minutes 1
    Soak(soak::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::for_tests(),
        Command::BuildEbpf => setup::run().and_then(|()| ebpf::build()),
        Command::Test => test::run(),
        Command::Cluster { command } => cluster::run(command),
        Command::Demo(args) => demo::run(args),
        Command::Bench { name, quick } => bench::run(name, quick),
        Command::Soak(args) => soak::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
