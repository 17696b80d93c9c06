//! Readiness of this node's workloads, observed here and reported to the
//! control plane, which marks their endpoints for every caller's node.
//!
//! Every interval, each endpoint this node was pushed whose workload runs
//! here is probed with a TCP connect made inside the pod's network
//! namespace from the pod's own address — the pod calling itself, which
//! capture leaves alone. An endpoint that answers differently from how it
//! is marked is reported: down after [`FAILURES`] failed probes in a row
//! (one slow accept is not an outage), up after one success. Reports go
//! out over the configuration stream; a report lost with the stream is
//! simply made again on the next round, since the marking still differs.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    sync::Arc,
    time::Duration,
};

use mesh_api::v1::EndpointHealth;
use mesh_model::{
    Resource,
    config::{ConfigResource, NodeConfig},
};
use socket2::SockAddr;
use tokio::{net::TcpSocket, sync::mpsc, sync::watch};

use crate::{capture::netns::in_netns, pods::PodNetns, proxy::marked_socket};

/// Failed probes in a row before an endpoint counts as down.
pub const FAILURES: u32 = 2;
/// How long a probe waits for the connect.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// An endpoint of a workload on this node, as pushed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Probe {
    namespace: String,
    service: String,
    workload: String,
    pod_uid: Option<String>,
    address: SocketAddr,
    marked_ready: bool,
}

/// The endpoints to probe: those of services this node was pushed whose
/// address belongs to one of its own workloads.
fn probes(config: &NodeConfig) -> Vec<Probe> {
    let mut local: HashMap<(String, IpAddr), (String, Option<String>)> = HashMap::new();
    for (_, resource) in config.resources.values() {
        if let ConfigResource::Object(Resource::Workload(w)) = &**resource {
            local.insert(
                (w.namespace().to_owned(), w.spec.ip),
                (w.name().to_owned(), w.spec.pod_uid.clone()),
            );
        }
    }
    let mut probes = Vec::new();
    for (_, resource) in config.resources.values() {
        let ConfigResource::Endpoints(set) = &**resource else {
            continue;
        };
        for endpoint in &set.endpoints {
            if let Some((workload, pod_uid)) = local.get(&(set.namespace.clone(), endpoint.ip)) {
                probes.push(Probe {
                    namespace: set.namespace.clone(),
                    service: set.service.clone(),
                    workload: workload.clone(),
                    pod_uid: pod_uid.clone(),
                    address: SocketAddr::new(endpoint.ip, endpoint.port),
                    marked_ready: endpoint.ready,
                });
            }
        }
    }
    probes
}

/// Sockets made in the pod's namespace, bound to the pod's address, one
/// per probe.
fn sockets(netns: &std::path::Path, addresses: Vec<SocketAddr>) -> io::Result<Vec<OwnedFd>> {
    in_netns(netns, move || {
        addresses
            .iter()
            .map(|address| {
                let socket = marked_socket(*address)?;
                socket.bind(&SockAddr::from(SocketAddr::new(address.ip(), 0)))?;
                Ok(OwnedFd::from(socket))
            })
            .collect()
    })
}

async fn connects(socket: OwnedFd, to: SocketAddr) -> bool {
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, socket.connect(to)).await,
        Ok(Ok(_))
    )
}

/// Probes every endpoint of one pod; whether each answered.
async fn probe_pod(netns: std::path::PathBuf, probes: Vec<Probe>) -> Vec<(Probe, bool)> {
    let addresses: Vec<SocketAddr> = probes.iter().map(|p| p.address).collect();
    let made = tokio::task::spawn_blocking(move || sockets(&netns, addresses)).await;
    let sockets = match made {
        Ok(Ok(sockets)) => sockets,
        // No namespace (the pod is gone) or no sockets: nothing answers.
        Ok(Err(error)) => {
            tracing::debug!(%error, "probing a pod's endpoints");
            return probes.into_iter().map(|p| (p, false)).collect();
        }
        Err(_) => return probes.into_iter().map(|p| (p, false)).collect(),
    };
    let mut answers = Vec::with_capacity(probes.len());
    let mut pending = tokio::task::JoinSet::new();
    for (probe, socket) in probes.into_iter().zip(sockets) {
        let to = probe.address;
        pending.spawn(async move { (probe, connects(socket, to).await) });
    }
    while let Some(answer) = pending.join_next().await {
        if let Ok(answer) = answer {
            answers.push(answer);
        }
    }
    answers
}

