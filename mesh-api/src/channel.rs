//! Dialling the control plane: a tonic channel whose connections are TLS
//! with the caller's rustls configuration (the strict SPIFFE verifier
//! expecting the control plane's identity, and the node's certificate when
//! it has one). The configuration is read for every new connection, so a
//! renewed node certificate is used from the next reconnect on.

use std::{sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, pki_types::ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

/// Names the control plane in SNI. Peers are checked by SPIFFE ID, never by
/// this name.
const SERVER_NAME: &str = "mesh-control";

/// A channel to `address`; connects on first use and reconnects after a
/// failure. `config` yields the TLS configuration of each new connection.
pub fn lazy<F>(address: &str, config: F) -> Result<Channel, tonic::transport::Error>
where
    F: Fn() -> Arc<ClientConfig> + Send + Sync + 'static,
{
    let config = Arc::new(config);
    let target = address.to_owned();
    let channel = Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let config = config.clone();
            let target = target.clone();
            async move {
                let tls = with_h2(config());
                let tcp = TcpStream::connect(target.as_str()).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
                let stream = TlsConnector::from(tls).connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }));
    Ok(channel)
}

/// gRPC needs HTTP/2, which the server only speaks when ALPN says so.
fn with_h2(config: Arc<ClientConfig>) -> Arc<ClientConfig> {
    if config.alpn_protocols.iter().any(|p| p == b"h2") {
        return config;
    }
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}
