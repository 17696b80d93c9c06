//! A certificate manager for every workload that runs on this node: those
//! the pushed configuration lists (the control plane sends a node exactly
//! its own workloads) and those named on the command line. Workloads that
//! leave the configuration lose their manager; their keys go with it.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use mesh_model::{
    Resource,
    config::{ConfigResource, NodeConfig},
};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    admin::{Holder, SharedTracked, Tracked},
    control::ControlPlane,
    identity::{CertManager, Clock, RotationConfig},
};

/// Runs until dropped.
#[derive(Debug)]
pub struct Workloads {
    task: JoinHandle<()>,
}

impl Drop for Workloads {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The workloads (`namespace/name`) a configuration lists.
pub fn listed(config: &NodeConfig) -> BTreeSet<(String, String)> {
    config
        .resources
        .values()
        .filter_map(|(_, resource)| match resource.as_ref() {
            ConfigResource::Object(Resource::Workload(object)) => {
                Some((object.namespace().to_owned(), object.name().to_owned()))
            }
            _ => None,
        })
        .collect()
}

impl Workloads {
    /// Follows `config`, keeping `fixed` workloads regardless.
    pub fn follow(
        control: ControlPlane,
        mut config: watch::Receiver<Arc<NodeConfig>>,
        fixed: BTreeSet<(String, String)>,
        tracked: SharedTracked,
        rotation: RotationConfig,
        clock: Clock,
    ) -> Self {
        let task = tokio::spawn(async move {
            let mut managers: BTreeMap<(String, String), CertManager> = BTreeMap::new();
            loop {
                let mut wanted = listed(&config.borrow_and_update());
                wanted.extend(fixed.iter().cloned());
                managers.retain(|workload, _| {
                    let keep = wanted.contains(workload);
                    if !keep {
                        tracing::info!(workload = %format!("{}/{}", workload.0, workload.1), "workload left the node; dropping its certificate");
                    }
                    keep
                });
                for (namespace, name) in &wanted {
                    managers
                        .entry((namespace.clone(), name.clone()))
                        .or_insert_with(|| {
                            control.start_workload_identity(namespace, name, rotation, clock)
                        });
                }
                {
                    let mut tracked = tracked.write().unwrap_or_else(|e| e.into_inner());
                    tracked.retain(|t| t.holder == Holder::Node);
                    tracked.extend(managers.iter().map(|((namespace, name), manager)| Tracked {
                        holder: Holder::Workload,
                        name: format!("{namespace}/{name}"),
                        state: manager.subscribe(),
                    }));
                }
                if config.changed().await.is_err() {
                    return;
                }
            }
        });
        Self { task }
    }
}
