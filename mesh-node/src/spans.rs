//! The node proxy's spans (a client span at the caller's node, a server
//! span at the destination's, for each sampled HTTP request), exported in
//! batches over OTLP/HTTP with protobuf (`POST {endpoint}/v1/traces`), the
//! format every OpenTelemetry receiver reads, or as Zipkin v2 JSON (`POST
//! {endpoint}/api/v2/spans`) for Zipkin and what speaks its API. Recording never waits: spans
//! go into a bounded queue, and when it is full, or the collector is down
//! or slow, they are dropped and counted.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use mesh_api::otlp::{
    AnyValue, ExportTraceServiceRequest, InstrumentationScope, KeyValue, Resource, ResourceSpans,
    ScopeSpans, Span as OtlpSpan, Status, any_value, span::SpanKind, status::StatusCode,
};
use prost::Message as _;
use tokio::sync::mpsc;

use crate::l7::trace::SpanContext;

/// Spans waiting for export; past this they are dropped.
const QUEUE: usize = 4096;
/// Most spans per export request.
const BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
const LINGER: Duration = Duration::from_secs(1);
/// How long an export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The format spans are exported in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/HTTP, protobuf, to `{endpoint}/v1/traces`.
    Otlp,
    /// Zipkin v2 JSON, to `{endpoint}/api/v2/spans`.
    Zipkin,
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "otlp" => Ok(Self::Otlp),
            "zipkin" => Ok(Self::Zipkin),
            other => Err(format!("{other:?}: expected otlp or zipkin")),
        }
    }
}

impl Protocol {
    fn path(self) -> &'static str {
        match self {
            Protocol::Otlp => "/v1/traces",
            Protocol::Zipkin => "/api/v2/spans",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Protocol::Otlp => "application/x-protobuf",
            Protocol::Zipkin => "application/json",
        }
    }

    fn body(self, node: &str, spans: Vec<Span>) -> Vec<u8> {
        match self {
            Protocol::Otlp => encode(node, spans.into_iter()).encode_to_vec(),
            Protocol::Zipkin => encode_zipkin(node, spans.into_iter()),
        }
    }
}

/// Which end of the hop a span is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Client,
    Server,
}

/// One finished span.
#[derive(Clone, Debug)]
pub struct Span {
    pub context: SpanContext,
    pub parent_span_id: Option<u64>,
    pub kind: Kind,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// A 5xx answer, or one the proxy gave itself.
    pub error: bool,
}

#[derive(Clone, Debug)]
pub enum Value {
    Text(String),
    Int(i64),
}

/// Where spans go.
#[derive(Debug)]
pub struct Exporter {
    queue: mpsc::Sender<Span>,
    /// Asks the export task to send what is queued now, and say when done.
    flushes: mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
}