/// What a probe says of an endpoint marked `marked_ready`, after `streak`
/// failed probes in a row: failures only delay marking it down — they
/// never mark it up.
fn observed(answered: bool, streak: u32, marked_ready: bool) -> bool {
    answered || (marked_ready && streak < FAILURES)
}

/// Observes until `config` closes, one round every `every`.
pub async fn observe(
    mut config: watch::Receiver<Arc<NodeConfig>>,
    netns: PodNetns,
    every: Duration,
    reports: mpsc::Sender<EndpointHealth>,
) {
    let mut failures: HashMap<(String, String, SocketAddr), u32> = HashMap::new();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if config.has_changed().is_err() {
            return;
        }
        let current = config.borrow_and_update().clone();
        let mut by_pod: BTreeMap<(String, String, Option<String>), Vec<Probe>> = BTreeMap::new();
        for probe in probes(&current) {
            by_pod
                .entry((
                    probe.namespace.clone(),
                    probe.workload.clone(),
                    probe.pod_uid.clone(),
                ))
                .or_default()
                .push(probe);
        }
        let mut rounds = tokio::task::JoinSet::new();
        for ((namespace, workload, pod_uid), probes) in by_pod {
            // A pod whose namespace is not found answers nothing.
            let path = netns
                .locate(&namespace, &workload, pod_uid.as_deref())
                .unwrap_or_default();
            rounds.spawn(probe_pod(path, probes));
        }
        let mut seen = std::collections::HashSet::new();
        while let Some(answers) = rounds.join_next().await {
            for (probe, answered) in answers.unwrap_or_default() {
                let key = (
                    probe.namespace.clone(),
                    probe.service.clone(),
                    probe.address,
                );
                let streak = failures.entry(key.clone()).or_default();
                *streak = if answered {
                    0
                } else {
                    streak.saturating_add(1)
                };
                let observed_healthy = observed(answered, *streak, probe.marked_ready);
                seen.insert(key);
                if observed_healthy == probe.marked_ready {
                    continue;
                }
                tracing::info!(
                    namespace = probe.namespace,
                    service = probe.service,
                    workload = probe.workload,
                    address = %probe.address,
                    healthy = observed_healthy,
                    "endpoint readiness changed; reporting it"
                );
                let _ = reports.try_send(EndpointHealth {
                    namespace: probe.namespace,
                    service: probe.service,
                    ip: probe.address.ip().to_string(),
                    port: u32::from(probe.address.port()),
                    healthy: observed_healthy,
                });
            }
        }
        // Forget endpoints no longer pushed.
        failures.retain(|key, _| seen.contains(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_model::config::parse_resource;

    fn config(documents: &[(&str, &str)]) -> NodeConfig {
        let changed = documents
            .iter()
            .map(|(name, body)| {
                let parsed = parse_resource(name, body.as_bytes()).unwrap();
                ((*name).to_owned(), "1".to_owned(), parsed)
            })
            .collect();
        NodeConfig::default().updated(1, changed, &[])
    }

    #[test]
    fn failures_mark_down_after_a_streak_and_never_mark_up() {
        // Marked ready: one failure is tolerated, two are not.
        assert!(observed(false, 1, true));
        assert!(!observed(false, FAILURES, true));
        // Marked down: a failure keeps it down, however short the streak
        // (a node that just started, or a workload that moved here).
        assert!(!observed(false, 1, false));
        // An answer is ready whatever the marking.
        assert!(observed(true, 0, false));
        assert!(observed(true, 0, true));
    }

    #[test]
    fn only_endpoints_of_this_nodes_workloads_are_probed() {
        let config = config(&[
            (
                "workload/shop/web-1",
                r#"{"apiVersion":"mesh.io/v1","kind":"Workload","metadata":{"name":"web-1","namespace":"shop"},"spec":{"node":"n1","ip":"10.0.0.1","services":["web"]}}"#,
            ),
            (
                "endpoints/shop/web",
                r#"{"namespace":"shop","service":"web","endpoints":[
                    {"ip":"10.0.0.1","port":8080,"version":"v1","healthy":true,"workload":"web-1"},
                    {"ip":"10.0.0.2","port":8080,"version":"v1","healthy":true,"workload":"web-2"}]}"#,
            ),
        ]);
        let probes = probes(&config);
        assert_eq!(
            probes,
            [Probe {
                namespace: "shop".into(),
                service: "web".into(),
                workload: "web-1".into(),
                pod_uid: None,
                address: "10.0.0.1:8080".parse().unwrap(),
                marked_ready: true,
            }]
        );
    }
}
