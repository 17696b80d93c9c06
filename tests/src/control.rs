//! The control plane as the tests run it: the real `mesh-control` binary on
//! the embedded store, and `meshctl` against it.

use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    Cluster,
    process::{Logs, Process, ready_field, workspace_binary},
};

/// A running `mesh-control` and where to reach it.
#[derive(Debug)]
pub struct ControlPlane {
    pub process: Process,
    /// Admin API, `http://host:port`.
    pub api: String,
    /// Node API (gRPC), `host:port`.
    pub grpc: String,
    pub data_dir: PathBuf,
}

impl ControlPlane {
    /// Starts `mesh-control serve` on loopback with its data in `data_dir`
    /// (created by the first start: store, CA, bootstrap token). `command`
    /// lets the caller place it (e.g. in a cluster's system cgroup).
    pub fn start_with(command: Command, data_dir: &Path) -> io::Result<Self> {
        Self::start_at(command, data_dir, "127.0.0.1:0", "127.0.0.1:0")
    }

    /// Starts it listening on `api` and `grpc` (`host:port`): a restart
    /// where the nodes expect it.
    pub fn start_at(command: Command, data_dir: &Path, api: &str, grpc: &str) -> io::Result<Self> {
        Self::start_logged(command, data_dir, api, grpc, Logs::Inherit)
    }

    /// [`ControlPlane::start_at`], its log going to `logs`.
    pub fn start_logged(
        mut command: Command,
        data_dir: &Path,
        api: &str,
        grpc: &str,
        logs: Logs,
    ) -> io::Result<Self> {
        command.arg("--data-dir").arg(data_dir).args([
            "serve",
            "--listen",
            api,
            "--grpc-listen",
            grpc,
        ]);
        let (process, ready) = Process::spawn_ready_with(
            "mesh-control",
            command,
            "ready",
            Duration::from_secs(30),
            logs,
        )?;
        let field = |name| {
            ready_field(&ready, name)
                .map(str::to_owned)
                .ok_or_else(|| io::Error::other(format!("mesh-control said {ready:?}")))
        };
        Ok(Self {
            api: field("api")?,
            grpc: field("grpc")?,
            process,
            data_dir: data_dir.to_owned(),
        })
    }

    /// Starts `mesh-control` as a plain child process.
    pub fn start(data_dir: &Path) -> io::Result<Self> {
        Self::start_with(Command::new(workspace_binary("mesh-control")?), data_dir)
    }

    /// The root certificate nodes trust the control plane with.
    pub fn ca_bundle(&self) -> PathBuf {
        self.data_dir.join("ca/root.pem")
    }

    /// The bootstrap token `mesh-control` made on first start.
    pub fn bootstrap_token_file(&self) -> PathBuf {
        self.data_dir.join("bootstrap-token")
    }

    /// Runs `meshctl` with `stdin`; panics with its output if it fails.
    pub fn meshctl(&self, args: &[&str], stdin: Option<&str>) -> String {
        meshctl(&self.api, &self.data_dir, args, stdin)
    }
}

/// Runs `meshctl --server api ARGS` with `stdin`, as the operator of the
/// control plane whose data is in `data_dir`; panics with its output if it
/// fails.
pub fn meshctl(api: &str, data_dir: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let binary = workspace_binary("meshctl").expect("meshctl is built");
    let output =
        run_meshctl(&binary, api, data_dir, args, stdin.unwrap_or("")).expect("running meshctl");
    assert!(output.status.success(), "meshctl {args:?}: {output:?}");
    String::from_utf8(output.stdout).expect("meshctl prints UTF-8")
}

/// Runs the meshctl at `binary` with `args` against the control plane at
/// `api` whose data (and admin token) is in `data_dir`, `stdin` on its
/// standard input; returns what it printed, whether it succeeded or not.
pub fn run_meshctl(
    binary: &Path,
    api: &str,
    data_dir: &Path,
    args: &[&str],
    stdin: &str,
) -> io::Result<std::process::Output> {
    let mut child = Command::new(binary)
        .args(["--server", api])
        .args(args)
        .env("MESH_DATA_DIR", data_dir)
        .env_remove("MESH_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut input = child.stdin.take().expect("stdin is piped");
    input.write_all(stdin.as_bytes())?;
    drop(input);
    child.wait_with_output()
}

/// The `mesh-node` (`binary`) command for node `index` of `cluster`,
/// joining the control plane at `grpc` whose data is in `data_dir`, and
/// following its workloads into their pods' namespaces; the caller adds
/// its own flags and environment and spawns it.
pub fn node_command(
    cluster: &Cluster,
    index: usize,
    grpc: &str,
    data_dir: &Path,
    binary: &Path,
) -> io::Result<Command> {
    let layout = cluster.layout();
    let mut command = cluster
        .system_command(binary)
        .map_err(|e| io::Error::other(e.to_string()))?;
    command
        .arg("--cgroup")
        .arg(&layout.nodes[index].cgroup)
        .arg("--bpf-pin-dir")
        .arg(layout.bpf_pin_dir(index))
        .args(["--node", &format!("node{index}"), "--control-plane", grpc])
        .arg("--ca-bundle")
        .arg(data_dir.join("ca/root.pem"))
        .arg("--bootstrap-token-file")
        .arg(data_dir.join("bootstrap-token"))
        .arg("--pod-netns")
        .arg(format!(
            "/run/netns/mesh-{}-{{namespace}}-{{name}}",
            layout.name
        ))
        .args(["--admin-addr", "127.0.0.1:0"]);
    Ok(command)
}

/// Spawns a node command (see [`node_command`]); returns it and its admin
/// address once it is ready.
pub fn spawn_node(index: usize, command: Command) -> io::Result<(Process, std::net::SocketAddr)> {
    let (process, ready) = Process::spawn_ready(
        &format!("node{index}"),
        command,
        "ready",
        Duration::from_secs(30),
    )?;
    let admin = ready_field(&ready, "admin")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| io::Error::other(format!("mesh-node said {ready:?}")))?;
    Ok((process, admin))
}

/// Starts `mesh-node` (`binary`) for node `index` of `cluster`, joined to
/// `control`; returns it and its admin address once it is ready.
pub fn start_node(
    cluster: &Cluster,
    index: usize,
    control: &ControlPlane,
    binary: &Path,
) -> io::Result<(Process, std::net::SocketAddr)> {
    let command = node_command(cluster, index, &control.grpc, &control.data_dir, binary)?;
    spawn_node(index, command)
}
