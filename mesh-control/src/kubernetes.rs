//! Kubernetes as the source of truth (`mesh-control serve --kubernetes`):
//! namespaces, pods, services and the mesh's custom resources are watched
//! and mirrored into the store, so the rest of the control plane — push,
//! certificates, the API — works the same with or without Kubernetes.
//!
//! Each kind is followed by a reflector (list, then watch; on a watch
//! that expired, `410 Gone`, a relist that replaces the cache whole). Once
//! every cache has listed, and after each change (gathered for
//! [`SETTLE`]), the mirror works out the whole desired set from the caches
//! and converges the store on it: what differs is applied in one
//! transaction, and what the mirror wrote before (label
//! `mesh.io/managed-by: kubernetes`) and is no longer desired is deleted.
//! Resources applied by hand are never deleted. An object that does not
//! convert (a pod name that is not a DNS label, a custom resource the mesh
//! refuses) is left out and logged, and does not hold up the others.

pub mod convert;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use futures_util::{StreamExt as _, stream::BoxStream};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Service},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use mesh_model::{Kind, Resource};
use tokio::sync::Notify;

use mesh_api::error_chain as chain;

use crate::store::{Leadership, Store, StoreError};
use convert::{Converted, MANAGED_BY, Skipped};

/// How long changes are gathered before the store is converged, so a
/// burst (a rollout) becomes one write.
pub const SETTLE: Duration = Duration::from_millis(200);
/// How often the store is converged with no change seen: repairs what a
/// failed write or a hand edit left different.
const RESYNC: Duration = Duration::from_secs(60);
/// How soon a convergence that failed (the store down, a change refused,
/// another replica mirroring) is tried again.
const RETRY: Duration = Duration::from_secs(5);
/// The role one replica at a time holds (see [`Store::try_lead`]).
const MIRROR_ROLE: &str = "kubernetes-mirror";

/// The mesh's custom resource kinds, as the CRDs name them.
pub const CUSTOM_KINDS: [Kind; 3] = [
    Kind::ServicePolicy,
    Kind::TrafficSplit,
    Kind::AuthorizationPolicy,
];

/// One kind's first list, done (`false`: its reflector is gone).
type FirstList<'a> = std::pin::Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// The caches the reflectors fill.
#[derive(Clone)]
struct Caches {
    namespaces: reflector::Store<Namespace>,
    pods: reflector::Store<Pod>,
    services: reflector::Store<Service>,
    custom: Vec<(Kind, reflector::Store<DynamicObject>)>,
}

impl Caches {
    /// Waits for every kind's first list, saying now and then which are
    /// still awaited (a CRD not installed, a permission missing).
    async fn ready(&self) {
        const PATIENCE: Duration = Duration::from_secs(30);
        let mut waits: Vec<(&str, FirstList<'_>)> = vec![
            (
                "Namespace",
                Box::pin(async { self.namespaces.wait_until_ready().await.is_ok() }),
            ),
            (
                "Pod",
                Box::pin(async { self.pods.wait_until_ready().await.is_ok() }),
            ),
            (
                "Service",
                Box::pin(async { self.services.wait_until_ready().await.is_ok() }),
            ),
        ];
        for (kind, store) in &self.custom {
            waits.push((
                kind.as_str(),
                Box::pin(async { store.wait_until_ready().await.is_ok() }),
            ));
        }
        for (kind, wait) in &mut waits {
            loop {
                match tokio::time::timeout(PATIENCE, wait.as_mut()).await {
                    // A reflector gone ends the mirror too.
                    Ok(_) => break,
                    Err(_) => tracing::warn!(
                        kind,
                        "still waiting for the first list of {kind} from Kubernetes; nothing is mirrored until every kind has listed (is the CRD installed? may mesh-control list it?)"
                    ),
                }
            }
        }
    }

    /// Everything the caches say the store should hold, in the order it
    /// can be written (namespaces first), and what was left out.
    fn desired(&self, now: Timestamp) -> (Vec<Resource>, Vec<Skipped>) {
        let pods = self.pods.state();
        let services = self.services.state();
        let (pods_in, services_in) = (by_namespace(&pods), by_namespace(&services));
        let (no_pods, no_services) = (Vec::new(), Vec::new());
        let mut converted: Vec<Converted> = Vec::new();
        converted.extend(
            self.namespaces
                .state()
                .iter()
                .map(|ns| convert::namespace(ns)),
        );
        for service in &services {
            let local = pods_in.get(&service.metadata.namespace).unwrap_or(&no_pods);
            converted.push(convert::service(service, local));
        }
        for pod in &pods {
            let local = services_in
                .get(&pod.metadata.namespace)
                .unwrap_or(&no_services);
            converted.push(convert::workload(pod, local, now));
        }
        for (kind, store) in &self.custom {
            converted.extend(
                store
                    .state()
                    .iter()
                    .map(|object| convert::custom(*kind, object)),
            );
        }
        let mut resources = Vec::new();
        let mut skipped = Vec::new();
        for outcome in converted {
            match outcome {
                Ok(Some(resource)) => resources.push(resource),
                Ok(None) => {}
                Err(why) => skipped.push(why),
            }
        }
        // What lives in a namespace that did not convert cannot be written
        // either; it is kept as stored, like the namespace.
        let kept: BTreeSet<String> = resources
            .iter()
            .filter(|r| r.kind() == Kind::Namespace)
            .map(|r| r.name().to_owned())
            .collect();
        resources.retain(|r| match r.namespace() {
            Some(ns) if !kept.contains(ns) => {
                skipped.push(Skipped {
                    object: r.reference(),
                    resource: r.reference(),
                    reason: format!("its namespace {ns} is not mirrored"),
                });
                false
            }
            _ => true,
        });
        (resources, skipped)
    }
}

