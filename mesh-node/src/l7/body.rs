//! Bodies that count what passes through them, for the request and
//! response size histograms and the access log: [`Counted`] adds the
//! data bytes of a request body to a shared counter as the proxy reads
//! them; [`Measured`] counts a response body's and, once the body is done
//! with — sent to its end, or dropped when the client goes away — hands
//! the count to its `on_end`. Trailers and the framing of either protocol
//! are not counted, as Envoy and Istio count sizes: the payload only.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use hyper::body::{Body, Frame, SizeHint};

/// The data bytes of a polled frame (0 for trailers, errors, the end).
fn data_len<D: bytes::Buf, E>(polled: &Poll<Option<Result<Frame<D>, E>>>) -> u64 {
    match polled {
        Poll::Ready(Some(Ok(frame))) => frame.data_ref().map_or(0, |data| data.remaining() as u64),
        _ => 0,
    }
}

/// What a [`Counted`] body saw: its data bytes so far, and whether reading
/// it failed (the client sent a body that does not parse, or went away).
#[derive(Debug, Default)]
pub struct BodyTally {
    bytes: AtomicU64,
    failed: AtomicBool,
}

impl BodyTally {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

/// A body whose data bytes, and failure, go to a [`BodyTally`] as it is
/// read.
#[derive(Debug)]
pub struct Counted<B> {
    inner: B,
    tally: Arc<BodyTally>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, tally: Arc<BodyTally>) -> Self {
        Self { inner, tally }
    }
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        self.tally
            .bytes
            .fetch_add(data_len(&polled), Ordering::Relaxed);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.tally.failed.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that counts its data bytes and calls `on_end` with the count
/// once: when it is dropped, which is when the server is done with it
/// (sent whole, or abandoned).
pub struct Measured<B, F: FnOnce(u64)> {
    inner: B,
    bytes: u64,
    on_end: Option<F>,
}

impl<B, F: FnOnce(u64)> Measured<B, F> {
    pub fn new(inner: B, on_end: F) -> Self {
        Self {
            inner,
            bytes: 0,
            on_end: Some(on_end),
        }
    }
}

impl<B: std::fmt::Debug, F: FnOnce(u64)> std::fmt::Debug for Measured<B, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Measured")
            .field("inner", &self.inner)
            .field("bytes", &self.bytes)
            .field("ended", &self.on_end.is_none())
            .finish()
    }
}

impl<B, F: FnOnce(u64)> Drop for Measured<B, F> {
    fn drop(&mut self) {
        if let Some(on_end) = self.on_end.take() {
            on_end(self.bytes);
        }
    }
}

impl<B: Body + Unpin, F: FnOnce(u64) + Unpin> Body for Measured<B, F> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        self.bytes += data_len(&polled);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;
    use http::HeaderMap;
    use http_body_util::{BodyExt as _, Full, StreamBody};

    use super::*;

    type Frames = StreamBody<tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, String>>>>;

    fn frames(parts: Vec<Frame<Bytes>>) -> Frames {
        StreamBody::new(tokio_stream::iter(
            parts.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }

    #[tokio::test]
    async fn a_counted_body_adds_its_data_but_not_its_trailers() {
        let tally = Arc::new(BodyTally::default());
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body = frames(vec![
            Frame::data(Bytes::from_static(b"hello ")),
            Frame::data(Bytes::from_static(b"world")),
            Frame::trailers(trailers),
        ]);
        let collected = Counted::new(body, tally.clone()).collect().await.unwrap();
        assert_eq!(collected.to_bytes(), "hello world");
        assert_eq!(tally.bytes(), 11);
        assert!(!tally.failed());
    }

    #[tokio::test]
    async fn a_counted_body_that_fails_says_so() {
        let tally = Arc::new(BodyTally::default());
        let frames: Vec<Result<Frame<Bytes>, String>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Err("invalid chunk size".into()),
        ];
        let body = StreamBody::new(tokio_stream::iter(frames));
        let error = Counted::new(body, tally.clone())
            .collect()
            .await
            .unwrap_err();
        assert_eq!(error, "invalid chunk size");
        assert_eq!(tally.bytes(), 3);
        assert!(tally.failed());
    }

    #[tokio::test]
    async fn a_counted_body_keeps_the_size_it_announces() {
        let body = Counted::new(Full::new(Bytes::from_static(b"12345")), Arc::default());
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
    }

    #[tokio::test]
    async fn a_measured_body_reports_once_when_sent_whole() {
        let ended = Arc::new(Mutex::new(Vec::new()));
        let seen = ended.clone();
        let body = Measured::new(
            frames(vec![
                Frame::data(Bytes::from_static(b"abc")),
                Frame::data(Bytes::from_static(b"defg")),
            ]),
            move |bytes| seen.lock().unwrap().push(bytes),
        );
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.to_bytes(), "abcdefg");
        assert_eq!(*ended.lock().unwrap(), vec![7]);
    }

    #[tokio::test]
    async fn a_measured_body_abandoned_midway_reports_what_was_sent() {
        let ended = Arc::new(Mutex::new(Vec::new()));
        let seen = ended.clone();
        let mut body = Measured::new(
            frames(vec![
                Frame::data(Bytes::from_static(b"abc")),
                Frame::data(Bytes::from_static(b"never sent")),
            ]),
            move |bytes| seen.lock().unwrap().push(bytes),
        );
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "abc");
        assert!(ended.lock().unwrap().is_empty());
        drop(body);
        assert_eq!(*ended.lock().unwrap(), vec![3]);
    }
}
