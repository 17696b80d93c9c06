//! HTTP at the source node: a connection to a service's virtual address on
//! a port declared `http`, `http2` or `grpc` is served request by request
//! (HTTP/1.1, or HTTP/2 with prior knowledge), and each request is routed
//! on its own.
//!
//! Per request, in order: the service's traffic split picks a version
//! (a split for a service the caller serves wins over one for every
//! caller; a header match wins over the weights); the healthy endpoints of
//! that version serving the port are the candidates (none: 503, flag
//! `UH`); the service's circuit breaker admits it or fails it fast (503,
//! `UO`); the service's balancer picks an endpoint; the request goes over
//! the pod's pooled upstream connections (each an HBONE tunnel stream to a
//! mesh workload, plain TCP otherwise). A failed attempt is retried per
//! [`crate::l7::retry`] on another endpoint when there is one, within the
//! service's retry budget, if its body could be kept for replay (at most
//! [`REPLAY_LIMIT`]). The whole exchange up to the response head has the
//! policy's timeout (504, `UT`); a body streamed after it, the node's
//! stream idle timeout between frames. Answers the proxy makes itself carry
//! [`FLAGS_HEADER`], as Envoy's response flags.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full, Limited, combinators::UnsyncBoxBody};
use hyper::body::{Body as _, Incoming};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use mesh_model::{
    service::{LoadBalancer, Protocol},
    split::Version,
};
use serde::Serialize;
use tokio::net::TcpStream;

use super::{
    Direction, Outcome, PodContext, Security, connection_info, dial,
    mesh::{MeshPath, TunnelTarget, open_tunnel},
};
use crate::{
    capture::netns::NetnsThread,
    directory::{Directory, ServiceKey, VirtualService},
    hbone::{self, TunnelIo},
    l7::{
        balance::{self, HashRing, InFlight},
        body::{BodyTally, Counted, Measured},
        breaker::{Breaker, BreakerSettings, Ticket},
        metrics::{Reporter, RequestLabels, RequestMetrics, Sizes},
        ratelimit::TokenBucket,
        retry::{Attempt, BudgetLimits, RetryBudget, RetryPolicy},
        sniff::H2_PREFACE,
        trace,
    },
    spans,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Request bodies up to this size are kept so a failed attempt can be
/// repeated; a larger (or unsized) body goes once.
pub const REPLAY_LIMIT: u64 = 64 << 10;
/// The largest request header section read.
const MAX_HEADER_BYTES: usize = 64 << 10;
/// Idle HTTP connections kept per upstream (a service's endpoint through
/// its tunnel, or the pod's own application).
const POOL_MAX_IDLE_PER_HOST: usize = 1024;
/// Names why the proxy answered a request itself.
pub const FLAGS_HEADER: &str = "x-mesh-flags";

/// Why the proxy answered a request itself (Envoy's response flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Flag {
    /// No healthy endpoint for the chosen version and port.
    NoHealthyUpstream,
    /// The service's circuit is open.
    CircuitOpen,
    /// The policy's timeout passed before the response head came.
    Timeout,
    /// No connection to an endpoint could be made (after retries).
    ConnectFailed,
    /// The upstream's connection ended in the middle of its response.
    UpstreamReset,
    /// The request could not be read.
    BadRequest,
    /// Refused by authorization at the destination.
    Denied,
    /// Over the workload's rate limit.
    RateLimited,
    /// The upstream's response could be read two ways (a request
    /// smuggling shape on the response side).
    UpstreamProtocolError,
}

impl Flag {
    pub const ALL: [Flag; 9] = [
        Flag::NoHealthyUpstream,
        Flag::CircuitOpen,
        Flag::Timeout,
        Flag::ConnectFailed,
        Flag::UpstreamReset,
        Flag::BadRequest,
        Flag::Denied,
        Flag::RateLimited,
        Flag::UpstreamProtocolError,
    ];

