//! `cargo xtask demo`: the mesh at work on a local cluster. Today: eBPF
//! capture of one namespace's pods, counted in the kernel, read back through
//! mesh-node's admin endpoint. Everything is torn down at the end, on error
//! and on Ctrl-C.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use mesh_e2e::{Cluster, ClusterSpec, PodSpec, cluster, http, process::Process};

use crate::{
    ebpf,
    run::{self, cargo, root},
    setup,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

const CLUSTER: &str = "demo";
const FRONTEND: &str = "shop/frontend";
const BACKEND: &str = "shop/backend";
const LEGACY: &str = "legacy/client";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Keep the cluster and mesh-node running at the end, to explore, until
    /// Ctrl-C.
    #[arg(long)]
    keep: bool,
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn heading(n: usize, what: &str) {
    println!("\n[{n}/6] {what}");
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (interrupt_tx, interrupt_rx) = mpsc::sync_channel(1);
    ctrlc::set_handler(move || {
        INTERRUPTED.store(true, Ordering::SeqCst);
        let _ = interrupt_tx.try_send(());
    })
    .context("installing the Ctrl-C handler")?;
    if !run::is_root() {
        bail!("the demo builds network namespaces and loads eBPF: run it as root");
    }

    heading(1, "set-up and build");
    setup::run()?;
    ebpf::build()?;
    run::run(cargo().args(["build", "-p", "mesh-node", "-p", "mesh-e2e", "--bins"]))?;
    check_interrupted()?;

    heading(2, "a local cluster of 2 nodes");
    if cluster::teardown(CLUSTER)?.was_empty() {
        println!("    (no earlier demo cluster to clear)");
    } else {
        println!("    cleared an earlier demo cluster");
    }
    let cluster = Cluster::up(&ClusterSpec {
        name: CLUSTER.into(),
        nodes: 2,
        pods: vec![
            PodSpec::new("shop", "frontend", 0),
            PodSpec::new("legacy", "client", 0),
            PodSpec::new("shop", "backend", 1),
        ],
    })?;
    for pod in &cluster.layout().pods {
        println!(
            "    {:<15} node{}  {:<10} {}",
            pod.id(),
            pod.node,
            pod.ip4,
            pod.ip6
        );
    }
    println!("    namespace shop is captured; namespace legacy is not");
    check_interrupted()?;

    heading(
        3,
        "mesh-node on node0: capture programs attached to node0's pods",
    );
    let node0 = &cluster.layout().nodes[0];
    let frontend = cluster.pod(FRONTEND)?;
    let mut command = cluster.system_command(bin("mesh-node"))?;
    command
        .arg("--cgroup")
        .arg(&node0.cgroup)
        .arg("--capture")
        .arg(format!("{FRONTEND}={}", frontend.netns_path().display()))
        .args(["--admin-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "info,mesh_ebpf=debug");
    let (mesh_node, ready) =
        Process::spawn_ready("mesh-node", command, "ready", Duration::from_secs(30))?;
    let admin: SocketAddr = ready
        .strip_prefix("ready admin=")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("mesh-node said {ready:?}"))?;
    println!("    mesh-node pid {} admin http://{admin}", mesh_node.id());
    check_interrupted()?;

    heading(4, "traffic");
    let mut echo = cluster.pod_command(BACKEND, bin("mesh-pod"))?;
    echo.args(["echo", "--listen", "[::]:8080"]);
    let (backend_echo, _) =
        Process::spawn_ready(BACKEND, echo, "listening", Duration::from_secs(10))?;
    let mut local = cluster.pod_command(FRONTEND, bin("mesh-pod"))?;
    local.args(["echo", "--listen", "127.0.0.1:9000"]);
    let (local_echo, _) =
        Process::spawn_ready(FRONTEND, local, "listening", Duration::from_secs(10))?;
    let backend = format!("{}:8080", cluster.pod(BACKEND)?.ip4);
    connect(&cluster, FRONTEND, &backend, 10)?;
    connect(&cluster, LEGACY, &backend, 5)?;
    connect(&cluster, FRONTEND, "127.0.0.1:9000", 3)?;
    check_interrupted()?;

    heading(5, "what the kernel counted (mesh-node /capture)");
    let state: serde_json::Value = serde_json::from_str(&http::get(admin, "/capture")?.body)
        .context("parsing mesh-node's /capture")?;
    let counters = &state["counters"];
    println!("    {:<16} {:>8}", "POD", "CONNECTS");
    for pod in state["pods"].as_array().into_iter().flatten() {
        println!(
            "    {:<16} {:>8}",
            pod["name"].as_str().unwrap_or("?"),
            pod["connects"]
        );
    }
    println!(
        "    {:<16} {:>8}   (not captured: counted as bypass_uncaptured)",
        LEGACY, "-"
    );
    println!(
        "    events: connect_captured={} bypass_uncaptured={} bypass_loopback={} error={}",
        counters["connect_captured"],
        counters["bypass_uncaptured"],
        counters["bypass_loopback"],
        counters["error"]
    );
    ensure!(
        state["pods"][0]["connects"] == 10
            && counters["bypass_uncaptured"] == 5
            && counters["bypass_loopback"] == 3
            && counters["error"] == 0,
        "the kernel counted something other than the traffic sent: {state}"
    );
    println!("    the counts match the traffic sent");
    let metrics = http::get(admin, "/metrics")?.body;
    println!("    from /metrics:");
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("mesh_capture_pod"))
    {
        println!("      {line}");
    }

    heading(6, "done");
    if args.keep {
        println!("    still running: mesh-node admin http://{admin}/metrics (and /capture)");
        println!("    pods: ip netns exec mesh-{CLUSTER}-shop-frontend <command>");
        println!("    press Ctrl-C to tear everything down");
        let _ = interrupt_rx.recv();
    }
    // mesh-node may already have stopped on the terminal's Ctrl-C.
    drop((backend_echo, local_echo));
    if !INTERRUPTED.load(Ordering::SeqCst) {
        mesh_node.terminate().context("stopping mesh-node")?;
    }
    let report = cluster.down()?;
    println!("    cluster {CLUSTER} torn down: {report}");
    Ok(())
}

fn connect(cluster: &Cluster, from: &str, to: &str, count: u32) -> anyhow::Result<()> {
    let output = cluster
        .pod_command(from, bin("mesh-pod"))?
        .args(["connect", "--to", to, "--count", &count.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running mesh-pod in {from}"))?;
    ensure!(
        output.status.success(),
        "{from} -> {to} failed: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    println!("    {from:<15} -> {to:<16} {count} connections, each echoed");
    Ok(())
}

fn bin(name: &str) -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    target.join("debug").join(name)
}
