//! HBONE: TCP carried between node proxies as HTTP/2 `CONNECT` streams
//! over mutual TLS to the destination pod's port 15008 (as Istio ambient's
//! ztunnel does), so any TCP protocol rides one authenticated, encrypted,
//! multiplexed connection.
//!
//! The client side keeps a pool: one TLS connection per (source workload,
//! destination identity, destination address) carries many streams, a
//! second one opens only when the first has `max_streams` in flight, and a
//! connection nobody used for `idle_timeout` closes. A connection carries
//! new streams only while the source's certificate is the one it was
//! opened with: after a rotation new streams go on a fresh connection (the
//! old one finishes its streams and idles out), so no connection is used
//! much beyond the life of the certificate it authenticated with. The server side serves
//! one connection's streams, handing each `CONNECT` to the caller.

use std::{
    collections::HashMap,
    future::{Future, poll_fn},
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use mesh_identity::SpiffeId;
use rustls::{ClientConfig, ServerConfig, pki_types::ServerName};
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::OwnedSemaphorePermit,
    time::Instant,
};

/// The port node proxies accept tunnels on, in every captured pod.
pub const HBONE_PORT: u16 = mesh_common::capture::PROXY_TUNNEL_PORT;
/// The one application protocol spoken over the TLS connection.
pub const ALPN: &[u8] = b"h2";
/// The W3C trace context header carried on each `CONNECT`.
pub const TRACEPARENT: &str = "traceparent";

/// How much one stream may have in flight: large enough that a single bulk
/// transfer is not held back by window updates. A stream's window is given
/// back only as its bytes are written to the application, so a stream
/// whose application stops reading holds at most this much.
const STREAM_WINDOW: u32 = 2 << 20;
/// Many times the stream window, so a few stalled streams (slow readers)
/// cannot stop the others sharing the connection.
const CONNECTION_WINDOW: u32 = 64 << 20;
const MAX_FRAME: u32 = 1 << 20;
/// Bytes read from the application at once, at most (a bulk transfer
/// moves in reads this large) ...
const CHUNK: usize = 256 << 10;
/// ... and at first: a connection's read buffer starts this small and
/// doubles each time a read fills it, so an idle or chatty connection
/// holds kilobytes, not `CHUNK` (it once held a zeroed `CHUNK`: 160 KiB
/// resident per idle connection).
const FIRST_CHUNK: usize = 8 << 10;
/// How much encrypted data a tunnel's TLS session may hold for the socket:
/// a bulk read (`CHUNK`) goes out in one write. At rustls's default it
/// went out 64 KiB at a time, and bulk through the mesh kept 0.41–0.46×
/// direct's throughput against 0.48–0.50× with this (three quick runs
/// each, alternating, 2026-11-29).
pub const TLS_WRITE_BUFFER: usize = CHUNK;
/// What a connection may buffer for sending before streams wait.
const SEND_BUFFER: usize = 4 << 20;
/// The largest header list a `CONNECT` may carry (HTTP/2's accounting:
/// names, values and 32 bytes per field).
const MAX_HEADER_LIST: u32 = 16 << 10;
/// How long a TLS + HTTP/2 handshake, or the answer to a `CONNECT`, may
/// take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets up a tunnel's TCP socket: no Nagle delay, and a dead peer (a
/// deleted pod, a crashed node) noticed within a minute or so instead of
/// TCP's quarter of an hour: keepalive probes while idle, and a bound on
/// unacknowledged data while busy.
pub fn tune_socket(tcp: &TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let socket = socket2::SockRef::from(tcp);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10))
            .with_retries(3),
    )?;
    socket.set_tcp_user_timeout(Some(Duration::from_secs(60)))
}

/// How the client pool shares connections.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    /// Streams one connection carries at once before another opens.
    pub max_streams: usize,
    /// How long a connection without streams stays open.
    pub idle_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_streams: 100,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Counts the admin endpoint exports.
