//! Whether a client speaks HTTP, from its first bytes: an HTTP/1.x request
//! line starts with a method and a space, an HTTP/2 connection with the
//! client preface (RFC 9113 §3.4, prior knowledge). Nothing is sent to the
//! client to find out, so detection costs no round trip — only the wait
//! for the bytes a client-first protocol sends anyway.

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    Http2,
    /// Not HTTP: carried as TCP.
    Other,
    /// Could still be either: wait for more.
    NeedMore,
}

/// RFC 9113 §3.4.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The methods recognised (RFC 9110 §9 and PATCH), with their space.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// The most bytes [`sniff`] needs to decide.
pub const NEEDED: usize = H2_PREFACE.len();

/// Decides from `first`, the bytes the client sent so far.
pub fn sniff(first: &[u8]) -> Sniffed {
    if first.is_empty() {
        return Sniffed::NeedMore;
    }
    // A prefix of the candidate: undecided; the candidate whole: decided.
    let against = |candidate: &[u8]| {
        let n = first.len().min(candidate.len());
        (first[..n] == candidate[..n]).then_some(first.len() >= candidate.len())
    };
    let mut undecided = false;
    match against(H2_PREFACE) {
        Some(true) => return Sniffed::Http2,
        Some(false) => undecided = true,
        None => {}
    }
    for method in METHODS {
        match against(method) {
            Some(true) => return Sniffed::Http1,
            Some(false) => undecided = true,
            None => {}
        }
    }
    if undecided {
        Sniffed::NeedMore
    } else {
        Sniffed::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_decide_or_ask_for_more() {
        for (first, expected) in [
            (&b"GET / HTTP/1.1\r\n"[..], Sniffed::Http1),
            (b"GET ", Sniffed::Http1),
            (b"OPTIONS * HTTP/1.1\r\n", Sniffed::Http1),
            (b"PATCH /x HTTP/1.1", Sniffed::Http1),
            (H2_PREFACE, Sniffed::Http2),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00", Sniffed::Http2),
            // Prefixes of several candidates: P could be POST, PUT, PATCH
            // or the preface.
            (b"", Sniffed::NeedMore),
            (b"P", Sniffed::NeedMore),
            (b"PRI * HTTP/2", Sniffed::NeedMore),
            (b"GET", Sniffed::NeedMore),
            (b"DELE", Sniffed::NeedMore),
            // Not HTTP.
            (b"\x16\x03\x01\x02\x00", Sniffed::Other),
            (b"hello\n", Sniffed::Other),
            (b"get / HTTP/1.1", Sniffed::Other),
            (b"GETX / HTTP/1.1", Sniffed::Other),
            (b"PRI * HTTP/1.1\r\n", Sniffed::Other),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Sniffed::Other),
            (b"*3\r\n$3\r\nSET\r\n", Sniffed::Other),
        ] {
            assert_eq!(
                sniff(first),
                expected,
                "{:?}",
                String::from_utf8_lossy(first)
            );
        }
    }

    #[test]
    fn the_longest_candidate_fits_what_is_peeked() {
        assert!(METHODS.iter().all(|m| m.len() <= NEEDED));
    }
}
