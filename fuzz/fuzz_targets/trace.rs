//! Trace context headers (W3C and both B3 forms), one value per line:
//! never a panic; a context that is read goes on as one the next hop reads
//! back with the same trace, this hop's span as parent, and the decision.
#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use mesh_node::l7::trace::{self, Sampling};

fuzz_target!(|data: &[u8]| {
    let names = [
        trace::TRACEPARENT,
        trace::TRACESTATE,
        trace::B3,
        trace::B3_TRACE_ID,
        trace::B3_SPAN_ID,
        trace::B3_PARENT_SPAN_ID,
        trace::B3_SAMPLED,
        trace::B3_FLAGS,
    ];
    let mut headers = HeaderMap::new();
    for (line, name) in data.split(|&b| b == b'\n').zip(names.iter().cycle()) {
        if let Ok(value) = HeaderValue::from_bytes(line) {
            headers.append(name.clone(), value);
        }
    }
    let incoming = trace::extract(&headers);
    let mut next = 0u64;
    let span = trace::continue_trace(incoming.as_ref(), 0.5, 0.25, || {
        next += 0x9e37_79b9_7f4a_7c15;
        next
    });
    let mut onward = HeaderMap::new();
    trace::inject(&mut onward, span, incoming.as_ref());
    let read = trace::extract(&onward).expect("what was injected is read back");
    assert_eq!(read.parent, Some((span.trace_id, span.span_id)));
    let sampled = matches!(read.sampling, Sampling::Accept | Sampling::Debug);
    assert_eq!(sampled, span.sampled);
});