#[derive(Debug, Default, Serialize)]
pub struct HboneStats {
    /// TLS handshakes completed as the client (new pooled connections).
    pub client_handshakes: AtomicU64,
    /// Client handshakes that failed (refused, timed out, peer not who was
    /// expected).
    pub client_handshake_failures: AtomicU64,
    /// TLS handshakes completed as the server.
    pub server_handshakes: AtomicU64,
    /// Server handshakes refused: no or untrusted client certificate,
    /// wrong protocol, not a workload identity.
    pub server_handshake_failures: AtomicU64,
    /// Streams opened as the client.
    pub streams_opened: AtomicU64,
    /// Pooled connections open now.
    pub pooled_connections: AtomicU64,
    /// Inbound streams cut because a policy change no longer allows them.
    pub streams_revoked: AtomicU64,
    /// Connections to 15008 reset unanswered: the node had its limit of
    /// handshakes in progress ...
    pub dropped_at_node_limit: AtomicU64,
    /// ... or their source address had its share.
    pub dropped_at_source_limit: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connecting to {0}")]
    Connect(SocketAddr, #[source] io::Error),
    #[error("TLS with {0}")]
    Tls(SocketAddr, #[source] io::Error),
    #[error("the source workload has no certificate yet")]
    NoCertificate,
    #[error("HTTP/2 with {0}")]
    Http2(SocketAddr, #[source] h2::Error),
    #[error("the destination refused the tunnel: {0}")]
    Refused(StatusCode),
}

impl TunnelError {
    /// The destination's authorization refused it.
    pub fn denied(&self) -> bool {
        matches!(self, TunnelError::Refused(StatusCode::FORBIDDEN))
    }
}

/// Which pooled connection a tunnel may share.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The source workload, `namespace/name`.
    pub source: String,
    pub destination: SpiffeId,
    /// The destination's HBONE address.
    pub address: SocketAddr,
}

/// One pooled TLS connection.
#[derive(Debug)]
struct Connection {
    send: h2::client::SendRequest<Bytes>,
    /// The source certificate's serial it was opened with.
    certificate: String,
    active: AtomicUsize,
    closed: AtomicBool,
    idle_since: Mutex<Instant>,
}

/// Holds a stream's place on its connection; the connection may go idle
/// once every guard is dropped.
#[derive(Debug)]
pub struct StreamGuard(Arc<Connection>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.0.idle_since) = Instant::now();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

type Slot = Arc<tokio::sync::Mutex<Vec<Arc<Connection>>>>;

/// An open tunnel: the stream's two halves and its place in the pool.
#[derive(Debug)]
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub guard: StreamGuard,
    /// Whether the stream rode a connection that already existed.
    pub reused: bool,
}

/// The client side's connections.
#[derive(Debug)]
pub struct Pool {
    settings: PoolSettings,
    /// Shared with the connections' driver tasks, which remove a key's
    /// entry once its last connection has closed.
    slots: Arc<Mutex<HashMap<PoolKey, Slot>>>,
    stats: Arc<HboneStats>,
    /// The node's descriptor permits, once the proxy shares them: each
    /// pooled connection holds one.
    permits: std::sync::OnceLock<Arc<tokio::sync::Semaphore>>,
}

impl Pool {
    pub fn new(settings: PoolSettings, stats: Arc<HboneStats>) -> Self {
        Self {
            settings,
            slots: Arc::default(),
            stats,
            permits: std::sync::OnceLock::new(),
        }
    }

    /// Makes each connection the pool opens hold one of `permits` (the
    /// node's descriptors) for as long as it is open; with none left, a
    /// new connection is refused. Only the first call counts.
    pub fn share_permits(&self, permits: Arc<tokio::sync::Semaphore>) {
        let _ = self.permits.set(permits);
    }

    pub fn settings(&self) -> PoolSettings {
        self.settings
    }

    pub fn stats(&self) -> &Arc<HboneStats> {
        &self.stats
    }

    /// Opens a stream to `target` (the original destination) through the
    /// pooled connection for `key`, establishing one with `dial` and `tls`
    /// when none has room. A connection that turns out to be closing
    /// (GOAWAY) is dropped and the stream retried once on a fresh one.
    ///
    /// `spare`, a permit the caller already holds for an upstream
    /// descriptor, is what a new connection holds; it is given back when
    /// the stream rides an existing one. Without it a new connection takes
    /// a permit of its own, and is refused when none is left.
    #[allow(clippy::too_many_arguments)]
    pub async fn open<D, F>(
        &self,
        key: &PoolKey,
        certificate: &str,
        target: SocketAddr,
        traceparent: &str,
        mut spare: Option<OwnedSemaphorePermit>,
        dial: D,
        tls: impl Fn() -> Result<Arc<ClientConfig>, TunnelError>,
    ) -> Result<Tunnel, TunnelError>
    where
        D: Fn() -> F,
        F: Future<Output = io::Result<TcpStream>>,
    {
        let slot = lock(&self.slots).entry(key.clone()).or_default().clone();
        let mut retried = false;
        loop {
            let (connection, reused) = self
                .checkout(&slot, key, certificate, &mut spare, &dial, &tls)
                .await?;
            let guard = StreamGuard(connection.clone());
            match connect_stream(&connection.send, target, traceparent).await {
                Ok((send, recv)) => {
                    bump(&self.stats.streams_opened);
                    return Ok(Tunnel {
                        send,
                        recv,
                        guard,
                        reused,
                    });
                }
                Err(StreamError::Connection(error)) if reused && !retried => {
                    tracing::debug!(%error, address = %key.address, "pooled connection is closing; opening another");
                    connection.closed.store(true, Ordering::Release);
                    retried = true;
                }
                Err(StreamError::Connection(error)) => {
                    connection.closed.store(true, Ordering::Release);
                    return Err(TunnelError::Http2(key.address, error));
                }
                Err(StreamError::Stream(error)) => {
                    return Err(TunnelError::Http2(key.address, error));
                }
                Err(StreamError::Status(status)) => return Err(TunnelError::Refused(status)),
            }
        }
    }

