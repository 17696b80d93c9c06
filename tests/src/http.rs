//! Minimal HTTP/1.0 GET and PUT, enough to use the node proxy's admin
//! endpoint without pulling an HTTP client into the harness.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// A response: status code and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// `GET path` from `addr`, with a 10 s bound on connecting and on each read.
pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    request(addr, "GET", path, None)
}

/// `PUT path` with a JSON `body`.
pub fn put_json(addr: SocketAddr, path: &str, body: &str) -> io::Result<Response> {
    request(addr, "PUT", path, Some(body))
}

/// The value of `series` (a metric's name and labels, exactly as exposed)
/// on `addr`'s `/metrics`, as text; `None` when no such series is there.
pub fn metric(addr: SocketAddr, series: &str) -> io::Result<Option<String>> {
    let response = get(addr, "/metrics")?;
    if response.status != 200 {
        return Err(io::Error::other(format!(
            "{addr}/metrics answered {}",
            response.status
        )));
    }
    Ok(response
        .body
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().to_owned()))
}

/// Waits until `GET path` from `addr` answers 200 (`what` names the
/// server in the error), polling every `every`, for at most `limit`.
pub fn wait_for_ok(
    addr: SocketAddr,
    path: &str,
    what: &str,
    every: Duration,
    limit: Duration,
) -> io::Result<()> {
    let deadline = std::time::Instant::now() + limit;
    while !get(addr, path).is_ok_and(|r| r.status == 200) {
        if std::time::Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} did not answer {path} within {limit:?}"),
            ));
        }
        std::thread::sleep(every);
    }
    Ok(())
}

fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> io::Result<Response> {
    let timeout = Duration::from_secs(10);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n")?;
    if let Some(body) = body {
        write!(
            stream,
            "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )?;
    } else {
        write!(stream, "\r\n")?;
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse(&raw)
}

fn parse(raw: &[u8]) -> io::Result<Response> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| invalid("HTTP response without an end of headers"))?;
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid("HTTP response without a status line"))?;
    Ok(Response {
        status,
        body: body.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_body() {
        let r = parse(b"HTTP/1.0 404 Not Found\r\ncontent-length: 3\r\n\r\nno\n").unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.body, "no\n");
    }

    #[test]
    fn rejects_truncated_responses() {
        assert!(parse(b"HTTP/1.0 200 OK\r\ncontent-length: 3").is_err());
        assert!(parse(b"\r\n\r\n").is_err());
    }
}
