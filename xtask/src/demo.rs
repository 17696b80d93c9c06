//! `cargo xtask demo`: the mesh at work on a local cluster of two nodes:
//! the control plane (SQLite, its own CA); a node proxy per node that joins
//! with a bootstrap token, holds its pods' certificates and captures one
//! namespace's pods with eBPF; plain HTTP between pods on different nodes
//! carried in mTLS tunnels; plaintext from outside the mesh refused; an
//! authorization policy refusing and then, deleted, readmitting a caller;
//! the counts from the kernel and the proxies' metrics. Everything is torn
//! down at the end, on error and on Ctrl-C.

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
    Cluster, ClusterSpec, PodSpec, cluster,
    control::{node_command, spawn_node},
    http,
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
         spec: {{ports: [{{port: 8080, protocol: http}}]}}\n",
        cluster.pod(FRONTEND)?.ip4,
        cluster.pod(BACKEND)?.ip4,
    );
    for line in meshctl(&api, &data_dir, &["apply", "-f", "-"], &resources)?.lines() {
        println!("    meshctl apply: {line}");
    }
    check_interrupted()?;

    heading(
        4,
        "mesh-node on each node: joins the mesh, captures its pods, opens HBONE",
    );
    let mut nodes = Vec::new();
    for index in 0..2 {
        let (process, admin) = start_node(&cluster, index, &grpc, &data_dir)?;
        println!(
            "    node{index}: mesh-node pid {} admin http://{admin}",
            process.id()
        );
        nodes.push((process, admin));
    }
    let (admin, admin1) = (nodes[0].1, nodes[1].1);
    for (index, pod) in [(0, FRONTEND), (1, BACKEND)] {
        wait_for_capture(nodes[index].1, pod)?;
        for cert in wait_for_certificates(nodes[index].1)? {
            println!(
                "    node{index}: {:<8} {:<14} {}  until {}",
                cert["holder"].as_str().unwrap_or("?"),
                cert["name"].as_str().unwrap_or("?"),
                cert["spiffe_id"].as_str().unwrap_or("?"),
                cert["not_after"].as_str().unwrap_or("?"),
            );
        }
        println!(
            "    {pod} captured (namespace shop is labelled mesh.io/capture=enabled; netns {})",
            cluster.pod(pod)?.netns_path().display()
        );
    }
    println!("    (keys generated on the nodes; the CA chose each identity from the store)");
    check_interrupted()?;

    heading(5, "traffic: plain HTTP in the pods, mTLS between the nodes");
    let mut server = cluster.pod_command(BACKEND, bin("mesh-pod"))?;
    server.args([
        "serve-http",
        "--listen",
        "[::]:8080",
        "--body",
        "hello from backend",
    ]);
    let (backend_server, _) =
        Process::spawn_ready(BACKEND, server, "listening", Duration::from_secs(10))?;
    let mut local = cluster.pod_command(FRONTEND, bin("mesh-pod"))?;
    local.args(["echo", "--listen", "127.0.0.1:9000"]);
    let (local_echo, _) =
        Process::spawn_ready(FRONTEND, local, "listening", Duration::from_secs(10))?;
    let backend = format!("{}:8080", cluster.pod(BACKEND)?.ip4);
    // The first request may wait for the pods' certificates to be in use.
    wait_for(|| Ok(http_get(&cluster, FRONTEND, &backend, 1)?.0))?;
    let (ok, _) = http_get(&cluster, FRONTEND, &backend, 9)?;
    ensure!(ok, "{FRONTEND} -> {backend} failed");
    println!("    {FRONTEND:<15} -> {backend:<16} 10 HTTP requests, all 200");
    let (ok, _) = http_get(&cluster, LEGACY, &backend, 5)?;
    ensure!(!ok, "plaintext from {LEGACY} reached a strict workload");
    println!(
        "    {LEGACY:<15} -> {backend:<16} 5 requests refused: not in the mesh, and shop is strict mTLS"
    );
    connect(&cluster, FRONTEND, "127.0.0.1:9000", 3)?;
    let inbound = http::get(admin1, "/metrics")?.body;
    println!("    node1 saw (from /metrics):");
    for line in inbound.lines().filter(|l| {
        l.starts_with("mesh_tcp_connections_opened_total")
            || l.starts_with("mesh_tls_handshakes_total")
            || (l.starts_with("mesh_proxy_connections_total") && l.contains("inbound"))
    }) {
        println!("      {line}");
    }
    let outbound = http::get(admin, "/metrics")?.body;
    for line in outbound
        .lines()
        .filter(|l| l.starts_with("mesh_tls_handshakes_total{side=\"client\"}"))
    {
        println!("    node0: {line}");
    }
    println!("    one TLS connection carried all 10 requests (pooled HBONE streams)");
    check_interrupted()?;

    heading(6, "authorization at the destination");
    let policy = "apiVersion: mesh.io/v1\nkind: AuthorizationPolicy\n\
        metadata: {name: no-frontend, namespace: shop}\n\
        spec: {target: backend, action: deny, rules: [{from: [{principals: ['spiffe://cluster.local/ns/shop/sa/frontend']}]}]}\n";
    meshctl(&api, &data_dir, &["apply", "-f", "-"], policy)?;
    println!("    meshctl apply: deny spiffe://cluster.local/ns/shop/sa/frontend -> backend");
    wait_for(|| Ok(!http_get(&cluster, FRONTEND, &backend, 1)?.0))?;
    println!(
        "    {FRONTEND:<15} -> {backend:<16} refused (403 on the tunnel, the app never sees it)"
    );
    meshctl(
        &api,
        &data_dir,
        &["delete", "authorizationpolicy", "no-frontend", "-n", "shop"],
        "",
    )?;
    wait_for(|| Ok(http_get(&cluster, FRONTEND, &backend, 1)?.0))?;
    println!("    policy deleted: {FRONTEND} -> {backend} answered again");

    let state: serde_json::Value = serde_json::from_str(&http::get(admin, "/capture")?.body)
        .context("parsing mesh-node's /capture")?;
    let counters = &state["counters"];
    println!(
        "    node0's kernel counted: connect_redirected={} bypass_uncaptured={} bypass_loopback={} error={}",
        counters["connect_redirected"],
        counters["bypass_uncaptured"],
        counters["bypass_loopback"],
        counters["error"]
    );
    ensure!(
        counters["bypass_uncaptured"] == 5
            && counters["bypass_loopback"] == 3
            && counters["error"] == 0,
        "the kernel counted something other than the traffic sent: {state}"
    );

    println!("    meshctl proxy-status (the pushed configuration, per node):");
    for line in meshctl(&api, &data_dir, &["proxy-status"], "")?.lines() {
        println!("      {line}");
    }

    heading(7, "done");
    if args.keep {
        println!(
            "    still running: mesh-node admin http://{admin}/metrics and http://{admin1}/metrics (and /capture, /certificates, /connections)"
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
    drop((backend_server, local_echo));
    if !INTERRUPTED.load(Ordering::SeqCst) {
        for (node, _) in nodes {
            node.terminate().context("stopping mesh-node")?;
        }
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
    meshctl_at(&bin("meshctl"), api, data_dir, args, input)
}

/// Runs the `meshctl` binary at `path` against the control plane at `api`
/// whose data is in `data_dir`, with `input` on stdin.
pub(crate) fn meshctl_at(
    path: &std::path::Path,
    api: &str,
    data_dir: &std::path::Path,
    args: &[&str],
    input: &str,
) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new(path)
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

/// Starts mesh-node for node `index`; returns it and its admin address.
fn start_node(
    cluster: &Cluster,
    index: usize,
    grpc: &str,
    data_dir: &std::path::Path,
) -> anyhow::Result<(Process, SocketAddr)> {
    // Which pods to capture comes from the control plane: the workloads
    // scheduled on the node in namespaces labelled mesh.io/capture.
    let mut command = node_command(cluster, index, grpc, data_dir, &bin("mesh-node"))?;
    // Access logs would interleave with the demo's own output.
    command.env("RUST_LOG", "warn");
    Ok(spawn_node(index, command)?)
}

/// `mesh-pod http` from `from` to `to`: whether every request got 200.
fn http_get(cluster: &Cluster, from: &str, to: &str, count: u32) -> anyhow::Result<(bool, String)> {
    let output = cluster
        .pod_command(from, bin("mesh-pod"))?
        .args(["http", "--to", to, "--count", &count.to_string()])
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running mesh-pod in {from}"))?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    ))
}

/// Polls `done` until it holds (30 s at most).
fn wait_for(mut done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !done()? {
        ensure!(
            std::time::Instant::now() < deadline,
            "the mesh did not get there in 30 s"
        );
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(100));
    }
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
