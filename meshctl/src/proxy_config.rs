//! `meshctl proxy-config NODE`: what one node proxy holds, read from the
//! node itself (its admin endpoint, at the address it reported to the
//! control plane): the services it routes to, their routes (policy and
//! splits), their endpoints, and the certificates it serves with.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, bail};
use mesh_model::{Resource, policy::ServicePolicySpec};

use crate::{
    client::Client,
    describe::resource,
    output::{Format, align, circuit, port, show, split},
};

/// Which part of the node's configuration to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    All,
    /// Services: addresses, ports, load balancing.
    Clusters,
    /// Per service: its policy (timeout, retries, circuit) and splits.
    Routes,
    /// Per service: every endpoint, its version and health.
    Endpoints,
    /// The node's and its workloads' certificates.
    Secrets,
}

/// What the node holds: `GET /config/dump` and `GET /certificates` of its
/// admin endpoint.
#[derive(Debug)]
struct Held {
    revision: serde_json::Value,
    /// Pushed name -> `{version, resource}`.
    resources: serde_json::Map<String, serde_json::Value>,
    certificates: Vec<serde_json::Value>,
}

/// How to reach a node's admin endpoint.
#[derive(Debug, Default)]
pub struct Admin {
    /// `HOST:PORT`; by default, the address the node reported.
    pub address: Option<String>,
    /// Its bearer token, when it is served off loopback.
    pub token: Option<String>,
}

