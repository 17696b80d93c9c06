//! The node's view of the mesh, rebuilt from each pushed configuration:
//! where every workload is and who it is (for the outbound side), and for
//! the workloads on this node their mTLS mode and the authorization
//! policies that protect them (for the inbound side).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use mesh_identity::SpiffeId;
use mesh_model::{
    Resource,
    config::{ConfigResource, NodeConfig, WorkloadAddress},
    namespace::MtlsMode,
};
use tokio::{sync::watch, task::JoinHandle};

use crate::policy::{self, AuthorizationPolicy, Decision, Request, Workload};

/// A workload on this node, as its inbound side needs it.
#[derive(Clone, Debug)]
pub struct LocalWorkload {
    pub workload: Workload,
    pub mtls: MtlsMode,
}

/// Everything the data path looks up per connection.
#[derive(Debug, Default)]
pub struct Directory {
    pub revision: i64,
    trust_domain: String,
    addresses: HashMap<IpAddr, WorkloadAddress>,
    local: BTreeMap<String, LocalWorkload>,
    policies: Vec<AuthorizationPolicy>,
}

impl Directory {
    /// The view `config` gives, in `trust_domain`.
    pub fn new(config: &NodeConfig, trust_domain: &str) -> Self {
        let mut addresses = HashMap::new();
        let mut namespaces = BTreeMap::new();
        let mut workloads = Vec::new();
        let mut policies = Vec::new();
        for (_, resource) in config.resources.values() {
            match resource.as_ref() {
                ConfigResource::Address(address) => {
                    addresses.insert(address.ip, address.clone());
                }
                ConfigResource::Object(Resource::Namespace(ns)) => {
                    namespaces.insert(ns.name().to_owned(), ns.metadata.clone());
                }
                ConfigResource::Object(Resource::Workload(w)) => workloads.push(w.clone()),
                ConfigResource::Object(Resource::AuthorizationPolicy(p)) => {
                    policies.push(p.clone());
                }
                _ => {}
            }
        }
        let local = workloads
            .into_iter()
            .map(|workload| {
                let mtls = MtlsMode::of(&workload.metadata, namespaces.get(workload.namespace()));
                (
                    format!("{}/{}", workload.namespace(), workload.name()),
                    LocalWorkload { workload, mtls },
                )
            })
            .collect();
        Self {
            revision: config.revision,
            trust_domain: trust_domain.to_owned(),
            addresses,
            local,
            policies,
        }
    }

    /// The mesh workload at `ip`, if one is there and captured (so it
    /// takes tunnels).
    pub fn mesh_destination(&self, ip: IpAddr) -> Option<&WorkloadAddress> {
        self.addresses.get(&ip).filter(|a| a.mesh)
    }

    /// The workload at `ip`, captured or not.
    pub fn workload_at(&self, ip: IpAddr) -> Option<&WorkloadAddress> {
        self.addresses.get(&ip)
    }

    /// The identity a workload's certificate carries.
    pub fn identity(&self, address: &WorkloadAddress) -> SpiffeId {
        SpiffeId {
            trust_domain: self.trust_domain.clone(),
            namespace: address.namespace.clone(),
            service_account: address.service_account.clone(),
        }
    }

    /// A workload of this node, by `namespace/name`.
    pub fn local(&self, pod: &str) -> Option<&LocalWorkload> {
        self.local.get(pod)
    }

    /// Whether `request` may reach `pod`. A pod the configuration does not
    /// list (yet) is refused: nothing is known to allow it.
    pub fn authorize(&self, pod: &str, request: &Request<'_>) -> Decision {
        match self.local.get(pod) {
            Some(local) => policy::authorize(&self.policies, &local.workload, request),
            None => Decision::NotAllowed,
        }
    }
}

/// Keeps a [`Directory`] in step with the configuration until dropped.
#[derive(Debug)]
pub struct DirectoryFollower {
    directory: watch::Receiver<Arc<Directory>>,
    task: JoinHandle<()>,
}

