//! The node proxy's listeners inside each captured pod, and the pods' life
//! cycle: open the listeners in the pod's namespace, register the pod with
//! the capture programs, carry its connections, and undo it all when the
//! pod goes.
//!
//! Per pod (the in-pod model, one node process with sockets in every pod):
//! outbound `0.0.0.0:15001` (IPv4 connects are redirected to addresses in
//! `127.0.0.0/8`) and `[::1]:15001` receive the connects the programs
//! redirect; inbound `[::]:15006` receives what `sk_lookup` steers.
//!
//! Without a control plane (capture only) both relay plain TCP from the
//! pod's own namespace. In the mesh ([`MeshPath`]) the outbound side
//! tunnels to mesh destinations over HBONE (mTLS to the destination pod's
//! `15008`, where this same proxy on the destination's node listens),
//! passes the rest through or refuses it, and the inbound side serves the
//! tunnels with authorization and refuses plaintext unless the workload is
//! permissive.

mod http;
mod mesh;

pub use http::{FLAGS_HEADER, Flag, HttpState, HttpStats, REPLAY_LIMIT};
pub use mesh::{MeshPath, OutsideMesh, RoundRobin};

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mesh_common::{
    PROXY_MARK,
    capture::{
        PROXY_INBOUND_PORT, PROXY_OUTBOUND_PORT, PROXY_TUNNEL_PORT, PodInbound, PodOutbound,
    },
};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    task::JoinSet,
};

use crate::capture::{Capture, CaptureError, OriginalDsts, PodRegistration, netns::NetnsThread};

/// The proxy's own ports in every pod: never a destination.
const PROXY_PORTS: [u16; 3] = [PROXY_OUTBOUND_PORT, PROXY_INBOUND_PORT, PROXY_TUNNEL_PORT];

/// How long the proxy waits for an upstream to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a pod could not be captured.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("entering the network namespace {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("opening the proxy's {what} listener in the pod")]
    Listen {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Capture(#[from] CaptureError),
}

/// Which way a proxied connection goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub const fn name(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Whether a connection crossed the mesh encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// In an HBONE tunnel: mutual TLS, the peer's identity verified.
    Mtls,
    /// Plain TCP: outside the mesh, or no control plane.
    Plaintext,
    /// HTTP to a service, request by request: each request takes its own
    /// upstream (a tunnel to a mesh workload, plain TCP otherwise).
    Http,
}

impl Security {
    pub const fn name(self) -> &'static str {
        match self {
            Security::Mtls => "mtls",
            Security::Plaintext => "plaintext",
            Security::Http => "http",
        }
    }
}

/// A connection the proxy carries right now.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionInfo {
    pub pod: String,
    pub direction: Direction,
    /// The other workload: the destination of an outbound connection, the
    /// caller's identity of an inbound one; `None` when outside the mesh.
    pub peer: Option<String>,
    pub security: Security,
    /// The application end as the proxy accepted it.
    pub client: SocketAddr,
    /// Where the client was going.
    pub original_dst: SocketAddr,
    /// Seconds since the Unix epoch.
    pub opened_at: u64,
}

/// What happened to connections the proxy accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Relayed to the destination.
    Relayed,
    /// Accepted on the outbound listener without a recorded destination.
    NoOriginalDst,
    /// The destination refused or did not answer.
    UpstreamFailed,
    /// Refused by authorization (at the destination; an outbound tunnel
    /// the destination refused counts here too).
    Denied,
    /// Plaintext to a workload whose mTLS mode is strict.
    PlaintextRefused,
    /// A destination outside the mesh, with outside traffic refused.
    OutsideMeshDenied,
    /// The tunnel could not be opened (no certificate, TLS or HTTP/2
    /// failure, destination not who the mesh says).
    TunnelFailed,
    /// Addressed to one of the proxy's own ports, or a tunnel asking for a
    /// destination that is not this pod.
    ProxyPort,
    /// To a service's virtual address, with no healthy endpoint serving
    /// the port (or none known).
    NoHealthyEndpoint,
}

