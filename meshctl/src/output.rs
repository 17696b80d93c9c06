//! How meshctl prints resources: tables for people, YAML and JSON for
//! scripts.

use std::fmt::Write as _;

use mesh_model::{
    Document, Resource,
    namespace::captured,
    policy::ServicePolicySpec,
    service::ServicePort,
    split::{HeaderMatch, TrafficSplitSpec},
};

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Yaml,
    Json,
}

/// Prints `value` as JSON or YAML, or `table()` for people.
pub fn show<T: serde::Serialize>(
    value: &T,
    format: Format,
    table: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Yaml => print!("{}", serde_yaml_ng::to_string(value)?),
        Format::Table => print!("{}", table()?),
    }
    Ok(())
}

/// Renders documents: a table (one kind), a YAML stream or JSON.
pub fn render(documents: &[Document], format: Format, single: bool) -> anyhow::Result<String> {
    Ok(match format {
        Format::Json if single => serde_json::to_string_pretty(&documents[0])? + "\n",
        Format::Json => {
            serde_json::to_string_pretty(&serde_json::json!({ "items": documents }))? + "\n"
        }
        Format::Yaml => {
            let mut out = String::new();
            for (i, document) in documents.iter().enumerate() {
                if i > 0 {
                    out.push_str("---\n");
                }
                out.push_str(&serde_yaml_ng::to_string(document)?);
            }
            out
        }
        Format::Table => {
            let resources = documents
                .iter()
                .map(|d| Resource::from_document(d.clone()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    anyhow::anyhow!("the control plane sent an invalid resource: {e:?}")
                })?;
            table(&resources)
        }
    })
}

fn table(resources: &[Resource]) -> String {
    let Some(first) = resources.first() else {
        return "No resources found.\n".into();
    };
    let header: &[&str] = match first {
        Resource::Namespace(_) => &["NAME", "CAPTURE", "REVISION"],
        Resource::Service(_) => &[
            "NAMESPACE",
            "NAME",
            "VIP",
            "PORTS",
            "LOAD-BALANCER",
            "REVISION",
        ],
        Resource::Workload(_) => &[
            "NAMESPACE",
            "NAME",
            "NODE",
            "IP",
            "VERSION",
            "SERVICES",
            "REVISION",
        ],
        Resource::ServicePolicy(_) => &[
            "NAMESPACE",
            "NAME",
            "RETRIES",
            "TIMEOUT",
            "CIRCUIT",
            "REVISION",
        ],
        Resource::TrafficSplit(_) => &[
            "NAMESPACE",
            "NAME",
            "DESTINATION",
            "SOURCE",
            "V1/V2",
            "HEADER-MATCH",
            "REVISION",
        ],
        Resource::AuthorizationPolicy(_) => {
            &["NAMESPACE", "NAME", "TARGET", "ACTION", "RULES", "REVISION"]
        }
    };
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| (*s).to_owned()).collect()];
    for resource in resources {
        let ns = resource.namespace().unwrap_or("").to_owned();
        let name = resource.name().to_owned();
        let rev = resource
            .metadata()
            .resource_version
            .map_or("-".to_owned(), |r| r.to_string());
        rows.push(match resource {
            Resource::Namespace(o) => vec![
                name,
                if captured(&o.metadata) {
                    "enabled"
                } else {
                    "-"
                }
                .into(),
                rev,
            ],
            Resource::Service(o) => vec![
                ns,
                name,
                o.spec
                    .vip
                    .map_or_else(|| "-".to_owned(), |vip| vip.to_string()),
                o.spec.ports.iter().map(port).collect::<Vec<_>>().join(","),
                o.spec.load_balancer.as_str().into(),
                rev,
            ],
            Resource::Workload(o) => vec![
                ns,
                name,
                o.spec.node.clone(),
                o.spec.ip.to_string(),
                o.spec.version.clone(),
                o.spec.services.join(","),
                rev,
            ],
            Resource::ServicePolicy(o) => vec![
                ns,
                name,
                o.spec.retry_attempts.to_string(),
                format!("{}ms", o.spec.timeout_ms),
                circuit(&o.spec),
                rev,
            ],
            Resource::TrafficSplit(o) => vec![
                ns,
                name,
                o.spec.destination.clone(),
                o.spec.source.clone().unwrap_or_else(|| "*".into()),
                format!("{}/{}", o.spec.v1_weight, o.spec.v2_weight),
                header_match(&o.spec),
                rev,
            ],
            Resource::AuthorizationPolicy(o) => vec![
                ns,
                name,
                o.spec.target.clone().unwrap_or_else(|| "*".into()),
                format!("{:?}", o.spec.action).to_lowercase(),
                o.spec.rules.len().to_string(),
                rev,
            ],
        });
    }
    align(&rows)
}

/// Columns padded to their widest cell.
pub fn align(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}   ", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn port(port: &ServicePort) -> String {
    let protocol = serde_json::to_value(port.protocol)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    match port.target_port {
        Some(target) if target != port.port => format!("{}->{target}/{protocol}", port.port),
        _ => format!("{}/{protocol}", port.port),
    }
}

pub fn circuit(spec: &ServicePolicySpec) -> String {
    format!(
        "{}% over {}s, recover {}ms",
        spec.cb_threshold, spec.cb_window_sec, spec.cb_recovery_timeout_ms
    )
}

/// One traffic split in a line: weights, callers, header match.
pub fn split(name: &str, spec: &TrafficSplitSpec) -> String {
    format!(
        "{name}: v1 {} / v2 {}, from {}, header match {}",
        spec.v1_weight,
        spec.v2_weight,
        spec.source.as_deref().unwrap_or("every caller"),
        header_match(spec)
    )
}

pub fn header_match(spec: &TrafficSplitSpec) -> String {
    let Some(matches) = &spec.header_match else {
        return "-".into();
    };
    matches
        .iter()
        .map(|(header, rule)| match rule {
            HeaderMatch::Exact(value) => format!("{header}={value}"),
            HeaderMatch::Rule(rule) => match (&rule.exact, &rule.prefix, &rule.regex) {
                (Some(v), _, _) => format!("{header}={v}"),
                (_, Some(v), _) => format!("{header}^={v}"),
                (_, _, Some(v)) => format!("{header}~={v}"),
                _ => header.clone(),
            },
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_trailing_space_is_trimmed() {
        let rows = vec![
            vec!["NAME".to_owned(), "X".to_owned()],
            vec!["a-long-name".to_owned(), "1".to_owned()],
        ];
        assert_eq!(align(&rows), "NAME          X\na-long-name   1\n");
    }
}