    /// A connection with room for one more stream (counted as taken).
    async fn checkout<D, F>(
        &self,
        slot: &Slot,
        key: &PoolKey,
        certificate: &str,
        spare: &mut Option<OwnedSemaphorePermit>,
        dial: &D,
        tls: &impl Fn() -> Result<Arc<ClientConfig>, TunnelError>,
    ) -> Result<(Arc<Connection>, bool), TunnelError>
    where
        D: Fn() -> F,
        F: Future<Output = io::Result<TcpStream>>,
    {
        // Held while connecting: a burst of streams to one destination
        // waits for one handshake instead of making one each.
        let mut connections = slot.lock().await;
        // Connections of an older certificate leave the pool; their open
        // streams keep them alive until they end.
        connections.retain(|c| !c.closed.load(Ordering::Acquire) && c.certificate == certificate);
        for connection in connections.iter() {
            let active = connection.active.load(Ordering::Acquire);
            if active < self.settings.max_streams
                && connection
                    .active
                    .compare_exchange(active, active + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Ok((connection.clone(), true));
            }
        }
        let connection = match self
            .establish(key, certificate, spare.take(), dial, tls)
            .await
        {
            Ok(connection) => connection,
            Err(error) => {
                bump(&self.stats.client_handshake_failures);
                return Err(error);
            }
        };
        connection.active.fetch_add(1, Ordering::AcqRel);
        connections.push(connection.clone());
        Ok((connection, false))
    }

    async fn establish<D, F>(
        &self,
        key: &PoolKey,
        certificate: &str,
        spare: Option<OwnedSemaphorePermit>,
        dial: &D,
        tls: &impl Fn() -> Result<Arc<ClientConfig>, TunnelError>,
    ) -> Result<Arc<Connection>, TunnelError>
    where
        D: Fn() -> F,
        F: Future<Output = io::Result<TcpStream>>,
    {
        let address = key.address;
        let config = tls()?;
        let permit = match (spare, self.permits.get()) {
            (Some(spare), _) => Some(spare),
            (None, Some(permits)) => Some(permits.clone().try_acquire_owned().map_err(|_| {
                TunnelError::Connect(
                    address,
                    io::Error::other("the node is at its connection limit"),
                )
            })?),
            (None, None) => None,
        };
        let handshake = async {
            let tcp = dial().await.map_err(|e| TunnelError::Connect(address, e))?;
            tune_socket(&tcp).map_err(|e| TunnelError::Connect(address, e))?;
            // The verifier checks the peer's identity, not a name: any
            // valid name will do here.
            let name = ServerName::IpAddress(address.ip().into());
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| TunnelError::Tls(address, e))?;
            tls.get_mut().1.set_buffer_limit(Some(TLS_WRITE_BUFFER));
            if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
                return Err(TunnelError::Tls(
                    address,
                    io::Error::other("the peer did not agree to HTTP/2"),
                ));
            }
            h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME)
                .max_send_buffer_size(SEND_BUFFER)
                .enable_push(false)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| TunnelError::Http2(address, e))
        };
        let (send, driver) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| {
                TunnelError::Connect(
                    address,
                    io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"),
                )
            })??;
        bump(&self.stats.client_handshakes);
        let connection = Arc::new(Connection {
            send,
            certificate: certificate.to_owned(),
            active: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        });
        let watched = connection.clone();
        let idle_timeout = self.settings.idle_timeout;
        let stats = self.stats.clone();
        let slots = self.slots.clone();
        let key = key.clone();
        stats.pooled_connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            // The descriptor is the driver's for as long as it runs.
            let _permit = permit;
            let idle = async {
                loop {
                    tokio::time::sleep(idle_timeout).await;
                    let since = *lock(&watched.idle_since);
                    if watched.active.load(Ordering::Acquire) == 0
                        && since.elapsed() >= idle_timeout
                    {
                        return;
                    }
                }
            };
            tokio::select! {
                result = driver => if let Err(error) = result {
                    tracing::debug!(%error, %address, "tunnel connection ended");
                },
                () = idle => tracing::debug!(%address, "closing idle tunnel connection"),
            }
            watched.closed.store(true, Ordering::Release);
            stats.pooled_connections.fetch_sub(1, Ordering::Relaxed);
            // Forget the key when nothing of it is left (a busy slot is
            // cleaned by its next checkout instead).
            let mut slots = lock(&slots);
            let empty = slots.get(&key).is_some_and(|slot| {
                slot.try_lock().is_ok_and(|mut connections| {
                    connections.retain(|c| !c.closed.load(Ordering::Acquire));
                    connections.is_empty()
                })
            });
            if empty {
                slots.remove(&key);
            }
        });
        Ok(connection)
    }
}

enum StreamError {
    /// The connection cannot carry new streams.
    Connection(h2::Error),
    /// This stream failed.
    Stream(h2::Error),
    /// The peer answered the `CONNECT` with this status.
    Status(StatusCode),
}

