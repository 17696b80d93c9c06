//! The mesh data path of a captured pod: outbound connections to a
//! service's virtual address go to one of its healthy endpoints, taken in
//! turn; those to mesh workloads leave in HBONE tunnels under the pod's own
//! certificate;
//! tunnels arriving at the pod's `15008` are verified, authorized and
//! delivered to the application; plaintext arriving at the pod is refused
//! unless the workload is permissive.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use http::StatusCode;
use mesh_identity::{SpiffeId, TrustBundle, svid::check_leaf};
use mesh_model::{names::SYSTEM_NAMESPACE, namespace::MtlsMode, service::Protocol};
use rustls::ServerConfig;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, watch},
};

use super::{
    Direction, NetnsThread, Outcome, PodContext, Security, canonical, connection_info, dial, lock,
    relay, relay_until, reset, upstream_permit, without_upstream,
};
use crate::{
    admin::{Holder, SharedTracked},
    directory::{Directory, ServiceKey, ServiceTarget, VirtualService},
    hbone::{self, HBONE_PORT, Incoming, Pool, PoolKey, TunnelError},
    identity::{CertState, tls},
    policy::{Http, Request},
    xds::Demand,
};

/// What happens to a captured connection whose destination is not a mesh
/// workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutsideMesh {
    /// Passed through in plaintext, from the pod's own address.
    #[default]
    Allow,
    /// Refused (reset), as Istio's `REGISTRY_ONLY`.
    Deny,
}

/// What the mesh data path shares across pods.
#[derive(Debug)]
pub struct MeshPath {
    pub directory: watch::Receiver<Arc<Directory>>,
    /// The workloads' certificates, by `namespace/name`.
    pub certificates: SharedTracked,
    pub bundle: TrustBundle,
    pub pool: Pool,
    pub outside: OutsideMesh,
    /// Tunnel handshakes in progress: a flood of connections that never
    /// finish their handshake is bounded here, not by the connection
    /// permits every pod's listeners share.
    pub handshakes: PendingHandshakes,
    /// Inbound tunnel streams and permissive plaintext connections open
    /// now, re-authorized on policy changes.
    pub streams: OpenStreams,
    /// Where services this node holds no endpoints of are asked for.
    pub demand: Option<Demand>,
    pub balancer: RoundRobin,
    /// The HTTP path's breakers, budgets and load, per service.
    pub http: super::http::HttpState,
}

/// How long a connection to a service waits for its endpoints to arrive
/// when this node did not hold them yet.
const ON_DEMAND_WAIT: Duration = Duration::from_secs(3);

/// Each service's next endpoint, taken in turn.
#[derive(Debug, Default)]
pub struct RoundRobin(Mutex<HashMap<ServiceKey, usize>>);

impl RoundRobin {
    /// The index of the next of `count` endpoints of `service`.
    pub(super) fn next(&self, service: &ServiceKey, count: usize) -> usize {
        let mut turns = lock(&self.0);
        let turn = match turns.get_mut(service) {
            Some(turn) => turn,
            None => turns.entry(service.clone()).or_default(),
        };
        let index = *turn % count;
        *turn = turn.wrapping_add(1);
        index
    }
}

/// The inbound tunnel streams a node carries, and the plaintext
/// connections it let in because the workload was permissive, with what
/// they were authorized as: when the configuration changes, each is decided
/// again, and those no longer allowed are cut — revoking access (or turning
/// a workload strict) revokes it for connections already open, not only
/// for new ones.
#[derive(Debug, Default)]
pub struct OpenStreams {
    next: std::sync::atomic::AtomicU64,
    streams: Mutex<std::collections::BTreeMap<u64, OpenStream>>,
}

#[derive(Debug)]
struct OpenStream {
    pod: String,
    /// `None`: plaintext, accepted because the workload is permissive.
    caller: Option<Arc<SpiffeId>>,
    port: u16,
    /// Served request by request: cut only when no request of the caller
    /// could be allowed any more (each request is decided anyway).
    http: bool,
    revoke: Arc<tokio::sync::Notify>,
}

