//! Kubernetes objects as mesh resources: pure functions, each built as a
//! document and validated exactly as one applied through the API is.
//!
//! - a Namespace becomes a `Namespace` with its labels (`mesh.io/capture`);
//! - a Service with a selector (not ExternalName, not in front of
//!   hostNetwork pods only) becomes a `Service`: its TCP ports, with
//!   the protocol from `appProtocol` or the port's name (`http`, `http-web`,
//!   `grpc`, …, as Istio reads them), a named `targetPort` resolved
//!   through the pods it selects, its ClusterIP as `vip`, and the load
//!   balancer from the annotations `mesh.io/load-balancer` and
//!   `mesh.io/hash-header`;
//! - a running Pod with an address (not hostNetwork) becomes a
//!   `Workload`: node, address, service account, UID, the services
//!   selecting it (none once it is being deleted, and no workload past its
//!   grace period), `version` from its `version` label, capture
//!   exclusions from the annotations `mesh.io/exclude-outbound-ports`,
//!   `mesh.io/exclude-outbound-cidrs` and `mesh.io/exclude-inbound-ports`
//!   (comma-separated);
//! - a mesh.io custom resource becomes the resource of its kind.
//!
//! Every resource made here carries the label `mesh.io/managed-by:
//! kubernetes`: the mirror deletes only what carries it.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
    jiff::Timestamp,
};
use kube::{ResourceExt as _, api::DynamicObject};
use mesh_model::{
    API_VERSION, FieldError, Kind, Metadata, Resource, names::SYSTEM_NAMESPACE,
    namespace::MTLS_LABEL, resource::Document,
};
use serde_json::{Value, json};

/// The label on every resource the mirror writes.
pub const MANAGED_BY: (&str, &str) = ("mesh.io/managed-by", "kubernetes");

/// The most labels copied from an object (the mesh takes 64, one is ours).
const MAX_COPIED_LABELS: usize = 63;

/// Why an object is not mirrored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// `Pod/shop/web-1`.
    pub object: String,
    /// The mesh resource it would be, `Workload/shop/web-1`: what the store
    /// holds from before is kept, not deleted, while the object does not
    /// convert.
    pub resource: String,
    pub reason: String,
}

/// The outcome for one object: a resource, nothing (not the mesh's
/// business: a finished pod, an ExternalName service), or why it is left
/// out.
pub type Converted = Result<Option<Resource>, Skipped>;

fn skipped(
    object_kind: &str,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
    reason: impl Into<String>,
) -> Skipped {
    let path = match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    };
    Skipped {
        object: format!("{object_kind}/{path}"),
        resource: format!("{kind}/{path}"),
        reason: reason.into(),
    }
}

fn labels(from: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels_but(from, &[])
}

/// The labels of `from` but `withheld`, plus the mirror's own.
fn labels_but(from: &BTreeMap<String, String>, withheld: &[&str]) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = from
        .iter()
        .filter(|(key, _)| key.as_str() != MANAGED_BY.0 && !withheld.contains(&key.as_str()))
        .take(MAX_COPIED_LABELS)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned());
    labels
}

/// Validates the document as the API does; `object_kind` names the
/// Kubernetes object it comes from.
fn resource(
    object_kind: &str,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
    labels: BTreeMap<String, String>,
    spec: Value,
) -> Result<Resource, Skipped> {
    let document = Document {
        api_version: API_VERSION.to_owned(),
        kind: kind.as_str().to_owned(),
        metadata: Metadata {
            name: name.to_owned(),
            namespace: namespace.map(str::to_owned),
            labels,
            resource_version: None,
        },
        spec,
    };
    Resource::from_document(document).map_err(|errors| {
        let reasons: Vec<String> = errors.iter().map(FieldError::to_string).collect();
        skipped(object_kind, kind, namespace, name, reasons.join("; "))
    })
}

pub fn namespace(object: &Namespace) -> Converted {
    resource(
        "Namespace",
        Kind::Namespace,
        None,
        &object.name_any(),
        labels(object.labels()),
        json!({}),
    )
    .map(Some)
}

/// The protocol a Service port declares, as the mesh names it.
fn protocol(app_protocol: Option<&str>, port_name: Option<&str>) -> &'static str {
    let declared = app_protocol.map(|p| p.to_ascii_lowercase());
    match declared.as_deref() {
        Some("http") => return "http",
        Some("http2" | "kubernetes.io/h2c") => return "http2",
        Some("grpc") => return "grpc",
        Some("tcp") => return "tcp",
        _ => {}
    }
    let name = port_name.unwrap_or_default().to_ascii_lowercase();
    let prefix = name.split('-').next().unwrap_or_default();
    match prefix {
        "http" => "http",
        "http2" | "h2c" => "http2",
        "grpc" => "grpc",
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" => "tcp",
        _ => "auto",
    }
}

