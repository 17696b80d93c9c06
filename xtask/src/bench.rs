//! `cargo xtask bench`: runs the benchmarks in release mode and records
//! their results in docs/benchmarks.md, each in a section of its own that a
//! rerun replaces, and all of a run's figures in `target/bench/results.json`
//! (replaced by each run). `--quick` runs each briefly (a check that
//! everything works: about a minute of measuring once built, span export
//! left out unless named) and records nothing in docs/benchmarks.md.
//! Performance goals live here, never in tests.

use std::{fs, process::Command};

use anyhow::{Context as _, bail};
use mesh_e2e::process::Logs;

use crate::run::{self, cargo, root, step};

pub(crate) mod capture;
mod config_push;
pub(crate) mod datapath;
mod haproxy;
mod tracing;

/// What a benchmark found: its section of docs/benchmarks.md and its
/// figures as JSON.
pub(crate) struct Report {
    pub name: &'static str,
    pub title: &'static str,
    pub body: String,
    pub json: serde_json::Value,
}

/// The benchmarks, by name.
const BENCHES: &[&str] = &[
    "handshakes",
    "capture",
    "datapath",
    "tracing",
    "config-push",
];

/// Everything the benchmarks run (the workspace's binaries and two
/// examples), in release mode, built the same way for every benchmark so
/// that none rebuilds what another built.
pub(crate) fn build() -> anyhow::Result<()> {
    crate::setup::run()?;
    crate::ebpf::build()?;
    // Two invocations: an example brings its package's dev-dependencies'
    // features (tokio's test clock) into everything built beside it, and
    // the binaries measured must be the ones users build.
    run::run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    run::run(cargo().args([
        "build",
        "--release",
        "-p",
        "mesh-identity",
        "--example",
        "handshakes",
        "-p",
        "mesh-node",
        "--example",
        "config_push",
    ]))
}

/// A running control plane, as the benchmarks start it.
pub(crate) struct Control {
    pub process: mesh_e2e::process::Process,
    /// Admin API, `http://host:port`.
    pub api: String,
    /// Node API, `host:port`.
    pub grpc: String,
}

/// Runs `command` (a `mesh-control`, placed by the caller) as `serve` on
/// loopback with a fresh store in `data_dir`, its log going to `logs`
/// (warnings only when that is the terminal); returns once it is ready.
pub(crate) fn serve_control(
    mut command: Command,
    data_dir: &std::path::Path,
    logs: Logs,
) -> anyhow::Result<Control> {
    let _ = fs::remove_dir_all(data_dir);
    command.arg("--data-dir").arg(data_dir).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
    ]);
    if matches!(logs, Logs::Inherit) {
        command.env("RUST_LOG", "warn");
    }
    let (process, ready) = mesh_e2e::process::Process::spawn_ready_with(
        "mesh-control",
        command,
        "ready",
        std::time::Duration::from_secs(30),
        logs,
    )?;
    let field = |name| {
        mesh_e2e::process::ready_field(&ready, name)
            .map(str::to_owned)
            .with_context(|| format!("mesh-control said {ready:?}"))
    };
    Ok(Control {
        api: field("api")?,
        grpc: field("grpc")?,
        process,
    })
}

