//! `meshctl check`: whether the mesh is healthy, and for each thing that is
//! not, what to do about it. Each finding is an error (the mesh is not
//! doing what its resources say), a warning (it is, but something will go
//! wrong or looks unintended) or a pass.

use std::fmt::Write as _;

use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::client::{Client, Refused};

/// A root expiring sooner than this is a warning.
const ROOT_WARNING_DAYS: i64 = 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Pass,
    Warning,
    Error,
}

#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub group: &'static str,
    pub level: Level,
    pub what: String,
    /// What to do, for a warning or an error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

pub(crate) fn pass(group: &'static str, what: String) -> Finding {
    Finding {
        group,
        level: Level::Pass,
        what,
        hint: None,
    }
}

pub(crate) fn warning(group: &'static str, what: String, hint: &str) -> Finding {
    Finding {
        group,
        level: Level::Warning,
        what,
        hint: Some(hint.to_owned()),
    }
}

pub(crate) fn error(group: &'static str, what: String, hint: &str) -> Finding {
    Finding {
        group,
        level: Level::Error,
        what,
        hint: Some(hint.to_owned()),
    }
}

/// Runs every check against the control plane behind `client`.
pub fn run(client: &Client, server: &str, now: OffsetDateTime) -> Vec<Finding> {
    const GROUP: &str = "control plane";
    let mut findings = Vec::new();
    let version = match client.get_json("/version", &[]) {
        Ok(version) => version,
        Err(e) => {
            findings.push(error(
                GROUP,
                format!("cannot reach mesh-control at {server}: {e:#}"),
                "start it (mesh-control serve), or point meshctl at it with --server or MESH_SERVER",
            ));
            return findings;
        }
    };
    findings.extend(versions(&version, env!("CARGO_PKG_VERSION"), server));
    match client.get_json("/api/v1/revision", &[]) {
        Ok(answer) => findings.push(pass(
            GROUP,
            format!(
                "the admin token is accepted; the store is at revision {}",
                answer["revision"]
            ),
        )),
        Err(e) => {
            let refused = e
                .downcast_ref::<Refused>()
                .is_some_and(|r| r.status.as_u16() == 401);
            findings.push(if refused {
                error(
                    GROUP,
                    "the admin token was refused".into(),
                    "pass the token mesh-control init wrote: --token-file <data-dir>/admin-token, or MESH_TOKEN",
                )
            } else {
                error(
                    GROUP,
                    format!("the store does not answer: {e:#}"),
                    "see mesh-control's log; with PostgreSQL, check the database is up",
                )
            });
            return findings;
        }
    }
    // An answer, or the finding that says it could not be had.
    let ask = |path: &str, query: &[(&str, &str)], group: &'static str, what: String| {
        client.get_json(path, query).map_err(|e| {
            error(
                group,
                format!("{what} failed: {e:#}"),
                "see mesh-control's log",
            )
        })
    };
    let asked = |path: &str, group| ask(path, &[], group, format!("asking for {path}"));
    match asked("/api/v1/ca", "certificate authority") {
        Ok(ca) => findings.extend(roots(&ca, now)),
        Err(finding) => findings.push(finding),
    }
    match asked("/api/v1/proxy-status", "nodes") {
        Ok(status) => findings.extend(nodes(&status)),
        Err(finding) => findings.push(finding),
    }
    let services = match asked("/api/v1/services", "services") {
        Ok(list) => list["items"].as_array().cloned().unwrap_or_default(),
        Err(finding) => {
            findings.push(finding);
            Vec::new()
        }
    };
    for service in services {
        let (namespace, name) = (
            service["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default"),
            service["metadata"]["name"].as_str().unwrap_or(""),
        );
        let path = format!("/api/v1/services/{name}/describe");
        let what = format!("describing {namespace}/{name}");
        match ask(&path, &[("namespace", namespace)], "services", what) {
            Ok(description) => findings.extend(service_health(&description)),
            Err(finding) => findings.push(finding),
        }
    }
    findings
}