/// Keeps a stream in [`OpenStreams`] while alive.
struct StreamRegistration<'a> {
    streams: &'a OpenStreams,
    id: u64,
}

impl Drop for StreamRegistration<'_> {
    fn drop(&mut self) {
        lock(&self.streams.streams).remove(&self.id);
    }
}

impl OpenStreams {
    fn register(
        &self,
        pod: &str,
        caller: Option<Arc<SpiffeId>>,
        port: u16,
        http: bool,
    ) -> (StreamRegistration<'_>, Arc<tokio::sync::Notify>) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let revoke = Arc::new(tokio::sync::Notify::new());
        lock(&self.streams).insert(
            id,
            OpenStream {
                pod: pod.to_owned(),
                caller,
                port,
                http,
                revoke: revoke.clone(),
            },
        );
        (StreamRegistration { streams: self, id }, revoke)
    }

    /// Decides every open stream again under `directory`; cuts those it
    /// no longer allows.
    pub fn recheck(&self, directory: &Directory, stats: &hbone::HboneStats) {
        for stream in lock(&self.streams).values() {
            let reason = if stream.caller.is_none()
                && directory.local(&stream.pod).map(|l| l.mtls) != Some(MtlsMode::Permissive)
            {
                Some("the workload no longer accepts plaintext".to_owned())
            } else {
                let decision = directory.authorize(
                    &stream.pod,
                    &Request {
                        caller: stream.caller.as_deref(),
                        port: stream.port,
                        http: if stream.http { Http::Any } else { Http::No },
                    },
                );
                (!decision.allowed()).then(|| decision.reason().to_string())
            };
            if let Some(reason) = reason {
                let caller = stream
                    .caller
                    .as_ref()
                    .map_or_else(|| "plaintext".to_owned(), ToString::to_string);
                tracing::info!(pod = %stream.pod, caller, port = stream.port, reason, "open connection cut: no longer authorized");
                stats
                    .streams_revoked
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Stored if the stream is not waiting yet: it still ends.
                stream.revoke.notify_one();
            }
        }
    }
}

impl MeshPath {
    /// Re-decides the open streams on every configuration change, until
    /// the returned task is aborted.
    pub fn enforce_policy_changes(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let mesh = self.clone();
        let mut directory = self.directory.clone();
        tokio::spawn(async move {
            while directory.changed().await.is_ok() {
                let current = directory.borrow_and_update().clone();
                mesh.streams.recheck(&current, mesh.pool.stats());
            }
        })
    }
}

fn revoked_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        "authorization revoked by a policy change",
    )
}

/// Tunnel handshakes in progress at once, node-wide.
pub const MAX_PENDING_HANDSHAKES: usize = 512;
/// Tunnel handshakes (TLS, then HTTP/2) in progress at once from one
/// source address. Tunnels leave from inside their caller's pod, so this is
/// per calling pod: a pod opening connections to `15008` and never
/// finishing them takes at most this many of the node's slots, not all of
/// them (which would cut every pod on the node off from new tunnels for the
/// handshake timeout, again and again). A dual-stack pod has two
/// addresses, so twice this; callers behind one address (a gateway behind
/// NAT) share it.
pub const MAX_PENDING_HANDSHAKES_PER_SOURCE: usize = 32;

/// Tunnel handshakes in progress, node-wide and per source address.
#[derive(Debug)]
pub struct PendingHandshakes {
    /// In progress, by source address (only sources with one have an
    /// entry); the node's total is their sum.
    by_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
    total: usize,
    per_source: usize,
}

impl Default for PendingHandshakes {
    fn default() -> Self {
        Self::new(MAX_PENDING_HANDSHAKES, MAX_PENDING_HANDSHAKES_PER_SOURCE)
    }
}

/// Why a connection got no handshake slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoSlot {
    #[error("too many tunnel handshakes in progress")]
    Node,
    #[error("too many tunnel handshakes in progress from this address")]
    Source,
}

