//! The Discovery service: one stream per node, delta pushes with ACK/NACK.
//!
//! A session keeps what the node has acknowledged (name -> version). When
//! the replica's [`SharedCatalog`] moves, it works out what of the node's
//! changed — from the names the change touched, not by recomputing the
//! node's whole selection — sends the difference, and waits for the answer
//! before sending again: an ACK makes the sent state the node's; a NACK
//! leaves the node on its last good state, is recorded with its reason,
//! and the next change is diffed against that state again. Every replica
//! follows the same store, so a change written through one replica reaches
//! nodes on all of them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use mesh_api::v1::{
    DeltaRequest, DeltaResponse, EndpointHealth, RequestStats, Resource as PushedResource,
    discovery_server,
};
use mesh_identity::components;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::tls::Peer;
use crate::{
    snapshot::{NodeView, ServiceRef, SharedCatalog, delta, delta_of_touched, parse_version},
    store::{EdgeReport, NodeConfigStatus, Store},
};

use super::status::StatusBook;

/// How often the store's revision is read. Several replicas on one
/// PostgreSQL learn of each other's writes this way; this replica's own
/// writes are seen at once.
pub const DEFAULT_POLL: Duration = Duration::from_millis(100);

/// The most edges one stats report may carry.
const MAX_STATS_PER_REPORT: usize = 10_000;

/// Names that could be the mesh's, counts that add up: errors within the
/// requests, the histogram of the expected shape holding every request.
fn stats_report_is_sound(report: &RequestStats) -> bool {
    use mesh_model::names::check_dns_label;
    let names = [
        &report.source_namespace,
        &report.source_workload,
        &report.namespace,
        &report.service,
    ];
    let histogram = report.latency_buckets.len() == mesh_model::stats::LATENCY_BOUNDS.len() + 1
        && report
            .latency_buckets
            .iter()
            .try_fold(0u64, |sum, n| sum.checked_add(*n))
            == Some(report.requests);
    names.iter().all(|name| check_dns_label(name).is_ok())
        && report.requests > 0
        && report.errors <= report.requests
        && histogram
}

/// Follows the store's revision: read every `every`, and right after each
/// write through this process.
pub fn watch_revision(store: Store, every: Duration) -> watch::Receiver<i64> {
    let (tx, rx) = watch::channel(0);
    let mut writes = store.writes();
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
                Err(error) => {
                    tracing::warn!(error = %crate::api::DisplayChain(&error), "reading the store's revision")
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = writes.changed() => {}
            }
        }
    });
    rx
}

/// The service's state.
#[derive(Clone, Debug)]
pub struct DiscoveryService {
    store: Store,
    book: StatusBook,
    catalog: SharedCatalog,
    /// This replica's name in `NodeConfigStatus`.
    replica: String,
    /// Turns true when the server shuts down: streams end so the graceful
    /// shutdown does not wait on them forever.
    stopping: watch::Receiver<bool>,
}

