//! `cargo xtask soak [load|churn|idle|fuzz] [--minutes N]`: the long runs of the
//! resilience suite, on the benchmark's local cluster (a client pod on
//! node0, a server pod on node1, release builds), each recorded in
//! docs/resilience.md with its verdict and figures.
//!
//! - `load`: keep-alive HTTP through two proxies at c=16 for 10 minutes,
//!   alternating the L7 path (the service address) and the L4 path (the
//!   pod's address); each proxy's RSS and open descriptors sampled
//!   between rounds. Passes with no failed request and no growth past the
//!   first minute's level (RSS +20 % and 4 MiB, descriptors +32).
//! - `churn`: 10 configuration changes a second for 5 minutes (the
//!   service's policy, a new timeout each time) while requests flow.
//!   Passes with no failed request or write, both nodes holding the last
//!   change once writes stop, and no memory growth past the first
//!   minute's level.
//! - `fuzz`: every fuzz target for `--minutes` each (5 by default), the
//!   long version of the 15 s each `cargo xtask test` gives them. Passes
//!   when none finds a failure (a failing input is kept under
//!   `fuzz/artifacts/`).
//! - `idle`: 10,000 connections from the client pod to an echo server on
//!   the other node, each round-tripped once and then held: HBONE streams
//!   over the pooled tunnel connections. Reports each proxy's memory and
//!   descriptors per held connection; passes when every connection opened
//!   and the descriptors return to their level once they close.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::{
    bench::{
        self,
        capture::release_bin,
        datapath::{self, L7_VIP, Setup},
    },
    demo::meshctl_at,
    run::{self, root, step},
};

/// The scenarios, by name.
const SCENARIOS: &[&str] = &["load", "churn", "idle", "fuzz"];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// One scenario: load, churn, idle or fuzz (default: all four).
    scenario: Option<String>,
    /// How long each runs (default: load 10, churn 5, fuzz 5 per target).
    #[arg(long)]
    minutes: Option<u64>,
    /// Connections `idle` holds, each an HBONE stream, ten to a pooled
    /// mTLS connection. (A node proxy's permits are its open-file limit
    /// less an eighth: with this machine's hard limit of 20,000, which an
    /// unprivileged container cannot raise, 17,500; the destination's
    /// proxy takes one per stream and one per pooled connection.)
    #[arg(long, default_value_t = 10_000)]
    connections: u32,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !run::is_root() {
        bail!("the soak scenarios build network namespaces and load eBPF: run them as root");
    }
    let chosen: Vec<&str> = match &args.scenario {
        Some(name) if SCENARIOS.contains(&name.as_str()) => vec![name.as_str()],
        Some(name) => bail!("no soak scenario {name:?}; there are {SCENARIOS:?}"),
        None => SCENARIOS.to_vec(),
    };
    if chosen.iter().any(|scenario| *scenario != "fuzz") {
        // The mesh the benchmarks run, and so their servers (iperf3,
        // nghttpd) too.
        crate::setup::bench_tools()?;
        datapath::build()?;
    }
    let mut failed = Vec::new();
    for scenario in chosen {
        if scenario == "fuzz" {
            let (title, body) = fuzz(args.minutes.unwrap_or(5))?;
            record(scenario, &title, &body)?;
            continue;
        }
        let data_dir = std::env::temp_dir().join(format!("mesh-soak-{scenario}"));
        // Idle: pooled tunnels close 5 s after their last stream, so the
        // descriptors can be seen coming back; ten streams per pooled
        // connection, so 10,000 streams make 1,000 connections.
        let node_args: &[&str] = if scenario == "idle" {
            &["--tunnel-idle-timeout", "5s", "--tunnel-max-streams", "10"]
        } else {
            &[]
        };
        let setup = datapath::up(&data_dir, node_args)?;
        let verdict = match scenario {
            "load" => load(&setup, args.minutes.unwrap_or(10)),
            "churn" => churn(&setup, &data_dir, args.minutes.unwrap_or(5)),
            _ => idle(&setup, args.connections),
        };
        drop(setup);
        mesh_e2e::cluster::teardown(datapath::CLUSTER)?;
        let _ = std::fs::remove_dir_all(&data_dir);
        let (passed, title, body) = verdict?;
        record(scenario, &title, &body)?;
        if !passed {
            failed.push(scenario);
        }
    }
    ensure!(failed.is_empty(), "soak scenarios failed: {failed:?}");
    Ok(())
}

