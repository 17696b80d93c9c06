//! Serving the HTTP endpoints an operator or a scraper reaches — the node
//! proxy's admin and metrics endpoints and the control plane's API — so
//! that slow, idle or greedy clients cannot hold them: HTTP/1.1 only (what
//! Prometheus, curl and meshctl speak); a request head must arrive within
//! [`Limits::header_timeout`], also on an idle keep-alive connection; a
//! request must be answered (its body read included) within
//! [`Limits::request_timeout`], else 408; a response the client stops
//! reading is cut once a write has waited [`Limits::write_timeout`]; and at
//! most [`Limits::max_connections`] connections are served at once, at
//! most [`Limits::max_per_peer`] of them to one address — a connection
//! past either is closed as soon as it is accepted, so a client holding
//! its share delays no one else. On shutdown the listener closes first,
//! then open connections finish their request, for at most the request
//! timeout.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::{
    body::{Body, Incoming},
    server::conn::http1,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    time::Sleep,
};
use tower::ServiceExt as _;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What clients may take of the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The longest a request head may take to arrive, counted from when
    /// the server waits for it.
    pub header_timeout: Duration,
    /// The longest from a request's head to its answer's head.
    pub request_timeout: Duration,
    /// The longest one write may wait for the client to read.
    pub write_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once to one client address.
    pub max_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            max_connections: 256,
            max_per_peer: 32,
        }
    }
}

/// The largest request head read (hyper's buffer).
const MAX_HEAD_BYTES: usize = 64 << 10;

/// Serves `service` on `listener` within `limits` until `shutdown`
/// resolves; then stops accepting and returns once the open connections
/// have finished (each at most one more request), or the request timeout
/// has passed.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) where
    S: tower::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let slots = Slots::new(limits);
    let graceful = GracefulShutdown::new();
    let service = Timed {
        inner: service,
        limit: limits.request_timeout,
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors or memory, or a connection reset
                    // before it was accepted: not the listener's end.
                    tracing::warn!(%error, "accepting an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(slot) = slots.take(peer.ip()) else {
            tracing::debug!(%peer, "over the connection limits; closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(WriteDeadline::new(stream, limits.write_timeout));
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(io, TowerToHyperService::new(service.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(limits.request_timeout, graceful.shutdown()).await;
}

type Answer = http::Response<UnsyncBoxBody<Bytes, BoxError>>;

/// A service whose requests are answered within `limit`, or get 408.
#[derive(Clone, Debug)]
struct Timed<S> {
    inner: S,
    limit: Duration,
}

impl<S, B> tower::Service<http::Request<Incoming>> for Timed<S>
where
    S: tower::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Answer;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Answer, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is awaited per request, inside its time limit.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Incoming>) -> Self::Future {
        let (inner, limit) = (self.inner.clone(), self.limit);
        Box::pin(async move {
            match tokio::time::timeout(limit, inner.oneshot(request)).await {
                Ok(Ok(response)) => {
                    Ok(response.map(|body| body.map_err(Into::into).boxed_unsync()))
                }
                Ok(Err(error)) => Err(error.into()),
                Err(_) => Ok(too_slow(limit)),
            }
        })
    }
}

/// 408 for a request not answered within `limit`.
fn too_slow(limit: Duration) -> Answer {
    let body = Full::new(Bytes::from(format!(
        "the request was not answered within {limit:?}\n"
    )))
    .map_err(|never| match never {})
    .boxed_unsync();
    let mut response = http::Response::new(body);
    *response.status_mut() = http::StatusCode::REQUEST_TIMEOUT;
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}

/// The connections being served, in all and per client address.
#[derive(Debug)]
struct Slots {
    limits: Limits,
    taken: Arc<Mutex<(usize, HashMap<IpAddr, usize>)>>,
}

/// One connection's place; given back on drop.
#[derive(Debug)]
struct Slot {
    peer: IpAddr,
    taken: Arc<Mutex<(usize, HashMap<IpAddr, usize>)>>,
}

impl Slots {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            taken: Arc::default(),
        }
    }

    /// A place for a connection from `peer`, if both limits allow it.
    fn take(&self, peer: IpAddr) -> Option<Slot> {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_peer) = &mut *taken;
        let of_peer = per_peer.entry(peer).or_default();
        if *total >= self.limits.max_connections || *of_peer >= self.limits.max_per_peer {
            if *of_peer == 0 {
                per_peer.remove(&peer);
            }
            return None;
        }
        *of_peer += 1;
        *total += 1;
        Some(Slot {
            peer,
            taken: self.taken.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_peer) = &mut *taken;
        *total -= 1;
        if let Some(of_peer) = per_peer.get_mut(&self.peer) {
            *of_peer -= 1;
            if *of_peer == 0 {
                per_peer.remove(&self.peer);
            }
        }
    }
}

