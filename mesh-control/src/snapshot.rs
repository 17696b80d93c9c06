//! What one node is sent: the resources its workloads need, by name, each
//! with its JSON body and a content version.
//!
//! A node gets its own workloads; for every namespace those workloads live
//! in, the namespace, its services with their endpoints, policies, traffic
//! splits and authorization policies; and for each service it subscribed to
//! elsewhere, that service with its endpoints, policy and splits. Not the
//! whole mesh — except every workload's address, identity and whether it
//! is captured: small, and what a node needs to tunnel to any destination.

use std::collections::{BTreeMap, BTreeSet};

use mesh_model::{
    Kind, Resource,
    config::{
        EndpointEntry, EndpointSet, WorkloadAddress, address_body, address_name, endpoints_body,
        endpoints_name, object_body, object_name, version_of,
    },
    namespace::{captured, opted_out},
};

use crate::store::{Store, StoreError};

/// A resource as pushed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    pub version: String,
    pub body: Vec<u8>,
}

/// Everything a node should hold, by name.
pub type Snapshot = BTreeMap<String, Pushed>;

/// A service, `(namespace, name)`.
pub type ServiceRef = (String, String);

fn push_object(snapshot: &mut Snapshot, resource: &Resource) {
    let body = object_body(resource);
    snapshot.insert(
        object_name(resource),
        Pushed {
            version: version_of(&body),
            body,
        },
    );
}

async fn push_endpoints(
    store: &Store,
    snapshot: &mut Snapshot,
    namespace: &str,
    service: &str,
) -> Result<(), StoreError> {
    let endpoints = store
        .endpoints(&format!("{service}.{namespace}"))
        .await?
        .into_iter()
        .map(|e| EndpointEntry {
            ip: e.ip,
            port: e.port,
            version: e.version,
            healthy: e.healthy,
            workload: e.workload,
        })
        .collect();
    let set = EndpointSet {
        namespace: namespace.to_owned(),
        service: service.to_owned(),
        endpoints,
    };
    let body = endpoints_body(&set);
    snapshot.insert(
        endpoints_name(namespace, service),
        Pushed {
            version: version_of(&body),
            body,
        },
    );
    Ok(())
}

/// The snapshot of `node`, with `subscribed` services from elsewhere.
pub async fn node_snapshot(
    store: &Store,
    node: &str,
    subscribed: &BTreeSet<ServiceRef>,
) -> Result<Snapshot, StoreError> {
    let mut snapshot = Snapshot::new();
    let mut namespaces = BTreeSet::new();
    let captured_namespaces: BTreeSet<String> = store
        .list(Kind::Namespace, None)
        .await?
        .iter()
        .filter(|ns| captured(ns.metadata()))
        .map(|ns| ns.name().to_owned())
        .collect();
    for workload in store.list(Kind::Workload, None).await? {
        let Resource::Workload(object) = &workload else {
            continue;
        };
        let namespace = object.namespace().to_owned();
        let address = WorkloadAddress {
            mesh: captured_namespaces.contains(&namespace) && !opted_out(&object.metadata),
            namespace,
            name: object.name().to_owned(),
            ip: object.spec.ip,
            node: object.spec.node.clone(),
            service_account: object.spec.service_account.clone(),
        };
        let body = address_body(&address);
        snapshot.insert(
            address_name(&address.namespace, &address.name),
            Pushed {
                version: version_of(&body),
                body,
            },
        );
        if object.spec.node == node {
            namespaces.insert(address.namespace);
            push_object(&mut snapshot, &workload);
        }
    }
    for namespace in &namespaces {
        if let Some(ns) = store.get(Kind::Namespace, None, namespace).await? {
            push_object(&mut snapshot, &ns);
        }
        for kind in [
            Kind::Service,
            Kind::ServicePolicy,
            Kind::TrafficSplit,
            Kind::AuthorizationPolicy,
        ] {
            for resource in store.list(kind, Some(namespace)).await? {
                if kind == Kind::Service {
                    push_endpoints(store, &mut snapshot, namespace, resource.name()).await?;
                }
                push_object(&mut snapshot, &resource);
            }
        }
    }
    for (namespace, service) in subscribed {
        if namespaces.contains(namespace) {
            continue;
        }
        let Some(found) = store.get(Kind::Service, Some(namespace), service).await? else {
            continue;
        };
        push_object(&mut snapshot, &found);
        push_endpoints(store, &mut snapshot, namespace, service).await?;
        if let Some(policy) = store
            .get(Kind::ServicePolicy, Some(namespace), service)
            .await?
        {
            push_object(&mut snapshot, &policy);
        }
        for split in store.list(Kind::TrafficSplit, Some(namespace)).await? {
            if let Resource::TrafficSplit(object) = &split
                && object.spec.destination == *service
            {
                push_object(&mut snapshot, &split);
            }
        }
    }
    Ok(snapshot)
}

/// What to send a node holding `held` (name -> version) so that it holds
/// `target`: changed or new resources, and names to remove.
pub fn delta(
    held: &BTreeMap<String, String>,
    target: &Snapshot,
) -> (Vec<(String, Pushed)>, Vec<String>) {
    let changed = target
        .iter()
        .filter(|(name, pushed)| held.get(*name) != Some(&pushed.version))
        .map(|(name, pushed)| (name.clone(), pushed.clone()))
        .collect();
    let removed = held
        .keys()
        .filter(|name| !target.contains_key(*name))
        .cloned()
        .collect();
    (changed, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pushed(version: &str) -> Pushed {
        Pushed {
            version: version.into(),
            body: Vec::new(),
        }
    }

    #[test]
    fn a_delta_holds_only_what_differs() {
        let held: BTreeMap<String, String> = [("a", "1"), ("b", "1"), ("gone", "1")]
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect();
        let target: Snapshot = [("a", pushed("1")), ("b", pushed("2")), ("new", pushed("1"))]
            .into_iter()
            .map(|(n, p)| (n.to_owned(), p))
            .collect();
        let (changed, removed) = delta(&held, &target);
        let names: Vec<&str> = changed.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["b", "new"]);
        assert_eq!(removed, ["gone"]);
        let (changed, removed) = delta(
            &target
                .iter()
                .map(|(n, p)| (n.clone(), p.version.clone()))
                .collect(),
            &target,
        );
        assert!(changed.is_empty() && removed.is_empty());
    }
}
