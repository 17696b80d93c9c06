//! The yardstick of `bench datapath`: a chain of two HAProxy instances
//! on the mesh's topology. One runs in the client pod and takes plain HTTP
//! (and TCP) on the pod's loopback, as a node proxy takes a captured
//! connection; it carries it over mutual TLS (ECDSA P-256, HTTP/2 between
//! the two, connections reused) to the other, in the server pod, which
//! hands it to the application on its loopback. One thread each, like the
//! node proxy on this machine. Debian's HAProxy (2.6), certificates made
//! with openssl from a throwaway CA.
//!
//! The same two instances also relay plain TCP, without TLS, on two more
//! routes: what a proxy pays per hop here for its process and its extra
//! legs alone, with no work on the bytes.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
};

use anyhow::Context as _;
use mesh_e2e::{Cluster, process::Process};

use crate::run;

/// One proxied route: the client side listens on `front` (loopback in
/// the client pod), the server side on `tunnel` (mTLS), and the
/// application listens on `app` in the server pod.
struct Route {
    name: &'static str,
    http: bool,
    /// The client speaks HTTP/2 (prior knowledge) to the front, and the
    /// server side speaks it to the application.
    h2: bool,
    /// Mutual TLS between the two instances (else plain TCP).
    tls: bool,
    front: u16,
    tunnel: u16,
    app: u16,
}

/// The routes, by what the benchmark sends through them.
const ROUTES: &[Route] = &[
    Route {
        name: "http",
        http: true,
        h2: false,
        tls: true,
        front: 15080,
        tunnel: 15443,
        app: super::datapath::HTTP_PORT,
    },
    Route {
        name: "h2",
        http: true,
        h2: true,
        tls: true,
        front: 15082,
        tunnel: 15445,
        app: super::datapath::H2_PORT,
    },
    Route {
        name: "bulk",
        http: false,
        h2: false,
        tls: true,
        front: 15090,
        tunnel: 15444,
        app: super::datapath::BULK_PORT,
    },
    Route {
        name: "echo",
        http: false,
        h2: false,
        tls: true,
        front: 15091,
        tunnel: 15446,
        app: super::datapath::ECHO_PORT,
    },
    Route {
        name: "relay",
        http: false,
        h2: false,
        tls: false,
        front: 15092,
        tunnel: 15447,
        app: super::datapath::HTTP_PORT,
    },
    Route {
        name: "relay_bulk",
        http: false,
        h2: false,
        tls: false,
        front: 15093,
        tunnel: 15448,
        app: super::datapath::BULK_PORT,
    },
];

/// The address in the client pod where the chain takes what would go to
/// `app` on the server, over mutual TLS.
pub(super) fn front(app: u16) -> anyhow::Result<String> {
    front_of(app, true)
}

/// The address in the client pod where the chain relays plain TCP, no
/// TLS, to `app` on the server.
pub(super) fn relay_front(app: u16) -> anyhow::Result<String> {
    front_of(app, false)
}

fn front_of(app: u16, tls: bool) -> anyhow::Result<String> {
    let route = ROUTES
        .iter()
        .find(|r| r.app == app && r.tls == tls)
        .with_context(|| format!("no HAProxy route to port {app} (TLS: {tls})"))?;
    Ok(format!("127.0.0.1:{}", route.front))
}

/// The two running instances: client side first.
pub(super) struct Haproxy {
    processes: Vec<Process>,
}

impl Haproxy {
    /// Writes the certificates and configurations into `dir` and starts
    /// HAProxy in `client` and in `server` (pods of `cluster`).
    pub(super) fn start(
        cluster: &Cluster,
        client: &str,
        server: &str,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        certificates(dir)?;
        let server_ip = IpAddr::V4(cluster.pod(server)?.ip4);
        let mut processes = Vec::new();
        for (pod, side) in [(client, Side::Client(server_ip)), (server, Side::Server)] {
            let config = dir.join(format!("{}.cfg", side.name()));
            fs::write(&config, configuration(dir, side))?;
            run::run(
                Command::new("haproxy")
                    .arg("-c")
                    .arg("-q")
                    .arg("-f")
                    .arg(&config),
            )
            .context("HAProxy refused its configuration")?;
            let mut command = cluster.pod_command(pod, "haproxy")?;
            command.arg("-db").arg("-f").arg(&config);
            processes.push(Process::spawn(
                &format!("haproxy-{}", side.name()),
                command,
            )?);
            for route in ROUTES {
                let port = match side {
                    Side::Client(_) => route.front,
                    Side::Server => route.tunnel,
                };
                super::datapath::wait_listening(cluster, pod, port)?;
            }
        }
        Ok(Self { processes })
    }