    pub const fn code(self) -> &'static str {
        match self {
            Flag::NoHealthyUpstream => "UH",
            Flag::CircuitOpen => "UO",
            Flag::Timeout => "UT",
            Flag::ConnectFailed => "UF",
            Flag::UpstreamReset => "UC",
            Flag::BadRequest => "DPE",
            Flag::Denied => "RBAC",
            Flag::RateLimited => "RL",
            Flag::UpstreamProtocolError => "UPE",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Flag::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Flag::BadRequest => StatusCode::BAD_REQUEST,
            Flag::Denied => StatusCode::FORBIDDEN,
            Flag::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Flag::UpstreamProtocolError => StatusCode::BAD_GATEWAY,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// How long a client may take to send a request head (and how long an
/// HTTP/1.1 connection may idle between requests) unless the node says.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The share of new traces marked sampled unless the node says (Istio's
/// default is 1 %).
pub const DEFAULT_TRACE_SAMPLE_RATIO: f64 = 0.01;

/// A sampled request's span at this proxy, until it ends.
#[derive(Clone, Copy, Debug)]
struct Hop {
    context: trace::SpanContext,
    parent_span_id: Option<u64>,
    start: std::time::SystemTime,
}

/// What serving a request found out, for its metrics, span and record.
#[derive(Debug, Default)]
struct Served {
    /// The endpoint that answered, when one did (at the source).
    endpoint: Option<SocketAddr>,
    /// The request's trace, once its context was read.
    trace_id: Option<u128>,
    /// This proxy's span, when it is sampled and exported.
    hop: Option<Hop>,
}

/// What the HTTP path keeps across configuration changes, node-wide.
#[derive(Debug)]
pub struct HttpState {
    /// See [`DEFAULT_HEADER_TIMEOUT`].
    header_timeout: Duration,
    /// See [`DEFAULT_STREAM_IDLE_TIMEOUT`].
    pub stream_idle_timeout: Duration,
    /// The share of new traces marked sampled (0 to 1); a request's own
    /// decision is kept.
    pub trace_sample_ratio: f64,
    /// Where sampled spans go; none are recorded without it.
    pub spans: Option<Arc<spans::Exporter>>,
    /// Whether each request's access record is logged (target
    /// `mesh_http_access`); switched at run time from the admin endpoint.
    pub access_log: AtomicBool,
    breakers: Mutex<HashMap<ServiceKey, Arc<Breaker>>>,
    budgets: Mutex<HashMap<ServiceKey, Arc<RetryBudget>>>,
    /// Each hashing service's ring, with the endpoints it was built from.
    rings: Mutex<HashMap<(ServiceKey, Option<&'static str>), BuiltRing>>,
    in_flight: InFlight,
    /// Inbound rate limits: (pod, service, caller when per source).
    buckets: Mutex<HashMap<BucketKey, TokenBucket>>,
    pub stats: HttpStats,
}

impl Default for HttpState {
    fn default() -> Self {
        Self::new(DEFAULT_HEADER_TIMEOUT)
    }
}

impl HttpState {
    pub fn new(header_timeout: Duration) -> Self {
        Self {
            header_timeout,
            stream_idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
            trace_sample_ratio: DEFAULT_TRACE_SAMPLE_RATIO,
            spans: None,
            access_log: AtomicBool::new(false),
            breakers: Default::default(),
            budgets: Default::default(),
            rings: Default::default(),
            in_flight: Default::default(),
            buckets: Default::default(),
            stats: Default::default(),
        }
    }
}

type BucketKey = (String, ServiceKey, Option<String>);

type BuiltRing = (Vec<SocketAddr>, Arc<HashRing>);

/// Counters for the node's metrics.
#[derive(Debug, Default)]
pub struct HttpStats {
    pub requests: AtomicU64,
    /// Each request, by source, destination, status and flags, with its
    /// latency (both ends).
    pub by_route: RequestMetrics,
    pub retries: AtomicU64,
    /// Answered by the proxy, by flag.
    pub local: Mutex<HashMap<Flag, u64>>,
}

impl HttpState {
    /// The breaker of `service`, replaced (closed) when its settings change.
    fn breaker(&self, service: &ServiceKey, settings: BreakerSettings) -> Arc<Breaker> {
        let mut breakers = super::lock(&self.breakers);
        match breakers.get(service) {
            Some(breaker) if *breaker.settings() == settings => breaker.clone(),
            _ => {
                let breaker = Arc::new(Breaker::new(settings));
                breakers.insert(service.clone(), breaker.clone());
                breaker
            }
        }
    }

    /// The retry budget of `service` over the last 10 s; changed limits
    /// apply to what it counted already.
    fn budget(&self, service: &ServiceKey, limits: BudgetLimits) -> Arc<RetryBudget> {
        let budget = super::lock(&self.budgets)
            .entry(service.clone())
            .or_insert_with(|| Arc::new(RetryBudget::new(limits, Duration::from_secs(10))))
            .clone();
        budget.set_limits(limits);
        budget
    }

    /// The ring over `endpoints` (one per service and split version).
    fn ring(
        &self,
        service: &ServiceKey,
        version: Option<Version>,
        endpoints: &[SocketAddr],
    ) -> Arc<HashRing> {
        let key = (service.clone(), version.map(Version::as_str));
        let mut rings = super::lock(&self.rings);
        if let Some((list, ring)) = rings.get(&key)
            && list == endpoints
        {
            return ring.clone();
        }
        let ring = Arc::new(HashRing::new(endpoints));
        rings.insert(key, (endpoints.to_vec(), ring.clone()));
        ring
    }

    /// Takes a token from the bucket of `pod`'s `service` (and `source`);
    /// a changed limit starts a full bucket.
    fn take_token(
        &self,
        pod: &str,
        service: &ServiceKey,
        source: Option<String>,
        limit: mesh_model::policy::RateLimit,
    ) -> bool {
        let mut buckets = super::lock(&self.buckets);
        let bucket = buckets
            .entry((pod.to_owned(), service.clone(), source))
            .or_insert_with(|| TokenBucket::new(limit));
        if bucket.limit() != limit {
            *bucket = TokenBucket::new(limit);
        }
        bucket.try_take()
    }

    /// With spans exported (`--trace-endpoint`), carries the trace of a
    /// request with `headers` on from a span of this proxy's own (see
    /// [`crate::l7::trace`]), kept in `served` when it is sampled. Without,
    /// the headers go on untouched, so applications' own tracing sees its
    /// own spans as parents; the request's trace id, when it came with
    /// one, is kept for its record either way.
    fn continue_trace(&self, headers: &mut HeaderMap, served: &mut Served) {
        let incoming = trace::extract(headers);
        if self.spans.is_none() {
            served.trace_id = incoming
                .and_then(|i| i.parent)
                .map(|(trace_id, _)| trace_id);
            return;
        }
        let span = trace::continue_trace(
            incoming.as_ref(),
            self.trace_sample_ratio,
            fastrand::f64(),
            || fastrand::u64(..),
        );
        trace::inject(headers, span, incoming.as_ref());
        served.trace_id = Some(span.trace_id);
        served.hop = span.sampled.then(|| Hop {
            context: span,
            parent_span_id: incoming.and_then(|i| i.parent).map(|(_, span_id)| span_id),
            start: std::time::SystemTime::now(),
        });
    }

    /// Exports the span of `hop`, ended now with `response`.
    fn record_span(
        &self,
        hop: Hop,
        kind: spans::Kind,
        name: String,
        response: &Response<Body>,
        mut attributes: Vec<(&'static str, spans::Value)>,
    ) {
        let Some(exporter) = &self.spans else {
            return;
        };
        let flags = flags_of(response);
        attributes.push((
            "http.response.status_code",
            spans::Value::Int(response.status().as_u16().into()),
        ));
        attributes.push(("mesh.response_flags", spans::Value::Text(flags.into())));
        exporter.record(spans::Span {
            context: hop.context,
            parent_span_id: hop.parent_span_id,
            kind,
            name,
            start: hop.start,
            end: std::time::SystemTime::now(),
            attributes,
            error: response.status().is_server_error() || flags != "-",
        });
    }

    fn answered(&self, flag: Flag) {
        *super::lock(&self.stats.local).entry(flag).or_default() += 1;
    }
}

/// A pod's upstream clients (HTTP/1.1 and HTTP/2), pooling connections per
/// endpoint.
#[derive(Debug)]
pub(super) struct Clients {
    http1: Client<Connector, Body>,
    http2: Client<Connector, Body>,
    /// To the pod's own application, for requests tunnelled to it.
    app_http1: Client<Connector, Body>,
    app_http2: Client<Connector, Body>,
}

impl Clients {
    pub(super) fn new(pod: &PodContext, mesh: &Arc<MeshPath>) -> Self {
        let connector = Connector {
            pod: pod.name.clone(),
            netns: pod.netns.clone(),
            mesh: mesh.clone(),
            local: false,
            permits: pod.permits.clone(),
        };
        let app = Connector {
            local: true,
            ..connector.clone()
        };
        let mut builder = Client::builder(TokioExecutor::new());
        // The timer lets idle connections close (and free the tunnel
        // streams and destination permits they hold). A destination node
        // closes an HTTP/1.1 connection idle for its header timeout: give
        // ours up well before, so a request is never sent on a connection
        // the other end is closing. The idle cap must sit above any steady
        // concurrency to one upstream: a connection returned to a full pool
        // is closed, so 64 requests at a time against a cap of 32 opened
        // and closed a connection per request, and the TIME_WAIT sockets
        // they left made every connect() slower (rps fell 20-fold in a
        // minute). The idle timeout, not the cap, frees them after a burst.
        builder
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(mesh.http.header_timeout / 2)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST);
        let http1 = builder.build(connector.clone());
        let app_http1 = builder.build(app.clone());
        builder.http2_only(true);
        Self {
            http1,
            http2: builder.build(connector),
            app_http1,
            app_http2: builder.build(app),
        }
    }

    fn outbound(&self, protocol: Protocol) -> &Client<Connector, Body> {
        match protocol {
            Protocol::Http2 | Protocol::Grpc => &self.http2,
            Protocol::Http | Protocol::Tcp | Protocol::Auto => &self.http1,
        }
    }

    fn app(&self, protocol: Protocol) -> &Client<Connector, Body> {
        match protocol {
            Protocol::Http2 | Protocol::Grpc => &self.app_http2,
            Protocol::Http | Protocol::Tcp | Protocol::Auto => &self.app_http1,
        }
    }
}

/// Opens upstream connections from inside the pod: a tunnel stream to a
/// mesh workload, plain TCP to anything else (and always to the pod's own
/// application when `local`).
#[derive(Clone, Debug)]
struct Connector {
    pod: String,
    netns: NetnsThread,
    mesh: Arc<MeshPath>,
    local: bool,
    /// The node's descriptors: a plain connection holds one.
    permits: Arc<tokio::sync::Semaphore>,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Upstream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move {
            let address: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| io::Error::other(format!("{uri} names no endpoint address")))?;
            let directory = connector.mesh.directory.borrow().clone();
            let tunnelled = if connector.local {
                None
            } else {
                directory.mesh_destination(address.ip())
            };
            let upstream = match tunnelled {
                Some(workload) => {
                    let target = TunnelTarget {
                        address,
                        identity: directory.identity(workload),
                        name: format!("{}/{}", workload.namespace, workload.name),
                    };
                    let trace = hbone::new_traceparent();
                    let tunnel = open_tunnel(
                        &connector.pod,
                        &connector.netns,
                        &connector.mesh,
                        &target,
                        &trace,
                        // A new pooled connection takes a permit of its own.
                        None,
                    )
                    .await
                    // `refused_by_policy` finds the tunnel error inside.
                    .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e))?;
                    Upstream::Tunnel(TunnelIo::from(tunnel))
                }
                None => {
                    let permit = connector
                        .permits
                        .clone()
                        .try_acquire_owned()
                        .map_err(|_| io::Error::other("the node is at its connection limit"))?;
                    Upstream::Plain(dial(&connector.netns, address).await?, permit)
                }
            };
            Ok(TokioIo::new(upstream))
        })
    }
}

/// An upstream connection.
#[derive(Debug)]
enum Upstream {
    Tunnel(TunnelIo),
    /// With the descriptor permit it holds while open.
    Plain(
        TcpStream,
        #[allow(dead_code)] tokio::sync::OwnedSemaphorePermit,
    ),
}

impl Connection for Upstream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl tokio::io::AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tunnel(io) => Pin::new(io).poll_read(cx, buf),
            Upstream::Plain(io, _) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tunnel(io) => Pin::new(io).poll_write(cx, buf),
            Upstream::Plain(io, _) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tunnel(io) => Pin::new(io).poll_flush(cx),
            Upstream::Plain(io, _) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tunnel(io) => Pin::new(io).poll_shutdown(cx),
            Upstream::Plain(io, _) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// What every request of one downstream connection shares.
struct Route {
    pod: Arc<PodContext>,
    mesh: Arc<MeshPath>,
    service: Arc<VirtualService>,
    /// The service port the client connected to.
    port: u16,
    protocol: Protocol,
    handoffs: Handoffs,
}

/// How long a client of a port that declares no protocol has to send the
/// bytes that tell whether it speaks HTTP before it is carried as TCP: a
/// server-first protocol (the client waits for a greeting) waits this out
/// once per connection.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(100);

/// Whether the client of `stream` speaks HTTP, from its first bytes
/// (peeked, not consumed): the protocol to route it with, or `None` to
/// carry it as TCP (not HTTP, silent past [`DETECT_TIMEOUT`], or gone).
pub(super) async fn detect(stream: &TcpStream) -> Option<Protocol> {
    use crate::l7::sniff::{NEEDED, Sniffed, sniff};
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let decided = peek_until(stream, deadline, NEEDED, |first| match sniff(first) {
        Sniffed::Http1 => Some(Some(Protocol::Http)),
        Sniffed::Http2 => Some(Some(Protocol::Http2)),
        Sniffed::Other => Some(None),
        Sniffed::NeedMore => None,
    })
    .await;
    decided.ok().flatten().flatten()
}

