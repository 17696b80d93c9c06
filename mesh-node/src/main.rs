//! `mesh-node`: the node proxy binary.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use mesh_identity::TrustBundle;
use mesh_node::{
    admin::{self, AdminState, Holder, Tracked},
    capture::{self, Capture},
    control::ControlPlane,
    identity::{CertManager, Clock, RotationConfig},
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

    /// A workload on this node to hold a certificate for, as
    /// `namespace/name` (captured pods are included anyway). Repeatable.
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
    // The managers and the configuration stream run for as long as they
    // are held.
    let (_managers, certificates, xds) = start_identities(&args)?;

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
        config: xds.as_ref().map(|x| (x.config(), x.status())),
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

/// Joins the mesh, starts a certificate manager for the node and for
/// each of its workloads, and follows the node's configuration.
fn start_identities(args: &Args) -> anyhow::Result<(Vec<CertManager>, Vec<Tracked>, Option<Xds>)> {
    let Some(address) = &args.control_plane else {
        if !args.workloads.is_empty() {
            bail!("--workload needs --control-plane (where certificates come from)");
        }
        return Ok((Vec::new(), Vec::new(), None));
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
    let config = RotationConfig::default();
    let node_manager = control.start_node_identity(config, clock);
    let mut tracked = vec![Tracked {
        holder: Holder::Node,
        name: node.clone(),
        state: node_manager.subscribe(),
    }];
    let mut managers = vec![node_manager];
    let mut workloads: Vec<(String, String)> = args.workloads.clone();
    for (pod, _) in &args.captures {
        let (namespace, name) =
            parse_workload(pod).map_err(|why| anyhow::anyhow!("--capture {why}"))?;
        workloads.push((namespace, name));
    }
    workloads.sort();
    workloads.dedup();
    for (namespace, name) in workloads {
        let manager = control.start_workload_identity(&namespace, &name, config, clock);
        tracked.push(Tracked {
            holder: Holder::Workload,
            name: format!("{namespace}/{name}"),
            state: manager.subscribe(),
        });
        managers.push(manager);
    }
    tracing::info!(%address, node, workloads = tracked.len() - 1, "joining the mesh");
    let xds = Xds::start(control, Vec::new());
    Ok((managers, tracked, Some(xds)))
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
