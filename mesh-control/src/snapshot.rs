//! What nodes are sent, kept by each replica in memory and updated
//! incrementally.
//!
//! The [`Catalog`] holds every resource a node could be pushed, encoded
//! once (body and version are computed when the resource changes, not per
//! node), each with the [`Scope`] of nodes that need it:
//!
//! - a workload goes to its own node;
//! - a namespace and its authorization policies go to every node running
//!   a workload in it;
//! - a service, its endpoints, its policy and the traffic splits for it go
//!   to those nodes and to nodes that subscribed to the service;
//! - every workload's address (IP, node, identity, captured or not) goes to
//!   every node: small, and what a node needs to tunnel to any destination.
//!
//! The catalog follows the store's change log: a change to one service
//! re-reads that service and its endpoints, nothing else, and the pushed
//! names it touched are logged at that revision. A node's session looks at
//! those names only to find what to send; the full per-node selection runs
//! when a node connects, changes its subscriptions, or gains or loses a
//! namespace.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use mesh_model::{
    Kind, Object, Resource,
    config::{
        EndpointEntry, EndpointSet, WorkloadAddress, address_body, address_name, endpoints_body,
        endpoints_name, object_body, object_name_of, version_hash, version_text,
    },
    namespace::{captured, opted_out},
    workload::WorkloadSpec,
};
use tokio::sync::watch;

use crate::store::{Endpoint, Store, StoreError, endpoints_affected_by};

/// A service, `(namespace, name)`.
pub type ServiceRef = (String, String);

/// A resource as pushed: its encoded body and the version of that body.
#[derive(Debug, PartialEq, Eq)]
pub struct Pushed {
    /// [`version_hash`] of the body; sent as 16 hex digits.
    pub version: u64,
    pub body: Vec<u8>,
}

impl Pushed {
    fn new(body: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            version: version_hash(&body),
            body,
        })
    }

    /// The version as sent.
    pub fn version_text(&self) -> String {
        version_text(self.version)
    }
}

/// A version as a node reports it; anything unreadable is resent.
pub fn parse_version(text: &str) -> Option<u64> {
    u64::from_str_radix(text, 16).ok()
}

/// Which nodes need a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every node.
    Everyone,
    /// The node of that name.
    Node(String),
    /// Nodes running a workload in the namespace.
    Namespace(String),
    /// Nodes running a workload in the service's namespace, or subscribed
    /// to the service.
    Service(ServiceRef),
}

/// What decides which resources one node gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeView {
    pub node: String,
    /// Namespaces the node runs workloads in.
    pub namespaces: BTreeSet<String>,
    /// Services from elsewhere the node asked for.
    pub subscribed: BTreeSet<ServiceRef>,
}

impl NodeView {
    pub fn includes(&self, scope: &Scope) -> bool {
        match scope {
            Scope::Everyone => true,
            Scope::Node(node) => *node == self.node,
            Scope::Namespace(namespace) => self.namespaces.contains(namespace),
            Scope::Service(service) => {
                self.namespaces.contains(&service.0) || self.subscribed.contains(service)
            }
        }
    }
}

#[derive(Debug)]
struct Entry {
    pushed: Arc<Pushed>,
    scope: Scope,
}

type ObjectKey = (Kind, Option<String>, String);

/// How many revisions of touched names are kept; a session further behind
/// than that recomputes its node's selection in full.
const LOG_REVISIONS: usize = 4096;

/// Every pushable resource, by pushed name, at one store revision.
#[derive(Debug, Default)]
pub struct Catalog {
    revision: i64,
    entries: HashMap<Arc<str>, Entry>,
    /// The stored resources, for what entries are derived from.
    objects: HashMap<ObjectKey, Resource>,
    /// Node -> namespace -> workloads of that node in it.
    node_namespaces: HashMap<String, BTreeMap<String, usize>>,
    /// Each service's endpoints, as pushed.
    endpoints: HashMap<ServiceRef, Vec<Endpoint>>,
    /// Pushed names touched at each revision, oldest first.
    log: VecDeque<(i64, Vec<Arc<str>>)>,
    /// The log holds every revision after this one.
    log_floor: i64,
}

