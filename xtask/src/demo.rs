//! `cargo xtask demo`: the mesh at work on a local cluster. Today: the
//! control plane (SQLite, its own CA), a node that joins with a bootstrap
//! token and holds its pod's certificate, and eBPF capture of one
//! namespace's pods, counted in the kernel, read back through mesh-node's
//! admin endpoint. Everything is torn down at the end, on error and on
//! Ctrl-C.

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
use mesh_e2e::{
    Cluster, ClusterSpec, PodSpec, cluster, http,
    process::{Process, ready_field},
};

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
    println!("\n[{n}/{STEPS}] {what}");
}

const STEPS: usize = 7;

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
    run::run(cargo().args([
        "build",
        "-p",
        "mesh-node",
        "-p",
        "mesh-control",
        "-p",
        "meshctl",
        "-p",
        "mesh-e2e",
        "--bins",
    ]))?;
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
        "the control plane: SQLite store, its own CA, the node API",
    );
    let data_dir = std::env::temp_dir().join("mesh-demo-control");
    let _ = std::fs::remove_dir_all(&data_dir);
    let mut command = cluster.system_command(bin("mesh-control"))?;
    command.arg("--data-dir").arg(&data_dir).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
    ]);
    let (control, ready) =
        Process::spawn_ready("mesh-control", command, "ready", Duration::from_secs(30))?;
    let api = ready_field(&ready, "api")
        .with_context(|| format!("mesh-control said {ready:?}"))?
        .to_owned();
    let grpc = ready_field(&ready, "grpc")
        .with_context(|| format!("mesh-control said {ready:?}"))?
        .to_owned();
    println!(
        "    mesh-control pid {} admin API {api}, node API {grpc}",
        control.id()
    );
    let resources = format!(
        "apiVersion: mesh.io/v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{mesh.io/capture: enabled}}}}\n\
         ---\napiVersion: mesh.io/v1\nkind: Workload\nmetadata: {{name: frontend, namespace: shop}}\n\
         spec: {{node: node0, ip: {}, service_account: frontend}}\n\
         ---\napiVersion: mesh.io/v1\nkind: Workload\nmetadata: {{name: backend, namespace: shop}}\n\
         spec: {{node: node1, ip: {}, service_account: backend, services: [backend]}}\n\
         ---\napiVersion: mesh.io/v1\nkind: Service\nmetadata: {{name: backend, namespace: shop}}\n\
         spec: {{ports: [{{port: 8080, protocol: tcp}}]}}\n",
        cluster.pod(FRONTEND)?.ip4,
        cluster.pod(BACKEND)?.ip4,
    );
    for line in meshctl(&api, &data_dir, &["apply", "-f", "-"], &resources)?.lines() {
        println!("    meshctl apply: {line}");
    }
    check_interrupted()?;

    heading(
        4,
        "mesh-node on node0: joins the mesh, captures node0's pods",
    );
    let node0 = &cluster.layout().nodes[0];
    let frontend = cluster.pod(FRONTEND)?;
    let mut command = cluster.system_command(bin("mesh-node"))?;
    command
        .arg("--cgroup")
        .arg(&node0.cgroup)
        // Which pods to capture comes from the control plane: the workloads
        // scheduled on node0 in namespaces labelled mesh.io/capture.
        .arg("--pod-netns")
        .arg(format!("/run/netns/mesh-{CLUSTER}-{{namespace}}-{{name}}"))
        .arg("--bpf-pin-dir")
        .arg(cluster.layout().bpf_pin_dir(0))
        .args(["--admin-addr", "127.0.0.1:0"])
        .args(["--node", "node0", "--control-plane", &grpc])
        .arg("--ca-bundle")
        .arg(data_dir.join("ca/root.pem"))
        .arg("--bootstrap-token-file")
        .arg(data_dir.join("bootstrap-token"))
        .env("RUST_LOG", "info,mesh_ebpf=debug");
    let (mesh_node, ready) =
        Process::spawn_ready("mesh-node", command, "ready", Duration::from_secs(30))?;
    let admin: SocketAddr = ready_field(&ready, "admin")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("mesh-node said {ready:?}"))?;
    println!("    mesh-node pid {} admin http://{admin}", mesh_node.id());
    let certificates = wait_for_certificates(admin)?;
    for cert in &certificates {
        println!(
            "    {:<8} {:<14} {}  until {}",
            cert["holder"].as_str().unwrap_or("?"),
            cert["name"].as_str().unwrap_or("?"),
            cert["spiffe_id"].as_str().unwrap_or("?"),
            cert["not_after"].as_str().unwrap_or("?"),
        );
    }
    println!("    (keys generated on the node; the CA chose each identity from the store)");
    wait_for_capture(admin, FRONTEND)?;
    println!(
        "    {FRONTEND} captured: namespace shop is labelled mesh.io/capture=enabled (netns {})",
        frontend.netns_path().display()
    );
    check_interrupted()?;

    heading(5, "traffic");
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

    heading(6, "what the kernel counted (mesh-node /capture)");
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
        "    events: connect_redirected={} original_dst_recorded={} bypass_uncaptured={} bypass_loopback={} error={}",
        counters["connect_redirected"],
        counters["original_dst_recorded"],
        counters["bypass_uncaptured"],
        counters["bypass_loopback"],
        counters["error"]
    );
    ensure!(
        state["pods"][0]["connects"] == 10
            && counters["original_dst_recorded"] == 10
            && counters["bypass_uncaptured"] == 5
            && counters["bypass_loopback"] == 3
            && counters["error"] == 0,
        "the kernel counted something other than the traffic sent: {state}"
    );
    println!("    the counts match the traffic sent: frontend's 10 connects went through");
    println!("    the node proxy's listener inside the frontend pod, which relayed each to");
    println!("    the destination the kernel recorded for it");
    let metrics = http::get(admin, "/metrics")?.body;
    println!("    from /metrics:");
    for line in metrics.lines().filter(|l| {
        l.starts_with("mesh_capture_pod")
            || l.starts_with("mesh_proxy_connections_total")
            || l.starts_with("mesh_certificate_expiry")
    }) {
        println!("      {line}");
    }

    println!("    meshctl proxy-status (the pushed configuration, per node):");
    for line in meshctl(&api, &data_dir, &["proxy-status"], "")?.lines() {
        println!("      {line}");
    }

    heading(7, "done");
    if args.keep {
        println!(
            "    still running: mesh-node admin http://{admin}/metrics (and /capture, /certificates)"
        );
        println!(
            "    meshctl: MESH_DATA_DIR={} target/debug/meshctl --server {api} cert list",
            data_dir.display()
        );
        println!("    pods: ip netns exec mesh-{CLUSTER}-shop-frontend <command>");
        println!("    press Ctrl-C to tear everything down");
        let _ = interrupt_rx.recv();
    }
    // mesh-node may already have stopped on the terminal's Ctrl-C.
    drop((backend_echo, local_echo));
    if !INTERRUPTED.load(Ordering::SeqCst) {
        mesh_node.terminate().context("stopping mesh-node")?;
        control.terminate().context("stopping mesh-control")?;
    }
    let report = cluster.down()?;
    let _ = std::fs::remove_dir_all(&data_dir);
    println!("    cluster {CLUSTER} torn down: {report}");
    Ok(())
}

