//! `mesh-control`: the mesh's control plane.

use std::{
    fs,
    io::Write as _,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use mesh_control::{
    api::{self, AppState},
    ca::{self, CaFiles, SealKey},
    grpc::{self, GrpcConfig, RateLimit},
    store::Store,
};
use mesh_model::service::{DEFAULT_SERVICE_RANGES, ServiceRanges};

/// The mesh's control plane: desired state in SQL, served to meshctl over
/// the admin API.
///
/// With no subcommand it serves, initialising its data directory on first
/// run. Example:
///   mesh-control                      # SQLite in ~/.local/share/mesh
///   mesh-control serve --database-url postgres://mesh@db/mesh
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Where the admin token and the embedded database live.
    #[arg(long, env = "MESH_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,

    /// The store: `sqlite://PATH?mode=rwc` or `postgres://...`. Default: a
    /// SQLite file in the data directory.
    #[arg(long, env = "MESH_DATABASE_URL", global = true)]
    database_url: Option<String>,

    /// The trust domain of the CA `init` creates (workload identities are
    /// spiffe://<trust-domain>/ns/<ns>/sa/<sa>).
    #[arg(long, env = "MESH_TRUST_DOMAIN", global = true, default_value = ca::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,

    /// A file of 64 hex characters, mode 0600, outside the data directory
    /// (a Secret on tmpfs, a file a KMS agent writes): the CA's private
    /// key and key-encryption key are then stored sealed with it, and
    /// plaintext ones are sealed on the next start. Without it they are
    /// stored in clear (0600). Make one with `mesh-control seal-key`.
    #[arg(long, env = "MESH_SEAL_KEY_FILE", global = true)]
    seal_key_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the data directory, the admin token meshctl presents, the CA
    /// and a first node bootstrap token (valid 24 h).
    ///
    /// Example: mesh-control init --data-dir /var/lib/mesh
    Init,
    /// Serve the admin API (initialising first if needed).
    ///
    /// Example: mesh-control serve --listen 127.0.0.1:15100
    Serve {
        /// Address of the admin API. Loopback by default: expose it only
        /// behind something that terminates TLS.
        #[arg(long, env = "MESH_LISTEN", default_value = "127.0.0.1:15100")]
        listen: SocketAddr,

        /// Address of the node API (gRPC over TLS: certificates, and
        /// configuration push).
        #[arg(long, env = "MESH_GRPC_LISTEN", default_value = "127.0.0.1:15012")]
        grpc_listen: SocketAddr,

        /// Lifetime of the certificates the CA issues (10s to 365d).
        #[arg(long, env = "MESH_CERTIFICATE_TTL", default_value = "24h", value_parser = mesh_model::duration::parse_duration)]
        certificate_ttl: std::time::Duration,

        /// Certificate requests a node may send at once.
        #[arg(long, env = "MESH_CSR_BURST", default_value_t = RateLimit::default().burst)]
        csr_burst: u32,

        /// Certificate requests per second a node may send in the long run.
        #[arg(long, env = "MESH_CSR_RATE", default_value_t = RateLimit::default().per_second)]
        csr_rate: f64,

        /// The ranges service addresses (`vip`) must come from, comma
        /// separated: the cluster's service CIDRs.
        #[arg(long, env = "MESH_SERVICE_CIDR", default_value = DEFAULT_SERVICE_RANGES)]
        service_cidr: ServiceRanges,

        /// How long an API client may take to send a request head, and
        /// how long a connection may idle between requests, before the
        /// server closes it (slow-header attacks).
        #[arg(long, env = "MESH_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_header_timeout)]
        http_header_timeout: std::time::Duration,

        /// Mirror the Kubernetes cluster it runs in (its service account,
        /// or the kubeconfig) into the store: namespaces, pods, services
        /// and the mesh.io custom resources.
        #[arg(long, env = "MESH_KUBERNETES")]
        kubernetes: bool,
    },
    /// Bring the database schema up to date, then exit.
    ///
    /// Example: mesh-control migrate --database-url postgres://mesh@db/mesh
    Migrate,
    /// Write a new random seal key (for --seal-key-file) to a new 0600
    /// file. Keep it off the data volume and its backups: without it the
    /// CA's sealed files cannot be opened.
    ///
    /// Example: mesh-control seal-key --out /run/secrets/mesh-seal-key
    SealKey {
        /// The file to create; an existing file is never replaced.
        #[arg(long)]
        out: PathBuf,
    },
}