/// A handshake in progress; its slot frees when this drops.
#[derive(Debug)]
pub struct HandshakeSlot {
    source: IpAddr,
    by_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut by_source = lock(&self.by_source);
        if let Some(count) = by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

impl PendingHandshakes {
    pub fn new(total: usize, per_source: usize) -> Self {
        Self {
            by_source: Arc::default(),
            total,
            per_source,
        }
    }

    /// A slot for a handshake from `source`, if it has one to spare and the
    /// node too.
    pub fn try_start(&self, source: IpAddr) -> Result<HandshakeSlot, NoSlot> {
        let source = source.to_canonical();
        let mut by_source = lock(&self.by_source);
        if by_source
            .get(&source)
            .is_some_and(|count| *count >= self.per_source)
        {
            return Err(NoSlot::Source);
        }
        if by_source.values().sum::<usize>() >= self.total {
            return Err(NoSlot::Node);
        }
        *by_source.entry(source).or_default() += 1;
        Ok(HandshakeSlot {
            source,
            by_source: self.by_source.clone(),
        })
    }
}

impl MeshPath {
    /// The certificate state of the workload `pod`, if it has a manager.
    fn certificate(&self, pod: &str) -> Option<watch::Receiver<CertState>> {
        self.certificates
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|t| t.holder == Holder::Workload && t.name == pod)
            .map(|t| t.state.clone())
    }

