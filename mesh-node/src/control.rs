//! The node's side of the control plane's node API: joining the mesh and
//! obtaining certificates.
//!
//! The node first presents a bootstrap token and gets a node certificate
//! (`spiffe://<td>/ns/mesh-system/sa/node-<name>`); from then on it
//! authenticates with that certificate, renewed by its own
//! [`CertManager`]. If the node certificate ever expires (a long outage),
//! the token — if still valid — gets it back. Each workload's certificate
//! is requested by workload name; the CA decides the identity.
//!
//! The control plane is verified as `.../ns/mesh-system/sa/mesh-control`
//! against the trust bundle, which starts as the operator's `--ca-bundle`
//! and follows what the CA sends back (so a root rotation reaches the node).

use std::sync::{Arc, Mutex, OnceLock, RwLock};

use mesh_api::v1::{
    CertificateResponse, CreateCertificateRequest, JoinNodeRequest, identity_client::IdentityClient,
};
use mesh_identity::{SpiffeVerifier, TrustBundle, components};
use rustls::pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::identity::{
    CertManager, CertState, CertificateSource, Clock, Issued, RotationConfig, tls,
};

/// How long a workload's request waits for the node's own certificate.
pub const NODE_CERTIFICATE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The node's connection to the control plane.
#[derive(Clone, Debug)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    address: String,
    node: String,
    bootstrap_token: Option<String>,
    bundle: RwLock<TrustBundle>,
    /// The node certificate's state, once its manager runs.
    node_state: OnceLock<watch::Receiver<CertState>>,
    /// The channel and the node certificate it authenticates with (empty
    /// before the node has one): a renewed certificate gets a new channel,
    /// since the server knows a connection by the certificate it was opened
    /// with.
    channel: Mutex<Option<(Vec<u8>, Channel)>>,
    /// Where this node's admin endpoint listens, told to the control plane
    /// for `meshctl proxy-config`.
    admin_address: OnceLock<std::net::SocketAddr>,
    /// Bumped each time the configuration stream is up again after it was
    /// down: the CA, on the same control plane, answers again.
    reachable: watch::Sender<u64>,
}

impl ControlPlane {
    /// The control plane at `address` (`host:port`), for node `node`.
    pub fn new(
        address: &str,
        node: &str,
        bundle: TrustBundle,
        bootstrap_token: Option<String>,
    ) -> Result<Self, String> {
        components::node(bundle.trust_domain(), node)?;
        Ok(Self {
            inner: Arc::new(Inner {
                address: address.to_owned(),
                node: node.to_owned(),
                bootstrap_token,
                bundle: RwLock::new(bundle),
                node_state: OnceLock::new(),
                channel: Mutex::new(None),
                admin_address: OnceLock::new(),
                reachable: watch::Sender::new(0),
            }),
        })
    }

    /// Records where the node's admin endpoint listens (once).
    pub fn set_admin_address(&self, address: std::net::SocketAddr) {
        let _ = self.inner.admin_address.set(address);
    }

    /// Tells the certificate managers the control plane answers again, so
    /// those backing off after failed renewals ask at once.
    pub fn reachable_again(&self) {
        self.inner.reachable.send_modify(|times| *times += 1);
    }

    /// Where the node's admin endpoint listens, when set.
    pub fn admin_address(&self) -> Option<std::net::SocketAddr> {
        self.inner.admin_address.get().copied()
    }