/// A header timeout: a duration of at least a second (shorter cuts every
/// client off).
fn parse_header_timeout(text: &str) -> Result<std::time::Duration, String> {
    let timeout = mesh_model::duration::parse_duration(text)?;
    if timeout < std::time::Duration::from_secs(1) {
        return Err(format!(
            "{text:?} is under a second: every client would be cut off"
        ));
    }
    Ok(timeout)
}

const TOKEN_FILE: &str = "admin-token";
const BOOTSTRAP_TOKEN_FILE: &str = "bootstrap-token";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(Command::SealKey { out }) = &cli.command {
        let key = SealKey::create(out).context("making a seal key")?;
        println!(
            "wrote seal key {} to {} (mode 0600); pass it as --seal-key-file or MESH_SEAL_KEY_FILE, and keep a copy off the data volume",
            key.id(),
            out.display()
        );
        return Ok(());
    }
    let data_dir = match cli.data_dir {
        Some(dir) => dir,
        None => default_data_dir()?,
    };
    let database_url = cli
        .database_url
        .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", data_dir.join("mesh.db").display()));
    let serving = match cli.command {
        Some(Command::Init) => {
            let ca_files = ca_files(&data_dir, cli.seal_key_file.as_deref())?;
            init(&data_dir, &cli.trust_domain, &database_url, &ca_files).await?;
            return Ok(());
        }
        // Handled above: it needs no data directory.
        Some(Command::SealKey { .. }) => return Ok(()),
        Some(Command::Migrate) => {
            let store = Store::open(&database_url).await?;
            println!(
                "schema up to date ({}), revision {}",
                store.backend().name(),
                store.revision().await?
            );
            return Ok(());
        }
        Some(Command::Serve {
            listen,
            grpc_listen,
            csr_burst,
            csr_rate,
            certificate_ttl,
            service_cidr,
            http_header_timeout,
            kubernetes,
        }) => {
            let grpc = GrpcConfig {
                csr_limit: RateLimit {
                    burst: csr_burst,
                    per_second: csr_rate,
                },
                ..GrpcConfig::default()
            };
            Serving {
                listen,
                grpc_listen,
                grpc,
                certificate_ttl,
                service_ranges: service_cidr,
                http_header_timeout,
                kubernetes,
            }
        }
        None => Serving {
            listen: "127.0.0.1:15100".parse()?,
            grpc_listen: "127.0.0.1:15012".parse()?,
            grpc: GrpcConfig::default(),
            certificate_ttl: mesh_identity::ca::DEFAULT_TTL,
            service_ranges: ServiceRanges::default(),
            http_header_timeout: std::time::Duration::from_secs(10),
            kubernetes: false,
        },
    };
    let ca_files = ca_files(&data_dir, cli.seal_key_file.as_deref())?;
    serve(
        &data_dir,
        &cli.trust_domain,
        &database_url,
        &ca_files,
        serving,
    )
    .await
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The CA's files in `data_dir`, sealed with the key in `seal_key_file`
/// if one is given.
fn ca_files(data_dir: &Path, seal_key_file: Option<&Path>) -> anyhow::Result<CaFiles> {
    let files = CaFiles::in_data_dir(data_dir);
    let Some(path) = seal_key_file else {
        return Ok(files);
    };
    let key = SealKey::read(path).context("--seal-key-file")?;
    // Next to the files it seals, it protects nothing from whoever can
    // read the volume or its backups.
    if let (Ok(key_path), Ok(data_dir)) = (path.canonicalize(), data_dir.canonicalize())
        && key_path.starts_with(&data_dir)
    {
        tracing::warn!(
            seal_key_file = %path.display(),
            data_dir = %data_dir.display(),
            "the seal key is inside the data directory: keep it on another volume, or it protects nothing"
        );
    }
    Ok(files.with_seal_key(key))
}

