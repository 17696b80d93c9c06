//! `cargo xtask test`: every check and test the project has, in the order
//! that fails fastest, and last the demo. The root-only tests (eBPF in the
//! kernel, network namespaces) run serially, and the run fails if they or
//! the demo leave a namespace or cgroup behind.

use std::time::Instant;

use anyhow::{Context as _, bail};

use crate::{
    demo, ebpf, run,
    run::{Tally, cargo, cargo_nightly, root, step},
    setup,
};

/// How long each fuzz target runs in a test run (longer runs: `cargo fuzz
/// run TARGET` in `fuzz/`).
const FUZZ_SECONDS: u32 = 15;

/// Builds the fuzz targets (`fuzz/`) and runs each for `seconds` from its
/// seeds, new inputs going to a scratch corpus; a crash fails the run and
/// leaves its input under `fuzz/artifacts/`.
fn fuzz(seconds: u32, tally: &mut Tally) -> anyhow::Result<()> {
    step(&format!("fuzz targets, {seconds} s each (cargo fuzz)"));
    let runs = fuzz_targets(seconds)?;
    tally.passed += runs.len() as u64;
    Ok(())
}

/// One fuzz target's run: its name and libFuzzer's last `DONE` line (runs
/// and seconds).
pub struct FuzzRun {
    pub target: String,
    pub done: String,
}

