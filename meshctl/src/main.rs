//! `meshctl`: the operator's command-line tool.

use clap::{Parser, Subcommand};

/// Operate the mesh.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print meshctl's version.
    ///
    /// Example: meshctl version
    Version,
}

fn main() {
    match Cli::parse().command {
        Command::Version => println!("meshctl {}", env!("CARGO_PKG_VERSION")),
    }
}
