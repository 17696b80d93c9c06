//! The local cluster itself: pods reach each other across nodes over IPv4
//! and IPv6, and teardown leaves nothing behind however the run ends.
//! Needs root; `cargo xtask test` runs these serially.

use std::{path::Path, process::Stdio, time::Duration};

use mesh_e2e::{
    Cluster, ClusterError, ClusterSpec, PodSpec, cgroup,
    cluster::{self, STATE_DIR},
    netns,
    process::Process,
};

const MESH_POD: &str = env!("CARGO_BIN_EXE_mesh-pod");

fn spec(name: &str) -> ClusterSpec {
    mesh_e2e::require_root().expect("the cluster tests need root: run `cargo xtask test`");
    // Leftovers of an earlier, killed run must not fail this one.
    cluster::teardown(name).expect("clearing leftovers");
    ClusterSpec {
        name: name.into(),
        nodes: 2,
        pods: vec![
            PodSpec::new("shop", "a", 0),
            PodSpec::new("shop", "b", 1),
            PodSpec::new("shop", "c", 0),
        ],
    }
}

fn assert_gone(name: &str) {
    let prefix = format!("mesh-{name}-");
    assert_eq!(netns::list(&prefix).unwrap(), Vec::<String>::new());
    let cgroup = cgroup::root().unwrap().join(format!("mesh-{name}"));
    assert!(!cgroup.exists(), "{} is left behind", cgroup.display());
    let state = Path::new(STATE_DIR).join(format!("{name}.json"));
    assert!(!state.exists(), "{} is left behind", state.display());
}

fn echo(cluster: &Cluster, pod: &str) -> Process {
    let mut command = cluster.pod_command(pod, MESH_POD).unwrap();
    command.args(["echo", "--listen", "[::]:8080"]);
    let (process, _) =
        Process::spawn_ready(pod, command, "listening", Duration::from_secs(10)).unwrap();
    process
}

fn connect(cluster: &Cluster, from: &str, to: String, count: u32) -> serde_json::Value {
    let output = cluster
        .pod_command(from, MESH_POD)
        .unwrap()
        .args(["connect", "--to", &to, "--count", &count.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{from} -> {to}: bad summary ({e}): {output:?}"));
    assert!(output.status.success(), "{from} -> {to}: {summary}");
    summary
}

#[test]
fn pods_reach_each_other_across_nodes_over_ipv4_and_ipv6() {
    let cluster = Cluster::up(&spec("e2ereach")).unwrap();
    let _b = echo(&cluster, "shop/b");
    let _c = echo(&cluster, "shop/c");
    let b = cluster.pod("shop/b").unwrap().clone();
    let c = cluster.pod("shop/c").unwrap().clone();

    // a (node0) to b (node1): through both nodes and the fabric.
    for to in [format!("{}:8080", b.ip4), format!("[{}]:8080", b.ip6)] {
        assert_eq!(connect(&cluster, "shop/a", to, 3)["ok"], 3);
    }
    // a to c: both on node0, through node0's pod bridge only.
    assert_eq!(
        connect(&cluster, "shop/a", format!("{}:8080", c.ip4), 3)["ok"],
        3
    );
    // The pods' processes live in their pod's cgroup.
    assert_eq!(cgroup::procs(&b.cgroup).unwrap().len(), 1);
}

#[test]
fn second_up_is_refused_and_down_is_idempotent() {
    let before = netns::list("").unwrap();
    let spec = spec("e2etwice");
    let cluster = Cluster::up(&spec).unwrap();
    let error = Cluster::up(&spec).unwrap_err();
    assert!(matches!(error, ClusterError::AlreadyUp { .. }), "{error}");
    assert!(error.to_string().contains("already up"), "{error}");
    // The refused attempt did not disturb the running cluster.
    assert_eq!(
        cluster::status("e2etwice").unwrap().missing_namespaces,
        Vec::<String>::new()
    );

    let report = cluster.down().unwrap();
    // fabric + 2 nodes + 3 pods; cluster + system + 2 nodes + 3 pods.
    assert_eq!(
        (report.namespaces, report.cgroups, report.had_state),
        (6, 7, true)
    );
    assert_gone("e2etwice");
    assert_eq!(netns::list("").unwrap(), before);

    assert!(cluster::teardown("e2etwice").unwrap().was_empty());
    assert!(matches!(
        Cluster::open("e2etwice"),
        Err(ClusterError::NotUp { .. })
    ));
}

#[test]
fn teardown_runs_when_a_test_panics() {
    let spec = spec("e2epanic");
    let pid = std::thread::spawn(move || {
        let cluster = Cluster::up(&spec).unwrap();
        let mut command = cluster.pod_command("shop/b", MESH_POD).unwrap();
        let child = command
            .args(["echo"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Forgotten: only the cluster's teardown can stop it now.
        std::mem::forget(child);
        std::panic::panic_any(pid);
    })
    .join()
    .expect_err("the thread panics");
    let pid = *pid.downcast::<u32>().unwrap();
    assert_gone("e2epanic");
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Killed by teardown; at most a zombie until this process reaps it.
    assert!(
        state.is_empty() || state.contains(") Z "),
        "pod process survived: {state}"
    );
}

#[test]
fn teardown_cleans_up_after_a_killed_run() {
    let cluster = Cluster::up(&spec("e2ekilled")).unwrap();
    // A killed process runs no destructor: only names are left to go by.
    std::mem::forget(cluster);
    let error = Cluster::up(&spec_without_cleanup("e2ekilled")).unwrap_err();
    assert!(matches!(error, ClusterError::AlreadyUp { .. }), "{error}");
    let report = cluster::teardown("e2ekilled").unwrap();
    assert_eq!(report.namespaces, 6);
    assert_gone("e2ekilled");
}

fn spec_without_cleanup(name: &str) -> ClusterSpec {
    ClusterSpec {
        name: name.into(),
        nodes: 1,
        pods: vec![],
    }
}