    /// Process ids: client side, server side.
    pub(super) fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(Process::id).collect()
    }
}

#[derive(Clone, Copy)]
enum Side {
    /// Calls the server side at this address.
    Client(IpAddr),
    Server,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Self::Client(_) => "client",
            Self::Server => "server",
        }
    }
}

fn configuration(dir: &Path, side: Side) -> String {
    let ca = dir.join("ca.pem");
    let ca = ca.display();
    let pem = dir.join(format!("{}.pem", side.name()));
    let pem = pem.display();
    // maxconn bounds the descriptors HAProxy asks for (twice it): this
    // machine's hard limit is 20,000.
    let mut config = String::from(
        "global\n    nbthread 1\n    maxconn 4096\n\n\
         defaults\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\n",
    );
    for route in ROUTES {
        let mode = if route.http { "http" } else { "tcp" };
        let (bind, server) = match side {
            Side::Client(peer) if !route.tls => (
                format!("127.0.0.1:{}", route.front),
                SocketAddr::new(peer, route.tunnel).to_string(),
            ),
            Side::Server if !route.tls => (
                format!(":{}", route.tunnel),
                format!("127.0.0.1:{}", route.app),
            ),
            Side::Client(peer) => (
                format!(
                    "127.0.0.1:{}{}",
                    route.front,
                    if route.h2 { " proto h2" } else { "" }
                ),
                format!(
                    "{} ssl crt {pem} ca-file {ca} verify required{}",
                    SocketAddr::new(peer, route.tunnel),
                    if route.http { " alpn h2" } else { "" }
                ),
            ),
            Side::Server => (
                format!(
                    ":{} ssl crt {pem} ca-file {ca} verify required{}",
                    route.tunnel,
                    if route.http { " alpn h2" } else { "" }
                ),
                format!(
                    "127.0.0.1:{}{}",
                    route.app,
                    if route.h2 { " proto h2" } else { "" }
                ),
            ),
        };
        let reuse = if route.http {
            "    http-reuse always\n"
        } else {
            ""
        };
        let _ = write!(
            config,
            "frontend {name}_in\n    mode {mode}\n    bind {bind}\n    default_backend {name}_out\n\n\
             backend {name}_out\n    mode {mode}\n{reuse}    server next {server}\n\n",
            name = route.name,
        );
    }
    config
}

/// A CA and a certificate for each side (ECDSA P-256, SPIFFE IDs as URI
/// SANs, like the mesh's), in HAProxy's one-file form.
fn certificates(dir: &Path) -> anyhow::Result<()> {
    let openssl =
        |args: &[&str]| run::output(Command::new("openssl").current_dir(dir).args(args)).map(drop);
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            ["req", "-x509"].as_slice(),
            &key,
            &["-keyout", "ca.key", "-out", "ca.pem"],
            &["-days", "2", "-subj", "/CN=bench-ca"],
        ]
        .concat(),
    )?;
    for side in ["client", "server"] {
        let extensions = dir.join(format!("{side}.ext"));
        fs::write(
            &extensions,
            format!(
                "subjectAltName=URI:spiffe://bench.local/{side}\n\
                 extendedKeyUsage=serverAuth,clientAuth\n"
            ),
        )?;
        let (csr, crt, keyfile) = (
            format!("{side}.csr"),
            format!("{side}.crt"),
            format!("{side}.key"),
        );
        openssl(
            &[
                ["req"].as_slice(),
                &key,
                &["-keyout", &keyfile, "-out", &csr, "-subj"],
                &[&format!("/CN={side}")],
            ]
            .concat(),
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &crt,
            "-extfile",
            &format!("{side}.ext"),
        ])?;
        let pem = [
            fs::read_to_string(dir.join(&crt))?,
            fs::read_to_string(dir.join(&keyfile))?,
        ]
        .concat();
        fs::write(dir.join(format!("{side}.pem")), pem)?;
    }
    Ok(())
}
