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
    capture::{self, Capture, CaptureConfig},
    control::ControlPlane,
    directory::DirectoryFollower,
    hbone::{HboneStats, Pool, PoolSettings},
    identity::{CertManager, Clock, RotationConfig},
    pods::{CaptureFollower, PodNetns, PodNetnsSetting},
    proxy::{self, MeshPath, OutsideMesh, PodSpec, Proxy},
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
    #[arg(long = "capture", value_name = "POD=NETNS", value_parser = proxy::parse_pod_arg)]
    captures: Vec<(String, PathBuf)>,

    /// Where a pushed workload's network namespace is: a path with
    /// `{namespace}` and `{name}` standing for the workload's, or `cgroup`
    /// (on Kubernetes) to find it through the pod's cgroup under --cgroup,
    /// named after the workload's pod_uid. With it, the node captures the
    /// workloads the control plane schedules here in namespaces labelled
    /// `mesh.io/capture: enabled`, as labels change.
    #[arg(long, env = "MESH_NODE_POD_NETNS", value_parser = PodNetnsSetting::parse, requires_all = ["cgroup", "control_plane"])]
    pod_netns: Option<PodNetnsSetting>,

    /// Directory on bpffs where the capture programs' maps and links are
    /// pinned, so pods stay captured (refused, never bypassed) while
    /// mesh-node restarts, and the next run adopts them. Default
    /// `/sys/fs/bpf/mesh/<node>` (bpffs is mounted there if it is not).
    #[arg(long, env = "MESH_NODE_BPF_PIN_DIR")]
    bpf_pin_dir: Option<PathBuf>,

    /// Remove everything pinned under the pin directory (releasing every
    /// pod this node captured) and exit.
    #[arg(long)]
    uninstall: bool,

    /// Load the eBPF programs into this kernel without attaching them,
    /// report what the verifier said, and exit (non-zero, with the
    /// verifier's log, if it rejected one).
    #[arg(long)]
    check_programs: bool,

    /// Start with the eBPF programs' debug records on (one per redirected
    /// connect, shown as target `mesh_ebpf`). Switch at run time with
    /// `PUT /ebpf-logs {"enabled": true}` on the admin endpoint.
    #[arg(long, env = "MESH_NODE_EBPF_DEBUG_LOGS")]
    ebpf_debug_logs: bool,

    /// Threads carrying the proxy's traffic. 1 runs everything on one
    /// thread (no cross-thread wake-ups: the lowest latency per hop, as
    /// Linkerd's proxy does with one core); 0 picks half the CPUs this
    /// process may use, at least 1 and at most 4, leaving the rest to the
    /// node's workloads.
    #[arg(long, env = "MESH_NODE_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,

    /// On SIGTERM, how long open proxied connections may take to finish
    /// after the listeners close.
    #[arg(long, env = "MESH_NODE_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    drain_timeout: std::time::Duration,

    /// What a captured pod's connection to a destination outside the mesh
    /// gets: `allow` passes it through in plaintext, `deny` refuses it.
    #[arg(
        long,
        env = "MESH_NODE_OUTSIDE_MESH",
        value_enum,
        default_value = "allow"
    )]
    outside_mesh: OutsideMesh,

    /// How often the node probes its own workloads' endpoints (a TCP
    /// connect from inside each pod) and reports those whose readiness
    /// differs from their marking to the control plane; 0s turns it off.
    /// Needs --pod-netns.
    #[arg(long, env = "MESH_NODE_READINESS_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    readiness_interval: std::time::Duration,

    /// How often the node reports its workloads' request counts and
    /// latencies to the control plane (`meshctl stat`, `meshctl top`); 0s
    /// turns it off.
    #[arg(long, env = "MESH_NODE_STATS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    stats_interval: std::time::Duration,

    /// With --trace-endpoint: the share of requests that arrive without a
    /// sampling decision (no W3C or B3 context, or B3 deferring) that are
    /// sampled, 0 to 1; a request's own decision is kept.
    #[arg(long, env = "MESH_NODE_TRACE_SAMPLE_RATIO", default_value_t = 0.01, value_parser = parse_ratio)]
    trace_sample_ratio: f64,

    /// Where sampled spans are exported: an OTLP/HTTP receiver
    /// (`http://collector:4318`; spans are POSTed to `/v1/traces` as
    /// protobuf). With it, each proxy continues requests' traces (W3C and
    /// B3) with spans of its own; without it, trace headers pass through
    /// untouched.
    #[arg(long, env = "MESH_NODE_TRACE_ENDPOINT")]
    trace_endpoint: Option<String>,

    /// How spans are sent to --trace-endpoint: `otlp` (protobuf to
    /// `/v1/traces`) or `zipkin` (v2 JSON to `/api/v2/spans`, for Zipkin
    /// and Jaeger's or Tempo's Zipkin receivers).
    #[arg(long, env = "MESH_NODE_TRACE_PROTOCOL", default_value = "otlp")]
    trace_protocol: mesh_node::spans::Protocol,

    /// How long a pooled tunnel connection without streams stays open.
    #[arg(long, env = "MESH_NODE_TUNNEL_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_idle_timeout)]
    tunnel_idle_timeout: std::time::Duration,

    /// Streams one pooled tunnel connection carries at once before the
    /// node opens another to the same destination.
    #[arg(long, env = "MESH_NODE_TUNNEL_MAX_STREAMS", default_value = "100", value_parser = clap::value_parser!(u16).range(1..))]
    tunnel_max_streams: u16,

    /// How long a TCP connection the proxy carries (plaintext, or a tunnel
    /// stream at either end) may move no byte either way before the proxy
    /// closes it: one to two times this after its last byte. Reaps
    /// connections whose ends vanished or stalled. `0` keeps them for as
    /// long as their ends do (raise it, or use 0, for connection pools that
    /// idle longer, such as databases'). HTTP has its own timeouts.
    #[arg(long, env = "MESH_NODE_TCP_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_tcp_idle_timeout)]
    tcp_idle_timeout: std::time::Duration,

    /// How long an HTTP client may take to send a request head, and how
    /// long an HTTP/1.1 connection may idle between requests, before the
    /// proxy closes it (slow-header attacks); on the admin and metrics
    /// endpoints too, there at most 10s.
    #[arg(long, env = "MESH_NODE_HTTP_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_idle_timeout)]
    http_header_timeout: std::time::Duration,

    /// How long a response body the proxy streams (past a policy's
    /// timeout, which ends at the response head) may send nothing before
    /// the proxy gives up on it and ends the caller's response as broken.
    #[arg(long, env = "MESH_NODE_HTTP_STREAM_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_idle_timeout)]
    http_stream_idle_timeout: std::time::Duration,

    /// Log each HTTP request the proxy routes or receives (target
    /// `mesh_http_access`); switchable at run time with `PUT
    /// /http-access-log {"enabled": true|false}` on the admin endpoint.
    #[arg(long, env = "MESH_NODE_HTTP_ACCESS_LOG")]
    http_access_log: bool,

    /// Address of the admin endpoint (/healthz, /capture, /connections,
    /// /ebpf-logs, /http-access-log, /certificates, /config,
    /// /metrics).
    #[arg(long, env = "MESH_NODE_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,

    /// A file holding the bearer token the admin endpoint then asks for on
    /// every route but /healthz and /metrics. Required when --admin-addr
    /// is not a loopback address.
    #[arg(long, env = "MESH_NODE_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,

    /// Also serve /metrics and /healthz, and nothing else, on this address
    /// (e.g. 0.0.0.0:15020, for Prometheus on the pod network): read-only
    /// and unauthenticated, as Istio's 15020.
    #[arg(long, env = "MESH_NODE_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,

    /// This node's name, as workloads name it in `spec.node` (a DNS
    /// subdomain, as Kubernetes names nodes).
    #[arg(long, env = "MESH_NODE_NAME", value_parser = parse_node_name)]
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

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn parse_idle_timeout(value: &str) -> Result<std::time::Duration, String> {
    let timeout = parse_duration(value)?;
    if timeout < std::time::Duration::from_secs(1) {
        return Err(format!("{value:?}: must be at least 1s"));
    }
    Ok(timeout)
}