impl Drop for DirectoryFollower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DirectoryFollower {
    pub fn follow(mut config: watch::Receiver<Arc<NodeConfig>>, trust_domain: String) -> Self {
        let first = Directory::new(&config.borrow_and_update(), &trust_domain);
        let (tx, directory) = watch::channel(Arc::new(first));
        let task = tokio::spawn(async move {
            while config.changed().await.is_ok() {
                let next = Directory::new(&config.borrow_and_update(), &trust_domain);
                tx.send_replace(Arc::new(next));
            }
        });
        Self { directory, task }
    }

    pub fn directory(&self) -> watch::Receiver<Arc<Directory>> {
        self.directory.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_model::{
        config::{address_body, address_name, object_body, object_name, parse_resource},
        parse_documents,
    };

    fn config(yaml: &str, addresses: &[WorkloadAddress]) -> NodeConfig {
        let mut changed = Vec::new();
        for resource in parse_documents(yaml).unwrap() {
            let name = object_name(&resource);
            let parsed = parse_resource(&name, &object_body(&resource)).unwrap();
            changed.push((name, "v".to_owned(), parsed));
        }
        for address in addresses {
            let name = address_name(&address.namespace, &address.name);
            let parsed = parse_resource(&name, &address_body(address)).unwrap();
            changed.push((name, "v".to_owned(), parsed));
        }
        NodeConfig::default().updated(3, changed, &[])
    }

    #[test]
    fn destinations_local_modes_and_policies() {
        let yaml = "apiVersion: mesh.io/v1\nkind: Namespace\n\
            metadata: {name: shop, labels: {mesh.io/capture: enabled, mesh.io/mtls: permissive}}\n---\n\
            apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: b, namespace: shop}\n\
            spec: {node: n1, ip: 10.89.1.2, services: [reviews]}\n---\n\
            apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: c, namespace: shop, labels: {mesh.io/mtls: strict}}\n\
            spec: {node: n1, ip: 10.89.1.3}\n---\n\
            apiVersion: mesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n\
            spec: {target: reviews, rules: [{from: [{namespaces: [shop]}]}]}\n";
        let remote = WorkloadAddress {
            namespace: "bank".into(),
            name: "ledger".into(),
            ip: "10.89.0.9".parse().unwrap(),
            node: "n0".into(),
            service_account: "ledger".into(),
            mesh: true,
        };
        let outside = WorkloadAddress {
            name: "legacy".into(),
            ip: "10.89.0.10".parse().unwrap(),
            mesh: false,
            ..remote.clone()
        };
        let directory = Directory::new(&config(yaml, &[remote, outside]), "cluster.local");
        assert_eq!(directory.revision, 3);
        let found = directory
            .mesh_destination("10.89.0.9".parse().unwrap())
            .unwrap();
        assert_eq!(
            directory.identity(found).to_string(),
            "spiffe://cluster.local/ns/bank/sa/ledger"
        );
        assert!(
            directory
                .mesh_destination("10.89.0.10".parse().unwrap())
                .is_none()
        );
        assert!(
            directory
                .workload_at("10.89.0.10".parse().unwrap())
                .is_some()
        );
        assert_eq!(
            directory.local("shop/b").unwrap().mtls,
            MtlsMode::Permissive
        );
        assert_eq!(directory.local("shop/c").unwrap().mtls, MtlsMode::Strict);

        let shop = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/x").unwrap();
        let bank = SpiffeId::parse("spiffe://cluster.local/ns/bank/sa/x").unwrap();
        let ask = |pod: &str, caller: &SpiffeId| {
            directory.authorize(
                pod,
                &Request {
                    caller: Some(caller),
                    port: 80,
                },
            )
        };
        assert!(ask("shop/b", &shop).allowed());
        assert!(!ask("shop/b", &bank).allowed());
        // c does not serve reviews: the policy does not select it.
        assert!(ask("shop/c", &bank).allowed());
        assert!(!ask("shop/unknown", &shop).allowed());
    }
}
