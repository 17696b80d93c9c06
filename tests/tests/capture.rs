//! Capture in the real kernel, on a throwaway cluster: outbound connects of
//! captured pods land on the node proxy with their exact original
//! destination, inbound plaintext to a captured pod lands on the proxy's
//! inbound listener, everything else is left alone, a stopped proxy means
//! refused connections, and a restart keeps established connections.
//! Needs root; `cargo xtask test` runs these serially.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use mesh_common::capture::{Cidr, Counter, PodInbound, PodOutbound};
use mesh_e2e::{
    Cluster, ClusterSpec, PodSpec, cgroup, cluster,
    control::{ControlPlane, start_node},
    http,
    process::{Process, workspace_binary},
};
use mesh_node::{
    capture::{Capture, CaptureConfig, ip_key, netns},
    proxy::{self, Proxy},
};
use serde_json::Value;

const MESH_POD: &str = env!("CARGO_BIN_EXE_mesh-pod");
const READY: Duration = Duration::from_secs(30);

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
    Process::spawn_ready(pod, command, "listening", READY)
        .unwrap()
        .0
}

/// Runs `mesh-pod connect` in `pod`; returns whether every round trip
/// worked and what it printed.
fn try_connect(cluster: &Cluster, pod: &str, to: &str, extra: &[&str]) -> (bool, String) {
    let output = cluster
        .pod_command(pod, MESH_POD)
        .unwrap()
        .args(["connect", "--to", to])
        .args(extra)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn connect(cluster: &Cluster, pod: &str, to: &str, count: u32) {
    let (ok, output) = try_connect(cluster, pod, to, &["--count", &count.to_string()]);
    assert!(ok, "{pod} -> {to}: {output}");
}

/// One held connection from `pod` to `to`; returns the process and its
/// `connected local=... peer=...` line.
fn hold(cluster: &Cluster, pod: &str, to: &str) -> (Process, String) {
    let mut command = cluster.pod_command(pod, MESH_POD).unwrap();
    command.args(["connect", "--to", to, "--hold"]);
    Process::spawn_ready(pod, command, "connected", READY).unwrap()
}

/// A round trip on a held connection.
fn round_trip(held: &mut Process) -> String {
    held.send_line("again").unwrap();
    held.wait_for_line("", READY).unwrap()
}

/// The peer address the echo server reports for its next connection.
fn accepted_peer(server: &mut Process) -> String {
    let line = server.wait_for_line("accepted ", READY).unwrap();
    line["accepted ".len()..]
        .split(" on ")
        .next()
        .unwrap()
        .to_owned()
}

fn ip_of(peer: &str) -> String {
    let addr: SocketAddr = peer.parse().unwrap();
    addr.ip().to_string()
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

/// Starts `mesh-node` for `node`, capturing `pods`, pinned under the
/// cluster's pin directory; returns it and its admin address.
fn mesh_node(cluster: &Cluster, node: usize, pods: &[&str]) -> (Process, SocketAddr) {
    let (process, ready) = spawn_mesh_node(cluster, node, pods, None)
        .unwrap_or_else(|e| panic!("mesh-node did not start: {e}"));
    (process, ready)
}

/// [`mesh_node`], with only the capabilities `capabilities` (as a
/// DaemonSet's `securityContext` names them) when given.
fn spawn_mesh_node(
    cluster: &Cluster,
    node: usize,
    pods: &[&str],
    capabilities: Option<&[String]>,
) -> std::io::Result<(Process, SocketAddr)> {
    let command = mesh_node_command(cluster, node, pods, capabilities);
    let (node, ready) = Process::spawn_ready("mesh-node", command, "ready", READY)?;
    let admin = ready
        .strip_prefix("ready admin=")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected ready line {ready:?}"));
    Ok((node, admin))
}

fn mesh_node_command(
    cluster: &Cluster,
    node: usize,
    pods: &[&str],
    capabilities: Option<&[String]>,
) -> Command {
    let layout = cluster.layout();
    let mut command: Command = match capabilities {
        None => cluster.system_command(mesh_node_bin()).unwrap(),
        Some(capabilities) => {
            // The bounding set caps what a root process holds after exec.
            let kept: String = capabilities
                .iter()
                .map(|c| format!(",+{}", c.to_ascii_lowercase()))
                .collect();
            let mut command = cluster.system_command("setpriv").unwrap();
            command
                .arg(format!("--bounding-set=-all{kept}"))
                .arg("--")
                .arg(mesh_node_bin());
            command
        }
    };
    command
        .arg("--cgroup")
        .arg(&layout.nodes[node].cgroup)
        .arg("--bpf-pin-dir")
        .arg(layout.bpf_pin_dir(node))
        .args(["--admin-addr", "127.0.0.1:0", "--drain-timeout", "60s"]);
    for pod in pods {
        let netns = cluster.pod(pod).unwrap().netns_path();
        command
            .arg("--capture")
            .arg(format!("{pod}={}", netns.display()));
    }
    command
}

fn json(admin: SocketAddr, path: &str) -> Value {
    let response = http::get(admin, path).unwrap();
    assert_eq!(response.status, 200, "{path}: {}", response.body);
    serde_json::from_str(&response.body).unwrap()
}

fn counter(admin: SocketAddr, name: &str) -> u64 {
    json(admin, "/capture")["counters"][name].as_u64().unwrap()
}

/// The open connections the proxy reports, as (pod, direction, client,
/// original destination).
fn open_connections(admin: SocketAddr) -> Vec<(String, String, String, String)> {
    json(admin, "/connections")
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let field = |name: &str| c[name].as_str().unwrap().to_owned();
            (
                field("pod"),
                field("direction"),
                field("client"),
                field("original_dst"),
            )
        })
        .collect()
}

