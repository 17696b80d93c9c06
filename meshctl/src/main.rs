//! `meshctl`: the operator's command-line tool. It talks to mesh-control's
//! admin API; the server and token come from flags, the environment, or the
//! token file `mesh-control init` wrote.

mod client;
mod config;
mod output;

use std::{io::Read as _, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use mesh_model::{Document, Kind, Resource, parse_documents, resource::DEFAULT_NAMESPACE};

use crate::{client::Client, output::Format};

/// Where mesh-control listens by default.
const DEFAULT_SERVER: &str = "http://127.0.0.1:15100";

/// Operate the mesh.
///
/// Examples:
///   meshctl apply -f shop.yaml
///   meshctl get trafficsplits -n shop
///   meshctl describe service reviews -n shop
#[derive(Debug, Parser)]
#[command(version)]
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
    },
    /// Print meshctl's version and the control plane's.
    ///
    /// Example: meshctl version
    Version,
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
        Command::Apply { files } => {
            let body = read_files(&files)?;
            let answer = client()?.apply(body)?;
            for result in answer["results"].as_array().into_iter().flatten() {
                println!(
                    "{} {}",
                    result["resource"].as_str().unwrap_or("?").to_lowercase(),
                    result["action"].as_str().unwrap_or("?")
                );
            }
            println!("revision {}", answer["revision"]);
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
        Command::Describe {
            kind,
            name,
            namespace,
        } => {
            if parse_kind(&kind)? != Kind::Service {
                bail!("describe supports services only (meshctl describe service NAME)");
            }
            let answer = client()?.get_json(
                &format!("/api/v1/services/{name}/describe"),
                &[("namespace", namespace.as_str())],
            )?;
            print!("{}", describe::service(&answer)?);
            Ok(())
        }
    }
}

mod describe;

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