fn versions(answer: &serde_json::Value, ours: &str, server: &str) -> Vec<Finding> {
    const GROUP: &str = "control plane";
    let theirs = answer["version"].as_str().unwrap_or("?");
    let backend = answer["backend"].as_str().unwrap_or("?");
    let mut findings = vec![pass(
        GROUP,
        format!("mesh-control {theirs} answers at {server} ({backend} store)"),
    )];
    if theirs != ours {
        findings.push(warning(
            GROUP,
            format!("meshctl is {ours}, mesh-control is {theirs}"),
            "use the meshctl of the control plane's release; a newer one may send fields an older server refuses",
        ));
    }
    findings
}

/// The CA's roots: expired or soon expiring ones.
fn roots(ca: &serde_json::Value, now: OffsetDateTime) -> Vec<Finding> {
    const GROUP: &str = "certificate authority";
    let roots = ca["roots"].as_array().cloned().unwrap_or_default();
    if roots.is_empty() {
        return vec![error(
            GROUP,
            "the CA has no root".into(),
            "create one: mesh-control init",
        )];
    }
    roots
        .iter()
        .map(|root| {
            let serial = root["serial"].as_str().unwrap_or("?");
            let short = &serial[..serial.len().min(12)];
            let state = root["state"].as_str().unwrap_or("?");
            let until = root["not_after"].as_str().unwrap_or("");
            let Ok(not_after) = OffsetDateTime::parse(until, &Rfc3339) else {
                return error(
                    GROUP,
                    format!("{state} root {short}: unreadable expiry {until:?}"),
                    "upgrade meshctl to the control plane's release",
                );
            };
            let days = (not_after - now).whole_days();
            let what = format!("{state} root {short} valid until {until} ({days} days)");
            if not_after <= now {
                let hint = if state == "retiring" {
                    format!("nothing it signed is valid any more: meshctl ca retire-root {serial}")
                } else {
                    "certificates it signed are refused: rotate now (meshctl ca rotate-root, then --activate)".to_owned()
                };
                error(GROUP, format!("{state} root {short} expired on {until}"), &hint)
            } else if days < ROOT_WARNING_DAYS && state != "retiring" {
                warning(
                    GROUP,
                    what,
                    "rotate the root before it expires: meshctl ca rotate-root, then meshctl ca rotate-root --activate",
                )
            } else {
                pass(GROUP, what)
            }
        })
        .collect()
}

/// Each node's configuration state (`GET /api/v1/proxy-status`).
fn nodes(status: &serde_json::Value) -> Vec<Finding> {
    const GROUP: &str = "nodes";
    let revision = &status["revision"];
    let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
    if nodes.is_empty() {
        return vec![warning(
            GROUP,
            "no node has connected".into(),
            "start mesh-node on each node with --control-plane pointing at mesh-control's node API and a bootstrap token (meshctl node token create)",
        )];
    }
    nodes
        .iter()
        .map(|node| {
            let name = node["node"].as_str().unwrap_or("?");
            let synced = &node["synced_revision"];
            match node["state"].as_str().unwrap_or("?") {
                "SYNCED" => pass(GROUP, format!("{name} holds revision {revision}")),
                "NACKED" => error(
                    GROUP,
                    format!(
                        "{name} rejected a push: {}",
                        node["reason"].as_str().unwrap_or("no reason given")
                    ),
                    "it keeps serving its last good configuration; fix the resource the reason names and apply it again",
                ),
                "STALE" => warning(
                    GROUP,
                    match synced.as_i64() {
                        Some(synced) => format!("{name} holds revision {synced}, behind {revision}"),
                        None => format!("{name} holds no revision yet, the store is at {revision}"),
                    },
                    "it may be catching up; if it stays behind, read that node's mesh-node log",
                ),
                other => warning(
                    GROUP,
                    format!(
                        "{name} is {other} (last seen {})",
                        node["last_seen"].as_str().unwrap_or("?")
                    ),
                    "it serves its last configuration; check mesh-node is running on that node and can reach the node API",
                ),
            }
        })
        .collect()
}

