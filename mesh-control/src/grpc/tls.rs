//! TLS for the node-facing gRPC listener: the control plane's own
//! certificate (issued by the mesh CA to
//! `spiffe://<td>/ns/mesh-system/sa/mesh-control` and renewed at half its
//! lifetime), and a stream of handshaken connections that carry the
//! client's verified identity into every request.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use mesh_identity::{SpiffeId, SpiffeVerifier, components, svid::check_leaf};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use time::OffsetDateTime;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::Connected;

use crate::api::Identity;
use crate::store::{NewCertificate, Store};

/// A connection whose TLS handshake and HTTP/2 preface take longer than
/// this is dropped (the HTTP/2 server waits for the preface with no timer
/// of its own).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What an HTTP/2 client sends first.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Who is on the other end of a gRPC connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub remote: SocketAddr,
    /// The identity in the client's verified certificate; `None` when the
    /// client presented none (a node joining with a bootstrap token).
    pub identity: Option<SpiffeId>,
    /// When that certificate expires. A connection outlives the handshake
    /// that checked it; past this, its identity no longer counts.
    pub not_after: Option<OffsetDateTime>,
}

impl Peer {
    /// The client's identity, if its certificate is still valid `now`.
    pub fn identity_at(&self, now: OffsetDateTime) -> Option<&SpiffeId> {
        match self.not_after {
            Some(not_after) if now < not_after => self.identity.as_ref(),
            _ => None,
        }
    }
}

/// A handshaken connection.
#[derive(Debug)]
pub struct Conn {
    stream: TlsStream<TcpStream>,
    peer: Peer,
    /// How much of the HTTP/2 preface, read ahead at accept, the server
    /// has been given back.
    preface_given: usize,
}

impl Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.preface_given < H2_PREFACE.len() {
            let rest = &H2_PREFACE[self.preface_given..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.preface_given += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The control plane's serving certificate, swapped on renewal.
#[derive(Debug)]
pub struct ServingCertificate {
    current: RwLock<Arc<CertifiedKey>>,
    not_after: RwLock<OffsetDateTime>,
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
    }
}

impl ServingCertificate {
    /// Issues the first certificate and keeps renewing it — at half its
    /// lifetime, and at once when the signing root changes — for as long as
    /// the returned value lives.
    pub async fn start(identity: Arc<Identity>, store: Store) -> anyhow::Result<Arc<Self>> {
        let (certified, not_after) = issue(&identity, &store).await?;
        let serving = Arc::new(Self {
            current: RwLock::new(certified),
            not_after: RwLock::new(not_after),
        });
        let weak = Arc::downgrade(&serving);
        let mut changes = identity.subscribe();
        tokio::spawn(async move {
            loop {
                let Some(serving) = weak.upgrade() else {
                    return;
                };
                let not_after = *serving.not_after.read().unwrap_or_else(|e| e.into_inner());
                drop(serving);
                let left: time::Duration =
                    (not_after - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
                let half: Duration = (left / 2_i32).unsigned_abs();
                tokio::select! {
                    () = tokio::time::sleep(half.max(Duration::from_secs(1))) => {}
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
                let Some(serving) = weak.upgrade() else {
                    return;
                };
                match issue(&identity, &store).await {
                    Ok((certified, not_after)) => {
                        *serving.current.write().unwrap_or_else(|e| e.into_inner()) = certified;
                        *serving.not_after.write().unwrap_or_else(|e| e.into_inner()) = not_after;
                        tracing::info!(%not_after, "renewed the control plane's serving certificate");
                    }
                    Err(error) => {
                        tracing::warn!(%error, "renewing the control plane's serving certificate");
                    }
                }
            }
        });
        Ok(serving)
    }
}

async fn issue(
    identity: &Identity,
    store: &Store,
) -> anyhow::Result<(Arc<CertifiedKey>, OffsetDateTime)> {
    let ca = identity.ca();
    let id = components::control_plane(ca.trust_domain());
    let now = OffsetDateTime::now_utc();
    let (cert, key_pem) = ca.issue_with_key(&id, now)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)?;
    store
        .record_certificate(&NewCertificate {
            service_name: "mesh-system/mesh-control",
            spiffe_id: &id.to_string(),
            serial: &cert.serial,
            cert_pem: &cert.pem,
            sealed_key: None,
            node: None,
            issued_at: now,
            expiry: cert.not_after,
        })
        .await?;
    let chain: Vec<CertificateDer<'static>> = vec![cert.der];
    Ok((
        Arc::new(CertifiedKey::new(chain, signing_key)),
        cert.not_after,
    ))
}

/// The server side of the node channel: our certificate; client
/// certificates optional but, when presented, verified strictly against the
/// mesh's trust bundle as it is now. Rebuilt when the bundle changes.
#[derive(Debug)]
pub struct ServerConfigs {
    identity: Arc<Identity>,
    serving: Arc<ServingCertificate>,
    current: std::sync::Mutex<(tokio::sync::watch::Receiver<u64>, Arc<rustls::ServerConfig>)>,
}

impl ServerConfigs {
    pub fn new(identity: Arc<Identity>, serving: Arc<ServingCertificate>) -> Self {
        let mut changes = identity.subscribe();
        changes.mark_unchanged();
        let config = server_config(&identity, serving.clone());
        Self {
            identity,
            serving,
            current: std::sync::Mutex::new((changes, config)),
        }
    }

    /// The configuration for a new connection.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let (changes, config) = &mut *current;
        if changes.has_changed().unwrap_or(false) {
            changes.mark_unchanged();
            *config = server_config(&self.identity, self.serving.clone());
        }
        config.clone()
    }
}

fn server_config(
    identity: &Identity,
    serving: Arc<ServingCertificate>,
) -> Arc<rustls::ServerConfig> {
    let verifier = SpiffeVerifier::new(identity.ca().bundle())
        .client_certificate_optional()
        .into_client_verifier();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3 is supported by ring")
    .with_client_cert_verifier(verifier)
    .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Accepts TCP connections on `listener`, handshakes each on its own task
/// (a slow client holds up no one) and yields the connections that made it.
pub fn incoming(
    listener: TcpListener,
    configs: Arc<ServerConfigs>,
) -> mpsc::Receiver<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a node connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                return;
            }
            let acceptor = TlsAcceptor::from(configs.current());
            let trust_domain = configs.identity.ca().trust_domain().to_owned();
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = async {
                    let mut stream = acceptor.accept(tcp).await?;
                    let mut preface = [0; H2_PREFACE.len()];
                    stream.read_exact(&mut preface).await?;
                    if &preface != H2_PREFACE {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the client does not speak HTTP/2",
                        ));
                    }
                    io::Result::Ok(stream)
                };
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::info!(%remote, %error, "node TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%remote, "node TLS handshake or HTTP/2 preface timed out");
                        return;
                    }
                };
                // The verifier accepted the chain; read the identity off it.
                let leaf = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first());
                let identity = leaf.and_then(|leaf| check_leaf(leaf, &trust_domain).ok());
                let not_after = leaf.and_then(|leaf| {
                    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
                    OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).ok()
                });
                let peer = Peer {
                    remote,
                    identity,
                    not_after,
                };
                let conn = Conn {
                    stream,
                    peer,
                    preface_given: 0,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    rx
}