/// Open file descriptors of `pid`.
fn descriptors(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count())
}

/// What the proxies hold at one moment.
#[derive(Clone, Copy, Debug)]
struct Held {
    rss_mib: [f64; 2],
    fds: [usize; 2],
}

fn held(setup: &Setup) -> anyhow::Result<Held> {
    let pid = |node: usize| setup.nodes[node].id();
    Ok(Held {
        rss_mib: [datapath::rss_mib(pid(0))?, datapath::rss_mib(pid(1))?],
        fds: [descriptors(pid(0))?, descriptors(pid(1))?],
    })
}

/// Whether `last` stayed within the growth allowed over `baseline`.
fn bounded(baseline: Held, last: Held) -> bool {
    (0..2).all(|node| {
        last.rss_mib[node] <= baseline.rss_mib[node] * 1.2 + 4.0
            && last.fds[node] <= baseline.fds[node] + 32
    })
}

/// Whether the proxies ended within the growth allowed over what they held
/// after the first minute.
fn steady(per_minute: &[Minute]) -> anyhow::Result<bool> {
    let held = |minute: Option<&Minute>| minute.and_then(|m| m.held).context("no sample");
    Ok(bounded(held(per_minute.first())?, held(per_minute.last())?))
}

/// One round of keep-alive GETs from the client pod: (requests, p50 µs,
/// p99 µs), or why it failed.
fn round(
    cluster: &mesh_e2e::Cluster,
    to: &str,
    connections: usize,
    requests: usize,
) -> anyhow::Result<[f64; 3]> {
    let result = datapath::pod_run(
        cluster,
        "shop/client",
        &[
            "bench-http",
            "--to",
            to,
            "--connections",
            &connections.to_string(),
            "--requests",
            &requests.to_string(),
        ],
    )?;
    let number = |field: &str| {
        result[field]
            .as_f64()
            .with_context(|| format!("no {field} in {result}"))
    };
    Ok([number("requests")?, number("p50_us")?, number("p99_us")?])
}

