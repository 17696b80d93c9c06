//! Whether a client speaks HTTP, from its first bytes: an HTTP/1.x request
//! line is a method, a space, a target, and ` HTTP/1.1` or ` HTTP/1.0`
//! (so RTSP, SIP or a Redis inline command, which also start with a verb,
//! are not taken for it); an HTTP/2 connection starts with the client
//! preface (RFC 9113 §3.4, prior knowledge). Nothing is sent to the
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

/// The most bytes [`sniff`] looks at: a request line longer than this
/// (a long target) is taken for HTTP once its method is known.
pub const NEEDED: usize = 1024;

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
            Some(true) => return request_line(first),
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

/// `first` starts with a method: HTTP if its line ends with the version.
fn request_line(first: &[u8]) -> Sniffed {
    let Some(end) = first.iter().position(|&b| b == b'\n') else {
        return if first.len() >= NEEDED {
            Sniffed::Http1
        } else {
            Sniffed::NeedMore
        };
    };
    let line = &first[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
        Sniffed::Http1
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
            (b"GET / HTTP/1.0\nhost: a\n", Sniffed::Http1),
            (b"OPTIONS * HTTP/1.1\r\n", Sniffed::Http1),
            (b"PATCH /x HTTP/1.1\r\nhost", Sniffed::Http1),
            (H2_PREFACE, Sniffed::Http2),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00", Sniffed::Http2),
            // Prefixes of several candidates: P could be POST, PUT, PATCH
            // or the preface.
            (b"", Sniffed::NeedMore),
            (b"P", Sniffed::NeedMore),
            (b"PRI * HTTP/2", Sniffed::NeedMore),
            (b"GET", Sniffed::NeedMore),
            (b"GET ", Sniffed::NeedMore),
            (b"PATCH /x HTTP/1.1", Sniffed::NeedMore),
            (b"DELE", Sniffed::NeedMore),
            // Not HTTP.
            (b"\x16\x03\x01\x02\x00", Sniffed::Other),
            (b"hello\n", Sniffed::Other),
            (b"get / HTTP/1.1", Sniffed::Other),
            (b"GETX / HTTP/1.1", Sniffed::Other),
            (b"PRI * HTTP/1.1\r\n", Sniffed::Other),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Sniffed::Other),
            (b"*3\r\n$3\r\nSET\r\n", Sniffed::Other),
            // A verb, but not HTTP's request line.
            (b"OPTIONS rtsp://cam/1 RTSP/1.0\r\n", Sniffed::Other),
            (b"OPTIONS sip:a@b SIP/2.0\r\n", Sniffed::Other),
            (b"GET session:42\r\n", Sniffed::Other),
            (b"GET / HTTP/2.0\r\n", Sniffed::Other),
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
    fn a_request_line_longer_than_what_is_peeked_is_http() {
        let mut long = b"GET /".to_vec();
        long.resize(NEEDED - 1, b'a');
        assert_eq!(sniff(&long), Sniffed::NeedMore);
        long.push(b'a');
        assert_eq!(sniff(&long), Sniffed::Http1);
        let mut not = b"HEAD".to_vec();
        not.resize(NEEDED, b'a');
        assert_eq!(sniff(&not), Sniffed::Other);
    }

    #[test]
    fn the_longest_candidate_fits_what_is_peeked() {
        assert!(METHODS.iter().all(|m| m.len() <= NEEDED));
        assert!(H2_PREFACE.len() <= NEEDED);
    }
}
