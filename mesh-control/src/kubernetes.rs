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
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use mesh_model::{Kind, Resource};
use tokio::sync::Notify;

use crate::store::{Store, StoreError};
use convert::{Converted, MANAGED_BY, Skipped};

/// How long changes are gathered before the store is converged, so a
/// burst (a rollout) becomes one write.
pub const SETTLE: Duration = Duration::from_millis(200);
/// How often the store is converged with no change seen: repairs what a
/// failed write or a hand edit left different.
const RESYNC: Duration = Duration::from_secs(60);
/// How soon a convergence that failed (the store down) is tried again.
const RETRY: Duration = Duration::from_secs(5);

/// The mesh's custom resource kinds, as the CRDs name them.
pub const CUSTOM_KINDS: [Kind; 3] = [
    Kind::ServicePolicy,
    Kind::TrafficSplit,
    Kind::AuthorizationPolicy,
];

/// The caches the reflectors fill.
#[derive(Clone)]
struct Caches {
    namespaces: reflector::Store<Namespace>,
    pods: reflector::Store<Pod>,
    services: reflector::Store<Service>,
    custom: Vec<(Kind, reflector::Store<DynamicObject>)>,
}

impl Caches {
    async fn ready(&self) {
        // An error means the reflector is gone, which ends the mirror too.
        let _ = self.namespaces.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
        let _ = self.services.wait_until_ready().await;
        for (_, store) in &self.custom {
            let _ = store.wait_until_ready().await;
        }
    }

    /// Everything the caches say the store should hold, in the order it
    /// can be written (namespaces first), and what was left out.
    fn desired(&self) -> (Vec<Resource>, Vec<Skipped>) {
        let namespaces = self.namespaces.state();
        let pods = self.pods.state();
        let services = self.services.state();
        let in_namespace = |namespace: &Option<String>, of: &Option<String>| namespace == of;
        let mut converted: Vec<Converted> = Vec::new();
        converted.extend(namespaces.iter().map(|ns| convert::namespace(ns)));
        for service in &services {
            let local: Vec<&Pod> = pods
                .iter()
                .map(Arc::as_ref)
                .filter(|pod| in_namespace(&pod.metadata.namespace, &service.metadata.namespace))
                .collect();
            converted.push(convert::service(service, &local));
        }
        for pod in &pods {
            let local: Vec<&Service> = services
                .iter()
                .map(Arc::as_ref)
                .filter(|service| {
                    in_namespace(&service.metadata.namespace, &pod.metadata.namespace)
                })
                .collect();
            converted.push(convert::workload(pod, &local));
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
        // A service or pod in a namespace that did not convert cannot be
        // written either; the namespace's entry says why.
        let kept: BTreeSet<String> = resources
            .iter()
            .filter(|r| r.kind() == Kind::Namespace)
            .map(|r| r.name().to_owned())
            .collect();
        resources.retain(|r| r.namespace().is_none_or(|ns| kept.contains(ns)));
        (resources, skipped)
    }
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
        tracing::info!("Kubernetes listed; mirroring into the store");
        let mut last_skipped = Vec::new();
        loop {
            let (desired, skipped) = caches.desired();
            let wait = match converge(&store, desired).await {
                Ok(mut done) => {
                    done.skipped = skipped;
                    report(&done, &last_skipped);
                    last_skipped = done.skipped;
                    RESYNC
                }
                Err(error) => {
                    tracing::warn!(error = %chain(&error), "mirroring Kubernetes into the store failed; retrying");
                    RETRY
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

fn report(done: &Converged, last_skipped: &[Skipped]) {
    if done.written + done.deleted > 0 {
        tracing::info!(
            written = done.written,
            deleted = done.deleted,
            "mirrored Kubernetes changes into the store"
        );
    }
    // Each left-out object once, not at every convergence.
    for skipped in done.skipped.iter().filter(|s| !last_skipped.contains(s)) {
        tracing::warn!(
            object = skipped.object,
            reason = skipped.reason,
            "not mirrored"
        );
    }
    for (resource, why) in &done.refused {
        tracing::warn!(%resource, %why, "the store refused a mirrored resource");
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

/// Converges the store on `desired`: writes what differs (in one
/// transaction; should the store refuse it, one resource at a time, so
/// one refused resource does not hold up the others), then deletes what
/// the mirror wrote and no longer wants, policies first and namespaces
/// last.
pub async fn converge(store: &Store, desired: Vec<Resource>) -> Result<Converged, StoreError> {
    let mut stored: BTreeMap<String, Resource> = BTreeMap::new();
    for kind in Kind::ALL {
        for resource in store.list(kind, None).await? {
            stored.insert(resource.reference(), comparable(&resource));
        }
    }
    let wanted: BTreeSet<String> = desired.iter().map(Resource::reference).collect();
    let changed: Vec<Resource> = desired
        .into_iter()
        .filter(|r| stored.get(&r.reference()) != Some(r))
        .collect();
    let mut done = Converged::default();
    if !changed.is_empty() {
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
    }
    let mut gone: Vec<&Resource> = stored
        .values()
        .filter(|r| managed(r) && !wanted.contains(&r.reference()))
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
    Ok(done)
}

/// The error and its causes on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