/// Runs meshctl against the demo's control plane with `input` on stdin.
fn meshctl(
    api: &str,
    data_dir: &std::path::Path,
    args: &[&str],
    input: &str,
) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new(bin("meshctl"))
        .args(["--server", api])
        .args(args)
        .env("MESH_DATA_DIR", data_dir)
        .env_remove("MESH_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting meshctl")?;
    child
        .stdin
        .take()
        .context("meshctl's stdin")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(output.status.success(), "meshctl {args:?} failed");
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Waits until the node has captured `pod`, as the pushed configuration says.
fn wait_for_capture(admin: SocketAddr, pod: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let state: serde_json::Value = serde_json::from_str(&http::get(admin, "/capture")?.body)
            .context("parsing mesh-node's /capture")?;
        let captured = state["pods"]
            .as_array()
            .is_some_and(|pods| pods.iter().any(|p| p["name"] == pod));
        if captured {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "mesh-node has not captured {pod} after 30 s: {state}"
        );
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the node holds its own and its pod's certificate.
fn wait_for_certificates(admin: SocketAddr) -> anyhow::Result<Vec<serde_json::Value>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let certs: Vec<serde_json::Value> =
            serde_json::from_str(&http::get(admin, "/certificates")?.body)
                .context("parsing mesh-node's /certificates")?;
        if !certs.is_empty() && certs.iter().all(|c| c["spiffe_id"].is_string()) {
            return Ok(certs);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "mesh-node has no certificates after 30 s: {certs:?}"
        );
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(200));
    }
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
