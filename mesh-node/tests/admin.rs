//! The admin endpoint of a real `mesh-node` (no capture, no control
//! plane): where it may listen, and who may use it.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// A running `mesh-node`, killed on drop.
struct Node {
    child: Child,
    /// The `ready` line's fields.
    ready: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn field(&self, name: &str) -> SocketAddr {
        self.ready
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.ready))
            .parse()
            .unwrap()
    }
}

fn mesh_node(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mesh-node"));
    command
        .args(args)
        .env_remove("MESH_NODE_ADMIN_ADDR")
        .env_remove("MESH_NODE_ADMIN_TOKEN_FILE")
        .env_remove("MESH_NODE_METRICS_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Starts `mesh-node ARGS` and waits for its `ready` line.
fn start(args: &[&str]) -> Node {
    let mut child = mesh_node(args).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut ready = String::new();
    stdout.read_line(&mut ready).unwrap();
    let node = Node { child, ready };
    assert!(node.ready.starts_with("ready "), "{:?}", node.ready);
    node
}

/// `METHOD path` with `headers`; the status code and the body.
fn call(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: node\r\nconnection: close\r\n{headers}\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    (status, body)
}

/// Runs `mesh-node ARGS`, which should refuse to start; its output, or a
/// failure if it still runs after 10 s.
fn refused(args: &[&str]) -> std::process::Output {
    let mut child = mesh_node(args).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!("mesh-node {args:?} started: {output:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn an_admin_endpoint_off_loopback_is_refused_without_a_token() {
    let output = refused(&["--admin-addr", "0.0.0.0:0"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--admin-addr 0.0.0.0:0 is not a loopback address")
            && stderr.contains("--admin-token-file")
            && stderr.contains("--metrics-addr"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, "secret\n").unwrap();
    let output = refused(&[
        "--admin-addr",
        "0.0.0.0:0",
        "--admin-token-file",
        short.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("use at least 16"), "{stderr}");
}

#[test]
fn with_a_token_only_health_and_metrics_are_open() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin-token");
    let token = "0123456789abcdef0123456789abcdef";
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let node = start(&[
        "--admin-addr",
        "0.0.0.0:0",
        "--admin-token-file",
        file.to_str().unwrap(),
    ]);
    let admin = SocketAddr::from(([127, 0, 0, 1], node.field("admin").port()));
    let bearer = format!("authorization: Bearer {token}\r\n");

    assert_eq!(call(admin, "GET", "/healthz", "", "").0, 200);
    let (status, metrics) = call(admin, "GET", "/metrics", "", "");
    assert_eq!(status, 200);
    assert!(metrics.contains("# TYPE"), "{metrics}");
    for (method, path, body) in [
        ("GET", "/config/dump", ""),
        ("GET", "/certificates", ""),
        ("GET", "/http-access-log", ""),
        ("PUT", "/http-access-log", r#"{"enabled": true}"#),
    ] {
        for headers in ["", "authorization: Bearer 0123456789abcdef\r\n"] {
            let (status, why) = call(admin, method, path, headers, body);
            assert_eq!(status, 401, "{method} {path} with {headers:?}: {why}");
            assert!(why.contains("--admin-token-file"), "{why}");
        }
    }
    let (status, certificates) = call(admin, "GET", "/certificates", &bearer, "");
    assert_eq!(status, 200, "{certificates}");
    // With the token, the switch is reached (this node has no HTTP path
    // to switch).
    let (status, why) = call(
        admin,
        "PUT",
        "/http-access-log",
        &bearer,
        r#"{"enabled": true}"#,
    );
    assert_eq!(status, 404, "{why}");
    assert!(why.contains("carries no mesh traffic"), "{why}");
}

#[test]
fn the_metrics_endpoint_serves_metrics_and_health_only() {
    let node = start(&[
        "--admin-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let metrics = node.field("metrics");
    assert_ne!(metrics, node.field("admin"));
    assert_eq!(call(metrics, "GET", "/healthz", "", "").0, 200);
    let (status, text) = call(metrics, "GET", "/metrics", "", "");
    assert_eq!(status, 200);
    assert!(text.contains("# TYPE"), "{text}");
    for path in [
        "/config/dump",
        "/certificates",
        "/connections",
        "/http-access-log",
    ] {
        assert_eq!(call(metrics, "GET", path, "", "").0, 404, "{path}");
    }
    assert_eq!(
        call(
            metrics,
            "PUT",
            "/http-access-log",
            "",
            r#"{"enabled": true}"#
        )
        .0,
        404
    );
    // The loopback admin endpoint needs no token.
    assert_eq!(
        call(node.field("admin"), "GET", "/certificates", "", "").0,
        200
    );
}