/// The changes to apply to a catalog, read from the store.
#[derive(Debug, Default)]
struct Update {
    revision: i64,
    objects: Vec<(ObjectKey, Option<Resource>)>,
    endpoints: Vec<(ServiceRef, Vec<Endpoint>)>,
}

impl Catalog {
    /// The store revision the catalog reflects.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Namespaces `node` runs workloads in.
    pub fn namespaces_of(&self, node: &str) -> BTreeSet<String> {
        self.node_namespaces
            .get(node)
            .map(|namespaces| namespaces.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Everything `view`'s node should hold.
    pub fn snapshot<'a>(
        &'a self,
        view: &'a NodeView,
    ) -> impl Iterator<Item = (&'a Arc<str>, &'a Arc<Pushed>)> + 'a {
        self.entries
            .iter()
            .filter(|(_, entry)| view.includes(&entry.scope))
            .map(|(name, entry)| (name, &entry.pushed))
    }

    /// `name` as `view`'s node should hold it; `None`: it should not.
    pub fn wanted(&self, name: &str, view: &NodeView) -> Option<&Arc<Pushed>> {
        self.entries
            .get_key_value(name)
            .filter(|(_, entry)| view.includes(&entry.scope))
            .map(|(_, entry)| &entry.pushed)
    }

    /// The pushed name as the catalog holds it (shared, not copied).
    pub fn name(&self, name: &str) -> Option<&Arc<str>> {
        self.entries.get_key_value(name).map(|(name, _)| name)
    }

    /// Whether `node` runs the workload behind endpoint `ip:port` of
    /// `service`, and the readiness recorded for it: what a node may report
    /// about, and what its report would change.
    pub fn endpoint_on(
        &self,
        node: &str,
        service: &ServiceRef,
        ip: IpAddr,
        port: u16,
    ) -> Option<bool> {
        let endpoint = self
            .endpoints
            .get(service)?
            .iter()
            .find(|e| e.ip == ip && e.port == port)?;
        let workload = endpoint.workload.as_ref()?;
        let key = (Kind::Workload, Some(service.0.clone()), workload.clone());
        match self.objects.get(&key) {
            Some(Resource::Workload(w)) if w.spec.node == node && w.spec.ip == ip => {
                Some(endpoint.ready)
            }
            _ => None,
        }
    }

    /// Whether workload `namespace/name` runs on `node`: whose requests a
    /// node may report.
    pub fn workload_on(&self, node: &str, namespace: &str, name: &str) -> bool {
        let key = (Kind::Workload, Some(namespace.to_owned()), name.to_owned());
        matches!(self.objects.get(&key), Some(Resource::Workload(w)) if w.spec.node == node)
    }

    /// Pushed names touched after `revision`; `None` when the log no
    /// longer reaches back that far.
    pub fn touched_since(&self, revision: i64) -> Option<BTreeSet<Arc<str>>> {
        if revision < self.log_floor {
            return None;
        }
        Some(
            self.log
                .iter()
                .filter(|(at, _)| *at > revision)
                .flat_map(|(_, names)| names.iter().cloned())
                .collect(),
        )
    }

    /// A catalog holding `update` as loaded at its revision: the log
    /// starts after it (loading is not a change anyone needs to hear of).
    fn loaded(update: Update) -> Self {
        let revision = update.revision;
        let mut catalog = Catalog {
            revision,
            log_floor: revision,
            ..Catalog::default()
        };
        catalog.apply(update);
        catalog.log.clear();
        catalog
    }