/// One service's endpoints and splits (`GET …/describe`).
fn service_health(description: &serde_json::Value) -> Vec<Finding> {
    const GROUP: &str = "services";
    let service = &description["service"]["metadata"];
    let name = format!(
        "{}/{}",
        service["namespace"].as_str().unwrap_or("default"),
        service["name"].as_str().unwrap_or("?")
    );
    let endpoints = description["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let serving = |e: &&serde_json::Value| e["healthy"] == true && e["ready"] != false;
    let healthy: Vec<&serde_json::Value> = endpoints.iter().filter(serving).collect();
    let mut findings = Vec::new();
    if endpoints.is_empty() {
        findings.push(warning(
            GROUP,
            format!("{name} has no endpoints"),
            "no Workload lists it in spec.services; callers get 503 (flag UH)",
        ));
    } else if healthy.is_empty() {
        findings.push(error(
            GROUP,
            format!(
                "{name}: none of its {} endpoints is healthy",
                endpoints.len()
            ),
            "callers get 503 (flag UH); see which are drained or not ready with meshctl describe service",
        ));
    } else {
        findings.push(pass(
            GROUP,
            format!(
                "{name}: {} of {} endpoints healthy",
                healthy.len(),
                endpoints.len()
            ),
        ));
    }
    for split in description["traffic_splits"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let split_name = split["metadata"]["name"].as_str().unwrap_or("?");
        let spec = &split["spec"];
        let forced = spec["header_match"]
            .as_object()
            .is_some_and(|m| !m.is_empty());
        for (version, weight) in [
            ("v1", spec["v1_weight"].as_i64().unwrap_or(0)),
            ("v2", spec["v2_weight"].as_i64().unwrap_or(0)),
        ] {
            let wanted = weight > 0 || (version == "v2" && forced);
            let present = healthy.iter().any(|e| e["version"] == version);
            if wanted && !present {
                findings.push(error(
                    GROUP,
                    format!(
                        "{name}: TrafficSplit {split_name} sends {} to {version}, which has no healthy endpoint",
                        if weight > 0 {
                            format!("{weight} %")
                        } else {
                            "header-matched requests".to_owned()
                        }
                    ),
                    "those requests get 503 (flag UH); label a Workload of the service with that version, or change the weights",
                ));
            }
        }
    }
    findings
}

/// The findings for people, grouped, with a closing count.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    let mut group = "";
    for finding in findings {
        if finding.group != group {
            group = finding.group;
            let _ = writeln!(out, "{group}");
        }
        let mark = match finding.level {
            Level::Pass => "ok  ",
            Level::Warning => "WARN",
            Level::Error => "FAIL",
        };
        let _ = writeln!(out, "  {mark} {}", finding.what);
        if let Some(hint) = &finding.hint {
            let _ = writeln!(out, "       -> {hint}");
        }
    }
    let count = |level| findings.iter().filter(|f| f.level == level).count();
    let _ = writeln!(
        out,
        "\n{} passed, {} warnings, {} errors",
        count(Level::Pass),
        count(Level::Warning),
        count(Level::Error)
    );
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn levels(findings: &[Finding]) -> Vec<(Level, &str)> {
        findings
            .iter()
            .map(|f| (f.level, f.what.as_str()))
            .collect()
    }

    #[test]
    fn roots_warn_a_month_before_expiry_and_fail_after_it() {
        let now = OffsetDateTime::parse("2026-11-27T00:00:00Z", &Rfc3339).unwrap();
        let ca = json!({"roots": [
            {"serial": "aaaaaaaaaaaaaaaa", "state": "signing", "not_after": "2036-11-25T00:00:00Z"},
            {"serial": "bbbb", "state": "staged", "not_after": "2026-12-07T00:00:00Z"},
            {"serial": "cccc", "state": "retiring", "not_after": "2026-12-07T00:00:00Z"},
            {"serial": "dddd", "state": "retiring", "not_after": "2026-11-26T00:00:00Z"},
        ]});
        let found = roots(&ca, now);
        assert_eq!(
            levels(&found),
            [
                (
                    Level::Pass,
                    "signing root aaaaaaaaaaaa valid until 2036-11-25T00:00:00Z (3651 days)"
                ),
                (
                    Level::Warning,
                    "staged root bbbb valid until 2026-12-07T00:00:00Z (10 days)"
                ),
                // Retiring roots are meant to go.
                (
                    Level::Pass,
                    "retiring root cccc valid until 2026-12-07T00:00:00Z (10 days)"
                ),
                (
                    Level::Error,
                    "retiring root dddd expired on 2026-11-26T00:00:00Z"
                ),
            ]
        );
        // An expired retiring root is retired, not rotated.
        assert_eq!(
            found[3].hint.as_deref(),
            Some("nothing it signed is valid any more: meshctl ca retire-root dddd")
        );
        assert_eq!(roots(&json!({"roots": []}), now)[0].level, Level::Error);
    }

    #[test]
    fn nodes_are_judged_by_their_state() {
        let status = json!({"revision": 12, "nodes": [
            {"node": "a", "state": "SYNCED", "synced_revision": 12},
            {"node": "b", "state": "STALE", "synced_revision": 9},
            {"node": "c", "state": "NACKED", "synced_revision": 9, "reason": "service/shop/x: bad port"},
            {"node": "d", "state": "DISCONNECTED", "synced_revision": 12, "last_seen": "2026-11-27T06:00:00Z"},
            {"node": "e", "state": "STALE", "synced_revision": null},
        ]});
        assert_eq!(
            levels(&nodes(&status)),
            [
                (Level::Pass, "a holds revision 12"),
                (Level::Warning, "b holds revision 9, behind 12"),
                (Level::Error, "c rejected a push: service/shop/x: bad port"),
                (
                    Level::Warning,
                    "d is DISCONNECTED (last seen 2026-11-27T06:00:00Z)"
                ),
                (
                    Level::Warning,
                    "e holds no revision yet, the store is at 12"
                ),
            ]
        );
        let none = nodes(&json!({"revision": 1, "nodes": []}));
        assert_eq!(levels(&none), [(Level::Warning, "no node has connected")]);
    }

    #[test]
    fn a_service_without_healthy_endpoints_or_with_an_empty_canary_is_reported() {
        let service = |endpoints: serde_json::Value, splits: serde_json::Value| {
            json!({
                "service": {"metadata": {"name": "reviews", "namespace": "shop"}},
                "endpoints": endpoints,
                "traffic_splits": splits,
            })
        };
        let v1 = json!({"version": "v1", "healthy": true, "ready": true});
        let drained = json!({"version": "v2", "healthy": false, "ready": true});
        let canary =
            json!([{"metadata": {"name": "canary"}, "spec": {"v1_weight": 95, "v2_weight": 5}}]);
        assert_eq!(
            levels(&service_health(&service(json!([v1, drained]), canary))),
            [
                (Level::Pass, "shop/reviews: 1 of 2 endpoints healthy"),
                (
                    Level::Error,
                    "shop/reviews: TrafficSplit canary sends 5 % to v2, which has no healthy endpoint"
                ),
            ]
        );
        let header_only = json!([{"metadata": {"name": "h"}, "spec": {"v1_weight": 100, "v2_weight": 0, "header_match": {"x-canary": "true"}}}]);
        assert_eq!(
            levels(&service_health(&service(json!([v1]), header_only)))[1],
            (
                Level::Error,
                "shop/reviews: TrafficSplit h sends header-matched requests to v2, which has no healthy endpoint"
            )
        );
        assert_eq!(
            levels(&service_health(&service(json!([drained]), json!([])))),
            [(
                Level::Error,
                "shop/reviews: none of its 1 endpoints is healthy"
            )]
        );
        assert_eq!(
            service_health(&service(json!([]), json!([])))[0].level,
            Level::Warning
        );
    }

    #[test]
    fn a_version_skew_is_a_warning() {
        let found = versions(
            &json!({"version": "0.2.0", "backend": "sqlite"}),
            "0.1.0",
            "http://cp",
        );
        assert_eq!(
            levels(&found),
            [
                (
                    Level::Pass,
                    "mesh-control 0.2.0 answers at http://cp (sqlite store)"
                ),
                (Level::Warning, "meshctl is 0.1.0, mesh-control is 0.2.0"),
            ]
        );
    }

    #[test]
    fn the_report_groups_findings_and_counts_them() {
        let text = render(&[
            pass("nodes", "a holds revision 1".into()),
            warning("nodes", "b is DISCONNECTED".into(), "check b"),
            error("services", "x has none".into(), "add one"),
        ]);
        assert_eq!(
            text,
            "nodes\n  ok   a holds revision 1\n  WARN b is DISCONNECTED\n       -> check b\n\
             services\n  FAIL x has none\n       -> add one\n\n1 passed, 1 warnings, 1 errors\n"
        );
    }
}