impl Exporter {
    /// Starts exporting to `endpoint` (`http://host:port`) with
    /// `protocol`, naming this node in each span.
    pub fn start(endpoint: &str, node: &str, protocol: Protocol) -> Result<Arc<Self>, String> {
        let url: http::Uri = format!("{}{}", endpoint.trim_end_matches('/'), protocol.path())
            .parse()
            .map_err(|e| format!("trace endpoint {endpoint:?}: {e}"))?;
        if url.scheme_str() != Some("http") {
            return Err(format!(
                "trace endpoint {endpoint:?}: only http:// is supported"
            ));
        }
        let (queue, spans) = mpsc::channel(QUEUE);
        let (flushes, flush_requests) = mpsc::channel(1);
        let exporter = Arc::new(Self {
            queue,
            flushes,
            exported: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        tokio::spawn(export(
            Arc::downgrade(&exporter),
            (spans, flush_requests),
            (url, protocol),
            node.to_owned(),
        ));
        Ok(exporter)
    }

    /// Sends every span queued now, without waiting for batches to fill,
    /// within `limit` (for a node that is stopping); what cannot be sent
    /// is counted dropped.
    pub async fn flush(&self, limit: Duration) {
        let (done, finished) = tokio::sync::oneshot::channel();
        if self.flushes.send(done).await.is_ok() {
            let _ = tokio::time::timeout(limit, finished).await;
        }
    }

    /// Queues `span` for export, or drops it (counted) when the queue is
    /// full.
    pub fn record(&self, span: Span) {
        if self.queue.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

type Flush = tokio::sync::oneshot::Sender<()>;

async fn export(
    exporter: std::sync::Weak<Exporter>,
    (mut spans, mut flushes): (mpsc::Receiver<Span>, mpsc::Receiver<Flush>),
    (url, protocol): (http::Uri, Protocol),
    node: String,
) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        // The first span of a batch, then whatever comes within LINGER;
        // or, on a flush, everything queued at once.
        let flush = tokio::select! {
            first = spans.recv() => {
                let Some(first) = first else { return };
                batch.push(first);
                let deadline = tokio::time::Instant::now() + LINGER;
                while batch.len() < BATCH {
                    match tokio::time::timeout_at(deadline, spans.recv()).await {
                        Ok(Some(span)) => batch.push(span),
                        Ok(None) | Err(_) => break,
                    }
                }
                None
            }
            Some(done) = flushes.recv() => {
                while let Ok(span) = spans.try_recv() {
                    batch.push(span);
                }
                Some(done)
            }
        };
        let mut queued = std::mem::take(&mut batch);
        while !queued.is_empty() {
            let rest = queued.split_off(queued.len().min(BATCH));
            let Some(exporter) = exporter.upgrade() else {
                return;
            };
            send(&client, (&url, protocol), &node, queued, &exporter).await;
            queued = rest;
        }
        if let Some(done) = flush {
            let _ = done.send(());
        }
    }
}

/// Sends one batch; counts it exported or dropped.
async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    (url, protocol): (&http::Uri, Protocol),
    node: &str,
    batch: Vec<Span>,
    exporter: &Exporter,
) {
    let count = batch.len() as u64;
    let body = protocol.body(node, batch);
    let request = http::Request::post(url.clone())
        .header(http::header::CONTENT_TYPE, protocol.content_type())
        .body(Full::new(Bytes::from(body)))
        .expect("a valid request");
    let sent = tokio::time::timeout(EXPORT_TIMEOUT, client.request(request)).await;
    match sent {
        Ok(Ok(response)) if response.status().is_success() => {
            exporter.exported.fetch_add(count, Ordering::Relaxed);
        }
        outcome => {
            let why = match outcome {
                Ok(Ok(response)) => format!("answered {}", response.status()),
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no answer within {EXPORT_TIMEOUT:?}"),
            };
            tracing::debug!(%url, why, spans = count, "span export failed; spans dropped");
            exporter.dropped.fetch_add(count, Ordering::Relaxed);
        }
    }
}

/// The OTLP request for `spans` from `node`.
fn encode(node: &str, spans: impl Iterator<Item = Span>) -> ExportTraceServiceRequest {
    let text = |key: &str, value: &str| KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
    };
    let nanos = |at: SystemTime| {
        at.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    };
    let spans = spans
        .map(|span| OtlpSpan {
            trace_id: span.context.trace_id.to_be_bytes().to_vec(),
            span_id: span.context.span_id.to_be_bytes().to_vec(),
            trace_state: String::new(),
            parent_span_id: span
                .parent_span_id
                .map_or_else(Vec::new, |id| id.to_be_bytes().to_vec()),
            name: span.name,
            kind: match span.kind {
                Kind::Client => SpanKind::Client,
                Kind::Server => SpanKind::Server,
            } as i32,
            start_time_unix_nano: nanos(span.start),
            end_time_unix_nano: nanos(span.end),
            attributes: span
                .attributes
                .into_iter()
                .map(|(key, value)| match value {
                    Value::Text(value) => text(key, &value),
                    Value::Int(value) => KeyValue {
                        key: key.to_owned(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::IntValue(value)),
                        }),
                    },
                })
                .collect(),
            status: Some(Status {
                message: String::new(),
                code: if span.error {
                    StatusCode::Error
                } else {
                    StatusCode::Unset
                } as i32,
            }),
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![text("service.name", "mesh-node"), text("host.name", node)],
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "mesh-node".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                spans,
            }],
        }],
    }
}