/// `0` (no timeout) or at least a second.
fn parse_tcp_idle_timeout(value: &str) -> Result<std::time::Duration, String> {
    if value == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    parse_idle_timeout(value)
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or_else(|| format!("{text:?} is not a ratio from 0 to 1"))
}

fn parse_node_name(value: &str) -> Result<String, String> {
    mesh_model::names::check_dns_subdomain(value)?;
    Ok(value.to_owned())
}

fn parse_duration(value: &str) -> Result<std::time::Duration, String> {
    mesh_model::duration::parse_duration(value).map_err(|why| format!("{value:?}: {why}"))
}

/// The pin directory: the flag, or `/sys/fs/bpf/mesh/<node>`.
fn pin_dir(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &args.bpf_pin_dir {
        return Ok(dir.clone());
    }
    capture::ensure_bpffs(std::path::Path::new(capture::BPFFS))
        .context("mounting bpffs for the pinned capture state")?;
    let node = args.node.as_deref().unwrap_or("default");
    Ok(std::path::Path::new(capture::BPFFS).join("mesh").join(node))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let workers = match args.worker_threads {
        0 => std::thread::available_parallelism()
            .map_or(1, |n| n.get() / 2)
            .clamp(1, 4),
        n => n,
    };
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
    .context("starting the runtime")?;
    runtime.block_on(run(args, workers))
}

