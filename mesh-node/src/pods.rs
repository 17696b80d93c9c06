//! Which pods this node captures, following the pushed configuration: every
//! workload scheduled here whose namespace carries `mesh.io/capture:
//! enabled`, unless the workload itself says `mesh.io/capture: disabled`,
//! with the exclusions its spec lists. Labelling or unlabelling a namespace
//! captures or releases its running pods; nothing restarts.
//!
//! The node finds a pod's network namespace from a path template
//! (`--pod-netns /run/netns/{namespace}-{name}`), or on Kubernetes through
//! the pod's cgroup (`--pod-netns cgroup`, [`locate`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use mesh_common::capture::{Cidr, PodInbound, PodOutbound};
use mesh_model::{
    Resource,
    config::{ConfigResource, NodeConfig},
    namespace::{captured, opted_out},
    workload::CaptureExclusions,
};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    capture::ip_key,
    proxy::{PodSpec, Proxy, error_chain},
};

pub mod locate;

pub use locate::{PodNetns, PodNetnsSetting};

/// How soon pods that could not be captured are tried again (their
/// namespace may not exist yet).
const RETRY: Duration = Duration::from_secs(2);
/// How often pods found through their cgroups are looked for again.
const RELOCATE: Duration = Duration::from_secs(10);

/// Where a pod's network namespace is: a path with `{namespace}` and
/// `{name}` in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsTemplate(String);

impl NetnsTemplate {
    pub fn parse(template: &str) -> Result<Self, String> {
        if !template.contains("{name}") {
            return Err(format!(
                "{template:?} must contain {{name}} (and usually {{namespace}})"
            ));
        }
        Ok(Self(template.to_owned()))
    }

    pub fn path(&self, namespace: &str, name: &str) -> PathBuf {
        self.0
            .replace("{namespace}", namespace)
            .replace("{name}", name)
            .into()
    }
}

/// The kernel-side settings for a pod with these exclusions.
pub fn pod_spec(name: String, netns: PathBuf, exclusions: &CaptureExclusions) -> PodSpec {
    let mut outbound = PodOutbound::default();
    let mut inbound = PodInbound::default();
    // Validation caps the lists at the programs' slot counts; zip keeps to
    // the slots regardless.
    for (slot, port) in outbound
        .excluded_ports
        .iter_mut()
        .zip(&exclusions.exclude_outbound_ports)
    {
        *slot = *port;
    }
    for (slot, port) in inbound
        .excluded_ports
        .iter_mut()
        .zip(&exclusions.exclude_inbound_ports)
    {
        *slot = *port;
    }
    for (slot, (address, prefix)) in outbound
        .excluded_cidrs
        .iter_mut()
        .zip(exclusions.outbound_cidrs())
    {
        let prefix = u32::from(prefix) + if address.is_ipv4() { 96 } else { 0 };
        *slot = Cidr {
            ip: ip_key(address),
            prefix_len: prefix,
        };
    }
    PodSpec {
        name,
        netns,
        outbound,
        inbound,
    }
}

/// The pods `config` says this node captures, and those whose network
/// namespace cannot be found (yet), with why.
pub fn captured_pods(
    config: &NodeConfig,
    netns: &PodNetns,
) -> (Vec<PodSpec>, Vec<(String, String)>) {
    let objects = || {
        config
            .resources
            .values()
            .filter_map(|(_, resource)| match resource.as_ref() {
                ConfigResource::Object(object) => Some(object),
                ConfigResource::Endpoints(_) | ConfigResource::Address(_) => None,
            })
    };
    let captured_namespaces: BTreeSet<&str> = objects()
        .filter_map(|object| match object {
            Resource::Namespace(ns) if captured(&ns.metadata) => Some(ns.name()),
            _ => None,
        })
        .collect();
    let mut pods = Vec::new();
    let mut missing = Vec::new();
    for object in objects() {
        let Resource::Workload(w) = object else {
            continue;
        };
        if !captured_namespaces.contains(w.namespace()) || opted_out(&w.metadata) {
            continue;
        }
        let name = format!("{}/{}", w.namespace(), w.name());
        match netns.locate(w.namespace(), w.name(), w.spec.pod_uid.as_deref()) {
            Ok(path) => pods.push(pod_spec(name, path, &w.spec.capture)),
            Err(why) => missing.push((name, why)),
        }
    }
    (pods, missing)
}

/// Keeps the captured pods in line with the configuration until dropped.
#[derive(Debug)]
pub struct CaptureFollower {
    task: JoinHandle<()>,
    synced: watch::Receiver<Option<i64>>,
}