    /// The trust bundle as last received.
    pub fn bundle(&self) -> TrustBundle {
        self.inner
            .bundle
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts the node certificate's manager (once).
    pub fn start_node_identity(&self, config: RotationConfig, clock: Clock) -> CertManager {
        let manager = CertManager::start(
            format!("node {}", self.inner.node),
            Arc::new(NodeSource(self.clone())),
            config,
            clock,
        );
        let _ = self.inner.node_state.set(manager.subscribe());
        manager
    }

    /// Starts the certificate manager of workload `namespace/name`.
    pub fn start_workload_identity(
        &self,
        namespace: &str,
        name: &str,
        config: RotationConfig,
        clock: Clock,
    ) -> CertManager {
        CertManager::start(
            format!("{namespace}/{name}"),
            Arc::new(WorkloadSource {
                control: self.clone(),
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }),
            config,
            clock,
        )
    }

    /// A client authenticated with the node certificate if there is one.
    fn client(&self) -> Result<IdentityClient<Channel>, String> {
        Ok(IdentityClient::new(self.channel()?))
    }

    /// Follows the node certificate's state, once its manager runs.
    pub fn node_certificate_state(&self) -> Option<watch::Receiver<CertState>> {
        self.inner.node_state.get().cloned()
    }

    /// Waits (up to `limit`) until the node holds its own certificate.
    pub async fn node_certificate(&self, limit: std::time::Duration) -> Result<(), String> {
        let Some(mut node) = self.inner.node_state.get().cloned() else {
            return Err("the node has not started joining the mesh".into());
        };
        let ready = tokio::time::timeout(limit, node.wait_for(|s| s.current.is_some())).await;
        if matches!(ready.map(|r| r.is_ok()), Ok(true)) {
            Ok(())
        } else {
            Err("the node has no certificate of its own yet".into())
        }
    }

    /// The channel to the control plane, authenticated with the node's
    /// current certificate if there is one; a new one after each renewal.
    pub fn channel(&self) -> Result<Channel, String> {
        let state = self.inner.node_state.get().cloned();
        let current = state
            .as_ref()
            .and_then(|s| s.borrow().current.as_ref().map(|c| c.cert.to_vec()))
            .unwrap_or_default();
        let mut channel = self.inner.channel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cert, existing)) = channel.as_ref()
            && *cert == current
        {
            return Ok(existing.clone());
        }
        let this = self.clone();
        // Before the node has a certificate it connects without one.
        let presented = if current.is_empty() { None } else { state };
        let lazy = mesh_api::channel::lazy(&self.inner.address, move || {
            this.tls_config(presented.clone())
        })
        .map_err(|e| format!("control plane address {:?}: {e}", self.inner.address))?;
        *channel = Some((current, lazy.clone()));
        Ok(lazy)
    }

    fn tls_config(
        &self,
        node_state: Option<watch::Receiver<CertState>>,
    ) -> Arc<rustls::ClientConfig> {
        let bundle = self.bundle();
        let control_plane = components::control_plane(bundle.trust_domain());
        tls::control_plane_client_config(node_state, bundle, control_plane)
    }

    /// Checks a response and adopts its trust bundle.
    fn accept(&self, response: CertificateResponse) -> Result<Issued, String> {
        let trust_domain = self.bundle().trust_domain().to_owned();
        let roots: Vec<CertificateDer<'static>> = response
            .trust_bundle_der
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let bundle = TrustBundle::new(&trust_domain, roots)
            .map_err(|e| format!("the CA sent an unusable trust bundle: {e}"))?;
        let cert = CertificateDer::from(response.certificate_der);
        let intermediates: Vec<CertificateDer<'static>> = response
            .chain_der
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let identity = SpiffeVerifier::new(bundle.clone())
            .verify_peer(
                &cert,
                &intermediates,
                UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .map_err(|e| format!("the CA sent a certificate that does not verify: {e}"))?;
        if identity.to_string() != response.spiffe_id {
            return Err(format!(
                "the CA said {} but the certificate names {identity}",
                response.spiffe_id
            ));
        }
        let time = |unix: i64| {
            OffsetDateTime::from_unix_timestamp(unix)
                .map_err(|e| format!("the CA sent a bad validity time: {e}"))
        };
        let issued = Issued {
            identity,
            serial: response.serial,
            cert,
            not_before: time(response.not_before_unix)?,
            not_after: time(response.not_after_unix)?,
        };
        *self.inner.bundle.write().unwrap_or_else(|e| e.into_inner()) = bundle;
        Ok(issued)
    }
}

fn status(error: tonic::Status) -> String {
    format!("{:?}: {}", error.code(), error.message())
}

/// The node's own certificate.
#[derive(Debug)]
struct NodeSource(ControlPlane);

impl CertificateSource for NodeSource {
    async fn issue(&self, csr_pem: &str) -> Result<Issued, String> {
        let control = &self.0;
        let mut client = control.client()?;
        let mut request = tonic::Request::new(JoinNodeRequest {
            node: control.inner.node.clone(),
            csr_pem: csr_pem.to_owned(),
        });
        let has_cert = control
            .inner
            .node_state
            .get()
            .is_some_and(|s| s.borrow().current.is_some());
        if !has_cert {
            let Some(token) = &control.inner.bootstrap_token else {
                return Err(
                    "this node has no certificate and no bootstrap token to join with".into(),
                );
            };
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| "the bootstrap token is not valid header text".to_owned())?;
            request
                .metadata_mut()
                .insert(mesh_api::AUTHORIZATION, value);
        }
        let response = client.join_node(request).await.map_err(status)?;
        let issued = control.accept(response.into_inner())?;
        let expected = components::node(control.bundle().trust_domain(), &control.inner.node)?;
        if issued.identity != expected {
            return Err(format!(
                "the CA issued {} where {expected} was asked for",
                issued.identity
            ));
        }
        Ok(issued)
    }

    fn reachable_again(&self) -> Option<watch::Receiver<u64>> {
        Some(self.0.inner.reachable.subscribe())
    }
}

/// One workload's certificate.
#[derive(Debug)]
struct WorkloadSource {
    control: ControlPlane,
    namespace: String,
    name: String,
}

impl CertificateSource for WorkloadSource {
    async fn issue(&self, csr_pem: &str) -> Result<Issued, String> {
        // Workload certificates need the node's; wait for it a while
        // rather than fail into backoff while the node is joining.
        self.control.node_certificate(NODE_CERTIFICATE_WAIT).await?;
        let mut client = self.control.client()?;
        let response = client
            .create_certificate(CreateCertificateRequest {
                namespace: self.namespace.clone(),
                workload: self.name.clone(),
                csr_pem: csr_pem.to_owned(),
            })
            .await
            .map_err(status)?;
        let issued = self.control.accept(response.into_inner())?;
        if issued.identity.namespace != self.namespace {
            return Err(format!(
                "the CA issued {} for a workload of namespace {}",
                issued.identity, self.namespace
            ));
        }
        Ok(issued)
    }

    fn reachable_again(&self) -> Option<watch::Receiver<u64>> {
        Some(self.control.inner.reachable.subscribe())
    }
}