async fn run(args: Args, workers: usize) -> anyhow::Result<()> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let (filter_layer, filter_handle) = tracing_subscriber::reload::Layer::new(
        tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()),
    );
    {
        use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
        tracing_subscriber::registry()
            .with(filter_layer)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colours only for a person at a terminal, not in
                    // collected logs.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init();
    }
    // The eBPF programs' records arrive through `log`; the filter above
    // decides, so `log` itself lets everything through.
    log::set_max_level(log::LevelFilter::Trace);
    tracing::debug!(workers, "runtime threads");
    let open_files = raise_open_file_limit();
    if args.check_programs {
        let accepted = capture::check_programs().context("checking the eBPF programs")?;
        for name in accepted {
            println!("{name}: accepted by this kernel's verifier");
        }
        return Ok(());
    }
    if args.uninstall {
        let dir = pin_dir(&args)?;
        let removed = capture::uninstall(&dir)
            .with_context(|| format!("removing the pinned capture under {}", dir.display()))?;
        if removed {
            println!(
                "removed {}: every pod this node captured is released",
                dir.display()
            );
        } else {
            println!("nothing pinned under {}", dir.display());
        }
        return Ok(());
    }

    let admin_token = admin_token(&args)?;
    // Certificates and configuration are followed for as long as `mesh`
    // is held.
    let certificates = SharedTracked::default();
    // Bound first: the node tells the control plane where it is.
    let listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin endpoint to {}", args.admin_addr))?;
    let admin_addr = listener.local_addr()?;
    let metrics_listener = match args.metrics_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint to {addr}"))?,
        ),
        None => None,
    };
    let pod_netns = args
        .pod_netns
        .clone()
        .zip(args.cgroup.as_deref())
        .map(|(setting, pods)| PodNetns::new(setting, pods));
    let mesh = join_mesh(&args, &certificates, admin_addr, pod_netns.clone())?;
    let tunnel_stats = Arc::new(HboneStats::default());
    let trace_exporter = match &args.trace_endpoint {
        Some(endpoint) => Some(
            mesh_node::spans::Exporter::start(
                endpoint,
                args.node.as_deref().unwrap_or("node"),
                args.trace_protocol,
            )
            .map_err(|why| anyhow::anyhow!("--trace-endpoint: {why}"))?,
        ),
        None => None,
    };
    let mesh_path = mesh.as_ref().map(|mesh| {
        Arc::new(MeshPath {
            directory: mesh.directory.directory(),
            certificates: certificates.clone(),
            bundle: mesh.bundle.clone(),
            pool: Pool::new(
                PoolSettings {
                    max_streams: usize::from(args.tunnel_max_streams),
                    idle_timeout: args.tunnel_idle_timeout,
                },
                tunnel_stats.clone(),
            ),
            outside: args.outside_mesh,
            handshakes: Default::default(),
            streams: Default::default(),
            demand: Some(mesh.xds.demand()),
            balancer: Default::default(),
            http: {
                let mut http = proxy::HttpState::new(args.http_header_timeout);
                http.stream_idle_timeout = args.http_stream_idle_timeout;
                http.trace_sample_ratio = args.trace_sample_ratio;
                http.spans = trace_exporter.clone();
                http.access_log
                    .store(args.http_access_log, std::sync::atomic::Ordering::Relaxed);
                http
            },
        })
    });
    let http_path = mesh_path.clone();
    let _stats_reporter = match (&mesh, &mesh_path) {
        (Some(mesh), Some(path)) if !args.stats_interval.is_zero() => {
            Some(AbortOnDrop(tokio::spawn(mesh_node::stats::report(
                path.clone(),
                mesh.xds.stats_reports(),
                args.stats_interval,
            ))))
        }
        _ => None,
    };
    let _revoker = mesh_path
        .as_ref()
        .map(|mesh| AbortOnDrop(mesh.enforce_policy_changes()));
    let proxy = match &args.cgroup {
        Some(cgroup) => {
            Some(start_capture(&args, cgroup, max_connections(open_files), mesh_path).await?)
        }
        None if args.captures.is_empty() => {
            tracing::info!("no --cgroup: capture is off");
            None
        }
        None => bail!("--capture needs --cgroup (the cgroup the pods run in)"),
    };
    let _follower = match (&proxy, &mesh) {
        (Some(proxy), Some(mesh)) => Some(CaptureFollower::follow(
            proxy.clone(),
            mesh.xds.config(),
            flag_pods(&args),
            pod_netns,
        )),
        _ => None,
    };

    tracing::info!(%admin_addr, authenticated = admin_token.is_some(), "admin endpoint listening");
    let metrics_addr = match &metrics_listener {
        Some(listener) => {
            let addr = listener.local_addr()?;
            tracing::info!(%addr, "metrics endpoint listening");
            format!(" metrics={addr}")
        }
        None => String::new(),
    };
    // One line on stdout tells a supervisor (the demo, tests) we are ready.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "ready admin={admin_addr}{metrics_addr}")?;
    stdout.flush()?;
    drop(stdout);

    let ebpf_logs = proxy.as_ref().map(|proxy| {
        let capture = proxy.capture();
        admin::LogSwitch(Arc::new(move |on: bool| {
            let directives = if on {
                format!("{filter},mesh_ebpf=debug")
            } else {
                filter.clone()
            };
            let new_filter = tracing_subscriber::EnvFilter::try_new(&directives)
                .map_err(|e| format!("log filter {directives:?}: {e}"))?;
            filter_handle
                .reload(new_filter)
                .map_err(|e| format!("reloading the log filter: {e}"))?;
            capture
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .set_debug_logs(on)
                .map_err(|e| proxy::error_chain(&e))
        }))
    });
    if let Some(switch) = &ebpf_logs {
        (switch.0)(args.ebpf_debug_logs)
            .map_err(|why| anyhow::anyhow!("--ebpf-debug-logs: {why}"))?;
    }
    let state = AdminState {
        ebpf_logs,
        capture: proxy.as_ref().map(|p| p.capture()),
        connections: proxy.as_ref().map(|p| p.connections()),
        tunnels: mesh.as_ref().map(|_| tunnel_stats.clone()),
        mesh: http_path,
        certificates,
        config: mesh.as_ref().map(|m| (m.xds.config(), m.xds.status())),
        captured: _follower.as_ref().map(CaptureFollower::synced),
    };
    if let Some(proxy) = &proxy {
        let proxy = proxy.clone();
        spawn_memory_trim(move || proxy.permits_in_use());
    }
    let stopping = proxy.clone();
    let defaults = mesh_api::http_server::Limits::default();
    let limits = mesh_api::http_server::Limits {
        header_timeout: args.http_header_timeout.min(defaults.header_timeout),
        ..defaults
    };
    let (stop_metrics, metrics_stopped) = tokio::sync::watch::channel(false);
    let metrics = metrics_listener.map(|listener| {
        let mut stopped = metrics_stopped;
        let router = admin::metrics_router(state.clone());
        tokio::spawn(mesh_api::http_server::serve(
            listener,
            router,
            limits,
            async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            },
        ))
    });
    let router = admin::router(state, admin_token);
    mesh_api::http_server::serve(listener, router, limits, async move {
        shutdown_signal().await;
        // Listeners close before the admin endpoint does, so a supervisor
        // that sees the endpoint gone knows new connections go elsewhere.
        if let Some(proxy) = stopping {
            proxy.stop_accepting().await;
        }
    })
    .await;
    let _ = stop_metrics.send(true);
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    if let Some(proxy) = proxy {
        // The pods stay captured (pinned): until the next mesh-node listens,
        // their connects are refused. Open connections may finish.
        let left = proxy.drained(args.drain_timeout).await;
        tracing::info!(
            left,
            "stopped accepting; pods stay captured until the next run"
        );
    }
    // The spans of the last requests, too.
    if let Some(exporter) = trace_exporter {
        exporter.flush(std::time::Duration::from_secs(5)).await;
    }
    Ok(())
}