pub fn run(name: Option<String>, quick: bool) -> anyhow::Result<()> {
    let selected: Vec<&str> = match &name {
        Some(name) if BENCHES.contains(&name.as_str()) => vec![name.as_str()],
        Some(name) => bail!("no benchmark {name:?}; there are: {}", BENCHES.join(", ")),
        // Span export is a cost of its own, not one of the data path's
        // figures: the quick check leaves it out unless named.
        None if quick => {
            println!(
                "    --quick leaves out `tracing`; `cargo xtask bench tracing --quick` runs it"
            );
            BENCHES
                .iter()
                .copied()
                .filter(|b| *b != "tracing")
                .collect()
        }
        None => BENCHES.to_vec(),
    };
    if selected.contains(&"datapath") {
        crate::setup::bench_tools()?;
    }
    let scale = datapath::Scale::of(quick);
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), std::path::PathBuf::from)
        .join("bench");
    fs::create_dir_all(&dir)?;
    let path = dir.join("results.json");
    let mut results = serde_json::Map::new();
    for bench in selected {
        let report = match bench {
            "handshakes" => handshakes(quick)?,
            "capture" => capture::run(quick)?,
            "datapath" => datapath::run(scale)?,
            "tracing" => tracing::run(scale)?,
            "config-push" => config_push::run(quick)?,
            _ => unreachable!("listed in BENCHES"),
        };
        if quick {
            println!("    --quick: not recorded in docs/benchmarks.md");
        } else {
            record(report.name, report.title, &report.body)?;
        }
        results.insert(report.name.into(), report.json);
        // Written after each benchmark, so a later failure keeps what the
        // earlier ones measured.
        let document = serde_json::json!({
            "machine": machine(),
            "quick": quick,
            "results": results,
        });
        fs::write(&path, serde_json::to_string_pretty(&document)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("    figures of this run in {}", path.display());
    Ok(())
}

fn handshakes(quick: bool) -> anyhow::Result<Report> {
    step("benchmark: mTLS handshakes with the strict SPIFFE verifier (release build)");
    // Three runs of 5000 (one of 1000 when quick): the median, and the
    // spread the machine showed.
    let (runs, count) = if quick { (1, 1000) } else { (3, 5000) };
    build()?;
    let mut rates = Vec::new();
    for _ in 0..runs {
        let output = run::output(
            Command::new(capture::release_bin("examples/handshakes")).arg(count.to_string()),
        )?;
        let result: serde_json::Value = serde_json::from_str(output.trim())
            .with_context(|| format!("the benchmark printed {output:?}"))?;
        let rate = result["handshakes_per_second_one_core_both_ends"]
            .as_f64()
            .context("the benchmark printed no rate")?;
        println!("    {rate:.0} handshakes/s");
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    let (low, median, high) = (rates[0], rates[runs / 2], rates[runs - 1]);
    println!(
        "    median {median:.0} handshakes/s on one core doing both ends ({:.0} µs each)",
        1e6 / median
    );
    let body = format!(
        "Full TLS 1.3 mutual-TLS handshakes (ECDSA P-256 certificates from the mesh CA,\n\
         the strict SPIFFE verifier on both sides, no session resumption), client and\n\
         server in one thread over in-memory buffers: one core does both ends' work.\n\
         {runs} run(s) of {count} handshakes.\n\n\
         | handshakes/s, median (one core, both ends) | µs per handshake | runs: lowest – highest |\n\
         |---:|---:|---:|\n\
         | {median:.0} | {:.0} | {low:.0} – {high:.0} |\n\n\
         Per side that is roughly twice the rate. Tunnels are pooled per identity\n\
         pair, so this cost is paid per tunnel, not per request.\n\n\
         Machine: {}. Reproduce: `cargo xtask bench handshakes`.",
        1e6 / median,
        machine()
    );
    Ok(Report {
        name: "handshakes",
        title: "mTLS handshakes",
        body,
        json: serde_json::json!({
            "handshakes_per_second_one_core_both_ends": median,
            "runs": rates,
        }),
    })
}

/// CPU model and core count, for the record.
pub(crate) fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    // The CPUs online, not the ones this process may use: the data path
    // benchmark pins itself to one while it writes its report.
    let cores = fs::read_to_string("/proc/cpuinfo").map_or(0, |info| {
        info.lines().filter(|l| l.starts_with("processor")).count()
    });
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, measured {date}")
}

/// Replaces (or appends) the section `name` of docs/benchmarks.md.
pub(crate) fn record(name: &str, title: &str, body: &str) -> anyhow::Result<()> {
    let path = root().join("docs/benchmarks.md");
    if !path.exists() {
        fs::write(
            &path,
            "# Benchmarks\n\nWritten by `cargo xtask bench`; each section is replaced when its benchmark reruns.\n",
        )?;
    }
    record_section(
        &path,
        &format!("bench:{name}"),
        &format!("## {title}"),
        body,
    )
}

/// Replaces the section marked `marker` in the document at `path` with
/// `heading` and `body`, or appends it.
pub(crate) fn record_section(
    path: &std::path::Path,
    marker: &str,
    heading: &str,
    body: &str,
) -> anyhow::Result<()> {
    let mut text =
        fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let begin = format!("<!-- {marker} -->");
    let end = format!("<!-- /{marker} -->");
    let section = format!("{begin}\n{heading}\n\n{body}\n{end}");
    match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) if e > b => text.replace_range(b..e + end.len(), &section),
        _ => {
            text.push('\n');
            text.push_str(&section);
            text.push('\n');
        }
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    println!("    recorded in {}", path.display());
    Ok(())
}
