//! The identities of the mesh's own components, in the reserved namespace
//! `mesh-system`: the control plane
//! (`spiffe://<td>/ns/mesh-system/sa/mesh-control`) and each node
//! (`spiffe://<td>/ns/mesh-system/sa/node-<name>`). They use the same SVID
//! profile and verifiers as workloads; the CA never issues a workload
//! certificate in `mesh-system`, so a workload cannot pose as a node.

pub use mesh_model::names::SYSTEM_NAMESPACE;
use mesh_model::names::check_dns_subdomain;

use crate::SpiffeId;

const CONTROL_PLANE_ACCOUNT: &str = "mesh-control";
const NODE_PREFIX: &str = "node-";

/// The control plane's identity in `trust_domain`.
pub fn control_plane(trust_domain: &str) -> SpiffeId {
    SpiffeId {
        trust_domain: trust_domain.to_owned(),
        namespace: SYSTEM_NAMESPACE.to_owned(),
        service_account: CONTROL_PLANE_ACCOUNT.to_owned(),
    }
}

/// The identity of node `name`, a DNS subdomain as Kubernetes names nodes
/// (`ip-10-0-0-1.ec2.internal`), short enough to take the `node-` prefix
/// (248 characters).
pub fn node(trust_domain: &str, name: &str) -> Result<SpiffeId, String> {
    check_dns_subdomain(name)?;
    let service_account = format!("{NODE_PREFIX}{name}");
    check_dns_subdomain(&service_account)
        .map_err(|_| format!("node name {name:?} is longer than 248 characters"))?;
    Ok(SpiffeId {
        trust_domain: trust_domain.to_owned(),
        namespace: SYSTEM_NAMESPACE.to_owned(),
        service_account,
    })
}

/// The node an identity belongs to, if it is a node's.
pub fn node_name(identity: &SpiffeId) -> Option<&str> {
    if identity.namespace != SYSTEM_NAMESPACE {
        return None;
    }
    identity
        .service_account
        .strip_prefix(NODE_PREFIX)
        .filter(|name| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_identities_round_trip() {
        let id = node("cluster.local", "node1").unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/mesh-system/sa/node-node1"
        );
        assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
        assert_eq!(node_name(&id), Some("node1"));
    }

    #[test]
    fn only_mesh_system_node_accounts_are_nodes() {
        let workload = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/node-node1").unwrap();
        assert_eq!(node_name(&workload), None);
        assert_eq!(node_name(&control_plane("cluster.local")), None);
    }

    #[test]
    fn bad_node_names_are_refused() {
        assert!(node("cluster.local", "Node_1").is_err());
        assert!(node("cluster.local", &"n".repeat(59)).is_err());
        assert!(node("cluster.local", &"n".repeat(58)).is_ok());
    }
}