pub fn run(
    client: &Client,
    node: &str,
    endpoint: Admin,
    part: Part,
    format: Format,
) -> anyhow::Result<()> {
    let admin = match endpoint.address {
        Some(admin) => admin,
        None => admin_of(client, node)?,
    };
    let held = fetch(&admin, endpoint.token.as_deref()).with_context(|| {
        format!("reading {node}'s configuration from its admin endpoint {admin}")
    })?;
    // A reported address may be a loopback one, right only on the node's
    // own machine: the node's certificate says whose endpoint answered.
    let answered = held
        .certificates
        .iter()
        .find(|c| c["holder"] == "node")
        .and_then(|c| c["name"].as_str());
    if answered != Some(node) {
        bail!(
            "the admin endpoint at {admin} is {}, not {node}'s; reach {node}'s with --admin HOST:PORT (e.g. through a port-forward)",
            answered.map_or("a node without a certificate".to_owned(), |n| format!(
                "{n}'s"
            ))
        );
    }
    let wanted = |p: Part| part == Part::All || part == p;
    let mut json = serde_json::json!({ "node": node, "admin": admin, "revision": held.revision });
    let of_kinds = |kinds: &[&str]| -> serde_json::Value {
        held.resources
            .iter()
            .filter(|(name, _)| kinds.iter().any(|k| name.starts_with(&format!("{k}/"))))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    if wanted(Part::Clusters) {
        json["clusters"] = of_kinds(&["service"]);
    }
    if wanted(Part::Routes) {
        json["routes"] = of_kinds(&["servicepolicy", "trafficsplit"]);
    }
    if wanted(Part::Endpoints) {
        json["endpoints"] = of_kinds(&["endpoints"]);
    }
    if wanted(Part::Secrets) {
        json["secrets"] = held.certificates.clone().into();
    }
    show(&json, format, || {
        let mut out = format!("{node} (admin {admin}) holds revision {}\n", held.revision);
        for (p, render) in [
            (
                Part::Clusters,
                clusters as fn(&Held) -> anyhow::Result<String>,
            ),
            (Part::Routes, routes),
            (Part::Endpoints, endpoints),
            (Part::Secrets, secrets),
        ] {
            if wanted(p) {
                out.push('\n');
                out.push_str(&render(&held)?);
            }
        }
        Ok(out)
    })
}

/// The admin address `node` reported when it connected.
fn admin_of(client: &Client, node: &str) -> anyhow::Result<String> {
    let status = client.get_json("/api/v1/proxy-status", &[])?;
    let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
    let Some(entry) = nodes.iter().find(|n| n["node"] == node) else {
        let known: Vec<&str> = nodes.iter().filter_map(|n| n["node"].as_str()).collect();
        bail!(
            "no node {node:?} has connected to the control plane (known: {}); see meshctl proxy-status",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    };
    match entry["admin"].as_str() {
        Some(admin) => Ok(admin.to_owned()),
        None => bail!(
            "{node} has not reported its admin address; give it with --admin HOST:PORT (e.g. through kubectl port-forward)"
        ),
    }
}

fn fetch(admin: &str, token: Option<&str>) -> anyhow::Result<Held> {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let get = |path: &str| -> anyhow::Result<serde_json::Value> {
        let mut request = http.get(format!("http://{admin}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .with_context(|| format!("is mesh-node listening on {admin}?"))?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            bail!(
                "{path} answered {status}: the node's admin endpoint asks for its token; pass it with --admin-token-file (or MESH_NODE_ADMIN_TOKEN){}",
                if token.is_some() {
                    " — the one given is not it"
                } else {
                    ""
                }
            );
        }
        if !status.is_success() {
            bail!(
                "{path} answered {status}: {}",
                response.text().unwrap_or_default().trim()
            );
        }
        Ok(response.json()?)
    };
    let dump = get("/config/dump")?;
    let certificates = get("/certificates")?;
    Ok(Held {
        revision: dump["revision"].clone(),
        resources: dump["resources"].as_object().cloned().unwrap_or_default(),
        certificates: certificates.as_array().cloned().unwrap_or_default(),
    })
}

/// The objects of `kind` (pushed name prefix) the node holds.
fn objects(held: &Held, kind: &str) -> anyhow::Result<Vec<Resource>> {
    held.resources
        .iter()
        .filter(|(name, _)| name.starts_with(&format!("{kind}/")))
        .map(|(_, value)| resource(&value["resource"]))
        .collect()
}

fn clusters(held: &Held) -> anyhow::Result<String> {
    let mut rows = vec![
        ["SERVICE", "VIP", "PORTS", "LOAD-BALANCER"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for object in objects(held, "service")? {
        let Resource::Service(service) = object else {
            continue;
        };
        let spec = &service.spec;
        rows.push(vec![
            format!("{}/{}", service.namespace(), service.name()),
            spec.vip.map_or("-".to_owned(), |vip| vip.to_string()),
            spec.ports.iter().map(port).collect::<Vec<_>>().join(","),
            match &spec.hash_header {
                Some(header) => format!("{} ({header})", spec.load_balancer.as_str()),
                None => spec.load_balancer.as_str().to_owned(),
            },
        ]);
    }
    Ok(align(&rows))
}

fn routes(held: &Held) -> anyhow::Result<String> {
    let policies = objects(held, "servicepolicy")?;
    let splits = objects(held, "trafficsplit")?;
    let mut out = String::new();
    for object in objects(held, "service")? {
        let Resource::Service(service) = object else {
            continue;
        };
        let (namespace, name) = (service.namespace(), service.name());
        let policy = policies.iter().find_map(|p| match p {
            Resource::ServicePolicy(p) if p.namespace() == namespace && p.name() == name => {
                Some(p.spec.clone())
            }
            _ => None,
        });
        let origin = if policy.is_some() {
            "ServicePolicy"
        } else {
            "defaults"
        };
        let policy = policy.unwrap_or_else(ServicePolicySpec::default);
        let _ = writeln!(
            out,
            "{namespace}/{name}: {} retries, timeout {}ms, circuit {} ({origin})",
            policy.retry_attempts,
            policy.timeout_ms,
            circuit(&policy)
        );
        let mut split_any = false;
        for s in &splits {
            if let Resource::TrafficSplit(s) = s
                && s.namespace() == namespace
                && s.spec.destination == name
            {
                split_any = true;
                let _ = writeln!(out, "  split {}", split(s.name(), &s.spec));
            }
        }
        if !split_any {
            let _ = writeln!(out, "  no split: every version, by the load balancer");
        }
    }
    if out.is_empty() {
        out.push_str("No services.\n");
    }
    Ok(out)
}

fn endpoints(held: &Held) -> anyhow::Result<String> {
    let mut rows = vec![
        ["SERVICE", "ENDPOINT", "VERSION", "HEALTHY", "WORKLOAD"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for (name, value) in &held.resources {
        let Some(service) = name.strip_prefix("endpoints/") else {
            continue;
        };
        for endpoint in value["resource"]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let healthy = match (endpoint["healthy"].as_bool(), endpoint["ready"].as_bool()) {
                (Some(true), _) => "yes",
                (_, Some(false)) => "no (not ready)",
                _ => "no (drained)",
            };
            let ip = endpoint["ip"].as_str().unwrap_or("?");
            let address = if ip.contains(':') {
                format!("[{ip}]:{}", endpoint["port"])
            } else {
                format!("{ip}:{}", endpoint["port"])
            };
            rows.push(vec![
                service.to_owned(),
                address,
                endpoint["version"].as_str().unwrap_or("v1").to_owned(),
                healthy.to_owned(),
                endpoint["workload"].as_str().unwrap_or("-").to_owned(),
            ]);
        }
    }
    Ok(align(&rows))
}

fn secrets(held: &Held) -> anyhow::Result<String> {
    let mut rows = vec![
        [
            "HOLDER",
            "NAME",
            "SPIFFE-ID",
            "SERIAL",
            "NOT-AFTER",
            "NEXT-RENEWAL",
            "ROTATIONS",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for cert in &held.certificates {
        let text = |k: &str| cert[k].as_str().unwrap_or("-").to_owned();
        rows.push(vec![
            text("holder"),
            text("name"),
            text("spiffe_id"),
            text("serial"),
            text("not_after"),
            text("next_renewal"),
            cert["rotations"].to_string(),
        ]);
    }
    let mut out = align(&rows);
    for cert in &held.certificates {
        if let Some(error) = cert["last_error"].as_str() {
            let _ = writeln!(
                out,
                "{}: last renewal failed: {error}",
                cert["name"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(out)
}
