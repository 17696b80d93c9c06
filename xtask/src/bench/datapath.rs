//! `cargo xtask bench datapath`: what the mesh adds between two pods on two
//! nodes. A client pod on node0 calls a server pod on node1 five ways, in
//! one run: in an uncaptured namespace (direct); in a captured one at the
//! server's address (mesh L4: client's node proxy → HBONE mTLS tunnel → the
//! server's node proxy → server) and at a service address (mesh L7);
//! through a chain of two HAProxy instances doing HTTP and mutual TLS on
//! the same topology (the yardstick, see `haproxy.rs`); and through the
//! same two relaying plain TCP (what a proxy pays here with no work on the
//! bytes). Same nodes, same path through veth, bridges and the fabric;
//! release builds; access logs off (RUST_LOG=warn), as a benchmark of the
//! data path. The load comes from wrk, h2load and iperf3 (Debian
//! packages), the c=1 latencies and new connections from `mesh-pod
//! bench-http`.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use mesh_e2e::{
    Cluster, ClusterSpec, PodSpec, cluster,
    control::{node_command, spawn_node},
    process::Process,
};

use super::{
    capture::release_bin,
    haproxy::{self, Haproxy},
};
use crate::{
    demo::meshctl_at,
    run::{self, step},
};

pub(crate) const CLUSTER: &str = "benchhbone";
const READY: Duration = Duration::from_secs(30);
/// The address of the server's HTTP service (the L7 path): port 80 is
/// HTTP/1.1 to SERVICE_HTTP_PORT, port 81 HTTP/2 to SERVICE_H2_PORT.
pub(crate) const L7_VIP: &str = "10.96.0.80";
/// The servers' ports: HTTP/1.1 (`mesh-pod serve-http`), HTTP/2
/// (nghttpd, prior knowledge), iperf3, and TCP echo. No service declares
/// them, so the mesh carries them as plain TCP (L4).
pub(crate) const HTTP_PORT: u16 = 8080;
pub(crate) const H2_PORT: u16 = 8081;
/// The same servers again on the ports the HTTP service declares, which
/// both node proxies handle request by request (L7).
const SERVICE_HTTP_PORT: u16 = 8180;
const SERVICE_H2_PORT: u16 = 8181;
pub(crate) const BULK_PORT: u16 = 5201;
pub(crate) const ECHO_PORT: u16 = 7000;

/// How much each measurement does: the full run, or `--quick`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scale {
    /// Runs of each measurement; the table shows the median.
    pub runs: usize,
    /// Requests timed one after another at c=1.
    pub requests_c1: usize,
    /// Seconds of each wrk, h2load and iperf3 run.
    pub seconds: u32,
    /// Requests each on a new connection, at c=16.
    pub new_connections: usize,
    /// Connections held open for the memory figure.
    pub held: u32,
}

impl Scale {
    pub(crate) const FULL: Self = Self {
        runs: 3,
        requests_c1: 5000,
        seconds: 5,
        new_connections: 4000,
        held: 1000,
    };
    pub(crate) const QUICK: Self = Self {
        runs: 1,
        requests_c1: 1000,
        seconds: 1,
        new_connections: 500,
        held: 1000,
    };

    pub(crate) fn of(quick: bool) -> Self {
        if quick { Self::QUICK } else { Self::FULL }
    }
}

fn json(output: std::process::Output, what: &str) -> anyhow::Result<serde_json::Value> {
    ensure!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    serde_json::from_slice(&output.stdout).with_context(|| format!("{what} printed {output:?}"))
}

/// The median of `runs` runs of `field` (and the run it came from).
fn median_of(
    runs: usize,
    mut run: impl FnMut() -> anyhow::Result<serde_json::Value>,
    field: &str,
) -> anyhow::Result<(f64, serde_json::Value)> {
    let mut results = Vec::new();
    for _ in 0..runs.max(1) {
        let result = run()?;
        let value = result[field]
            .as_f64()
            .with_context(|| format!("no {field} in {result}"))?;
        results.push((value, result));
    }
    results.sort_by(|a, b| a.0.total_cmp(&b.0));
    let middle = results.len() / 2;
    Ok(results.swap_remove(middle))
}

/// The median of `runs` runs of `measure` at `address`, when the path
/// has one.
fn median_at(
    runs: usize,
    address: Option<&str>,
    mut measure: impl FnMut(&str) -> anyhow::Result<f64>,
) -> anyhow::Result<Option<f64>> {
    address
        .map(|address| {
            let run = || measure(address).map(|value| serde_json::json!({ "value": value }));
            median_of(runs, run, "value").map(|(value, _)| value)
        })
        .transpose()
}

/// Resident memory of a process, in MiB.
pub(crate) fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

pub(crate) struct Setup {
    pub cluster: Cluster,
    pub nodes: Vec<Process>,
    /// The node proxies' admin addresses.
    pub admins: Vec<SocketAddr>,
    /// The control plane's admin API, `http://host:port`, and its process.
    pub api: String,
    pub control: u32,
    _processes: Vec<Process>,
}