    fn apply(&mut self, update: Update) {
        let mut touched = BTreeSet::new();
        for (key, resource) in update.objects {
            self.put_object(key, resource, &mut touched);
        }
        for (service, endpoints) in update.endpoints {
            self.put_endpoints(service, endpoints, &mut touched);
        }
        self.revision = self.revision.max(update.revision);
        if !touched.is_empty() {
            self.log
                .push_back((self.revision, touched.into_iter().collect()));
        }
        while self.log.len() > LOG_REVISIONS {
            if let Some((at, _)) = self.log.pop_front() {
                self.log_floor = at;
            }
        }
    }

    fn put_entry(
        &mut self,
        name: String,
        entry: Option<(Vec<u8>, Scope)>,
        touched: &mut BTreeSet<Arc<str>>,
    ) {
        let name: Arc<str> = match self.entries.get_key_value(name.as_str()) {
            Some((shared, _)) => shared.clone(),
            None => name.into(),
        };
        match entry {
            Some((body, scope)) => {
                let pushed = Pushed::new(body);
                let same = self
                    .entries
                    .get(&name)
                    .is_some_and(|e| e.pushed == pushed && e.scope == scope);
                if !same {
                    self.entries.insert(name.clone(), Entry { pushed, scope });
                    touched.insert(name);
                }
            }
            None => {
                if self.entries.remove(&name).is_some() {
                    touched.insert(name);
                }
            }
        }
    }

    fn put_object(
        &mut self,
        key: ObjectKey,
        resource: Option<Resource>,
        touched: &mut BTreeSet<Arc<str>>,
    ) {
        let (kind, namespace, name) = &key;
        let old = match &resource {
            Some(resource) => self.objects.insert(key.clone(), resource.clone()),
            None => self.objects.remove(&key),
        };
        let pushed_name = object_name_of(*kind, namespace.as_deref(), name);
        let namespace = namespace.clone().unwrap_or_default();
        let scope = match &resource {
            None => None,
            Some(Resource::Workload(w)) => Some(Scope::Node(w.spec.node.clone())),
            Some(Resource::Namespace(ns)) => Some(Scope::Namespace(ns.name().to_owned())),
            Some(Resource::AuthorizationPolicy(_)) => Some(Scope::Namespace(namespace.clone())),
            // Every node: a caller anywhere may connect to the service's
            // address, and its node learns the rest on demand.
            Some(Resource::Service(_)) => Some(Scope::Everyone),
            Some(Resource::ServicePolicy(_)) => {
                Some(Scope::Service((namespace.clone(), name.clone())))
            }
            Some(Resource::TrafficSplit(split)) => Some(Scope::Service((
                namespace.clone(),
                split.spec.destination.clone(),
            ))),
        };
        let entry = resource
            .as_ref()
            .zip(scope)
            .map(|(resource, scope)| (object_body(resource), scope));
        self.put_entry(pushed_name, entry, touched);
        match kind {
            Kind::Workload => {
                if let Some(Resource::Workload(old)) = &old {
                    self.count_workload(old, false);
                }
                match &resource {
                    Some(Resource::Workload(new)) => {
                        self.count_workload(new, true);
                        self.put_address(new, touched);
                    }
                    _ => self.put_entry(address_name(&namespace, name), None, touched),
                }
            }
            Kind::Namespace => {
                let was = old.as_ref().is_some_and(|ns| captured(ns.metadata()));
                let is = resource.as_ref().is_some_and(|ns| captured(ns.metadata()));
                if was != is {
                    let workloads: Vec<Object<WorkloadSpec>> = self
                        .objects
                        .values()
                        .filter_map(|resource| match resource {
                            Resource::Workload(w) if w.namespace() == name => Some(w.clone()),
                            _ => None,
                        })
                        .collect();
                    for workload in &workloads {
                        self.put_address(workload, touched);
                    }
                }
            }
            _ => {}
        }
    }

    fn count_workload(&mut self, workload: &Object<WorkloadSpec>, add: bool) {
        let namespaces = self
            .node_namespaces
            .entry(workload.spec.node.clone())
            .or_default();
        let count = namespaces
            .entry(workload.namespace().to_owned())
            .or_default();
        if add {
            *count += 1;
        } else {
            *count = count.saturating_sub(1);
            if *count == 0 {
                namespaces.remove(workload.namespace());
            }
        }
        if namespaces.is_empty() {
            self.node_namespaces.remove(&workload.spec.node);
        }
    }

