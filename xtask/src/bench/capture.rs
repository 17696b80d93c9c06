//! `cargo xtask bench capture`: what capture adds to `connect()`, measured
//! on a local cluster with release builds. A pod on node0 times blocking
//! `connect()` calls (each closed with a reset) in five set-ups:
//!
//! 1. no programs attached, to a pod on node1 (veth, bridge, fabric);
//! 2. no programs attached, to a listener on the pod's own loopback;
//! 3. programs attached, pod not captured, to the pod on node1 (the bypass
//!    path: what every uncaptured pod pays);
//! 4. pod captured, to the pod on node1: redirected to the proxy's
//!    listener inside the pod, so the connect completes on loopback;
//! 5. pod captured, to its own loopback listener (bypassed).
//!
//! The program's cost on the redirect path is (4) − (2): the same loopback
//! handshake, plus connect4 and sock_ops. Its cost for uncaptured pods is
//! (3) − (1), and for loopback in a captured pod (5) − (2).

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context as _, bail};
use mesh_e2e::{Cluster, ClusterSpec, PodSpec, cluster, process::Process};

use crate::run::{self, root, step};

const CLUSTER: &str = "benchconn";
const CLIENT: &str = "shop/client";
const SERVER: &str = "shop/server";
/// Timed connects per set-up (plus a tenth as warm-up), and runs per
/// set-up (the table shows the median run): full, and `--quick`.
#[derive(Clone, Copy)]
struct Scale {
    count: usize,
    runs: usize,
}
const FULL: Scale = Scale {
    count: 5000,
    runs: 3,
};
const QUICK: Scale = Scale {
    count: 1000,
    runs: 1,
};

pub(crate) fn release_bin(name: &str) -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    target.join("release").join(name)
}

/// p50 and p99 of one set-up, in microseconds (the run with the median
/// p50), and the lowest and highest p50 of its runs.
#[derive(Clone, Copy, Debug)]
struct Latency {
    p50: f64,
    p99: f64,
    p50_low: f64,
    p50_high: f64,
}

fn measure(cluster: &Cluster, to: &str, scale: Scale) -> anyhow::Result<Latency> {
    let mut runs = Vec::new();
    for _ in 0..scale.runs {
        let output = cluster
            .pod_command(CLIENT, release_bin("mesh-pod"))?
            .args([
                "bench-connect",
                "--to",
                to,
                "--count",
                &scale.count.to_string(),
            ])
            .stderr(Stdio::inherit())
            .output()
            .context("running mesh-pod bench-connect")?;
        if !output.status.success() {
            bail!("mesh-pod bench-connect --to {to} failed");
        }
        let result: serde_json::Value = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("bench-connect printed {:?}", output.stdout))?;
        let field = |name: &str| result[name].as_f64().context("missing percentile");
        let p50 = field("p50_us")?;
        runs.push(Latency {
            p50,
            p99: field("p99_us")?,
            p50_low: p50,
            p50_high: p50,
        });
    }
    runs.sort_by(|a, b| a.p50.total_cmp(&b.p50));
    let median = Latency {
        p50_low: runs[0].p50,
        p50_high: runs[runs.len() - 1].p50,
        ..runs[runs.len() / 2]
    };
    println!(
        "    {to:<22} p50 {:>6.1} µs ({:.1}–{:.1})  p99 {:>6.1} µs",
        median.p50, median.p50_low, median.p50_high, median.p99
    );
    Ok(median)
}

fn mesh_node(cluster: &Cluster, capture: bool) -> anyhow::Result<Process> {
    let layout = cluster.layout();
    let mut command = cluster.system_command(release_bin("mesh-node"))?;
    command
        .arg("--cgroup")
        .arg(&layout.nodes[0].cgroup)
        .arg("--bpf-pin-dir")
        .arg(layout.bpf_pin_dir(0))
        .args(["--admin-addr", "127.0.0.1:0", "--drain-timeout", "1s"])
        .env("RUST_LOG", "warn");
    if capture {
        command.arg("--capture").arg(format!(
            "{CLIENT}={}",
            cluster.pod(CLIENT)?.netns_path().display()
        ));
    }
    let (process, _) =
        Process::spawn_ready("mesh-node", command, "ready", Duration::from_secs(30))?;
    Ok(process)
}

