//! The node's view of the mesh, rebuilt from each pushed configuration:
//! where every workload is and who it is, which services answer at which
//! virtual addresses and their endpoints (for the outbound side), and for
//! the workloads on this node their mTLS mode and the authorization
//! policies that protect them (for the inbound side).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use mesh_identity::SpiffeId;
use mesh_model::{
    Resource,
    config::{ConfigResource, EndpointEntry, NodeConfig, WorkloadAddress},
    namespace::{MtlsMode, access_logged},
    policy::ServicePolicySpec,
    service::{LoadBalancer, Protocol, ServicePort},
    split::SplitRule,
};
use tokio::{sync::watch, task::JoinHandle};

use crate::policy::{self, AuthorizationPolicy, Decision, Request, Workload};

/// A workload on this node, as its inbound side needs it.
#[derive(Clone, Debug)]
pub struct LocalWorkload {
    pub workload: Workload,
    pub mtls: MtlsMode,
    /// Its HTTP requests are logged (`mesh.io/access-log`).
    pub access_log: bool,
}

/// A service, by namespace and name.
pub type ServiceKey = (String, String);

/// A service callers reach at a virtual address.
#[derive(Clone, Debug)]
pub struct VirtualService {
    pub key: ServiceKey,
    pub ports: Vec<ServicePort>,
    pub load_balancer: LoadBalancer,
    pub hash_header: Option<String>,
}

/// A traffic split as the HTTP path applies it.
#[derive(Clone, Debug)]
pub struct Split {
    /// `namespace/name`, for logs.
    pub name: String,
    /// Only for callers serving this service (in the split's namespace).
    pub source: Option<String>,
    pub rule: SplitRule,
    /// The store revision it last changed at: the latest wins a tie.
    pub revision: i64,
}

/// Everything the data path looks up per connection.
#[derive(Debug, Default)]
pub struct Directory {
    pub revision: i64,
    trust_domain: String,
    addresses: HashMap<IpAddr, WorkloadAddress>,
    /// `(namespace, service account)` of every workload: the identities
    /// pods hold.
    identities: HashSet<(String, String)>,
    services: HashMap<IpAddr, Arc<VirtualService>>,
    /// Every service's ports, with or without an address.
    service_ports: HashMap<ServiceKey, Vec<ServicePort>>,
    /// The endpoint sets this node holds (pushed as `Endpoints`).
    endpoints: HashMap<ServiceKey, Arc<ConfigResource>>,
    splits: HashMap<ServiceKey, Vec<Split>>,
    service_policies: HashMap<ServiceKey, ServicePolicySpec>,
    local: BTreeMap<String, LocalWorkload>,
    policies: Vec<AuthorizationPolicy>,
}

/// Where a connection to a service's virtual address may go.
#[derive(Debug, PartialEq, Eq)]
pub enum ServiceTarget<'a> {
    /// The healthy endpoints serving the port, in a stable order.
    Endpoints(Vec<SocketAddr>),
    /// The service declares no such port.
    NoPort,
    /// This node does not hold the service's endpoints (yet).
    Unknown(&'a ServiceKey),
}