/// The Zipkin v2 JSON for `spans` from `node`: ids in hex, times in
/// microseconds, every attribute a string tag, and `error` set on a failed
/// span as Zipkin marks one.
fn encode_zipkin(node: &str, spans: impl Iterator<Item = Span>) -> Vec<u8> {
    let micros = |at: SystemTime| {
        at.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    };
    let spans: Vec<serde_json::Value> = spans
        .map(|span| {
            let mut tags = serde_json::Map::new();
            tags.insert("host.name".into(), node.into());
            for (key, value) in span.attributes {
                let value = match value {
                    Value::Text(text) => text,
                    Value::Int(number) => number.to_string(),
                };
                tags.insert(key.into(), value.into());
            }
            if span.error {
                tags.insert("error".into(), "true".into());
            }
            let start = micros(span.start);
            let mut json = serde_json::json!({
                "traceId": format!("{:032x}", span.context.trace_id),
                "id": format!("{:016x}", span.context.span_id),
                "name": span.name,
                "kind": match span.kind {
                    Kind::Client => "CLIENT",
                    Kind::Server => "SERVER",
                },
                "timestamp": start,
                // Zipkin wants at least a microsecond.
                "duration": micros(span.end).saturating_sub(start).max(1),
                "localEndpoint": {"serviceName": "mesh-node"},
                "tags": tags,
            });
            if let Some(parent) = span.parent_span_id {
                json["parentId"] = format!("{parent:016x}").into();
            }
            json
        })
        .collect();
    serde_json::to_vec(&spans).expect("JSON values serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_encode_as_otlp() {
        let span = failed_client_span();
        let request = encode("node0", std::iter::once(span));
        // The bytes are what upstream opentelemetry-proto writes for the
        // same request (Python's opentelemetry-proto 1.x, the scope's
        // version left out so the bytes do not change with ours).
        let mut versionless = request.clone();
        versionless.resource_spans[0].scope_spans[0]
            .scope
            .as_mut()
            .unwrap()
            .version
            .clear();
        let hex: String = versionless
            .encode_to_vec()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "0ad8010a330a1b0a0c736572766963652e6e616d65120b0a096d6573682d6e6f64650a140a09686f73742e\
             6e616d6512070a056e6f64653012a0010a0b0a096d6573682d6e6f64651290010a104bf92f3577b34da6a3\
             ce929d0e0e473612080000000000000007220800f067aa0ba902b72a11726576696577732e73686f703a38\
             302f2a30033900002a36fe9c971741c0c65736fe9c97174a200a19687474702e726573706f6e73652e7374\
             617475735f636f6465120318f7034a1b0a136d6573682e726573706f6e73655f666c61677312040a02554f\
             7a021802"
        );
        // What a receiver decodes from the bytes sent.
        let decoded =
            ExportTraceServiceRequest::decode(request.encode_to_vec().as_slice()).unwrap();
        let resource = &decoded.resource_spans[0];
        let host = &resource.resource.as_ref().unwrap().attributes[1];
        assert_eq!(host.key, "host.name");
        let span = &resource.scope_spans[0].spans[0];
        assert_eq!(
            span.trace_id,
            0x4bf92f3577b34da6a3ce929d0e0e4736u128.to_be_bytes()
        );
        assert_eq!(span.span_id, 7u64.to_be_bytes());
        assert_eq!(span.parent_span_id, 0x00f067aa0ba902b7u64.to_be_bytes());
        assert_eq!(span.kind, SpanKind::Client as i32);
        assert_eq!(
            span.end_time_unix_nano - span.start_time_unix_nano,
            3_000_000
        );
        assert_eq!(span.status.as_ref().unwrap().code, StatusCode::Error as i32);
        assert_eq!(span.attributes.len(), 2);
    }

    fn failed_client_span() -> Span {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Span {
            context: SpanContext {
                trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                span_id: 7,
                sampled: true,
                debug: false,
            },
            parent_span_id: Some(0x00f067aa0ba902b7),
            kind: Kind::Client,
            name: "reviews.shop:80/*".into(),
            start,
            end: start + Duration::from_millis(3),
            attributes: vec![
                ("http.response.status_code", Value::Int(503)),
                ("mesh.response_flags", Value::Text("UO".into())),
            ],
            error: true,
        }
    }

    #[test]
    fn spans_encode_as_zipkin_v2_json() {
        let json = encode_zipkin("node0", std::iter::once(failed_client_span()));
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            value,
            serde_json::json!([{
                "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
                "id": "0000000000000007",
                "parentId": "00f067aa0ba902b7",
                "name": "reviews.shop:80/*",
                "kind": "CLIENT",
                "timestamp": 1_700_000_000_000_000u64,
                "duration": 3000,
                "localEndpoint": {"serviceName": "mesh-node"},
                "tags": {
                    "host.name": "node0",
                    "http.response.status_code": "503",
                    "mesh.response_flags": "UO",
                    "error": "true",
                },
            }])
        );
        // A root span has no parent; an instant one lasts a microsecond.
        let mut root = failed_client_span();
        root.parent_span_id = None;
        root.end = root.start;
        let value: serde_json::Value =
            serde_json::from_slice(&encode_zipkin("n", std::iter::once(root))).unwrap();
        assert!(value[0].get("parentId").is_none(), "{value}");
        assert_eq!(value[0]["duration"], 1);
    }

    #[tokio::test]
    async fn zipkin_export_posts_json_batches_to_the_spans_api() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        // A receiver speaking Zipkin's API (Zipkin itself cannot be
        // installed here): the request line, content type and body.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            loop {
                let n = stream.read(&mut buffer).await.unwrap();
                request.extend_from_slice(&buffer[..n]);
                let text = String::from_utf8_lossy(&request).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if body.len() >= length {
                        stream
                            .write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                            .await
                            .unwrap();
                        return (head.to_owned(), body.to_owned());
                    }
                }
            }
        });
        let exporter =
            Exporter::start(&format!("http://{addr}"), "node1", Protocol::Zipkin).unwrap();
        exporter.record(failed_client_span());
        exporter.flush(Duration::from_secs(10)).await;
        let (head, body) = received.await.unwrap();
        assert!(head.starts_with("POST /api/v2/spans HTTP/1.1"), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        let spans: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(spans[0]["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(spans[0]["tags"]["host.name"], "node1");
        assert_eq!(exporter.exported.load(Ordering::Relaxed), 1);
        assert!("jaeger".parse::<Protocol>().is_err());
    }

    #[tokio::test]
    async fn a_collector_that_is_down_only_costs_dropped_spans() {
        // Nothing listens on the port: every export fails, and is counted.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let exporter =
            Exporter::start(&format!("http://127.0.0.1:{port}"), "node0", Protocol::Otlp).unwrap();
        let span = Span {
            context: SpanContext {
                trace_id: 1,
                span_id: 2,
                sampled: true,
                debug: false,
            },
            parent_span_id: None,
            kind: Kind::Server,
            name: "x".into(),
            start: SystemTime::now(),
            end: SystemTime::now(),
            attributes: Vec::new(),
            error: false,
        };
        for _ in 0..QUEUE + 10 {
            exporter.record(span.clone());
        }
        // The queue took what it could at once; the rest were dropped.
        assert!(exporter.dropped.load(Ordering::Relaxed) >= 10);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while exporter.dropped.load(Ordering::Relaxed) < (QUEUE + 10) as u64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "exports did not fail"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(exporter.exported.load(Ordering::Relaxed), 0);
        assert!(Exporter::start("https://collector:4318", "node0", Protocol::Otlp).is_err());

        // A flush sends what is queued at once, without the batch's wait:
        // when it returns, every span has had its export attempt.
        let before = exporter.dropped.load(Ordering::Relaxed);
        for _ in 0..3 {
            exporter.record(span.clone());
        }
        exporter.flush(Duration::from_secs(10)).await;
        assert_eq!(exporter.dropped.load(Ordering::Relaxed), before + 3);
    }
}