/// Per-minute figures of a run.
#[derive(Debug, Default)]
struct Minute {
    rounds: u64,
    failed: u64,
    requests: f64,
    p50: Vec<f64>,
    p99: Vec<f64>,
    held: Option<Held>,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Per minute: rounds of requests, their latency, and what the proxies
/// held at its end.
fn minutes_table(minutes: &[Minute]) -> String {
    table(
        "rounds (failed) | requests | p50 µs | p99 µs",
        "---:|---:|---:|---:",
        minutes,
        |minute| {
            format!(
                "{} ({}) | {:.0} | {:.0} | {:.0}",
                minute.rounds,
                minute.failed,
                minute.requests,
                median(&minute.p50),
                median(&minute.p99)
            )
        },
    )
}

/// Per minute: changes written and what the proxies held at its end.
fn held_table(minutes: &[Minute]) -> String {
    table("changes (failed)", "---:", minutes, |minute| {
        format!("{} ({})", minute.rounds, minute.failed)
    })
}

/// A table of `minutes`, each row its number, the `columns` that `cells`
/// fills, then RSS and descriptors.
fn table(
    columns: &str,
    alignment: &str,
    minutes: &[Minute],
    cells: impl Fn(&Minute) -> String,
) -> String {
    let mut table = format!(
        "| minute | {columns} | RSS node0 / node1 MiB | FDs node0 / node1 |\n\
         |---:|{alignment}|---:|---:|\n"
    );
    for (index, minute) in minutes.iter().enumerate() {
        let held = minute.held.map_or("— | —".into(), |h| {
            format!(
                "{:.1} / {:.1} | {} / {}",
                h.rss_mib[0], h.rss_mib[1], h.fds[0], h.fds[1]
            )
        });
        table.push_str(&format!("| {} | {} | {held} |\n", index + 1, cells(minute)));
    }
    table
}

/// Scenario 9: steady load through two proxies.
fn load(setup: &Setup, minutes: u64) -> anyhow::Result<(bool, String, String)> {
    step(&format!(
        "soak: {minutes} minutes of keep-alive HTTP through two proxies at c=16"
    ));
    let server = setup.cluster.pod("shop/server")?.ip4;
    let l4 = SocketAddr::from((server, 8080)).to_string();
    let l7 = format!("{L7_VIP}:80");
    let started = Instant::now();
    let length = Duration::from_secs(minutes * 60);
    let mut per_minute: Vec<Minute> = Vec::new();
    let mut errors = Vec::new();
    let mut turn = 0u64;
    while started.elapsed() < length {
        let index = (started.elapsed().as_secs() / 60) as usize;
        if per_minute.len() <= index {
            per_minute.resize_with(index + 1, Minute::default);
        }
        let to = if turn.is_multiple_of(2) { &l7 } else { &l4 };
        turn += 1;
        let minute = &mut per_minute[index];
        minute.rounds += 1;
        match round(&setup.cluster, to, 16, 16_000) {
            Ok([requests, p50, p99]) => {
                minute.requests += requests;
                minute.p50.push(p50);
                minute.p99.push(p99);
            }
            Err(error) => {
                minute.failed += 1;
                errors.push(format!("{:?} in, to {to}: {error:#}", started.elapsed()));
            }
        }
        minute.held = Some(held(setup)?);
        println!(
            "    {:>4.0} s: {} rounds, {} failed; RSS {:.1} / {:.1} MiB, FDs {} / {}",
            started.elapsed().as_secs_f64(),
            turn,
            errors.len(),
            minute.held.map_or(0.0, |h| h.rss_mib[0]),
            minute.held.map_or(0.0, |h| h.rss_mib[1]),
            minute.held.map_or(0, |h| h.fds[0]),
            minute.held.map_or(0, |h| h.fds[1]),
        );
    }
    let total: f64 = per_minute.iter().map(|m| m.requests).sum();
    let passed = errors.is_empty() && steady(&per_minute)?;
    let body = format!(
        "{} for {minutes} minutes: {total:.0} requests in rounds of 16,000 keep-alive GETs over 16\n\
         connections (new connections each round), alternately to the service address (L7:\n\
         split, breaker, balancer, retries) and to the pod's address (L4), client pod on\n\
         node0, server pod on node1. Between rounds, each `mesh-node`'s RSS and open\n\
         descriptors. Passes with no failed request and, at the end, RSS within +20 % + 4 MiB\n\
         and descriptors within +32 of the first minute's.\n\n\
         {}\n\
         Failed rounds: {}.\n\n\
         Machine: {}. Reproduce: `cargo xtask soak load [--minutes N]` (root).",
        if passed { "**Passed**" } else { "**Failed**" },
        minutes_table(&per_minute),
        if errors.is_empty() {
            "none".to_owned()
        } else {
            errors.join("; ")
        },
        bench::machine(),
    );
    Ok((
        passed,
        "Steady load through two proxies (case 9)".into(),
        body,
    ))
}

/// Scenario 11, the long runs: every fuzz target for `minutes`. A failure
/// is an error (the run stops there, its input kept by cargo fuzz).
fn fuzz(minutes: u64) -> anyhow::Result<(String, String)> {
    step(&format!("fuzz targets, {minutes} min each"));
    let seconds = u32::try_from(minutes * 60).context("--minutes")?;
    let runs = crate::test::fuzz_targets(seconds)?;
    let mut table = String::from("| target | runs | result |\n|---|---:|---|\n");
    for run in &runs {
        // libFuzzer's `#<runs> DONE ...`.
        let count = run
            .done
            .split_whitespace()
            .next()
            .and_then(|first| first.strip_prefix('#'))
            .unwrap_or("?");
        table.push_str(&format!("| {} | {count} | no failure |\n", run.target));
    }
    let body = format!(
        "**Passed**: {} targets, {minutes} minutes each, from their seeds, with the\n\
         properties each target checks beyond \"no panic\" (see `fuzz/fuzz_targets`).\n\n\
         {table}\n\
         Machine: {}. Reproduce: `cargo xtask soak fuzz [--minutes N]`.",
        runs.len(),
        bench::machine(),
    );
    Ok(("Fuzzing, the long runs (case 11)".into(), body))
}

/// Scenario 8: configuration churn while serving.
fn churn(setup: &Setup, data_dir: &Path, minutes: u64) -> anyhow::Result<(bool, String, String)> {
    step(&format!(
        "soak: 10 configuration changes a second for {minutes} minutes, under traffic"
    ));
    let meshctl = release_bin("meshctl");
    let l7 = format!("{L7_VIP}:80");
    // Traffic on its own thread, in rounds, until the writes stop.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let traffic = std::thread::scope(|scope| -> anyhow::Result<_> {
        let worker = {
            let (stop, served, l7) = (stop.clone(), served.clone(), l7.clone());
            let cluster = &setup.cluster;
            scope.spawn(move || {
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match round(cluster, &l7, 4, 2_000) {
                        Ok([requests, ..]) => {
                            served.fetch_add(requests as u64, Ordering::Relaxed);
                        }
                        Err(error) => errors.push(format!("{error:#}")),
                    }
                }
                errors
            })
        };
        let writes = writes(setup, data_dir, &meshctl, minutes);
        stop.store(true, Ordering::Relaxed);
        let errors = worker.join().expect("the traffic thread does not panic");
        Ok((writes, errors))
    })?;
    let (writes, traffic_errors) = traffic;
    let Writes {
        made,
        failed,
        last_timeout,
        per_minute,
        control_rss,
    } = writes?;

    // No stale configuration: both nodes end at the control plane's
    // revision, holding the last timeout.
    let settled = Instant::now();
    let revision: i64 = {
        let status = meshctl_at(
            &meshctl,
            &setup.api,
            data_dir,
            &["proxy-status", "-o", "json"],
            "",
        )?;
        let status: serde_json::Value = serde_json::from_str(&status)?;
        status["revision"].as_i64().context("no revision")?
    };
    let mut converged = None;
    while settled.elapsed() < Duration::from_secs(30) {
        let at = |node: usize| -> anyhow::Result<i64> {
            let config = mesh_e2e::http::get(setup.admins[node], "/config")?;
            let config: serde_json::Value = serde_json::from_str(&config.body)?;
            Ok(config["revision"].as_i64().unwrap_or(0))
        };
        if at(0)? >= revision && at(1)? >= revision {
            converged = Some(settled.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dump = mesh_e2e::http::get(setup.admins[0], "/config/dump")?.body;
    let dump: serde_json::Value = serde_json::from_str(&dump).context("node0's /config/dump")?;
    let holds_last = holds(&dump, "timeout_ms", last_timeout);
    let passed = failed.is_empty()
        && traffic_errors.is_empty()
        && converged.is_some()
        && holds_last
        && steady(&per_minute)?;
    let body = format!(
        "{} for {minutes} minutes: {made} changes written through the API at 10 a second (the\n\
         `web` service's ServicePolicy, a new `timeout_ms` each time: a change both nodes\n\
         hold), {} failed; meanwhile {} requests through the L7 path in rounds of 2,000 over\n\
         4 connections, {} rounds failed. Once the writes stopped, both nodes held the control\n\
         plane's revision {revision} {}, and node0 held the last timeout ({last_timeout} ms): {}.\n\
         `mesh-control` RSS {:.1} MiB after the first minute, {:.1} MiB at the end.\n\n\
         {}\n\
         Failed writes: {}. Failed rounds: {}.\n\n\
         Machine: {}. Reproduce: `cargo xtask soak churn [--minutes N]` (root).",
        if passed { "**Passed**" } else { "**Failed**" },
        failed.len(),
        served.load(Ordering::Relaxed),
        traffic_errors.len(),
        converged.map_or("— **not within 30 s**".to_owned(), |after| format!(
            "within {:.2} s",
            after.as_secs_f64()
        )),
        if holds_last { "yes" } else { "**no**" },
        control_rss.0,
        control_rss.1,
        held_table(&per_minute),
        if failed.is_empty() {
            "none".to_owned()
        } else {
            failed.join("; ")
        },
        if traffic_errors.is_empty() {
            "none".to_owned()
        } else {
            traffic_errors.join("; ")
        },
        bench::machine(),
    );
    Ok((
        passed,
        "Configuration churn under traffic (case 8)".into(),
        body,
    ))
}

/// Case 10: what idle connections cost the proxies.
fn idle(setup: &Setup, connections: u32) -> anyhow::Result<(bool, String, String)> {
    step(&format!(
        "soak: {connections} idle connections through the mesh, held"
    ));
    // The set-up's echo server (the benchmarks' too).
    let server = setup.cluster.pod("shop/server")?.ip4;
    let to = SocketAddr::from((server, datapath::ECHO_PORT)).to_string();
    let pooled = |node: usize| -> anyhow::Result<u64> {
        Ok(
            mesh_e2e::http::metric(setup.admins[node], "mesh_tunnel_pooled_connections")?
                .and_then(|value| value.parse().ok())
                .unwrap_or(0),
        )
    };
    let before = held(setup)?;
    let mut holder = setup
        .cluster
        .pod_command("shop/client", release_bin("mesh-pod"))?;
    holder.args([
        "hold-many",
        "--to",
        &to,
        "--count",
        &connections.to_string(),
    ]);
    let opening = Instant::now();
    let (holder, line) = mesh_e2e::process::Process::spawn_ready(
        "hold-many",
        holder,
        "{",
        Duration::from_secs(600),
    )?;
    let opened_in = opening.elapsed();
    let answer: serde_json::Value = serde_json::from_str(&line)?;
    ensure!(
        answer["held"].as_u64() == Some(u64::from(connections)),
        "hold-many said {line}"
    );
    let holding = held(setup)?;
    let tunnels = pooled(0)?;
    // Every connection was still open while it was measured.
    let mut holder = holder;
    holder.send_line("check")?;
    let alive = holder.wait_for_line("{", Duration::from_secs(600))?;
    let alive: serde_json::Value = serde_json::from_str(&alive)?;
    ensure!(
        alive["alive"].as_u64() == Some(u64::from(connections)),
        "after measuring, hold-many said {alive}"
    );
    let status = holder.finish()?;
    ensure!(status.success(), "hold-many exited {status}");
    // Closed: the descriptors come back.
    let closing = Instant::now();
    let mut after = held(setup)?;
    while closing.elapsed() < Duration::from_secs(60)
        && (0..2).any(|node| after.fds[node] > before.fds[node] + 8)
    {
        std::thread::sleep(Duration::from_millis(200));
        after = held(setup)?;
    }
    let released = (0..2).all(|node| after.fds[node] <= before.fds[node] + 8);
    // The proxies give freed memory back a few seconds after a drop.
    let settling = Instant::now();
    let high = |node: usize, held: &Held| {
        held.rss_mib[node]
            > before.rss_mib[node] + (holding.rss_mib[node] - before.rss_mib[node]) / 4.0
    };
    while settling.elapsed() < Duration::from_secs(15) && (0..2).any(|node| high(node, &after)) {
        std::thread::sleep(Duration::from_millis(500));
        after = held(setup)?;
    }
    let per = |node: usize| {
        (holding.rss_mib[node] - before.rss_mib[node]) * 1024.0 / f64::from(connections)
    };
    let fds_per =
        |node: usize| (holding.fds[node] as f64 - before.fds[node] as f64) / f64::from(connections);
    println!(
        "    {connections} held over {tunnels} pooled tunnel connections: node0 {:.2} KiB and {:.2} FDs each, node1 {:.2} KiB and {:.2} FDs each",
        per(0),
        fds_per(0),
        per(1),
        fds_per(1)
    );
    let body = format!(
        "{}: {connections} TCP connections from the client pod (node0) to an echo server\n\
         in the server pod (node1), opened one after another in {:.1} s, each round-tripped\n\
         once and then held idle: {connections} HBONE streams over {tunnels} pooled mTLS connections.\n\n\
         | | node0 (client side) | node1 (server side) |\n\
         |---|---:|---:|\n\
         | RSS before, MiB | {:.1} | {:.1} |\n\
         | RSS holding, MiB | {:.1} | {:.1} |\n\
         | RSS per held connection, KiB | {:.2} | {:.2} |\n\
         | descriptors before / holding / after closing | {} / {} / {} | {} / {} / {} |\n\
         | descriptors per held connection | {:.2} | {:.2} |\n\n\
         Passes when every connection opened and, once they closed, each proxy's\n\
         descriptors came back within 8 of where they were. RSS after closing:\n\
         {:.1} / {:.1} MiB (a proxy gives freed memory back with `malloc_trim` once the\n\
         descriptors its connections hold, pooled tunnels included, fall to half their\n\
         peak; the `load` scenario watches growth over time).\n\n\
         Machine: {}. Reproduce: `cargo xtask soak idle [--connections N]` (root).",
        if released { "**Passed**" } else { "**Failed**" },
        opened_in.as_secs_f64(),
        before.rss_mib[0],
        before.rss_mib[1],
        holding.rss_mib[0],
        holding.rss_mib[1],
        per(0),
        per(1),
        before.fds[0],
        holding.fds[0],
        after.fds[0],
        before.fds[1],
        holding.fds[1],
        after.fds[1],
        fds_per(0),
        fds_per(1),
        after.rss_mib[0],
        after.rss_mib[1],
        bench::machine(),
    );
    Ok((
        released,
        "Idle connections and streams (case 10)".into(),
        body,
    ))
}

/// What the writing side of `churn` did.
struct Writes {
    made: u64,
    failed: Vec<String>,
    last_timeout: u64,
    per_minute: Vec<Minute>,
    /// The control plane's RSS after the first minute and at the end.
    control_rss: (f64, f64),
}

/// Writes a change every 100 ms for `minutes`, on schedule (a slow write
/// delays the next, never skips it).
fn writes(setup: &Setup, data_dir: &Path, meshctl: &Path, minutes: u64) -> anyhow::Result<Writes> {
    let started = Instant::now();
    let length = Duration::from_secs(minutes * 60);
    let mut per_minute: Vec<Minute> = Vec::new();
    let mut failed = Vec::new();
    let mut made = 0u64;
    let mut last_timeout = 0;
    let mut control_first = None;
    while started.elapsed() < length {
        let due = started + Duration::from_millis(100 * made);
        if due >= started + length {
            break;
        }
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let timeout = 1_000 + made;
        let policy = format!(
            "apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {{name: web, namespace: shop}}\n\
             spec: {{timeout_ms: {timeout}}}\n"
        );
        let written = meshctl_at(
            meshctl,
            &setup.api,
            data_dir,
            &["apply", "-f", "-"],
            &policy,
        );
        match &written {
            Ok(_) => last_timeout = timeout,
            Err(error) => failed.push(format!("{:?} in: {error:#}", started.elapsed())),
        }
        made += 1;
        let index = (started.elapsed().as_secs() / 60) as usize;
        if per_minute.len() <= index {
            // A new minute: sample what the previous one ended with.
            if let Some(previous) = per_minute.last_mut() {
                previous.held = Some(held(setup)?);
                control_first.get_or_insert(datapath::rss_mib(setup.control)?);
                println!(
                    "    minute {}: {} changes written, {} failed",
                    per_minute.len(),
                    made,
                    failed.len()
                );
            }
            per_minute.resize_with(index + 1, Minute::default);
        }
        per_minute[index].rounds += 1;
        if written.is_err() {
            per_minute[index].failed += 1;
        }
    }
    if let Some(last) = per_minute.last_mut() {
        last.held = Some(held(setup)?);
    }
    let control_last = datapath::rss_mib(setup.control)?;
    Ok(Writes {
        made,
        failed,
        last_timeout,
        per_minute,
        control_rss: (control_first.unwrap_or(control_last), control_last),
    })
}

/// Replaces (or appends) the section of scenario `name` in
/// docs/resilience.md.
fn record(name: &str, title: &str, body: &str) -> anyhow::Result<()> {
    bench::record_section(
        &root().join("docs/resilience.md"),
        &format!("soak:{name}"),
        &format!("### {title}"),
        body,
    )
}

/// Whether `value` holds `key: expected` somewhere inside.
fn holds(value: &serde_json::Value, key: &str, expected: u64) -> bool {
    match value {
        serde_json::Value::Object(map) => map
            .iter()
            .any(|(k, v)| (k == key && v.as_u64() == Some(expected)) || holds(v, key, expected)),
        serde_json::Value::Array(items) => items.iter().any(|v| holds(v, key, expected)),
        _ => false,
    }
}