/// Peeks at the first bytes of `stream` (at most `most`) until `decide`
/// makes up its mind: `Ok(None)` when the client closed first, `TimedOut`
/// past `deadline`. A peek returns at once while the same bytes wait, so
/// between peeks it sleeps, from 1 ms doubling to 32 ms: a client that
/// stalls mid-way costs a few wake-ups, not a busy loop.
async fn peek_until<T>(
    stream: &TcpStream,
    deadline: tokio::time::Instant,
    most: usize,
    mut decide: impl FnMut(&[u8]) -> Option<T>,
) -> io::Result<Option<T>> {
    let mut first = vec![0; most];
    let mut pause = Duration::from_millis(1);
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        if peeked == 0 {
            return Ok(None);
        }
        if let Some(decided) = decide(&first[..peeked]) {
            return Ok(Some(decided));
        }
        if tokio::time::Instant::now() + pause >= deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(32));
    }
}

/// Serves a captured connection to `original_dst` (a port of `service`
/// declared `protocol`) request by request.
pub(super) async fn serve(
    stream: TcpStream,
    client: SocketAddr,
    original_dst: SocketAddr,
    service: Arc<VirtualService>,
    protocol: Protocol,
    pod: &Arc<PodContext>,
    mesh: &Arc<MeshPath>,
) {
    pod.connections
        .count(&pod.name, Direction::Outbound, Outcome::Relayed);
    let open = pod.connections.register(connection_info(
        pod,
        Direction::Outbound,
        Some(format!("{}/{}", service.key.0, service.key.1)),
        Security::Http,
        client,
        original_dst,
    ));
    let handoffs = Handoffs::new(pod.tcp_idle_timeout);
    let route = Arc::new(Route {
        pod: pod.clone(),
        mesh: mesh.clone(),
        service,
        port: original_dst.port(),
        protocol,
        handoffs: handoffs.clone(),
    });
    let handler = hyper::service::service_fn(move |request| {
        let route = route.clone();
        async move { Ok::<_, Infallible>(handle(&route, request).await) }
    });
    // hyper's header timeout runs once it knows the protocol, which it
    // learns from up to 24 first bytes (the HTTP/2 preface or not): a
    // client that sends none, or stops inside the preface, is cut off
    // here instead.
    let header_timeout = mesh.http.header_timeout;
    let deadline = tokio::time::Instant::now() + header_timeout;
    let known = peek_until(&stream, deadline, H2_PREFACE.len(), |first| {
        let n = first.len();
        (n == H2_PREFACE.len() || first != &H2_PREFACE[..n]).then_some(())
    });
    let tally = Arc::new(IoTally::default());
    let result = match known.await {
        Err(error) if error.kind() == io::ErrorKind::TimedOut => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no request within {header_timeout:?}"),
        )),
        Err(error) => Err(error),
        Ok(_) => server(header_timeout)
            .serve_connection_with_upgrades(
                TokioIo::new(Tallied::new(stream, tally.clone())),
                handler,
            )
            .await
            .map_err(io::Error::other),
    };
    // Upgraded connections are this connection's until they close.
    let result = match result {
        Ok(()) => handoffs.finish().await.map(drop),
        Err(error) => Err(error),
    };
    if let Err(error) = &result {
        tracing::debug!(pod = %pod.name, %client, %error, "HTTP connection ended with an error");
    }
    // Sent on: what the client sent; received: what it was answered.
    open.finish(tally.read(), tally.written(), None, &result);
}

/// Bytes read from and written to one connection.
#[derive(Debug, Default)]
pub(super) struct IoTally {
    read: AtomicU64,
    written: AtomicU64,
}