/// `objects` grouped by namespace.
fn by_namespace<K: kube::Resource>(objects: &[Arc<K>]) -> BTreeMap<Option<String>, Vec<&K>> {
    let mut grouped: BTreeMap<Option<String>, Vec<&K>> = BTreeMap::new();
    for object in objects {
        grouped
            .entry(object.meta().namespace.clone())
            .or_default()
            .push(object);
    }
    grouped
}

/// A reflector's events as "something changed", errors logged.
fn follow<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    what: &'static str,
) -> BoxStream<'static, ()>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .filter_map(move |event| async move {
            match event {
                Ok(_) => Some(()),
                Err(error) => {
                    tracing::warn!(kind = what, %error, "watching Kubernetes; retrying");
                    None
                }
            }
        })
        .boxed()
}

/// What one convergence did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Converged {
    pub written: usize,
    pub deleted: usize,
    pub skipped: Vec<Skipped>,
    /// Resources the store refused, with why.
    pub refused: Vec<(String, String)>,
}

/// Mirrors the cluster behind `client` into `store` until `stop` resolves.
pub async fn mirror(client: Client, store: Store, stop: impl Future<Output = ()>) {
    let (namespaces, namespaces_writer) = reflector::store::<Namespace>();
    let (pods, pods_writer) = reflector::store::<Pod>();
    let (services, services_writer) = reflector::store::<Service>();
    let mut streams = vec![
        follow(
            Api::<Namespace>::all(client.clone()),
            namespaces_writer,
            "Namespace",
        ),
        follow(Api::<Pod>::all(client.clone()), pods_writer, "Pod"),
        follow(
            Api::<Service>::all(client.clone()),
            services_writer,
            "Service",
        ),
    ];
    let mut custom = Vec::new();
    for kind in CUSTOM_KINDS {
        let gvk = GroupVersionKind::gvk("mesh.io", "v1", kind.as_str());
        let resource = ApiResource::from_gvk_with_plural(&gvk, &kind.plural());
        let writer = reflector::store::Writer::<DynamicObject>::new(resource.clone());
        custom.push((kind, writer.as_reader()));
        streams.push(follow(
            Api::<DynamicObject>::all_with(client.clone(), &resource),
            writer,
            kind.as_str(),
        ));
    }
    let caches = Caches {
        namespaces,
        pods,
        services,
        custom,
    };
    let changed = Arc::new(Notify::new());
    let notify = changed.clone();
    let mut events = futures_util::stream::select_all(streams);
    let watching = async move {
        while events.next().await.is_some() {
            notify.notify_one();
        }
    };
    let converging = async {
        caches.ready().await;
        tracing::info!("Kubernetes listed every kind");
        let mut leadership = None;
        let mut last = Converged::default();
        loop {
            let wait = match lead(&store, &mut leadership).await {
                false => RETRY,
                true => {
                    let (desired, skipped) = caches.desired(Timestamp::now());
                    let keep: BTreeSet<String> =
                        skipped.iter().map(|s| s.resource.clone()).collect();
                    match converge(&store, desired, &keep).await {
                        Ok(mut done) => {
                            done.skipped = skipped;
                            report(&done, &last);
                            let wait = if done.refused.is_empty() {
                                RESYNC
                            } else {
                                RETRY
                            };
                            last = done;
                            wait
                        }
                        Err(error) => {
                            tracing::warn!(error = %chain(&error), "mirroring Kubernetes into the store failed; retrying");
                            RETRY
                        }
                    }
                }
            };
            tokio::select! {
                () = changed.notified() => tokio::time::sleep(SETTLE).await,
                () = tokio::time::sleep(wait) => {}
            }
        }
    };
    tokio::select! {
        () = stop => {}
        () = watching => tracing::warn!("the Kubernetes watches ended"),
        () = converging => {}
    }
}

