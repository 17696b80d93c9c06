//! `meshctl`: the operator's command-line tool. It talks to mesh-control's
//! admin API; the server and token come from flags, the environment, or the
//! token file `mesh-control init` wrote.

mod ca;
mod client;
mod config;
mod node;
mod output;

use std::{io::Read as _, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use mesh_model::{Document, Kind, Resource, parse_documents, resource::DEFAULT_NAMESPACE};

use crate::{client::Client, output::Format};

/// Where mesh-control listens by default.
const DEFAULT_SERVER: &str = "http://127.0.0.1:15100";

/// Operate the mesh.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  meshctl check\n  meshctl apply -f shop.yaml\n  meshctl get trafficsplits -n shop\n  meshctl describe service reviews -n shop\n  meshctl stat -n shop --watch\n  meshctl completions bash > /etc/bash_completion.d/meshctl"
)]
struct Cli {
    /// The control plane's admin API [default: the config file's `server`,
    /// else http://127.0.0.1:15100].
    #[arg(long, env = "MESH_SERVER", global = true)]
    server: Option<String>,
    /// meshctl's config file (YAML: `server`, `token_file`) [default:
    /// ~/.config/mesh/meshctl.yaml if present].
    #[arg(long, env = "MESHCTL_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// The admin token (default: read from --token-file).
    #[arg(long, env = "MESH_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// File holding the admin token (default: mesh-control's data directory).
    #[arg(long, env = "MESH_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update resources from YAML or JSON files, all or nothing.
    ///
    /// Example: meshctl apply -f shop.yaml -f canary.yaml
    Apply {
        /// A file of one or more documents (`---` separated); `-` is stdin.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Let the control plane check everything and report what would
        /// change, then change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// List resources of a kind, or show one.
    ///
    /// Example: meshctl get svc -A; meshctl get trafficsplit reviews-canary -n shop -o yaml
    Get {
        /// Kind: namespace(s)/ns, service(s)/svc, workload(s)/wl,
        /// servicepolicy(ies)/sp, trafficsplit(s)/ts, authorizationpolicy(ies)/authz.
        kind: String,
        name: Option<String>,
        #[arg(short, long, default_value = DEFAULT_NAMESPACE)]
        namespace: String,
        /// List across every namespace.
        #[arg(short = 'A', long, conflicts_with = "name")]
        all_namespaces: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Delete one resource, or every resource in files.
    ///
    /// Example: meshctl delete ts reviews-canary -n shop; meshctl delete -f shop.yaml
    Delete {
        kind: Option<String>,
        name: Option<String>,
        #[arg(short, long, default_value = DEFAULT_NAMESPACE)]
        namespace: String,
        #[arg(short = 'f', long = "filename", conflicts_with_all = ["kind", "name"])]
        files: Vec<PathBuf>,
    },
    /// Show a service with its policy, splits, authorization and endpoints.
    ///
    /// Example: meshctl describe service reviews -n shop
    Describe {
        /// Only `service` for now.
        kind: String,
        name: String,
        #[arg(short, long, default_value = DEFAULT_NAMESPACE)]
        namespace: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Golden signals per service: requests, rate, success rate, P50 and
    /// P99 latency over a recent window, as the callers' node proxies
    /// measured them (HTTP ports only).
    ///
    /// Example: meshctl stat reviews -n shop --window 5m
    Stat {
        /// One service; all services when left out.
        service: Option<String>,
        /// The service's namespace; all namespaces when left out.
        #[arg(short, long)]
        namespace: Option<String>,
        /// How far back: 1s to 1h.
        #[arg(long, default_value = "1m")]
        window: String,
        /// Print again every 2 s until interrupted.
        #[arg(short, long)]
        watch: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// The busiest edges: each calling workload and service it calls, with
    /// the same signals as `stat`, busiest first.
    ///
    /// Example: meshctl top --window 5m
    Top {
        /// Edges into this namespace's services only.
        #[arg(short, long)]
        namespace: Option<String>,
        #[arg(long, default_value = "1m")]
        window: String,
        #[arg(short, long)]
        watch: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Certificates: list what the CA issued, or issue one with a
    /// CA-generated key for a workload outside the mesh.
    ///
    /// Example: meshctl cert issue --namespace edge --service-account gateway --out-dir ./gw
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// The mesh CA: its roots, and rotating them without breaking a
    /// connection (stage, activate, retire).
    ///
    /// Example: meshctl ca rotate-root
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Check the mesh's health: the control plane, its store and token,
    /// the CA's roots, every node's configuration, every service's
    /// endpoints and canaries; for each problem, what to do. Exits 1 when
    /// it finds an error.
    ///
    /// With --node, check instead that this machine can run mesh-node:
    /// kernel, cgroup v2, bpffs, capabilities and the BPF features the
    /// capture programs use (no control plane needed).
    ///
    /// Example: meshctl check -o json
    /// Example: meshctl check --node --cgroup /sys/fs/cgroup/kubepods.slice
    Check {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
        /// Check this machine's prerequisites for mesh-node, with this
        /// process's privileges (run it where mesh-node runs).
        #[arg(long)]
        node: bool,
        /// With --node: the cgroup mesh-node will attach to (its --cgroup).
        #[arg(long, requires = "node")]
        cgroup: Option<PathBuf>,
    },
    /// What one node proxy holds, read from the node itself: its services
    /// (clusters), their policies and splits (routes), their endpoints,
    /// and its certificates (secrets).
    ///
    /// Example: meshctl proxy-config node1 --type routes
    ProxyConfig {
        /// The node, as meshctl proxy-status lists it.
        node: String,
        #[arg(long = "type", value_enum, default_value = "all")]
        part: proxy_config::Part,
        /// The node's admin endpoint (HOST:PORT), instead of the address it
        /// reported (e.g. a kubectl port-forward).
        #[arg(long)]
        admin: Option<String>,
        /// The bearer token of a node whose admin endpoint is off loopback
        /// (the token in the node's --admin-token-file).
        #[arg(long, env = "MESH_NODE_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// A file holding that token.
        #[arg(long, conflicts_with = "admin_token")]
        admin_token_file: Option<PathBuf>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Print a shell completion script.
    ///
    /// Example: meshctl completions bash > /etc/bash_completion.d/meshctl
    Completions { shell: clap_complete::Shell },
    /// Each node's configuration against the current revision: SYNCED,
    /// STALE, NACKED (with the node's reason) or DISCONNECTED, and the
    /// replica serving it.
    ///
    /// Example: meshctl proxy-status
    ProxyStatus {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Endpoints: take one out of (or back into) rotation. Nodes calling
    /// the service learn it through the configuration push.
    ///
    /// Example: meshctl endpoint health reviews 10.89.1.2:9080 --healthy false -n shop
    Endpoint {
        #[command(subcommand)]
        command: EndpointCommand,
    },
    /// Nodes: the bootstrap tokens they join the mesh with.
    ///
    /// Example: meshctl node token create --node node1 --ttl 1h
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Print meshctl's version and the control plane's.
    ///
    /// Example: meshctl version
    Version,
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// List issued certificates: identity, serial, expiry, state.
    ///
    /// Example: meshctl cert list --workload shop/frontend-1
    List {
        /// Only this record name (`<service-account>.<namespace>` for
        /// certificates issued with `cert issue`).
        #[arg(long, conflicts_with = "workload")]
        service: Option<String>,
        /// Only the certificates of one mesh workload, `namespace/name`.
        #[arg(long)]
        workload: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Issue a certificate and key (the key is generated by the CA, sealed
    /// in its store, and written here once). For gateways and VMs; mesh
    /// workloads get theirs from their node.
    ///
    /// Example: meshctl cert issue -n edge --service-account gateway --out-dir ./gw
    Issue {
        #[arg(short, long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        /// The record name (default `<service-account>.<namespace>`).
        #[arg(long)]
        service: Option<String>,
        /// Where to write cert.pem, key.pem (0600) and bundle.pem.
        #[arg(long)]
        out_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// The trust domain, certificate lifetime and every root with its
    /// state (signing, staged, retiring).
    ///
    /// Example: meshctl ca status -o json
    Status {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Rotate the root, make-before-break. Without flags: stage a new root,
    /// which nodes start trusting with their next certificate. With
    /// --activate (one certificate lifetime later): the staged root signs,
    /// the old one stays trusted until retired.
    ///
    /// Example: meshctl ca rotate-root && meshctl ca rotate-root --activate
    RotateRoot {
        /// Make the staged root the signing root.
        #[arg(long)]
        activate: bool,
        /// Activate before a certificate lifetime has passed since staging
        /// (nodes that have not renewed since will distrust the control
        /// plane until their bootstrap).
        #[arg(long, requires = "activate")]
        force: bool,
    },
    /// Remove an old root from the trust bundle. Refused while unexpired
    /// certificates the CA recorded chain to it, unless --force.
    ///
    /// Example: meshctl ca retire-root 4a1f...
    RetireRoot {
        serial: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum EndpointCommand {
    /// Mark one endpoint of a service healthy or not.
    ///
    /// Example: meshctl endpoint health reviews 10.89.1.2:9080 --healthy false -n shop
    Health {
        service: String,
        /// The endpoint, `IP:PORT` (`[IPv6]:PORT`).
        endpoint: std::net::SocketAddr,
        #[arg(long, action = clap::ArgAction::Set)]
        healthy: bool,
        #[arg(short, long, default_value = DEFAULT_NAMESPACE)]
        namespace: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Bootstrap tokens: a node presents one to obtain its first node
    /// certificate, then renews with that certificate.
    ///
    /// Example: meshctl node token list
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a token; prints it (once) on stdout.
    ///
    /// Example: meshctl node token create --node node1 --ttl 1h > token
    Create {
        /// Only this node may join with it [default: any node].
        #[arg(long)]
        node: Option<String>,
        /// How long it stays valid (90s, 30m, 24h, 7d).
        #[arg(long, default_value = "24h", value_parser = mesh_model::duration::parse_duration)]
        ttl: std::time::Duration,
        #[arg(long)]
        description: Option<String>,
    },
    /// List tokens (never their secrets).
    ///
    /// Example: meshctl node token list -o json
    List {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Revoke a token by id (the part before the dot).
    ///
    /// Example: meshctl node token delete 1a2b3c4d5e6f
    Delete { id: String },
}

fn proxy_status_table(answer: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let nodes = answer["nodes"].as_array().cloned().unwrap_or_default();
    let mut out = format!("current revision {}\n", answer["revision"]);
    if nodes.is_empty() {
        out.push_str("No node has connected.\n");
        return out;
    }
    let mut rows = vec![
        ["NODE", "STATE", "REVISION", "REPLICA", "LAST-SEEN", "ADMIN"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for node in &nodes {
        let text = |k: &str| node[k].as_str().unwrap_or("-").to_owned();
        rows.push(vec![
            text("node"),
            text("state"),
            node["synced_revision"]
                .as_i64()
                .map_or("-".to_owned(), |r| r.to_string()),
            text("replica"),
            text("last_seen"),
            text("admin"),
        ]);
    }
    out.push_str(&output::align(&rows));
    for node in &nodes {
        if let Some(reason) = node["reason"].as_str() {
            let _ = writeln!(out, "{}: {reason}", node["node"].as_str().unwrap_or("?"));
        }
    }
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            match error.downcast_ref::<client::Refused>() {
                Some(refused) => eprintln!("error: {refused}"),
                None => eprintln!("error: {error:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = config::load(cli.config.as_deref())?;
    let server = cli
        .server
        .clone()
        .or(config.server)
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
    let token_file = cli.token_file.clone().or(config.token_file);
    let client = || Client::new(&server, cli.token.clone(), token_file.clone());
    match cli.command {
        Command::Version => {
            println!("meshctl {}", env!("CARGO_PKG_VERSION"));
            let server_url = &server;
            match client()?.get_json("/version", &[]) {
                Ok(server) => println!(
                    "mesh-control {} ({} store) at {}",
                    server["version"].as_str().unwrap_or("?"),
                    server["backend"].as_str().unwrap_or("?"),
                    server_url
                ),
                Err(error) => println!("mesh-control: unreachable ({error:#})"),
            }
            Ok(())
        }
        Command::Apply { files, dry_run } => {
            let body = read_files(&files)?;
            let answer = client()?.apply(body, dry_run)?;
            let suffix = if dry_run { " (dry run)" } else { "" };
            for result in answer["results"].as_array().into_iter().flatten() {
                println!(
                    "{} {}{suffix}",
                    result["resource"].as_str().unwrap_or("?").to_lowercase(),
                    result["action"].as_str().unwrap_or("?")
                );
            }
            if dry_run {
                println!("revision {} (unchanged: dry run)", answer["revision"]);
            } else {
                println!("revision {}", answer["revision"]);
            }
            Ok(())
        }
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
        } => {
            let kind = parse_kind(&kind)?;
            let client = client()?;
            let mut query = vec![];
            if kind.namespaced() && !all_namespaces {
                query.push(("namespace", namespace.as_str()));
            }
            let documents: Vec<Document> = match &name {
                Some(name) => {
                    let answer =
                        client.get_json(&format!("/api/v1/{}/{name}", kind.plural()), &query)?;
                    vec![serde_json::from_value(answer).context("reading the resource")?]
                }
                None => {
                    let answer = client.get_json(&format!("/api/v1/{}", kind.plural()), &query)?;
                    serde_json::from_value(answer["items"].clone()).context("reading the list")?
                }
            };
            print!("{}", output::render(&documents, output, name.is_some())?);
            Ok(())
        }
        Command::Delete {
            kind,
            name,
            namespace,
            files,
        } => {
            let client = client()?;
            let targets: Vec<(Kind, Option<String>, String)> = if files.is_empty() {
                let (Some(kind), Some(name)) = (kind, name) else {
                    bail!(
                        "name what to delete: `meshctl delete KIND NAME` or `meshctl delete -f FILE`"
                    );
                };
                let kind = parse_kind(&kind)?;
                vec![(kind, kind.namespaced().then_some(namespace), name)]
            } else {
                let resources = parse_documents(&read_files(&files)?).map_err(|problems| {
                    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
                    anyhow::anyhow!("{}", lines.join("\n"))
                })?;
                resources
                    .iter()
                    .rev()
                    .map(|r: &Resource| {
                        (
                            r.kind(),
                            r.namespace().map(str::to_owned),
                            r.name().to_owned(),
                        )
                    })
                    .collect()
            };
            for (kind, namespace, name) in targets {
                let query: Vec<(&str, &str)> = namespace
                    .iter()
                    .map(|ns| ("namespace", ns.as_str()))
                    .collect();
                let answer = client.delete(&format!("/api/v1/{}/{name}", kind.plural()), &query)?;
                let reference = match &namespace {
                    Some(ns) => format!("{kind}/{ns}/{name}"),
                    None => format!("{kind}/{name}"),
                };
                println!(
                    "{} deleted (revision {})",
                    reference.to_lowercase(),
                    answer["revision"]
                );
            }
            Ok(())
        }
        Command::Cert { command } => cert::run(&client()?, command),
        Command::Node { command } => node::run(&client()?, command),
        Command::Ca { command } => ca::run(&client()?, command),
        Command::Endpoint {
            command:
                EndpointCommand::Health {
                    service,
                    endpoint,
                    healthy,
                    namespace,
                },
        } => {
            let answer = client()?.put_json(
                &format!("/api/v1/services/{service}/endpoints/health"),
                &[("namespace", namespace.as_str())],
                &serde_json::json!({
                    "ip": endpoint.ip(),
                    "port": endpoint.port(),
                    "healthy": healthy,
                }),
            )?;
            let state = if healthy { "healthy" } else { "unhealthy" };
            println!(
                "endpoint {endpoint} of {namespace}/{service} marked {state} (revision {})",
                answer["revision"]
            );
            Ok(())
        }
        Command::Stat {
            service,
            namespace,
            window,
            watch,
            output,
        } => {
            let ask = stat::Ask {
                by_edge: false,
                namespace: namespace.as_deref(),
                service: service.as_deref(),
                window: &window,
                format: output,
            };
            show_signals(&client()?, &ask, watch)
        }
        Command::Top {
            namespace,
            window,
            watch,
            output,
        } => {
            let ask = stat::Ask {
                by_edge: true,
                namespace: namespace.as_deref(),
                service: None,
                window: &window,
                format: output,
            };
            show_signals(&client()?, &ask, watch)
        }
        Command::Check {
            output,
            node,
            cgroup,
        } => {
            let findings = if node {
                node_check::run(cgroup.as_deref())
            } else {
                check::run(&client()?, &server, time::OffsetDateTime::now_utc())
            };
            output::show(&findings, output, || Ok(check::render(&findings)))?;
            if findings.iter().any(|f| f.level == check::Level::Error) {
                bail!("the check found errors");
            }
            Ok(())
        }
        Command::ProxyConfig {
            node,
            part,
            admin,
            admin_token,
            admin_token_file,
            output,
        } => {
            let token = match (admin_token, admin_token_file) {
                (Some(token), _) => Some(token),
                (None, Some(file)) => Some(
                    std::fs::read_to_string(&file)
                        .with_context(|| format!("reading --admin-token-file {}", file.display()))?
                        .trim()
                        .to_owned(),
                ),
                (None, None) => None,
            };
            let endpoint = proxy_config::Admin {
                address: admin,
                token,
            };
            proxy_config::run(&client()?, &node, endpoint, part, output)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "meshctl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::ProxyStatus { output } => {
            let answer = client()?.get_json("/api/v1/proxy-status", &[])?;
            output::show(&answer, output, || Ok(proxy_status_table(&answer)))
        }
        Command::Describe {
            kind,
            name,
            namespace,
            output,
        } => {
            if parse_kind(&kind)? != Kind::Service {
                bail!("describe supports services only (meshctl describe service NAME)");
            }
            let answer = client()?.get_json(
                &format!("/api/v1/services/{name}/describe"),
                &[("namespace", namespace.as_str())],
            )?;
            output::show(&answer, output, || describe::service(&answer))
        }
    }
}

mod cert;
mod check;
mod describe;
mod node_check;
mod proxy_config;
mod stat;

/// Prints the signals once, or every 2 s (clearing the terminal) with
/// `watch`.
fn show_signals(client: &Client, ask: &stat::Ask<'_>, watch: bool) -> anyhow::Result<()> {
    loop {
        let text = stat::once(client, ask)?;
        if watch {
            print!("\x1b[2J\x1b[H");
        }
        print!("{text}");
        if !watch {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

fn parse_kind(kind: &str) -> anyhow::Result<Kind> {
    Kind::from_cli(kind).with_context(|| {
        let known: Vec<String> = Kind::ALL
            .iter()
            .map(|k| format!("{} ({})", k.plural(), k.short_names().join(", ")))
            .collect();
        format!("unknown kind {kind:?}; known kinds: {}", known.join(", "))
    })
}

/// The files' contents as one stream of documents.
fn read_files(files: &[PathBuf]) -> anyhow::Result<String> {
    let mut body = String::new();
    for file in files {
        let text = if file.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
            text
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        if !body.is_empty() {
            body.push_str("\n---\n");
        }
        body.push_str(&text);
    }
    Ok(body)
}