impl IoTally {
    pub(super) fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    pub(super) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// A connection served as HTTP, counting the bytes each way for its
/// record: requests, responses and what an upgraded connection carries
/// (hyper hands the same connection over).
struct Tallied<IO> {
    io: IO,
    tally: Arc<IoTally>,
}

impl<IO> Tallied<IO> {
    fn new(io: IO, tally: Arc<IoTally>) -> Self {
        Self { io, tally }
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tallied<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = (buf.filled().len() - before) as u64;
            self.tally.read.fetch_add(read, Ordering::Relaxed);
        }
        polled
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tallied<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = polled {
            self.tally
                .written
                .fetch_add(written as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(written)) = polled {
            self.tally
                .written
                .fetch_add(written as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves the requests of a tunnel stream to `target` (the pod's own port
/// `target.port()`, declared `protocol`) one by one: each is authorized
/// with its method and normalised path under the policies of the moment
/// (403 `RBAC` when refused, 400 for a path that cannot be normalised) and
/// sent on to the application over the pod's own connections to it.
/// `tally` counts the bytes the stream carries each way, upgraded
/// connections' included, however it ends.
pub(super) async fn serve_inbound(
    stream: TunnelIo,
    tally: Arc<IoTally>,
    caller: Arc<mesh_identity::SpiffeId>,
    target: SocketAddr,
    service: (ServiceKey, Protocol),
    pod: &Arc<PodContext>,
    mesh: &Arc<MeshPath>,
) -> io::Result<()> {
    let handoffs = Handoffs::new(pod.tcp_idle_timeout);
    let inbound = Arc::new(Inbound {
        pod: pod.clone(),
        mesh: mesh.clone(),
        caller,
        target,
        service: service.0,
        protocol: service.1,
        handoffs: handoffs.clone(),
    });
    let handler = hyper::service::service_fn(move |request| {
        let inbound = inbound.clone();
        async move {
            let started = std::time::Instant::now();
            let access = Access::start(access_logged(&inbound.mesh, &inbound.pod.name), &request);
            let received = Arc::new(BodyTally::default());
            let request = request.map(|body| Counted::new(body, received.clone()));
            let mut served = Served::default();
            let response = authorize_and_send(&inbound, request, &received, &mut served).await;
            let labels = destination_labels(&inbound, &response);
            let state = &inbound.mesh.http;
            if let Some(hop) = served.hop {
                let attributes = vec![
                    (
                        "mesh.source_principal",
                        spans::Value::Text(inbound.caller.to_string()),
                    ),
                    (
                        "mesh.destination_workload",
                        spans::Value::Text(inbound.pod.name.clone()),
                    ),
                ];
                let name = format!("{}:{}/*", labels.destination_service, inbound.target.port());
                state.record_span(hop, spans::Kind::Server, name, &response, attributes);
            }
            let sizes = state.stats.by_route.record(labels, started.elapsed());
            let access = access.map(|access| {
                let caller = inbound.caller.to_string();
                let pod = inbound.pod.name.clone();
                access.answered(pod, Direction::Inbound, caller, &response, served.trace_id)
            });
            Ok::<_, Infallible>(measured(response, received, sizes, access))
        }
    });
    inbound_server(mesh.http.header_timeout)
        .serve_connection_with_upgrades(TokioIo::new(Tallied::new(stream, tally)), handler)
        .await
        .map_err(io::Error::other)?;
    // Upgraded connections are this stream's until they close: cut with
    // it when a policy change no longer allows the caller.
    handoffs.finish().await.map(drop)
}

/// The series a request that reached `inbound`'s pod counts in.
fn destination_labels(inbound: &Inbound, response: &Response<Body>) -> RequestLabels {
    let directory = inbound.mesh.directory.borrow().clone();
    let (namespace, name) = &inbound.service;
    let (pod_namespace, pod_name) = workload_of(&inbound.pod.name);
    let version = directory
        .local(&inbound.pod.name)
        .map(|local| local.workload.spec.version.clone());
    RequestLabels {
        reporter: Reporter::Destination,
        // The caller is known by its certificate, not by its workload.
        source_workload: UNKNOWN.into(),
        source_workload_namespace: inbound.caller.namespace.clone(),
        source_principal: inbound.caller.to_string(),
        destination_workload: pod_name.to_owned(),
        destination_workload_namespace: pod_namespace.to_owned(),
        destination_service: format!("{name}.{namespace}"),
        destination_version: version.unwrap_or_else(|| UNKNOWN.into()),
        response_code: response.status().as_u16(),
        response_flags: flags_of(response),
    }
}

/// What every request of one inbound tunnel stream shares.
struct Inbound {
    pod: Arc<PodContext>,
    mesh: Arc<MeshPath>,
    caller: Arc<mesh_identity::SpiffeId>,
    target: SocketAddr,
    /// The service whose port this is (its policy holds the rate limit).
    service: ServiceKey,
    protocol: Protocol,
    handoffs: Handoffs,
}

/// `served`: the request's trace and this proxy's span, once it is
/// authorized.
async fn authorize_and_send(
    inbound: &Inbound,
    mut request: Request<Counted<Incoming>>,
    request_body: &BodyTally,
    served: &mut Served,
) -> Response<Body> {
    let Inbound {
        pod,
        mesh,
        caller,
        target,
        service,
        protocol,
        handoffs,
    } = inbound;
    let (target, protocol) = (*target, *protocol);
    let state = &mesh.http;
    // This proxy's span, also for a request it refuses.
    state.continue_trace(request.headers_mut(), served);
    if let Err(why) = unambiguous_framing(request.headers()) {
        return local(state, Flag::BadRequest, why);
    }
    let path = match crate::l7::path::normalize(request.uri().path()) {
        Ok(path) => path,
        Err(error) => return local(state, Flag::BadRequest, &error.to_string()),
    };
    let directory = mesh.directory.borrow().clone();
    let decision = directory.authorize(
        &pod.name,
        &crate::policy::Request {
            caller: Some(caller),
            port: target.port(),
            http: crate::policy::Http::Request(crate::policy::HttpRequest {
                method: request.method().as_str(),
                path: &path,
            }),
        },
    );
    if !decision.allowed() {
        tracing::info!(pod = %pod.name, %caller, method = %request.method(), path, reason = %decision.reason(), "request refused");
        return local(state, Flag::Denied, &decision.reason());
    }
    if let Some(limit) = directory.service_policy(service).rate_limit {
        let source = limit.per_source.then(|| caller.to_string());
        if !state.take_token(&pod.name, service, source, limit) {
            return local(
                state,
                Flag::RateLimited,
                &format!("over {} requests a second", limit.requests_per_second),
            );
        }
    }
    let upgrade = Upgrade::take(&mut request, protocol);
    let (parts, body) = request.into_parts();
    // The application gets the path that was authorized.
    let query = parts.uri.query().map_or(String::new(), |q| format!("?{q}"));
    let uri: Uri = match format!("http://{target}{path}{query}").parse() {
        Ok(uri) => uri,
        Err(error) => return local(state, Flag::BadRequest, &error.to_string()),
    };
    let mut upstream = Request::new(body.map_err(BoxError::from).boxed_unsync());
    let head_only = parts.method == http::Method::HEAD;
    *upstream.method_mut() = parts.method;
    *upstream.uri_mut() = uri;
    *upstream.headers_mut() = forwarded_headers(&parts.headers);
    if let Some(upgrade) = &upgrade {
        upgrade.ask(upstream.headers_mut());
    }
    if matches!(protocol, Protocol::Http2 | Protocol::Grpc) {
        *upstream.version_mut() = http::Version::HTTP_2;
    }
    match pod.http_clients(mesh).app(protocol).request(upstream).await {
        Ok(response) => {
            let response = match onward_response(response, head_only) {
                Ok(response) => response,
                Err(why) => {
                    tracing::info!(pod = %pod.name, why, "refused the application's response");
                    return local(
                        state,
                        Flag::UpstreamProtocolError,
                        &format!("the application's response: {why}"),
                    );
                }
            };
            let mut response = response.map(|body| body.map_err(BoxError::from).boxed_unsync());
            // Only this node says why it answered itself.
            response.headers_mut().remove(FLAGS_HEADER);
            if let Some(upgrade) = upgrade {
                upgrade.splice(&mut response, handoffs);
            }
            response
        }
        Err(error) => {
            let why = super::error_chain(&error);
            // A body that does not parse (a bad chunk size) or a caller
            // gone mid-body is the caller's doing, as at the source.
            if request_body.failed() {
                return local(
                    state,
                    Flag::BadRequest,
                    &format!("reading the request body: {why}"),
                );
            }
            let flag = if unreadable_response(&error) {
                Flag::UpstreamProtocolError
            } else {
                Flag::ConnectFailed
            };
            local(state, flag, &format!("the application: {why}"))
        }
    }
}

/// Whether an exchange failed because the upstream's response head could
/// not be parsed (two different lengths, obs-fold, a bad status line):
/// the upstream's fault, but no connection failure.
fn unreadable_response(error: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
            return hyper.is_parse() || hyper.is_parse_status();
        }
        source = cause.source();
    }
    false
}

/// The most streams an HTTP/2 client may have open on one connection.
const MAX_STREAMS_PER_CONNECTION: usize = 200;

/// How both ends serve HTTP: header sections past 64 KiB or 100 fields
/// get 431 (Envoy's defaults are 60 KiB and 100). An HTTP/1.1 request
/// head must arrive within `header_timeout` of the connection (or its
/// previous response) being ready for it, so a slow or idle client cannot
/// hold a connection. HTTP/2 connections are pinged when idle; a client
/// that resets more than 20 streams before they are served (rapid reset)
/// or whose own streams keep failing (1,024 errors), or that sends more
/// CONTINUATION frames than the header list size needs, gets GOAWAY
/// ENHANCE_YOUR_CALM (h2's limits, set here so they cannot drift).
fn server(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut server = auto::Builder::new(TokioExecutor::new());
    server
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    server
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION as u32)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    server
}

/// [`server`] for requests a mesh peer tunnels in: it relays many
/// clients' requests on one connection, and cancels in one burst those of
/// a client that went away, before this side may have taken them up. The
/// limit on such streams is the connection's stream limit rather than
/// h2's 20, which stops an application's rapid reset.
fn inbound_server(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut server = server(header_timeout);
    server
        .http2()
        .max_pending_accept_reset_streams(MAX_STREAMS_PER_CONNECTION);
    server
}

/// An answer the proxy makes itself.
fn local(state: &HttpState, flag: Flag, detail: &str) -> Response<Body> {
    state.answered(flag);
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{detail}\n")))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = flag.status();
    response
        .headers_mut()
        .insert(FLAGS_HEADER, HeaderValue::from_static(flag.code()));
    response
}

async fn handle(route: &Route, request: Request<Incoming>) -> Response<Body> {
    let started = std::time::Instant::now();
    let access = Access::start(access_logged(&route.mesh, &route.pod.name), &request);
    let received = Arc::new(BodyTally::default());
    let request = request.map(|body| Counted::new(body, received.clone()));
    let mut served = Served::default();
    let response = route_request(route, request, &mut served, &received).await;
    let labels = source_labels(route, served.endpoint, &response);
    let state = &route.mesh.http;
    if let Some(hop) = served.hop {
        let mut attributes = vec![
            (
                "mesh.source_workload",
                spans::Value::Text(route.pod.name.clone()),
            ),
            (
                "mesh.destination_service",
                spans::Value::Text(labels.destination_service.clone()),
            ),
        ];
        if let Some(endpoint) = served.endpoint {
            attributes.push(("server.address", spans::Value::Text(endpoint.to_string())));
        }
        let name = format!("{}:{}/*", labels.destination_service, route.port);
        state.record_span(hop, spans::Kind::Client, name, &response, attributes);
    }
    let sizes = state.stats.by_route.record(labels, started.elapsed());
    let access = access.map(|access| {
        let (namespace, name) = &route.service.key;
        access.answered(
            route.pod.name.clone(),
            Direction::Outbound,
            format!("{namespace}/{name}"),
            &response,
            served.trace_id,
        )
    });
    measured(response, received, sizes, access)
}

/// `response`, its body counted: once the exchange is over (the body
/// sent whole, or abandoned), the request's and the response's body sizes
/// go to the request's series, and its access record is logged with them.
fn measured(
    response: Response<Body>,
    received: Arc<BodyTally>,
    sizes: Option<Sizes>,
    access: Option<Answered>,
) -> Response<Body> {
    if sizes.is_none() && access.is_none() {
        return response;
    }
    response.map(|body| {
        Measured::new(body, move |sent| {
            let received = received.bytes();
            if let Some(sizes) = sizes {
                sizes.record(received, sent);
            }
            if let Some(access) = access {
                access.log(received, sent);
            }
        })
        .boxed_unsync()
    })
}

/// The series a request routed from `route`'s pod counts in: the
/// destination is the endpoint that answered, when one did.
fn source_labels(
    route: &Route,
    endpoint: Option<SocketAddr>,
    response: &Response<Body>,
) -> RequestLabels {
    let directory = route.mesh.directory.borrow().clone();
    let (namespace, name) = &route.service.key;
    let source = route
        .pod
        .addresses
        .first()
        .and_then(|ip| directory.workload_at(*ip));
    let destination = endpoint.and_then(|e| directory.workload_at(e.ip()));
    let version = endpoint.and_then(|e| {
        directory
            .endpoints_of(&route.service.key)?
            .iter()
            .find(|entry| entry.ip == e.ip() && entry.port == e.port())?
            .version
            .clone()
    });
    let (source_namespace, source_name) = workload_of(&route.pod.name);
    RequestLabels {
        reporter: Reporter::Source,
        source_workload: source_name.to_owned(),
        source_workload_namespace: source_namespace.to_owned(),
        source_principal: source.map_or(UNKNOWN.into(), |a| directory.identity(a).to_string()),
        destination_workload: destination.map_or(UNKNOWN.into(), |a| a.name.clone()),
        destination_workload_namespace: destination.map_or(UNKNOWN.into(), |a| a.namespace.clone()),
        destination_service: format!("{name}.{namespace}"),
        destination_version: version.unwrap_or_else(|| UNKNOWN.into()),
        response_code: response.status().as_u16(),
        response_flags: flags_of(response),
    }
}

/// A label value nothing is known of.
const UNKNOWN: &str = "unknown";

/// `namespace/name` as (namespace, name).
fn workload_of(pod: &str) -> (&str, &str) {
    pod.split_once('/').unwrap_or((UNKNOWN, pod))
}

/// The response flag `response` carries, as a label (`-`: none).
fn flags_of(response: &Response<Body>) -> &'static str {
    let Some(value) = response.headers().get(FLAGS_HEADER) else {
        return "-";
    };
    Flag::ALL
        .iter()
        .map(|flag| flag.code())
        .find(|code| value == *code)
        .unwrap_or("-")
}

/// One request's access record, logged when its exchange ends (see
/// [`measured`]).
struct Access {
    method: http::Method,
    authority: String,
    path: String,
    started: std::time::Instant,
}

/// The longest path an access record keeps.
const LOGGED_PATH: usize = 256;

/// Whether `pod`'s requests are logged: the node logs every pod's, or
/// the pod's workload (or its namespace) asks with `mesh.io/access-log`.
fn access_logged(mesh: &MeshPath, pod: &str) -> bool {
    mesh.http.access_log.load(Ordering::Relaxed)
        || mesh
            .directory
            .borrow()
            .local(pod)
            .is_some_and(|local| local.access_log)
}

impl Access {
    /// The record of `request`, if it is `logged`.
    fn start<B>(logged: bool, request: &Request<B>) -> Option<Self> {
        if !logged {
            return None;
        }
        let authority = match request.uri().authority() {
            Some(authority) => authority.as_str(),
            None => request
                .headers()
                .get(header::HOST)
                .and_then(|host| host.to_str().ok())
                .unwrap_or(""),
        };
        Some(Self {
            method: request.method().clone(),
            authority: clipped(authority, LOGGED_PATH).to_owned(),
            path: clipped(request.uri().path(), LOGGED_PATH).to_owned(),
            started: std::time::Instant::now(),
        })
    }