async fn connect_stream(
    send: &h2::client::SendRequest<Bytes>,
    target: SocketAddr,
    traceparent: &str,
) -> Result<(SendStream<Bytes>, RecvStream), StreamError> {
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header(TRACEPARENT, traceparent)
        .body(())
        .expect("a socket address is a valid authority");
    let mut send = send
        .clone()
        .ready()
        .await
        .map_err(StreamError::Connection)?;
    let (response, stream) = send
        .send_request(request, false)
        .map_err(StreamError::Connection)?;
    let response = match tokio::time::timeout(HANDSHAKE_TIMEOUT, response).await {
        Ok(response) => response.map_err(|e| {
            if e.is_go_away() || e.is_io() {
                StreamError::Connection(e)
            } else {
                StreamError::Stream(e)
            }
        })?,
        // No answer: the peer (or the path to it) is gone.
        Err(_) => return Err(StreamError::Connection(h2::Reason::CANCEL.into())),
    };
    if response.status() != StatusCode::OK {
        return Err(StreamError::Status(response.status()));
    }
    Ok((stream, response.into_body()))
}

/// A random W3C `traceparent` for a new tunnel.
pub fn new_traceparent() -> String {
    let mut ids = [0u8; 24];
    getrandom::getrandom(&mut ids).expect("the system has randomness");
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    format!("00-{}-{}-01", hex(&ids[..16]), hex(&ids[16..]))
}

/// The TLS client configuration for tunnels: the workload's, with ALPN.
pub fn client_tls(mut config: ClientConfig) -> Arc<ClientConfig> {
    config.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(config)
}

/// The TLS server configuration for tunnels: the workload's, with ALPN.
pub fn server_tls(mut config: ServerConfig) -> Arc<ServerConfig> {
    config.alpn_protocols = vec![ALPN.to_vec()];
    Arc::new(config)
}

/// A `CONNECT` the server received, to be answered with [`Incoming::refuse`]
/// or [`Incoming::accept`].
#[derive(Debug)]
pub struct Incoming {
    pub request: Request<RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
}

impl Incoming {
    /// The authority of a `CONNECT`: where the caller wants to go.
    pub fn target(&self) -> Result<SocketAddr, StatusCode> {
        if self.request.method() != Method::CONNECT {
            return Err(StatusCode::METHOD_NOT_ALLOWED);
        }
        self.request
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse().ok())
            .ok_or(StatusCode::BAD_REQUEST)
    }

    pub fn traceparent(&self) -> Option<&str> {
        self.request
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
    }

    pub fn refuse(mut self, status: StatusCode) {
        let response = Response::builder()
            .status(status)
            .body(())
            .expect("a status is a valid response");
        let _ = self.respond.send_response(response, true);
    }

    /// Answers 200 and returns the stream's halves.
    pub fn accept(mut self) -> Result<(SendStream<Bytes>, RecvStream), h2::Error> {
        let response = Response::builder()
            .status(StatusCode::OK)
            .body(())
            .expect("200 is a valid response");
        let send = self.respond.send_response(response, false)?;
        Ok((send, self.request.into_body()))
    }
}

/// Serves one accepted (already TLS-terminated) connection: every stream
/// goes to `handle` in its own task, until the peer closes, `stop`
/// resolves, or no stream has been open for `settings.idle_timeout`; then
/// the connection is drained gracefully (GOAWAY, open streams finish).
/// Clients may open twice `settings.max_streams` streams at once.
/// `handshaking` (a slot the handshake holds) is dropped once the HTTP/2
/// handshake has ended, however it ended.
pub async fn serve<IO, H, Fut>(
    io: IO,
    handle: H,
    stop: impl Future<Output = ()>,
    settings: PoolSettings,
    handshaking: impl Send,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Incoming) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let max_streams = u32::try_from(settings.max_streams.saturating_mul(2)).unwrap_or(u32::MAX);
    let connection = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(max_streams)
        // A CONNECT carries an authority and a few trace headers: a list
        // past this ends the connection (CONTINUATION floods) ...
        .max_header_list_size(MAX_HEADER_LIST)
        // ... as do more than 20 streams reset before they are accepted
        // (rapid reset) or 1,024 streams failed by the peer.
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(Some(1024))
        .handshake::<_, Bytes>(io);
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, connection).await;
    drop(handshaking);
    let mut connection = match handshake {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            tracing::debug!(%error, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => return,
    };
    tokio::pin!(stop);
    let mut stopping = false;
    // Closing for idleness: `idle` then bounds the goodbye.
    let mut closing_idle = false;
    // Open streams, and when the last one ended.
    let active = Arc::new(AtomicUsize::new(0));
    let last_end = Arc::new(Mutex::new(Instant::now()));
    let idle = tokio::time::sleep(settings.idle_timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((request, respond))) => {
                    active.fetch_add(1, Ordering::AcqRel);
                    let stream = handle(Incoming { request, respond });
                    let (active, last_end) = (active.clone(), last_end.clone());
                    tokio::spawn(async move {
                        stream.await;
                        *lock(&last_end) = Instant::now();
                        active.fetch_sub(1, Ordering::AcqRel);
                    });
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "tunnel connection failed");
                    return;
                }
                None => return,
            },
            () = &mut stop, if !stopping => {
                stopping = true;
                connection.graceful_shutdown();
            }
            () = &mut idle, if !stopping || closing_idle => {
                if closing_idle {
                    // A stream opened as the GOAWAY crossed it is left to
                    // end; only a connection with none is dropped.
                    if active.load(Ordering::Acquire) == 0 {
                        tracing::debug!("an idle tunnel connection did not finish closing; dropped");
                        return;
                    }
                    idle.as_mut().reset(Instant::now() + IDLE_CLOSE_GRACE);
                    continue;
                }
                let since = *lock(&last_end);
                let quiet = active.load(Ordering::Acquire) == 0;
                if quiet && since.elapsed() >= settings.idle_timeout {
                    stopping = true;
                    connection.graceful_shutdown();
                    // The GOAWAY ends the connection only once the peer
                    // answers its PING: one that never does would hold it
                    // open for ever.
                    closing_idle = true;
                    idle.as_mut().reset(Instant::now() + IDLE_CLOSE_GRACE);
                } else if quiet {
                    // Quiet since `since`: idle then.
                    idle.as_mut().reset(since + settings.idle_timeout);
                } else {
                    idle.as_mut().reset(Instant::now() + settings.idle_timeout);
                }
            }
        }
    }
}