async fn start_capture(
    args: &Args,
    cgroup: &std::path::Path,
    max_connections: usize,
    mesh: Option<Arc<MeshPath>>,
) -> anyhow::Result<Arc<Proxy>> {
    let pin_dir = pin_dir(args)?;
    let config = CaptureConfig {
        cgroup: cgroup.to_owned(),
        pin_dir: Some(pin_dir.clone()),
    };
    let mut capture = Capture::attach(&config)
        .with_context(|| format!("attaching capture to {}", cgroup.display()))?;
    if let Some(logger) = capture.take_logger() {
        capture::logs::spawn_drain(logger).context("watching the eBPF log ring")?;
    }
    tracing::info!(max_connections, "connection limit");
    let mut proxy = Proxy::new(Arc::new(RwLock::new(capture)), max_connections)
        .with_tcp_idle_timeout(Some(args.tcp_idle_timeout).filter(|t| !t.is_zero()));
    if let Some(mesh) = mesh {
        proxy = proxy.with_mesh(mesh);
    }
    let proxy = Arc::new(proxy);
    let errors = proxy.sync(flag_pods(args)).await;
    if let Some((pod, error)) = errors.into_iter().next() {
        return Err(anyhow::Error::new(error).context(format!("capturing pod {pod}")));
    }
    if args.control_plane.is_none() {
        // Every pod this node should capture is known: what a previous run
        // left for other pods goes. With a control plane that waits for
        // the first configuration (see `CaptureFollower`).
        proxy
            .capture()
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .prune_unowned()
            .context("releasing pods left by a previous run")?;
    }
    Ok(proxy)
}