    /// The record, once `response`'s head is ready, to be logged when
    /// the exchange ends. `peer`: the service called (outbound) or the
    /// caller (inbound).
    fn answered(
        self,
        pod: String,
        direction: Direction,
        peer: String,
        response: &Response<Body>,
        trace_id: Option<u128>,
    ) -> Answered {
        Answered {
            request: self,
            pod,
            direction,
            peer,
            status: response.status().as_u16(),
            flags: flags_of(response),
            trace_id,
        }
    }
}

/// An access record with its answer, waiting for the exchange to end.
struct Answered {
    request: Access,
    pod: String,
    direction: Direction,
    peer: String,
    status: u16,
    flags: &'static str,
    trace_id: Option<u128>,
}

impl Answered {
    /// Logs the record, with the body bytes `received` from the client and
    /// `sent` back to it.
    fn log(self, received: u64, sent: u64) {
        let trace_id = self
            .trace_id
            .map_or(String::new(), |id| format!("{id:032x}"));
        tracing::info!(
            target: "mesh_http_access",
            pod = %self.pod,
            direction = self.direction.name(),
            peer = self.peer,
            method = %self.request.method,
            authority = self.request.authority,
            path = self.request.path,
            status = self.status,
            flags = self.flags,
            trace_id,
            request_bytes = received,
            response_bytes = sent,
            duration_ms = self.request.started.elapsed().as_millis() as u64,
            "request"
        );
    }
}

/// `text` cut to at most `most` bytes, at a character boundary (hyper
/// lets UTF-8 through in a path).
fn clipped(text: &str, most: usize) -> &str {
    let mut end = text.len().min(most);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Routes one request of a captured connection to a service.
/// `served`: what routing found out, for the request's metrics and span;
/// `tally`: what reading the request's body saw.
async fn route_request(
    route: &Route,
    mut request: Request<Counted<Incoming>>,
    served: &mut Served,
    tally: &Arc<BodyTally>,
) -> Response<Body> {
    let mesh = &route.mesh;
    let state = &mesh.http;
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    // The trace goes on from this proxy's span, also for an answer the
    // proxy gives itself.
    state.continue_trace(request.headers_mut(), served);
    if let Err(why) = unambiguous_framing(request.headers()) {
        return local(state, Flag::BadRequest, why);
    }
    let upgrade = Upgrade::take(&mut request, route.protocol);
    let key = &route.service.key;
    // Endpoints, policy and splits of a service of another namespace come
    // on demand.
    let directory = match mesh.service_config(key).await {
        Ok(directory) => directory,
        Err(why) => return local(state, Flag::NoHealthyUpstream, &why),
    };
    let policy = directory.service_policy(key);
    let timeout = Duration::from_millis(policy.timeout_ms.max(1) as u64);

    // The body first, within the timeout: a client that cannot send it is
    // no verdict on the service.
    let (mut parts, body) = request.into_parts();
    let replay = match body.size_hint().upper() {
        Some(size) if size <= REPLAY_LIMIT => {
            let read = Limited::new(body, REPLAY_LIMIT as usize).collect();
            match tokio::time::timeout(timeout, read).await {
                Ok(Ok(collected)) => Replay::Kept(collected.to_bytes()),
                Ok(Err(error)) => {
                    return local(
                        state,
                        Flag::BadRequest,
                        &format!("reading the request: {error}"),
                    );
                }
                Err(_) => {
                    return local(
                        state,
                        Flag::Timeout,
                        "the request body did not arrive in time",
                    );
                }
            }
        }
        _ => Replay::Once(Some(body)),
    };
    // HTTP/2 carries the host in the authority; an HTTP/1.1 upstream
    // needs it as a header.
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, host);
    }

    let split = directory.split_for(key, directory.local(&route.pod.name));
    let version = split.map(|split| {
        let total = split.rule.total_weight();
        let roll = if total == 0 {
            0
        } else {
            fastrand::u32(1..=total)
        };
        split.rule.choose(
            |name| parts.headers.get(name).and_then(|v| v.to_str().ok()),
            roll,
        )
    });
    let candidates = candidates(&directory, &route.service, route.port, version);
    if candidates.is_empty() {
        let which = version.map_or(String::new(), |v| format!(" of version {}", v.as_str()));
        return local(
            state,
            Flag::NoHealthyUpstream,
            &format!("no healthy endpoint{which} serves port {}", route.port),
        );
    }
    let breaker = state.breaker(key, BreakerSettings::from_policy(&policy));
    let Some(ticket) = breaker.admit() else {
        return local(state, Flag::CircuitOpen, "the service's circuit is open");
    };

    let retry = RetryPolicy::from_policy(&policy);
    let budget = state.budget(
        key,
        BudgetLimits::from(&policy.retry.clone().unwrap_or_default()),
    );
    budget.request();
    let exchange = Exchange {
        version,
        route,
        state,
        parts: &parts,
        candidates: &candidates,
        retry: &retry,
        budget: &budget,
        upgrade: upgrade.as_ref(),
        request_body: tally,
    };
    let exchanged = guarded(&breaker, ticket, timeout, async {
        let (response, answered) = exchange.run(replay).await?;
        served.endpoint = Some(answered);
        let head_only = parts.method == http::Method::HEAD;
        let response = onward_response(response, head_only).map_err(|why| {
            tracing::info!(pod = %route.pod.name, endpoint = %answered, why, "refused an upstream's response");
            (
                Flag::UpstreamProtocolError,
                format!("{answered}'s response: {why}"),
            )
        })?;
        whole_if_small(response, state.stream_idle_timeout, tally)
            .await
            .map_err(|e| (Flag::UpstreamReset, e))
    });
    match exchanged.await {
        Err((flag, detail)) => local(state, flag, &detail),
        Ok(mut response) => {
            if let Some(upgrade) = upgrade {
                upgrade.splice(&mut response, &route.handoffs);
            }
            response
        }
    }
}

/// Runs `exchange` (the attempts up to a response head) within `timeout`,
/// and tells `breaker` how it went: a timeout, an error or a 5xx response
/// is a failure; a refusal by the destination's policy, or a request body
/// that could not be read, is not counted.
async fn guarded(
    breaker: &Breaker,
    ticket: Ticket,
    timeout: Duration,
    exchange: impl Future<Output = Result<Response<Body>, (Flag, String)>>,
) -> Result<Response<Body>, (Flag, String)> {
    let outcome = tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err((
                Flag::Timeout,
                format!("no response within {} ms", timeout.as_millis()),
            ))
        });
    match &outcome {
        // A refusal by the destination's policy, or a client's body that
        // could not be read, says nothing of the upstream's health: not
        // counted (a probe's slot is given back).
        Err((Flag::Denied | Flag::BadRequest, _)) => drop(ticket),
        Ok(response) => breaker.record(ticket, !response.status().is_server_error()),
        Err(_) => breaker.record(ticket, false),
    }
    outcome
}

/// Whether an upstream attempt failed because the destination's
/// authorization refused the tunnel: the connector's error (the first
/// `io::Error` in the chain) carries the tunnel's 403. Nothing else counts,
/// not even a permission error deeper down (a dial the kernel refused).
fn refused_by_policy(error: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(connector) = cause.downcast_ref::<io::Error>() {
            return connector
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<crate::hbone::TunnelError>())
                .is_some_and(crate::hbone::TunnelError::denied);
        }
        source = cause.source();
    }
    false
}

/// Bodies of at most this size (by `content-length`) are read whole before
/// the response goes on, so head and body leave in one write.
const WHOLE_BODY: u64 = 16 << 10;

/// How long a streamed response body may send nothing before the proxy
/// gives up on it (as Envoy's `stream_idle_timeout`): long, so that quiet
/// streams (gRPC watches, long polls) live, but not forever.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// A streamed response body that fails once `idle` passes with no frame
/// of it and no byte of the request's own body (a client still streaming
/// its request keeps a quiet response alive, as Envoy's stream idle timer
/// counts both ways). An upstream that stops sending in the middle of a
/// body then ends the caller's response as broken (hyper resets the
/// stream, or closes the HTTP/1.1 connection without the last chunk)
/// instead of holding it, and the connections under it, forever.
struct IdleBody<B> {
    inner: B,
    idle: Duration,
    /// Fires `idle` after the last activity it knew of; pushed on when it
    /// finds newer activity (cheaper than resetting it for every frame).
    timer: Pin<Box<tokio::time::Sleep>>,
    last_activity: tokio::time::Instant,
    /// The request's body and how many bytes of it had been read.
    request: Option<(Arc<BodyTally>, u64)>,
}

