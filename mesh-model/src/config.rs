//! The configuration a node holds, as the control plane pushes it: named,
//! versioned resources — the mesh.io/v1 objects its workloads need and the
//! endpoint sets of their services. The node validates every pushed body
//! here, with the same checks the API applies, before it swaps anything in.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    Kind, Resource,
    names::{check_dns_label, quoted},
    parse_documents,
    workload::MAX_VERSION,
};

/// One endpoint of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointEntry {
    pub ip: IpAddr,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Whether callers may use it: the operator has not marked it down
    /// and its node observes it ready.
    pub healthy: bool,
    /// What the node running its workload last observed.
    #[serde(default = "ready_by_default", skip_serializing_if = "is_ready")]
    pub ready: bool,
    /// The workload (pod) behind it, by name (in the service's namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

fn ready_by_default() -> bool {
    true
}

fn is_ready(ready: &bool) -> bool {
    *ready
}

/// Every endpoint of one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSet {
    pub namespace: String,
    pub service: String,
    pub endpoints: Vec<EndpointEntry>,
}

impl EndpointSet {
    fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for (field, value) in [("namespace", &self.namespace), ("service", &self.service)] {
            if let Err(why) = check_dns_label(value) {
                problems.push(format!("{field}: {why}"));
            }
        }
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if endpoint.port == 0 {
                problems.push(format!("endpoints[{i}].port: must be 1 to 65535 (got 0)"));
            }
            if endpoint.ip.is_unspecified() || endpoint.ip.is_multicast() {
                problems.push(format!(
                    "endpoints[{i}].ip: {} cannot be an endpoint",
                    endpoint.ip
                ));
            }
            if endpoint
                .version
                .as_ref()
                .is_some_and(|v| v.is_empty() || v.len() > MAX_VERSION)
            {
                problems.push(format!(
                    "endpoints[{i}].version: must be 1 to {MAX_VERSION} characters"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// Where one workload of the mesh is and who it is: every node holds one
/// per workload, so its outbound side can tell a mesh destination (tunnel
/// to it, expecting its identity) from the outside world.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadAddress {
    pub namespace: String,
    pub name: String,
    pub ip: IpAddr,
    pub node: String,
    pub service_account: String,
    /// Captured: its node proxy terminates mTLS for it on the HBONE port.
    /// Otherwise it is reached in plaintext, as anything outside the mesh.
    pub mesh: bool,
}

impl WorkloadAddress {
    fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for (field, value) in [
            ("namespace", &self.namespace),
            ("name", &self.name),
            ("service_account", &self.service_account),
        ] {
            if let Err(why) = check_dns_label(value) {
                problems.push(format!("{field}: {why}"));
            }
        }
        if self.node.is_empty() {
            problems.push("node: must not be empty".to_owned());
        }
        if self.ip.is_unspecified() || self.ip.is_multicast() || self.ip.is_loopback() {
            problems.push(format!("ip: {} cannot be a workload's address", self.ip));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

/// The name a workload's address is pushed under.
pub fn address_name(namespace: &str, name: &str) -> String {
    format!("address/{namespace}/{name}")
}

/// The JSON body a workload address is pushed as.
pub fn address_body(address: &WorkloadAddress) -> Vec<u8> {
    serde_json::to_vec(address).expect("addresses always serialize")
}

/// A pushed resource, validated.
// Every one lives behind an `Arc` in a `NodeConfig`: boxing the larger
// variant would only add a second indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigResource {
    Object(Resource),
    Endpoints(EndpointSet),
    Address(WorkloadAddress),
}

/// The name a resource is pushed under: `<kind>/<namespace>/<name>`, or
/// `namespace/<name>` for a namespace.
pub fn object_name(resource: &Resource) -> String {
    object_name_of(resource.kind(), resource.namespace(), resource.name())
}

/// [`object_name`] of the resource `kind` `namespace`/`name`, stored or not.
pub fn object_name_of(kind: Kind, namespace: Option<&str>, name: &str) -> String {
    let kind = kind.as_str().to_ascii_lowercase();
    match namespace {
        Some(ns) => format!("{kind}/{ns}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

/// The name a service's endpoint set is pushed under.
pub fn endpoints_name(namespace: &str, service: &str) -> String {
    format!("endpoints/{namespace}/{service}")
}

/// A version for `body`: changes whenever the body does, the same on every
/// replica (FNV-1a, 64 bits, hex).
pub fn version_of(body: &[u8]) -> String {
    version_text(version_hash(body))
}

/// A [`version_hash`] as it is sent: 16 hex digits.
pub fn version_text(hash: u64) -> String {
    format!("{hash:016x}")
}

/// The number [`version_of`] writes in hex.
pub fn version_hash(body: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in body {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The JSON body a resource is pushed as.
pub fn object_body(resource: &Resource) -> Vec<u8> {
    serde_json::to_vec(&resource.to_document()).expect("documents always serialize")
}

/// The JSON body an endpoint set is pushed as.
pub fn endpoints_body(set: &EndpointSet) -> Vec<u8> {
    serde_json::to_vec(set).expect("endpoint sets always serialize")
}

/// Validates a pushed resource: its body must parse and validate exactly
/// as the API would accept it, and be what its name says.
pub fn parse_resource(name: &str, body: &[u8]) -> Result<ConfigResource, String> {
    let text = std::str::from_utf8(body).map_err(|_| format!("{name}: the body is not UTF-8"))?;
    let parsed = if name.starts_with("endpoints/") {
        let set: EndpointSet = serde_json::from_str(text).map_err(|e| format!("{name}: {e}"))?;
        set.check().map_err(|why| format!("{name}: {why}"))?;
        let expected = endpoints_name(&set.namespace, &set.service);
        (expected, ConfigResource::Endpoints(set))
    } else if name.starts_with("address/") {
        let address: WorkloadAddress =
            serde_json::from_str(text).map_err(|e| format!("{name}: {e}"))?;
        address.check().map_err(|why| format!("{name}: {why}"))?;
        let expected = address_name(&address.namespace, &address.name);
        (expected, ConfigResource::Address(address))
    } else {
        let mut resources = parse_documents(text).map_err(|problems| {
            let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
            format!("{name}: {}", messages.join("; "))
        })?;
        if resources.len() != 1 {
            return Err(format!(
                "{name}: holds {} documents, not one",
                resources.len()
            ));
        }
        let resource = resources.remove(0);
        (object_name(&resource), ConfigResource::Object(resource))
    };
    if parsed.0 != name {
        return Err(format!(
            "{}: the body describes {}",
            quoted(name),
            quoted(&parsed.0)
        ));
    }
    Ok(parsed.1)
}

/// A node's configuration at one revision. Cheap to clone; replaced whole.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeConfig {
    pub revision: i64,
    /// Name -> (version, resource). A persistent map: an update copies the
    /// few tree nodes it changes and shares the rest with the configuration
    /// before it (a node holds every workload's address, and readers may
    /// still hold the old configuration while the new one is built).
    pub resources: imbl::OrdMap<String, (String, Arc<ConfigResource>)>,
}

impl NodeConfig {
    /// The configuration after a validated update.
    pub fn updated(
        &self,
        revision: i64,
        changed: Vec<(String, String, ConfigResource)>,
        removed: &[String],
    ) -> Self {
        let mut resources = self.resources.clone();
        for name in removed {
            resources.remove(name);
        }
        for (name, version, resource) in changed {
            resources.insert(name, (version, Arc::new(resource)));
        }
        Self {
            revision,
            resources,
        }
    }

    /// Name -> version of everything held.
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.resources
            .iter()
            .map(|(name, (version, _))| (name.clone(), version.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(ports: &str) -> Vec<u8> {
        format!(
            r#"{{"apiVersion":"mesh.io/v1","kind":"Service","metadata":{{"name":"reviews","namespace":"shop"}},"spec":{{"ports":{ports}}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn pushed_objects_are_validated_like_the_api_does() {
        let good = parse_resource("service/shop/reviews", &service(r#"[{"port":9080}]"#)).unwrap();
        let ConfigResource::Object(resource) = &good else {
            panic!("{good:?}")
        };
        assert_eq!(object_name(resource), "service/shop/reviews");
        assert_eq!(
            version_of(&object_body(resource)),
            version_of(&object_body(resource))
        );

        let error =
            parse_resource("service/shop/reviews", &service(r#"[{"port":0}]"#)).unwrap_err();
        assert!(
            error.contains("spec.ports[0].port: must be 1 to 65535 (got 0)"),
            "{error}"
        );
        let error =
            parse_resource("service/shop/ratings", &service(r#"[{"port":9080}]"#)).unwrap_err();
        assert!(error.contains("the body describes"), "{error}");
        assert!(parse_resource("service/shop/reviews", b"\xff").is_err());
    }

    #[test]
    fn endpoint_sets_are_checked() {
        let set = EndpointSet {
            namespace: "shop".into(),
            service: "reviews".into(),
            endpoints: vec![EndpointEntry {
                ip: "10.89.1.2".parse().unwrap(),
                port: 9080,
                version: Some("v2".into()),
                healthy: true,
                ready: true,
                workload: Some("reviews-1".into()),
            }],
        };
        let body = endpoints_body(&set);
        assert_eq!(
            parse_resource("endpoints/shop/reviews", &body).unwrap(),
            ConfigResource::Endpoints(set.clone())
        );
        let mut bad = set;
        bad.endpoints[0].port = 0;
        bad.endpoints[0].ip = "0.0.0.0".parse().unwrap();
        let error = parse_resource("endpoints/shop/reviews", &endpoints_body(&bad)).unwrap_err();
        assert!(
            error.contains("endpoints[0].port") && error.contains("endpoints[0].ip"),
            "{error}"
        );
    }

    #[test]
    fn workload_addresses_are_checked() {
        let address = WorkloadAddress {
            namespace: "shop".into(),
            name: "web".into(),
            ip: "10.89.1.2".parse().unwrap(),
            node: "node1".into(),
            service_account: "frontend".into(),
            mesh: true,
        };
        let body = address_body(&address);
        assert_eq!(
            parse_resource("address/shop/web", &body).unwrap(),
            ConfigResource::Address(address.clone())
        );
        let error = parse_resource("address/shop/other", &body).unwrap_err();
        assert!(error.contains("the body describes"), "{error}");
        let mut bad = address;
        bad.ip = "127.0.0.1".parse().unwrap();
        bad.service_account = "Not_A_Label".into();
        let error = parse_resource("address/shop/web", &address_body(&bad)).unwrap_err();
        assert!(
            error.contains("ip: 127.0.0.1") && error.contains("service_account:"),
            "{error}"
        );
    }

    #[test]
    fn versions_follow_the_body() {
        assert_ne!(version_of(b"a"), version_of(b"b"));
        assert_eq!(version_of(b""), "cbf29ce484222325");
    }
}
