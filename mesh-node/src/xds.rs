//! The node's configuration, pushed by the control plane.
//!
//! One task is the single writer of the node's [`NodeConfig`]: it holds a
//! stream to the control plane, validates every pushed response whole
//! (each body as the API would validate it), swaps the new configuration
//! in atomically through a watch channel and ACKs — or NACKs with the
//! reasons and keeps the last good configuration. When the stream breaks
//! it reconnects with capped, jittered backoff and resumes from the
//! versions it holds, so a reconnect after missed changes converges to the
//! same state as a fresh start. Meanwhile the data path keeps reading the
//! last good configuration: losing the control plane changes nothing.
//!
//! Services of namespaces the node runs no workload in come on demand: the
//! data path asks for one the first time a pod connects to it, and the
//! subscription is kept for the life of the process (and every reconnect).

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_api::v1::{
    DeltaRequest, DeltaResponse, EndpointHealth, RequestStats, Resource as PushedResource,
    discovery_client::DiscoveryClient,
};
use mesh_model::config::{ConfigResource, NodeConfig, parse_resource};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    control::{ControlPlane, NODE_CERTIFICATE_WAIT},
    identity::CertState,
};

/// How the stream is doing.
#[derive(Clone, Debug, Default, Serialize)]
pub struct XdsStatus {
    pub connected: bool,
    /// Responses applied, and rejected.
    pub acks: u64,
    pub nacks: u64,
    /// Why the last response was rejected.
    pub last_nack: Option<String>,
    /// Why the stream last failed.
    pub last_error: Option<String>,
    pub reconnects: u64,
}

/// Health reports waiting to be sent.
const HEALTH_QUEUE: usize = 256;
/// Request statistics reports waiting to be sent.
const STATS_QUEUE: usize = 2;

/// Reconnect delays: 100 ms doubling to 15 s, jittered.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// The running client.
#[derive(Debug)]
pub struct Xds {
    config: watch::Receiver<Arc<NodeConfig>>,
    status: watch::Receiver<XdsStatus>,
    health: mpsc::Sender<EndpointHealth>,
    stats: mpsc::Sender<Vec<RequestStats>>,
    demand: Demand,
    task: tokio::task::JoinHandle<()>,
}

/// What the node tells the control plane beside its answers to pushes.
struct Reports {
    health: mpsc::Receiver<EndpointHealth>,
    stats: mpsc::Receiver<Vec<RequestStats>>,
}

/// Asks the control plane for services beyond the node's namespaces.
#[derive(Clone, Debug)]
pub struct Demand {
    /// Every service asked for, `namespace/name`: each stream starts by
    /// subscribing to all of them.
    wanted: Arc<Mutex<BTreeSet<String>>>,
    /// Those to ask for on the stream open now.
    new: mpsc::UnboundedSender<String>,
}

impl Demand {
    /// Subscribes to the service `namespace`/`name` (once; asking again is
    /// free).
    pub fn want(&self, namespace: &str, name: &str) {
        let service = format!("{namespace}/{name}");
        let added = self
            .wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(service.clone());
        if added {
            // Gone only with the stream's task; nothing left to ask.
            let _ = self.new.send(service);
        }
    }

