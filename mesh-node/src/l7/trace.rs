//! Trace context across the hop, when the node exports spans: each node
//! proxy continues the trace a request arrives with (W3C `traceparent`
//! and `tracestate`, B3 in one header, `b3`, or several, `x-b3-*`) as a
//! span of its own, and sends the request on with the same trace id and
//! its span as the parent, in W3C and in B3 both, so an application that
//! reads either format sees the trace go on. A request without a
//! decision (no context, or B3 deferring) is decided at the node's ratio;
//! a decision that came is kept (parent-based).

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
    /// B3's debug decision: sampled, and to be kept whatever the ratios.
    pub debug: bool,
}

/// A trace id and a span id.
type Ids = (u128, u64);

/// A sampling decision as it arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    Accept,
    Deny,
    /// B3's `d` or `x-b3-flags: 1`.
    Debug,
    /// No decision (B3 without one): this proxy decides, at its ratio.
    Defer,
}

/// The context a request arrived with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// The trace and parent span, when the request named them (B3 may
    /// carry a decision alone).
    pub parent: Option<Ids>,
    pub sampling: Sampling,
    /// A `b3` header came: the context goes on as one too.
    pub b3_single: bool,
    /// The B3 trace id was 64 bits: it goes on as 64 bits in B3.
    pub b3_narrow: bool,
    /// The `tracestate` of a valid `traceparent` (several field lines
    /// joined); dropped with any other source, as W3C requires.
    pub tracestate: Option<HeaderValue>,
}

/// Reads the context of `headers`: one valid `traceparent` first, then
/// `b3`, then `x-b3-*`. Malformed ones are ignored; `None` when no usable
/// context or decision came.
pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let b3_single = headers.contains_key(&B3);
    // Two traceparent lines are no context (W3C's test suite).
    let traceparents = headers.get_all(&TRACEPARENT).iter().count();
    if traceparents == 1
        && let Some((trace_id, span_id, sampled)) = text(&TRACEPARENT).and_then(parse_traceparent)
    {
        return Some(Incoming {
            parent: Some((trace_id, span_id)),
            sampling: if sampled {
                Sampling::Accept
            } else {
                Sampling::Deny
            },
            b3_single,
            b3_narrow: false,
            tracestate: joined(headers.get_all(&TRACESTATE)),
        });
    }
    if let Some((parent, sampling, b3_narrow)) = text(&B3).and_then(parse_b3_single) {
        return Some(Incoming {
            parent,
            sampling,
            b3_single,
            b3_narrow,
            tracestate: None,
        });
    }
    let sampling = match (text(&B3_FLAGS), text(&B3_SAMPLED)) {
        (Some("1"), _) => Sampling::Debug,
        (_, Some("1" | "true")) => Sampling::Accept,
        (_, Some("0" | "false")) => Sampling::Deny,
        _ => Sampling::Defer,
    };
    let trace = text(&B3_TRACE_ID).and_then(parse_trace_id);
    let span = text(&B3_SPAN_ID).and_then(parse_span_id);
    let parent = trace
        .zip(span)
        .map(|((trace_id, _), span_id)| (trace_id, span_id));
    if parent.is_none() && sampling == Sampling::Defer {
        return None;
    }
    Some(Incoming {
        parent,
        sampling,
        b3_single,
        b3_narrow: trace.is_some_and(|(_, narrow)| narrow),
        tracestate: None,
    })
}

/// Every `tracestate` field line, joined with commas (W3C §3.3.1).
fn joined(values: http::header::GetAll<'_, HeaderValue>) -> Option<HeaderValue> {
    let parts: Vec<&str> = values.iter().filter_map(|v| v.to_str().ok()).collect();
    if parts.is_empty() {
        return None;
    }
    HeaderValue::from_str(&parts.join(",")).ok()
}

