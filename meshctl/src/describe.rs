//! `meshctl describe service`: one service and everything that applies to
//! it, for people.

use std::fmt::Write as _;

use anyhow::Context as _;
use mesh_model::{Document, Resource, policy::ServicePolicySpec};

use crate::output::{align, circuit, port, split};

pub(crate) fn resource(value: &serde_json::Value) -> anyhow::Result<Resource> {
    let document: Document = serde_json::from_value(value.clone()).context("reading a resource")?;
    Resource::from_document(document)
        .map_err(|e| anyhow::anyhow!("the control plane sent an invalid resource: {e:?}"))
}

/// Renders the API's service description.
pub fn service(answer: &serde_json::Value) -> anyhow::Result<String> {
    let mut out = String::new();
    let Resource::Service(service) = resource(&answer["service"])? else {
        anyhow::bail!("the control plane described something other than a service");
    };
    let _ = writeln!(
        out,
        "Service:        {}.{}",
        service.name(),
        service.namespace()
    );
    if let Some(vip) = service.spec.vip {
        let _ = writeln!(out, "Address (VIP):  {vip}");
    }
    let ports: Vec<String> = service.spec.ports.iter().map(port).collect();
    let _ = writeln!(out, "Ports:          {}", ports.join(", "));
    let lb = match &service.spec.hash_header {
        Some(header) => format!("{} (header {header})", service.spec.load_balancer.as_str()),
        None => service.spec.load_balancer.as_str().to_owned(),
    };
    let _ = writeln!(out, "Load balancer:  {lb}");

    let (policy, origin) = match answer.get("policy").filter(|p| !p.is_null()) {
        Some(value) => match resource(value)? {
            Resource::ServicePolicy(p) => (p.spec, "ServicePolicy"),
            _ => anyhow::bail!("the control plane sent a policy of another kind"),
        },
        None => (ServicePolicySpec::default(), "defaults, no ServicePolicy"),
    };
    let _ = writeln!(
        out,
        "Policy:         {} retries, timeout {}ms, circuit {} ({origin})",
        policy.retry_attempts,
        policy.timeout_ms,
        circuit(&policy)
    );
    let retry = policy.retry.clone().unwrap_or_default();
    let statuses: Vec<String> = retry.on_statuses.iter().map(u16::to_string).collect();
    let _ = writeln!(
        out,
        "Retries on:     connect failure, 503{}{}; backoff {}-{}ms; budget {}% (min {}/s)",
        statuses
            .iter()
            .map(|s| format!(", {s}"))
            .collect::<String>(),
        if retry.non_idempotent {
            "; POST and PATCH too"
        } else {
            ""
        },
        retry.backoff_base_ms,
        retry.backoff_max_ms,
        retry.budget_percent,
        retry.budget_min_per_second,
    );
    if let Some(limit) = &policy.rate_limit {
        let _ = writeln!(
            out,
            "Rate limit:     {}/s per workload{}, burst {}",
            limit.requests_per_second,
            if limit.per_source { " and caller" } else { "" },
            limit.capacity()
        );
    }

    let _ = writeln!(out, "Traffic splits:");
    let splits = answer["traffic_splits"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if splits.is_empty() {
        let _ = writeln!(out, "  none: every version, by the load balancer");
    }
    for value in &splits {
        if let Resource::TrafficSplit(s) = resource(value)? {
            let _ = writeln!(out, "  {}", split(s.name(), &s.spec));
        }
    }

    let _ = writeln!(out, "Authorization:");
    let policies = answer["authorization_policies"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if policies.is_empty() {
        let _ = writeln!(out, "  none: every authenticated caller is allowed");
    }
    for value in &policies {
        if let Resource::AuthorizationPolicy(p) = resource(value)? {
            let _ = writeln!(
                out,
                "  {}: {} ({} rules{})",
                p.name(),
                format!("{:?}", p.spec.action).to_lowercase(),
                p.spec.rules.len(),
                if p.spec.target.is_none() {
                    ", whole namespace"
                } else {
                    ""
                }
            );
        }
    }

    let _ = writeln!(out, "Endpoints:");
    let endpoints = answer["endpoints"].as_array().cloned().unwrap_or_default();
    if endpoints.is_empty() {
        let _ = writeln!(out, "  none: no workload serves this service");
    } else {
        let mut rows = vec![vec![
            "  ADDRESS".to_owned(),
            "VERSION".into(),
            "HEALTH".into(),
            "WORKLOAD".into(),
        ]];
        for e in &endpoints {
            let ip = e["ip"].as_str().unwrap_or("?");
            let address = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.to_owned()
            };
            rows.push(vec![
                format!("  {address}:{}", e["port"]),
                e["version"].as_str().unwrap_or("-").to_owned(),
                // The operator's marking first, then what the node saw.
                match (e["healthy"].as_bool(), e["ready"].as_bool()) {
                    (Some(false), _) => "unhealthy",
                    (_, Some(false)) => "unready",
                    _ => "healthy",
                }
                .to_owned(),
                e["workload"].as_str().unwrap_or("-").to_owned(),
            ]);
        }
        out.push_str(&align(&rows));
    }
    Ok(out)
}
