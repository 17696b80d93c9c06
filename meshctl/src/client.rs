//! Talking to the control plane's admin API: where it is, the token, and
//! turning its error bodies into messages that say what to do.

use std::{fmt, path::PathBuf, time::Duration};

use anyhow::Context as _;
use reqwest::{StatusCode, blocking::Response};
use serde::Deserialize;

/// Where the control plane is and how to authenticate.
#[derive(Debug)]
pub struct Client {
    http: reqwest::blocking::Client,
    server: String,
    token: Option<String>,
}

/// The API's error body.
#[derive(Debug, Deserialize)]
pub struct ApiError {
    pub error: String,
    pub message: String,
    #[serde(default)]
    pub problems: Vec<Problem>,
}

/// The problems of one invalid document.
#[derive(Debug, Deserialize)]
pub struct Problem {
    pub document: usize,
    pub resource: Option<String>,
    pub errors: Vec<FieldProblem>,
}

#[derive(Debug, Deserialize)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

/// An error the API returned, ready to print.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub body: ApiError,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.body.error != "invalid" || self.body.problems.is_empty() {
            write!(f, "{}", self.body.message)?;
        } else {
            for problem in &self.body.problems {
                let subject = problem
                    .resource
                    .clone()
                    .unwrap_or_else(|| format!("document {}", problem.document));
                for error in &problem.errors {
                    if error.field.is_empty() {
                        writeln!(f, "{subject}: {}", error.message)?;
                    } else {
                        writeln!(f, "{subject}: {}: {}", error.field, error.message)?;
                    }
                }
            }
            write!(f, "{}", self.body.message)?;
        }
        if self.status == StatusCode::UNAUTHORIZED {
            write!(
                f,
                "\nhint: set MESH_TOKEN or --token, or --token-file (default {})",
                default_token_file().map_or("~/.local/share/mesh/admin-token".into(), |p| p
                    .display()
                    .to_string())
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Refused {}

/// The token file `mesh-control init` writes by default.
pub fn default_token_file() -> Option<PathBuf> {
    let data = std::env::var_os("MESH_DATA_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_DATA_HOME").map(|d| PathBuf::from(d).join("mesh")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/mesh")))?;
    Some(data.join("admin-token"))
}

impl Client {
    /// A client for `server`; the token comes from `token`, else the file.
    pub fn new(
        server: &str,
        token: Option<String>,
        token_file: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let token = match token {
            Some(token) => Some(token),
            None => {
                let explicit = token_file.is_some();
                match token_file.or_else(default_token_file) {
                    Some(path) => match std::fs::read_to_string(&path) {
                        Ok(text) => Some(text.trim().to_owned()),
                        Err(e) if explicit => {
                            return Err(e).with_context(|| {
                                format!("reading the token file {}", path.display())
                            });
                        }
                        Err(_) => None,
                    },
                    None => None,
                }
            }
        };
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            server: server.trim_end_matches('/').to_owned(),
            token,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server)
    }

    fn send(&self, request: reqwest::blocking::RequestBuilder) -> anyhow::Result<Response> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().with_context(|| {
            format!(
                "cannot reach the control plane at {}: is mesh-control running? (--server or MESH_SERVER)",
                self.server
            )
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(ApiError {
            error: "unexpected".into(),
            message: format!("the control plane answered {status}: {}", text.trim()),
            problems: vec![],
        });
        Err(Refused { status, body }.into())
    }

    pub fn get_json(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> anyhow::Result<serde_json::Value> {
        let response = self.send(self.http.get(self.url(path)).query(query))?;
        response
            .json()
            .context("reading the control plane's answer")
    }

    pub fn delete(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<serde_json::Value> {
        let response = self.send(self.http.delete(self.url(path)).query(query))?;
        response
            .json()
            .context("reading the control plane's answer")
    }

    pub fn put_json(
        &self,
        path: &str,
        query: &[(&str, &str)],
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let response = self.send(self.http.put(self.url(path)).query(query).json(body))?;
        response
            .json()
            .context("reading the control plane's answer")
    }

    /// A DELETE answered with no body.
    pub fn delete_empty(&self, path: &str) -> anyhow::Result<()> {
        self.send(self.http.delete(self.url(path)))?;
        Ok(())
    }

    pub fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let response = self.send(self.http.post(self.url(path)).json(body))?;
        response
            .json()
            .context("reading the control plane's answer")
    }

    pub fn apply(&self, body: String, dry_run: bool) -> anyhow::Result<serde_json::Value> {
        let query: &[(&str, &str)] = if dry_run { &[("dry_run", "true")] } else { &[] };
        let request = self
            .http
            .post(self.url("/api/v1/apply"))
            .query(query)
            .header(reqwest::header::CONTENT_TYPE, "application/yaml")
            .body(body);
        self.send(request)?
            .json()
            .context("reading the control plane's answer")
    }
}
