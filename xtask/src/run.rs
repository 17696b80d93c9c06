//! Running commands with progress output.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

/// The workspace root (xtask's parent directory).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Prints a step heading.
pub fn step(what: &str) {
    println!("==> {what}");
}

/// Runs `command` with inherited output; fails unless it succeeds.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = show(command);
    let start = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("starting `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    println!("    ok in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Tally of libtest's `test result:` lines.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Tally {
    /// Adds the counts of one `test result: ok. 5 passed; 0 failed; ...` line.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match kind {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

/// Runs a `cargo test` command, echoing its output and adding its results
/// to `tally`; fails unless it succeeds.
pub fn run_tests(command: &mut Command, tally: &mut Tally) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let shown = show(command);
    let start = Instant::now();
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{shown}`"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading test output")?;
        println!("{line}");
        tally.add_line(&line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    println!("    ok in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Runs `command` and returns its stdout; fails unless it succeeds.
pub fn output(command: &mut Command) -> anyhow::Result<String> {
    let shown = show(command);
    let output = command
        .output()
        .with_context(|| format!("starting `{shown}`"))?;
    if !output.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The set-up, the eBPF object, then the binaries of `packages` (release
/// builds when `release`), or of the whole workspace when none are named:
/// what the demo and the benchmarks run. The whole workspace resolves
/// features as `cargo xtask test` does, so after the tests it builds
/// nothing again.
pub fn build_binaries(release: bool, packages: &[&str]) -> anyhow::Result<()> {
    crate::setup::run()?;
    crate::ebpf::build()?;
    let mut command = cargo();
    command.arg("build");
    if release {
        command.arg("--release");
    }
    if packages.is_empty() {
        command.arg("--workspace");
    }
    for package in packages {
        command.args(["-p", package]);
    }
    run(command.arg("--bins"))
}

/// `cargo` as invoked by the user (the `CARGO` cargo set for xtask).
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root());
    command
}

/// `cargo +nightly`, for the eBPF crate. Going through rustup's proxy picks
/// the nightly toolchain whatever toolchain runs xtask.
pub fn cargo_nightly() -> Command {
    let mut command = Command::new("cargo");
    command.arg("+nightly").current_dir(root());
    // Variables cargo set for xtask's own (stable) build must not leak into
    // the nightly build.
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
    ] {
        command.env_remove(var);
    }
    command
}

fn show(command: &Command) -> String {
    let mut shown = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        shown.push(' ');
        shown.push_str(&arg.to_string_lossy());
    }
    shown
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    mesh_e2e::require_root().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_reads_libtest_summaries() {
        let mut tally = Tally::default();
        tally.add_line("test result: ok. 5 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        tally.add_line(
            "test result: FAILED. 1 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        tally.add_line("running 4 tests");
        assert_eq!((tally.passed, tally.failed, tally.ignored), (6, 3, 2));
    }
}
