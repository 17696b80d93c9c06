//! A small OTLP/HTTP trace receiver (`POST /v1/traces`, protobuf) that keeps
//! what the node proxies export, for the demo to show a trace without a
//! trace store to install. The tracing test uses a real one (Phoenix).

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_api::otlp::{ExportTraceServiceRequest, any_value, span::SpanKind};
use prost::Message as _;

/// One received span, flattened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// The resource's `host.name`: the node that sent it.
    pub node: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// `client`, `server`, `internal` or `unspecified`.
    pub kind: &'static str,
    pub duration: Duration,
    /// Every attribute, its value as text.
    pub attributes: Vec<(String, String)>,
    pub error: bool,
}

impl ReceivedSpan {
    /// The value of attribute `key`, if the span has it.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Receives spans on a loopback port until dropped (the thread stays
/// parked in `accept`; the process ends it).
#[derive(Debug)]
pub struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl Collector {
    /// Listens on `127.0.0.1` (a free port).
    pub fn start() -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let kept = kept.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &kept);
                });
            }
        });
        Ok(Self { addr, spans })
    }

    /// What to give `mesh-node --trace-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("no panics hold the lock").clone()
    }
}

/// Answers the requests of one connection (keep-alive) until it closes.
fn serve(stream: TcpStream, kept: &Mutex<Vec<ReceivedSpan>>) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value
                    .trim()
                    .parse()
                    .map_err(|_| io::Error::other(format!("bad content-length {value:?}")))?;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let status = if !request_line.starts_with("POST /v1/traces ") {
            "404 Not Found"
        } else {
            match ExportTraceServiceRequest::decode(body.as_slice()) {
                Ok(request) => {
                    kept.lock()
                        .expect("no panics hold the lock")
                        .extend(flatten(request));
                    "200 OK"
                }
                Err(_) => "400 Bad Request",
            }
        };
        // An empty ExportTraceServiceResponse is zero bytes of protobuf.
        write!(
            writer,
            "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
        )?;
    }
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let node = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "host.name")
            .map(|a| text(a.value.as_ref()))
            .unwrap_or_default();
        for span in resource_spans
            .scope_spans
            .into_iter()
            .flat_map(|scope| scope.spans)
        {
            out.push(ReceivedSpan {
                node: node.clone(),
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                kind: match SpanKind::try_from(span.kind) {
                    Ok(SpanKind::Client) => "client",
                    Ok(SpanKind::Server) => "server",
                    Ok(SpanKind::Internal) => "internal",
                    _ => "unspecified",
                },
                duration: Duration::from_nanos(
                    span.end_time_unix_nano
                        .saturating_sub(span.start_time_unix_nano),
                ),
                attributes: span
                    .attributes
                    .iter()
                    .map(|a| (a.key.clone(), text(a.value.as_ref())))
                    .collect(),
                error: span.status.is_some_and(|s| s.code == 2),
                name: span.name,
            });
        }
    }
    out
}

fn text(value: Option<&mesh_api::otlp::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use mesh_api::otlp::{
        AnyValue, KeyValue, Resource, ResourceSpans, ScopeSpans, Span, Status, status::StatusCode,
    };

    use super::*;

    fn post(addr: SocketAddr, path: &str, body: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nhost: c\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        line
    }

    #[test]
    fn keeps_the_spans_of_each_export_and_refuses_what_is_not_one() {
        let collector = Collector::start().unwrap();
        let text = |key: &str, value: &str| KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![text("host.name", "node1")],
                }),
                scope_spans: vec![ScopeSpans {
                    scope: None,
                    spans: vec![Span {
                        trace_id: vec![0xab; 16],
                        span_id: vec![1, 2, 3, 4, 5, 6, 7, 8],
                        parent_span_id: vec![],
                        name: "reviews.shop:80/*".into(),
                        kind: SpanKind::Server as i32,
                        start_time_unix_nano: 1_000,
                        end_time_unix_nano: 251_000,
                        attributes: vec![KeyValue {
                            key: "http.response.status_code".into(),
                            value: Some(AnyValue {
                                value: Some(any_value::Value::IntValue(503)),
                            }),
                        }],
                        status: Some(Status {
                            message: String::new(),
                            code: StatusCode::Error as i32,
                        }),
                        ..Default::default()
                    }],
                }],
            }],
        };
        let addr = collector.addr;
        assert!(post(addr, "/v1/traces", &request.encode_to_vec()).starts_with("HTTP/1.1 200"));
        assert!(post(addr, "/v1/traces", b"\xff\xff\xff").starts_with("HTTP/1.1 400"));
        assert!(post(addr, "/v1/metrics", b"").starts_with("HTTP/1.1 404"));
        let spans = collector.spans();
        assert_eq!(spans.len(), 1, "{spans:?}");
        let span = &spans[0];
        assert_eq!(span.node, "node1");
        assert_eq!(span.trace_id, "ab".repeat(16));
        assert_eq!(span.span_id, "0102030405060708");
        assert_eq!(span.parent_span_id, "");
        assert_eq!(span.kind, "server");
        assert_eq!(span.duration, Duration::from_micros(250));
        assert_eq!(span.attribute("http.response.status_code"), Some("503"));
        assert!(span.error);
    }
}