/// `$XDG_DATA_HOME/mesh`, else `~/.local/share/mesh`.
fn default_data_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return Ok(PathBuf::from(dir).join("mesh"));
    }
    let home =
        std::env::var_os("HOME").context("neither --data-dir, XDG_DATA_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".local/share/mesh"))
}

/// Creates the data directory (0700), the admin token (0600), the CA
/// (root and key-encryption key, secrets 0600, sealed if `ca_files` has a
/// seal key) and a first node bootstrap token (0600). Leaves what exists
/// alone, but seals the CA's plaintext secrets if there is a seal key.
/// Returns the admin token.
async fn init(
    data_dir: &Path,
    trust_domain: &str,
    database_url: &str,
    ca_files: &CaFiles,
) -> anyhow::Result<String> {
    let token = init_files(data_dir, trust_domain, ca_files)?;
    let bootstrap_path = data_dir.join(BOOTSTRAP_TOKEN_FILE);
    if !bootstrap_path.exists() {
        let store = Store::open(database_url).await?;
        let made = store
            .create_bootstrap_token(
                None,
                "made by mesh-control init",
                time::Duration::hours(24),
                time::OffsetDateTime::now_utc(),
            )
            .await?;
        store.close().await;
        write_secret(&bootstrap_path, &made.token)?;
        println!(
            "a node bootstrap token (any node, until {}) is in {}; make more with `meshctl node token create`",
            made.expires_at,
            bootstrap_path.display()
        );
    }
    Ok(token)
}

/// Writes a new 0600 file holding `secret` and a newline.
fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{secret}")?;
    Ok(())
}