/// How long a tunnel connection closed for idleness has to finish closing
/// (answer the GOAWAY's PING) before it is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Resolves, with a `TimedOut` error, once `moved` (a count of bytes) has
/// not changed for `timeout`: between one and two timeouts after the last
/// byte, as it looks only once a timeout. Never resolves without one.
pub async fn idle_for(timeout: Option<Duration>, moved: impl Fn() -> u64) -> io::Error {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let mut last = moved();
    loop {
        tokio::time::sleep(timeout).await;
        let now = moved();
        if now == last {
            return io::Error::new(io::ErrorKind::TimedOut, IdleTimeout(timeout));
        }
        last = now;
    }
}

/// Why [`idle_for`] ended a connection: nothing moved for this long.
#[derive(Debug)]
pub struct IdleTimeout(pub Duration);

impl std::fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no byte moved either way for {:?}", self.0)
    }
}

impl std::error::Error for IdleTimeout {}

impl IdleTimeout {
    /// Whether `error` is a connection's idle timeout.
    pub fn is(error: &io::Error) -> bool {
        error.get_ref().is_some_and(|inner| inner.is::<Self>())
    }
}

/// Bytes moved by [`splice`], each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the TCP side into the tunnel.
    pub sent: u64,
    /// From the tunnel to the TCP side.
    pub received: u64,
}

/// Copies between `tcp` and a tunnel stream until both directions have
/// ended (half-closes pass through: the end of one direction is the end of
/// stream, or a write shutdown), `stop` resolves, or nothing moves either
/// way for `idle`. If either side fails, or `stop` or `idle` cuts it, both
/// are reset, never left hanging.
pub async fn splice(
    tcp: &mut TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    stop: impl Future<Output = io::Error>,
    idle: Option<Duration>,
) -> (Transferred, io::Result<()>) {
    // Atomics only to keep the future `Send`: both halves run in this task.
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let (mut reader, mut writer) = tcp.split();
    let up = async {
        let result = pump_up(&mut reader, &mut send, &sent).await;
        match result {
            // The peer answered in full and asked for no more of the
            // request (RFC 9113 §8.1): this direction is over, cleanly.
            Err(_) if reset_without_error(&mut send) => Ok(()),
            result => result,
        }
    };
    let down = async {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(h2_io)?;
            received.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            writer.write_all(&chunk).await?;
            // Window is given back once the application took the bytes:
            // a reader that stops stops its sender, and only it.
            let _ = recv.flow_control().release_capacity(chunk.len());
        }
        writer.shutdown().await
    };
    let result = tokio::select! {
        result = async { tokio::try_join!(up, down).map(|_| ()) } => result,
        error = stop => Err(error),
        error = idle_for(idle, || {
            sent.load(Ordering::Relaxed) + received.load(Ordering::Relaxed)
        }) => Err(error),
    };
    if result.is_err() {
        // The tunnel stream is reset as its halves drop; the application
        // gets a reset too rather than a clean end.
        let _ = tcp.set_zero_linger();
    }
    (
        Transferred {
            sent: sent.load(Ordering::Relaxed),
            received: received.load(Ordering::Relaxed),
        },
        result,
    )
}

/// The TCP side's bytes into the tunnel stream, until the TCP side ends
/// (the stream then ends too) or either fails; counts them in `sent`.
async fn pump_up(
    reader: &mut tokio::net::tcp::ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    sent: &AtomicU64,
) -> io::Result<()> {
    // Each read lands in the spare room of one allocation and goes to
    // the tunnel as it is, not copied: what was read is split off as a
    // frame, and the next read fills the room after it. Once too little
    // is left, the allocation is taken back whole if every frame cut
    // from it has been written out (else a new one is made, never
    // zeroed). The room starts small and doubles whenever a read fills
    // it, so an idle or chatty connection holds kilobytes.
    let mut buffer = BytesMut::with_capacity(FIRST_CHUNK);
    let mut size = FIRST_CHUNK;
    loop {
        if buffer.capacity() < size / 2 {
            buffer.reserve(size);
        }
        let room = buffer.capacity();
        let n = reader.read_buf(&mut buffer).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(());
        }
        let mut chunk = buffer.split().freeze();
        if n == room && size < CHUNK {
            size *= 2;
        }
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let capacity = poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?
                .map_err(h2_io)?;
            let piece = chunk.split_to(capacity.min(chunk.len()));
            sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
            send.send_data(piece, false).map_err(h2_io)?;
        }
    }
}

