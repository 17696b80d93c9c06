//! `mesh-node`: the node proxy binary.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use mesh_node::{
    admin,
    capture::{self, Capture},
};

/// The mesh's node proxy: loads the eBPF capture programs for this node's
/// pods and serves the admin endpoint.
///
/// Example:
///   mesh-node --cgroup /sys/fs/cgroup/kubepods \
///     --capture shop/frontend=/run/netns/frontend --admin-addr 127.0.0.1:15000
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The cgroup v2 directory that holds this node's pods; the capture
    /// programs attach there (never to the root of the hierarchy).
    #[arg(long, env = "MESH_NODE_CGROUP")]
    cgroup: PathBuf,

    /// A pod to capture, as `namespace/name=/path/to/netns`. Repeatable.
    #[arg(long = "capture", value_name = "POD=NETNS", value_parser = parse_capture)]
    captures: Vec<(String, PathBuf)>,

    /// Address of the admin endpoint (/healthz, /capture, /metrics).
    #[arg(long, env = "MESH_NODE_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
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

    let mut capture = Capture::attach(&args.cgroup)
        .with_context(|| format!("attaching capture to {}", args.cgroup.display()))?;
    if let Some(logger) = capture.take_logger() {
        capture::logs::spawn_drain(logger).context("watching the eBPF log ring")?;
    }
    for (pod, netns) in &args.captures {
        capture
            .capture_pod(pod, netns)
            .with_context(|| format!("capturing pod {pod}"))?;
    }
    let capture = Arc::new(RwLock::new(capture));

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

    let server = axum::serve(listener, admin::router(capture.clone()))
        .with_graceful_shutdown(shutdown_signal());
    if let Err(error) = server.await {
        bail!("admin endpoint failed: {error}");
    }
    tracing::info!("shutting down; capture detached");
    Ok(())
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