fn init_files(data_dir: &Path, trust_domain: &str, ca_files: &CaFiles) -> anyhow::Result<String> {
    let token_path = data_dir.join(TOKEN_FILE);
    let sealed = if ca_files.seal_key().is_some() {
        ", its secrets sealed with the seal key"
    } else {
        ""
    };
    if token_path.exists() {
        if ca_files.exists() {
            ca_files
                .seal_in_place()
                .context("sealing the CA's secret files")?;
        } else {
            ca_files.create(trust_domain).context("creating the CA")?;
            println!(
                "created the mesh CA for trust domain {trust_domain} in {}/ca{sealed}",
                data_dir.display()
            );
        }
        println!(
            "already initialised: the admin token is in {}",
            token_path.display()
        );
        return read_token(&token_path);
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let token = api::generate_token().context("generating the admin token")?;
    write_secret(&token_path, &token)?;
    if ca_files.exists() {
        ca_files
            .seal_in_place()
            .context("sealing the CA's secret files")?;
    } else {
        ca_files.create(trust_domain).context("creating the CA")?;
    }
    println!(
        "created the mesh CA for trust domain {trust_domain} in {}/ca (root.key and kek stay there, never in the database{sealed})",
        data_dir.display()
    );
    println!(
        "initialised {}\nthe admin token is in {} (meshctl reads it from there, or from MESH_TOKEN)",
        data_dir.display(),
        token_path.display()
    );
    Ok(token)
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let token = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let token = token.trim().to_owned();
    if token.len() < 32 {
        bail!(
            "{} holds no usable token (at least 32 characters); delete it and run `mesh-control init`",
            path.display()
        );
    }
    Ok(token)
}

/// How `serve` serves.
struct Serving {
    listen: SocketAddr,
    grpc_listen: SocketAddr,
    grpc: GrpcConfig,
    certificate_ttl: std::time::Duration,
    service_ranges: ServiceRanges,
    http_header_timeout: std::time::Duration,
    kubernetes: bool,
}

async fn serve(
    data_dir: &Path,
    trust_domain: &str,
    database_url: &str,
    ca_files: &CaFiles,
    serving: Serving,
) -> anyhow::Result<()> {
    let Serving {
        listen,
        grpc_listen,
        grpc: grpc_config,
        certificate_ttl,
        service_ranges,
        http_header_timeout,
        kubernetes,
    } = serving;
    let token = init(data_dir, trust_domain, database_url, ca_files).await?;
    let (ca, kek) = ca_files.load().context("loading the CA")?;
    match ca_files.seal_key() {
        Some(seal_key) => tracing::info!(
            trust_domain = ca.trust_domain(),
            kek = kek.id(),
            seal_key = seal_key.id(),
            "CA loaded; its secret files are sealed"
        ),
        None => {
            tracing::info!(
                trust_domain = ca.trust_domain(),
                kek = kek.id(),
                "CA loaded"
            );
            tracing::warn!(
                dir = %data_dir.join("ca").display(),
                "the CA's private key and the KEK are stored unsealed: whoever reads the data volume or a backup of it \
                 can issue identities and open sealed keys. Pass --seal-key-file (MESH_SEAL_KEY_FILE) to seal them"
            );
        }
    }
    let store = Store::open(database_url).await?;
    let revision = store.revision().await?;
    tracing::info!(backend = store.backend().name(), revision, "store ready");
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the admin API to {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "admin API listening");
    let grpc_listener = tokio::net::TcpListener::bind(grpc_listen)
        .await
        .with_context(|| format!("binding the node API to {grpc_listen}"))?;
    let grpc_addr = grpc_listener.local_addr()?;
    tracing::info!(addr = %grpc_addr, "node API (gRPC over TLS) listening");
    let ca = ca.with_ttl(certificate_ttl).context("--certificate-ttl")?;
    let identity = Arc::new(api::Identity::new(ca, kek).with_files(ca_files.clone()));
    let app = api::router(AppState {
        store: store.clone(),
        token: Arc::from(token),
        identity: Some(identity.clone()),
        service_ranges: Arc::new(service_ranges),
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    // How `meshctl proxy-status` names this replica.
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "mesh-control".to_owned());
    let grpc_config = GrpcConfig {
        replica: format!("{host}:{}", grpc_addr.port()),
        ..grpc_config
    };
    let mut grpc = tokio::spawn(grpc::serve(
        grpc_listener,
        store.clone(),
        identity,
        grpc_config,
        stopped(stop_rx.clone()),
    ));
    let _mirror = if kubernetes {
        let client = mesh_control::kubernetes::client()
            .await
            .context("--kubernetes: connecting to the Kubernetes API server")?;
        Some(AbortOnDrop(tokio::spawn(mesh_control::kubernetes::mirror(
            client,
            store.clone(),
            stopped(stop_rx.clone()),
        ))))
    } else {
        None
    };
    let limits = mesh_api::http_server::Limits {
        header_timeout: http_header_timeout,
        ..Default::default()
    };
    let mut admin = tokio::spawn(async move {
        mesh_api::http_server::serve(listener, app, limits, stopped(stop_rx)).await;
        anyhow::Ok(())
    });
    // One line on stdout tells a supervisor (the demo, tests) we are ready.
    println!("ready api=http://{addr} grpc={grpc_addr}");
    std::io::stdout().flush()?;
    // Either server failing stops both; a signal stops both gracefully.
    let failed = tokio::select! {
        () = shutdown_signal() => None,
        done = &mut admin => Some(done.context("the admin API task")?.context("serving the admin API")),
        done = &mut grpc => Some(done.context("the node API task")?.context("serving the node API")),
    };
    let _ = stop_tx.send(true);
    if let Some(result) = failed {
        result?;
        bail!("a server stopped unexpectedly");
    }
    admin
        .await
        .context("the admin API task")?
        .context("serving the admin API")?;
    grpc.await
        .context("the node API task")?
        .context("serving the node API")?;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