impl Drop for CaptureFollower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CaptureFollower {
    /// Captures `fixed` plus what `config` lists. Pods a previous run left
    /// pinned are released only once the first configuration has arrived:
    /// until then they stay captured (refused), never silently bypassed.
    pub fn follow(
        proxy: Arc<Proxy>,
        mut config: watch::Receiver<Arc<NodeConfig>>,
        fixed: Vec<PodSpec>,
        netns: Option<PodNetns>,
    ) -> Self {
        // Found through cgroups, a pod's namespace can change under the
        // same workload (its sandbox recreated): look again now and then.
        let relocate = matches!(netns, Some(PodNetns::Cgroup(_)));
        let (synced_tx, synced) = watch::channel(None);
        let task = tokio::spawn(async move {
            let mut pruned = false;
            // Each pod's problem is logged when it appears or changes, not
            // at every pass.
            let mut reported: BTreeMap<String, String> = BTreeMap::new();
            loop {
                let current = config.borrow_and_update().clone();
                let mut desired = fixed.clone();
                let mut missing = Vec::new();
                if let Some(netns) = &netns {
                    let (pods, not_found) = captured_pods(&current, netns);
                    desired.extend(pods);
                    missing = not_found;
                }
                // A captured pod whose namespace is not found this time
                // stays as it is: released, it would connect in plaintext.
                let mut problems: BTreeMap<String, String> = BTreeMap::new();
                for (pod, why) in &missing {
                    match proxy.pod_spec(pod) {
                        Some(spec) => desired.push(spec),
                        None => {
                            problems.insert(pod.clone(), why.clone());
                        }
                    }
                }
                // Draining: the pods stay exactly as they are, pinned for
                // the next run; none is captured again or released (a pass
                // would count as clean and prune what it does not own).
                if proxy.is_stopping() {
                    return;
                }
                let errors = proxy.sync(desired).await;
                if proxy.is_stopping() {
                    return;
                }
                for (pod, error) in &errors {
                    problems.insert(pod.clone(), error_chain(error));
                }
                for (pod, why) in &problems {
                    if reported.get(pod) != Some(why) {
                        tracing::warn!(%pod, %why, "pod not captured; retrying");
                    }
                }
                reported = problems;
                if errors.is_empty() {
                    // Every pod of it that is there is captured.
                    synced_tx.send_replace(Some(current.revision));
                }
                // Released only after a pass that found every pod: one not
                // found may still be a previous run's (a proxy handing
                // over), and released it would connect in plaintext.
                let clean = errors.is_empty() && missing.is_empty();
                if !pruned && clean && current.revision > 0 {
                    pruned = true;
                    let capture = proxy.capture();
                    let mut capture = capture.write().unwrap_or_else(|e| e.into_inner());
                    if let Err(error) = capture.prune_unowned() {
                        tracing::warn!(error = %error_chain(&error), "releasing pods left by a previous run");
                    }
                }
                let retry = async {
                    if !errors.is_empty() || !missing.is_empty() {
                        tokio::time::sleep(RETRY).await;
                    } else if relocate {
                        tokio::time::sleep(RELOCATE).await;
                    } else {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    changed = config.changed() => if changed.is_err() { return },
                    () = retry => {}
                }
            }
        });
        Self { task, synced }
    }

    /// The revision of the last configuration whose pods were all captured
    /// (those whose namespaces were found); `None` before the first.
    pub fn synced(&self) -> watch::Receiver<Option<i64>> {
        self.synced.clone()
    }
}

/// Whether `address` would be excluded for a pod with `spec`: the host-side
/// twin of the programs' check, for tests and the admin view.
pub fn excludes_outbound(spec: &PodSpec, address: IpAddr, port: u16) -> bool {
    use mesh_common::capture::{Connect, ConnectVerdict, connect_verdict};
    let verdict = connect_verdict(&Connect {
        pod: Some(&spec.outbound),
        tcp: true,
        proxy_mark: false,
        dst: ip_key(address),
        dst_port: port,
    });
    matches!(verdict, ConnectVerdict::Bypass(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_model::{config::NodeConfig, parse_documents};

    fn config(yaml: &str) -> NodeConfig {
        let mut config = NodeConfig {
            revision: 1,
            ..NodeConfig::default()
        };
        for (i, resource) in parse_documents(yaml).unwrap().into_iter().enumerate() {
            config.resources.insert(
                format!("r{i}"),
                ("v".into(), Arc::new(ConfigResource::Object(resource))),
            );
        }
        config
    }

    const YAML: &str = r#"
apiVersion: mesh.io/v1
kind: Namespace
metadata: {name: shop, labels: {mesh.io/capture: enabled}}
---
apiVersion: mesh.io/v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: web, namespace: shop}
spec:
  node: node0
  ip: 10.89.0.2
  capture: {exclude_outbound_ports: [5432], exclude_inbound_ports: [15020], exclude_outbound_cidrs: [169.254.0.0/16, 'fd00:99::/32']}
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: batch, namespace: shop, labels: {mesh.io/capture: disabled}}
spec: {node: node0, ip: 10.89.0.3}
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: old, namespace: legacy}
spec: {node: node0, ip: 10.89.0.4}
"#;

    #[test]
    fn labelled_namespaces_pods_are_captured_unless_they_opt_out() {
        let template = NetnsTemplate::parse("/run/netns/c-{namespace}-{name}").unwrap();
        let (pods, missing) = captured_pods(&config(YAML), &PodNetns::Template(template));
        assert_eq!(missing, []);
        let names: Vec<_> = pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["shop/web"]);
        assert_eq!(pods[0].netns, PathBuf::from("/run/netns/c-shop-web"));
        assert_eq!(pods[0].inbound.excluded_ports[0], 15020);
        let web = &pods[0];
        assert!(excludes_outbound(web, "10.0.0.1".parse().unwrap(), 5432));
        assert!(excludes_outbound(
            web,
            "169.254.169.254".parse().unwrap(),
            80
        ));
        assert!(!excludes_outbound(web, "169.255.0.1".parse().unwrap(), 80));
        assert!(excludes_outbound(web, "fd00:99::1".parse().unwrap(), 80));
        assert!(!excludes_outbound(web, "fd00:9a::1".parse().unwrap(), 80));
        assert!(!excludes_outbound(web, "10.0.0.1".parse().unwrap(), 80));
    }

    #[test]
    fn templates_need_the_pod_name() {
        assert!(NetnsTemplate::parse("/run/netns/{namespace}").is_err());
    }
}