impl Outcome {
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Relayed => "relayed",
            Outcome::NoOriginalDst => "no_original_dst",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::Denied => "denied",
            Outcome::PlaintextRefused => "plaintext_refused",
            Outcome::OutsideMeshDenied => "outside_mesh_denied",
            Outcome::TunnelFailed => "tunnel_failed",
            Outcome::ProxyPort => "bad_destination",
            Outcome::NoHealthyEndpoint => "no_healthy_endpoint",
        }
    }
}

/// Whose traffic a [`Traffic`] entry counts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TrafficKey {
    pub direction: Direction,
    /// The captured pod, `namespace/name`.
    pub pod: String,
    /// The other end: a workload (`namespace/name`) or identity, or
    /// `unknown` outside the mesh.
    pub peer: String,
    pub security: Security,
}

/// Connections and bytes of one [`TrafficKey`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub opened: u64,
    pub closed: u64,
    /// From the pod's application.
    pub sent: u64,
    /// To the pod's application.
    pub received: u64,
    /// Closed by the TCP idle timeout.
    pub idle_closed: u64,
}

/// The proxy's live connections and counts, shared with the admin endpoint.
#[derive(Debug, Default)]
pub struct Connections {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, ConnectionInfo>>,
    counts: Mutex<BTreeMap<(String, Direction, Outcome), u64>>,
    traffic: Mutex<BTreeMap<TrafficKey, Traffic>>,
    /// Pods released from capture: their series go once their last
    /// connection closes.
    released: Mutex<BTreeSet<String>>,
    /// Number of open connections, so shutdown can wait for them.
    open_count: watch::Sender<usize>,
}

impl Connections {
    /// The connections open right now.
    pub fn open(&self) -> Vec<ConnectionInfo> {
        lock(&self.open).values().cloned().collect()
    }

    /// How many connections are open right now.
    pub fn open_count(&self) -> usize {
        *self.open_count.borrow()
    }

