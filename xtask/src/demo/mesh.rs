//! The running demo mesh: its cluster, control plane, node proxies and
//! sample application, and the few things the walkthrough does with them.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use mesh_e2e::{Cluster, cluster::Teardown, http, otlp::Collector, process::Process};

use super::{bin, check_interrupted};

/// What `mesh-pod http` printed: answers by status, by the proxy's
/// `x-mesh-flags`, and by body.
#[derive(Debug)]
pub struct Answers(serde_json::Value);

impl Answers {
    /// How many requests got a 200.
    pub fn ok(&self) -> u64 {
        self.0["ok"].as_u64().unwrap_or(0)
    }

    pub fn status(&self, status: &str) -> u64 {
        self.count("statuses", status)
    }

    pub fn flag(&self, flag: &str) -> u64 {
        self.count("flags", flag)
    }

    pub fn body(&self, body: &str) -> u64 {
        self.count("bodies", body)
    }

    fn count(&self, field: &str, key: &str) -> u64 {
        self.0[field][key].as_u64().unwrap_or(0)
    }

    /// Statuses and their counts, e.g. `200 ×8, 503 ×2`.
    pub fn statuses(&self) -> String {
        let Some(statuses) = self.0["statuses"].as_object() else {
            return "no answers".into();
        };
        statuses
            .iter()
            .map(|(status, n)| format!("{status} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Display for Answers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

pub struct Mesh {
    pub cluster: Cluster,
    pub api: String,
    pub data_dir: PathBuf,
    pub control: Option<Process>,
    /// Each node's proxy and its admin address.
    pub nodes: Vec<(Process, SocketAddr)>,
    /// The application's servers, by pod.
    pub apps: HashMap<String, Process>,
    pub collector: Collector,
}

impl Mesh {
    /// Stops the application, the node proxies (each drains) and the
    /// control plane, then tears the cluster down; the cluster goes even
    /// when a process did not stop cleanly.
    pub fn stop(self) -> anyhow::Result<Teardown> {
        let Self {
            cluster,
            control,
            nodes,
            apps,
            ..
        } = self;
        drop(apps);
        let mut stopped = Ok(());
        let limit = Duration::from_secs(15);
        for (index, (node, _)) in nodes.into_iter().enumerate() {
            if let Err(error) = node.terminate_within(limit) {
                stopped = Err(error).with_context(|| format!("stopping node{index}'s mesh-node"));
            }
        }
        if let Some(control) = control
            && let Err(error) = control.terminate_within(limit)
        {
            stopped = Err(error).context("stopping mesh-control");
        }
        let report = cluster.down()?;
        stopped.map(|()| report)
    }

    /// Runs meshctl against the control plane with `input` on stdin.
    pub fn meshctl(&self, args: &[&str], input: &str) -> anyhow::Result<String> {
        meshctl_at(&bin("meshctl"), &self.api, &self.data_dir, args, input)
    }

    /// Applies `yaml`; returns once every node holds the new revision.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        self.change(&["apply", "-f", "-"], yaml)
    }

    /// Runs the meshctl command that changes the configuration; returns
    /// once every node holds the new revision. (Every demo node runs a
    /// `shop` workload, so every change there reaches every node.)
    pub fn change(&self, args: &[&str], input: &str) -> anyhow::Result<()> {
        let mut before = 0;
        for node in 0..self.nodes.len() {
            before = before.max(self.revision(node)?);
        }
        self.meshctl(args, input)?;
        wait_for("every node to hold the new configuration", || {
            for node in 0..self.nodes.len() {
                if self.revision(node)? <= before {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    fn revision(&self, node: usize) -> anyhow::Result<i64> {
        let config: serde_json::Value =
            serde_json::from_str(&http::get(self.nodes[node].1, "/config")?.body)
                .context("parsing mesh-node's /config")?;
        Ok(config["revision"].as_i64().unwrap_or(0))
    }

    /// The value of the series `series` (name and labels, exactly as
    /// exposed) on `node`'s `/metrics`; 0 when absent.
    pub fn metric(&self, node: usize, series: &str) -> anyhow::Result<u64> {
        match http::metric(self.nodes[node].1, series)? {
            Some(value) => Ok(value
                .parse::<f64>()
                .with_context(|| format!("node{node}'s {series} is {value:?}"))?
                as u64),
            None => Ok(0),
        }
    }

    /// `mesh-pod http --to TO ARGS` in pod `from`: what came back.
    pub fn requests(&self, from: &str, to: &str, args: &[&str]) -> anyhow::Result<Answers> {
        let output = self
            .cluster
            .pod_command(from, bin("mesh-pod"))?
            .args(["http", "--to", to])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .with_context(|| format!("running mesh-pod in {from}"))?;
        serde_json::from_slice(&output.stdout)
            .map(Answers)
            .with_context(|| {
                format!(
                    "mesh-pod http in {from} printed {:?}",
                    String::from_utf8_lossy(&output.stdout)
                )
            })
    }

    /// How many requests the app server at `addr` has answered, asked
    /// from `from`.
    pub fn hits(&self, from: &str, addr: &str) -> anyhow::Result<u64> {
        let answers = self.requests(from, addr, &["--path", "/hits"])?;
        let bodies = answers.0["bodies"]
            .as_object()
            .context("mesh-pod printed no bodies")?;
        ensure!(bodies.len() == 1, "/hits answered {answers}");
        Ok(bodies.keys().next().map_or(0, |n| n.parse().unwrap_or(0)))
    }

    /// (Re)starts the app server in `pod`: HTTP on 8080 answering `body`,
    /// with `mesh-pod serve-http`'s `faults` flags.
    pub fn serve(&mut self, pod: &str, body: &str, faults: &[&str]) -> anyhow::Result<()> {
        if let Some(old) = self.apps.remove(pod) {
            old.terminate()
                .with_context(|| format!("stopping the server in {pod}"))?;
        }
        let mut command = self.cluster.pod_command(pod, bin("mesh-pod"))?;
        command
            .args(["serve-http", "--listen", "[::]:8080", "--body", body])
            .args(faults);
        let (process, _) =
            Process::spawn_ready(pod, command, "listening", Duration::from_secs(10))?;
        self.apps.insert(pod.to_owned(), process);
        Ok(())
    }

    /// `pod`'s IPv4 address with `port`.
    pub fn addr(&self, pod: &str, port: u16) -> anyhow::Result<String> {
        Ok(format!("{}:{port}", self.cluster.pod(pod)?.ip4))
    }
}

/// Runs the `meshctl` binary at `path` against the control plane at `api`
/// whose data is in `data_dir`, with `input` on stdin; fails with what it
/// printed unless it succeeds.
pub(crate) fn meshctl_at(
    path: &Path,
    api: &str,
    data_dir: &Path,
    args: &[&str],
    input: &str,
) -> anyhow::Result<String> {
    let output = mesh_e2e::control::run_meshctl(path, api, data_dir, args, input)
        .context("running meshctl")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "meshctl {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(stdout)
}

/// Polls `done` every 100 ms until it holds (30 s at most); `what` names
/// what it waits for in the error.
pub fn wait_for(what: &str, mut done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done()? {
        ensure!(Instant::now() < deadline, "waited 30 s for {what}");
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
