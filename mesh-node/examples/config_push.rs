//! The configuration push at scale, against a running `mesh-control`:
//! simulated nodes (each the node's real configuration client: its own
//! node certificate, gRPC stream, validation, swap and ACK — everything
//! but the data path) follow a mesh of namespaces, services and workloads
//! loaded through the admin API. Then changes are written through the API
//! one at a time, and each is timed from the write until every node it
//! concerns holds it (the client ACKs right after it swaps a push in).
//!
//! Prints one JSON object. Run by `cargo xtask bench config-push`.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use mesh_identity::TrustBundle;
use mesh_model::config::NodeConfig;
use mesh_node::{
    control::ControlPlane,
    identity::{CertManager, Clock, RotationConfig},
    xds::Xds,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::watch,
};

#[derive(Parser)]
struct Args {
    /// The admin API, `http://host:port`.
    #[arg(long)]
    api: String,
    /// The node API, `host:port`.
    #[arg(long)]
    grpc: String,
    /// mesh-control's data directory (admin token, CA, bootstrap token).
    #[arg(long)]
    data_dir: PathBuf,
    /// mesh-control's process, for its CPU time and memory.
    #[arg(long)]
    control_pid: u32,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    #[arg(long, default_value_t = 10)]
    services_per_namespace: usize,
    #[arg(long, default_value_t = 10)]
    workloads_per_service: usize,
    /// Changes timed per kind.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// Workload certificates asked for at once, at the end.
    #[arg(long, default_value_t = 1000)]
    certificates: usize,
}

/// How long one change may take to reach its nodes before the run fails.
const REACH: Duration = Duration::from_secs(60);

struct Api {
    addr: String,
    token: String,
}

impl Api {
    /// One request; the response body, or an error naming the status.
    async fn call(&self, method: &str, path: &str, body: &str) -> anyhow::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(&self.addr).await?;
        stream.set_nodelay(true)?;
        let content_type = if body.starts_with('{') {
            "application/json"
        } else {
            "application/yaml"
        };
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            self.token,
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let response = String::from_utf8_lossy(&response);
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head.split(' ').nth(1).unwrap_or("?");
        ensure!(status.starts_with('2'), "{method} {path}: {status}: {body}");
        Ok(body.to_owned())
    }

    async fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        self.call("POST", "/api/v1/apply", yaml).await.map(drop)
    }
}

fn namespace_name(i: usize) -> String {
    format!("ns-{i:03}")
}

fn node_name(n: usize) -> String {
    format!("node-{n:03}")
}

/// Namespace `i`'s documents: the namespace (captured), its services each
/// with a policy, and their workloads, replica `k` of every service on
/// node `i + k`: a namespace spans `workloads_per_service` nodes.
fn namespace_yaml(args: &Args, i: usize) -> String {
    let ns = namespace_name(i);
    let mut yaml = format!(
        "apiVersion: mesh.io/v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{mesh.io/capture: enabled}}}}\n"
    );
    for j in 0..args.services_per_namespace {
        yaml.push_str(&format!(
            "---\napiVersion: mesh.io/v1\nkind: Service\nmetadata: {{name: svc-{j}, namespace: {ns}}}\n\
             spec: {{ports: [{{port: 8080, protocol: http}}]}}\n\
             ---\napiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {{name: svc-{j}, namespace: {ns}}}\n\
             spec: {{timeout_ms: 1000}}\n"
        ));
        for k in 0..args.workloads_per_service {
            yaml.push_str(&workload_yaml(args, i, j, k));
        }
    }
    yaml
}

fn workload_node(args: &Args, i: usize, k: usize) -> String {
    node_name((i + k) % args.nodes)
}

fn workload_ip(i: usize, j: usize, k: usize) -> String {
    format!("10.{}.{}.{}", i % 250, j % 250, k + 1)
}

fn workload_yaml(args: &Args, i: usize, j: usize, k: usize) -> String {
    format!(
        "---\napiVersion: mesh.io/v1\nkind: Workload\nmetadata: {{name: svc-{j}-{k}, namespace: {}}}\n\
         spec: {{node: {}, ip: {}, services: [svc-{j}]}}\n",
        namespace_name(i),
        workload_node(args, i, k),
        workload_ip(i, j, k)
    )
}

/// A simulated node: the configuration client and its node certificate.
struct Node {
    control: ControlPlane,
    config: watch::Receiver<Arc<NodeConfig>>,
    _xds: Xds,
    _identity: CertManager,
}

/// CPU seconds (user + system) and resident MiB of a process.
fn usage(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `fields` starts at field 3.
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    // USER_HZ: 100 on every Linux architecture we run on.
    Ok((ticks / 100.0, rss_kib / 1024.0))
}

/// Waits until every one of `nodes` satisfies `done`; the time it took
/// from `start`.
async fn reached(
    nodes: &[&Node],
    start: Instant,
    what: &str,
    done: impl Fn(&NodeConfig) -> bool,
) -> anyhow::Result<Duration> {
    for node in nodes {
        let mut config = node.config.clone();
        tokio::time::timeout(REACH, config.wait_for(|c| done(c)))
            .await
            .with_context(|| format!("{what} did not reach a node within {REACH:?}"))??;
    }
    Ok(start.elapsed())
}