    fn all(&self) -> Vec<String> {
        self.wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

impl Drop for Xds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Xds {
    /// Starts following the configuration for this node; `subscribe`
    /// names services (`namespace/name`) wanted beyond its namespaces.
    pub fn start(control: ControlPlane, subscribe: Vec<String>) -> Self {
        Self::resume(control, subscribe, Arc::new(NodeConfig::default()))
    }

    /// Starts from a configuration held already (the stream resumes from
    /// its versions).
    pub fn resume(control: ControlPlane, subscribe: Vec<String>, held: Arc<NodeConfig>) -> Self {
        let (config_tx, config) = watch::channel(held);
        let (status_tx, status) = watch::channel(XdsStatus::default());
        let (health, health_reports) = mpsc::channel(HEALTH_QUEUE);
        let (stats, stats_reports) = mpsc::channel(STATS_QUEUE);
        let (new, asked) = mpsc::unbounded_channel();
        let demand = Demand {
            wanted: Arc::new(Mutex::new(subscribe.into_iter().collect())),
            new,
        };
        let task = tokio::spawn(run(
            control,
            Subscriptions {
                demand: demand.clone(),
                asked,
            },
            config_tx,
            status_tx,
            Reports {
                health: health_reports,
                stats: stats_reports,
            },
        ));
        Self {
            config,
            status,
            health,
            stats,
            demand,
            task,
        }
    }

    /// Where the data path asks for services it needs.
    pub fn demand(&self) -> Demand {
        self.demand.clone()
    }

    /// Where the node's own observations of its endpoints' health go; sent
    /// to the control plane with the stream (dropped while it is down: the
    /// observer repeats what still differs from the pushed configuration).
    pub fn health_reports(&self) -> mpsc::Sender<EndpointHealth> {
        self.health.clone()
    }

    /// Where the node's request statistics go (see [`crate::stats`]).
    pub fn stats_reports(&self) -> mpsc::Sender<Vec<RequestStats>> {
        self.stats.clone()
    }

    /// The configuration the data path reads.
    pub fn config(&self) -> watch::Receiver<Arc<NodeConfig>> {
        self.config.clone()
    }

    pub fn status(&self) -> watch::Receiver<XdsStatus> {
        self.status.clone()
    }
}

/// Sends `request` on the stream being opened or served.
async fn send(requests: &mpsc::Sender<DeltaRequest>, request: DeltaRequest) -> Result<(), String> {
    requests
        .send(request)
        .await
        .map_err(|_| "the request stream closed".to_owned())
}

fn jitter(delay: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = getrandom::getrandom(&mut byte);
    // 50 % to 100 % of the delay.
    delay.mul_f64(0.5 + f64::from(byte[0]) / 510.0)
}

/// The stream task's side of [`Demand`].
struct Subscriptions {
    demand: Demand,
    asked: mpsc::UnboundedReceiver<String>,
}

async fn run(
    control: ControlPlane,
    mut subscriptions: Subscriptions,
    config: watch::Sender<Arc<NodeConfig>>,
    status: watch::Sender<XdsStatus>,
    mut reports: Reports,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let result = session(&control, &mut subscriptions, &config, &status, &mut reports).await;
        let error = match result {
            Ok(Ended::Renewed) => {
                tracing::info!(
                    "node certificate renewed; reopening the configuration stream with it"
                );
                backoff = MIN_BACKOFF;
                continue;
            }
            Ok(Ended::Closed) => "the control plane closed the stream".to_owned(),
            Err(error) => error,
        };
        // A session that got as far as an ACK resets the backoff.
        if status.borrow().connected {
            backoff = MIN_BACKOFF;
        }
        status.send_modify(|s| {
            s.connected = false;
            s.last_error = Some(error.clone());
            s.reconnects += 1;
        });
        let delay = jitter(backoff);
        tracing::warn!(%error, retry_in = ?delay, "configuration stream lost; serving the last good configuration");
        tokio::time::sleep(delay).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How a session ended without an error.
enum Ended {
    /// The control plane closed the stream.
    Closed,
    /// The node certificate the stream was opened with was renewed: the
    /// control plane would cut the stream when that certificate expires,
    /// so the node reopens it with the new one first.
    Renewed,
}

/// Resolves once the node certificate's serial is no longer `serial`.
async fn renewed(state: Option<watch::Receiver<CertState>>, serial: Option<String>) {
    let Some(mut state) = state else {
        return std::future::pending().await;
    };
    let current = |s: &CertState| s.current.as_ref().map(|c| c.serial.clone());
    // The manager lives as long as the node; if it is gone, so is renewal.
    if state.wait_for(|s| current(s) != serial).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn session(
    control: &ControlPlane,
    subscriptions: &mut Subscriptions,
    config: &watch::Sender<Arc<NodeConfig>>,
    status: &watch::Sender<XdsStatus>,
    reports: &mut Reports,
) -> Result<Ended, String> {
    let Reports { health, stats } = reports;
    control.node_certificate(NODE_CERTIFICATE_WAIT).await?;
    let node_state = control.node_certificate_state();
    let opened_with = node_state
        .as_ref()
        .and_then(|s| s.borrow().current.as_ref().map(|c| c.serial.clone()));
    let renewal = renewed(node_state, opened_with);
    tokio::pin!(renewal);
    let mut client = DiscoveryClient::new(control.channel()?);
    let (requests, outbound) = mpsc::channel(4);
    let held = config.borrow().versions();
    // Asked for before now: in the set the first request carries.
    while subscriptions.asked.try_recv().is_ok() {}
    send(
        &requests,
        DeltaRequest {
            initial_resource_versions: held.into_iter().collect(),
            subscribe: subscriptions.demand.all(),
            admin_address: control
                .admin_address()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            ..DeltaRequest::default()
        },
    )
    .await?;
    let mut inbound = client
        .delta(ReceiverStream::new(outbound))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    // Reports queued while the stream was down are stale: the observer
    // repeats what still differs.
    while health.try_recv().is_ok() {}
    let mut parts: Vec<DeltaResponse> = Vec::new();
    loop {
        let response = tokio::select! {
            // Reports first: one queued before a push goes out before its
            // ACK.
            biased;
            Some(report) = health.recv() => {
                let mut endpoint_health = vec![report];
                while let Ok(more) = health.try_recv() {
                    endpoint_health.push(more);
                }
                let request = DeltaRequest {
                    endpoint_health,
                    ..DeltaRequest::default()
                };
                send(&requests, request).await?;
                continue;
            }
            Some(request_stats) = stats.recv() => {
                let request = DeltaRequest {
                    request_stats,
                    ..DeltaRequest::default()
                };
                send(&requests, request).await?;
                continue;
            }
            Some(service) = subscriptions.asked.recv() => {
                let mut subscribe = vec![service];
                while let Ok(more) = subscriptions.asked.try_recv() {
                    subscribe.push(more);
                }
                tracing::debug!(?subscribe, "asking for services on demand");
                let request = DeltaRequest {
                    subscribe,
                    ..DeltaRequest::default()
                };
                send(&requests, request).await?;
                continue;
            }
            () = &mut renewal => return Ok(Ended::Renewed),
            response = inbound.message() => response,
        };
        let response = response.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        let Some(mut response) = response else {
            return Ok(Ended::Closed);
        };
        // A push in parts is applied whole, once its last part is here.
        if let Some(first) = parts.first()
            && first.nonce != response.nonce
        {
            return Err("the control plane mixed the parts of two pushes".to_owned());
        }
        if response.more {
            parts.push(response);
            continue;
        }
        if !parts.is_empty() {
            let mut whole: Vec<PushedResource> = Vec::new();
            for part in parts.drain(..) {
                whole.extend(part.resources);
            }
            whole.append(&mut response.resources);
            response.resources = whole;
        }
        let nonce = response.nonce.clone();
        let revision = response.revision;
        // The borrow ends here: swapping in below needs the write lock.
        let validated = validate(&config.borrow(), response);
        if !status.borrow().connected {
            // Answered again: certificate renewals that failed meanwhile
            // need not wait out their backoff.
            control.reachable_again();
        }
        let answer = match validated {
            Ok(next) => {
                config.send_replace(Arc::new(next));
                status.send_modify(|s| {
                    s.connected = true;
                    s.acks += 1;
                    s.last_error = None;
                });
                tracing::debug!(revision, "configuration applied");
                DeltaRequest {
                    response_nonce: nonce,
                    ..DeltaRequest::default()
                }
            }
            Err(reason) => {
                tracing::warn!(revision, %reason, "rejected a configuration push; keeping the last good one");
                status.send_modify(|s| {
                    s.connected = true;
                    s.nacks += 1;
                    s.last_nack = Some(reason.clone());
                });
                DeltaRequest {
                    response_nonce: nonce,
                    error_detail: reason,
                    ..DeltaRequest::default()
                }
            }
        };
        send(&requests, answer).await?;
    }
}

/// The configuration after `response`, if every resource in it is valid
/// (public for the fuzz target that feeds it decoded bytes).
pub fn validate(current: &NodeConfig, response: DeltaResponse) -> Result<NodeConfig, String> {
    let mut changed: Vec<(String, String, ConfigResource)> = Vec::new();
    let mut problems = Vec::new();
    for resource in response.resources {
        match parse_resource(&resource.name, &resource.body) {
            Ok(parsed) => changed.push((resource.name, resource.version, parsed)),
            Err(why) => problems.push(why),
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(current.updated(response.revision, changed, &response.removed_resources))
}