/// Raises the limit on open files: every carried connection holds two
/// descriptors, and the usual soft limit of 1024 runs out under a burst of
/// connections (seen in the capture benchmark), a hard limit of 20,000 at
/// about 10,000 connections (the idle soak). With `CAP_SYS_RESOURCE` (the
/// DaemonSet runs privileged) both go up to the kernel's `fs.nr_open`,
/// at most 2^20, as Envoy's deployments set them; otherwise the soft
/// limit goes up to the hard one.
fn raise_open_file_limit() -> u64 {
    const MOST: u64 = 1 << 20;
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(MOST)
        .min(MOST);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `limit`.
    #[allow(unsafe_code)]
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            let wanted = libc::rlimit {
                rlim_cur: ceiling.max(limit.rlim_max),
                rlim_max: ceiling.max(limit.rlim_max),
            };
            if wanted.rlim_max > limit.rlim_max
                && libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0
            {
                limit = wanted;
                true
            } else {
                let soft = limit.rlim_cur;
                limit.rlim_cur = limit.rlim_max;
                soft == limit.rlim_max || libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
            }
        }
    };
    if raised {
        tracing::debug!(open_files = limit.rlim_cur, "open-file limit");
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not raise the open-file limit");
    }
    limit.rlim_cur
}

/// The proxy's connection permits: one per descriptor a carried
/// connection holds (an accepted connection; its upstream when that is a
/// socket of its own rather than a tunnel stream; a pooled tunnel
/// connection; an accepted tunnel connection). An eighth of the
/// descriptors (at least 2,048) stays out of them for listeners, the
/// control plane, the admin endpoint, eBPF maps and the like.
fn max_connections(open_files: u64) -> usize {
    let reserve = (open_files / 8).max(2048);
    usize::try_from(open_files.saturating_sub(reserve))
        .unwrap_or(usize::MAX)
        .max(64)
}