    fn put_address(&mut self, workload: &Object<WorkloadSpec>, touched: &mut BTreeSet<Arc<str>>) {
        let namespace = workload.namespace().to_owned();
        let namespace_captured = self
            .objects
            .get(&(Kind::Namespace, None, namespace.clone()))
            .is_some_and(|ns| captured(ns.metadata()));
        let address = WorkloadAddress {
            mesh: namespace_captured && !opted_out(&workload.metadata),
            name: workload.name().to_owned(),
            ip: workload.spec.ip,
            node: workload.spec.node.clone(),
            service_account: workload.spec.service_account.clone(),
            namespace,
        };
        self.put_entry(
            address_name(&address.namespace, &address.name),
            Some((address_body(&address), Scope::Everyone)),
            touched,
        );
    }

    fn put_endpoints(
        &mut self,
        (namespace, service): ServiceRef,
        endpoints: Vec<Endpoint>,
        touched: &mut BTreeSet<Arc<str>>,
    ) {
        let key = (Kind::Service, Some(namespace.clone()), service.clone());
        let name = endpoints_name(&namespace, &service);
        if !self.objects.contains_key(&key) {
            self.endpoints.remove(&(namespace, service));
            self.put_entry(name, None, touched);
            return;
        }
        self.endpoints
            .insert((namespace.clone(), service.clone()), endpoints.clone());
        let set = EndpointSet {
            namespace: namespace.clone(),
            service: service.clone(),
            endpoints: endpoints
                .into_iter()
                .map(|e| EndpointEntry {
                    ip: e.ip,
                    port: e.port,
                    version: e.version,
                    healthy: e.healthy && e.ready,
                    ready: e.ready,
                    workload: e.workload,
                })
                .collect(),
        };
        self.put_entry(
            name,
            Some((endpoints_body(&set), Scope::Service((namespace, service)))),
            touched,
        );
    }
}

fn key_of(resource: &Resource) -> ObjectKey {
    (
        resource.kind(),
        resource.namespace().map(str::to_owned),
        resource.name().to_owned(),
    )
}

/// Reads the whole catalog from the store.
async fn load(store: &Store) -> Result<Catalog, StoreError> {
    // Read first: whatever is listed next is at least this new, and the
    // change log after it brings the rest.
    let revision = store.revision().await?;
    let mut update = Update {
        revision,
        ..Update::default()
    };
    // Namespaces first: a workload's address depends on its namespace.
    for kind in Kind::ALL {
        for resource in store.list(kind, None).await? {
            update.objects.push((key_of(&resource), Some(resource)));
        }
    }
    let mut by_service: BTreeMap<ServiceRef, Vec<Endpoint>> = BTreeMap::new();
    for (kind, namespace, name) in update.objects.iter().map(|(key, _)| key) {
        if *kind == Kind::Service {
            by_service.insert(
                (namespace.clone().unwrap_or_default(), name.clone()),
                Vec::new(),
            );
        }
    }
    for endpoint in store.all_endpoints().await? {
        let Some((name, namespace)) = endpoint.service_name.split_once('.') else {
            continue;
        };
        if let Some(list) = by_service.get_mut(&(namespace.to_owned(), name.to_owned())) {
            list.push(endpoint);
        }
    }
    update.endpoints = by_service.into_iter().collect();
    Ok(Catalog::loaded(update))
}

