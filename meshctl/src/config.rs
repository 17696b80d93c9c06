//! meshctl's optional config file, for what flags and the environment do
//! not say: `$XDG_CONFIG_HOME/mesh/meshctl.yaml` (or `~/.config/...`), or
//! the file named by `--config`.
//!
//! ```yaml
//! server: http://127.0.0.1:15100
//! token_file: /var/lib/mesh/admin-token
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: Option<String>,
    pub token_file: Option<PathBuf>,
}

fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("mesh/meshctl.yaml"))
}

/// Reads the config file: the one named (which must exist), else the
/// default one if present.
pub fn load(named: Option<&Path>) -> anyhow::Result<Config> {
    let path = match named {
        Some(path) => path.to_owned(),
        None => match default_path() {
            Some(path) if path.exists() => path,
            _ => return Ok(Config::default()),
        },
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    serde_yaml_ng::from_str(&text)
        .with_context(|| format!("parsing the config file {}", path.display()))
}