impl<B> IdleBody<B> {
    fn new(inner: B, idle: Duration, request: Option<Arc<BodyTally>>) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            last_activity: tokio::time::Instant::now(),
            request: request.map(|tally| {
                let read = tally.bytes();
                (tally, read)
            }),
        }
    }
}

impl<B> hyper::body::Body for IdleBody<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.last_activity = tokio::time::Instant::now();
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            let now = tokio::time::Instant::now();
            if let Some((tally, seen)) = &mut this.request
                && tally.bytes() != *seen
            {
                *seen = tally.bytes();
                this.last_activity = now;
            }
            match this.last_activity.checked_add(this.idle) {
                Some(deadline) if deadline > now => this.timer.as_mut().reset(deadline),
                // An idle timeout too long to represent never ends.
                None => return Poll::Pending,
                Some(_) => {
                    tracing::info!(
                        idle = ?this.idle,
                        "a streamed response body stalled; the caller's response is cut"
                    );
                    return Poll::Ready(Some(Err(format!(
                        "the upstream sent nothing of its response body for {:?}",
                        this.idle
                    )
                    .into())));
                }
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// `response`, its body read whole when it is small and sized (it is
/// almost always already here: one write to the client instead of two),
/// else streamed.
async fn whole_if_small(
    response: Response<Incoming>,
    stream_idle_timeout: Duration,
    request_body: &Arc<BodyTally>,
) -> Result<Response<Body>, String> {
    let (parts, body) = response.into_parts();
    let body = match body.size_hint().exact() {
        Some(size) if size <= WHOLE_BODY => {
            // Collected keeps the trailers (gRPC's status) after the data.
            body.collect()
                .await
                .map_err(|e| format!("the upstream's response broke off: {e}"))?
                .map_err(|never| match never {})
                .boxed_unsync()
        }
        _ => IdleBody::new(body, stream_idle_timeout, Some(request_body.clone())).boxed_unsync(),
    };
    Ok(Response::from_parts(parts, body))
}

/// The healthy endpoints of `service` serving `port`, of `version` when a
/// split chose one.
fn candidates(
    directory: &Directory,
    service: &VirtualService,
    port: u16,
    version: Option<Version>,
) -> Vec<SocketAddr> {
    let Some(port) = service.ports.iter().find(|p| p.port == port) else {
        return Vec::new();
    };
    let wanted = port.workload_port();
    directory
        .endpoints_of(&service.key)
        .unwrap_or_default()
        .iter()
        .filter(|e| e.healthy && e.port == wanted)
        .filter(|e| version.is_none_or(|v| e.version.as_deref() == Some(v.as_str())))
        .map(|e| SocketAddr::new(e.ip, e.port))
        .collect()
}

/// A request body: kept for replay, or sent once.
enum Replay {
    Kept(Bytes),
    Once(Option<Counted<Incoming>>),
}

impl Replay {
    /// The body for the next attempt; `None` once a one-shot body is gone.
    fn next(&mut self) -> Option<Body> {
        match self {
            Replay::Kept(bytes) => Some(
                Full::new(bytes.clone())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ),
            Replay::Once(body) => body
                .take()
                .map(|b| b.map_err(BoxError::from).boxed_unsync()),
        }
    }
}

/// One request's attempts.
struct Exchange<'a> {
    version: Option<Version>,
    route: &'a Route,
    state: &'a HttpState,
    parts: &'a http::request::Parts,
    candidates: &'a [SocketAddr],
    retry: &'a RetryPolicy,
    budget: &'a RetryBudget,
    upgrade: Option<&'a Upgrade>,
    /// Whether reading the client's body failed: then an attempt that
    /// failed is the client's doing, not the upstream's.
    request_body: &'a BodyTally,
}

impl Exchange<'_> {
    /// The response, and the endpoint that gave it; or why there is none:
    /// the destination's authorization refused the caller (not retried:
    /// another endpoint would refuse it too), or no attempt got a
    /// response.
    async fn run(
        &self,
        mut replay: Replay,
    ) -> Result<(Response<Incoming>, SocketAddr), (Flag, String)> {
        let method = &self.parts.method;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut retried = 0;
        loop {
            let endpoint = self.pick(&tried);
            tried.push(endpoint);
            let failed = |why: String| (Flag::ConnectFailed, why);
            let body = replay
                .next()
                .ok_or_else(|| failed("the request body was already sent".into()))?;
            let request = self.upstream_request(endpoint, body).map_err(failed)?;
            let clients = self.route.pod.http_clients(&self.route.mesh);
            let client = clients.outbound(self.route.protocol);
            let in_flight = self.state.in_flight.start(endpoint);
            let sent = client.request(request).await;
            drop(in_flight);
            let (attempt, outcome) = match sent {
                Ok(response) => {
                    let status = response.status().as_u16();
                    if !self
                        .retry
                        .should_retry(method, Attempt::Status(status), retried)
                    {
                        return Ok((response, endpoint));
                    }
                    (Attempt::Status(status), Ok((response, endpoint)))
                }
                Err(error) => {
                    let why = format!("{endpoint}: {}", super::error_chain(&error));
                    if refused_by_policy(&error) {
                        return Err((Flag::Denied, why));
                    }
                    // A body that does not parse (a bad chunk size) or a
                    // client gone mid-body: 400, not retried, and nothing
                    // against the upstream's health.
                    if self.request_body.failed() {
                        return Err((Flag::BadRequest, format!("reading the request body: {why}")));
                    }
                    let attempt = if error.is_connect() {
                        Attempt::ConnectFailed
                    } else {
                        Attempt::Reset
                    };
                    tracing::debug!(pod = %self.route.pod.name, why, "upstream attempt failed");
                    // A head that does not parse is retried like a reset,
                    // but said for what it is if it is the last.
                    let flag = if unreadable_response(&error) {
                        Flag::UpstreamProtocolError
                    } else {
                        Flag::ConnectFailed
                    };
                    (attempt, Err((flag, why)))
                }
            };
            let again = matches!(replay, Replay::Kept(_))
                && self.retry.should_retry(method, attempt, retried)
                && self.budget.try_retry();
            if !again {
                return outcome;
            }
            self.state.stats.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.retry.backoff(retried, fastrand::f64())).await;
            retried += 1;
        }
    }

    /// The endpoint for the next attempt: by the service's balancer at
    /// first, then in turn among those not tried yet (all again when every
    /// one was).
    fn pick(&self, tried: &[SocketAddr]) -> SocketAddr {
        let service = &self.route.service;
        let key = &service.key;
        let fresh: Vec<SocketAddr> = self
            .candidates
            .iter()
            .copied()
            .filter(|e| !tried.contains(e))
            .collect();
        let pool = if fresh.is_empty() {
            self.candidates
        } else {
            &fresh
        };
        let balancer = &self.route.mesh.balancer;
        if !tried.is_empty() {
            return pool[balancer.next(key, pool.len())];
        }
        match service.load_balancer {
            LoadBalancer::RoundRobin => pool[balancer.next(key, pool.len())],
            LoadBalancer::LeastRequest => {
                pool[balance::least_request(
                    pool.len(),
                    |i| self.state.in_flight.load(pool[i]),
                    |n| fastrand::usize(..n),
                )]
            }
            LoadBalancer::ConsistentHash => {
                let value = service
                    .hash_header
                    .as_deref()
                    .and_then(|name| self.parts.headers.get(name));
                match value {
                    Some(value) => {
                        let ring = self.state.ring(key, self.version, pool);
                        pool[ring.pick(value.as_bytes()).unwrap_or(0)]
                    }
                    // No key: spread like round robin.
                    None => pool[balancer.next(key, pool.len())],
                }
            }
        }
    }

    /// The request as it goes to `endpoint`: the client's method, path,
    /// headers (less hop-by-hop ones) and body.
    fn upstream_request(&self, endpoint: SocketAddr, body: Body) -> Result<Request<Body>, String> {
        let path = self.parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri: Uri = format!("http://{endpoint}{path}")
            .parse()
            .map_err(|e| format!("the request path {path:?}: {e}"))?;
        let mut request = Request::new(body);
        *request.method_mut() = self.parts.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = forwarded_headers(&self.parts.headers);
        if let Some(upgrade) = self.upgrade {
            upgrade.ask(request.headers_mut());
        }
        if matches!(self.route.protocol, Protocol::Http2 | Protocol::Grpc) {
            *request.version_mut() = http::Version::HTTP_2;
        }
        Ok(request)
    }
}