#[test]
fn outbound_connects_reach_the_proxy_with_their_original_destination() {
    let cluster = cluster("e2eout");
    let mut server = echo(&cluster, "shop/server", "[::]:8080");
    let mut other_port = echo(&cluster, "shop/server", "[::]:9090");
    let server_pod = cluster.pod("shop/server").unwrap();
    let client_pod = cluster.pod("shop/client").unwrap();
    let legacy_pod = cluster.pod("legacy/client").unwrap();
    let to_v4 = format!("{}:8080", server_pod.ip4);
    let to_v6 = format!("[{}]:9090", server_pod.ip6);
    let (mut node, admin) = mesh_node(&cluster, 0, &["shop/client"]);

    // IPv4: the client's socket is connected to the proxy's listener in its
    // own pod; the proxy names the exact destination; the server sees the
    // client pod's address.
    let (mut held4, line) = hold(&cluster, "shop/client", &to_v4);
    let peer: SocketAddr = line.rsplit("peer=").next().unwrap().parse().unwrap();
    assert!(peer.ip().is_loopback() && peer.port() == 15001, "{line}");
    assert_eq!(
        ip_of(&accepted_peer(&mut server)),
        client_pod.ip4.to_string()
    );
    // IPv6, another port.
    let (mut held6, line) = hold(&cluster, "shop/client", &to_v6);
    assert!(line.ends_with("peer=[::1]:15001"), "{line}");
    assert_eq!(
        ip_of(&accepted_peer(&mut other_port)),
        client_pod.ip6.to_string()
    );
    let mut open: Vec<(String, String)> = open_connections(admin)
        .into_iter()
        .map(|(pod, direction, _, dst)| (format!("{pod} {direction}"), dst))
        .collect();
    open.sort();
    let expected_v6: SocketAddr = to_v6.parse().unwrap();
    assert_eq!(
        open,
        vec![
            ("shop/client outbound".to_owned(), to_v4.clone()),
            ("shop/client outbound".to_owned(), expected_v6.to_string()),
        ]
    );
    assert_eq!(round_trip(&mut held4), "ok");
    assert_eq!(round_trip(&mut held6), "ok");
    assert_eq!(counter(admin, "connect_redirected"), 2);
    assert_eq!(counter(admin, "original_dst_recorded"), 2);

    // Not redirected: another namespace (the server sees the legacy pod
    // directly), loopback inside the captured pod, and sockets carrying the
    // proxy's mark.
    connect(&cluster, "legacy/client", &to_v4, 3);
    for _ in 0..3 {
        assert_eq!(
            ip_of(&accepted_peer(&mut server)),
            legacy_pod.ip4.to_string()
        );
    }
    assert_eq!(counter(admin, "bypass_uncaptured"), 3);
    let _local = echo(&cluster, "shop/client", "127.0.0.1:9000");
    connect(&cluster, "shop/client", "127.0.0.1:9000", 2);
    assert_eq!(counter(admin, "bypass_loopback"), 2);
    let (ok, output) = try_connect(&cluster, "shop/client", &to_v4, &["--mark", "0x539"]);
    assert!(ok, "{output}");
    assert_eq!(counter(admin, "bypass_proxy_mark"), 1);
    assert_eq!(counter(admin, "connect_redirected"), 2);
    assert_eq!(counter(admin, "error"), 0);

    let metrics = http::get(admin, "/metrics").unwrap().body;
    assert!(
        metrics.contains("mesh_capture_pod_connects_total{pod=\"shop/client\"} 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mesh_proxy_connections_open 2\n"),
        "{metrics}"
    );
    held4.finish().unwrap();
    held6.finish().unwrap();

    // The programs' debug records, off by default (none for the connects
    // above), switched on at run time.
    assert_eq!(json(admin, "/ebpf-logs")["enabled"], false);
    let early = node.wait_for_log("connect redirected", Duration::from_millis(500));
    assert!(
        early.is_err(),
        "a debug record while they were off: {early:?}"
    );
    let on = http::put_json(admin, "/ebpf-logs", r#"{"enabled": true}"#).unwrap();
    assert_eq!(on.status, 200, "{}", on.body);
    connect(&cluster, "shop/client", &to_v4, 1);
    let record = node
        .wait_for_log("connect redirected", READY)
        .expect("a debug record from the connect program");
    assert!(record.contains("port=8080"), "{record}");
    assert_eq!(json(admin, "/ebpf-logs")["enabled"], true);
    let bad = http::put_json(admin, "/ebpf-logs", r#"{"enabled": "yes"}"#).unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);
    let off = http::put_json(admin, "/ebpf-logs", r#"{"enabled": false}"#).unwrap();
    assert_eq!(off.status, 200, "{}", off.body);
}

#[test]
fn one_client_port_towards_two_destinations_keeps_them_apart() {
    let cluster = cluster("e2eport");
    let _first = echo(&cluster, "shop/server", "[::]:8080");
    let _second = echo(&cluster, "shop/server", "[::]:9090");
    let server = cluster.pod("shop/server").unwrap().ip4;
    let (node, admin) = mesh_node(&cluster, 0, &["shop/client"]);
    // Without capture a client may use one local port towards two
    // destinations (two 4-tuples). Redirected, both must still be possible
    // and each must keep its own destination, even queued unaccepted
    // together: the proxy is frozen while they connect.
    node.pause().unwrap();
    let hold_from = |to: String| {
        let mut command = cluster.pod_command("shop/client", MESH_POD).unwrap();
        command.args(["connect", "--to", &to, "--hold", "--local-port", "40000"]);
        let (held, established) =
            Process::spawn_ready("shop/client", command, "established", READY).unwrap();
        assert!(established.ends_with(":40000"), "{established}");
        held
    };
    let mut to_8080 = hold_from(format!("{server}:8080"));
    let mut to_9090 = hold_from(format!("{server}:9090"));
    node.resume().unwrap();
    for held in [&mut to_8080, &mut to_9090] {
        held.wait_for_line("connected", READY).unwrap();
        assert_eq!(round_trip(held), "ok");
    }
    let mut destinations: Vec<String> = open_connections(admin)
        .into_iter()
        .map(|(_, _, client, dst)| {
            assert!(client.ends_with(":40000"), "{client}");
            dst
        })
        .collect();
    destinations.sort();
    assert_eq!(
        destinations,
        [format!("{server}:8080"), format!("{server}:9090")]
    );
    to_8080.finish().unwrap();
    to_9090.finish().unwrap();
}

#[test]
fn inbound_plaintext_reaches_the_proxy_not_the_app() {
    let cluster = cluster("e2ein");
    let mut server = echo(&cluster, "shop/server", "[::]:8080");
    let server_pod = cluster.pod("shop/server").unwrap();
    let legacy_pod = cluster.pod("legacy/client").unwrap();
    let (_node, admin) = mesh_node(&cluster, 1, &["shop/server"]);
    let to = format!("{}:8080", server_pod.ip4);

    let (mut held, _) = hold(&cluster, "legacy/client", &to);
    // The application is reached by the proxy, from the pod's own address.
    assert_eq!(
        ip_of(&accepted_peer(&mut server)),
        server_pod.ip4.to_string()
    );
    let open = open_connections(admin);
    assert_eq!(open.len(), 1, "{open:?}");
    let (pod, direction, client, dst) = &open[0];
    assert_eq!(
        (pod.as_str(), direction.as_str()),
        ("shop/server", "inbound")
    );
    assert_eq!(ip_of(client), legacy_pod.ip4.to_string());
    assert_eq!(dst, &to);
    assert_eq!(round_trip(&mut held), "ok");
    assert_eq!(counter(admin, "inbound_steered"), 1);
    // The proxy's own delivery to the application was not steered again.
    assert_eq!(counter(admin, "inbound_bypass_local"), 1);

    // IPv6 too, and a port with nothing behind it is refused, not hung.
    connect(
        &cluster,
        "legacy/client",
        &format!("[{}]:8080", server_pod.ip6),
        1,
    );
    assert_eq!(
        ip_of(&accepted_peer(&mut server)),
        server_pod.ip6.to_string()
    );
    let (ok, output) = try_connect(
        &cluster,
        "legacy/client",
        &format!("{}:7000", server_pod.ip4),
        &[],
    );
    assert!(!ok, "{output}");
    assert_eq!(counter(admin, "inbound_steered"), 3);
    held.finish().unwrap();
}

#[test]
fn a_stopped_proxy_refuses_and_a_restart_keeps_established_connections() {
    let cluster = cluster("e2erestart");
    let mut server = echo(&cluster, "shop/server", "[::]:8080");
    let to = format!("{}:8080", cluster.pod("shop/server").unwrap().ip4);
    let (first, first_admin) = mesh_node(&cluster, 0, &["shop/client"]);
    let (mut held, _) = hold(&cluster, "shop/client", &to);
    accepted_peer(&mut server);

    // A second proxy adopts the pinned capture while the first still runs;
    // SIGTERM makes the first stop accepting and drain.
    let (second, second_admin) = mesh_node(&cluster, 0, &["shop/client"]);
    let draining = std::thread::spawn(move || first.terminate_within(Duration::from_secs(90)));
    // New connections land on the second proxy only, once the first's
    // listeners are closed.
    let settled = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        http::get(first_admin, "/healthz").is_err()
    });
    assert!(settled, "the first proxy kept serving after SIGTERM");
    connect(&cluster, "shop/client", &to, 3);
    accepted_peer(&mut server);
    let relayed = "mesh_proxy_connections_total{pod=\"shop/client\",direction=\"outbound\",outcome=\"relayed\"} 3\n";
    let metrics = http::get(second_admin, "/metrics").unwrap().body;
    assert!(metrics.contains(relayed), "{metrics}");
    // The connection made through the first proxy is still alive.
    assert_eq!(round_trip(&mut held), "ok");
    assert_eq!(round_trip(&mut held), "ok");
    held.finish().unwrap();
    let status = draining.join().unwrap().unwrap();
    assert!(status.success(), "{status}");

    // Killed outright: the pod stays captured and its connects are refused,
    // never sent around the proxy in plaintext.
    second.kill().unwrap();
    let (ok, output) = try_connect(&cluster, "shop/client", &to, &[]);
    assert!(!ok, "a connect succeeded with no proxy: {output}");
    assert!(output.contains("refused"), "{output}");
    // An uncaptured pod is not affected.
    connect(&cluster, "legacy/client", &to, 1);
    let _ = accepted_peer(&mut server);

    // Started again, it adopts the pinned state and carries traffic.
    let (_third, third_admin) = mesh_node(&cluster, 0, &["shop/client"]);
    connect(&cluster, "shop/client", &to, 2);
    assert_eq!(
        json(third_admin, "/capture")["pods"][0]["name"],
        "shop/client"
    );
}

#[test]
fn excluded_ports_and_cidrs_pass_untouched() {
    let cluster = cluster("e2eexcl");
    let mut server = echo(&cluster, "shop/server", "[::]:8080");
    let mut excluded = echo(&cluster, "shop/server", "[::]:5432");
    let server_pod = cluster.pod("shop/server").unwrap();
    let client_pod = cluster.pod("shop/client").unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let capture = Capture::attach(&CaptureConfig {
        cgroup: cluster.layout().nodes[0].cgroup.clone(),
        pin_dir: None,
    })
    .unwrap();
    let proxy = Proxy::new(std::sync::Arc::new(std::sync::RwLock::new(capture)), 1024);
    let mut outbound = PodOutbound::default();
    outbound.excluded_ports[0] = 5432;
    outbound.excluded_cidrs[0] = Cidr {
        ip: ip_key(std::net::IpAddr::V6(server_pod.ip6)),
        prefix_len: 128,
    };
    runtime
        .block_on(proxy.add_pod(proxy::PodSpec {
            name: "shop/client".into(),
            netns: client_pod.netns_path(),
            outbound,
            inbound: PodInbound::default(),
        }))
        .unwrap();
    let counters = || {
        proxy
            .capture()
            .read()
            .unwrap()
            .counters()
            .unwrap()
            .into_iter()
            .collect::<std::collections::BTreeMap<Counter, u64>>()
    };
    connect(
        &cluster,
        "shop/client",
        &format!("{}:5432", server_pod.ip4),
        1,
    );
    assert_eq!(
        ip_of(&accepted_peer(&mut excluded)),
        client_pod.ip4.to_string()
    );
    connect(
        &cluster,
        "shop/client",
        &format!("[{}]:8080", server_pod.ip6),
        1,
    );
    accepted_peer(&mut server);
    connect(
        &cluster,
        "shop/client",
        &format!("{}:8080", server_pod.ip4),
        1,
    );
    accepted_peer(&mut server);
    let counters = counters();
    assert_eq!(counters[&Counter::BypassExcludedPort], 1);
    assert_eq!(counters[&Counter::BypassExcludedCidr], 1);
    assert_eq!(counters[&Counter::ConnectRedirected], 1);
    let relayed = proxy.connections().counts();
    assert_eq!(relayed.len(), 1, "{relayed:?}");
    assert_eq!(relayed[0].1, 1);
    drop(proxy);
    drop(runtime);
}

#[test]
fn pods_on_other_nodes_are_not_seen() {
    let cluster = cluster("e2enodes");
    let _server = echo(&cluster, "shop/client", "[::]:8080");
    let client = format!("{}:8080", cluster.pod("shop/client").unwrap().ip4);
    let capture = Capture::attach(&CaptureConfig {
        cgroup: cluster.layout().nodes[0].cgroup.clone(),
        pin_dir: None,
    })
    .unwrap();
    // shop/server runs on node1: node0's programs never run for it.
    connect(&cluster, "shop/server", &client, 4);
    let seen: u64 = capture.counters().unwrap().iter().map(|(_, n)| n).sum();
    assert_eq!(seen, 0);
    assert_ne!(
        netns::cookie(&cluster.pod("shop/server").unwrap().netns_path()).unwrap(),
        netns::cookie(&cluster.pod("shop/client").unwrap().netns_path()).unwrap()
    );
}

#[test]
fn every_program_passes_this_kernels_verifier() {
    mesh_e2e::require_root().expect("loading eBPF needs root");
    let output = Command::new(mesh_node_bin())
        .arg("--check-programs")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for program in [
        "mesh_connect4",
        "mesh_connect6",
        "mesh_sock_ops",
        "mesh_sk_lookup",
    ] {
        assert!(
            stdout.contains(&format!("{program}: accepted by this kernel's verifier")),
            "{stdout}"
        );
    }
}

#[test]
fn capture_refuses_the_hierarchy_root_non_cgroups_and_non_bpffs_pins() {
    let config = |cgroup: PathBuf, pin_dir: Option<PathBuf>| CaptureConfig { cgroup, pin_dir };
    let root = cgroup::root().unwrap();
    let error = Capture::attach(&config(root, None))
        .unwrap_err()
        .to_string();
    assert!(error.contains("root of the cgroup hierarchy"), "{error}");
    let error = Capture::attach(&config(std::env::temp_dir(), None))
        .unwrap_err()
        .to_string();
    assert!(error.contains("not a cgroup v2 directory"), "{error}");

    let cluster = cluster("e2epin");
    let pins = tempfile::tempdir().unwrap();
    let error = Capture::attach(&config(
        cluster.layout().nodes[0].cgroup.clone(),
        Some(pins.path().to_owned()),
    ))
    .unwrap_err()
    .to_string();
    assert!(error.contains("not on a BPF filesystem"), "{error}");
}

/// Polls `/capture` until the captured pods are `expected`.
fn wait_for_pods(admin: SocketAddr, expected: &[&str]) {
    let deadline = std::time::Instant::now() + READY;
    loop {
        let state = json(admin, "/capture");
        let pods: Vec<&str> = state["pods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        if pods == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "captured pods are {pods:?}, expected {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn namespace_labels_capture_and_release_running_pods() {
    let cluster = cluster("e2elabel");
    let mut server = echo(&cluster, "shop/server", "[::]:8080");
    let client = cluster.pod("shop/client").unwrap();
    let legacy = cluster.pod("legacy/client").unwrap();
    let to = format!("{}:8080", cluster.pod("shop/server").unwrap().ip4);
    let dir = tempfile::tempdir().unwrap();
    let control = ControlPlane::start_with(
        cluster
            .system_command(workspace_binary("mesh-control").unwrap())
            .unwrap(),
        &dir.path().join("control"),
    )
    .unwrap();
    let namespace = |labels: &str| {
        format!(
            "apiVersion: mesh.io/v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{{labels}}}}}\n"
        )
    };
    let workload = |labels: &str, capture: &str| {
        format!(
            "apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {{name: client, namespace: shop, labels: {{{labels}}}}}\n\
             spec: {{node: node0, ip: {}, capture: {{{capture}}}}}\n",
            client.ip4
        )
    };
    let apply = |yaml: &str| control.meshctl(&["apply", "-f", "-"], Some(yaml));
    apply(&format!(
        "{}---\n{}---\napiVersion: mesh.io/v1\nkind: Namespace\nmetadata: {{name: legacy}}\n---\n\
         apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {{name: client, namespace: legacy}}\nspec: {{node: node0, ip: {}}}\n",
        namespace(""),
        workload("", ""),
        legacy.ip4
    ));

    let layout = cluster.layout();
    let (_node, admin) = start_node(&cluster, 0, &control, &mesh_node_bin()).unwrap();
    assert_eq!(
        client.netns_path(),
        PathBuf::from(format!("/run/netns/mesh-{}-shop-client", layout.name))
    );

    // Unlabelled: the pushed workloads are on this node but not captured.
    let deadline = std::time::Instant::now() + READY;
    while json(admin, "/config")["revision"].as_i64().unwrap_or(0) == 0 {
        assert!(std::time::Instant::now() < deadline, "no configuration");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for_pods(admin, &[]);
    let (mut before, _) = hold(&cluster, "shop/client", &to);
    assert_eq!(ip_of(&accepted_peer(&mut server)), client.ip4.to_string());
    assert_eq!(counter(admin, "bypass_uncaptured"), 1);

    // Labelled: the running pod is captured; its established connection
    // carries on untouched, new ones go through the proxy.
    apply(&namespace("mesh.io/capture: enabled"));
    wait_for_pods(admin, &["shop/client"]);
    connect(&cluster, "shop/client", &to, 2);
    assert_eq!(counter(admin, "connect_redirected"), 2);
    assert_eq!(round_trip(&mut before), "ok");
    // The legacy namespace is still not captured.
    connect(&cluster, "legacy/client", &to, 1);
    assert_eq!(counter(admin, "bypass_uncaptured"), 2);

    // An exclusion pushed for the pod applies in place.
    apply(&workload("", "exclude_outbound_ports: [8080]"));
    let deadline = std::time::Instant::now() + READY;
    loop {
        connect(&cluster, "shop/client", &to, 1);
        if counter(admin, "bypass_excluded_port") > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "exclusion never applied"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for_pods(admin, &["shop/client"]);

    // The pod opts out, is deleted, and then the label goes: released
    // each time, its sk_lookup link unpinned with it.
    let pinned_pods = || {
        std::fs::read_dir(layout.bpf_pin_dir(0).join("pods"))
            .unwrap()
            .count()
    };
    assert_eq!(pinned_pods(), 1);
    let series_of_client = || {
        let metrics = http::get(admin, "/metrics").unwrap().body;
        metrics
            .lines()
            .filter(|line| line.starts_with("mesh_tcp_") && line.contains("pod=\"shop/client\""))
            .count()
    };
    assert!(series_of_client() > 0);
    apply(&workload("mesh.io/capture: disabled", ""));
    wait_for_pods(admin, &[]);
    assert_eq!(pinned_pods(), 0);
    // Released, with no connection open: its traffic series go too.
    let deadline = std::time::Instant::now() + READY;
    while series_of_client() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the released pod's series stayed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    apply(&workload("", ""));
    wait_for_pods(admin, &["shop/client"]);
    control.meshctl(&["delete", "workload", "client", "-n", "shop"], None);
    wait_for_pods(admin, &[]);
    assert_eq!(pinned_pods(), 0);
    apply(&workload("", ""));
    wait_for_pods(admin, &["shop/client"]);
    apply(&namespace("mesh.io/capture: disabled"));
    wait_for_pods(admin, &[]);
    assert_eq!(pinned_pods(), 0);
    let redirected = counter(admin, "connect_redirected");
    connect(&cluster, "shop/client", &to, 1);
    assert_eq!(counter(admin, "connect_redirected"), redirected);
    assert_eq!(round_trip(&mut before), "ok");
    before.finish().unwrap();
}

/// The capabilities the DaemonSet in `deploy/kubernetes/node.yaml` adds.
fn daemonset_capabilities() -> Vec<String> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/node.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let line = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("add: ["))
        .expect("node.yaml adds capabilities");
    line.trim_end_matches(']')
        .split(',')
        .map(|c| c.trim().to_owned())
        .collect()
}

#[test]
fn mesh_node_captures_with_the_daemonsets_capabilities_and_not_with_fewer() {
    let cluster = cluster("e2ecaps");
    let mut server = echo(&cluster, "shop/server", "[::]:8080");
    let to = format!("{}:8080", cluster.pod("shop/server").unwrap().ip4);
    let capabilities = daemonset_capabilities();
    assert_eq!(
        capabilities,
        ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "SYS_RESOURCE"]
    );
    // Fails, says why, and never reports itself ready.
    let refused = |node: usize, with: Vec<String>, says: &str| {
        let command = mesh_node_command(&cluster, node, &["shop/client"], Some(&with));
        let mut process = Process::spawn("mesh-node", command).unwrap();
        let said = process.wait_for_log(says, READY);
        assert!(said.is_ok(), "with {with:?}: {said:?}");
        let ready = process.wait_for_line("ready", Duration::from_secs(2));
        assert!(ready.is_err(), "ready with {with:?}");
    };
    let but = |missing: &str, instead: Option<&str>| -> Vec<String> {
        let mut with: Vec<String> = capabilities
            .iter()
            .filter(|c| *c != missing)
            .cloned()
            .collect();
        with.extend(instead.map(str::to_owned));
        with
    };
    // BPF in place of SYS_ADMIN: the verifier refuses the programs (on a
    // node with nothing pinned yet to adopt).
    refused(1, but("SYS_ADMIN", Some("BPF")), "attaching capture to");
    {
        let (_node, admin) =
            spawn_mesh_node(&cluster, 0, &["shop/client"], Some(&capabilities)).unwrap();
        let (mut held, line) = hold(&cluster, "shop/client", &to);
        assert!(line.ends_with(":15001"), "not captured: {line}");
        accepted_peer(&mut server);
        assert_eq!(round_trip(&mut held), "ok");
        assert_eq!(counter(admin, "connect_redirected"), 1);
        held.finish().unwrap();
    }
    // Without NET_ADMIN it cannot mark its sockets. (SYS_PTRACE is for
    // other users' processes, which this cluster's pods are not;
    // SYS_RESOURCE only raises the open-file limit.)
    refused(0, but("NET_ADMIN", None), "Operation not permitted");
}
