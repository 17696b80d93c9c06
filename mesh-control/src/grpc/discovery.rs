//! The Discovery service: one stream per node, delta pushes with ACK/NACK.
//!
//! A session keeps what the node has acknowledged (name -> version). When
//! the store's revision moves it recomputes the node's snapshot, sends the
//! difference, and waits for the answer before sending again: an ACK makes
//! the sent state the node's; a NACK leaves the node on its last good
//! state, is recorded with its reason, and the next change is diffed
//! against that state again. Every replica watches the same store, so a
//! change written through one replica reaches nodes on all of them.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use mesh_api::v1::{DeltaRequest, DeltaResponse, Resource as PushedResource, discovery_server};
use mesh_identity::components;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::tls::Peer;
use crate::{
    snapshot::{ServiceRef, delta, node_snapshot},
    store::{NodeConfigStatus, Store},
};

/// How often the store's revision is read. Several replicas on one
/// PostgreSQL learn of each other's writes this way.
pub const DEFAULT_POLL: Duration = Duration::from_millis(100);

/// Follows the store's revision.
pub fn watch_revision(store: Store, every: Duration) -> watch::Receiver<i64> {
    let (tx, rx) = watch::channel(0);
    tokio::spawn(async move {
        loop {
            match store.revision().await {
                Ok(revision) => {
                    tx.send_if_modified(|current| {
                        let moved = *current != revision;
                        *current = revision;
                        moved
                    });
                }
                Err(error) => tracing::warn!(%error, "reading the store's revision"),
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    rx
}

/// The service's state.
#[derive(Clone, Debug)]
pub struct DiscoveryService {
    store: Store,
    revisions: watch::Receiver<i64>,
    /// This replica's name in `NodeConfigStatus`.
    replica: String,
    /// Turns true when the server shuts down: streams end so the graceful
    /// shutdown does not wait on them forever.
    stopping: watch::Receiver<bool>,
}

impl DiscoveryService {
    pub fn new(
        store: Store,
        revisions: watch::Receiver<i64>,
        replica: String,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            revisions,
            replica,
            stopping,
        }
    }

    pub fn into_server(self) -> discovery_server::DiscoveryServer<Self> {
        discovery_server::DiscoveryServer::new(self)
    }
}

fn parse_service(name: &str) -> Option<ServiceRef> {
    let (namespace, service) = name.split_once('/')?;
    (mesh_model::names::check_dns_label(namespace).is_ok()
        && mesh_model::names::check_dns_label(service).is_ok())
    .then(|| (namespace.to_owned(), service.to_owned()))
}

#[tonic::async_trait]
impl discovery_server::Discovery for DiscoveryService {
    type DeltaStream = ReceiverStream<Result<DeltaResponse, Status>>;

    async fn delta(
        &self,
        request: Request<Streaming<DeltaRequest>>,
    ) -> Result<Response<Self::DeltaStream>, Status> {
        let now = OffsetDateTime::now_utc();
        let peer = request.extensions().get::<Peer>().cloned();
        let Some(peer) = peer.filter(|p| p.identity_at(now).is_some()) else {
            return Err(Status::unauthenticated(
                "configuration is served only to nodes presenting a valid node certificate",
            ));
        };
        let identity = peer.identity_at(now).cloned().expect("checked above");
        let Some(node) = components::node_name(&identity).map(str::to_owned) else {
            return Err(Status::permission_denied(format!(
                "{identity} is not a node"
            )));
        };
        let (tx, rx) = mpsc::channel(4);
        let session = Session {
            status: NodeConfigStatus {
                node: node.clone(),
                replica: self.replica.clone(),
                connected: true,
                synced_revision: None,
                nack_revision: None,
                nack_reason: None,
                last_seen: String::new(),
            },
            node,
            remote: peer.remote.to_string(),
            expires: peer.not_after.unwrap_or(now),
            store: self.store.clone(),
            revisions: self.revisions.clone(),
            stopping: self.stopping.clone(),
        };
        tokio::spawn(session.run(request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Session {
    node: String,
    remote: String,
    /// The node certificate's expiry: the stream ends there and the node
    /// reconnects with its renewed certificate.
    expires: OffsetDateTime,
    store: Store,
    revisions: watch::Receiver<i64>,
    /// What is recorded of the node, written on every change.
    status: NodeConfigStatus,
    stopping: watch::Receiver<bool>,
}

/// A response waiting for its ACK or NACK.
struct Pending {
    nonce: String,
    revision: i64,
    versions: BTreeMap<String, String>,
}

impl Session {
    async fn run(
        mut self,
        mut inbound: Streaming<DeltaRequest>,
        tx: mpsc::Sender<Result<DeltaResponse, Status>>,
    ) {
        tracing::info!(
            node = self.node,
            remote = self.remote,
            "node connected for configuration"
        );
        self.record(|_| {}).await;
        if let Err(status) = self.serve(&mut inbound, &tx).await {
            let _ = tx.send(Err(status)).await;
        }
        self.record(|s| s.connected = false).await;
        tracing::info!(node = self.node, "configuration stream ended");
    }

    /// Updates and writes the node's recorded state. A failed write is
    /// logged, not fatal: the stream matters more than the report.
    async fn record(&mut self, change: impl FnOnce(&mut NodeConfigStatus)) {
        change(&mut self.status);
        self.status.last_seen = crate::store::now_rfc3339();
        if let Err(error) = self.store.record_node_status(&self.status).await {
            tracing::warn!(%error, node = self.node, "recording the node's configuration state");
        }
    }

    async fn serve(
        &mut self,
        inbound: &mut Streaming<DeltaRequest>,
        tx: &mpsc::Sender<Result<DeltaResponse, Status>>,
    ) -> Result<(), Status> {
        let Some(first) = inbound.message().await? else {
            return Ok(());
        };
        let mut held: BTreeMap<String, String> =
            first.initial_resource_versions.into_iter().collect();
        let mut subscribed = BTreeSet::new();
        self.subscribe(&mut subscribed, &first.subscribe, &first.unsubscribe)?;
        let mut pending: Option<Pending> = None;
        // The first response is always sent, even if empty: it tells the
        // node which revision it is in sync with.
        let mut send = true;
        let mut sent = 0u64;
        let left = (self.expires - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        let expiry = tokio::time::sleep(left.unsigned_abs());
        tokio::pin!(expiry);
        let mut stopping = self.stopping.clone();
        loop {
            if send && pending.is_none() {
                send = false;
                // The watcher only says something moved; the revision
                // comes from the store, read before the snapshot so the
                // snapshot is at least that new.
                self.revisions.mark_unchanged();
                let store_failed = |error: crate::store::StoreError| {
                    tracing::error!(%error, node = self.node, "computing a snapshot");
                    Status::unavailable("the control plane's store failed; reconnect later")
                };
                let revision = self.store.revision().await.map_err(store_failed)?;
                let snapshot = node_snapshot(&self.store, &self.node, &subscribed)
                    .await
                    .map_err(store_failed)?;
                let (changed, removed) = delta(&held, &snapshot);
                if sent > 0 && changed.is_empty() && removed.is_empty() {
                    // Nothing of this node's changed: it is in sync here too.
                    if self.status.nack_revision.is_none() {
                        self.record(|s| s.synced_revision = Some(revision)).await;
                    }
                } else {
                    sent += 1;
                    let nonce = format!("{revision}-{sent}");
                    let response = DeltaResponse {
                        revision,
                        nonce: nonce.clone(),
                        resources: changed
                            .into_iter()
                            .map(|(name, pushed)| PushedResource {
                                name,
                                version: pushed.version,
                                body: pushed.body,
                            })
                            .collect(),
                        removed_resources: removed,
                    };
                    tracing::debug!(
                        node = self.node,
                        revision,
                        nonce,
                        changed = response.resources.len(),
                        removed = response.removed_resources.len(),
                        "pushing"
                    );
                    if tx.send(Ok(response)).await.is_err() {
                        return Ok(());
                    }
                    pending = Some(Pending {
                        nonce,
                        revision,
                        versions: snapshot
                            .into_iter()
                            .map(|(name, pushed)| (name, pushed.version))
                            .collect(),
                    });
                }
            }
            tokio::select! {
                message = inbound.message() => {
                    let Some(request) = message? else { return Ok(()) };
                    if !request.subscribe.is_empty() || !request.unsubscribe.is_empty() {
                        self.subscribe(&mut subscribed, &request.subscribe, &request.unsubscribe)?;
                        send = true;
                    }
                    let answered = pending
                        .as_ref()
                        .is_some_and(|p| !request.response_nonce.is_empty() && p.nonce == request.response_nonce);
                    if answered {
                        let done = pending.take().expect("checked above");
                        if request.error_detail.is_empty() {
                            held = done.versions;
                            self.record(|s| {
                                s.synced_revision = Some(done.revision);
                                s.nack_revision = None;
                                s.nack_reason = None;
                            })
                            .await;
                        } else {
                            tracing::warn!(node = self.node, revision = done.revision, reason = request.error_detail, "node rejected a push");
                            self.record(|s| {
                                s.nack_revision = Some(done.revision);
                                s.nack_reason = Some(request.error_detail.clone());
                            })
                            .await;
                        }
                        // Changes that arrived while waiting go out now.
                        if *self.revisions.borrow() != done.revision {
                            send = true;
                        }
                    }
                }
                changed = self.revisions.changed(), if pending.is_none() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("the control plane is shutting down"));
                    }
                    send = true;
                }
                () = async { let _ = stopping.wait_for(|stop| *stop).await; } => {
                    return Err(Status::unavailable("the control plane is shutting down; reconnect"));
                }
                () = &mut expiry => {
                    return Err(Status::unauthenticated(
                        "the node certificate this stream was opened with has expired; reconnect",
                    ));
                }
            }
        }
    }

    fn subscribe(
        &self,
        subscribed: &mut BTreeSet<ServiceRef>,
        add: &[String],
        remove: &[String],
    ) -> Result<(), Status> {
        for name in add {
            let service = parse_service(name).ok_or_else(|| {
                Status::invalid_argument(format!("subscribe: {name:?} is not namespace/name"))
            })?;
            subscribed.insert(service);
        }
        for name in remove {
            if let Some(service) = parse_service(name) {
                subscribed.remove(&service);
            }
        }
        Ok(())
    }
}