/// A connection whose writes fail with `TimedOut` once one has waited
/// `limit` for the peer to make room (a client that stopped reading).
#[derive(Debug)]
pub struct WriteDeadline<IO> {
    io: IO,
    limit: Duration,
    /// Set while a write waits.
    waiting: Option<Pin<Box<Sleep>>>,
}

impl<IO> WriteDeadline<IO> {
    pub fn new(io: IO, limit: Duration) -> Self {
        Self {
            io,
            limit,
            waiting: None,
        }
    }

    /// `polled`, unless it is pending and has waited `limit`.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.waiting = None;
            return polled;
        }
        let limit = self.limit;
        let waiting = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match waiting.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer read nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteDeadline<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.bounded(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.bounded(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.bounded(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.bounded(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, net::SocketAddr};

    use http_body_util::{StreamBody, combinators::BoxBody};
    use hyper::body::Frame;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpSocket, TcpStream},
        time::Instant,
    };

    use super::*;

    /// A server with 1 s limits, one connection per client address and two
    /// in all: `/endless` answers a body that never ends, `/upload` reads
    /// the request's body first, anything else answers `ok`.
    async fn server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = tower::service_fn(|request: http::Request<Incoming>| async move {
            let body: BoxBody<Bytes, Infallible> = match request.uri().path() {
                "/endless" => StreamBody::new(endless_chunks()).boxed(),
                "/upload" => {
                    let read = request.into_body().collect().await?.to_bytes().len();
                    Full::new(Bytes::from(read.to_string())).boxed()
                }
                _ => Full::new(Bytes::from_static(b"ok")).boxed(),
            };
            Ok::<_, hyper::Error>(http::Response::new(body))
        });
        let limits = Limits {
            header_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(1),
            max_connections: 2,
            max_per_peer: 1,
        };
        tokio::spawn(serve(listener, service, limits, std::future::pending()));
        addr
    }

    /// 64 KiB chunks, forever.
    fn endless_chunks()
    -> tokio_stream::Iter<std::iter::RepeatWith<impl FnMut() -> Result<Frame<Bytes>, Infallible>>>
    {
        let chunk = Bytes::from(vec![b'x'; 64 << 10]);
        tokio_stream::iter(std::iter::repeat_with(move || {
            Ok(Frame::data(chunk.clone()))
        }))
    }

    /// A connection to `addr` from the loopback address `from`.
    async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// `request` on a new connection from `from`; the status line of the
    /// answer, empty when the server closed without one.
    async fn send(from: [u8; 4], addr: SocketAddr, request: &[u8]) -> String {
        let exchange = async {
            let mut stream = connect_from(from, addr).await;
            // A refused connection may be gone before the request is out.
            let _ = stream.write_all(request).await;
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            let answer = String::from_utf8_lossy(&answer).into_owned();
            answer.lines().next().unwrap_or_default().to_owned()
        };
        tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .expect("no answer and no close in 30 s")
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n";

    /// Reads until the server closes (30 s at most); the bytes read.
    async fn until_closed(stream: &mut TcpStream) -> usize {
        let read = async {
            let mut total = 0;
            let mut buffer = vec![0; 64 << 10];
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("the server kept the connection for 30 s")
    }

    #[tokio::test]
    async fn a_client_slow_to_send_its_head_is_cut() {
        let addr = server().await;
        let mut slow = connect_from([127, 0, 0, 1], addr).await;
        slow.write_all(b"GET / HTTP/1.1\r\nhost: te").await.unwrap();
        let started = Instant::now();
        until_closed(&mut slow).await;
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        // Its place is free again.
        assert_eq!(send([127, 0, 0, 1], addr, GET).await, "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_cut() {
        let addr = server().await;
        let mut idle = connect_from([127, 0, 0, 1], addr).await;
        idle.write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0; 15];
        idle.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200 OK");
        let started = Instant::now();
        until_closed(&mut idle).await;
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_request_whose_body_stalls_gets_408() {
        let addr = server().await;
        let request = b"POST /upload HTTP/1.1\r\nhost: test\r\ncontent-length: 10\r\n\r\n12";
        let started = Instant::now();
        assert_eq!(
            send([127, 0, 0, 1], addr, request).await,
            "HTTP/1.1 408 Request Timeout"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        let whole = b"POST /upload HTTP/1.1\r\nhost: test\r\ncontent-length: 2\r\nconnection: close\r\n\r\n12";
        assert_eq!(send([127, 0, 0, 1], addr, whole).await, "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut() {
        let addr = server().await;
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut reader = socket.connect(addr).await.unwrap();
        reader
            .write_all(b"GET /endless HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        // The reader's place is taken until the server gives up on it:
        // another connection from its address is closed unanswered.
        let started = Instant::now();
        let deadline = started + Duration::from_secs(30);
        loop {
            let status = send([127, 0, 0, 1], addr, GET).await;
            if status == "HTTP/1.1 200 OK" {
                break;
            }
            assert_eq!(status, "", "neither served nor closed");
            assert!(
                Instant::now() < deadline,
                "the reader held its place for 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        // What the buffers held, then the end: the endless body was cut.
        assert!(until_closed(&mut reader).await > 0);
    }

    #[tokio::test]
    async fn connections_past_an_addresss_share_are_closed_and_others_are_served() {
        let addr = server().await;
        let mut holder = connect_from([127, 0, 0, 1], addr).await;
        holder.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        // Same address: closed at once, unanswered.
        assert_eq!(send([127, 0, 0, 1], addr, GET).await, "");
        // Another address: served.
        assert_eq!(send([127, 0, 0, 2], addr, GET).await, "HTTP/1.1 200 OK");
        until_closed(&mut holder).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_reads_fails_at_the_limit() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut ours = WriteDeadline::new(ours, Duration::from_secs(30));
        // The pipe's buffer fills; then the write waits, and gives up.
        let started = tokio::time::Instant::now();
        let error = ours.write_all(&[0; 4096]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        // What fit was delivered.
        let mut received = vec![0; 1024];
        theirs.read_exact(&mut received).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_keeps_up_never_times_out() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut ours = WriteDeadline::new(ours, Duration::from_secs(30));
        let reader = tokio::spawn(async move {
            let mut received = Vec::new();
            // 20 s between reads: each write waits less than the limit.
            let mut chunk = [0; 1024];
            loop {
                tokio::time::sleep(Duration::from_secs(20)).await;
                match theirs.read(&mut chunk).await.unwrap() {
                    0 => return received.len(),
                    n => received.extend_from_slice(&chunk[..n]),
                }
            }
        });
        ours.write_all(&[1; 8192]).await.unwrap();
        ours.shutdown().await.unwrap();
        drop(ours);
        assert_eq!(reader.await.unwrap(), 8192);
    }

    #[test]
    fn slots_are_given_back_per_address() {
        let slots = Slots::new(Limits {
            max_connections: 3,
            max_per_peer: 2,
            ..Limits::default()
        });
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let first = slots.take(a).unwrap();
        let _second = slots.take(a).unwrap();
        assert!(slots.take(a).is_none(), "over a's share");
        let _third = slots.take(b).unwrap();
        assert!(slots.take(b).is_none(), "over the total");
        drop(first);
        assert!(slots.take(b).is_some());
    }
}
