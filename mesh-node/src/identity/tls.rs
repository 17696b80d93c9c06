//! rustls configurations for a workload's mTLS, fed by its certificate
//! manager: every handshake presents the manager's current certificate, so
//! a rotation takes effect on the next connection and open connections are
//! left alone. Peers are checked by the strict SPIFFE verifier.
//!
//! Session resumption is off on both sides: a resumed session skips the
//! certificate exchange, so a peer would keep being accepted on the
//! strength of a certificate that has since rotated or expired. Tunnels are
//! pooled, so full handshakes are rare anyway.

use std::sync::Arc;

use mesh_identity::{SpiffeId, SpiffeVerifier, TrustBundle};
use rustls::{
    ClientConfig, ServerConfig, SignatureScheme,
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::sync::watch;

use super::CertState;

/// Presents the current certificate of a workload.
#[derive(Debug)]
struct CurrentCertificate(watch::Receiver<CertState>);

impl CurrentCertificate {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0
            .borrow()
            .current
            .as_ref()
            .map(|c| c.certified.clone())
    }
}

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for CurrentCertificate {
    fn resolve(
        &self,
        _issuers: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.0.borrow().current.is_some()
    }
}

/// ring's TLS 1.3 suites with AES-128-GCM first (its default puts
/// AES-256-GCM first). A client offers them in this order and the server
/// follows the client's, so both ends of a tunnel settle on AES-128-GCM,
/// as BoringSSL (Envoy) and linkerd2-proxy order them: every byte through
/// a tunnel is sealed once and opened once, and 10 rounds cost less than
/// 14.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// The server side: requires a client certificate from the trust domain.
pub fn server_config(
    state: watch::Receiver<CertState>,
    bundle: TrustBundle,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(SpiffeVerifier::new(bundle).into_client_verifier())
        .with_cert_resolver(Arc::new(CurrentCertificate(state)));
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The client side: accepts only `peer` as the server.
pub fn client_config(
    state: watch::Receiver<CertState>,
    bundle: TrustBundle,
    peer: SpiffeId,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(
            SpiffeVerifier::new(bundle)
                .expecting(peer)
                .into_server_verifier(),
        )
        .with_client_cert_resolver(Arc::new(CurrentCertificate(state)));
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The node's side of its channel to the control plane: accepts only the
/// control plane's identity; presents the node certificate when there is
/// one (`None` before the node has joined). HTTP/2 by ALPN, for gRPC.
pub fn control_plane_client_config(
    node: Option<watch::Receiver<CertState>>,
    bundle: TrustBundle,
    control_plane: SpiffeId,
) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported by ring")
        .dangerous()
        .with_custom_certificate_verifier(
            SpiffeVerifier::new(bundle)
                .expecting(control_plane)
                .into_server_verifier(),
        );
    let mut config = match node {
        Some(state) => builder.with_client_cert_resolver(Arc::new(CurrentCertificate(state))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}