impl Directory {
    /// The view `config` gives, in `trust_domain`.
    pub fn new(config: &NodeConfig, trust_domain: &str) -> Self {
        let mut addresses = HashMap::new();
        let mut services = HashMap::new();
        let mut service_ports = HashMap::new();
        let mut endpoints = HashMap::new();
        let mut splits: HashMap<ServiceKey, Vec<Split>> = HashMap::new();
        let mut service_policies = HashMap::new();
        let mut namespaces = BTreeMap::new();
        let mut workloads = Vec::new();
        let mut policies = Vec::new();
        for (_, resource) in config.resources.values() {
            match resource.as_ref() {
                ConfigResource::Address(address) => {
                    // As sockets report them: an IPv4-mapped address as IPv4.
                    addresses.insert(address.ip.to_canonical(), address.clone());
                }
                ConfigResource::Object(Resource::Service(service)) => {
                    service_ports.insert(
                        (service.namespace().to_owned(), service.name().to_owned()),
                        service.spec.ports.clone(),
                    );
                    if let Some(vip) = service.spec.vip {
                        services.insert(
                            vip,
                            Arc::new(VirtualService {
                                key: (service.namespace().to_owned(), service.name().to_owned()),
                                ports: service.spec.ports.clone(),
                                load_balancer: service.spec.load_balancer,
                                hash_header: service.spec.hash_header.clone(),
                            }),
                        );
                    }
                }
                ConfigResource::Object(Resource::TrafficSplit(split)) => {
                    let name = format!("{}/{}", split.namespace(), split.name());
                    match SplitRule::new(&split.spec) {
                        Ok(rule) => splits
                            .entry((split.namespace().to_owned(), split.spec.destination.clone()))
                            .or_default()
                            .push(Split {
                                name,
                                source: split.spec.source.clone(),
                                rule,
                                revision: split.metadata.resource_version.unwrap_or(0),
                            }),
                        // Validated before it was stored; a regex this
                        // build cannot compile leaves the service unsplit.
                        Err(error) => tracing::warn!(split = name, %error, "traffic split ignored"),
                    }
                }
                ConfigResource::Object(Resource::ServicePolicy(policy)) => {
                    service_policies.insert(
                        (policy.namespace().to_owned(), policy.name().to_owned()),
                        policy.spec.clone(),
                    );
                }
                ConfigResource::Endpoints(set) => {
                    endpoints.insert(
                        (set.namespace.clone(), set.service.clone()),
                        resource.clone(),
                    );
                }
                ConfigResource::Object(Resource::Namespace(ns)) => {
                    namespaces.insert(ns.name().to_owned(), ns.metadata.clone());
                }
                ConfigResource::Object(Resource::Workload(w)) => workloads.push(w.clone()),
                ConfigResource::Object(Resource::AuthorizationPolicy(p)) => {
                    policies.push(p.clone());
                }
            }
        }
        let local = workloads
            .into_iter()
            .map(|workload| {
                let namespace = namespaces.get(workload.namespace());
                let mtls = MtlsMode::of(&workload.metadata, namespace);
                let access_log = access_logged(&workload.metadata, namespace);
                (
                    format!("{}/{}", workload.namespace(), workload.name()),
                    LocalWorkload {
                        workload,
                        mtls,
                        access_log,
                    },
                )
            })
            .collect();
        let identities = addresses
            .values()
            .map(|a| (a.namespace.clone(), a.service_account.clone()))
            .collect();
        Self {
            revision: config.revision,
            trust_domain: trust_domain.to_owned(),
            addresses,
            identities,
            services,
            service_ports,
            endpoints,
            splits,
            service_policies,
            local,
            policies,
        }
    }

    /// The mesh workload at `ip`, if one is there and captured (so it
    /// takes tunnels).
    pub fn mesh_destination(&self, ip: IpAddr) -> Option<&WorkloadAddress> {
        self.addresses.get(&ip).filter(|a| a.mesh)
    }

    /// The service whose virtual address is `ip`.
    pub fn service_at(&self, ip: IpAddr) -> Option<&Arc<VirtualService>> {
        self.services.get(&ip)
    }