/// Reads what changed after the catalog's revision and applies it; true if
/// anything did.
async fn catch_up(store: &Store, catalog: &RwLock<Catalog>) -> Result<bool, StoreError> {
    let from = read(catalog).revision;
    let changes = store.changes_since(from).await?;
    let Some(revision) = changes.iter().map(|c| c.revision).max() else {
        return Ok(false);
    };
    let keys: BTreeSet<ObjectKey> = changes
        .iter()
        .filter_map(|change| {
            let kind = Kind::from_document(&change.kind)?;
            let namespace = (!change.namespace.is_empty()).then(|| change.namespace.clone());
            Some((kind, namespace, change.name.clone()))
        })
        .collect();
    let mut update = Update {
        revision,
        ..Update::default()
    };
    for (kind, namespace, name) in keys {
        let resource = store.get(kind, namespace.as_deref(), &name).await?;
        update.objects.push(((kind, namespace, name), resource));
    }
    // Endpoints follow services and the workloads serving them: before
    // and after the change.
    let services: BTreeSet<ServiceRef> = {
        let current = read(catalog);
        update
            .objects
            .iter()
            .flat_map(|(key, new)| {
                let mut services = endpoints_affected_by(current.objects.get(key));
                services.extend(endpoints_affected_by(new.as_ref()));
                services
            })
            .collect()
    };
    for (namespace, service) in services {
        let endpoints = store.endpoints(&format!("{service}.{namespace}")).await?;
        update.endpoints.push(((namespace, service), endpoints));
    }
    write(catalog).apply(update);
    Ok(true)
}

fn read(catalog: &RwLock<Catalog>) -> std::sync::RwLockReadGuard<'_, Catalog> {
    catalog.read().unwrap_or_else(|e| e.into_inner())
}

fn write(catalog: &RwLock<Catalog>) -> std::sync::RwLockWriteGuard<'_, Catalog> {
    catalog.write().unwrap_or_else(|e| e.into_inner())
}

/// A replica's catalog, and the revision it is at (`None` until the first
/// load succeeded).
#[derive(Clone, Debug)]
pub struct SharedCatalog {
    catalog: Arc<RwLock<Catalog>>,
    revision: watch::Receiver<Option<i64>>,
}

impl SharedCatalog {
    /// Loads the catalog from `store` and keeps it current, catching up
    /// whenever `revisions` moves. A store that fails is retried: the
    /// catalog stays at its last revision meanwhile.
    pub fn follow(store: Store, mut revisions: watch::Receiver<i64>) -> Self {
        let catalog = Arc::new(RwLock::new(Catalog::default()));
        let (tx, revision) = watch::channel(None);
        let shared = catalog.clone();
        tokio::spawn(async move {
            let retry = Duration::from_millis(500);
            loop {
                match load(&store).await {
                    Ok(loaded) => {
                        let at = loaded.revision;
                        *write(&shared) = loaded;
                        tx.send_replace(Some(at));
                        break;
                    }
                    Err(error) => tracing::warn!(%error, "loading the configuration catalog"),
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(retry).await;
            }
            loop {
                match catch_up(&store, &shared).await {
                    Ok(true) => {
                        tx.send_replace(Some(read(&shared).revision));
                    }
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(%error, "reading configuration changes");
                        tokio::time::sleep(retry).await;
                        continue;
                    }
                }
                if revisions.changed().await.is_err() || tx.is_closed() {
                    return;
                }
            }
        });
        Self { catalog, revision }
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Catalog> {
        read(&self.catalog)
    }

    /// Follows the catalog's revision.
    pub fn revisions(&self) -> watch::Receiver<Option<i64>> {
        self.revision.clone()
    }
}

/// What to send a node: changed or new resources, and names to remove.
pub type Delta = (Vec<(Arc<str>, Arc<Pushed>)>, Vec<Arc<str>>);

/// What to send a node holding `held` (name -> version) so that it holds
/// exactly `target`.
pub fn delta<'a>(
    held: &BTreeMap<Arc<str>, u64>,
    target: impl Iterator<Item = (&'a Arc<str>, &'a Arc<Pushed>)>,
) -> Delta {
    let mut seen = BTreeSet::new();
    let mut changed = Vec::new();
    for (name, pushed) in target {
        seen.insert(name.clone());
        if held.get(name) != Some(&pushed.version) {
            changed.push((name.clone(), pushed.clone()));
        }
    }
    let removed = held
        .keys()
        .filter(|name| !seen.contains(*name))
        .cloned()
        .collect();
    (changed, removed)
}