/// Whether this replica mirrors: it holds, or now takes, the role; one
/// replica at a time does (two would undo each other's writes while
/// their caches differ).
async fn lead(store: &Store, leadership: &mut Option<Leadership>) -> bool {
    if let Some(held) = leadership {
        if held.held().await {
            return true;
        }
        tracing::warn!("lost the Kubernetes mirror's lease with the database");
        *leadership = None;
    }
    match store.try_lead(MIRROR_ROLE).await {
        Ok(Some(taken)) => {
            tracing::info!("this replica mirrors Kubernetes into the store");
            *leadership = Some(taken);
            true
        }
        Ok(None) => false,
        Err(error) => {
            tracing::warn!(error = %chain(&error), "asking the database who mirrors Kubernetes");
            false
        }
    }
}

/// Logs what this convergence did, and each left-out or refused object
/// once, not at every pass.
fn report(done: &Converged, last: &Converged) {
    if done.written + done.deleted > 0 {
        tracing::info!(
            written = done.written,
            deleted = done.deleted,
            "mirrored Kubernetes changes into the store"
        );
    }
    for skipped in done.skipped.iter().filter(|s| !last.skipped.contains(s)) {
        tracing::warn!(
            object = skipped.object,
            reason = skipped.reason,
            "not mirrored; what the store holds for it is kept"
        );
    }
    for (resource, why) in done.refused.iter().filter(|r| !last.refused.contains(r)) {
        tracing::warn!(%resource, %why, "the store refused a mirrored change; retrying");
    }
}

/// Whether `resource` was written by the mirror.
fn managed(resource: &Resource) -> bool {
    resource
        .metadata()
        .labels
        .get(MANAGED_BY.0)
        .map(String::as_str)
        == Some(MANAGED_BY.1)
}

/// `resource` as compared: without its stored revision.
fn comparable(resource: &Resource) -> Resource {
    let mut resource = resource.clone();
    resource.metadata_mut().resource_version = None;
    resource
}

/// Converges the store on `desired`: first deletes what the mirror wrote
/// and no longer wants (policies first, namespaces last; not what `keep`
/// names, objects that did not convert this time), so an address or pod
/// freed by a deleted resource can be taken by a new one; then writes what
/// differs in one transaction, or should the store refuse it, one resource
/// at a time, so one refused resource does not hold up the others.
pub async fn converge(
    store: &Store,
    desired: Vec<Resource>,
    keep: &BTreeSet<String>,
) -> Result<Converged, StoreError> {
    let mut stored: BTreeMap<String, Resource> = BTreeMap::new();
    for kind in Kind::ALL {
        for resource in store.list(kind, None).await? {
            stored.insert(resource.reference(), comparable(&resource));
        }
    }
    let wanted: BTreeSet<String> = desired.iter().map(Resource::reference).collect();
    let mut done = Converged::default();
    let mut gone: Vec<&Resource> = stored
        .values()
        .filter(|r| {
            let reference = r.reference();
            managed(r) && !wanted.contains(&reference) && !keep.contains(&reference)
        })
        .collect();
    // Kind::ALL lists namespaces first: delete in the reverse order.
    gone.sort_by_key(|r| std::cmp::Reverse(Kind::ALL.iter().position(|k| *k == r.kind())));
    for resource in gone {
        match store
            .delete(resource.kind(), resource.namespace(), resource.name())
            .await
        {
            Ok(_) => done.deleted += 1,
            Err(StoreError::NotFound(_)) => {}
            Err(error) if error.is_unavailable() => return Err(error),
            Err(error) => done.refused.push((resource.reference(), chain(&error))),
        }
    }
    let changed: Vec<Resource> = desired
        .into_iter()
        .filter(|r| stored.get(&r.reference()) != Some(r))
        .collect();
    if changed.is_empty() {
        return Ok(done);
    }
    match store.apply(&changed).await {
        Ok(_) => done.written = changed.len(),
        Err(error) if error.is_unavailable() => return Err(error),
        Err(_) => {
            for resource in &changed {
                match store.apply(std::slice::from_ref(resource)).await {
                    Ok(_) => done.written += 1,
                    Err(error) if error.is_unavailable() => return Err(error),
                    Err(error) => done.refused.push((resource.reference(), chain(&error))),
                }
            }
        }
    }
    Ok(done)
}

/// The client for the cluster mesh-control runs in (its service account),
/// or the kubeconfig's.
pub async fn client() -> anyhow::Result<Client> {
    Ok(Client::try_default().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_custom_kinds_have_the_crds_plurals() {
        let plurals: Vec<String> = CUSTOM_KINDS.iter().map(|k| k.plural()).collect();
        assert_eq!(
            plurals,
            ["servicepolicies", "trafficsplits", "authorizationpolicies"]
        );
    }
}