/// The container port named `name` in any of `pods`.
fn named_port(pods: &[&Pod], name: &str) -> Option<i32> {
    pods.iter()
        .filter_map(|pod| pod.spec.as_ref())
        .flat_map(|spec| &spec.containers)
        .flat_map(|container| container.ports.iter().flatten())
        .find(|port| port.name.as_deref() == Some(name))
        .map(|port| port.container_port)
}

/// Whether `selector` (non-empty) selects an object labelled `labels`.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `pods`: every pod in the service's namespace.
pub fn service(object: &Service, pods: &[&Pod]) -> Converted {
    let name = object.name_any();
    let namespace = object.namespace().unwrap_or_else(|| "default".into());
    let skip = |reason: String| skipped("Service", Kind::Service, Some(&namespace), &name, reason);
    let Some(spec) = &object.spec else {
        return Ok(None);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    // Without a selector (the API server's own `kubernetes`, endpoints
    // kept by hand) the mesh would know no endpoint and refuse every call:
    // left to plain routing. So are services whose pods share their node's
    // network (hostNetwork) alone, which are never workloads.
    let selector = spec.selector.clone().unwrap_or_default();
    if selector.is_empty() {
        return Ok(None);
    }
    let mut selected: Vec<&Pod> = pods
        .iter()
        .copied()
        .filter(|pod| selects(&selector, pod.labels()))
        .collect();
    if !selected.is_empty() && selected.iter().all(|pod| host_network(pod)) {
        return Ok(None);
    }
    // A named target port is read from the first pod by name: the same
    // pod at every pass.
    selected.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut ports = Vec::new();
    for port in spec.ports.iter().flatten() {
        if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
            continue;
        }
        let target = match &port.target_port {
            None => None,
            Some(IntOrString::Int(number)) => Some(*number),
            Some(IntOrString::String(port_name)) => match named_port(&selected, port_name) {
                Some(number) => Some(number),
                None if selected.is_empty() => None,
                None => {
                    return Err(skip(format!(
                        "port {}: no selected pod has a container port named {port_name:?}",
                        port.port
                    )));
                }
            },
        };
        let mut entry = json!({
            "port": port.port,
            "protocol": protocol(port.app_protocol.as_deref(), port.name.as_deref()),
        });
        if let Some(name) = &port.name {
            entry["name"] = json!(name);
        }
        if let Some(target) = target.filter(|t| *t != port.port) {
            entry["target_port"] = json!(target);
        }
        ports.push(entry);
    }
    if ports.is_empty() {
        return Ok(None);
    }
    let mut body = json!({ "ports": ports });
    if let Some(ip) = spec
        .cluster_ip
        .as_deref()
        .filter(|ip| !ip.is_empty() && *ip != "None")
    {
        body["vip"] = json!(ip);
    }
    let annotations = object.annotations();
    if let Some(balancer) = annotations.get("mesh.io/load-balancer") {
        body["load_balancer"] = json!(balancer);
    }
    if let Some(header) = annotations.get("mesh.io/hash-header") {
        body["hash_header"] = json!(header);
    }
    resource(
        "Service",
        Kind::Service,
        Some(&namespace),
        &name,
        labels(object.labels()),
        body,
    )
    .map(Some)
}

fn host_network(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.host_network) == Some(true)
}

/// A comma-separated annotation as a JSON list of `parse`d items.
fn listed<T: serde::Serialize>(
    annotations: &BTreeMap<String, String>,
    key: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<Value>, String> {
    let Some(text) = annotations.get(key) else {
        return Ok(None);
    };
    let items: Result<Vec<T>, String> = text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| parse(item).ok_or_else(|| format!("annotation {key}: {item:?} is not valid")))
        .collect();
    Ok(Some(json!(items?)))
}

