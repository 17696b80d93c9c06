//! The `cgroup/connect4` capture program in the real kernel, attached to a
//! node of a throwaway cluster: it counts exactly the connects of captured
//! pods, per network namespace, and leaves everything else alone.
//! Needs root; `cargo xtask test` runs these serially.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use mesh_common::capture::Counter;
use mesh_e2e::{Cluster, ClusterSpec, PodSpec, cgroup, cluster, http, process::Process};
use mesh_node::capture::{Capture, netns};

const MESH_POD: &str = env!("CARGO_BIN_EXE_mesh-pod");

fn cluster(name: &str) -> Cluster {
    mesh_e2e::require_root().expect("the capture tests need root: run `cargo xtask test`");
    cluster::teardown(name).expect("clearing leftovers");
    Cluster::up(&ClusterSpec {
        name: name.into(),
        nodes: 2,
        pods: vec![
            PodSpec::new("shop", "client", 0),
            PodSpec::new("legacy", "client", 0),
            PodSpec::new("shop", "server", 1),
        ],
    })
    .unwrap()
}

fn echo(cluster: &Cluster, pod: &str, listen: &str) -> Process {
    let mut command = cluster.pod_command(pod, MESH_POD).unwrap();
    command.args(["echo", "--listen", listen]);
    Process::spawn_ready(pod, command, "listening", Duration::from_secs(10))
        .unwrap()
        .0
}

/// Makes `count` connects from `pod` to `to`, each answered by an echo.
fn connect(cluster: &Cluster, pod: &str, to: &str, count: u32) {
    let output = cluster
        .pod_command(pod, MESH_POD)
        .unwrap()
        .args(["connect", "--to", to, "--count", &count.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{pod} -> {to}: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

fn counter(capture: &Capture, which: Counter) -> u64 {
    capture
        .counters()
        .unwrap()
        .into_iter()
        .find(|(c, _)| *c == which)
        .unwrap()
        .1
}

#[test]
fn connect4_counts_captured_pods_per_namespace() {
    let cluster = cluster("e2ecapture");
    let _server = echo(&cluster, "shop/server", "[::]:8080");
    let server = format!("{}:8080", cluster.pod("shop/server").unwrap().ip4);
    let captured = cluster.pod("shop/client").unwrap().netns_path();
    let uncaptured = cluster.pod("legacy/client").unwrap().netns_path();

    let mut capture = Capture::attach(&cluster.layout().nodes[0].cgroup).unwrap();
    let cookie = capture.capture_pod("shop/client", &captured).unwrap();
    let legacy_cookie = netns::cookie(&uncaptured).unwrap();
    assert_ne!(cookie, legacy_cookie);
    assert_eq!(capture.connects(cookie).unwrap(), 0);

    connect(&cluster, "shop/client", &server, 10);
    connect(&cluster, "legacy/client", &server, 10);

    assert_eq!(capture.connects(cookie).unwrap(), 10);
    assert_eq!(capture.connects(legacy_cookie).unwrap(), 0);
    assert_eq!(counter(&capture, Counter::ConnectCaptured), 10);
    // The uncaptured pod's connects were seen, and left alone.
    assert_eq!(counter(&capture, Counter::BypassUncaptured), 10);
    assert_eq!(counter(&capture, Counter::Error), 0);

    // Loopback inside a captured pod is not the mesh's business.
    let _local = echo(&cluster, "shop/client", "127.0.0.1:9000");
    connect(&cluster, "shop/client", "127.0.0.1:9000", 3);
    assert_eq!(counter(&capture, Counter::BypassLoopback), 3);
    assert_eq!(capture.connects(cookie).unwrap(), 10);

    // Released, the pod counts as uncaptured again.
    capture.release_pod("shop/client").unwrap();
    connect(&cluster, "shop/client", &server, 5);
    assert_eq!(capture.connects(cookie).unwrap(), 0);
    assert_eq!(counter(&capture, Counter::BypassUncaptured), 15);
    assert_eq!(counter(&capture, Counter::ConnectCaptured), 10);
}

#[test]
fn pods_on_other_nodes_are_not_seen() {
    let cluster = cluster("e2enodes");
    let _server = echo(&cluster, "shop/client", "[::]:8080");
    let client = format!("{}:8080", cluster.pod("shop/client").unwrap().ip4);
    let capture = Capture::attach(&cluster.layout().nodes[0].cgroup).unwrap();
    // shop/server runs on node1: node0's program never runs for it.
    connect(&cluster, "shop/server", &client, 4);
    let seen: u64 = capture.counters().unwrap().iter().map(|(_, n)| n).sum();
    assert_eq!(seen, 0);
}

#[test]
fn capture_refuses_the_hierarchy_root_and_non_cgroups() {
    let root = cgroup::root().unwrap();
    let error = Capture::attach(&root).unwrap_err().to_string();
    assert!(error.contains("root of the cgroup hierarchy"), "{error}");
    let error = Capture::attach(&std::env::temp_dir())
        .unwrap_err()
        .to_string();
    assert!(error.contains("not a cgroup v2 directory"), "{error}");
}

/// The `mesh-node` binary built next to this test (`cargo xtask test` builds
/// it first), or `MESH_NODE_BIN`.
fn mesh_node_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MESH_NODE_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join("mesh-node");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p mesh-node` (cargo xtask test does)",
        path.display()
    );
    path
}

#[test]
fn mesh_node_exports_capture_counts() {
    let cluster = cluster("e2enode");
    let _server = echo(&cluster, "shop/server", "[::]:8080");
    let server = format!("{}:8080", cluster.pod("shop/server").unwrap().ip4);
    let node0 = &cluster.layout().nodes[0];
    let client = cluster.pod("shop/client").unwrap();

    let mut command: Command = cluster.system_command(mesh_node_bin()).unwrap();
    command
        .arg("--cgroup")
        .arg(&node0.cgroup)
        .arg("--capture")
        .arg(format!("shop/client={}", client.netns_path().display()))
        .args(["--admin-addr", "127.0.0.1:0"]);
    let (node, ready) =
        Process::spawn_ready("mesh-node", command, "ready", Duration::from_secs(30)).unwrap();
    let admin: SocketAddr = ready
        .strip_prefix("ready admin=")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected ready line {ready:?}"));

    connect(&cluster, "shop/client", &server, 7);
    connect(&cluster, "legacy/client", &server, 2);

    let metrics = http::get(admin, "/metrics").unwrap();
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .body
            .contains("mesh_capture_pod_connects_total{pod=\"shop/client\"} 7\n"),
        "{}",
        metrics.body
    );
    assert!(
        metrics
            .body
            .contains("mesh_capture_events_total{event=\"bypass_uncaptured\"} 2\n")
    );
    let state: serde_json::Value =
        serde_json::from_str(&http::get(admin, "/capture").unwrap().body).unwrap();
    assert_eq!(state["pods"][0]["name"], "shop/client");
    assert_eq!(state["pods"][0]["connects"], 7);
    assert_eq!(http::get(admin, "/nope").unwrap().status, 404);

    // SIGTERM: a clean exit that detaches the program.
    assert!(node.terminate().unwrap().success());
    connect(&cluster, "shop/client", &server, 1);
}