impl DiscoveryService {
    pub fn new(
        store: Store,
        book: StatusBook,
        catalog: SharedCatalog,
        replica: String,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            book,
            catalog,
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
                admin_address: None,
            },
            node,
            remote: peer.remote.to_string(),
            expires: peer.not_after.unwrap_or(now),
            store: self.store.clone(),
            book: self.book.clone(),
            catalog: self.catalog.clone(),
            stopping: self.stopping.clone(),
        };
        tokio::spawn(session.run(request.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Where a node's admin endpoint is, from what it reported and where its
/// stream comes from: kept only when it is an address (it is shown to
/// operators); a wildcard address (`0.0.0.0`, `::`) is the node's own
/// address as the control plane sees it.
fn admin_address(reported: &str, remote: &str) -> Option<String> {
    let mut address: std::net::SocketAddr = reported.parse().ok()?;
    if address.ip().is_unspecified()
        && let Ok(peer) = remote.parse::<std::net::SocketAddr>()
    {
        address.set_ip(peer.ip());
    }
    Some(address.to_string())
}

/// Completes when the server starts shutting down (or is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

fn shutting_down() -> Status {
    Status::unavailable("the control plane is shutting down; reconnect")
}

/// Stands for a version a node reported that cannot be read.
const UNREADABLE_VERSION: u64 = u64::MAX;

/// How much resource body one response part carries at most.
const PART_BYTES: usize = 256 * 1024;

/// One push as responses of at most [`PART_BYTES`] of bodies each (a single
/// larger resource goes alone), removals in the last; every part but the
/// last says more follow.
fn in_parts(
    revision: i64,
    nonce: &str,
    resources: Vec<PushedResource>,
    removed: Vec<String>,
) -> Vec<DeltaResponse> {
    let part = |resources| DeltaResponse {
        revision,
        nonce: nonce.to_owned(),
        resources,
        removed_resources: Vec::new(),
        more: true,
    };
    let mut parts = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0;
    for resource in resources {
        if !current.is_empty() && bytes + resource.body.len() > PART_BYTES {
            parts.push(part(std::mem::take(&mut current)));
            bytes = 0;
        }
        bytes += resource.body.len();
        current.push(resource);
    }
    let mut last = part(current);
    last.removed_resources = removed;
    last.more = false;
    parts.push(last);
    parts
}

struct Session {
    node: String,
    remote: String,
    /// The node certificate's expiry: the stream ends there and the node
    /// reconnects with its renewed certificate.
    expires: OffsetDateTime,
    store: Store,
    book: StatusBook,
    catalog: SharedCatalog,
    /// What is recorded of the node, written on every change.
    status: NodeConfigStatus,
    stopping: watch::Receiver<bool>,
}

/// A response waiting for its ACK or NACK.
struct Pending {
    nonce: String,
    revision: i64,
    changed: Vec<(Arc<str>, u64)>,
    removed: Vec<Arc<str>>,
}

/// What the node holds, as far as the session knows.
struct Held {
    versions: BTreeMap<Arc<str>, u64>,
    /// The catalog revision `versions` reflects, once known.
    at: Option<i64>,
    view: NodeView,
    /// The next push selects the node's resources in full, not from the
    /// names touched since `at`.
    reselect: bool,
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
        let session = self.book.begin(&self.node);
        self.record(|_| {});
        if let Err(status) = self.serve(&mut inbound, &tx).await {
            let _ = tx.send(Err(status)).await;
        }
        self.status.connected = false;
        self.status.last_seen = crate::store::now_rfc3339();
        self.book.record_end(session, self.status.clone());
        tracing::info!(node = self.node, "configuration stream ended");
    }

    /// Updates the node's recorded state (written in the next batch).
    fn record(&mut self, change: impl FnOnce(&mut NodeConfigStatus)) {
        change(&mut self.status);
        self.status.last_seen = crate::store::now_rfc3339();
        self.book.record(self.status.clone());
    }

    /// The response that brings the node from `held` to the catalog's
    /// current state, or `None` when it has it already.
    fn next_push(&self, held: &mut Held, sent: u64) -> (i64, Option<Vec<DeltaResponse>>, Pending) {
        let catalog = self.catalog.read();
        let revision = catalog.revision();
        let namespaces = catalog.namespaces_of(&self.node);
        let touched = held.at.and_then(|at| catalog.touched_since(at));
        let (changed, removed) = match touched {
            Some(touched) if !held.reselect && namespaces == held.view.namespaces => {
                delta_of_touched(&held.versions, &touched, &catalog, &held.view)
            }
            // First push, new subscriptions, a namespace gained or lost,
            // or further behind than the log: the whole selection.
            _ => {
                held.view.namespaces = namespaces;
                held.reselect = false;
                delta(&held.versions, catalog.snapshot(&held.view))
            }
        };
        drop(catalog);
        let nonce = format!("{revision}-{}", sent + 1);
        let pending = Pending {
            nonce: nonce.clone(),
            revision,
            changed: changed
                .iter()
                .map(|(name, pushed)| (name.clone(), pushed.version))
                .collect(),
            removed: removed.clone(),
        };
        // The first response is always sent, even if empty: it tells the
        // node which revision it is in sync with.
        if sent > 0 && changed.is_empty() && removed.is_empty() {
            return (revision, None, pending);
        }
        let resources = changed
            .into_iter()
            .map(|(name, pushed)| PushedResource {
                name: name.to_string(),
                version: pushed.version_text(),
                body: pushed.body.clone(),
            })
            .collect();
        let removed = removed.iter().map(|name| name.to_string()).collect();
        (
            revision,
            Some(in_parts(revision, &nonce, resources, removed)),
            pending,
        )
    }

    async fn serve(
        &mut self,
        inbound: &mut Streaming<DeltaRequest>,
        tx: &mpsc::Sender<Result<DeltaResponse, Status>>,
    ) -> Result<(), Status> {
        let Some(first) = inbound.message().await? else {
            return Ok(());
        };
        self.status.admin_address = admin_address(&first.admin_address, &self.remote);
        let mut held = Held {
            versions: first
                .initial_resource_versions
                .iter()
                .map(|(name, version)| {
                    // Unreadable: held at a version nothing has, so the
                    // node gets it again, or its removal.
                    let version = parse_version(version).unwrap_or(UNREADABLE_VERSION);
                    (Arc::from(name.as_str()), version)
                })
                .collect(),
            at: None,
            view: NodeView {
                node: self.node.clone(),
                ..NodeView::default()
            },
            reselect: true,
        };
        self.subscribe(
            &mut held.view.subscribed,
            &first.subscribe,
            &first.unsubscribe,
        )?;
        let mut revisions = self.catalog.revisions();
        let mut stopping = self.stopping.clone();
        // Nothing to send before the catalog is loaded.
        tokio::select! {
            loaded = revisions.wait_for(Option::is_some) => {
                loaded.map_err(|_| shutting_down())?;
            }
            () = stopped(&mut stopping) => return Err(shutting_down()),
        }
        let mut pending: Option<Pending> = None;
        let mut send = true;
        let mut sent = 0u64;
        let left = (self.expires - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        let expiry = tokio::time::sleep(left.unsigned_abs());
        tokio::pin!(expiry);
        loop {
            if send && pending.is_none() {
                send = false;
                revisions.mark_unchanged();
                let (revision, response, next) = self.next_push(&mut held, sent);
                match response {
                    None => {
                        // Nothing of this node's changed: it is in sync
                        // here too.
                        held.at = Some(revision);
                        if self.status.nack_revision.is_none()
                            && self.status.synced_revision != Some(revision)
                        {
                            self.record(|s| s.synced_revision = Some(revision));
                        }
                    }
                    Some(parts) => {
                        sent += 1;
                        tracing::debug!(
                            node = self.node,
                            revision,
                            nonce = next.nonce,
                            changed = next.changed.len(),
                            removed = next.removed.len(),
                            parts = parts.len(),
                            "pushing"
                        );
                        for part in parts {
                            tokio::select! {
                                sent = tx.send(Ok(part)) => if sent.is_err() { return Ok(()) },
                                () = stopped(&mut stopping) => return Err(shutting_down()),
                            }
                        }
                        pending = Some(next);
                    }
                }
            }
            tokio::select! {
                message = inbound.message() => {
                    let Some(request) = message? else { return Ok(()) };
                    self.endpoint_health(&request.endpoint_health).await;
                    self.request_stats(&request.request_stats).await;
                    if !request.subscribe.is_empty() || !request.unsubscribe.is_empty() {
                        self.subscribe(&mut held.view.subscribed, &request.subscribe, &request.unsubscribe)?;
                        // What the node may hold changed: select afresh.
                        held.reselect = true;
                        send = true;
                    }
                    let answered = pending
                        .as_ref()
                        .is_some_and(|p| !request.response_nonce.is_empty() && p.nonce == request.response_nonce);
                    if answered {
                        let done = pending.take().expect("checked above");
                        if request.error_detail.is_empty() {
                            for name in &done.removed {
                                held.versions.remove(name);
                            }
                            held.versions.extend(done.changed);
                            held.at = Some(done.revision);
                            self.record(|s| {
                                s.synced_revision = Some(done.revision);
                                s.nack_revision = None;
                                s.nack_reason = None;
                            });
                        } else {
                            tracing::warn!(node = self.node, revision = done.revision, reason = request.error_detail, "node rejected a push");
                            // It kept what it had; the selection that push
                            // was made for may be gone: start over.
                            held.reselect = true;
                            self.record(|s| {
                                s.nack_revision = Some(done.revision);
                                s.nack_reason = Some(request.error_detail.clone());
                            });
                        }
                        // Changes that arrived while waiting go out now.
                        if *revisions.borrow() != Some(done.revision) {
                            send = true;
                        }
                    }
                }
                changed = revisions.changed(), if pending.is_none() => {
                    if changed.is_err() {
                        return Err(shutting_down());
                    }
                    send = true;
                }
                () = stopped(&mut stopping) => return Err(shutting_down()),
                () = &mut expiry => {
                    return Err(Status::unauthenticated(
                        "the node certificate this stream was opened with has expired; reconnect",
                    ));
                }
            }
        }
    }

    /// Applies what the node observed of its own workloads' endpoints.
    /// A node speaks only for its workloads: anything else is ignored.
    async fn endpoint_health(&self, reports: &[EndpointHealth]) {
        for report in reports {
            let (Ok(ip), Ok(port)) = (report.ip.parse::<IpAddr>(), u16::try_from(report.port))
            else {
                tracing::warn!(
                    node = self.node,
                    ip = report.ip,
                    port = report.port,
                    "ignored a health report with a malformed address"
                );
                continue;
            };
            let service = (report.namespace.clone(), report.service.clone());
            let marked = self
                .catalog
                .read()
                .endpoint_on(&self.node, &service, ip, port);
            match marked {
                None => tracing::warn!(
                    node = self.node,
                    namespace = service.0,
                    service = service.1,
                    %ip,
                    port,
                    "ignored a health report about an endpoint not on this node"
                ),
                Some(healthy) if healthy == report.healthy => {}
                Some(_) => {
                    let key = format!("{}.{}", service.1, service.0);
                    match self
                        .store
                        .set_endpoint_ready(&key, ip, port, report.healthy)
                        .await
                    {
                        Ok(revision) => tracing::info!(
                            node = self.node,
                            namespace = service.0,
                            service = service.1,
                            %ip,
                            port,
                            healthy = report.healthy,
                            revision,
                            "endpoint readiness reported by its node"
                        ),
                        Err(error) => {
                            tracing::warn!(%error, node = self.node, "recording a reported endpoint health")
                        }
                    }
                }
            }
        }
    }

    /// Keeps what the node reported of its workloads' requests. A node
    /// speaks only for workloads it runs, with consistent counts; anything
    /// else is left out (and logged).
    async fn request_stats(&self, reports: &[RequestStats]) {
        if reports.is_empty() {
            return;
        }
        let kept: Vec<EdgeReport> = {
            let catalog = self.catalog.read();
            reports
                .iter()
                .take(MAX_STATS_PER_REPORT)
                .filter(|r| {
                    stats_report_is_sound(r)
                        && catalog.workload_on(&self.node, &r.source_namespace, &r.source_workload)
                })
                .map(|r| EdgeReport {
                    source_namespace: r.source_namespace.clone(),
                    source_workload: r.source_workload.clone(),
                    namespace: r.namespace.clone(),
                    service: r.service.clone(),
                    requests: r.requests,
                    errors: r.errors,
                    latency: r.latency_buckets.clone(),
                    interval_ms: r.interval_ms,
                })
                .collect()
        };
        if kept.len() < reports.len() {
            tracing::warn!(
                node = self.node,
                ignored = reports.len() - kept.len(),
                "ignored request statistics about workloads not on this node, or inconsistent"
            );
        }
        if kept.is_empty() {
            return;
        }
        if let Err(error) = self.store.record_request_stats(&self.node, &kept).await {
            tracing::warn!(%error, node = self.node, "recording request statistics");
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

#[cfg(test)]
mod stats_tests {
    use super::*;

    #[test]
    fn only_consistent_stats_reports_are_kept() {
        let sound = || {
            let mut latency_buckets = vec![0; mesh_model::stats::LATENCY_BOUNDS.len() + 1];
            latency_buckets[3] = 7;
            latency_buckets[9] = 3;
            RequestStats {
                source_namespace: "shop".into(),
                source_workload: "frontend".into(),
                namespace: "shop".into(),
                service: "reviews".into(),
                requests: 10,
                errors: 2,
                latency_buckets,
                interval_ms: 10_000,
            }
        };
        assert!(stats_report_is_sound(&sound()));
        type Breakage = (&'static str, fn(&mut RequestStats));
        let broken: [Breakage; 7] = [
            ("more errors than requests", |r| r.errors = 11),
            ("no requests", |r| {
                r.requests = 0;
                r.errors = 0;
                r.latency_buckets.iter_mut().for_each(|n| *n = 0);
            }),
            ("a histogram short of the count", |r| {
                r.latency_buckets[3] = 6
            }),
            ("a histogram of another shape", |r| {
                r.latency_buckets.push(0)
            }),
            ("a histogram that overflows", |r| {
                r.latency_buckets[0] = u64::MAX;
            }),
            ("a name that is no DNS label", |r| {
                r.service = "Reviews!".into()
            }),
            ("an overlong name", |r| r.source_workload = "a".repeat(64)),
        ];
        for (case, change) in broken {
            let mut report = sound();
            change(&mut report);
            assert!(!stats_report_is_sound(&report), "{case}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_admin_address_becomes_the_nodes_own() {
        let remote = "10.0.0.7:51234";
        assert_eq!(
            admin_address("127.0.0.1:15000", remote).as_deref(),
            Some("127.0.0.1:15000")
        );
        assert_eq!(
            admin_address("0.0.0.0:15000", remote).as_deref(),
            Some("10.0.0.7:15000")
        );
        assert_eq!(
            admin_address("[::]:15000", "[fd00::7]:4000").as_deref(),
            Some("[fd00::7]:15000")
        );
        assert_eq!(admin_address("", remote), None);
        assert_eq!(admin_address("node1:15000", remote), None);
    }

    #[test]
    fn a_large_push_goes_in_parts_that_only_the_last_closes() {
        let resource = |i: usize| PushedResource {
            name: format!("address/ns/w{i}"),
            version: "1".into(),
            body: vec![b'x'; 100 * 1024],
        };
        let parts = in_parts(
            7,
            "7-1",
            (0..5).map(resource).collect(),
            vec!["gone".into()],
        );
        let sizes: Vec<usize> = parts.iter().map(|p| p.resources.len()).collect();
        assert_eq!(sizes, [2, 2, 1]);
        assert_eq!(
            parts.iter().map(|p| p.more).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert!(parts.iter().all(|p| p.nonce == "7-1" && p.revision == 7));
        assert!(parts[..2].iter().all(|p| p.removed_resources.is_empty()));
        assert_eq!(parts[2].removed_resources, ["gone"]);
        // Small, or empty: one part.
        let one = in_parts(8, "8-2", Vec::new(), Vec::new());
        assert_eq!(one.len(), 1);
        assert!(!one[0].more);
    }
}
