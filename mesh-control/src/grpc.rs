//! The node-facing gRPC API over TLS: the Identity service (certificates
//! for nodes and their workloads) and, next to it, the configuration push.

pub mod discovery;
pub mod identity;
pub mod limit;
pub mod status;
pub mod tls;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

pub use discovery::DiscoveryService;
pub use identity::IdentityService;
pub use limit::RateLimit;
pub use tls::{Peer, ServingCertificate};

use crate::{api::Identity, snapshot::SharedCatalog, store::Store};

/// Settings of the gRPC server.
#[derive(Clone, Debug)]
pub struct GrpcConfig {
    /// Certificate requests allowed per node.
    pub csr_limit: RateLimit,
    /// How often the store's revision is polled for changes.
    pub poll: std::time::Duration,
    /// This replica's name where it records the nodes it serves.
    pub replica: String,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            csr_limit: RateLimit::default(),
            poll: discovery::DEFAULT_POLL,
            replica: "mesh-control".to_owned(),
        }
    }
}

/// Serves the node API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    identity: Arc<Identity>,
    config: GrpcConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let serving = ServingCertificate::start(identity.clone(), store.clone()).await?;
    let configs = Arc::new(tls::ServerConfigs::new(identity.clone(), serving));
    let incoming = tls::incoming(listener, configs);
    // Other replicas' writes as they commit; polling covers the rest.
    if let Err(error) = store.listen_for_writes().await {
        tracing::warn!(%error, poll = ?config.poll, "not notified of other replicas' writes; polling for them");
    }
    let revisions = discovery::watch_revision(store.clone(), config.poll);
    let catalog = SharedCatalog::follow(store.clone(), revisions);
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let book = status::StatusBook::start(store.clone());
    let discovery = DiscoveryService::new(
        store.clone(),
        book.clone(),
        catalog,
        config.replica,
        stopping,
    );
    // Long-lived configuration streams would hold a graceful shutdown
    // forever: end them first.
    let shutdown = async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    };
    let service = IdentityService::new(store, identity, config.csr_limit);
    // HTTP/2 limits set here, so they cannot drift with tonic's defaults:
    // dead peers are found by pings; a node needs a few streams (its
    // configuration stream, certificate requests); rapid resets and
    // oversized header lists end the connection.
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(64)
        .http2_max_pending_accept_reset_streams(Some(20))
        .http2_max_header_list_size(64 << 10)
        .add_service(service.into_server())
        .add_service(discovery.into_server())
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown)
        .await?;
    book.flush().await;
    Ok(())
}
