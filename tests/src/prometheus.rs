//! A real Prometheus server (Debian package `prometheus`) scraping the
//! given targets every second, queried through its own HTTP API.

use std::{io, net::SocketAddr, process::Command, time::Duration};

use crate::{
    http,
    process::{Process, free_port},
};

#[derive(Debug)]
pub struct Prometheus {
    _process: Process,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `/metrics` of each of `targets`; returns
    /// once it serves queries.
    pub fn start(targets: &[SocketAddr]) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n- job_name: mesh\n  static_configs:\n  - targets: [{}]\n",
                targets.join(", ")
            ),
        )?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn");
        let process = Process::spawn("prometheus", command)?;
        http::wait_for_ok(
            addr,
            "/-/ready",
            "prometheus",
            Duration::from_millis(100),
            Duration::from_secs(30),
        )?;
        Ok(Self {
            _process: process,
            addr,
            _dir: dir,
        })
    }

    /// The value of the instant query `expr` now, when it has exactly one
    /// sample.
    pub fn query(&self, expr: &str) -> io::Result<Option<f64>> {
        let response = http::get(self.addr, &format!("/api/v1/query?query={}", encode(expr)))?;
        if response.status != 200 {
            return Err(io::Error::other(format!(
                "prometheus answered {}: {}",
                response.status, response.body
            )));
        }
        let answer: serde_json::Value = serde_json::from_str(&response.body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let result = answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let [sample] = result.as_slice() else {
            return Ok(None);
        };
        Ok(sample["value"][1].as_str().and_then(|v| v.parse().ok()))
    }
}

/// `text` percent-encoded for a query string.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            super::encode("sum(a{b=\"c d\"})"),
            "sum%28a%7Bb%3D%22c%20d%22%7D%29"
        );
    }
}