/// Whether the peer reset the stream with `NO_ERROR`: what a server does
/// once it has sent a complete answer to a request it will not read the
/// rest of.
fn reset_without_error(send: &mut SendStream<Bytes>) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    matches!(
        send.poll_reset(&mut cx),
        std::task::Poll::Ready(Ok(h2::Reason::NO_ERROR))
    )
}

/// A tunnel stream as a byte stream, for protocols spoken over it (the
/// HTTP path's upstream connections). The receive window is given back as
/// the reader takes the bytes.
#[derive(Debug)]
pub struct TunnelIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    pending: Bytes,
    ended: bool,
    /// The client side's hold on its pooled connection.
    _guard: Option<StreamGuard>,
}

impl From<Tunnel> for TunnelIo {
    fn from(tunnel: Tunnel) -> Self {
        Self {
            send: tunnel.send,
            recv: tunnel.recv,
            pending: Bytes::new(),
            ended: false,
            _guard: Some(tunnel.guard),
        }
    }
}

impl TunnelIo {
    /// An accepted stream's halves, at the destination.
    pub fn accepted(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            ended: false,
            _guard: None,
        }
    }
}

impl tokio::io::AsyncRead for TunnelIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        while self.pending.is_empty() && !self.ended {
            match self.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => self.ended = true,
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(h2_io(error))),
                Poll::Ready(Some(Ok(data))) => self.pending = data,
            }
        }
        let n = self.pending.len().min(buf.remaining());
        let taken = self.pending.split_to(n);
        buf.put_slice(&taken);
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            match self.send.poll_capacity(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(h2_io(error))),
                // Granted nothing yet: ask again (registers the waker).
                Poll::Ready(Some(Ok(0))) => continue,
                Poll::Ready(Some(Ok(capacity))) => {
                    let n = capacity.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_io)?;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        // Ending twice (a repeated shutdown) is not an error here.
        let _ = self.send.send_data(Bytes::new(), true);
        std::task::Poll::Ready(Ok(()))
    }
}