/// An HTTP/1.1 request to switch to WebSocket (RFC 6455): the client's
/// side of the switch. The request goes on with `connection: upgrade` and
/// `upgrade: websocket`; when the upstream agrees (101), the two
/// connections are joined byte for byte. The upgrade request is what
/// authorization sees: what follows on the switched connection is not
/// HTTP to the proxy. Other protocols are not switched to (as Envoy's
/// default): an application answering 101 to any token would let a
/// caller step around per-request authorization. HTTP/2 has no upgrades
/// (RFC 9113 §8.6).
struct Upgrade {
    client: hyper::upgrade::OnUpgrade,
}

impl Upgrade {
    /// The upgrade `request` asks for, if it goes on to an HTTP/1.1
    /// upstream (`protocol`).
    fn take<B>(request: &mut Request<B>, protocol: Protocol) -> Option<Self> {
        if request.version() != http::Version::HTTP_11
            || matches!(protocol, Protocol::Http2 | Protocol::Grpc)
        {
            return None;
        }
        let headers = request.headers();
        let asked = connection_options(headers).any(|token| token.eq_ignore_ascii_case("upgrade"));
        let websocket = headers
            .get(header::UPGRADE)
            .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"));
        if !asked || !websocket {
            return None;
        }
        let client = hyper::upgrade::on(request);
        Some(Self { client })
    }

    /// Asks the upstream for the same switch.
    fn ask(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }

    /// Joins the client to the upstream once both switch, when `response`
    /// is the upstream's agreement; otherwise the client's side is dropped
    /// and the connection goes on with HTTP.
    fn splice(self, response: &mut Response<Body>, handoffs: &Handoffs) {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return;
        }
        let upstream = hyper::upgrade::on(response);
        let idle = handoffs.idle;
        let joined = tokio::spawn(async move {
            let (client, upstream) =
                tokio::try_join!(self.client, upstream).map_err(io::Error::other)?;
            // Counted on the client's side, for the idle timeout.
            let tally = Arc::new(IoTally::default());
            let mut client = Tallied::new(TokioIo::new(client), tally.clone());
            let mut upstream = TokioIo::new(upstream);
            tokio::select! {
                moved = tokio::io::copy_bidirectional(&mut client, &mut upstream) => moved,
                error = crate::hbone::idle_for(idle, || tally.read() + tally.written()) => Err(error),
            }
        });
        super::lock(&handoffs.spliced).push(Spliced(joined));
    }
}

/// The upgraded connections one served connection handed off. They stay
/// its own: it waits for them before it counts as closed, so they hold
/// its connection slot and its place in the policy re-checks, and they
/// are cut when it is (a policy change that no longer allows the caller,
/// a drain), or when nothing moves either way for the TCP idle timeout.
#[derive(Clone, Debug)]
pub(super) struct Handoffs {
    spliced: Arc<Mutex<Vec<Spliced>>>,
    idle: Option<Duration>,
}

/// A joined pair of upgraded connections: (bytes client → upstream,
/// upstream → client) when both closed. Aborted when dropped.
#[derive(Debug)]
pub(super) struct Spliced(tokio::task::JoinHandle<io::Result<(u64, u64)>>);

impl Drop for Spliced {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Handoffs {
    fn new(idle: Option<Duration>) -> Self {
        Self {
            spliced: Arc::default(),
            idle,
        }
    }

    /// Waits for every handed-off connection to close: the bytes they
    /// carried each way, or the first error.
    async fn finish(&self) -> io::Result<(u64, u64)> {
        let spliced = std::mem::take(&mut *super::lock(&self.spliced));
        let mut moved = (0, 0);
        for mut pair in spliced {
            let (sent, received) = (&mut pair.0)
                .await
                .map_err(|e| io::Error::other(format!("an upgraded connection's task: {e}")))??;
            moved.0 += sent;
            moved.1 += received;
        }
        Ok(moved)
    }
}

/// Refuses a request whose body could be delimited two ways (RFC 9112
/// §6.3: the shapes request smuggling rides on). hyper already refuses
/// conflicting `content-length`s, obs-fold, and bad header names; it
/// accepts `transfer-encoding` beside `content-length` (preferring the
/// first), repeated `transfer-encoding` and `chunked, chunked`, which a
/// server behind us might read differently.
fn unambiguous_framing(headers: &HeaderMap) -> Result<(), &'static str> {
    let mut encodings = headers.get_all(header::TRANSFER_ENCODING).iter();
    let Some(encoding) = encodings.next() else {
        return Ok(());
    };
    if encodings.next().is_some() {
        return Err("transfer-encoding is given more than once");
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err("both content-length and transfer-encoding are given");
    }
    if !encoding.as_bytes().eq_ignore_ascii_case(b"chunked") {
        return Err("transfer-encoding must be exactly \"chunked\"");
    }
    Ok(())
}

/// An upstream's response (to a `HEAD` when `head_only`) as it may go on
/// to the caller, or why it may not. An HTTP/1.x response whose body could
/// be delimited two ways is
/// refused, as such requests are: whoever reads it after us might read it
/// differently (response smuggling), and the connection it came on is
/// dropped with it. Hop-by-hop fields stay behind (RFC 9110 §7.6.1),
/// except on a switch of protocols, whose `connection` and `upgrade` name
/// the switch; `content-length` stays (a `HEAD` answer's length is only
/// there), and hyper checks the body against it.
fn onward_response<B>(
    mut response: Response<B>,
    head_only: bool,
) -> Result<Response<B>, &'static str> {
    // A response to `HEAD`, a 1xx, 204 or 304 has no body, whatever its
    // fields say (they describe another response's).
    let bodiless = head_only
        || response.status().is_informational()
        || matches!(
            response.status(),
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        );
    if response.version() <= http::Version::HTTP_11 && !bodiless {
        unambiguous_framing(response.headers())?;
    }
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        drop_hop_by_hop(response.headers_mut());
    }
    Ok(response)
}

/// Removes a response's hop-by-hop fields in place (no copy of the rest):
/// those its `connection` fields name, and the fixed ones. `trailer`
/// stays: it is end to end, and hyper sends a chunked response's trailers
/// only when it names them.
fn drop_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = connection_options(headers)
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
    ] {
        headers.remove(name);
    }
}