/// W3C Trace Context §3.2: `00-<32 hex>-<16 hex>-<2 hex>`, ids not zero.
/// A later version is read for its first four fields, as the spec asks.
fn parse_traceparent(value: &str) -> Option<(u128, u64, bool)> {
    let mut fields = value.trim().split('-');
    let version = fields.next()?;
    let (trace, span, flags) = (fields.next()?, fields.next()?, fields.next()?);
    let version = u8::from_str_radix(hex_exact(version, 2)?, 16).ok()?;
    if version == 0xff || (version == 0 && fields.next().is_some()) {
        return None;
    }
    let flags = u8::from_str_radix(hex_exact(flags, 2)?, 16).ok()?;
    Some((
        nonzero(u128::from_str_radix(hex_exact(trace, 32)?, 16).ok()?)?,
        nonzero(u64::from_str_radix(hex_exact(span, 16)?, 16).ok()?)?,
        flags & 1 == 1,
    ))
}

/// `{trace}-{span}[-{sampling}[-{parent}]]`, or a decision alone (`0`,
/// `1`, `d`): (ids, decision, 64-bit trace id).
fn parse_b3_single(value: &str) -> Option<(Option<Ids>, Sampling, bool)> {
    let decision = |text: &str| match text {
        "1" => Some(Sampling::Accept),
        "0" => Some(Sampling::Deny),
        "d" => Some(Sampling::Debug),
        _ => None,
    };
    let value = value.trim();
    if let Some(sampling) = decision(value) {
        return Some((None, sampling, false));
    }
    let mut fields = value.split('-');
    let (trace_id, narrow) = parse_trace_id(fields.next()?)?;
    let span_id = parse_span_id(fields.next()?)?;
    let sampling = match fields.next() {
        None => Sampling::Defer,
        Some(text) => decision(text)?,
    };
    Some((Some((trace_id, span_id)), sampling, narrow))
}

