//! Trace context across the hop: each node proxy continues the trace a
//! request arrives with — W3C `traceparent`/`tracestate`, B3 in one header
//! (`b3`) or several (`x-b3-*`) — as a span of its own, and sends the
//! request on with the same trace id and its span as the parent, in W3C
//! and in B3 both, so an application that reads either format sees the
//! trace go on. A request without a valid context starts a trace, sampled
//! at the node's ratio; a sampled parent's decision is kept
//! (parent-based).

use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// A span's place in a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

/// The context a request arrived with, and in which format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incoming {
    pub parent: SpanContext,
    /// It came as the single `b3` header: it goes on as one too.
    pub b3_single: bool,
}

/// Reads the context of `headers`: `traceparent` first, then `b3`, then
/// `x-b3-*`. A malformed one is ignored (the request starts a trace).
pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(parent) = text(&TRACEPARENT).and_then(parse_traceparent) {
        return Some(Incoming {
            parent,
            b3_single: false,
        });
    }
    if let Some(parent) = text(&B3).and_then(parse_b3_single) {
        return Some(Incoming {
            parent,
            b3_single: true,
        });
    }
    let trace_id = text(&B3_TRACE_ID).and_then(parse_trace_id)?;
    let span_id = text(&B3_SPAN_ID).and_then(parse_span_id)?;
    let sampled = text(&B3_FLAGS) == Some("1") || text(&B3_SAMPLED) == Some("1");
    Some(Incoming {
        parent: SpanContext {
            trace_id,
            span_id,
            sampled,
        },
        b3_single: false,
    })
}

/// W3C Trace Context §3.2: `00-<32 hex>-<16 hex>-<2 hex>`, ids not zero.
/// A later version is read for its first four fields, as the spec asks.
fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut fields = value.trim().split('-');
    let version = fields.next()?;
    let (trace, span, flags) = (fields.next()?, fields.next()?, fields.next()?);
    let version = u8::from_str_radix(hex_exact(version, 2)?, 16).ok()?;
    if version == 0xff || (version == 0 && fields.next().is_some()) {
        return None;
    }
    let flags = u8::from_str_radix(hex_exact(flags, 2)?, 16).ok()?;
    Some(SpanContext {
        trace_id: nonzero(u128::from_str_radix(hex_exact(trace, 32)?, 16).ok()?)?,
        span_id: nonzero(u64::from_str_radix(hex_exact(span, 16)?, 16).ok()?)?,
        sampled: flags & 1 == 1,
    })
}

/// `{trace}-{span}[-{sampling}[-{parent}]]`; a bare sampling decision
/// (`0`, `1`, `d`) carries no context.
fn parse_b3_single(value: &str) -> Option<SpanContext> {
    let mut fields = value.trim().split('-');
    let trace_id = parse_trace_id(fields.next()?)?;
    let span_id = parse_span_id(fields.next()?)?;
    let sampled = matches!(fields.next(), Some("1" | "d"));
    Some(SpanContext {
        trace_id,
        span_id,
        sampled,
    })
}

/// A B3 trace id: 16 or 32 lowercase hex digits, not zero.
fn parse_trace_id(text: &str) -> Option<u128> {
    let text = text.trim();
    if !(text.len() == 16 || text.len() == 32) || !is_lower_hex(text) {
        return None;
    }
    nonzero(u128::from_str_radix(text, 16).ok()?)
}

fn parse_span_id(text: &str) -> Option<u64> {
    nonzero(u64::from_str_radix(hex_exact(text.trim(), 16)?, 16).ok()?)
}