/// The pods named with `--capture`.
fn flag_pods(args: &Args) -> Vec<PodSpec> {
    args.captures
        .iter()
        .map(|(name, netns)| PodSpec {
            name: name.clone(),
            netns: netns.clone(),
            outbound: Default::default(),
            inbound: Default::default(),
        })
        .collect()
}

/// What runs for the mesh: the node's certificate, its workloads'
/// certificates and the configuration stream.
struct Mesh {
    _node: CertManager,
    _workloads: Workloads,
    xds: Xds,
    directory: DirectoryFollower,
    bundle: TrustBundle,
}

/// Joins the mesh: a certificate manager for the node, the configuration
/// stream, and a certificate manager for each workload on the node.
fn join_mesh(
    args: &Args,
    tracked: &SharedTracked,
    admin_addr: SocketAddr,
    pod_netns: Option<PodNetns>,
) -> anyhow::Result<Option<Mesh>> {
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
    let control = ControlPlane::new(address, node, bundle.clone(), token)
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
    control.set_admin_address(admin_addr);
    let xds = Xds::start(control.clone(), Vec::new());
    let workloads = Workloads::follow(
        control,
        xds.config(),
        fixed,
        tracked.clone(),
        rotation,
        clock,
    );
    let directory = DirectoryFollower::follow(xds.config(), args.trust_domain.clone());
    if let Some(netns) = pod_netns
        && !args.readiness_interval.is_zero()
    {
        // Ends with the configuration stream's task.
        tokio::spawn(mesh_node::readiness::observe(
            xds.config(),
            netns,
            args.readiness_interval,
            xds.health_reports(),
        ));
    }
    Ok(Some(Mesh {
        _node: node_manager,
        _workloads: workloads,
        xds,
        directory,
        bundle,
    }))
}

/// Gives the memory a burst of connections used back to the system once
/// they are gone: glibc keeps freed heap memory, and the idle soak saw a
/// proxy stay at 154 MiB after 9,000 connections closed (16 MiB before).
/// Every 2 s, once the descriptors connections hold (`in_use`: the
/// connections, their upstreams and the tunnel connections, which outlive
/// their last stream by the pool's idle timeout) have fallen to half the
/// most seen since the last trim, and by at least 256, `malloc_trim`
/// returns what it can.
fn spawn_memory_trim(in_use: impl Fn() -> usize + Send + 'static) {
    tokio::spawn(async move {
        let mut peak = 0;
        let mut every = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            every.tick().await;
            let open = in_use();
            peak = std::cmp::max(peak, open);
            if peak >= open + 256 && open <= peak / 2 {
                trim_heap();
                tracing::debug!(peak, open, "returned freed memory to the system");
                peak = open;
            }
        }
    });
}

#[cfg(target_env = "gnu")]
fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory at the heap's top and
    // in free chunks; it touches no live allocation.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(target_env = "gnu"))]
fn trim_heap() {}

/// The admin token from `--admin-token-file`; refuses an admin endpoint
/// off loopback without one.
fn admin_token(args: &Args) -> anyhow::Result<Option<Arc<str>>> {
    let Some(path) = &args.admin_token_file else {
        if !args.admin_addr.ip().is_loopback() {
            bail!(
                "--admin-addr {} is not a loopback address: its endpoints show the node's \
                 configuration and switch its logs, so they need --admin-token-file; to let \
                 Prometheus scrape the node from the pod network, use --metrics-addr \
                 (only /metrics and /healthz)",
                args.admin_addr
            );
        }
        return Ok(None);
    };
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading --admin-token-file {}", path.display()))?;
    let token = token.trim();
    if token.len() < 16 {
        bail!(
            "--admin-token-file {}: the token is {} characters; use at least 16 (e.g. `openssl rand -hex 32`)",
            path.display(),
            token.len()
        );
    }
    Ok(Some(token.into()))
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
