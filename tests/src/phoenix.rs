//! A real trace store: arize-phoenix (PyPI, installed by `cargo xtask
//! test` into `~/.cache/mesh/phoenix`), taking OTLP/HTTP on `/v1/traces`
//! and answering what it stored on its own REST API.

use std::{io, net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use crate::{
    http,
    process::{Process, free_port},
};

#[derive(Debug)]
pub struct Phoenix {
    process: Option<Process>,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

/// Where `cargo xtask test` installs phoenix (`MESH_PHOENIX` overrides).
fn executable() -> io::Result<PathBuf> {
    if let Some(path) = std::env::var_os("MESH_PHOENIX") {
        return Ok(PathBuf::from(path));
    }
    let home = std::env::var_os("HOME").ok_or_else(|| io::Error::other("HOME is not set"))?;
    let path = PathBuf::from(home).join(".cache/mesh/phoenix/bin/phoenix");
    if path.is_file() {
        Ok(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is missing: `cargo xtask test` installs arize-phoenix there",
                path.display()
            ),
        ))
    }
}

impl Phoenix {
    /// Starts phoenix with an empty store; returns once it answers.
    pub fn start() -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (port, grpc) = (free_port()?, free_port()?);
        let mut command = Command::new(executable()?);
        command
            .arg("serve")
            .env("PHOENIX_WORKING_DIR", dir.path())
            .env("PHOENIX_HOST", "127.0.0.1")
            .env("PHOENIX_PORT", port.to_string())
            .env("PHOENIX_GRPC_PORT", grpc.to_string())
            .env("PHOENIX_TELEMETRY_ENABLED", "false");
        let process = Process::spawn("phoenix", command)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        http::wait_for_ok(
            addr,
            "/healthz",
            "phoenix",
            Duration::from_millis(250),
            Duration::from_secs(120),
        )?;
        Ok(Self {
            process: Some(process),
            addr,
            _dir: dir,
        })
    }

    /// Where OTLP/HTTP senders send (`/v1/traces` is appended).
    pub fn otlp_endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span of the default project, as phoenix returns them.
    pub fn spans(&self) -> io::Result<Vec<serde_json::Value>> {
        let response = http::get(self.addr, "/v1/projects/default/spans?limit=1000")?;
        if response.status != 200 {
            return Err(io::Error::other(format!(
                "phoenix answered {}: {}",
                response.status, response.body
            )));
        }
        let answer: serde_json::Value = serde_json::from_str(&response.body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(answer["data"].as_array().cloned().unwrap_or_default())
    }

    /// Stops phoenix: its port no longer answers.
    pub fn stop(&mut self) -> io::Result<()> {
        match self.process.take() {
            Some(process) => process.terminate().map(|_| ()),
            None => Ok(()),
        }
    }
}