/// The cluster, control plane, servers and node proxies (each given
/// `node_args` too), ready once a request crosses the mesh.
pub(crate) fn up(data_dir: &Path, node_args: &[&str]) -> anyhow::Result<Setup> {
    cluster::teardown(CLUSTER)?;
    let cluster = Cluster::up(&ClusterSpec {
        name: CLUSTER.into(),
        nodes: 2,
        pods: vec![
            PodSpec::new("shop", "client", 0),
            PodSpec::new("shop", "server", 1),
            PodSpec::new("direct", "client", 0),
            PodSpec::new("direct", "server", 1),
        ],
    })?;
    let mut processes = Vec::new();
    let control = super::serve_control(
        cluster.system_command(release_bin("mesh-control"))?,
        data_dir,
        mesh_e2e::process::Logs::Inherit,
    )?;
    let (api, grpc) = (control.api, control.grpc);
    let control_pid = control.process.id();
    processes.push(control.process);
    let mut objects = String::from(
        "apiVersion: mesh.io/v1\nkind: Namespace\nmetadata: {name: shop, labels: {mesh.io/capture: enabled}}\n---\n\
         apiVersion: mesh.io/v1\nkind: Namespace\nmetadata: {name: direct}\n",
    );
    for pod in &cluster.layout().pods {
        objects.push_str(&format!(
            "---\napiVersion: mesh.io/v1\nkind: Workload\nmetadata: {{name: {}, namespace: {}}}\n\
             spec: {{node: node{}, ip: {}, service_account: {}, services: [{}]}}\n",
            pod.name,
            pod.namespace,
            pod.node,
            pod.ip4,
            pod.name,
            if pod.name == "server" { "web" } else { "" }
        ));
    }
    // The same server as an HTTP service: requests through the L7 path.
    objects.push_str(&format!(
        "---\napiVersion: mesh.io/v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
         spec: {{vip: {L7_VIP}, ports: [{{port: 80, target_port: {SERVICE_HTTP_PORT}, protocol: http}}, \
         {{port: 81, target_port: {SERVICE_H2_PORT}, protocol: http2}}]}}\n"
    ));
    meshctl_at(
        &release_bin("meshctl"),
        &api,
        data_dir,
        &["apply", "-f", "-"],
        &objects,
    )?;
    let site = data_dir.join("h2");
    std::fs::create_dir_all(&site)?;
    std::fs::write(site.join("bench"), "ok")?;
    for server in ["shop/server", "direct/server"] {
        for args in [
            [
                "serve-http",
                "--listen",
                &format!("[::]:{HTTP_PORT}"),
                "--body",
                "ok",
            ]
            .as_slice(),
            [
                "serve-http",
                "--listen",
                &format!("[::]:{SERVICE_HTTP_PORT}"),
                "--body",
                "ok",
            ]
            .as_slice(),
            ["echo", "--listen", &format!("[::]:{ECHO_PORT}")].as_slice(),
        ] {
            let mut command = cluster.pod_command(server, release_bin("mesh-pod"))?;
            command.args(args);
            processes.push(Process::spawn_ready(server, command, "listening", READY)?.0);
        }
        let mut iperf = cluster.pod_command(server, "iperf3")?;
        iperf.args(["--server", "--forceflush", "--port", &BULK_PORT.to_string()]);
        processes.push(Process::spawn_ready(server, iperf, "Server listening", READY)?.0);
        for port in [H2_PORT, SERVICE_H2_PORT] {
            let mut nghttpd = cluster.pod_command(server, "nghttpd")?;
            nghttpd
                .args(["--no-tls", "--htdocs"])
                .arg(&site)
                .arg(port.to_string());
            processes.push(Process::spawn(server, nghttpd)?);
            wait_listening(&cluster, server, port)?;
        }
    }
    let mut nodes = Vec::new();
    let mut admins = Vec::new();
    for node in 0..2 {
        let mut command = node_command(&cluster, node, &grpc, data_dir, &release_bin("mesh-node"))?;
        command
            .args(["--drain-timeout", "1s"])
            .args(node_args)
            .env("RUST_LOG", "warn");
        let (process, admin) = spawn_node(node, command)?;
        nodes.push(process);
        admins.push(admin);
    }
    wait_ready(&cluster)?;
    Ok(Setup {
        cluster,
        nodes,
        admins,
        api,
        control: control_pid,
        _processes: processes,
    })
}

/// Waits until something listens on TCP `port` in `pod`.
pub(crate) fn wait_listening(cluster: &Cluster, pod: &str, port: u16) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + READY;
    loop {
        let listening = cluster
            .pod_command(pod, "ss")?
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .context("running ss")?;
        if !listening.stdout.is_empty() {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "nothing listens on port {port} in {pod} after {READY:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a request crosses the mesh (pods captured, certificates
/// issued on both nodes).
fn wait_ready(cluster: &Cluster) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + READY;
    let server = cluster.pod("shop/server")?.ip4;
    let first = loop {
        let attempt = pod_run(
            cluster,
            "shop/client",
            &[
                "bench-http",
                "--to",
                &SocketAddr::from((server, 8080)).to_string(),
                "--requests",
                "10",
            ],
        );
        match attempt {
            Ok(result) => break result,
            Err(error) if std::time::Instant::now() > deadline => return Err(error),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    ensure!(first["requests"] == 10, "the mesh is not carrying requests");
    Ok(())
}

/// The release binaries the data path benchmarks run.
pub(crate) fn build() -> anyhow::Result<()> {
    super::build()
}

pub(crate) fn pod_run(
    cluster: &Cluster,
    pod: &str,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let output = cluster
        .pod_command(pod, release_bin("mesh-pod"))?
        .args(args)
        .stderr(Stdio::inherit())
        .output()?;
    json(output, &format!("mesh-pod {args:?} in {pod}"))
}

/// CPU time a process has used so far, in microseconds (user + system).
fn cpu_micros(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start after ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("unexpected /proc stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let per_second: f64 = run::output(Command::new("getconf").arg("CLK_TCK"))?
        .trim()
        .parse()
        .context("getconf CLK_TCK")?;
    Ok(ticks / per_second * 1e6)
}

/// CPU time the processes have used so far, together, in microseconds.
fn cpu_total(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|pid| cpu_micros(*pid)).sum()
}

/// What a path is measured through: `client` (a pod) calls these
/// addresses; `proxies` are the processes on the way (none for direct).
pub(crate) struct Target<'a> {
    pub label: &'a str,
    pub client: &'a str,
    /// HTTP/1.1, `host:port`.
    pub http: String,
    /// HTTP/2 with prior knowledge, `host:port`.
    pub h2: Option<String>,
    /// An iperf3 server, `host:port`.
    pub bulk: Option<String>,
    /// A TCP echo server, for the connections held open.
    pub echo: Option<String>,
    pub proxies: &'a [u32],
}

/// One path's figures; `None` where the path does not carry that load.
#[derive(Clone, Debug, Default)]
pub(crate) struct Figures {
    /// c=1 keep-alive latency percentiles, µs: p50, p90, p99, p99.9.
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub rps_c16: f64,
    pub rps_c64: f64,
    pub h2_rps: Option<f64>,
    pub gbit: Option<f64>,
    /// Requests each on a new connection, at c=16: per second, and the
    /// median time from connect() to the end of the answer (µs).
    pub new_per_second: f64,
    pub new_p50: f64,
    /// The proxies' CPU time (together) per 10,000 requests at c=16, ms.
    pub cpu_ms_per_10k: Option<f64>,
    /// The proxies' system calls and context switches (together) per
    /// request at c=1.
    pub work: Option<Work>,
    /// Each proxy's RSS idle, and while `Scale::held` connections are
    /// held open through it, MiB.
    pub rss_idle: Option<Vec<f64>>,
    pub rss_held: Option<Vec<f64>>,
}

impl Figures {
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "c1_p50_us": self.p50,
            "c1_p90_us": self.p90,
            "c1_p99_us": self.p99,
            "c1_p999_us": self.p999,
            "c16_requests_per_second": self.rps_c16,
            "c64_requests_per_second": self.rps_c64,
            "h2_requests_per_second": self.h2_rps,
            "bulk_gbit_per_second": self.gbit,
            "new_connections_per_second": self.new_per_second,
            "new_connection_p50_us": self.new_p50,
            "proxy_cpu_ms_per_10k_requests": self.cpu_ms_per_10k,
            "proxy_syscalls_per_request": self.work.map(|w| w.syscalls),
            "proxy_context_switches_per_request": self.work.map(|w| w.switches),
            "proxy_rss_idle_mib": self.rss_idle,
            "proxy_rss_held_mib": self.rss_held,
        })
    }
}