fn h2_io(error: h2::Error) -> io::Error {
    if error.is_io() {
        error.into_io().unwrap_or_else(|| io::Error::other("h2"))
    } else {
        io::Error::other(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use mesh_identity::{CertificateAuthority, SpiffeVerifier};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    use tokio::net::TcpListener;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap()
    }

    fn certificate(
        ca: &CertificateAuthority,
        sa: &str,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (issued, key) = ca
            .issue_with_key(&id(sa), time::OffsetDateTime::now_utc())
            .unwrap();
        (
            vec![issued.der],
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
    }

    /// A tunnel server on loopback: streams to port 403 are refused with
    /// 403, those to port 200 answered at once with [`ANSWER`] and no more
    /// read (the stream is reset with `NO_ERROR`, as an HTTP server does
    /// that is done early), every other stream is echoed.
    async fn server(ca: &CertificateAuthority) -> SocketAddr {
        server_with(ca, PoolSettings::default()).await
    }

    async fn server_with(ca: &CertificateAuthority, settings: PoolSettings) -> SocketAddr {
        let (chain, key) = certificate(ca, "server");
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(SpiffeVerifier::new(ca.bundle()).into_client_verifier())
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_tls(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    serve(tls, echo, std::future::pending(), settings, ()).await;
                });
            }
        });
        address
    }

    async fn echo(incoming: Incoming) {
        if incoming.target().map(|t| t.port()) == Ok(403) {
            return incoming.refuse(StatusCode::FORBIDDEN);
        }
        let answer_at_once = incoming.target().map(|t| t.port()) == Ok(200);
        let Ok((mut send, mut recv)) = incoming.accept() else {
            return;
        };
        if answer_at_once {
            let _ = send.send_data(Bytes::from_static(ANSWER), true);
            return;
        }
        while let Some(Ok(chunk)) = recv.data().await {
            let _ = recv.flow_control().release_capacity(chunk.len());
            if send.send_data(chunk, false).is_err() {
                return;
            }
        }
        let _ = send.send_data(Bytes::new(), true);
    }

    struct Client {
        pool: Pool,
        config: Arc<ClientConfig>,
        key: PoolKey,
    }

    /// A client's TLS, expecting the server to be `peer`.
    fn client_config(ca: &CertificateAuthority, peer: &str) -> Arc<ClientConfig> {
        let (chain, key) = certificate(ca, "client");
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(
                SpiffeVerifier::new(ca.bundle())
                    .expecting(id(peer))
                    .into_server_verifier(),
            )
            .with_client_auth_cert(chain, key)
            .unwrap();
        client_tls(config)
    }

    impl Client {
        fn new(ca: &CertificateAuthority, server: SocketAddr, settings: PoolSettings) -> Self {
            Self {
                pool: Pool::new(settings, Arc::default()),
                config: client_config(ca, "server"),
                key: PoolKey {
                    source: "shop/client".into(),
                    destination: id("server"),
                    address: server,
                },
            }
        }

        async fn open(&self, serial: &str, port: u16) -> Result<Tunnel, TunnelError> {
            self.open_with(serial, port, None).await
        }

        async fn open_with(
            &self,
            serial: &str,
            port: u16,
            spare: Option<OwnedSemaphorePermit>,
        ) -> Result<Tunnel, TunnelError> {
            let address = self.key.address;
            self.pool
                .open(
                    &self.key,
                    serial,
                    SocketAddr::from(([10, 0, 0, 1], port)),
                    &new_traceparent(),
                    spare,
                    || TcpStream::connect(address),
                    || Ok(self.config.clone()),
                )
                .await
        }

        fn handshakes(&self) -> u64 {
            self.pool.stats().client_handshakes.load(Ordering::Relaxed)
        }
    }

    fn ca() -> CertificateAuthority {
        CertificateAuthority::generate("cluster.local", time::OffsetDateTime::now_utc()).unwrap()
    }

    #[tokio::test]
    async fn streams_share_a_connection_up_to_the_limit() {
        let ca = ca();
        let server = server(&ca).await;
        let settings = PoolSettings {
            max_streams: 2,
            ..PoolSettings::default()
        };
        let client = Client::new(&ca, server, settings);
        let a = client.open("1", 80).await.unwrap();
        let b = client.open("1", 80).await.unwrap();
        assert!(!a.reused && b.reused);
        assert_eq!(client.handshakes(), 1);
        // A third concurrent stream needs a second connection.
        let c = client.open("1", 80).await.unwrap();
        assert!(!c.reused);
        assert_eq!(client.handshakes(), 2);
        drop((a, b, c));
        for _ in 0..10 {
            drop(client.open("1", 80).await.unwrap());
        }
        assert_eq!(client.handshakes(), 2);
        // A rotated source certificate: new streams, new connection.
        let d = client.open("2", 80).await.unwrap();
        assert!(!d.reused);
        assert_eq!(client.handshakes(), 3);
    }

    #[tokio::test]
    async fn a_new_connection_holds_the_callers_spare_permit() {
        let ca = ca();
        let server = server(&ca).await;
        let client = Client::new(&ca, server, PoolSettings::default());
        let permits = Arc::new(tokio::sync::Semaphore::new(2));
        client.pool.share_permits(permits.clone());
        // An accepted connection took the last two permits: its own and
        // one for an upstream, which the new pooled connection holds.
        let mut first = permits.clone().try_acquire_many_owned(2).unwrap();
        let spare = first.split(1);
        let a = client.open_with("1", 80, spare).await.unwrap();
        assert!(!a.reused);
        assert_eq!(permits.available_permits(), 0);
        // The next one rides that connection and gives its spare back.
        drop(first);
        let spare = permits.clone().try_acquire_owned().ok();
        let b = client.open_with("1", 80, spare).await.unwrap();
        assert!(b.reused);
        assert_eq!(permits.available_permits(), 1);
        // Without a spare, a new connection takes a permit of its own, and
        // is refused when there is none.
        let _last = permits.clone().try_acquire_owned().unwrap();
        let Err(refused) = client.open("2", 80).await else {
            panic!("a connection was opened past the limit");
        };
        assert!(
            matches!(&refused, TunnelError::Connect(_, e) if e.to_string().contains("connection limit")),
            "{refused:?}"
        );
        drop(_last);
        let c = client.open("2", 80).await.unwrap();
        assert!(!c.reused);
        assert_eq!(permits.available_permits(), 0);
        // The connections give theirs back once closed.
        drop((a, b, c));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_after_a_whole_timeout_without_a_byte() {
        let timeout = Duration::from_secs(10);
        let moved = AtomicU64::new(0);
        // A byte every 5 s for 25 s, then silence.
        let talking = async {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                moved.fetch_add(1, Ordering::Relaxed);
            }
            std::future::pending::<()>().await;
        };
        let started = tokio::time::Instant::now();
        let error = tokio::select! {
            error = idle_for(Some(timeout), || moved.load(Ordering::Relaxed)) => error,
            () = talking => unreachable!(),
        };
        let silent_for = started.elapsed() - Duration::from_secs(25);
        assert!(
            silent_for >= timeout && silent_for <= 2 * timeout,
            "{silent_for:?}"
        );
        assert!(IdleTimeout::is(&error), "{error}");
        assert!(!IdleTimeout::is(&io::Error::from(io::ErrorKind::TimedOut)));
        // No timeout: never.
        let never = tokio::time::timeout(Duration::from_secs(86_400), idle_for(None, || 0));
        assert!(never.await.is_err());
    }

    /// A tunnel to `port` of a [`server`] and the application's side of
    /// it: one end of a loopback TCP pair, the other spliced to the tunnel
    /// in a task of its own. The client holds the tunnel's connection.
    async fn spliced_app(
        port: u16,
    ) -> (
        Client,
        TcpStream,
        tokio::task::JoinHandle<(Transferred, io::Result<()>)>,
    ) {
        let ca = ca();
        let server = server(&ca).await;
        let client = Client::new(&ca, server, PoolSettings::default());
        let tunnel = client.open("1", port).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut proxied, _) = listener.accept().await.unwrap();
        let spliced = tokio::spawn(async move {
            let _guard = tunnel.guard;
            splice(
                &mut proxied,
                tunnel.send,
                tunnel.recv,
                std::future::pending(),
                None,
            )
            .await
        });
        (client, app, spliced)
    }

    #[tokio::test]
    async fn bytes_and_half_closes_cross_the_tunnel() {
        let (_client, mut app, spliced) = spliced_app(80).await;
        // No two nearby bytes alike, so a piece out of place shows.
        let message: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        app.write_all(&message).await.unwrap();
        app.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        app.read_to_end(&mut echoed).await.unwrap();
        assert!(
            echoed == message,
            "{} of {} bytes came back",
            echoed.len(),
            message.len()
        );
        let (moved, result) = spliced.await.unwrap();
        result.unwrap();
        assert_eq!(
            moved,
            Transferred {
                sent: 3 << 20,
                received: 3 << 20
            }
        );
    }

    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";

    /// A server may answer in full and reset the stream with `NO_ERROR`
    /// before the client has sent all it had (RFC 9113 §8.1): the client
    /// side gets the whole answer and ends cleanly, not with a reset or an
    /// error in its access log.
    #[tokio::test]
    async fn an_answer_in_full_then_a_reset_without_error_ends_cleanly() {
        let (_client, mut app, spliced) = spliced_app(200).await;
        let mut answer = Vec::new();
        app.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, ANSWER);
        // The application sends the rest of its request after the answer,
        // then ends: the tunnel takes no more, and that is no failure.
        app.write_all(b"the rest").await.unwrap();
        app.shutdown().await.unwrap();
        let (moved, result) = spliced.await.unwrap();
        result.unwrap();
        assert_eq!(moved.received, ANSWER.len() as u64);
    }

    #[tokio::test]
    async fn refusals_carry_the_status_and_idle_connections_close() {
        let ca = ca();
        let server = server(&ca).await;
        let settings = PoolSettings {
            idle_timeout: Duration::from_millis(100),
            ..PoolSettings::default()
        };
        let client = Client::new(&ca, server, settings);
        let refused = client.open("1", 403).await.unwrap_err();
        assert!(refused.denied(), "{refused}");
        let stats = client.pool.stats().clone();
        assert_eq!(stats.pooled_connections.load(Ordering::Relaxed), 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.pooled_connections.load(Ordering::Relaxed) != 0 {
            assert!(Instant::now() < deadline, "the idle connection stayed open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The next stream opens a new connection.
        drop(client.open("1", 80).await.unwrap());
        assert_eq!(client.handshakes(), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_gets_a_goaway_and_is_dropped_if_it_never_answers() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let ca = ca();
        let idle_timeout = Duration::from_millis(300);
        let server = server_with(
            &ca,
            PoolSettings {
                idle_timeout,
                ..PoolSettings::default()
            },
        )
        .await;
        let tcp = TcpStream::connect(server).await.unwrap();
        let name = ServerName::IpAddress(server.ip().into());
        let mut tls = tokio_rustls::TlsConnector::from(client_config(&ca, "server"))
            .connect(name, tcp)
            .await
            .unwrap();
        // The preface and an empty SETTINGS; then nothing, not even the
        // acknowledgement of the server's SETTINGS or of any PING.
        let started = Instant::now();
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut goaway = None;
        let mut head = [0u8; 9];
        while tls.read_exact(&mut head).await.is_ok() {
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; length];
            if tls.read_exact(&mut payload).await.is_err() {
                break;
            }
            // GOAWAY
            if head[3] == 0x7 {
                goaway.get_or_insert(started.elapsed());
            }
        }
        let closed = started.elapsed();
        let goaway = goaway.expect("no GOAWAY");
        assert!(
            goaway >= idle_timeout && goaway < idle_timeout * 3,
            "GOAWAY after {goaway:?}"
        );
        // The grace starts as the GOAWAY leaves; it is read a little later.
        let slack = Duration::from_millis(200);
        assert!(
            closed + slack >= goaway + IDLE_CLOSE_GRACE && closed < goaway + IDLE_CLOSE_GRACE * 2,
            "closed {closed:?}, GOAWAY after {goaway:?}"
        );
    }

    #[tokio::test]
    async fn a_server_with_another_identity_is_refused() {
        let ca = ca();
        let server = server(&ca).await;
        let mut client = Client::new(&ca, server, PoolSettings::default());
        client.key.destination = id("someone-else");
        // The server presents `server`; this client expects someone else.
        client.config = client_config(&ca, "someone-else");
        let error = client.open("1", 80).await.unwrap_err();
        assert!(matches!(error, TunnelError::Tls(..)), "{error}");
        assert_eq!(
            client
                .pool
                .stats()
                .client_handshake_failures
                .load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn traceparents_are_w3c_shaped_and_fresh() {
        let a = new_traceparent();
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1].len(), 32);
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "01");
        assert_ne!(a, new_traceparent());
    }
}