fn version(config: &NodeConfig, name: &str) -> Option<String> {
    config.resources.get(name).map(|(v, _)| v.clone())
}

#[derive(serde::Serialize)]
struct Timings {
    kind: &'static str,
    changes: usize,
    nodes_per_change: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Of which the API write itself (request to response), median.
    write_p50_ms: f64,
}

/// Times of one kind of change: (until the write answered, until every
/// node held it).
#[derive(Default)]
struct Samples(Vec<(Duration, Duration)>);

impl Samples {
    fn timings(self, kind: &'static str, nodes_per_change: usize) -> Timings {
        let quantile = |samples: &mut Vec<Duration>, q: f64| {
            samples.sort();
            let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[index].as_secs_f64() * 1e3
        };
        let mut writes: Vec<Duration> = self.0.iter().map(|(w, _)| *w).collect();
        let mut reached: Vec<Duration> = self.0.iter().map(|(_, r)| *r).collect();
        Timings {
            kind,
            changes: self.0.len(),
            nodes_per_change,
            p50_ms: quantile(&mut reached, 0.50),
            p99_ms: quantile(&mut reached, 0.99),
            max_ms: quantile(&mut reached, 1.0),
            write_p50_ms: quantile(&mut writes, 0.50),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.workloads_per_service <= args.nodes,
        "a namespace spans workloads_per_service nodes"
    );
    let api = Api {
        addr: args
            .api
            .strip_prefix("http://")
            .context("--api is http://host:port")?
            .trim_end_matches('/')
            .to_owned(),
        token: std::fs::read_to_string(args.data_dir.join("admin-token"))?
            .trim()
            .to_owned(),
    };
    let bundle = TrustBundle::from_pem(
        "cluster.local",
        &std::fs::read_to_string(args.data_dir.join("ca/root.pem"))?,
    )?;
    let bootstrap = std::fs::read_to_string(args.data_dir.join("bootstrap-token"))?
        .trim()
        .to_owned();

    eprintln!(
        "loading {} namespaces × {} services × {} workloads",
        args.namespaces, args.services_per_namespace, args.workloads_per_service
    );
    let loading = Instant::now();
    for i in 0..args.namespaces {
        api.apply(&namespace_yaml(&args, i)).await?;
    }
    let load_s = loading.elapsed().as_secs_f64();

    let (_, rss_before_nodes) = usage(args.control_pid)?;
    eprintln!("starting {} nodes", args.nodes);
    let joining = Instant::now();
    let mut nodes = Vec::with_capacity(args.nodes);
    for n in 0..args.nodes {
        let control = ControlPlane::new(
            &args.grpc,
            &node_name(n),
            bundle.clone(),
            Some(bootstrap.clone()),
        )
        .map_err(anyhow::Error::msg)?;
        let identity = control.start_node_identity(RotationConfig::default(), Clock::system());
        let xds = Xds::start(control.clone(), Vec::new());
        nodes.push(Node {
            control,
            config: xds.config(),
            _xds: xds,
            _identity: identity,
        });
    }
    let revision: i64 =
        serde_json::from_str::<serde_json::Value>(&api.call("GET", "/api/v1/revision", "").await?)?
            ["revision"]
            .as_i64()
            .context("no revision")?;
    let everyone: Vec<&Node> = nodes.iter().collect();
    let sync = reached(&everyone, joining, "the initial configuration", |c| {
        c.revision >= revision
    })
    .await?;
    let held = nodes[0].config.borrow().resources.len();
    eprintln!(
        "all {} nodes in sync after {:.1} s (node-000 holds {held} resources)",
        args.nodes,
        sync.as_secs_f64()
    );
    let (cpu_before, rss_loaded) = usage(args.control_pid)?;

    // Deterministic spread over namespaces and services.
    let pick = |c: usize| {
        let i = (c * 37 + 11) % args.namespaces;
        let j = (c * 7 + 3) % args.services_per_namespace;
        (i, j)
    };
    let namespace_nodes = |i: usize| -> Vec<&Node> {
        (0..args.workloads_per_service)
            .map(|k| &nodes[(i + k) % args.nodes])
            .collect()
    };

    eprintln!("timing {} changes of each kind", args.changes);
    let mut policy = Samples::default();
    for c in 0..args.changes {
        let (i, j) = pick(c);
        let ns = namespace_name(i);
        let name = format!("servicepolicy/{ns}/svc-{j}");
        let affected = namespace_nodes(i);
        let before = version(&affected[0].config.borrow(), &name);
        let start = Instant::now();
        api.apply(&format!(
            "apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {{name: svc-{j}, namespace: {ns}}}\n\
             spec: {{timeout_ms: {}}}\n",
            2000 + c
        ))
        .await?;
        let written = start.elapsed();
        policy.0.push((
            written,
            reached(&affected, start, &name, |config| {
                version(config, &name) != before
            })
            .await?,
        ));
    }

    let mut health = Samples::default();
    let mut unhealthy = std::collections::HashSet::new();
    for c in 0..args.changes {
        let (i, j) = pick(c + 1);
        let ns = namespace_name(i);
        let name = format!("endpoints/{ns}/svc-{j}");
        let affected = namespace_nodes(i);
        let before = version(&affected[0].config.borrow(), &name);
        let start = Instant::now();
        // Every change flips one replica of the service, down or back up.
        let k = c % args.workloads_per_service;
        let healthy = unhealthy.contains(&(i, j, k));
        if healthy {
            unhealthy.remove(&(i, j, k));
        } else {
            unhealthy.insert((i, j, k));
        }
        api.call(
            "PUT",
            &format!("/api/v1/services/svc-{j}/endpoints/health?namespace={ns}"),
            &format!(
                "{{\"ip\": \"{}\", \"port\": 8080, \"healthy\": {healthy}}}",
                workload_ip(i, j, k)
            ),
        )
        .await?;
        let written = start.elapsed();
        health.0.push((
            written,
            reached(&affected, start, &name, |config| {
                version(config, &name) != before
            })
            .await?,
        ));
    }

    let mut added = Samples::default();
    let mut removed = Samples::default();
    for c in 0..args.changes {
        let (i, j) = pick(c + 2);
        let ns = namespace_name(i);
        // A new replica, beyond the ones loaded, on one of the
        // namespace's nodes: every node learns its address.
        let k = args.workloads_per_service + c % 200;
        let workload = format!(
            "apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {{name: svc-{j}-{k}, namespace: {ns}}}\n\
             spec: {{node: {}, ip: {}, services: [svc-{j}]}}\n",
            workload_node(&args, i, c % args.workloads_per_service),
            workload_ip(i, j, k)
        );
        let name = format!("address/{ns}/svc-{j}-{k}");
        let start = Instant::now();
        api.apply(&workload).await?;
        let written = start.elapsed();
        added.0.push((
            written,
            reached(&everyone, start, &name, |config| {
                config.resources.contains_key(&name)
            })
            .await?,
        ));
        let start = Instant::now();
        api.call(
            "DELETE",
            &format!("/api/v1/workloads/svc-{j}-{k}?namespace={ns}"),
            "",
        )
        .await?;
        let written = start.elapsed();
        removed.0.push((
            written,
            reached(&everyone, start, &name, |config| {
                !config.resources.contains_key(&name)
            })
            .await?,
        ));
    }
    let (cpu_after, rss_end) = usage(args.control_pid)?;
    let changes = 4 * args.changes;

    // Certificate issuance: workloads on every node ask for their
    // certificates at once (key, CSR, gRPC, the CA's checks and
    // signature, the record in the store), timed until the last is held.
    let certificates = args
        .certificates
        .min(args.namespaces * args.services_per_namespace * args.workloads_per_service);
    eprintln!("issuing {certificates} workload certificates at once");
    let issuing = Instant::now();
    let managers: Vec<_> = (0..certificates)
        .map(|c| {
            let i = c % args.namespaces;
            let j = (c / args.namespaces) % args.services_per_namespace;
            let k = c / (args.namespaces * args.services_per_namespace);
            nodes[(i + k) % args.nodes].control.start_workload_identity(
                &namespace_name(i),
                &format!("svc-{j}-{k}"),
                RotationConfig::default(),
                Clock::system(),
            )
        })
        .collect();
    for manager in &managers {
        let mut state = manager.subscribe();
        tokio::time::timeout(REACH, state.wait_for(|s| s.current.is_some()))
            .await
            .context("a workload certificate was not issued in time")??;
    }
    let issue_s = issuing.elapsed().as_secs_f64();
    let (cpu_certs, _) = usage(args.control_pid)?;
    drop(managers);
    eprintln!(
        "{certificates} certificates in {issue_s:.2} s: {:.0}/s",
        certificates as f64 / issue_s
    );

    let workloads = args.namespaces * args.services_per_namespace * args.workloads_per_service;
    let result = serde_json::json!({
        "nodes": args.nodes,
        "namespaces": args.namespaces,
        "services": args.namespaces * args.services_per_namespace,
        "workloads": workloads,
        "endpoints": workloads,
        "resources_per_node": held,
        "load_s": load_s,
        "initial_sync_s": sync.as_secs_f64(),
        "timings": [
            policy.timings("ServicePolicy update", args.workloads_per_service),
            health.timings("endpoint health flip", args.workloads_per_service),
            added.timings("workload added", args.nodes),
            removed.timings("workload deleted", args.nodes),
        ],
        "control_cpu_ms_per_change": (cpu_after - cpu_before) * 1e3 / changes as f64,
        "control_rss_mib_before_nodes": rss_before_nodes,
        "control_rss_mib_loaded": rss_loaded,
        "control_rss_mib_end": rss_end,
        "certificates": certificates,
        "certificates_per_second": certificates as f64 / issue_s,
        "control_cpu_ms_per_certificate": (cpu_certs - cpu_after) * 1e3 / certificates as f64,
    });
    if result["timings"]
        .as_array()
        .is_none_or(|t| t.iter().any(|t| t["changes"] == 0))
    {
        bail!("no change was timed");
    }
    println!("{result}");
    Ok(())
}