/// [`delta`] when only `touched` names may differ from what the node holds.
pub fn delta_of_touched(
    held: &BTreeMap<Arc<str>, u64>,
    touched: &BTreeSet<Arc<str>>,
    catalog: &Catalog,
    view: &NodeView,
) -> Delta {
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    for name in touched {
        match catalog.wanted(name, view) {
            Some(pushed) => {
                if held.get(name) != Some(&pushed.version) {
                    changed.push((name.clone(), pushed.clone()));
                }
            }
            None => {
                if held.contains_key(name) {
                    removed.push(name.clone());
                }
            }
        }
    }
    (changed, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pushed(version: u64) -> Arc<Pushed> {
        Arc::new(Pushed {
            version,
            body: Vec::new(),
        })
    }

    fn names<'a>(list: impl IntoIterator<Item = &'a Arc<str>>) -> Vec<&'a str> {
        list.into_iter().map(|n| &**n).collect()
    }

    #[test]
    fn a_delta_holds_only_what_differs() {
        let held: BTreeMap<Arc<str>, u64> = [("a", 1), ("b", 1), ("gone", 1)]
            .into_iter()
            .map(|(n, v)| (n.into(), v))
            .collect();
        let target: BTreeMap<Arc<str>, Arc<Pushed>> =
            [("a", pushed(1)), ("b", pushed(2)), ("new", pushed(1))]
                .into_iter()
                .map(|(n, p)| (n.into(), p))
                .collect();
        let (changed, removed) = delta(&held, target.iter());
        assert_eq!(names(changed.iter().map(|(n, _)| n)), ["b", "new"]);
        assert_eq!(names(&removed), ["gone"]);
        let now: BTreeMap<Arc<str>, u64> =
            target.iter().map(|(n, p)| (n.clone(), p.version)).collect();
        let (changed, removed) = delta(&now, target.iter());
        assert!(changed.is_empty() && removed.is_empty());
    }

    fn catalog_of(yaml: &str) -> Catalog {
        let objects = mesh_model::parse_documents(yaml)
            .unwrap()
            .into_iter()
            .map(|r| (key_of(&r), Some(r)))
            .collect();
        Catalog::loaded(Update {
            revision: 1,
            objects,
            endpoints: Vec::new(),
        })
    }

    const MESH: &str = r#"