pub fn run(quick: bool) -> anyhow::Result<super::Report> {
    step("benchmark: connect() with and without capture (release builds)");
    let scale = if quick { QUICK } else { FULL };
    if !run::is_root() {
        bail!("the capture benchmark builds network namespaces and loads eBPF: run it as root");
    }
    super::build()?;
    cluster::teardown(CLUSTER)?;
    let cluster = Cluster::up(&ClusterSpec {
        name: CLUSTER.into(),
        nodes: 2,
        pods: vec![
            PodSpec::new("shop", "client", 0),
            PodSpec::new("shop", "server", 1),
        ],
    })?;
    let echo = |pod: &str, listen: &str| -> anyhow::Result<Process> {
        let mut command = cluster.pod_command(pod, release_bin("mesh-pod"))?;
        command.args(["echo", "--listen", listen]);
        Ok(Process::spawn_ready(pod, command, "listening", Duration::from_secs(10))?.0)
    };
    let _server = echo(SERVER, "[::]:8080")?;
    let _local = echo(CLIENT, "127.0.0.1:9000")?;
    let remote = format!("{}:8080", cluster.pod(SERVER)?.ip4);
    let local = "127.0.0.1:9000";

    println!("    no capture programs:");
    let direct = measure(&cluster, &remote, scale)?;
    let loopback = measure(&cluster, local, scale)?;
    println!("    programs attached, pod not captured:");
    let node = mesh_node(&cluster, false)?;
    let bypass = measure(&cluster, &remote, scale)?;
    node.terminate()?;
    println!("    pod captured:");
    let node = mesh_node(&cluster, true)?;
    let redirected = measure(&cluster, &remote, scale)?;
    let loopback_captured = measure(&cluster, local, scale)?;
    node.terminate()?;
    drop((_server, _local));
    cluster.down()?;

    let row = |what: &str, l: Latency| {
        format!(
            "| {what} | {:.1} | {:.1} – {:.1} | {:.1} |\n",
            l.p50, l.p50_low, l.p50_high, l.p99
        )
    };
    let delta = |what: &str, a: Latency, b: Latency| {
        format!(
            "| {what} | {:+.1} | {:.2} | {:+.1} |\n",
            a.p50 - b.p50,
            a.p50 / b.p50,
            a.p99 - b.p99
        )
    };
    let body = format!(
        "A pod on node0 of a local netns cluster times blocking `connect()` calls\n\
         ({} per run after a warm-up, each closed with a reset; median of {}\n\
         run(s)), release builds. \"Remote\" is a pod on node1 through veth, bridge and\n\
         the fabric; a captured pod's remote connect is redirected to the proxy's\n\
         listener inside the pod, so it completes on loopback.\n\n\
         | set-up | p50 µs | p50 over the runs | p99 µs |\n|---|---:|---:|---:|\n\
         {}{}{}{}{}\n\
         | added by capture | p50 µs | p50 ratio | p99 µs |\n|---|---:|---:|---:|\n\
         {}{}{}\n\
         The target is at most 5 µs added. Reading the rows: a captured pod's\n\
         connect() returns sooner than a direct one would (it completes on\n\
         loopback; the proxy dials the destination after accepting). Row 4 − 2\n\
         is the programs plus the proxy's own work for each connection (accept,\n\
         the note's lookup, dialling the destination) running on the same two\n\
         cores as the client; the bypass rows carry the programs alone. Compare\n\
         the differences with each row's spread over its runs: on this machine\n\
         a few µs is within run-to-run noise.\n\n\
         Machine: {}. Reproduce: `cargo xtask bench capture` (root).",
        scale.count,
        scale.runs,
        row("1. remote, no programs", direct),
        row("2. loopback, no programs", loopback),
        row("3. remote, programs attached, pod not captured", bypass),
        row(
            "4. remote, pod captured (redirected to the proxy)",
            redirected
        ),
        row("5. loopback, pod captured (bypassed)", loopback_captured),
        delta(
            "redirect path: 4 − 2 (connect4 + sock_ops)",
            redirected,
            loopback
        ),
        delta("uncaptured pod: 3 − 1", bypass, direct),
        delta(
            "loopback in a captured pod: 5 − 2",
            loopback_captured,
            loopback
        ),
        super::machine()
    );
    let figures = |l: Latency| serde_json::json!({ "p50_us": l.p50, "p99_us": l.p99 });
    Ok(super::Report {
        name: "capture",
        title: "connect() with capture",
        body,
        json: serde_json::json!({
            "remote_no_programs": figures(direct),
            "loopback_no_programs": figures(loopback),
            "remote_not_captured": figures(bypass),
            "remote_captured": figures(redirected),
            "loopback_captured": figures(loopback_captured),
            "added_p50_us": redirected.p50 - loopback.p50,
        }),
    })
}