/// `services`: every service in the pod's namespace; `now`: the time, to
/// tell a pod in its grace period from one past it.
pub fn workload(object: &Pod, services: &[&Service], now: Timestamp) -> Converted {
    let name = object.name_any();
    let namespace = object.namespace().unwrap_or_else(|| "default".into());
    let skip = |reason: String| skipped("Pod", Kind::Workload, Some(&namespace), &name, reason);
    let (Some(spec), Some(status)) = (&object.spec, &object.status) else {
        return Ok(None);
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Ok(None);
    }
    if host_network(object) || namespace == SYSTEM_NAMESPACE {
        return Ok(None);
    }
    // A pod being deleted runs on through its grace period: it stays a
    // workload (captured, with its identity) but serves no service. Past
    // the deadline, or once all its containers have stopped, it is gone,
    // and its address free for another pod.
    let terminating = object.metadata.deletion_timestamp.is_some();
    let deadline_passed = object
        .metadata
        .deletion_timestamp
        .as_ref()
        .is_some_and(|deadline| deadline.0 <= now);
    let all_stopped = status
        .container_statuses
        .as_ref()
        .is_some_and(|containers| {
            !containers.is_empty()
                && containers
                    .iter()
                    .all(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()))
        });
    if terminating && (deadline_passed || all_stopped) {
        return Ok(None);
    }
    let (Some(node), Some(ip)) = (&spec.node_name, &status.pod_ip) else {
        // Not scheduled, or no address yet.
        return Ok(None);
    };
    let mut serving: Vec<String> = services
        .iter()
        .filter(|_| !terminating)
        .filter(|service| {
            service
                .spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .is_some_and(|selector| selects(selector, object.labels()))
        })
        .map(|service| service.name_any())
        .collect();
    serving.sort();
    let mut body = json!({
        "node": node,
        "ip": ip,
        "service_account": spec.service_account_name.as_deref().unwrap_or("default"),
        "services": serving,
    });
    if let Some(version) = object.labels().get("version") {
        body["version"] = json!(version);
    }
    if let Some(uid) = &object.metadata.uid {
        body["pod_uid"] = json!(uid);
    }
    let annotations = object.annotations();
    let port = |item: &str| item.parse::<u16>().ok();
    let mut capture = serde_json::Map::new();
    for (field, value) in [
        (
            "exclude_outbound_ports",
            listed(annotations, "mesh.io/exclude-outbound-ports", port),
        ),
        (
            "exclude_inbound_ports",
            listed(annotations, "mesh.io/exclude-inbound-ports", port),
        ),
        (
            "exclude_outbound_cidrs",
            listed(annotations, "mesh.io/exclude-outbound-cidrs", |s| {
                Some(s.to_owned())
            }),
        ),
    ] {
        if let Some(list) = value.map_err(skip)? {
            capture.insert(field.to_owned(), list);
        }
    }
    if !capture.is_empty() {
        body["capture"] = Value::Object(capture);
    }
    // Whoever may create a pod may not loosen its namespace's mTLS mode:
    // on Kubernetes that is the namespace's label alone.
    resource(
        "Pod",
        Kind::Workload,
        Some(&namespace),
        &name,
        labels_but(object.labels(), &[MTLS_LABEL]),
        body,
    )
    .map(Some)
}

/// A mesh.io custom resource of `kind`.
pub fn custom(kind: Kind, object: &DynamicObject) -> Converted {
    let name = object.name_any();
    let namespace = object.namespace().unwrap_or_else(|| "default".into());
    let spec = object.data.get("spec").cloned().unwrap_or(Value::Null);
    resource(
        kind.as_str(),
        kind,
        Some(&namespace),
        &name,
        labels(object.labels()),
        spec,
    )
    .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_protocols_follow_app_protocol_then_the_name() {
        assert_eq!(protocol(Some("HTTP"), Some("tcp-x")), "http");
        assert_eq!(protocol(Some("kubernetes.io/h2c"), None), "http2");
        assert_eq!(protocol(None, Some("http-web")), "http");
        assert_eq!(protocol(None, Some("grpc")), "grpc");
        assert_eq!(protocol(None, Some("mysql")), "tcp");
        assert_eq!(protocol(None, Some("web")), "auto");
        assert_eq!(protocol(None, None), "auto");
    }

    #[test]
    fn selectors_select_by_every_label_and_never_when_empty() {
        let labels = BTreeMap::from([
            ("app".into(), "reviews".into()),
            ("version".into(), "v2".into()),
        ]);
        assert!(selects(
            &BTreeMap::from([("app".into(), "reviews".into())]),
            &labels
        ));
        assert!(!selects(
            &BTreeMap::from([("app".into(), "ratings".into())]),
            &labels
        ));
        assert!(!selects(&BTreeMap::new(), &labels));
    }
}
