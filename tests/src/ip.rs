//! Runs iproute2's `ip`, turning a failure into an error that names the
//! command and what `ip` said.

use std::process::Command;

use crate::cluster::ClusterError;

/// Runs `ip ARGS...`.
pub(crate) fn ip(args: &[&str]) -> Result<(), ClusterError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| ClusterError::Io {
            context: "running `ip` (is iproute2 installed?)".into(),
            source,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Runs `ip -n NETNS ARGS...`.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> Result<(), ClusterError> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    ip(&full)
}