/// The options of every `connection` field (RFC 9110 §7.6.1), trimmed.
fn connection_options(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// `headers` without the hop-by-hop ones (RFC 9110 §7.6.1), which describe
/// the client's connection, not the request (`te: trailers` stays: gRPC
/// needs it), and without `content-length`: hyper frames the body it
/// sends from the body itself, so the length sent is always the length of
/// what follows.
fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<HeaderName> = connection_options(headers)
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    let mut forwarded = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let hop = matches!(
            name.as_str(),
            "connection"
                | "keep-alive"
                | "proxy-connection"
                | "transfer-encoding"
                | "content-length"
                | "upgrade"
                | "trailer"
        ) || (name == header::TE && value != "trailers")
            || named.contains(name);
        if !hop {
            forwarded.append(name.clone(), value.clone());
        }
    }
    forwarded
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body whose frames come from a channel: one per message, ending
    /// when the sender drops.
    struct ChannelBody(tokio::sync::mpsc::Receiver<&'static str>);

    impl hyper::body::Body for ChannelBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
            self.0
                .poll_recv(cx)
                .map(|text| text.map(|text| Ok(hyper::body::Frame::data(Bytes::from(text)))))
        }
    }

    fn channel_body() -> (tokio::sync::mpsc::Sender<&'static str>, ChannelBody) {
        let (send, receive) = tokio::sync::mpsc::channel(8);
        (send, ChannelBody(receive))
    }

    /// Reads `body` to its end in a task of its own (so that it is polled
    /// all along, as a server would); returns when each frame came, and
    /// when and how it ended.
    fn read_in_background(
        mut body: impl hyper::body::Body<Data = Bytes, Error = BoxError> + Unpin + Send + 'static,
    ) -> tokio::task::JoinHandle<(
        Vec<tokio::time::Instant>,
        tokio::time::Instant,
        Option<String>,
    )> {
        tokio::spawn(async move {
            let mut frames = Vec::new();
            loop {
                match body.frame().await {
                    Some(Ok(_)) => frames.push(tokio::time::Instant::now()),
                    Some(Err(error)) => {
                        return (frames, tokio::time::Instant::now(), Some(error.to_string()));
                    }
                    None => return (frames, tokio::time::Instant::now(), None),
                }
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_body_that_stalls_fails_after_the_idle_timeout() {
        let idle = Duration::from_secs(300);
        let just_inside = idle - Duration::from_secs(1);

        // Frames just inside the idle timeout keep it alive, however long
        // the whole body takes; then nothing: it fails `idle` after the
        // last frame.
        let (send, body) = channel_body();
        let reader = read_in_background(IdleBody::new(body, idle, None));
        for _ in 0..3 {
            tokio::time::sleep(just_inside).await;
            send.send("part").await.unwrap();
        }
        let (frames, ended, error) = reader.await.unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(ended - frames[2], idle);
        assert!(error.unwrap().contains("sent nothing"));

        // A gap longer than `idle` fails, even if data comes after it.
        let (send, body) = channel_body();
        let reader = read_in_background(IdleBody::new(body, idle, None));
        send.send("part").await.unwrap();
        tokio::time::sleep(idle + Duration::from_secs(1)).await;
        let _ = send.send("late").await;
        let (frames, ended, error) = reader.await.unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(ended - frames[0], idle);
        assert!(error.is_some());

        // The request's body still arriving keeps a quiet response alive;
        // `idle` after its last byte, the response fails.
        let tally = Arc::new(BodyTally::default());
        let (request_send, request) = channel_body();
        let mut request = Counted::new(request, tally.clone());
        let (_send, body) = channel_body();
        let started = tokio::time::Instant::now();
        let reader = read_in_background(IdleBody::new(body, idle, Some(tally)));
        for _ in 0..3 {
            tokio::time::sleep(just_inside).await;
            request_send.send("more").await.unwrap();
            request.frame().await.unwrap().unwrap();
        }
        let last_request_byte = tokio::time::Instant::now();
        let (frames, ended, error) = reader.await.unwrap();
        assert!(frames.is_empty() && error.is_some());
        assert!(ended - started > idle * 3);
        // Noticed when the timer next fires: within `idle` more.
        assert!(
            ended - last_request_byte <= idle * 2,
            "{:?}",
            ended - last_request_byte
        );

        // A body that ends is no error.
        let (send, body) = channel_body();
        let reader = read_in_background(IdleBody::new(body, idle, None));
        drop(send);
        let (_, _, error) = reader.await.unwrap();
        assert_eq!(error, None);
    }

    #[test]
    fn a_body_must_be_delimited_one_way() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(*name, HeaderValue::from_static(value));
            }
            map
        };
        for ok in [
            headers(&[]),
            headers(&[("content-length", "4")]),
            headers(&[("transfer-encoding", "chunked")]),
            headers(&[("transfer-encoding", "Chunked")]),
        ] {
            assert_eq!(unambiguous_framing(&ok), Ok(()), "{ok:?}");
        }
        for bad in [
            headers(&[("transfer-encoding", "chunked"), ("content-length", "4")]),
            headers(&[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ]),
            headers(&[("transfer-encoding", "chunked, chunked")]),
            headers(&[("transfer-encoding", "gzip, chunked")]),
            headers(&[("transfer-encoding", "identity")]),
        ] {
            assert!(unambiguous_framing(&bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_request_gets_504_at_its_timeout_and_counts_as_a_failure() {
        use crate::l7::breaker::State;
        let policy = mesh_model::policy::ServicePolicySpec::default();
        let breaker = Arc::new(Breaker::new(BreakerSettings::from_policy(&policy)));
        let timeout = Duration::from_millis(300);
        let ok = || {
            Ok(Response::new(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ))
        };

        // An upstream that never answers: 504's flag, exactly at the
        // timeout.
        let started = tokio::time::Instant::now();
        let ticket = breaker.admit().unwrap();
        let hung = guarded(&breaker, ticket, timeout, std::future::pending()).await;
        assert_eq!(started.elapsed(), timeout);
        let (flag, detail) = hung.unwrap_err();
        assert_eq!(
            (flag, flag.status()),
            (Flag::Timeout, StatusCode::GATEWAY_TIMEOUT)
        );
        assert_eq!(detail, "no response within 300 ms");

        // An answer just inside the timeout goes through.
        let started = tokio::time::Instant::now();
        let ticket = breaker.admit().unwrap();
        let answer = async {
            tokio::time::sleep(timeout - Duration::from_millis(1)).await;
            ok()
        };
        assert!(guarded(&breaker, ticket, timeout, answer).await.is_ok());
        assert_eq!(started.elapsed(), timeout - Duration::from_millis(1));

        // Timeouts are failures to the breaker (default: 50 % over at least
        // 10 requests). One of each so far; 4 more successes, then 4 more
        // timeouts make 5 failures of 10, which opens it.
        for _ in 0..4 {
            let ticket = breaker.admit().unwrap();
            assert!(
                guarded(&breaker, ticket, timeout, async { ok() })
                    .await
                    .is_ok()
            );
        }
        assert_eq!(breaker.state(), State::Closed);
        for _ in 0..4 {
            let ticket = breaker.admit().unwrap();
            let _ = guarded(&breaker, ticket, timeout, std::future::pending()).await;
        }
        assert_eq!(breaker.state(), State::Open, "5 timeouts of 10 requests");
        assert!(breaker.admit().is_none());
    }

    #[test]
    fn logged_paths_are_cut_between_characters() {
        assert_eq!(clipped("/abc", 256), "/abc");
        assert_eq!(clipped("/abc", 2), "/a");
        // "é" is two bytes: a cut inside it backs off before it.
        assert_eq!(clipped("/é", 2), "/");
        assert_eq!(clipped("/é", 3), "/é");
        assert_eq!(clipped("/ü€x", 5), "/ü");
    }

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("host", "reviews"),
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
            ("x-canary", "true"),
            ("content-length", "2"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        let forwarded = forwarded_headers(&headers);
        let names: Vec<&str> = forwarded.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["host", "te", "x-canary"]);
        let mut gzip = HeaderMap::new();
        gzip.insert("te", HeaderValue::from_static("gzip"));
        assert!(forwarded_headers(&gzip).is_empty());
    }

    fn response(status: u16, fields: &[(&'static str, &'static str)]) -> Response<()> {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        for &(name, value) in fields {
            response
                .headers_mut()
                .append(name, HeaderValue::from_static(value));
        }
        response
    }

    #[test]
    fn a_response_goes_on_without_hop_by_hop_fields_and_only_if_unambiguous() {
        let onward = onward_response(
            response(
                200,
                &[
                    ("connection", "close, x-private"),
                    ("keep-alive", "timeout=5"),
                    ("x-private", "1"),
                    ("content-length", "2"),
                    ("proxy-connection", "keep-alive"),
                    ("x-app", "yes"),
                    ("trailer", "x-checksum"),
                ],
            ),
            false,
        )
        .unwrap();
        let mut names: Vec<&str> = onward.headers().keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "trailer", "x-app"]);
        // Read as chunked; hyper frames it again for the caller.
        let chunked = onward_response(response(200, &[("transfer-encoding", "chunked")]), false);
        assert!(chunked.unwrap().headers().is_empty());
        // A switch keeps the fields that name it.
        let switched = onward_response(
            response(101, &[("connection", "upgrade"), ("upgrade", "websocket")]),
            false,
        )
        .unwrap();
        assert_eq!(switched.headers().len(), 2);
        for fields in [
            &[("transfer-encoding", "chunked"), ("content-length", "50")][..],
            &[("transfer-encoding", "chunked, identity")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            &[("transfer-encoding", "identity")],
        ] {
            assert!(
                onward_response(response(200, fields), false).is_err(),
                "{fields:?}"
            );
        }
        // Bodiless answers carry another response's fields: not read.
        let both = [("transfer-encoding", "chunked"), ("content-length", "50")];
        assert!(onward_response(response(200, &both), true).is_ok());
        assert!(onward_response(response(304, &both), false).is_ok());
        // HTTP/2 frames its bodies itself: no such field can confuse it.
        let mut h2 = response(200, &[("content-length", "2")]);
        *h2.version_mut() = http::Version::HTTP_2;
        assert!(onward_response(h2, false).is_ok());
    }

    /// A mesh peer relays many clients' requests on one connection. When a
    /// client goes away with dozens in flight, the peer cancels them in one
    /// burst, often before this side has taken them up: that must not cost
    /// the connection and the other requests it carries, as it costs an
    /// application's own connection that resets streams that fast (rapid
    /// reset).
    #[tokio::test]
    async fn a_burst_of_cancelled_requests_from_a_mesh_peer_keeps_the_connection() {
        for (builder, survives) in [
            (server(Duration::from_secs(10)), false),
            (inbound_server(Duration::from_secs(10)), true),
        ] {
            let (client_io, server_io) = tokio::io::duplex(1 << 20);
            let (entered, mut slow_entered) = tokio::sync::mpsc::channel::<()>(1);
            let (release, released) = tokio::sync::watch::channel(false);
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (entered, mut released) = (entered.clone(), released.clone());
                async move {
                    if request.uri().path() == "/slow" {
                        let _ = entered.send(()).await;
                        let _ = released.wait_for(|released| *released).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
            tokio::spawn(async move {
                let _ = builder
                    .serve_connection(TokioIo::new(server_io), service)
                    .await;
            });
            let (client, connection) = h2::client::handshake(client_io).await.unwrap();
            tokio::spawn(connection);
            let mut client = client.ready().await.unwrap();
            let get = |path: &str| {
                Request::get(format!("http://reviews{path}"))
                    .body(())
                    .unwrap()
            };
            let (slow, _) = client.send_request(get("/slow"), true).unwrap();
            slow_entered.recv().await.unwrap();
            // Fifty requests cancelled as soon as sent: the server reads
            // their HEADERS and RST_STREAM frames together.
            for _ in 0..50 {
                let (cancelled, _) = client.send_request(get("/fast"), true).unwrap();
                drop(cancelled);
            }
            let fast = client.send_request(get("/fast"), true).unwrap().0;
            let answered = tokio::time::timeout(Duration::from_secs(10), fast).await;
            release.send_replace(true);
            let slow = tokio::time::timeout(Duration::from_secs(10), slow).await;
            assert_eq!(
                matches!((&answered, &slow), (Ok(Ok(_)), Ok(Ok(_)))),
                survives,
                "{answered:?} {slow:?}"
            );
        }
    }
}
