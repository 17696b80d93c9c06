//! The node-facing gRPC API over TLS: the Identity service (certificates
//! for nodes and their workloads) and, next to it, the configuration push.

pub mod identity;
pub mod limit;
pub mod tls;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

pub use identity::IdentityService;
pub use limit::RateLimit;
pub use tls::{Peer, ServingCertificate};

use crate::{api::Identity, store::Store};

/// Settings of the gRPC server.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcConfig {
    /// Certificate requests allowed per node.
    pub csr_limit: RateLimit,
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
    let service = IdentityService::new(store, identity, config.csr_limit);
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown)
        .await?;
    Ok(())
}