/// A B3 trace id: 16 or 32 lowercase hex digits, not zero; and whether it
/// was 16.
fn parse_trace_id(text: &str) -> Option<(u128, bool)> {
    let text = text.trim();
    if !(text.len() == 16 || text.len() == 32) || !is_lower_hex(text) {
        return None;
    }
    Some((
        nonzero(u128::from_str_radix(text, 16).ok()?)?,
        text.len() == 16,
    ))
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
/// trace, a new span id, the decision kept; a deferred or absent decision
/// is made here, sampled when `roll` (uniform in `[0, 1)`) falls under
/// `ratio`.
pub fn continue_trace(
    incoming: Option<&Incoming>,
    ratio: f64,
    roll: f64,
    random: impl FnMut() -> u64,
) -> SpanContext {
    let mut random = random;
    let mut nonzero_random = || loop {
        let id = random();
        if id != 0 {
            break id;
        }
    };
    let span_id = nonzero_random();
    let trace_id = match incoming.and_then(|i| i.parent) {
        Some((trace_id, _)) => trace_id,
        None => (u128::from(nonzero_random()) << 64) | u128::from(nonzero_random()),
    };
    let sampling = incoming.map_or(Sampling::Defer, |i| i.sampling);
    SpanContext {
        trace_id,
        span_id,
        sampled: match sampling {
            Sampling::Accept | Sampling::Debug => true,
            Sampling::Deny => false,
            Sampling::Defer => roll < ratio,
        },
        debug: sampling == Sampling::Debug,
    }
}

/// Sets the trace headers of a request going on from `span`: W3C always
/// (with the incoming `tracestate` when it came with a `traceparent`); B3
/// as one `b3` header when one came, else as `x-b3-*`, the trace id as
/// wide as it came.
pub fn inject(headers: &mut HeaderMap, span: SpanContext, incoming: Option<&Incoming>) {
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
    headers.insert(
        TRACEPARENT,
        value(format!(
            "00-{:032x}-{:016x}-{}",
            span.trace_id,
            span.span_id,
            if span.sampled { "01" } else { "00" }
        )),
    );
    if let Some(tracestate) = incoming.and_then(|i| i.tracestate.clone()) {
        headers.insert(TRACESTATE, tracestate);
    }
    let narrow = incoming.is_some_and(|i| i.b3_narrow) && span.trace_id >> 64 == 0;
    let b3_trace = if narrow {
        format!("{:016x}", span.trace_id)
    } else {
        format!("{:032x}", span.trace_id)
    };
    let decision = if span.debug {
        "d"
    } else if span.sampled {
        "1"
    } else {
        "0"
    };
    if incoming.is_some_and(|i| i.b3_single) {
        headers.insert(
            B3,
            value(format!("{b3_trace}-{:016x}-{decision}", span.span_id)),
        );
        return;
    }
    headers.insert(B3_TRACE_ID, value(b3_trace));
    headers.insert(B3_SPAN_ID, value(format!("{:016x}", span.span_id)));
    if let Some((_, parent)) = incoming.and_then(|i| i.parent) {
        headers.insert(B3_PARENT_SPAN_ID, value(format!("{parent:016x}")));
    }
    if span.debug {
        headers.insert(B3_FLAGS, HeaderValue::from_static("1"));
    } else {
        headers.insert(B3_SAMPLED, HeaderValue::from_static(decision));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: u128 = 0x4bf92f3577b34da6a3ce929d0e0e4736;
    const SPAN: u64 = 0x00f067aa0ba902b7;
    const TRACEPARENT_01: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn incoming(parent: Option<(u128, u64)>, sampling: Sampling) -> Incoming {
        Incoming {
            parent,
            sampling,
            b3_single: false,
            b3_narrow: false,
            tracestate: None,
        }
    }

    #[test]
    fn every_format_is_read() {
        let ids = Some((TRACE, SPAN));
        for (case, map, expected) in [
            (
                "w3c",
                headers(&[("traceparent", TRACEPARENT_01)]),
                incoming(ids, Sampling::Accept),
            ),
            (
                "b3 single",
                headers(&[("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1")]),
                Incoming {
                    b3_single: true,
                    ..incoming(ids, Sampling::Accept)
                },
            ),
            (
                "b3 single, no decision",
                headers(&[("b3", "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7")]),
                Incoming {
                    b3_single: true,
                    ..incoming(ids, Sampling::Defer)
                },
            ),
            (
                "b3 single, a decision alone",
                headers(&[("b3", "0")]),
                Incoming {
                    b3_single: true,
                    ..incoming(None, Sampling::Deny)
                },
            ),
            (
                "b3 multi",
                headers(&[
                    ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
                    ("x-b3-spanid", "00f067aa0ba902b7"),
                    ("x-b3-sampled", "true"),
                ]),
                incoming(ids, Sampling::Accept),
            ),
            (
                "b3 multi, debug",
                headers(&[
                    ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
                    ("x-b3-spanid", "00f067aa0ba902b7"),
                    ("x-b3-flags", "1"),
                ]),
                incoming(ids, Sampling::Debug),
            ),
            (
                "b3 multi, a decision alone",
                headers(&[("x-b3-sampled", "0")]),
                incoming(None, Sampling::Deny),
            ),
            (
                "w3c wins, and a b3 header is kept as one",
                headers(&[
                    ("b3", "0000000000000001-0000000000000002-0"),
                    ("traceparent", TRACEPARENT_01),
                    ("tracestate", "a=1"),
                    ("tracestate", "b=2"),
                ]),
                Incoming {
                    b3_single: true,
                    tracestate: Some(HeaderValue::from_static("a=1,b=2")),
                    ..incoming(ids, Sampling::Accept)
                },
            ),
        ] {
            assert_eq!(extract(&map), Some(expected), "{case}");
        }
        // A 64-bit B3 trace id is the low half of a 128-bit one.
        let short = extract(&headers(&[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7")])).unwrap();
        assert_eq!(short.parent, Some((0xa3ce929d0e0e4736, SPAN)));
        assert!(short.b3_narrow);
        // A tracestate without a valid traceparent is not kept.
        let orphan = headers(&[
            ("tracestate", "a=1"),
            ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
        ]);
        assert_eq!(extract(&orphan).unwrap().tracestate, None);
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
        // Two traceparent lines are no context.
        let twice = headers(&[
            ("traceparent", TRACEPARENT_01),
            ("traceparent", TRACEPARENT_01),
        ]);
        assert_eq!(extract(&twice), None);
        // A later version with more fields is read for the four it knows.
        let later = headers(&[(
            "traceparent",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-next",
        )]);
        assert!(extract(&later).is_some());
        for value in [
            "x",
            "xyz-00f067aa0ba902b7",
            "4bf92f3577b34da6-0",
            "4bf92f3577b34da6-00f067aa0ba902b7-2",
        ] {
            assert_eq!(extract(&headers(&[("b3", value)])), None, "{value}");
        }
        let no_span = headers(&[("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736")]);
        assert_eq!(extract(&no_span), None);
    }

    #[test]
    fn a_hop_keeps_the_trace_with_its_own_span() {
        let mut ids = [7u64, 0, 9].into_iter().cycle();
        let mut map = headers(&[
            ("traceparent", TRACEPARENT_01),
            ("tracestate", "vendor=opaque"),
            ("x-b3-flags", "1"),
        ]);
        let came = extract(&map).unwrap();
        let span = continue_trace(Some(&came), 0.0, 0.5, || ids.next().unwrap());
        assert_eq!(
            span,
            SpanContext {
                trace_id: TRACE,
                span_id: 7,
                sampled: true,
                debug: false,
            }
        );
        inject(&mut map, span, Some(&came));
        let get = |name: &str| map.get(name).map(|v| v.to_str().unwrap().to_owned());
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

        // Single-header B3 goes on as one, 64 bits wide as it came, debug
        // kept; a zero id from the generator is never used.
        let single = extract(&headers(&[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7-d")])).unwrap();
        let span = continue_trace(Some(&single), 0.0, 0.5, || ids.next().unwrap());
        assert_eq!(span.span_id, 9);
        assert!(span.sampled && span.debug);
        let mut out = HeaderMap::new();
        inject(&mut out, span, Some(&single));
        assert_eq!(
            out.get("b3").unwrap(),
            "a3ce929d0e0e4736-0000000000000009-d"
        );
        assert!(out.get("x-b3-traceid").is_none());
        assert!(
            out.get("traceparent")
                .unwrap()
                .to_str()
                .unwrap()
                .ends_with("-01")
        );

        // Debug in several headers goes on as x-b3-flags.
        let debug = extract(&headers(&[
            ("x-b3-traceid", "4bf92f3577b34da6a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-flags", "1"),
        ]))
        .unwrap();
        let span = continue_trace(Some(&debug), 0.0, 0.5, || 5);
        let mut out = HeaderMap::new();
        inject(&mut out, span, Some(&debug));
        assert_eq!(out.get("x-b3-flags").unwrap(), "1");
        assert!(out.get("x-b3-sampled").is_none());
    }

    #[test]
    fn deferred_and_new_traces_are_decided_at_the_ratio() {
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
        // B3 without a decision: this proxy decides, in the same trace.
        let deferred = incoming(Some((TRACE, SPAN)), Sampling::Defer);
        let kept = continue_trace(Some(&deferred), 0.25, 0.2, &mut counter);
        assert_eq!((kept.trace_id, kept.sampled), (TRACE, true));
        assert!(!continue_trace(Some(&deferred), 0.25, 0.9, &mut counter).sampled);
        // A decision alone starts a trace and keeps it.
        let denied = incoming(None, Sampling::Deny);
        assert!(!continue_trace(Some(&denied), 1.0, 0.0, &mut counter).sampled);
    }
}
