//! `mesh-node`: the node proxy binary.

use std::{
    collections::BTreeSet,
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use mesh_identity::TrustBundle;
use mesh_node::{
    admin::{self, AdminState, Holder, SharedTracked, Tracked},
    capture::{self, Capture},
    control::ControlPlane,
    identity::{CertManager, Clock, RotationConfig},
    workloads::Workloads,
    xds::Xds,
};

/// The mesh's node proxy: loads the eBPF capture programs for this node's
/// pods, joins the mesh and keeps its workloads' certificates, and serves
/// the admin endpoint.
///
/// Example:
///   mesh-node --cgroup /sys/fs/cgroup/kubepods \
///     --capture shop/frontend=/run/netns/frontend --admin-addr 127.0.0.1:15000 \
///     --node node1 --control-plane 10.0.0.1:15012 --ca-bundle /etc/mesh/root.pem \
///     --bootstrap-token-file /etc/mesh/bootstrap-token
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The cgroup v2 directory that holds this node's pods; the capture
    /// programs attach there (never to the root of the hierarchy). Without
    /// it, nothing is captured.
    #[arg(long, env = "MESH_NODE_CGROUP")]
    cgroup: Option<PathBuf>,

    /// A pod to capture, as `namespace/name=/path/to/netns`. Repeatable.
    /// With a control plane, the pod also gets its certificate.
    #[arg(long = "capture", value_name = "POD=NETNS", value_parser = parse_capture)]
    captures: Vec<(String, PathBuf)>,

    /// Address of the admin endpoint (/healthz, /capture, /certificates,
    /// /metrics).
    #[arg(long, env = "MESH_NODE_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,

    /// This node's name, as workloads name it in `spec.node`.
    #[arg(long, env = "MESH_NODE_NAME")]
    node: Option<String>,

    /// The control plane's node API (`host:port`).
    #[arg(long, env = "MESH_CONTROL_PLANE", requires_all = ["node", "ca_bundle"])]
    control_plane: Option<String>,

    /// The mesh's root certificate(s), PEM: how the node recognises the
    /// control plane before it has joined.
    #[arg(long, env = "MESH_CA_BUNDLE")]
    ca_bundle: Option<PathBuf>,

    /// The mesh's trust domain.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,

    /// File holding the bootstrap token the node joins with the first time
    /// (`meshctl node token create`).
    #[arg(long, env = "MESH_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,

    /// A workload to hold a certificate for, as `namespace/name`, beyond
    /// those the control plane lists for this node (and the captured
    /// pods). Repeatable.
    #[arg(long = "workload", value_name = "NAMESPACE/NAME", value_parser = parse_workload)]
    workloads: Vec<(String, String)>,
}

fn parse_workload(value: &str) -> Result<(String, String), String> {
    let (namespace, name) = value
        .split_once('/')
        .ok_or_else(|| format!("expected NAMESPACE/NAME, got {value:?}"))?;
    for part in [namespace, name] {
        mesh_model::names::check_dns_label(part).map_err(|why| format!("{value:?}: {why}"))?;
    }
    Ok((namespace.to_owned(), name.to_owned()))
}

fn parse_capture(value: &str) -> Result<(String, PathBuf), String> {
    let (pod, netns) = value
        .split_once('=')
        .ok_or_else(|| format!("expected POD=NETNS, got {value:?}"))?;
    if pod.is_empty() || netns.is_empty() {
        return Err(format!("expected POD=NETNS with both parts, got {value:?}"));
    }
    Ok((pod.to_owned(), PathBuf::from(netns)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let capture = match &args.cgroup {
        Some(cgroup) => Some(start_capture(cgroup, &args.captures)?),
        None if args.captures.is_empty() => {
            tracing::info!("no --cgroup: capture is off");
            None
        }
        None => bail!("--capture needs --cgroup (the cgroup the pods run in)"),
    };
    // Certificates and configuration are followed for as long as `mesh`
    // is held.
    let certificates = SharedTracked::default();
    let mesh = join_mesh(&args, &certificates)?;

    let listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin endpoint to {}", args.admin_addr))?;
    let admin_addr = listener.local_addr()?;
    tracing::info!(%admin_addr, "admin endpoint listening");
    // One line on stdout tells a supervisor (the demo, tests) we are ready.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready admin={admin_addr}")?;
    stdout.flush()?;
    drop(stdout);

    let state = AdminState {
        capture,
        certificates,
        config: mesh.as_ref().map(|m| (m.xds.config(), m.xds.status())),
    };
    let server =
        axum::serve(listener, admin::router(state)).with_graceful_shutdown(shutdown_signal());
    if let Err(error) = server.await {
        bail!("admin endpoint failed: {error}");
    }
    tracing::info!("shutting down; capture detached");
    Ok(())
}

fn start_capture(
    cgroup: &std::path::Path,
    captures: &[(String, PathBuf)],
) -> anyhow::Result<admin::SharedCapture> {
    let mut capture = Capture::attach(cgroup)
        .with_context(|| format!("attaching capture to {}", cgroup.display()))?;
    if let Some(logger) = capture.take_logger() {
        capture::logs::spawn_drain(logger).context("watching the eBPF log ring")?;
    }
    for (pod, netns) in captures {
        capture
            .capture_pod(pod, netns)
            .with_context(|| format!("capturing pod {pod}"))?;
    }
    Ok(Arc::new(RwLock::new(capture)))
}

/// What runs for the mesh: the node's certificate, its workloads'
/// certificates and the configuration stream.
struct Mesh {
    _node: CertManager,
    _workloads: Workloads,
    xds: Xds,
}

/// Joins the mesh: a certificate manager for the node, the configuration
/// stream, and a certificate manager for each workload on the node.
fn join_mesh(args: &Args, tracked: &SharedTracked) -> anyhow::Result<Option<Mesh>> {
    let Some(address) = &args.control_plane else {
        if !args.workloads.is_empty() {
            bail!("--workload needs --control-plane (where certificates come from)");
        }
        return Ok(None);
    };
    let (Some(node), Some(bundle_path)) = (&args.node, &args.ca_bundle) else {
        bail!("--control-plane needs --node and --ca-bundle");
    };
    let pem = std::fs::read_to_string(bundle_path)
        .with_context(|| format!("reading the CA bundle {}", bundle_path.display()))?;
    let bundle = TrustBundle::from_pem(&args.trust_domain, &pem)
        .with_context(|| format!("the CA bundle {}", bundle_path.display()))?;
    let token = match &args.bootstrap_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the bootstrap token {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let control = ControlPlane::new(address, node, bundle, token)
        .map_err(|why| anyhow::anyhow!("--node: {why}"))?;
    let clock = Clock::system();
    let rotation = RotationConfig::default();
    let node_manager = control.start_node_identity(rotation, clock);
    tracked
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .push(Tracked {
            holder: Holder::Node,
            name: node.clone(),
            state: node_manager.subscribe(),
        });
    // The pushed configuration lists the node's workloads; flags add more.
    let mut fixed: BTreeSet<(String, String)> = args.workloads.iter().cloned().collect();
    for (pod, _) in &args.captures {
        let workload = parse_workload(pod).map_err(|why| anyhow::anyhow!("--capture {why}"))?;
        fixed.insert(workload);
    }
    tracing::info!(%address, node, "joining the mesh");
    let xds = Xds::start(control.clone(), Vec::new());
    let workloads = Workloads::follow(
        control,
        xds.config(),
        fixed,
        tracked.clone(),
        rotation,
        clock,
    );
    Ok(Some(Mesh {
        _node: node_manager,
        _workloads: workloads,
        xds,
    }))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