    /// Waits (up to [`CERTIFICATE_WAIT`]) until `pod` holds a certificate;
    /// its certificate state once it does. A pod is captured as soon as its configuration
    /// arrives and its first certificate follows milliseconds later, while
    /// connections may come at once: a proxy taking over from a running
    /// one shares the pod's listening ports with it from the first moment.
    async fn certificate_ready(&self, pod: &str) -> Option<watch::Receiver<CertState>> {
        let deadline = tokio::time::Instant::now() + CERTIFICATE_WAIT;
        loop {
            // The manager is started from the same configuration, maybe
            // a moment after the capture.
            if let Some(mut state) = self.certificate(pod) {
                let held = state.wait_for(|s| s.current.is_some());
                let held = matches!(tokio::time::timeout_at(deadline, held).await, Ok(Ok(_)));
                return held.then_some(state);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// How long a connection waits for its workload's first certificate.
const CERTIFICATE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The TLS server configuration a pod serves tunnels with, kept while its
/// certificate manager lives (each handshake presents the manager's
/// current certificate, so rotation needs no rebuild).
#[derive(Debug, Default)]
pub(super) struct TunnelTls(Mutex<Option<(watch::Receiver<CertState>, Arc<ServerConfig>)>>);

impl TunnelTls {
    fn get(&self, pod: &str, mesh: &MeshPath) -> Option<Arc<ServerConfig>> {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((state, config)) = cached.as_ref()
            && state.has_changed().is_ok()
        {
            return Some(config.clone());
        }
        let state = mesh.certificate(pod)?;
        let config = tls::server_config(state.clone(), mesh.bundle.clone()).ok()?;
        let config = hbone::server_tls(Arc::unwrap_or_clone(config));
        *cached = Some((state, config.clone()));
        Some(config)
    }
}

/// Carries a connection accepted on the pod's outbound or plaintext
/// inbound listener.
pub(super) async fn carry(
    stream: TcpStream,
    client: SocketAddr,
    destination: Option<SocketAddr>,
    direction: Direction,
    pod: &Arc<PodContext>,
    mesh: &Arc<MeshPath>,
    permit: OwnedSemaphorePermit,
) {
    let directory = mesh.directory.borrow().clone();
    let count = |outcome| pod.connections.count(&pod.name, direction, outcome);
    let Some(original_dst) = destination else {
        return relay(stream, client, destination, direction, pod, permit).await;
    };
    match direction {
        Direction::Outbound => {
            // A service port that speaks HTTP, declared or detected:
            // routed request by request.
            let declared = directory.service_at(original_dst.ip()).and_then(|service| {
                let port = service
                    .ports
                    .iter()
                    .find(|p| p.port == original_dst.port())?;
                Some((service.clone(), port.protocol))
            });
            let http = match declared {
                Some((service, protocol)) if protocol.is_http() => Some((service, protocol)),
                Some((service, Protocol::Auto)) => super::http::detect(&stream)
                    .await
                    .map(|protocol| (service, protocol)),
                _ => None,
            };
            if let Some((service, protocol)) = http {
                drop(directory);
                // Its upstream connections take their own permits.
                let _permit = without_upstream(permit);
                return super::http::serve(
                    stream,
                    client,
                    original_dst,
                    service,
                    protocol,
                    pod,
                    mesh,
                )
                .await;
            }
            let (directory, target) = match directory.service_at(original_dst.ip()) {
                Some(service) => match mesh
                    .pick_endpoint(service.clone(), original_dst.port())
                    .await
                {
                    Ok(picked) => picked,
                    Err(reason) => {
                        let service = format!("{}/{}", service.key.0, service.key.1);
                        tracing::debug!(pod = %pod.name, %original_dst, service, reason, "no endpoint for a service connection");
                        reset(stream);
                        return count(Outcome::NoHealthyEndpoint);
                    }
                },
                None => (directory, original_dst),
            };
            match directory.mesh_destination(target.ip()) {
                Some(address) => {
                    let workload = TunnelTarget {
                        address: target,
                        identity: directory.identity(address),
                        name: format!("{}/{}", address.namespace, address.name),
                    };
                    tunnel_out(stream, client, original_dst, workload, pod, mesh, permit).await;
                }
                // A service's endpoint is in the mesh's registry, captured
                // or not.
                None if mesh.outside == OutsideMesh::Deny && target == original_dst => {
                    tracing::debug!(pod = %pod.name, %original_dst, "destination outside the mesh refused");
                    reset(stream);
                    count(Outcome::OutsideMeshDenied);
                }
                None => relay(stream, client, Some(target), direction, pod, permit).await,
            }
        }
        Direction::Inbound => {
            let mode = directory.local(&pod.name).map(|l| l.mtls);
            if mode != Some(MtlsMode::Permissive) {
                tracing::debug!(pod = %pod.name, %client, "plaintext refused: the workload's mTLS mode is strict");
                reset(stream);
                return count(Outcome::PlaintextRefused);
            }
            let decision = directory.authorize(
                &pod.name,
                &Request {
                    caller: None,
                    port: original_dst.port(),
                    http: Http::No,
                },
            );
            if !decision.allowed() {
                tracing::debug!(pod = %pod.name, %client, reason = %decision.reason(), "plaintext connection refused");
                reset(stream);
                return count(Outcome::Denied);
            }
            // Decided again on every configuration change, like a tunnel
            // stream.
            let (_registration, revoke) =
                mesh.streams
                    .register(&pod.name, None, original_dst.port(), false);
            let revoked = async move {
                revoke.notified().await;
                revoked_error()
            };
            relay_until(stream, client, destination, direction, pod, permit, revoked).await;
        }
    }
}

impl MeshPath {
    /// The directory once it holds the endpoints of `service` (asking the
    /// control plane for them, and waiting, when it does not yet).
    pub(super) async fn service_config(
        &self,
        service: &ServiceKey,
    ) -> Result<Arc<Directory>, String> {
        let mut updates = self.directory.clone();
        let deadline = tokio::time::Instant::now() + ON_DEMAND_WAIT;
        loop {
            let directory = updates.borrow_and_update().clone();
            if directory.endpoints_of(service).is_some() {
                return Ok(directory);
            }
            let Some(demand) = &self.demand else {
                return Err("this node holds no endpoints of the service".to_owned());
            };
            demand.want(&service.0, &service.1);
            match tokio::time::timeout_at(deadline, updates.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err("the configuration is gone".to_owned()),
                Err(_) => {
                    return Err(format!(
                        "the service's endpoints did not arrive within {ON_DEMAND_WAIT:?}"
                    ));
                }
            }
        }
    }

    /// The next healthy endpoint of `service` serving `port`, with the
    /// directory it was found in (a newer one when the endpoints had to be
    /// asked for first).
    async fn pick_endpoint(
        &self,
        service: Arc<VirtualService>,
        port: u16,
    ) -> Result<(Arc<Directory>, SocketAddr), String> {
        let directory = self.service_config(&service.key).await?;
        match directory.service_target(&service, port) {
            ServiceTarget::NoPort => Err(format!("the service declares no port {port}")),
            ServiceTarget::Endpoints(endpoints) if endpoints.is_empty() => {
                Err(format!("no healthy endpoint serves port {port}"))
            }
            ServiceTarget::Endpoints(endpoints) => {
                let endpoint = endpoints[self.balancer.next(&service.key, endpoints.len())];
                Ok((directory, endpoint))
            }
            ServiceTarget::Unknown(_) => {
                Err("this node holds no endpoints of the service".to_owned())
            }
        }
    }
}

/// The serial of `pod`'s current certificate; empty while it has none.
pub(super) fn certificate_serial(mesh: &MeshPath, pod: &str) -> String {
    mesh.certificate(pod)
        .map(|state| current_serial(&state))
        .unwrap_or_default()
}

/// The serial of the current certificate in `state`; empty without one.
fn current_serial(state: &watch::Receiver<CertState>) -> String {
    state
        .borrow()
        .current
        .as_ref()
        .map(|c| c.serial.clone())
        .unwrap_or_default()
}

/// Opens a tunnel stream from the workload `pod` (dialling from inside
/// its namespace, presenting its certificate) to `target`. A new pooled
/// connection holds `spare` if given (see [`hbone::Pool::open`]).
pub(super) async fn open_tunnel(
    pod: &str,
    netns: &NetnsThread,
    mesh: &MeshPath,
    target: &TunnelTarget,
    trace: &str,
    spare: Option<OwnedSemaphorePermit>,
) -> Result<hbone::Tunnel, TunnelError> {
    let key = PoolKey {
        source: pod.to_owned(),
        destination: target.identity.clone(),
        address: SocketAddr::new(target.address.ip(), HBONE_PORT),
    };
    let Some(state) = mesh.certificate_ready(pod).await else {
        return Err(TunnelError::NoCertificate);
    };
    let serial = current_serial(&state);
    mesh.pool
        .open(
            &key,
            &serial,
            target.address,
            trace,
            spare,
            || dial(netns, key.address),
            || {
                let config =
                    tls::client_config(state.clone(), mesh.bundle.clone(), target.identity.clone())
                        .map_err(|e| TunnelError::Tls(key.address, std::io::Error::other(e)))?;
                Ok(hbone::client_tls(Arc::unwrap_or_clone(config)))
            },
        )
        .await
}

/// The mesh workload a tunnel goes to.
pub(super) struct TunnelTarget {
    /// Its address and the port asked for.
    pub address: SocketAddr,
    pub identity: SpiffeId,
    /// `namespace/name`.
    pub name: String,
}

/// Opens a tunnel to `target` for an outbound connection to `original_dst`
/// (the workload itself, or a service it serves) and carries the
/// connection through it. Of the connection's `permit`, the one taken for
/// an upstream descriptor goes to the pooled connection should the tunnel
/// need a new one, and is given back otherwise.
async fn tunnel_out(
    mut stream: TcpStream,
    client: SocketAddr,
    original_dst: SocketAddr,
    target: TunnelTarget,
    pod: &PodContext,
    mesh: &MeshPath,
    mut permit: OwnedSemaphorePermit,
) {
    let trace = hbone::new_traceparent();
    let spare = upstream_permit(&mut permit);
    let opened = open_tunnel(&pod.name, &pod.netns, mesh, &target, &trace, spare).await;
    let TunnelTarget {
        identity,
        name: peer,
        ..
    } = target;
    let tunnel = match opened {
        Ok(tunnel) => tunnel,
        Err(error) => {
            let outcome = if error.denied() {
                Outcome::Denied
            } else {
                Outcome::TunnelFailed
            };
            if outcome == Outcome::Denied {
                // The destination logs the decision and its reason.
                tracing::debug!(pod = %pod.name, %original_dst, destination = %identity, "tunnel refused by the destination's authorization");
            } else {
                tracing::warn!(pod = %pod.name, %original_dst, destination = %identity, error = %super::error_chain(&error), "tunnel not opened");
            }
            reset(stream);
            pod.connections
                .count(&pod.name, Direction::Outbound, outcome);
            return;
        }
    };
    pod.connections
        .count(&pod.name, Direction::Outbound, Outcome::Relayed);
    let open = pod.connections.register(connection_info(
        pod,
        Direction::Outbound,
        Some(peer),
        Security::Mtls,
        client,
        original_dst,
    ));
    let _guard = tunnel.guard;
    let (moved, result) = hbone::splice(
        &mut stream,
        tunnel.send,
        tunnel.recv,
        std::future::pending(),
        pod.tcp_idle_timeout,
    )
    .await;
    open.finish(moved.sent, moved.received, Some(&trace), &result);
}

/// Accepts tunnels on a pod's `15008`. A connection takes one of the
/// node's connection permits only once its TLS handshake has succeeded,
/// and holds its handshake slot until its HTTP/2 handshake is done too.
pub(super) async fn tunnel_accept_loop(
    listener: TcpListener,
    pod: Arc<PodContext>,
    mesh: Arc<MeshPath>,
    stopping: watch::Receiver<bool>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let handshake = match mesh.handshakes.try_start(peer.ip()) {
                    Ok(slot) => slot,
                    Err(full) => {
                        // Counted, and logged at debug only: a flood must
                        // not set the rate of the node's warnings.
                        let stats = mesh.pool.stats();
                        let counter = match full {
                            NoSlot::Node => &stats.dropped_at_node_limit,
                            NoSlot::Source => &stats.dropped_at_source_limit,
                        };
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::debug!(pod = %pod.name, %peer, "{full}; connection dropped");
                        reset(stream);
                        continue;
                    }
                };
                let _ = hbone::tune_socket(&stream);
                let (pod, mesh, stopping) = (pod.clone(), mesh.clone(), stopping.clone());
                tokio::spawn(async move {
                    serve_tunnels(stream, peer, pod, mesh, stopping, handshake).await;
                });
            }
            Err(error) => {
                tracing::warn!(pod = %pod.name, %error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Terminates mTLS for one tunnel connection and serves its streams. The
/// caller's identity comes from its verified certificate and nowhere else.
async fn serve_tunnels(
    stream: TcpStream,
    remote: SocketAddr,
    pod: Arc<PodContext>,
    mesh: Arc<MeshPath>,
    mut stopping: watch::Receiver<bool>,
    handshake: HandshakeSlot,
) {
    let stats = mesh.pool.stats();
    let refuse = |why: &str| {
        stats
            .server_handshake_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(pod = %pod.name, %remote, why, "tunnel connection refused");
    };
    let ready = mesh.certificate_ready(&pod.name).await.is_some();
    let Some(config) = pod.tunnel_tls.get(&pod.name, &mesh).filter(|_| ready) else {
        refuse("the workload has no certificate yet");
        reset(stream);
        return;
    };
    let accepted = tokio::time::timeout(
        hbone::HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(config).accept(stream),
    )
    .await;
    let mut tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => return refuse(&format!("TLS: {error}")),
        Err(_) => return refuse("TLS handshake timed out"),
    };
    tls.get_mut()
        .1
        .set_buffer_limit(Some(hbone::TLS_WRITE_BUFFER));
    let (_, connection) = tls.get_ref();
    if connection.alpn_protocol() != Some(hbone::ALPN) {
        return refuse("the client did not ask for HTTP/2");
    }
    // The verifier already checked the chain and the SVID profile; this
    // reads the identity it vouched for.
    let caller = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| check_leaf(leaf, mesh.bundle.trust_domain()).ok());
    let Some(caller) = caller else {
        return refuse("no verified client identity");
    };
    if caller.namespace == SYSTEM_NAMESPACE {
        return refuse("mesh components do not open tunnels to workloads");
    }
    // Tunnels leave from inside the caller's pod, so they come from the
    // address of a workload with the caller's identity: a certificate
    // copied off a pod is of no use from anywhere else.
    if let Err(why) = caller_at_home(&mesh, &caller, remote.ip()).await {
        return refuse(&why);
    }
    let Ok(_permit) = pod.permits.clone().try_acquire_owned() else {
        return refuse("the node is at its connection limit");
    };
    stats
        .server_handshakes
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let caller = Arc::new(caller);
    let mut released = pod.released.clone();
    // Drained when the node stops or the pod is released.
    let stop = async move {
        tokio::select! {
            _ = stopping.wait_for(|stop| *stop) => {}
            _ = released.wait_for(|gone| *gone) => {}
        }
    };
    // The server keeps an idle connection twice as long as clients do, so
    // the client normally closes first.
    let mut settings = mesh.pool.settings();
    settings.idle_timeout = settings.idle_timeout.saturating_mul(2);
    let (pod2, mesh2) = (pod.clone(), mesh.clone());
    hbone::serve(
        tls,
        move |incoming| {
            let (pod, mesh, caller) = (pod2.clone(), mesh2.clone(), caller.clone());
            async move { tunnel_in(incoming, &caller, remote, &pod, &mesh).await }
        },
        stop,
        settings,
        // Held through the HTTP/2 handshake too: a caller that finishes TLS
        // and stalls its preface takes from its address's share of slots,
        // not only from the node's connection permits.
        handshake,
    )
    .await;
}

/// How long a tunnel from an address this node does not know yet waits
/// for the configuration to name it (a pod just started elsewhere).
const UNKNOWN_CALLER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether `caller` may open tunnels from `address`: the address of a
/// workload with the caller's identity. An identity no workload holds (a
/// gateway's or a machine's, from `meshctl cert issue`) is not tied to an
/// address.
async fn caller_at_home(
    mesh: &MeshPath,
    caller: &SpiffeId,
    address: std::net::IpAddr,
) -> Result<(), String> {
    let address = address.to_canonical();
    let mut directory = mesh.directory.clone();
    let deadline = tokio::time::Instant::now() + UNKNOWN_CALLER_PATIENCE;
    loop {
        let verdict = {
            let current = directory.borrow_and_update();
            match current.workload_at(address) {
                Some(workload) if current.identity(workload) == *caller => Some(Ok(())),
                Some(workload) => Some(Err(format!(
                    "{caller} presented from {address}, the address of {}/{} ({})",
                    workload.namespace,
                    workload.name,
                    current.identity(workload)
                ))),
                None if !current.is_workload_identity(caller) => Some(Ok(())),
                None => None,
            }
        };
        if let Some(verdict) = verdict {
            return verdict;
        }
        // Wait for the next configuration, until the deadline.
        if !matches!(
            tokio::time::timeout_at(deadline, directory.changed()).await,
            Ok(Ok(()))
        ) {
            return Err(format!(
                "{caller}, a workload identity, presented from {address}, which is no workload's address"
            ));
        }
    }
}

/// Decides one tunnelled stream and delivers it to the application.
async fn tunnel_in(
    incoming: Incoming,
    caller: &Arc<SpiffeId>,
    remote: SocketAddr,
    pod: &Arc<PodContext>,
    mesh: &Arc<MeshPath>,
) {
    let count = |outcome| {
        pod.connections
            .count(&pod.name, Direction::Inbound, outcome)
    };
    let target = match incoming.target() {
        Ok(target) => canonical(target),
        Err(status) => {
            count(Outcome::ProxyPort);
            return incoming.refuse(status);
        }
    };
    // Only this pod's own addresses, and never the proxy's ports (a
    // tunnel to 15008 would loop back into this proxy).
    if !pod.addresses.contains(&target.ip()) {
        count(Outcome::ProxyPort);
        return incoming.refuse(StatusCode::MISDIRECTED_REQUEST);
    }
    if super::PROXY_PORTS.contains(&target.port()) {
        count(Outcome::ProxyPort);
        return incoming.refuse(StatusCode::BAD_REQUEST);
    }
    let trace = incoming.traceparent().map(str::to_owned);
    let directory = mesh.directory.borrow().clone();
    // An HTTP port is authorized request by request (method and path);
    // the stream is refused only when no request of this caller could be.
    let service = directory.inbound_service(&pod.name, target.port());
    let protocol = service.as_ref().map_or(Protocol::Tcp, |(_, p)| *p);
    let decision = directory.authorize(
        &pod.name,
        &Request {
            caller: Some(caller.as_ref()),
            port: target.port(),
            http: if protocol == Protocol::Tcp {
                Http::No
            } else {
                Http::Any
            },
        },
    );
    if !decision.allowed() {
        tracing::info!(pod = %pod.name, %caller, %target, reason = %decision.reason(), trace = trace.as_deref().unwrap_or(""), "tunnel refused");
        count(Outcome::Denied);
        return incoming.refuse(StatusCode::FORBIDDEN);
    }
    drop(directory);
    let Ok(permit) = pod.permits.clone().try_acquire_owned() else {
        return incoming.refuse(StatusCode::SERVICE_UNAVAILABLE);
    };
    // A TCP port: the application is dialled before the stream is
    // answered, so a refusal reaches the caller as 503.
    let upstream = match service {
        Some(service) => Inner::Http(service),
        None => match dial(&pod.netns, target).await {
            Ok(app) => Inner::Tcp(app),
            Err(error) => {
                tracing::debug!(pod = %pod.name, %target, %error, "application connect failed");
                count(Outcome::UpstreamFailed);
                return incoming.refuse(StatusCode::SERVICE_UNAVAILABLE);
            }
        },
    };
    let (send, recv) = match incoming.accept() {
        Ok(halves) => halves,
        Err(error) => {
            tracing::debug!(pod = %pod.name, %error, "tunnel stream ended before it was answered");
            return;
        }
    };
    count(Outcome::Relayed);
    let open = pod.connections.register(connection_info(
        pod,
        Direction::Inbound,
        Some(caller.to_string()),
        Security::Mtls,
        remote,
        target,
    ));
    let http = matches!(upstream, Inner::Http(_));
    let (_registration, revoke) =
        mesh.streams
            .register(&pod.name, Some(caller.clone()), target.port(), http);
    let revoked = async move {
        revoke.notified().await;
        revoked_error()
    };
    let (sent, received, result) = match upstream {
        // Served request by request, each authorized on method and path.
        Inner::Http(service) => {
            let stream = hbone::TunnelIo::accepted(send, recv);
            let tally = Arc::new(super::http::IoTally::default());
            let served = super::http::serve_inbound(
                stream,
                tally.clone(),
                caller.clone(),
                target,
                service,
                pod,
                mesh,
            );
            let result = tokio::select! {
                result = served => result,
                error = revoked => Err(error),
            };
            // Sent: the answers back into the tunnel; received: its
            // requests.
            (tally.written(), tally.read(), result)
        }
        Inner::Tcp(mut app) => {
            let (moved, result) =
                hbone::splice(&mut app, send, recv, revoked, pod.tcp_idle_timeout).await;
            (moved.sent, moved.received, result)
        }
    };
    drop(permit);
    open.finish(sent, received, trace.as_deref(), &result);
}

/// What an accepted tunnel stream is carried to.
enum Inner {
    /// An HTTP port of this service.
    Http((ServiceKey, Protocol)),
    /// The application's connection.
    Tcp(TcpStream),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_cannot_take_every_handshake_slot() {
        let pending = PendingHandshakes::new(4, 2);
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let first = pending.try_start(a).unwrap();
        let _second = pending.try_start(a).unwrap();
        assert_eq!(pending.try_start(a).unwrap_err(), NoSlot::Source);
        // The same address written as IPv4-mapped IPv6 is the same source.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(pending.try_start(mapped).unwrap_err(), NoSlot::Source);
        let _others = (pending.try_start(b).unwrap(), pending.try_start(b).unwrap());
        assert_eq!(pending.try_start(c).unwrap_err(), NoSlot::Node);
        // A finished handshake frees its slot for its address and the node.
        drop(first);
        let _again = pending.try_start(a).unwrap();
        assert_eq!(pending.try_start(c).unwrap_err(), NoSlot::Node);
        assert_eq!(lock(&pending.by_source).len(), 2);
    }
}
