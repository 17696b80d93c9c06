//! Serving the HTTP endpoints an operator or a scraper reaches — the node
//! proxy's admin endpoint and the control plane's API — so that slow or
//! idle clients cannot hold them: HTTP/1.1 only (what Prometheus, curl and
//! meshctl speak); a request head must arrive within
//! [`Limits::header_timeout`], also on an idle keep-alive connection; a
//! response the client stops reading is cut once a write has waited
//! [`Limits::write_timeout`]; and at most [`Limits::max_connections`] are
//! served at once (the next wait in the listen backlog). On shutdown the
//! listener closes first, then open connections finish their request.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

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

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What one client may take of the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The longest a request head may take to arrive, counted from when
    /// the server waits for it.
    pub header_timeout: Duration,
    /// The longest one write may wait for the client to read.
    pub write_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            max_connections: 256,
        }
    }
}

/// The largest request head read (hyper's buffer).
const MAX_HEAD_BYTES: usize = 64 << 10;

/// Serves `service` on `listener` within `limits` until `shutdown`
/// resolves; then stops accepting and returns once the open connections
/// have finished (each at most one more request).
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
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
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
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
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

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
    use hyper::body::Frame;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpSocket, TcpStream},
        time::Instant,
    };

    use super::*;

    /// A server of one connection at a time, with 1 s limits: `/endless`
    /// answers a body that never ends, anything else `ok`.
    async fn server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = tower::service_fn(|request: http::Request<Incoming>| async move {
            let body: BoxBody<Bytes, Infallible> = if request.uri().path() == "/endless" {
                let chunks = endless_chunks();
                StreamBody::new(chunks).boxed()
            } else {
                Full::new(Bytes::from_static(b"ok")).boxed()
            };
            Ok::<_, Infallible>(http::Response::new(body))
        });
        let limits = Limits {
            header_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(1),
            max_connections: 1,
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

    /// `GET path`; the status line of the answer (failing if there is
    /// none within 30 s: the server is held).
    async fn get(addr: SocketAddr, path: &str) -> String {
        let exchange = async {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer.lines().next().unwrap_or_default().to_owned()
        };
        tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .expect("no answer in 30 s: a client holds the server")
    }

    /// Reads until the server closes; the bytes read.
    async fn until_closed(stream: &mut TcpStream) -> usize {
        let mut total = 0;
        let mut buffer = vec![0; 64 << 10];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    }

    #[tokio::test]
    async fn a_client_slow_to_send_its_head_is_cut_and_the_next_is_served() {
        let addr = server().await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: te").await.unwrap();
        let started = Instant::now();
        // The only connection slot is the slow client's until it is cut.
        assert_eq!(get(addr, "/").await, "HTTP/1.1 200 OK");
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        until_closed(&mut slow).await;
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_cut_and_the_next_is_served() {
        let addr = server().await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0; 256];
        let n = idle.read(&mut answer).await.unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 200 OK"));
        let started = Instant::now();
        assert_eq!(get(addr, "/").await, "HTTP/1.1 200 OK");
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(until_closed(&mut idle).await, 0);
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_cut_and_the_next_is_served() {
        let addr = server().await;
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut reader = socket.connect(addr).await.unwrap();
        reader
            .write_all(b"GET /endless HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        assert_eq!(get(addr, "/").await, "HTTP/1.1 200 OK");
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        // What the buffers held, then the end: the endless body was cut.
        let read = until_closed(&mut reader).await;
        assert!(read > 0);
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
}