    /// Connections accepted so far, by pod, direction and outcome.
    pub fn counts(&self) -> Vec<((String, Direction, Outcome), u64)> {
        lock(&self.counts)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Connections and bytes by direction, pod, peer and security.
    pub fn traffic(&self) -> Vec<(TrafficKey, Traffic)> {
        lock(&self.traffic)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Waits until no connection is open, or `deadline` passes; returns how
    /// many were still open.
    pub async fn drained(&self, deadline: Duration) -> usize {
        let mut open = self.open_count.subscribe();
        let _ = tokio::time::timeout(deadline, open.wait_for(|n| *n == 0)).await;
        *open.borrow()
    }

    fn count(&self, pod: &str, direction: Direction, outcome: Outcome) {
        *lock(&self.counts)
            .entry((pod.to_owned(), direction, outcome))
            .or_default() += 1;
    }

    /// Forgets the series of `pod`, released from capture: now those with
    /// no connection open, the others as their last one closes.
    fn release(&self, pod: &str) {
        lock(&self.released).insert(pod.to_owned());
        lock(&self.traffic).retain(|key, counts| key.pod != pod || counts.opened != counts.closed);
    }

    /// `pod` is captured (again): its series are kept.
    fn capture(&self, pod: &str) {
        lock(&self.released).remove(pod);
    }

    fn register(self: &Arc<Self>, info: ConnectionInfo) -> OpenConnection {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let key = TrafficKey {
            direction: info.direction,
            pod: info.pod.clone(),
            peer: info.peer.clone().unwrap_or_else(|| "unknown".to_owned()),
            security: info.security,
        };
        lock(&self.traffic).entry(key.clone()).or_default().opened += 1;
        let mut open = lock(&self.open);
        open.insert(id, info);
        self.open_count.send_replace(open.len());
        OpenConnection {
            connections: self.clone(),
            id,
            key,
            started: std::time::Instant::now(),
        }
    }
}

/// Removes its connection from the table when dropped.
struct OpenConnection {
    connections: Arc<Connections>,
    id: u64,
    key: TrafficKey,
    started: std::time::Instant,
}

impl OpenConnection {
    /// Counts the bytes the connection moved and logs its access record.
    fn finish(self, sent: u64, received: u64, trace: Option<&str>, result: &io::Result<()>) {
        {
            let mut traffic = lock(&self.connections.traffic);
            let entry = traffic.entry(self.key.clone()).or_default();
            entry.sent += sent;
            entry.received += received;
            if result.as_ref().is_err_and(crate::hbone::IdleTimeout::is) {
                entry.idle_closed += 1;
            }
        }
        let info = lock(&self.connections.open).get(&self.id).cloned();
        if let Some(info) = info {
            tracing::info!(
                target: "mesh_access",
                pod = %info.pod,
                direction = info.direction.name(),
                peer = info.peer.as_deref().unwrap_or("unknown"),
                security = info.security.name(),
                client = %info.client,
                destination = %info.original_dst,
                sent,
                received,
                duration_ms = self.started.elapsed().as_millis() as u64,
                trace = trace.unwrap_or(""),
                error = result.as_ref().err().map(ToString::to_string).unwrap_or_default(),
                "connection closed"
            );
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let released = lock(&self.connections.released).contains(&self.key.pod);
        {
            let mut traffic = lock(&self.connections.traffic);
            let entry = traffic.entry(self.key.clone()).or_default();
            entry.closed += 1;
            if released && entry.closed == entry.opened {
                traffic.remove(&self.key);
            }
        }
        let mut open = lock(&self.connections.open);
        open.remove(&self.id);
        self.connections.open_count.send_replace(open.len());
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pod to capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// `namespace/name`.
    pub name: String,
    pub netns: PathBuf,
    pub outbound: PodOutbound,
    pub inbound: PodInbound,
}

/// Everything the proxy needs to carry one pod's connections.
struct PodContext {
    name: String,
    cookie: u64,
    netns: NetnsThread,
    /// The pod's own addresses: what tunnels may ask to reach.
    addresses: Vec<IpAddr>,
    mesh: Option<Arc<MeshPath>>,
    /// Certificates for serving tunnels, built once per certificate
    /// manager.
    tunnel_tls: mesh::TunnelTls,
    /// Becomes true when the pod is released: its tunnel connections
    /// drain (GOAWAY) rather than serve new streams into a gone pod.
    released: watch::Receiver<bool>,
    original: Arc<OriginalDsts>,
    connections: Arc<Connections>,
    /// One per carried connection, shared by every pod of the node.
    permits: Arc<Semaphore>,
    /// Upstream HTTP clients, made on the pod's first HTTP request, with
    /// the serial of the pod's certificate they were made under.
    http: std::sync::Mutex<Option<(String, Arc<http::Clients>)>>,
    /// How long a TCP connection may move no byte either way before it is
    /// closed (see [`Proxy::with_tcp_idle_timeout`]).
    tcp_idle_timeout: Option<Duration>,
}

impl PodContext {
    /// The pod's upstream HTTP clients. Their pooled connections are
    /// tunnel streams, which would keep the TLS connection they ride (and
    /// the certificate it authenticated with) in use for as long as
    /// requests keep coming; so a rotated certificate gets new clients,
    /// and the old ones close their connections as their requests end.
    fn http_clients(&self, mesh: &Arc<MeshPath>) -> Arc<http::Clients> {
        let mut held = self.http.lock().unwrap_or_else(|e| e.into_inner());
        // Read under the lock: a caller with an older serial cannot
        // replace clients made for a newer one.
        let serial = mesh::certificate_serial(mesh, &self.name);
        match &*held {
            Some((made_under, clients)) if *made_under == serial => clients.clone(),
            _ => {
                let clients = Arc::new(http::Clients::new(self, mesh));
                *held = Some((serial, clients.clone()));
                clients
            }
        }
    }
}

/// One captured pod as the proxy holds it.
#[derive(Debug)]
struct PodEntry {
    spec: PodSpec,
    /// The accept loops: dropping them closes the listeners.
    accept: JoinSet<()>,
    /// Set when the pod is released (see `PodContext::released`).
    released: watch::Sender<bool>,
    /// The pod's network namespace, as the programs key it.
    cookie: u64,
}

/// The captured pods of this node.
#[derive(Debug)]
pub struct Proxy {
    capture: Arc<RwLock<Capture>>,
    connections: Arc<Connections>,
    permits: Arc<Semaphore>,
    max_connections: usize,
    /// Each captured pod and the tasks accepting on its listeners: dropping
    /// them stops accepting; connections already relayed run to their end.
    pods: Mutex<BTreeMap<String, PodEntry>>,
    /// The mesh data path; `None` without a control plane.
    mesh: Option<Arc<MeshPath>>,
    /// Set when the proxy stops: tunnel connections drain (GOAWAY).
    stopping: watch::Sender<bool>,
    tcp_idle_timeout: Option<Duration>,
}

impl Proxy {
    /// A proxy carrying at most `max_connections` connections at once; at
    /// the limit it stops accepting until one ends (the kernel queues what
    /// arrives meanwhile), instead of running out of descriptors.
    pub fn new(capture: Arc<RwLock<Capture>>, max_connections: usize) -> Self {
        Self {
            capture,
            connections: Arc::default(),
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
            max_connections: max_connections.max(1),
            pods: Mutex::default(),
            mesh: None,
            stopping: watch::Sender::new(false),
            tcp_idle_timeout: None,
        }
    }

    /// Closes a TCP connection (plaintext, or a tunnel stream at either
    /// end) once no byte has moved either way for `timeout`: between one
    /// and two timeouts after the last byte. HTTP connections have their
    /// own timeouts. `None` keeps idle connections for as long as their
    /// ends do.
    pub fn with_tcp_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.tcp_idle_timeout = timeout;
        self
    }

    /// Carries the pods' traffic through the mesh: HBONE tunnels,
    /// authorization, mTLS modes.
    pub fn with_mesh(mut self, mesh: Arc<MeshPath>) -> Self {
        mesh.pool.share_permits(self.permits.clone());
        self.mesh = Some(mesh);
        self
    }

    /// Connection permits held: descriptors carried connections, their
    /// upstreams and the tunnel connections hold.
    pub fn permits_in_use(&self) -> usize {
        self.max_connections
            .saturating_sub(self.permits.available_permits())
    }

    /// The connections table the admin endpoint shows.
    pub fn connections(&self) -> Arc<Connections> {
        self.connections.clone()
    }

    /// The capture programs this proxy registers pods with.
    pub fn capture(&self) -> Arc<RwLock<Capture>> {
        self.capture.clone()
    }

    /// Names of the pods captured now.
    pub fn pod_names(&self) -> Vec<String> {
        lock(&self.pods).keys().cloned().collect()
    }

    /// How pod `name` (`namespace/name`) is captured, if it is.
    pub fn pod_spec(&self, name: &str) -> Option<PodSpec> {
        lock(&self.pods).get(name).map(|entry| entry.spec.clone())
    }

    /// Whether `netns` is the network namespace pod `name` is captured in,
    /// reached by another path (`/proc/<pid>/ns/net` of another of its
    /// processes).
    fn captured_in(&self, name: &str, netns: &Path) -> bool {
        let Some(captured) = lock(&self.pods).get(name).map(|entry| entry.cookie) else {
            return false;
        };
        crate::capture::netns::cookie(netns).is_ok_and(|cookie| cookie == captured)
    }

    /// Captures a pod: enters its namespace, opens the listeners, starts
    /// accepting, and only then registers it with the programs.
    pub async fn add_pod(&self, spec: PodSpec) -> Result<(), PodError> {
        let netns = NetnsThread::spawn(&spec.netns).map_err(|source| PodError::Netns {
            path: spec.netns.clone(),
            source,
        })?;
        let listen = |what| move |source| PodError::Listen { what, source };
        let addresses = netns
            .run(crate::capture::netns::current_addresses)
            .await
            .map_err(|source| PodError::Netns {
                path: spec.netns.clone(),
                source,
            })?;
        if let Err(error) = netns.run(migrate_queued_connections).await {
            // Said once: in a container /proc/sys is usually read-only,
            // and then it fails for every pod alike.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if SAID.swap(true, Ordering::Relaxed) {
                tracing::debug!(pod = %spec.name, %error, "cannot turn on tcp_migrate_req");
            } else {
                tracing::warn!(pod = %spec.name, %error, "cannot turn on net.ipv4.tcp_migrate_req in the pods' namespaces: when a proxy hands over, connections still queued on its listeners are reset");
            }
        }
        // Redirected IPv4 connects arrive on many loopback addresses (see
        // `redirect_v4`); a connection to the pod's own address on this port
        // has no recorded destination and is reset.
        let outbound4 = netns
            .run(|| {
                listen_in_pod(SocketAddr::from((
                    Ipv4Addr::UNSPECIFIED,
                    PROXY_OUTBOUND_PORT,
                )))
            })
            .await
            .map_err(listen("outbound IPv4"))?;
        // Without IPv6 in the pod there is nothing to redirect there either.
        let outbound6 = match netns
            .run(|| listen_in_pod(SocketAddr::from((Ipv6Addr::LOCALHOST, PROXY_OUTBOUND_PORT))))
            .await
        {
            Ok(listener) => Some(listener),
            Err(error) if error.kind() == io::ErrorKind::AddrNotAvailable => None,
            Err(error) => return Err(listen("outbound IPv6")(error)),
        };
        let inbound = netns
            .run(|| {
                listen_in_pod(SocketAddr::from((
                    Ipv6Addr::UNSPECIFIED,
                    PROXY_INBOUND_PORT,
                )))
            })
            .await
            .map_err(listen("inbound"))?;
        let tunnel = match &self.mesh {
            Some(_) => Some(
                netns
                    .run(|| {
                        listen_in_pod(SocketAddr::from((Ipv6Addr::UNSPECIFIED, PROXY_TUNNEL_PORT)))
                    })
                    .await
                    .map_err(listen("tunnel"))?,
            ),
            None => None,
        };

        let cookie = {
            let mut capture = self.capture.write().unwrap_or_else(|e| e.into_inner());
            capture.capture_pod(&PodRegistration {
                name: &spec.name,
                netns: &spec.netns,
                addresses: &addresses,
                inbound_listener: inbound.as_raw_fd(),
                outbound: spec.outbound,
                inbound: spec.inbound,
            })?
        };
        let original = self
            .capture
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .original_dsts();
        let (released, released_rx) = watch::channel(false);
        let context = Arc::new(PodContext {
            name: spec.name.clone(),
            cookie,
            netns,
            addresses: addresses.clone(),
            mesh: self.mesh.clone(),
            tunnel_tls: mesh::TunnelTls::default(),
            released: released_rx,
            original,
            connections: self.connections.clone(),
            permits: self.permits.clone(),
            http: std::sync::Mutex::new(None),
            tcp_idle_timeout: self.tcp_idle_timeout,
        });
        let mut accept = JoinSet::new();
        for (listener, direction) in [
            (Some(outbound4), Direction::Outbound),
            (outbound6, Direction::Outbound),
            (Some(inbound), Direction::Inbound),
        ] {
            let Some(listener) = listener else { continue };
            let listener = tokio_listener(listener).map_err(listen(direction.name()))?;
            accept.spawn(accept_loop(listener, direction, context.clone()));
        }
        if let (Some(listener), Some(mesh)) = (tunnel, &self.mesh) {
            let listener = tokio_listener(listener).map_err(listen("tunnel"))?;
            accept.spawn(mesh::tunnel_accept_loop(
                listener,
                context.clone(),
                mesh.clone(),
                self.stopping.subscribe(),
            ));
        }
        self.connections.capture(&spec.name);
        let mut pods = lock(&self.pods);
        // Stopped accepting while this was being set up: no listeners
        // again (dropping them aborts their accept loops); the pod stays
        // pinned for the next run, like the others.
        if self.is_stopping() {
            drop(pods);
            drop(accept);
            return Ok(());
        }
        pods.insert(
            spec.name.clone(),
            PodEntry {
                spec,
                accept,
                released,
                cookie,
            },
        );
        Ok(())
    }

    fn update_pod(&self, spec: &PodSpec) -> Result<(), PodError> {
        self.capture
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .update_pod(&spec.name, spec.outbound, spec.inbound)?;
        if let Some(entry) = lock(&self.pods).get_mut(&spec.name) {
            entry.spec = spec.clone();
        }
        Ok(())
    }

    /// Releases a pod: the programs first (its traffic is no longer
    /// redirected), then its listeners. Open connections run to their end.
    pub fn remove_pod(&self, name: &str) -> Result<(), PodError> {
        let Some(entry) = lock(&self.pods).remove(name) else {
            return Err(CaptureError::NotCaptured(name.to_owned()).into());
        };
        entry.released.send_replace(true);
        self.connections.release(name);
        self.capture
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .release_pod(name)?;
        Ok(())
    }

    /// Makes the captured pods exactly `desired`: captures the new ones,
    /// releases the gone ones, and re-captures those whose settings
    /// changed. Returns the errors of pods that could not be captured; the
    /// others are applied regardless.
    pub async fn sync(&self, desired: Vec<PodSpec>) -> Vec<(String, PodError)> {
        let mut errors = Vec::new();
        let current: BTreeMap<String, PodSpec> = lock(&self.pods)
            .iter()
            .map(|(name, entry)| (name.clone(), entry.spec.clone()))
            .collect();
        let wanted: BTreeMap<String, PodSpec> =
            desired.into_iter().map(|s| (s.name.clone(), s)).collect();
        let mut updated = BTreeSet::new();
        for (name, spec) in &current {
            let result = match wanted.get(name) {
                Some(want) if want == spec => continue,
                // Same pod, new exclusions or another path to the same
                // namespace: changed in place, never released.
                Some(want) if want.netns == spec.netns || self.captured_in(name, &want.netns) => {
                    updated.insert(name.clone());
                    self.update_pod(want)
                }
                _ => self.remove_pod(name),
            };
            if let Err(error) = result {
                errors.push((name.clone(), error));
            }
        }
        for (name, spec) in wanted {
            if current.get(&name) == Some(&spec) || updated.contains(&name) {
                continue;
            }
            if let Err(error) = self.add_pod(spec).await {
                tracing::warn!(pod = %name, error = %error_chain(&error), "capturing pod failed");
                errors.push((name, error));
            }
        }
        errors
    }

    /// Waits until every connection has ended, or `deadline` passes; how
    /// many were still open (or, when more, how many permits were still
    /// held: a connection holds one per descriptor). Counted by their
    /// permits, which a connection takes before it is accepted: one
    /// accepted as the listeners closed, whose task has not registered it
    /// yet, is waited for too (seen in a handover: such a connection was
    /// cut by the exit).
    pub async fn drained(&self, deadline: Duration) -> usize {
        let until = tokio::time::Instant::now() + deadline;
        let left = self.connections.drained(deadline).await;
        // Pooled tunnel connections hold a permit each, and are not waited
        // for: with their streams gone they carry nothing (the pool counts
        // one only once its permit is taken, and stops before giving the
        // permit back, so this never counts too few).
        let pooled = || {
            self.mesh.as_ref().map_or(0, |mesh| {
                mesh.pool.stats().pooled_connections.load(Ordering::Relaxed) as usize
            })
        };
        let held = || self.permits_in_use().saturating_sub(pooled());
        while held() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        left.max(held())
    }

    /// Whether [`Proxy::stop_accepting`] was called: the proxy is
    /// draining, and its pods are left as they are for the next run.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Stops accepting in every pod without releasing any: the pods stay
    /// captured (and refused while no proxy listens), as a restart needs.
    /// Returns once every listener is closed.
    pub async fn stop_accepting(&self) {
        self.stopping.send_replace(true);
        let pods = std::mem::take(&mut *lock(&self.pods));
        for (_, mut entry) in pods {
            entry.accept.shutdown().await;
        }
    }
}

pub use mesh_api::error_chain;

/// Lets the kernel move the connections queued on a closing listener to
/// another of its `SO_REUSEPORT` group (`net.ipv4.tcp_migrate_req`, Linux
/// 5.14), in the calling thread's namespace: when a proxy hands a pod over
/// to its successor and closes its listeners, what they had not accepted
/// yet goes to the successor's instead of being reset. It holds for the
/// application's own `SO_REUSEPORT` listeners too (to their benefit), and
/// stays after the pod is released. Needs a writable `/proc/sys`, which a
/// container that is not privileged does not have.
fn migrate_queued_connections() -> io::Result<()> {
    // The namespace of the thread that opens the file, not the process's.
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1")
}

/// A listening socket bound in the calling thread's namespace. Reusable
/// address and port, so a restarted proxy binds next to one still draining.
fn listen_in_pod(addr: SocketAddr) -> io::Result<OwnedFd> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_mark(PROXY_MARK)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // `[::]:15006` takes IPv4 as well.
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn tokio_listener(fd: OwnedFd) -> io::Result<TcpListener> {
    TcpListener::from_std(std::net::TcpListener::from(fd))
}

/// An accepted connection's permits less the one it took for an upstream
/// socket it turned out not to need (its upstream is a tunnel stream).
fn without_upstream(mut permit: OwnedSemaphorePermit) -> OwnedSemaphorePermit {
    drop(upstream_permit(&mut permit));
    permit
}

/// Splits off the permit an accepted connection took for its upstream
/// socket, so that it goes wherever that descriptor is opened; `None` when
/// the connection holds only its own.
fn upstream_permit(permit: &mut OwnedSemaphorePermit) -> Option<OwnedSemaphorePermit> {
    match permit.num_permits() {
        0 | 1 => None,
        held => permit.split(held - 1),
    }
}

async fn accept_loop(listener: TcpListener, direction: Direction, pod: Arc<PodContext>) {
    loop {
        // Two descriptors: the connection, and its upstream should it be
        // relayed to a socket of its own (a tunnel stream gives one back).
        let Ok(permit) = pod.permits.clone().acquire_many_owned(2).await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                // The destination is looked up here, before anything else
                // runs: a note must be taken while its connection is the
                // one at the head of the accept queue.
                let destination = original_dst(&stream, peer, direction, &pod);
                let pod = pod.clone();
                tokio::spawn(async move {
                    match &pod.mesh {
                        Some(mesh) => {
                            let mesh = mesh.clone();
                            mesh::carry(stream, peer, destination, direction, &pod, &mesh, permit)
                                .await;
                        }
                        None => relay(stream, peer, destination, direction, &pod, permit).await,
                    }
                });
            }
            Err(error) => {
                tracing::warn!(pod = %pod.name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Where an accepted connection was going: the note the programs left for
/// an outbound one, the address `sk_lookup` preserved for an inbound one.
fn original_dst(
    stream: &TcpStream,
    client: SocketAddr,
    direction: Direction,
    pod: &PodContext,
) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    match direction {
        Direction::Outbound => pod.original.take(pod.cookie, local, client),
        Direction::Inbound => Some(canonical(local)),
    }
}

/// Carries one accepted connection to where it was going, counting its
/// outcome as soon as it is known (before the bytes flow).
async fn relay(
    stream: TcpStream,
    client: SocketAddr,
    destination: Option<SocketAddr>,
    direction: Direction,
    pod: &PodContext,
    permit: OwnedSemaphorePermit,
) {
    relay_until(
        stream,
        client,
        destination,
        direction,
        pod,
        permit,
        std::future::pending(),
    )
    .await;
}

/// [`relay`], cut short when `stop` completes (with the error it gives).
async fn relay_until(
    stream: TcpStream,
    client: SocketAddr,
    destination: Option<SocketAddr>,
    direction: Direction,
    pod: &PodContext,
    _permit: OwnedSemaphorePermit,
    stop: impl Future<Output = io::Error>,
) {
    let outcome = match connect_upstream(stream, client, destination, direction, pod).await {
        Ok((stream, upstream, info)) => {
            pod.connections
                .count(&pod.name, direction, Outcome::Relayed);
            let open = pod.connections.register(info);
            copy_plain(
                stream,
                upstream,
                direction,
                open,
                stop,
                pod.tcp_idle_timeout,
            )
            .await;
            return;
        }
        Err(outcome) => outcome,
    };
    pod.connections.count(&pod.name, direction, outcome);
}

/// Copies between the application and a plain upstream until both ends
/// close, `stop` completes or nothing moves for `idle`, then records the
/// bytes.
async fn copy_plain(
    mut stream: TcpStream,
    mut upstream: TcpStream,
    direction: Direction,
    open: OpenConnection,
    stop: impl Future<Output = io::Error>,
    idle: Option<Duration>,
) {
    let from_client = AtomicU64::new(0);
    let from_upstream = AtomicU64::new(0);
    let result = {
        let mut client_side = Counted::new(&mut stream, &from_client);
        let mut upstream_side = Counted::new(&mut upstream, &from_upstream);
        tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut client_side, &mut upstream_side) => copied.map(drop),
            error = stop => Err(error),
            error = crate::hbone::idle_for(idle, || {
                from_client.load(Ordering::Relaxed) + from_upstream.load(Ordering::Relaxed)
            }) => Err(error),
        }
    };
    if result.is_err() {
        // Cut (idle, revoked, failed): both ends get a reset, never what
        // looks like a clean end.
        let _ = stream.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
    let (from_client, from_upstream) = (
        from_client.load(Ordering::Relaxed),
        from_upstream.load(Ordering::Relaxed),
    );
    // `sent` counts what the pod's application sent.
    let (sent, received) = match direction {
        Direction::Outbound => (from_client, from_upstream),
        Direction::Inbound => (from_upstream, from_client),
    };
    open.finish(sent, received, None, &result);
}

/// A stream that counts the bytes read from it.
struct Counted<'a> {
    inner: &'a mut TcpStream,
    read: &'a AtomicU64,
}

impl<'a> Counted<'a> {
    fn new(inner: &'a mut TcpStream, read: &'a AtomicU64) -> Self {
        Self { inner, read }
    }
}

impl tokio::io::AsyncRead for Counted<'_> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut *this.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        this.read.fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl tokio::io::AsyncWrite for Counted<'_> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Connects to where an accepted connection was going.
async fn connect_upstream(
    stream: TcpStream,
    client: SocketAddr,
    destination: Option<SocketAddr>,
    direction: Direction,
    pod: &PodContext,
) -> Result<(TcpStream, TcpStream, ConnectionInfo), Outcome> {
    let Some(original_dst) = destination else {
        tracing::warn!(pod = %pod.name, %client, ?direction, "accepted connection without a recorded destination");
        reset(stream);
        return Err(Outcome::NoOriginalDst);
    };
    // A connection made straight to one of the proxy's own ports in the
    // pod would be relayed to that same port from the pod's own address —
    // which the kernel hands straight back to this listener, forever.
    if direction == Direction::Inbound && PROXY_PORTS.contains(&original_dst.port()) {
        tracing::debug!(pod = %pod.name, %client, %original_dst, "connection to a proxy port refused");
        reset(stream);
        return Err(Outcome::ProxyPort);
    }
    let upstream = match dial(&pod.netns, original_dst).await {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::debug!(pod = %pod.name, %original_dst, %error, "upstream connect failed");
            reset(stream);
            return Err(Outcome::UpstreamFailed);
        }
    };
    let info = connection_info(
        pod,
        direction,
        None,
        Security::Plaintext,
        client,
        original_dst,
    );
    Ok((stream, upstream, info))
}

/// The table entry of a connection about to be carried.
fn connection_info(
    pod: &PodContext,
    direction: Direction,
    peer: Option<String>,
    security: Security,
    client: SocketAddr,
    original_dst: SocketAddr,
) -> ConnectionInfo {
    ConnectionInfo {
        pod: pod.name.clone(),
        direction,
        peer,
        security,
        client: canonical(client),
        original_dst,
        opened_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

/// Connects from inside the pod's namespace, marked so the capture
/// programs leave the socket alone.
async fn dial(netns: &NetnsThread, to: SocketAddr) -> io::Result<TcpStream> {
    let fd = netns
        .run(move || marked_socket(to).map(OwnedFd::from))
        .await?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(to))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A non-blocking TCP socket for connecting to `to`, made in the calling
/// thread's network namespace and marked so the capture programs leave it
/// alone.
pub(crate) fn marked_socket(to: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Closes with a reset, so the client sees the failure rather than an
/// empty answer.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
}

/// IPv4 seen through a dual-stack socket (`::ffff:a.b.c.d`) as IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// Reads `ns/name=/path/to/netns`.
pub fn parse_pod_arg(value: &str) -> Result<(String, PathBuf), String> {
    let (pod, netns) = value
        .split_once('=')
        .ok_or_else(|| format!("expected POD=NETNS, got {value:?}"))?;
    if pod.is_empty() || netns.is_empty() {
        return Err(format!("expected POD=NETNS with both parts, got {value:?}"));
    }
    Ok((pod.to_owned(), Path::new(netns).to_owned()))
}