/// wrk's requests/s and request count for `connections` keep-alive
/// connections to `http`, failing on any error or non-2xx answer.
fn wrk(
    cluster: &Cluster,
    client: &str,
    http: &str,
    connections: usize,
    seconds: u32,
) -> anyhow::Result<serde_json::Value> {
    let output = cluster
        .pod_command(client, "wrk")?
        .args(["--threads", "2", "--connections", &connections.to_string()])
        .args(["--duration", &format!("{seconds}s")])
        .arg(format!("http://{http}/bench"))
        .stderr(Stdio::inherit())
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success() && !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "wrk to {http} from {client} failed: {text}"
    );
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("wrk printed no {prefix:?}: {text}"))
    };
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .with_context(|| format!("wrk printed no request count: {text}"))?;
    Ok(serde_json::json!({
        "requests_per_second": field("Requests/sec:")?,
        "requests": requests,
    }))
}

/// h2load's requests/s over 16 HTTP/2 connections, 10 streams each.
fn h2load(cluster: &Cluster, client: &str, h2: &str, seconds: u32) -> anyhow::Result<f64> {
    let output = cluster
        .pod_command(client, "h2load")?
        .args(["--clients", "16", "--max-concurrent-streams", "10"])
        .args(["--warm-up-time", "1", "--duration", &seconds.to_string()])
        .arg(format!("http://{h2}/bench"))
        .stderr(Stdio::inherit())
        .output()
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, …"
    let clean = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .is_some_and(|l| l.contains(" 0 failed") && l.contains(" 0 errored"));
    ensure!(
        output.status.success() && clean,
        "h2load to {h2} from {client} failed: {text}"
    );
    // "finished in 5.00s, 12345.67 req/s, …"
    text.lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.trim_end_matches(" req/s").parse().ok())
        .with_context(|| format!("h2load printed no rate: {text}"))
}