/// Builds the fuzz targets and runs each for `seconds` (see [`fuzz`]);
/// stops at the first failure.
pub fn fuzz_targets(seconds: u32) -> anyhow::Result<Vec<FuzzRun>> {
    run::run(cargo_fuzz().args(["build", "--release"]))?;
    let listed = cargo_fuzz()
        .arg("list")
        .output()
        .context("listing the fuzz targets")?;
    let targets: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        bail!("cargo fuzz list found no targets");
    }
    let scratch = std::env::temp_dir().join(format!("mesh-fuzz-{}", std::process::id()));
    let result = run_targets(&targets, seconds, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// `cargo +nightly fuzz`, in the workspace root (it finds `fuzz/`).
fn cargo_fuzz() -> std::process::Command {
    let mut command = cargo_nightly();
    command.arg("fuzz");
    command
}

fn run_targets(
    targets: &[String],
    seconds: u32,
    scratch: &std::path::Path,
) -> anyhow::Result<Vec<FuzzRun>> {
    let mut runs = Vec::new();
    for target in targets {
        let corpus = scratch.join(target);
        std::fs::create_dir_all(&corpus)?;
        // libFuzzer reports every new input: kept, and shown on failure.
        let output = cargo_fuzz()
            .args(["run", "--release", target])
            .arg(&corpus)
            .arg(root().join("fuzz/seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .output()
            .with_context(|| format!("running fuzz target {target}"))?;
        let log = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            for line in tail.iter().rev() {
                eprintln!("    {line}");
            }
            bail!("fuzz target {target} failed; its input is in fuzz/artifacts/{target}");
        }
        let done = log
            .lines()
            .rfind(|line| line.split_whitespace().nth(1) == Some("DONE"))
            .map_or("", |line| line.trim());
        println!("    {target}: no failure in {seconds} s ({done})");
        runs.push(FuzzRun {
            target: target.clone(),
            done: done.to_owned(),
        });
    }
    Ok(runs)
}

/// Test clusters are named `e2e…` (see `tests/tests`).
const TEST_CLUSTER_PREFIX: &str = "e2e";

pub fn run() -> anyhow::Result<()> {
    let start = Instant::now();
    setup::for_tests()?;
    ebpf::build()?;

    step("cargo fmt --check");
    run::run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run::run(
        cargo_nightly()
            .current_dir(root().join("mesh-ebpf"))
            .args(["fmt", "--", "--check"]),
    )?;

    step("cargo clippy -D warnings");
    run::run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run::run(
        cargo_nightly()
            .current_dir(root().join("mesh-ebpf"))
            .args(["clippy", "--release", "--target-dir"])
            .arg(root().join("target/ebpf"))
            .args(["--", "-D", "warnings"]),
    )?;

    step("starting a private PostgreSQL for the store tests");
    let postgres = mesh_e2e::postgres::TestPostgres::start().context("starting PostgreSQL")?;
    println!("    {}", postgres.url());

    // Every cargo invocation selects the whole workspace, so features
    // resolve the same way each time and nothing is compiled twice; the
    // targets are chosen by kind and by name instead.
    let tests = IntegrationTests::find()?;
    step("unit tests");
    let mut tally = Tally::default();
    run::run_tests(
        cargo().args(["test", "--workspace", "--lib", "--bins"]),
        &mut tally,
    )?;
    run::run_tests(cargo().args(["test", "--workspace", "--doc"]), &mut tally)?;

    step("component and store tests (real PostgreSQL and SQLite, loopback)");
    run::run_tests(
        cargo()
            .args(["test", "--workspace"])
            .args(tests.component.iter().flat_map(|t| ["--test", t.as_str()]))
            .env("MESH_TEST_POSTGRES_URL", postgres.url()),
        &mut tally,
    )?;
    drop(postgres);

    fuzz(FUZZ_SECONDS, &mut tally)?;

    step("root tests: eBPF in the kernel and the local cluster (serial)");
    if !run::is_root() {
        bail!("the eBPF and cluster tests need root: run `cargo xtask test` as root");
    }
    sweep_test_clusters()?;
    let namespaces_before = mesh_e2e::netns::list("").context("listing network namespaces")?;
    // The binaries these tests start (mesh-node, mesh-control, meshctl) were
    // built for the component tests of their own crates.
    let result = run::run_tests(
        cargo()
            .args(["test", "--workspace"])
            .args(tests.root.iter().flat_map(|t| ["--test", t.as_str()]))
            .args(["--", "--test-threads=1"]),
        &mut tally,
    );
    let leftovers = sweep_test_clusters()?;
    result?;

    // The README's main command, so it cannot rot: every step checks what
    // it shows, and it must leave nothing behind either.
    step("the demo, end to end (`cargo xtask demo`)");
    demo::run(demo::Args::default()).context("the demo failed")?;
    tally.passed += 1;

    let namespaces_after = mesh_e2e::netns::list("").context("listing network namespaces")?;
    if leftovers > 0 || namespaces_after != namespaces_before {
        bail!(
            "the root tests left state behind ({leftovers} clusters swept; namespaces before {namespaces_before:?}, after {namespaces_after:?})"
        );
    }
    println!("all checks passed in {:.0}s", start.elapsed().as_secs_f64());
    // The closing line CI reads.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.ignored
    );
    Ok(())
}

/// The integration tests (`<crate>/tests/*.rs`) by name: those of the
/// end-to-end package (`tests/`, root only) and the others.
#[derive(Debug)]
struct IntegrationTests {
    component: Vec<String>,
    root: Vec<String>,
}

impl IntegrationTests {
    fn find() -> anyhow::Result<Self> {
        let mut component = Vec::new();
        let mut root_tests = Vec::new();
        for entry in std::fs::read_dir(root()).context("listing the workspace")? {
            let dir = entry?.path();
            let tests_dir = dir.join("tests");
            // mesh-ebpf is not a workspace member (and has no tests).
            if !dir.join("Cargo.toml").is_file()
                || !tests_dir.is_dir()
                || dir.ends_with("mesh-ebpf")
            {
                continue;
            }
            let into = if dir.ends_with("tests") {
                &mut root_tests
            } else {
                &mut component
            };
            for file in std::fs::read_dir(&tests_dir)? {
                let file = file?.path();
                if file.extension().is_some_and(|e| e == "rs")
                    && let Some(name) = file.file_stem().and_then(|n| n.to_str())
                {
                    into.push(name.to_owned());
                }
            }
        }
        component.sort();
        root_tests.sort();
        // `--test NAME` selects by name across the workspace: a name in
        // both lists would run in both phases.
        if let Some(twin) = component.iter().find(|name| root_tests.contains(name)) {
            bail!(
                "integration test {twin:?} exists in tests/tests and in another crate; rename one"
            );
        }
        if let Some(twin) = component.windows(2).find(|pair| pair[0] == pair[1]) {
            bail!(
                "two crates have an integration test named {:?}; rename one",
                twin[0]
            );
        }
        Ok(Self {
            component,
            root: root_tests,
        })
    }
}

/// Tears down every test cluster still present; returns how many there were.
fn sweep_test_clusters() -> anyhow::Result<usize> {
    let mut names: Vec<String> = mesh_e2e::netns::list(&format!("mesh-{TEST_CLUSTER_PREFIX}"))?
        .iter()
        .filter_map(|ns| {
            ns.strip_prefix("mesh-")?
                .split('-')
                .next()
                .map(str::to_owned)
        })
        .collect();
    let cgroup_root = mesh_e2e::cgroup::root()?;
    for entry in std::fs::read_dir(&cgroup_root)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(cluster) = name.strip_prefix("mesh-")
            && cluster.starts_with(TEST_CLUSTER_PREFIX)
        {
            names.push(cluster.to_owned());
        }
    }
    names.sort();
    names.dedup();
    for name in &names {
        let report = mesh_e2e::cluster::teardown(name)?;
        println!("    swept test cluster {name}: {report}");
    }
    Ok(names.len())
}