apiVersion: mesh.io/v1
kind: Namespace
metadata: {name: shop, labels: {mesh.io/capture: enabled}}
---
apiVersion: mesh.io/v1
kind: Namespace
metadata: {name: bank}
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: web-1, namespace: shop}
spec: {node: n1, ip: 10.0.0.1, services: [web]}
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: ledger-1, namespace: bank}
spec: {node: n2, ip: 10.0.0.2}
---
apiVersion: mesh.io/v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{port: 80}]}
---
apiVersion: mesh.io/v1
kind: TrafficSplit
metadata: {name: web-canary, namespace: shop}
spec: {destination: web, v1_weight: 90, v2_weight: 10}
"#;

    fn view(catalog: &Catalog, node: &str, subscribed: &[(&str, &str)]) -> NodeView {
        NodeView {
            node: node.to_owned(),
            namespaces: catalog.namespaces_of(node),
            subscribed: subscribed
                .iter()
                .map(|(ns, name)| ((*ns).to_owned(), (*name).to_owned()))
                .collect(),
        }
    }

    fn selection(catalog: &Catalog, view: &NodeView) -> Vec<String> {
        let mut names: Vec<String> = catalog.snapshot(view).map(|(n, _)| n.to_string()).collect();
        names.sort();
        names
    }

    #[test]
    fn each_node_gets_its_namespaces_its_subscriptions_and_every_address_and_service() {
        let catalog = catalog_of(MESH);
        let n1 = view(&catalog, "n1", &[]);
        assert_eq!(
            selection(&catalog, &n1),
            [
                "address/bank/ledger-1",
                "address/shop/web-1",
                "namespace/shop",
                "service/shop/web",
                "trafficsplit/shop/web-canary",
                "workload/shop/web-1",
            ]
        );
        let n2 = view(&catalog, "n2", &[("shop", "web")]);
        assert_eq!(
            selection(&catalog, &n2),
            [
                "address/bank/ledger-1",
                "address/shop/web-1",
                "namespace/bank",
                "service/shop/web",
                "trafficsplit/shop/web-canary",
                "workload/bank/ledger-1",
            ]
        );
        // A node running nothing of shop still learns the service (callers
        // there may connect to its address) but not its policy or splits.
        let n3 = view(&catalog, "n3", &[]);
        assert_eq!(
            selection(&catalog, &n3),
            [
                "address/bank/ledger-1",
                "address/shop/web-1",
                "service/shop/web",
            ]
        );
        // An address says whether its namespace is captured.
        let address = |catalog: &Catalog, name: &str| -> WorkloadAddress {
            serde_json::from_slice(&catalog.wanted(name, &n1).unwrap().body).unwrap()
        };
        assert!(address(&catalog, "address/shop/web-1").mesh);
        assert!(!address(&catalog, "address/bank/ledger-1").mesh);
    }

    #[test]
    fn a_change_touches_only_what_it_changes_and_follows_into_derived_entries() {
        let mut catalog = catalog_of(MESH);
        // Relabelling a namespace touches it and its workloads' addresses.
        let relabel = mesh_model::parse_documents(
            "apiVersion: mesh.io/v1\nkind: Namespace\nmetadata: {name: bank, labels: {mesh.io/capture: enabled}}\n",
        )
        .unwrap()
        .remove(0);
        catalog.apply(Update {
            revision: 2,
            objects: vec![(key_of(&relabel), Some(relabel.clone()))],
            endpoints: Vec::new(),
        });
        assert_eq!(
            names(&catalog.touched_since(1).unwrap()),
            ["address/bank/ledger-1", "namespace/bank"]
        );
        // Moving a workload to another node moves its namespace there.
        let moved = mesh_model::parse_documents(
            "apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: web-1, namespace: shop}\nspec: {node: n2, ip: 10.0.0.1, services: [web]}\n",
        )
        .unwrap()
        .remove(0);
        catalog.apply(Update {
            revision: 3,
            objects: vec![(key_of(&moved), Some(moved))],
            endpoints: Vec::new(),
        });
        assert_eq!(
            names(&catalog.touched_since(2).unwrap()),
            ["address/shop/web-1", "workload/shop/web-1"]
        );
        assert!(catalog.namespaces_of("n1").is_empty());
        assert_eq!(
            catalog.namespaces_of("n2").into_iter().collect::<Vec<_>>(),
            ["bank", "shop"]
        );
        // Deleting the service takes its endpoints with it.
        let web = (Kind::Service, Some("shop".to_owned()), "web".to_owned());
        catalog.apply(Update {
            revision: 4,
            objects: vec![(web, None)],
            endpoints: vec![(("shop".into(), "web".into()), Vec::new())],
        });
        assert_eq!(
            names(&catalog.touched_since(3).unwrap()),
            ["service/shop/web"]
        );
        // The same write again touches nothing; the log reaches back to
        // the load, not before.
        catalog.apply(Update {
            revision: 5,
            objects: vec![(key_of(&relabel), Some(relabel))],
            endpoints: Vec::new(),
        });
        assert!(catalog.touched_since(4).unwrap().is_empty());
        assert_eq!(catalog.revision(), 5);
        assert_eq!(catalog.touched_since(1).unwrap().len(), 5);
        assert!(catalog.touched_since(0).is_none());
    }
}