/// iperf3's received throughput in Gbit/s, one TCP connection.
fn iperf3(cluster: &Cluster, client: &str, bulk: &str, seconds: u32) -> anyhow::Result<f64> {
    let (host, port) = bulk.rsplit_once(':').context("host:port")?;
    let output = cluster
        .pod_command(client, "iperf3")?
        .args(["--client", host, "--port", port, "--json", "--omit", "1"])
        .args(["--time", &seconds.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .context("running iperf3")?;
    let result = json(output, &format!("iperf3 to {bulk} from {client}"))?;
    result["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bits| bits / 1e9)
        .with_context(|| format!("iperf3 printed no throughput: {result}"))
}

/// Each proxy's RSS while `count` connections are held open through the
/// path to `echo`.
fn rss_holding(
    cluster: &Cluster,
    client: &str,
    echo: &str,
    count: u32,
    proxies: &[u32],
) -> anyhow::Result<Vec<f64>> {
    let mut holder = cluster.pod_command(client, release_bin("mesh-pod"))?;
    holder.args(["hold-many", "--to", echo, "--count", &count.to_string()]);
    let (holder, line) = Process::spawn_ready("hold-many", holder, "{", READY)?;
    let answer: serde_json::Value = serde_json::from_str(&line)?;
    ensure!(
        answer["held"].as_u64() == Some(u64::from(count)),
        "hold-many said {line}"
    );
    let rss = rss_each(proxies)?;
    drop(holder);
    Ok(rss)
}

/// What the proxies do in the kernel's view for each request: counts
/// that, unlike latency, hardly move from one run to the next on a noisy
/// machine, and say how many times a request crosses into the kernel and
/// puts a process to sleep.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Work {
    pub syscalls: f64,
    pub switches: f64,
}

/// Counts the proxies' system calls and context switches with `perf stat`
/// over a c=1 run of `requests` keep-alive requests.
fn work_per_request(
    cluster: &Cluster,
    client: &str,
    http: &str,
    proxies: &[u32],
    requests: usize,
) -> anyhow::Result<Work> {
    let pids: Vec<String> = proxies.iter().map(u32::to_string).collect();
    // perf attaches to the proxies before it starts the client, and stops
    // counting when the client exits; the client's own calls are not
    // counted (only the processes named with -p).
    let output = cluster
        .pod_command(client, "perf")?
        .args([
            "stat",
            "-x,",
            "-e",
            "raw_syscalls:sys_enter,context-switches",
        ])
        .args(["-p", &pids.join(","), "--"])
        .arg(release_bin("mesh-pod"))
        .args([
            "bench-http",
            "--to",
            http,
            "--requests",
            &requests.to_string(),
        ])
        .output()
        .context("running perf stat (Debian package linux-perf)")?;
    ensure!(
        output.status.success(),
        "mesh-pod bench-http under perf stat failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The warm-up requests count too: the proxies carried them.
    let sent = serde_json::from_slice::<serde_json::Value>(&output.stdout)?["sent"]
        .as_f64()
        .context("bench-http printed no count of requests sent")?;
    let stats = String::from_utf8_lossy(&output.stderr);
    let count = |event: &str| -> anyhow::Result<f64> {
        stats
            .lines()
            .map(|line| line.split(',').collect::<Vec<_>>())
            .find(|fields| fields.get(2) == Some(&event))
            .and_then(|fields| fields[0].parse::<f64>().ok())
            .with_context(|| format!("perf stat counted no {event}: {stats}"))
    };
    Ok(Work {
        syscalls: count("raw_syscalls:sys_enter")? / sent,
        switches: count("context-switches")? / sent,
    })
}

/// The CPUs this process may run on, from `Cpus_allowed_list` ("0-3,6").
fn allowed_cpus() -> anyhow::Result<Vec<u32>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .context("no Cpus_allowed_list in /proc/self/status")?;
    let mut cpus = Vec::new();
    for range in list.trim().split(',') {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        cpus.extend(first.parse::<u32>()?..=last.parse::<u32>()?);
    }
    Ok(cpus)
}

/// Sets the CPUs a process's threads may run on.
fn pin(pid: u32, cpus: &str) -> anyhow::Result<()> {
    run::output(Command::new("taskset").args(["-a", "-p", "-c", cpus, &pid.to_string()])).map(drop)
}

/// Each simulated node's CPUs while the data path is measured; this
/// process gets all of its CPUs back when it drops.
struct Pinned {
    nodes: [String; 2],
    all: String,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = pin(std::process::id(), &self.all);
    }
}

/// Gives each simulated node CPUs of its own, as two real nodes have:
/// node0's pods and proxy on the first half of the CPUs, node1's on the
/// second; this process (and so every client it starts from now on) on
/// node0's. Without it the scheduler moves the six processes of a round
/// trip freely over both CPUs, and a path's latency depends on where each
/// wake-up happens to land. `None` with one CPU.
fn pin_nodes(cluster: &Cluster, proxies: &[u32]) -> anyhow::Result<Option<Pinned>> {
    let cpus = allowed_cpus()?;
    if cpus.len() < 2 {
        return Ok(None);
    }
    let list = |cpus: &[u32]| {
        cpus.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let (first, second) = cpus.split_at(cpus.len() / 2);
    let pinned = Pinned {
        nodes: [list(first), list(second)],
        all: list(&cpus),
    };
    for (node, cpus) in pinned.nodes.iter().enumerate() {
        let mut pids = vec![proxies[node]];
        for pod in cluster.layout().pods.iter().filter(|pod| pod.node == node) {
            let procs = std::fs::read_to_string(pod.cgroup.join("cgroup.procs"))?;
            pids.extend(
                procs
                    .lines()
                    .map(str::parse::<u32>)
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        for pid in pids {
            pin(pid, cpus)?;
        }
    }
    pin(std::process::id(), &pinned.nodes[0])?;
    Ok(Some(pinned))
}

/// Where a KVM guest's cpuidle-haltpoll driver keeps how long an idle
/// vCPU polls before it halts; the file is there only in such a guest.
const HALT_POLL: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";
/// The kernel's default for it.
const HALT_POLL_DEFAULT_NS: u64 = 200_000;

/// Idle vCPUs polling for the kernel's default time while the data path
/// is measured, when the VM was booted with less; the VM's own setting
/// comes back when this drops.
///
/// A halted vCPU is woken through the hypervisor, which takes tens of µs
/// here, and how often that happens in a round trip depends on timing
/// (direct's own c=1 p50 moved between 13 and 107 µs from one run to the
/// next): that cost would swamp the tens of µs a proxy hop adds. A polling
/// vCPU sees the wake-up at once, as a guest on the kernel's defaults does.
struct HaltPolling {
    before: u64,
}

impl HaltPolling {
    /// `None` when there is nothing to change: not a haltpoll guest, it
    /// already polls as long, or `MESH_BENCH_HALT_POLL=keep`.
    fn set() -> anyhow::Result<Option<Self>> {
        if std::env::var("MESH_BENCH_HALT_POLL").as_deref() == Ok("keep") {
            return Ok(None);
        }
        let Ok(text) = std::fs::read_to_string(HALT_POLL) else {
            return Ok(None);
        };
        let before: u64 = text
            .trim()
            .parse()
            .with_context(|| format!("{HALT_POLL} holds {text:?}"))?;
        if before >= HALT_POLL_DEFAULT_NS {
            return Ok(None);
        }
        std::fs::write(HALT_POLL, HALT_POLL_DEFAULT_NS.to_string())
            .with_context(|| format!("writing {HALT_POLL}"))?;
        Ok(Some(Self { before }))
    }
}

impl Drop for HaltPolling {
    fn drop(&mut self) {
        let _ = std::fs::write(HALT_POLL, self.before.to_string());
    }
}

/// Each process's RSS, in MiB.
fn rss_each(pids: &[u32]) -> anyhow::Result<Vec<f64>> {
    pids.iter().map(|pid| rss_mib(*pid)).collect()
}

/// The figures of one path.
pub(crate) fn measure(
    cluster: &Cluster,
    target: &Target<'_>,
    scale: Scale,
) -> anyhow::Result<Figures> {
    let Target {
        label,
        client,
        ref http,
        proxies,
        ..
    } = *target;
    let bench_http = |args: &[&str]| {
        let mut all = vec!["bench-http", "--to", http];
        all.extend_from_slice(args);
        pod_run(cluster, client, &all)
    };
    // Idle only before this path's first load, and only where the path
    // also holds connections (the L7 path runs on proxies the L4 path
    // has just loaded).
    let rss_idle = match (&target.echo, proxies.is_empty()) {
        (Some(_), false) => Some(rss_each(proxies)?),
        _ => None,
    };
    let (p50, c1) = median_of(
        scale.runs,
        || bench_http(&["--requests", &scale.requests_c1.to_string()]),
        "p50_us",
    )?;
    let percentile = |key: &str| c1[key].as_f64().unwrap_or(f64::NAN);
    let work = (!proxies.is_empty())
        .then(|| work_per_request(cluster, client, http, proxies, scale.requests_c1))
        .transpose()?;
    let cpu_before = cpu_total(proxies)?;
    let mut requests_c16 = 0.0;
    let (rps_c16, _) = median_of(
        scale.runs,
        || {
            let result = wrk(cluster, client, http, 16, scale.seconds)?;
            requests_c16 += result["requests"].as_f64().unwrap_or(0.0);
            Ok(result)
        },
        "requests_per_second",
    )?;
    let cpu_ms_per_10k = (!proxies.is_empty())
        .then(|| -> anyhow::Result<f64> {
            Ok((cpu_total(proxies)? - cpu_before) / 1e3 / requests_c16 * 1e4)
        })
        .transpose()?;
    let (rps_c64, _) = median_of(
        scale.runs,
        || wrk(cluster, client, http, 64, scale.seconds),
        "requests_per_second",
    )?;
    let h2_rps = median_at(scale.runs, target.h2.as_deref(), |h2| {
        h2load(cluster, client, h2, scale.seconds)
    })?;
    let gbit = median_at(scale.runs, target.bulk.as_deref(), |bulk| {
        iperf3(cluster, client, bulk, scale.seconds)
    })?;
    let (new_per_second, fresh) = median_of(
        scale.runs,
        || {
            bench_http(&[
                "--new-connections",
                "--connections",
                "16",
                "--requests",
                &scale.new_connections.to_string(),
            ])
        },
        "requests_per_second",
    )?;
    let rss_held = match (&target.echo, proxies.is_empty()) {
        (Some(echo), false) => Some(rss_holding(cluster, client, echo, scale.held, proxies)?),
        _ => None,
    };
    let figures = Figures {
        p50,
        p90: percentile("p90_us"),
        p99: percentile("p99_us"),
        p999: percentile("p999_us"),
        rps_c16,
        rps_c64,
        h2_rps,
        gbit,
        new_per_second,
        new_p50: fresh["p50_us"].as_f64().unwrap_or(f64::NAN),
        cpu_ms_per_10k,
        work,
        rss_idle,
        rss_held,
    };
    let optional = |value: Option<f64>, unit: &str| {
        value.map_or(String::new(), |v| format!("  {v:.1} {unit}"))
    };
    println!(
        "    {label:<8} c=1 p50 {p50:.1} µs p99 {:.1} µs  c=16 {rps_c16:.0} req/s  c=64 {rps_c64:.0} req/s{}{}  new conns {new_per_second:.0}/s{}",
        figures.p99,
        optional(h2_rps, "h2 req/s"),
        optional(gbit, "Gbit/s"),
        optional(cpu_ms_per_10k, "CPU ms/10k req"),
    );
    Ok(figures)
}

/// One row of the results table: a figure for each path (direct, mesh
/// L4, mesh L7, HAProxy, the plain TCP relay), then the mesh's and the
/// relay's ratios to direct, and the mesh's to HAProxy.
fn row(name: &str, values: [Option<f64>; 5], decimals: usize, ratios: bool) -> String {
    let cell = |value: Option<f64>| value.map_or("—".to_owned(), |v| format!("{v:.decimals$}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if ratios && b != 0.0 => format!("{:.2}", a / b),
        _ => String::new(),
    };
    let [direct, l4, l7, haproxy, relay] = values;
    format!(
        "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        cell(direct),
        cell(l4),
        cell(l7),
        cell(haproxy),
        cell(relay),
        ratio(l4, direct),
        ratio(l7, direct),
        ratio(relay, direct),
        ratio(l4, haproxy),
        ratio(l7, haproxy),
    )
}

/// A proxy pair's figures as one cell: "client / server".
fn pair(values: Option<&Vec<f64>>) -> String {
    values.map_or("—".to_owned(), |v| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    })
}

pub fn run(scale: Scale) -> anyhow::Result<super::Report> {
    step(
        "benchmark: pod to pod across nodes: direct, through the mesh (L4, L7), through HAProxy, and through a plain TCP relay (release builds)",
    );
    if !run::is_root() {
        bail!("the data path benchmark builds network namespaces and loads eBPF: run it as root");
    }
    build()?;
    let data_dir = std::env::temp_dir().join("mesh-bench-datapath");
    let setup = up(&data_dir, &[])?;
    let cluster = &setup.cluster;
    let haproxy = Haproxy::start(
        cluster,
        "direct/client",
        "direct/server",
        &data_dir.join("haproxy"),
    )?;
    let mesh_pids: Vec<u32> = setup.nodes.iter().map(Process::id).collect();
    let haproxy_pids = haproxy.pids();
    // MESH_BENCH_PIN=0 leaves the processes wherever the scheduler puts
    // them, to compare.
    let pinned = match std::env::var("MESH_BENCH_PIN").as_deref() {
        Ok("0") => None,
        _ => pin_nodes(cluster, &mesh_pids)?,
    };
    match &pinned {
        Some(Pinned {
            nodes: [node0, node1],
            ..
        }) => {
            println!("    CPUs: node0's pods, proxy and the clients on {node0}; node1's on {node1}")
        }
        None => println!("    CPUs: not pinned"),
    }
    let polling = HaltPolling::set()?;
    if let Some(HaltPolling { before }) = &polling {
        println!(
            "    idle vCPUs poll for {HALT_POLL_DEFAULT_NS} ns before halting while this runs (the kernel's default; this VM's {before} ns comes back afterwards; MESH_BENCH_HALT_POLL=keep leaves it)"
        );
    }
    let at = |namespace: &str, port: u16| -> anyhow::Result<String> {
        let server = cluster.pod(&format!("{namespace}/server"))?.ip4;
        Ok(SocketAddr::from((server, port)).to_string())
    };
    let targets = [
        Target {
            label: "direct",
            client: "direct/client",
            http: at("direct", HTTP_PORT)?,
            h2: Some(at("direct", H2_PORT)?),
            bulk: Some(at("direct", BULK_PORT)?),
            echo: None,
            proxies: &[],
        },
        Target {
            label: "mesh L4",
            client: "shop/client",
            http: at("shop", HTTP_PORT)?,
            h2: Some(at("shop", H2_PORT)?),
            bulk: Some(at("shop", BULK_PORT)?),
            echo: Some(at("shop", ECHO_PORT)?),
            proxies: &mesh_pids,
        },
        Target {
            label: "mesh L7",
            client: "shop/client",
            http: format!("{L7_VIP}:80"),
            h2: Some(format!("{L7_VIP}:81")),
            bulk: None,
            echo: None,
            proxies: &mesh_pids,
        },
        Target {
            label: "HAProxy",
            client: "direct/client",
            http: haproxy::front(HTTP_PORT)?,
            h2: Some(haproxy::front(H2_PORT)?),
            bulk: Some(haproxy::front(BULK_PORT)?),
            echo: Some(haproxy::front(ECHO_PORT)?),
            proxies: &haproxy_pids,
        },
        Target {
            label: "relay",
            client: "direct/client",
            http: haproxy::relay_front(HTTP_PORT)?,
            h2: None,
            bulk: Some(haproxy::relay_front(BULK_PORT)?),
            echo: None,
            proxies: &haproxy_pids,
        },
    ];
    let mut figures = Vec::new();
    for target in &targets {
        // MESH_BENCH_PERF=FILE: record node0's proxy with perf while the
        // L4 path (or MESH_BENCH_PERF_PATH's) runs (`perf report -i FILE`),
        // to see where its time goes.
        let recorded = std::env::var("MESH_BENCH_PERF_PATH");
        let perf = match std::env::var_os("MESH_BENCH_PERF") {
            Some(file) if target.label == recorded.as_deref().unwrap_or("mesh L4") => Some(
                Command::new("perf")
                    .args(["record", "-F", "999", "--call-graph=dwarf,16384", "-o"])
                    .arg(file)
                    .args(["-p", &mesh_pids[0].to_string()])
                    .stdout(Stdio::null())
                    .spawn()
                    .context("starting perf record")?,
            ),
            _ => None,
        };
        figures.push(measure(cluster, target, scale)?);
        if let Some(mut perf) = perf {
            // perf writes its file on SIGINT.
            Command::new("kill")
                .args(["-INT", &perf.id().to_string()])
                .status()?;
            perf.wait()?;
        }
    }
    drop(haproxy);
    drop(setup);
    cluster::teardown(CLUSTER)?;
    let _ = std::fs::remove_dir_all(&data_dir);
    report(&figures, scale, pinned.as_ref(), polling.as_ref())
}

fn report(
    figures: &[Figures],
    scale: Scale,
    pinned: Option<&Pinned>,
    polling: Option<&HaltPolling>,
) -> anyhow::Result<super::Report> {
    let [direct, l4, l7, haproxy, relay] = figures else {
        bail!("five paths measured, not {}", figures.len());
    };
    let all = |f: fn(&Figures) -> Option<f64>| [f(direct), f(l4), f(l7), f(haproxy), f(relay)];
    let per_hop = |path: &Figures| (path.p50 - direct.p50) / 2.0;
    let counted = |path: &Figures, count: fn(Work) -> f64| {
        path.work
            .map_or("—".to_owned(), |work| format!("{:.1}", count(work)))
    };
    let mut table = String::from(
        "| | direct | mesh L4 | mesh L7 | HAProxy | TCP relay | L4 ÷ direct | L7 ÷ direct | relay ÷ direct | L4 ÷ HAProxy | L7 ÷ HAProxy |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    table += &row("c=1 p50 µs", all(|f| Some(f.p50)), 1, true);
    table += &row("c=1 p90 µs", all(|f| Some(f.p90)), 1, true);
    table += &row("c=1 p99 µs", all(|f| Some(f.p99)), 1, true);
    table += &row("c=1 p99.9 µs", all(|f| Some(f.p999)), 1, true);
    table += &row(
        "added per proxy hop, p50 µs",
        [
            None,
            Some(per_hop(l4)),
            Some(per_hop(l7)),
            Some(per_hop(haproxy)),
            Some(per_hop(relay)),
        ],
        1,
        false,
    );
    table += &row("c=16 requests/s", all(|f| Some(f.rps_c16)), 0, true);
    table += &row("c=64 requests/s", all(|f| Some(f.rps_c64)), 0, true);
    table += &row("HTTP/2 requests/s (h2load)", all(|f| f.h2_rps), 0, true);
    table += &row("bulk Gbit/s (iperf3)", all(|f| f.gbit), 2, true);
    table += &row(
        "new connections/s, c=16",
        all(|f| Some(f.new_per_second)),
        0,
        true,
    );
    table += &row("new connection p50 µs", all(|f| Some(f.new_p50)), 1, true);
    table += &row(
        "proxies' CPU ms per 10k requests (c=16)",
        all(|f| f.cpu_ms_per_10k),
        0,
        true,
    );
    table += &row(
        "proxies' system calls per request (c=1)",
        all(|f| f.work.map(|w| w.syscalls)),
        1,
        true,
    );
    table += &row(
        "proxies' context switches per request (c=1)",
        all(|f| f.work.map(|w| w.switches)),
        1,
        true,
    );
    table += &format!(
        "| proxy RSS idle, MiB (client / server side) | — | {} | | {} | | | | | | |\n",
        pair(l4.rss_idle.as_ref()),
        pair(haproxy.rss_idle.as_ref()),
    );
    table += &format!(
        "| proxy RSS, {} connections held, MiB | — | {} | | {} | | | | | | |\n",
        scale.held,
        pair(l4.rss_held.as_ref()),
        pair(haproxy.rss_held.as_ref()),
    );
    println!("\n{table}");
    let json = serde_json::json!({
        "paths": {
            "direct": direct.to_json(),
            "mesh_l4": l4.to_json(),
            "mesh_l7": l7.to_json(),
            "haproxy": haproxy.to_json(),
            "tcp_relay": relay.to_json(),
        },
        "added_per_hop_p50_us": {
            "mesh_l4": per_hop(l4),
            "mesh_l7": per_hop(l7),
            "haproxy": per_hop(haproxy),
            "tcp_relay": per_hop(relay),
        },
    });
    let body = format!(
        "A client pod on node0 calls a server pod on node1 of a local netns cluster\n\
         (veth, bridges, a fabric bridge; one machine), five ways in one run:\n\n\
         - **direct**: in an uncaptured namespace;\n\
         - **mesh L4**: in a captured one, at the server's own address, on ports no\n  \
         service declares: the client's node proxy → HBONE (HTTP/2 CONNECT over\n  \
         mTLS, pooled) → the server's node proxy → server, bytes relayed as they are;\n\
         - **mesh L7**: at the address of a service the server serves, ports declared\n  \
         `http` and `http2` (the same servers again on those ports): the client's\n  \
         node proxy parses each request, applies split, breaker, balancer, retry and\n  \
         timeout, and sends it over a pooled upstream connection riding an HBONE\n  \
         stream; the server's node proxy authorizes each request and sends it to the\n  \
         server over a pooled connection;\n\
         - **HAProxy**: two HAProxy 2.6 instances on the same topology, one in the\n  \
         client pod (plain HTTP and TCP in on loopback, as a captured connection\n  \
         reaches the node proxy), one in the server pod (mutual TLS in, ECDSA P-256,\n  \
         HTTP/2 between the two with connections reused), one thread each like the\n  \
         node proxy here: a widely used proxy as a yardstick;\n\
         - **TCP relay**: the same two HAProxy instances relaying plain TCP, no TLS\n  \
         and no HTTP, on the same legs: what a widely used proxy pays per hop on\n  \
         this machine for its process and its extra legs alone, with no work on\n  \
         the bytes.\n\n\
         Release builds, access logs off, median of {runs} run(s) (the c=1\n\
         percentiles are those of the run with the median p50). HTTP/1.1 keep-alive\n\
         GETs with a 2-byte answer: c=1 {c1} requests on one connection (`mesh-pod\n\
         bench-http`); c=16 and c=64 with wrk ({seconds} s, 2 threads); HTTP/2 with\n\
         h2load (16 connections × 10 streams, {seconds} s, to nghttpd); bulk: iperf3, one\n\
         TCP connection, {seconds} s; new connections: {new} requests at c=16, each on a\n\
         connection of its own, timed from connect() to the end of the answer. The\n\
         proxies' CPU time is read from /proc over the c=16 runs, their system\n\
         calls and context switches counted by `perf stat` over one more c=1 run\n\
         of {c1} requests; RSS with {held} connections held open to an echo\n\
         server. {pinning}\n\n\
         {table}\n\
         HAProxy works request by request, so its like is mesh L7. Against mesh L4\n\
         it is a yardstick, not a peer: it reuses its connections to the server\n\
         side for new client connections, which a byte relay cannot (each new\n\
         connection through the mesh's L4 path is a new tunnel stream and a new\n\
         connection to the server), and it checks the peer's certificate chain,\n\
         not its identity, where the mesh checks SPIFFE IDs and policy.\n\n\
         Added per proxy hop at p50, L4: {l4_hop:.1} µs (target ≤ 20; HAProxy {ha_hop:.1} µs).\n\
         Throughput ratios to direct (L4): c=16 requests {rps:.2}, bulk {bulk:.2} (target ≥ 0.5).\n\
         The plain TCP relay adds {relay_hop:.1} µs per hop and keeps {relay_rps:.2}× direct's\n\
         requests/s at c=16 and {relay_bulk:.2}× its bulk throughput: what passing\n\
         plain bytes through two more processes costs on this machine. The L4\n\
         path, which also does mTLS, HTTP/2 framing and authorization, {above_floor}.\n\
         mesh-node RSS idle: {rss} MiB (target ≤ 15).\n\n\
         Against published figures, measured elsewhere and so only a rough guide:\n\
         ztunnel (Istio ambient's node proxy) adds about 25 µs per hop at p50 and\n\
         keeps 0.41× direct's requests/s on this kind of machine — here the L4 path\n\
         adds {l4_hop:.1} µs per hop and keeps {rps:.2}× at c=16; Istio 1.22 reports\n\
         +0.17 ms at P90 for two ztunnels at 1,000 requests/s — here the two node\n\
         proxies add {l4_p90:.0} µs at c=1 P90 on the L4 path and {l7_p90:.0} µs on the L7\n\
         path (one request at a time, not a fixed rate); ztunnel idles at about\n\
         12 MB RSS — here {rss} MiB.\n\n\
         Latency on this VM is mostly the cost of one process waking another\n\
         on a vCPU that has gone idle. This VM boots with\n\
         `haltpoll.guest_halt_poll_ns=0`: an idle vCPU halts at once and is\n\
         woken through the hypervisor, which takes tens of µs, and how often\n\
         that happens in a round trip depends on timing. The kernel's default\n\
         is to poll for up to 200 µs before halting, as a guest left on its\n\
         defaults does; {idle} Four quick runs alternating the two settings\n\
         (pinned, Intel Xeon, 2026-11-29): polling, direct's c=1 p50 was 20.5\n\
         and 16.5 µs, the L4 path added 11.1 and 14.5 µs per hop and kept\n\
         0.67× and 0.64× direct's requests/s at c=16; halting at once, direct's\n\
         p50 was 96.9 and 70.8 µs, the L4 path added 20.2 and 24.2 µs per hop\n\
         and kept 0.52× and 0.47×. Throughput gains because a CPU whose\n\
         processes all wait on the other node no longer loses tens of µs each\n\
         time it is woken; HAProxy's c=16 rate rose as much (37,900–39,100 to\n\
         51,400–53,800). Bulk moved little either way\n\
         (0.41–0.46× direct), nor did direct's throughput. Halting at once,\n\
         runs also moved far more: two full runs ten minutes apart gave 14.1\n\
         and 43.3 µs per hop, 0.49× and 0.39× at c=16, while the proxies'\n\
         system calls and context switches per request stayed the same; left\n\
         to the scheduler as well (`MESH_BENCH_PIN=0`), direct's own c=1 p50\n\
         moved between 13 and 107 µs from one quick run to the next. Read the\n\
         ratios, measured side by side, rather than the absolutes, and one run\n\
         as one sample.\n\n\
         Where a proxy's time goes (perf on both proxies, 2026-11-27;\n\
         `MESH_BENCH_PERF=FILE cargo xtask bench datapath` records node0's during\n\
         the L4 path, or the one `MESH_BENCH_PERF_PATH` names, with DWARF call\n\
         graphs), the three biggest costs:\n\n\
         1. **Wake-ups and context switches**, about a quarter of each proxy's CPU\n   \
         at L4: the kernel waking the reader of every segment (`sock_def_readable`\n   \
         → `_raw_spin_unlock_irqrestore`, 11–19 %) and switching tasks\n   \
         (`finish_task_switch`, 11–12 %, mostly the proxy preempted on its way out\n   \
         of `send` by the task it woke). A round trip through the mesh wakes six\n   \
         processes where direct wakes two. Done: the node proxy runs one worker\n   \
         thread here (half its CPU per request against two). Nothing is left to\n   \
         cut in the proxy's own calls at c=1: the L4 path's two proxies make\n   \
         {l4_calls} system calls and {l4_switches} context switches per request, the floor\n   \
         for two processes that each read and write once each way and sleep in\n   \
         between: 12 and 4. Per proxy and direction that is one `recvfrom`, one\n   \
         write (`writev` into the tunnel, `sendto` to the application) and one\n   \
         `epoll_wait` (perf record, 2026-11-29). HAProxy makes {ha_calls} and\n   \
         {ha_switches} (2.7 reads per proxy and direction, and `clock_gettime` as\n   \
         a system call about ten times a request), the plain relay {relay_calls} and\n   \
         {relay_switches}.\n\
         2. **The kernel's TCP for the extra legs**, about half: each proxy adds a\n   \
         loopback leg (the pod to the proxy's listener) and a tunnel leg, with\n   \
         their copies (`_copy_to_iter`/`_copy_from_iter`, 15 % in bulk) and softirq\n   \
         work. A prototype (2026-11-28, not kept) redirected the loopback legs'\n   \
         bytes socket to socket with a sockmap and `sk_msg`: in three alternating\n   \
         runs the L4 path's c=1 p50 stayed at 129–167 µs against direct's\n   \
         76–91 µs, as without it. The wake-ups, not the legs' TCP, set the\n   \
         latency, and a safe version needs per-socket state (bytes already\n   \
         queued by TCP must not be overtaken) and memory bounds the kernel does\n   \
         not give a redirected socket.\n\
         3. **User space**, 16–24 % of a proxy at L4 and about 60 % at L7. At L7 the\n   \
         top item is `memmove` (12–13 %), spread over hyper's and h2's moves of\n   \
         frames, header maps and futures, then malloc and free (about 12 %).\n   \
         Boxing each request's future, so that hyper moves a pointer, left both\n   \
         the profile and the throughput as they were in alternating A/B runs, and\n   \
         was not kept. With call graphs (2026-11-29, the whole L7 path) the\n   \
         client side's time is a quarter `writev` (most of it the kernel\n   \
         delivering the segment to its reader), `memmove` 10 % spread over h2's\n   \
         frame queue and hyper's dispatchers, and 3 % building each request's\n   \
         metric labels; no single item of ours stands out. The L7 path's HTTP/2\n   \
         run is not bound by CPU: a quarter to a third of the two vCPUs stays\n   \
         idle through it (top, 2026-11-29), each node proxy busy half to two\n   \
         thirds of the time; raising nghttpd's limit of 100 streams on the one upstream\n   \
         connection to 1000 did not raise the rate. In bulk the sending\n   \
         proxy copies more than it encrypts\n   \
         (`memmove` 14 %, AES-GCM 12.5 %): the copy from read buffer to frame\n   \
         is gone since 2026-11-28 (a read is frozen into the frame as it is);\n   \
         the one run after it moved bulk from 0.35× to 0.41× direct, within\n   \
         this machine's run-to-run spread, so not proven by itself.\n\n\
         Bulk is where the L4 path has the least margin over its target; the limit\n\
         is node0's CPU (`perf record -a` over one L4 iperf3 run, 2026-11-29,\n\
         before the change below):\n\
         of node0's busy time, 88 % went to its node proxy and 11 % to iperf3\n\
         itself. In the proxy the kernel dominates: sending each segment on\n\
         through veth, bridge and fabric, whose receive side (softirq) runs on\n\
         the sender's CPU (about a third of the proxy's time), and reading the\n\
         pod's bytes off the loopback leg (`_copy_to_iter`, 13 %); AES-GCM is\n\
         12 % and `memmove` 5 %. Direct's CPU 0 carries one send and one\n\
         delivery per byte, the mesh's two of each plus the read and the\n\
         encryption. Two ways to cut that are not open here: kernel TLS, which\n\
         would let the kernel encrypt while it copies, is not built into this\n\
         kernel (`CONFIG_TLS` is not set), and reading the tunnel 64 KiB at a\n\
         time (rustls reads 4 KiB per call) left bulk at 0.40× and 0.43× in two\n\
         quick runs, against 0.41× and 0.46× without it, so it was not kept.\n\
         Nor was steering each node's receive work to its own CPU (RPS on its\n\
         fabric link), as on two real machines: the hand-off between the\n\
         vCPUs cost every path more than it moved, direct's bulk falling from\n\
         14 to 8.5 Gbit/s (the L4 path kept 0.51× and 0.55× of that, two quick\n\
         runs). Done: a tunnel's TLS session may hold 256 KiB of records for\n\
         its socket, where rustls's default is 64 KiB, so a bulk read (256 KiB)\n\
         goes out in one write: bulk kept 0.48–0.50× direct against\n\
         0.41–0.46× before (three quick runs each, alternating, 2026-11-29),\n\
         with c=1 and c=16 as they were. Also done: the tunnels offer AES-128-GCM\n\
         first, where rustls's order put AES-256-GCM first; sealing 16 KiB\n\
         records on one vCPU ran at 9.6 GB/s against 8.0. In five alternating\n\
         5 s bulk runs each of direct and L4 (2026-11-29), bulk kept a median\n\
         0.498× direct before and 0.506× after; three full runs after it kept\n\
         0.52×, 0.52× and 0.51×. Tried and not kept: aws-lc in\n\
         place of ring. Its AVX-512 AES-GCM sealed at 14.4 GB/s and bulk kept\n\
         0.516× (0.514–0.534, five runs; 0.51× and 0.52× in two full runs), but\n\
         the proxy's idle RSS rose by about 1 MiB, to 15.2 / 15.6 and 14.9 /\n\
         15.3 MiB, over the 15 MiB target: its AVX-512 AES-GCM encryption and\n\
         decryption are 340 KiB of code each, and the proxy's code is almost all\n\
         resident. A profile of\n\
         node0's proxy over one L4 bulk run (`perf record -a`, on aws-lc) put\n\
         45 % of its time in sending into the tunnel (the copy 11 %; most of\n\
         the rest is the kernel carrying each segment through veth and bridge\n\
         and delivering it to node1's proxy, on the sender's CPU), 22 % in\n\
         reading the pod's bytes (the copy 16 %) and 19 % in encrypting (sealing\n\
         11 %, copying each record's plaintext into place 6 %). What is left is\n\
         the loopback leg, which a sockmap could take out of TCP (item 2), and\n\
         the copies.\n\n\
         At c=64 the L4 path keeps less than at c=16 (0.49×, 0.49× and 0.52×\n\
         direct in three full runs, 0.44–0.55× in quick runs), where the TCP relay keeps the\n\
         same. Node1's CPU limits both loads (node0's idled about half the time;\n\
         `perf record -a` over one quick run's c=16 and c=64 loads, 2026-11-29),\n\
         and at c=64 the server, a thread per connection, took 44 % of node1's\n\
         CPU against 30 % at c=16 while it answered fewer requests: 64 threads\n\
         share that CPU with the node proxy. Giving wrk one thread per CPU it\n\
         may use, instead of two on its one CPU, moved c=64 by no more than the\n\
         noise (two quick runs); it was not kept. Not looked into further.\n\n\
         The c=64 load found a defect, fixed: with more requests in flight to one\n\
         upstream than its pool kept idle (32), the proxy opened and closed a\n\
         connection per request, and the TIME_WAIT sockets left in the pod made\n\
         each connect() slower, until throughput fell 20-fold within a minute.\n\n\
         Machine: {machine}. Reproduce: `cargo xtask bench datapath` (root; `--quick`\n\
         for a short run that records nothing here).",
        runs = scale.runs,
        c1 = scale.requests_c1,
        seconds = scale.seconds,
        new = scale.new_connections,
        held = scale.held,
        l4_hop = per_hop(l4),
        ha_hop = per_hop(haproxy),
        relay_hop = per_hop(relay),
        relay_rps = relay.rps_c16 / direct.rps_c16,
        relay_bulk = relay.gbit.unwrap_or(f64::NAN) / direct.gbit.unwrap_or(f64::NAN),
        above_floor = {
            let above = per_hop(l4) - per_hop(relay);
            if above >= 0.0 {
                format!("takes {above:.1} µs per hop more than the relay")
            } else {
                format!(
                    "took {:.1} µs per hop less than the relay in this run",
                    -above
                )
            }
        },
        rps = l4.rps_c16 / direct.rps_c16,
        bulk = l4.gbit.unwrap_or(f64::NAN) / direct.gbit.unwrap_or(f64::NAN),
        rss = pair(l4.rss_idle.as_ref()),
        l4_p90 = l4.p90 - direct.p90,
        l7_p90 = l7.p90 - direct.p90,
        machine = super::machine(),
        pinning = match pinned {
            Some(Pinned {
                nodes: [node0, node1],
                ..
            }) => format!(
                "Each simulated node has CPUs of its own, as real nodes do (`taskset`):\n\
                 node0's pods, its proxy and the clients on CPU {node0}, node1's pods and\n\
                 proxy on CPU {node1}. A node proxy's CPU time comes out of its own\n\
                 node's budget (direct's client and server have a CPU each to\n\
                 themselves; the mesh's share theirs with their node's proxy), and every\n\
                 path crosses between the CPUs once each way, as traffic crosses\n\
                 between nodes."
            ),
            None => "Nothing is pinned (`MESH_BENCH_PIN=0`, or one CPU): the scheduler\n\
                     places every process."
                .to_owned(),
        },
        idle = match polling {
            Some(HaltPolling { before }) => format!(
                "this run set it (`guest_halt_poll_ns` {before} → {HALT_POLL_DEFAULT_NS}) and put\n\
                 the VM's own setting back afterwards (`MESH_BENCH_HALT_POLL=keep`\n\
                 leaves it)."
            ),
            None => "this run left the machine's setting as it was (already polling,\n\
                     not a haltpoll guest, or `MESH_BENCH_HALT_POLL=keep`)."
                .to_owned(),
        },
        l4_calls = counted(l4, |w| w.syscalls),
        l4_switches = counted(l4, |w| w.switches),
        ha_calls = counted(haproxy, |w| w.syscalls),
        ha_switches = counted(haproxy, |w| w.switches),
        relay_calls = counted(relay, |w| w.syscalls),
        relay_switches = counted(relay, |w| w.switches),
    );
    Ok(super::Report {
        name: "datapath",
        title: "Pod to pod through the mesh",
        body,
        json,
    })
}