    /// Where a connection to `service`'s port `port` may go.
    pub fn service_target<'a>(&self, service: &'a VirtualService, port: u16) -> ServiceTarget<'a> {
        let Some(port) = service.ports.iter().find(|p| p.port == port) else {
            return ServiceTarget::NoPort;
        };
        let Some(endpoints) = self.endpoints_of(&service.key) else {
            return ServiceTarget::Unknown(&service.key);
        };
        let wanted = port.workload_port();
        ServiceTarget::Endpoints(
            endpoints
                .iter()
                .filter(|e| e.healthy && e.port == wanted)
                .map(|e| SocketAddr::new(e.ip, e.port))
                .collect(),
        )
    }

    /// The endpoints of `service`, if this node holds them.
    pub fn endpoints_of(&self, service: &ServiceKey) -> Option<&[EndpointEntry]> {
        match self.endpoints.get(service).map(AsRef::as_ref) {
            Some(ConfigResource::Endpoints(set)) => Some(&set.endpoints),
            _ => None,
        }
    }

    /// The split that applies to a call from `caller` (a workload of this
    /// node) to `service`: one for a service the caller serves wins over one
    /// for every caller; among equals, the latest.
    pub fn split_for(
        &self,
        service: &ServiceKey,
        caller: Option<&LocalWorkload>,
    ) -> Option<&Split> {
        let candidates = self.splits.get(service)?;
        let serves = |source: &str| {
            caller.is_some_and(|c| {
                c.workload.namespace() == service.0
                    && c.workload.spec.services.iter().any(|s| s == source)
            })
        };
        latest(
            candidates
                .iter()
                .filter(|s| s.source.as_deref().is_some_and(serves)),
        )
        .or_else(|| latest(candidates.iter().filter(|s| s.source.is_none())))
    }

    /// What the workload `pod` of this node speaks on its port `port`: the
    /// first service it serves that declares that port an HTTP protocol,
    /// with the protocol; `None`: TCP (a port whose protocol is detected
    /// is detected at the caller's node only).
    pub fn inbound_service(&self, pod: &str, port: u16) -> Option<(ServiceKey, Protocol)> {
        let local = self.local.get(pod)?;
        let namespace = local.workload.namespace();
        local.workload.spec.services.iter().find_map(|service| {
            let key = (namespace.to_owned(), service.clone());
            let protocol = self
                .service_ports
                .get(&key)?
                .iter()
                .find(|p| p.workload_port() == port && p.protocol.is_http())?
                .protocol;
            Some((key, protocol))
        })
    }

    /// The policy for calls to `service`: its ServicePolicy, or the seed's
    /// defaults.
    pub fn service_policy(&self, service: &ServiceKey) -> ServicePolicySpec {
        self.service_policies
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    /// The workload at `ip`, captured or not.
    pub fn workload_at(&self, ip: IpAddr) -> Option<&WorkloadAddress> {
        self.addresses.get(&ip.to_canonical())
    }

    /// Whether some workload holds `identity` (rather than a gateway or a
    /// machine outside the mesh, whose certificate `meshctl cert issue`
    /// made).
    pub fn is_workload_identity(&self, identity: &SpiffeId) -> bool {
        identity.trust_domain == self.trust_domain
            && self
                .identities
                .contains(&(identity.namespace.clone(), identity.service_account.clone()))
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

/// The split that changed last (by name on a tie).
fn latest<'a>(splits: impl Iterator<Item = &'a Split>) -> Option<&'a Split> {
    splits.max_by(|a, b| a.revision.cmp(&b.revision).then(b.name.cmp(&a.name)))
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

    /// The pushed form of each document of `yaml`.
    fn pushed(yaml: &str) -> Vec<(String, String, mesh_model::config::ConfigResource)> {
        parse_documents(yaml)
            .unwrap()
            .into_iter()
            .map(|resource| {
                let name = object_name(&resource);
                let parsed = parse_resource(&name, &object_body(&resource)).unwrap();
                (name, "v".to_owned(), parsed)
            })
            .collect()
    }

    fn config(yaml: &str, addresses: &[WorkloadAddress]) -> NodeConfig {
        let mut changed = pushed(yaml);
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
            metadata: {name: shop, labels: {mesh.io/capture: enabled, mesh.io/mtls: permissive, mesh.io/access-log: enabled}}\n---\n\
            apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: b, namespace: shop}\n\
            spec: {node: n1, ip: 10.89.1.2, services: [reviews]}\n---\n\
            apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: c, namespace: shop, labels: {mesh.io/mtls: strict, mesh.io/access-log: disabled}}\n\
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
        // The namespace logs its workloads' requests; c opted out.
        assert!(directory.local("shop/b").unwrap().access_log);
        assert!(!directory.local("shop/c").unwrap().access_log);

        let shop = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/x").unwrap();
        let bank = SpiffeId::parse("spiffe://cluster.local/ns/bank/sa/x").unwrap();
        let ask = |pod: &str, caller: &SpiffeId| {
            directory.authorize(
                pod,
                &Request {
                    caller: Some(caller),
                    port: 80,
                    http: crate::policy::Http::No,
                },
            )
        };
        assert!(ask("shop/b", &shop).allowed());
        assert!(!ask("shop/b", &bank).allowed());
        // c does not serve reviews: the policy does not select it.
        assert!(ask("shop/c", &bank).allowed());
        assert!(!ask("shop/unknown", &shop).allowed());
    }

    #[test]
    fn a_split_for_the_caller_wins_over_one_for_everyone_then_the_latest() {
        let split = |name: &str, extra: &str, version: i64| {
            let yaml = format!(
                "apiVersion: mesh.io/v1\nkind: TrafficSplit\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{destination: reviews, v1_weight: 50, v2_weight: 50{extra}}}\n"
            );
            let mut resource = parse_documents(&yaml).unwrap().remove(0);
            resource.metadata_mut().resource_version = Some(version);
            let name = object_name(&resource);
            let parsed = parse_resource(&name, &object_body(&resource)).unwrap();
            (name, version.to_string(), parsed)
        };
        let workloads = "apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: fe, namespace: shop}\n\
            spec: {node: n1, ip: 10.89.1.2, services: [frontend]}\n---\n\
            apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: batch, namespace: shop}\n\
            spec: {node: n1, ip: 10.89.1.3, services: [batch]}\n";
        let mut changed = pushed(workloads);
        // Two for everyone (the later wins among them) and an older one
        // for frontend's calls, which wins for those whatever its age.
        changed.push(split("everyone", "", 5));
        changed.push(split("everyone-later", "", 7));
        changed.push(split("from-frontend", ", source: frontend", 2));
        changed.push(split("from-elsewhere", ", source: elsewhere", 9));
        let directory = Directory::new(
            &NodeConfig::default().updated(3, changed, &[]),
            "cluster.local",
        );
        let reviews = ("shop".to_owned(), "reviews".to_owned());
        let chosen = |pod: Option<&str>| {
            let caller = pod.map(|pod| directory.local(pod).unwrap());
            directory
                .split_for(&reviews, caller)
                .map(|s| s.name.clone())
        };
        assert_eq!(
            chosen(Some("shop/fe")).as_deref(),
            Some("shop/from-frontend")
        );
        assert_eq!(
            chosen(Some("shop/batch")).as_deref(),
            Some("shop/everyone-later")
        );
        assert_eq!(chosen(None).as_deref(), Some("shop/everyone-later"));
        let other = ("shop".to_owned(), "ratings".to_owned());
        assert!(
            directory
                .split_for(&other, directory.local("shop/fe"))
                .is_none()
        );
    }
}