fn hex_exact(text: &str, len: usize) -> Option<&str> {
    (text.len() == len && is_lower_hex(text)).then_some(text)
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn nonzero<T: PartialEq + Default>(value: T) -> Option<T> {
    (value != T::default()).then_some(value)
}

/// This proxy's span for a request that arrived with `incoming`: the same
/// trace and decision, a new span id; or a new trace, sampled when
/// `roll` (uniform in `[0, 1)`) falls under `ratio`.
pub fn continue_trace(
    incoming: Option<&Incoming>,
    ratio: f64,
    roll: f64,
    random: impl FnMut() -> u64,
) -> SpanContext {
    let mut random = random;
    let span_id = loop {
        let id = random();
        if id != 0 {
            break id;
        }
    };
    match incoming {
        Some(incoming) => SpanContext {
            trace_id: incoming.parent.trace_id,
            span_id,
            sampled: incoming.parent.sampled,
        },
        None => {
            let trace_id = loop {
                let id = (u128::from(random()) << 64) | u128::from(random());
                if id != 0 {
                    break id;
                }
            };
            SpanContext {
                trace_id,
                span_id,
                sampled: roll < ratio,
            }
        }
    }
}

/// Sets the trace headers of a request going on from `span` (its parent
/// span, when there was one, is `parent`): W3C always, with the incoming
/// `tracestate` kept; B3 in the form it came in (several headers unless
/// it came as one).
pub fn inject(headers: &mut HeaderMap, span: SpanContext, parent: Option<&Incoming>) {
    let sampled = if span.sampled { "1" } else { "0" };
    let traceparent = format!(
        "00-{:032x}-{:016x}-{}",
        span.trace_id,
        span.span_id,
        if span.sampled { "01" } else { "00" }
    );
    let tracestate = headers.get(&TRACESTATE).cloned();
    for name in [
        &TRACEPARENT,
        &TRACESTATE,
        &B3,
        &B3_TRACE_ID,
        &B3_SPAN_ID,
        &B3_PARENT_SPAN_ID,
        &B3_SAMPLED,
        &B3_FLAGS,
    ] {
        headers.remove(name);
    }
    let value = |text: String| HeaderValue::from_str(&text).expect("hex and dashes");
    headers.insert(TRACEPARENT, value(traceparent));
    if let Some(tracestate) = tracestate {
        headers.insert(TRACESTATE, tracestate);
    }
    if parent.is_some_and(|p| p.b3_single) {
        headers.insert(
            B3,
            value(format!(
                "{:032x}-{:016x}-{sampled}",
                span.trace_id, span.span_id
            )),
        );
    } else {
        headers.insert(B3_TRACE_ID, value(format!("{:032x}", span.trace_id)));
        headers.insert(B3_SPAN_ID, value(format!("{:016x}", span.span_id)));
        if let Some(parent) = parent {
            headers.insert(
                B3_PARENT_SPAN_ID,
                value(format!("{:016x}", parent.parent.span_id)),
            );
        }
        headers.insert(B3_SAMPLED, HeaderValue::from_static(sampled));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: u128 = 0x4bf92f3577b34da6a3ce929d0e0e4736;
    const SPAN: u64 = 0x00f067aa0ba902b7;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn every_format_is_read() {
        let sampled = SpanContext {
            trace_id: TRACE,
            span_id: SPAN,
            sampled: true,
        };
        for (case, map, b3_single) in [
            (
                "w3c",
                headers(&[(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )]),
                false,
            ),
            (
                "b3 single",
                headers(&[("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1")]),
                true,
            ),
            (
                "b3 multi",
                headers(&[
                    ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
                    ("x-b3-spanid", "00f067aa0ba902b7"),
                    ("x-b3-sampled", "1"),
                ]),
                false,
            ),
            (
                "w3c wins over b3",
                headers(&[
                    ("b3", "0000000000000001-0000000000000002-0"),
                    (
                        "traceparent",
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    ),
                ]),
                false,
            ),
        ] {
            assert_eq!(
                extract(&map),
                Some(Incoming {
                    parent: sampled,
                    b3_single
                }),
                "{case}"
            );
        }
        // A 64-bit B3 trace id is the low half of a 128-bit one.
        let short = extract(&headers(&[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7")])).unwrap();
        assert_eq!(short.parent.trace_id, 0xa3ce929d0e0e4736);
        assert!(!short.parent.sampled);
    }

    #[test]
    fn malformed_contexts_are_ignored() {
        for value in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            let map = headers(&[("traceparent", value)]);
            assert_eq!(extract(&map), None, "{value}");
        }
        // A later version with more fields is read for the four it knows.
        let later = headers(&[(
            "traceparent",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-next",
        )]);
        assert!(extract(&later).is_some());
        for value in ["1", "d", "0", "xyz-00f067aa0ba902b7", "4bf92f3577b34da6-0"] {
            assert_eq!(extract(&headers(&[("b3", value)])), None, "{value}");
        }
        let no_span = headers(&[("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736")]);
        assert_eq!(extract(&no_span), None);
    }

    #[test]
    fn a_hop_keeps_the_trace_with_its_own_span() {
        let mut ids = [7u64, 0, 9].into_iter().cycle();
        let incoming = extract(&headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]))
        .unwrap();
        let span = continue_trace(Some(&incoming), 0.0, 0.5, || ids.next().unwrap());
        assert_eq!(
            span,
            SpanContext {
                trace_id: TRACE,
                span_id: 7,
                sampled: true
            }
        );
        let mut out = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=opaque"),
            ("x-b3-flags", "1"),
        ]);
        inject(&mut out, span, Some(&incoming));
        let get = |name: &str| out.get(name).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            get("traceparent").as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000007-01")
        );
        assert_eq!(get("tracestate").as_deref(), Some("vendor=opaque"));
        assert_eq!(
            get("x-b3-traceid").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(get("x-b3-spanid").as_deref(), Some("0000000000000007"));
        assert_eq!(
            get("x-b3-parentspanid").as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_eq!(get("x-b3-sampled").as_deref(), Some("1"));
        assert_eq!(get("x-b3-flags"), None);
        assert_eq!(get("b3"), None);

        // Single-header B3 goes on as one; a zero id from the generator is
        // never used.
        let single = extract(&headers(&[(
            "b3",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        )]))
        .unwrap();
        let span = continue_trace(Some(&single), 1.0, 0.0, || ids.next().unwrap());
        assert_eq!(span.span_id, 9);
        let mut out = HeaderMap::new();
        inject(&mut out, span, Some(&single));
        assert_eq!(
            out.get("b3").unwrap(),
            "4bf92f3577b34da6a3ce929d0e0e4736-0000000000000009-0"
        );
        assert!(out.get("x-b3-traceid").is_none());
        assert!(
            out.get("traceparent")
                .unwrap()
                .to_str()
                .unwrap()
                .ends_with("-00")
        );
    }

    #[test]
    fn a_new_trace_is_sampled_at_the_ratio() {
        let mut next = 0u64;
        let mut counter = || {
            next += 1;
            next
        };
        let root = continue_trace(None, 0.25, 0.2, &mut counter);
        assert!(root.sampled);
        assert_ne!(root.trace_id, 0);
        assert!(!continue_trace(None, 0.25, 0.3, &mut counter).sampled);
        let mut out = HeaderMap::new();
        inject(&mut out, root, None);
        assert!(out.get("x-b3-parentspanid").is_none());
        assert_eq!(out.get("x-b3-sampled").unwrap(), "1");
    }
}