#[cfg(test)]
mod service_tests {
    use mesh_model::{
        config::{
            EndpointSet, endpoints_body, endpoints_name, object_body, object_name, parse_resource,
        },
        parse_documents,
    };

    use super::*;

    fn entry(ip: &str, port: u16, healthy: bool) -> EndpointEntry {
        EndpointEntry {
            ip: ip.parse().unwrap(),
            port,
            version: None,
            healthy,
            ready: healthy,
            workload: None,
        }
    }

    #[test]
    fn a_virtual_address_maps_ports_to_the_healthy_endpoints_serving_them() {
        let yaml = "apiVersion: mesh.io/v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\n\
            spec: {vip: 10.96.0.10, ports: [{port: 80, target_port: 8080}, {port: 9090}]}\n---\n\
            apiVersion: mesh.io/v1\nkind: Service\nmetadata: {name: ledger, namespace: bank}\n\
            spec: {vip: 10.96.0.11, ports: [{port: 80}]}\n---\n\
            apiVersion: mesh.io/v1\nkind: Service\nmetadata: {name: headless, namespace: shop}\n\
            spec: {ports: [{port: 80}]}\n";
        let mut changed = Vec::new();
        for resource in parse_documents(yaml).unwrap() {
            let name = object_name(&resource);
            let parsed = parse_resource(&name, &object_body(&resource)).unwrap();
            changed.push((name, "v".to_owned(), parsed));
        }
        let set = EndpointSet {
            namespace: "shop".into(),
            service: "reviews".into(),
            endpoints: vec![
                entry("10.89.0.2", 8080, true),
                entry("10.89.0.2", 9090, true),
                entry("10.89.1.2", 8080, false),
                entry("10.89.1.3", 8080, true),
            ],
        };
        let name = endpoints_name("shop", "reviews");
        let parsed = parse_resource(&name, &endpoints_body(&set)).unwrap();
        changed.push((name, "v".to_owned(), parsed));
        let directory = Directory::new(
            &NodeConfig::default().updated(1, changed, &[]),
            "cluster.local",
        );

        let reviews = directory.service_at("10.96.0.10".parse().unwrap()).unwrap();
        let addrs = |list: &[&str]| list.iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(
            directory.service_target(reviews, 80),
            ServiceTarget::Endpoints(addrs(&["10.89.0.2:8080", "10.89.1.3:8080"]))
        );
        assert_eq!(
            directory.service_target(reviews, 9090),
            ServiceTarget::Endpoints(addrs(&["10.89.0.2:9090"]))
        );
        assert_eq!(
            directory.service_target(reviews, 8080),
            ServiceTarget::NoPort
        );
        // Known by address, its endpoints not held here.
        let ledger = directory.service_at("10.96.0.11".parse().unwrap()).unwrap();
        assert_eq!(
            directory.service_target(ledger, 80),
            ServiceTarget::Unknown(&("bank".to_owned(), "ledger".to_owned()))
        );
        // A service without an address is reached at its workloads'.
        assert!(directory.services.len() == 2);
    }
}
