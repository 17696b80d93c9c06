//! The certificate manager of one workload identity: the single writer of
//! that workload's certificate state, published through a watch channel
//! that the TLS layer reads.
//!
//! It obtains a certificate at start, renews it at about 80 % of its
//! lifetime with a fresh key, keeps the previous one for the overlap window
//! (connections opened with it finish undisturbed), retries with backoff
//! while the CA is unreachable — serving the still-valid certificate
//! meanwhile, and asking again at once when the source says the CA is
//! back — and reports a certificate that expired anyway.

use std::sync::Arc;

use mesh_identity::SpiffeId;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use time::OffsetDateTime;
use tokio::{sync::watch, task::JoinHandle};

use super::{
    CertificateSource, Clock,
    rotation::{RotationConfig, backoff, renewal_offset},
};

/// A workload's certificate and its key, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCertificate {
    pub identity: SpiffeId,
    pub serial: String,
    pub cert: CertificateDer<'static>,
    /// The certificate with its signing key, built once per certificate.
    pub certified: Arc<CertifiedKey>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// What the manager publishes.
#[derive(Clone, Debug, Default)]
pub struct CertState {
    /// The certificate new connections use; `None` before the first one and
    /// after it expired.
    pub current: Option<Arc<WorkloadCertificate>>,
    /// The certificate it replaced, kept through the overlap window.
    pub previous: Option<Arc<WorkloadCertificate>>,
    /// When the current certificate will be renewed.
    pub next_renewal: Option<OffsetDateTime>,
    /// Certificates replaced so far.
    pub rotations: u64,
    /// Failed requests to the CA so far.
    pub failures: u64,
    pub last_error: Option<String>,
    /// The last certificate expired before it could be renewed.
    pub expired: bool,
}

/// Runs the manager of one identity until dropped.
#[derive(Debug)]
pub struct CertManager {
    state: watch::Receiver<CertState>,
    task: JoinHandle<()>,
}

impl CertManager {
    /// Starts managing the certificate `source` issues; `name` (a workload
    /// as `namespace/name`, or the node) labels the logs.
    pub fn start<S: CertificateSource>(
        name: impl Into<String>,
        source: Arc<S>,
        config: RotationConfig,
        clock: Clock,
    ) -> Self {
        let (tx, state) = watch::channel(CertState::default());
        let task = tokio::spawn(run(name.into(), source, config, clock, tx));
        Self { state, task }
    }

    /// The state now.
    pub fn state(&self) -> CertState {
        self.state.borrow().clone()
    }

    /// Follows every change.
    pub fn subscribe(&self) -> watch::Receiver<CertState> {
        self.state.clone()
    }
}

impl Drop for CertManager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn draw() -> f64 {
    let mut bytes = [0u8; 8];
    // Without randomness the jitter is simply zero.
    let _ = getrandom::getrandom(&mut bytes);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

async fn request<S: CertificateSource>(source: &S) -> Result<WorkloadCertificate, String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("generating a key: {e}"))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| format!("making the CSR: {e}"))?;
    let issued = source.issue(&csr).await?;
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
        .map_err(|e| format!("loading the key: {e}"))?;
    Ok(WorkloadCertificate {
        identity: issued.identity,
        serial: issued.serial,
        certified: Arc::new(CertifiedKey::new(vec![issued.cert.clone()], signing_key)),
        cert: issued.cert,
        not_before: issued.not_before,
        not_after: issued.not_after,
    })
}

async fn run<S: CertificateSource>(
    name: String,
    source: Arc<S>,
    config: RotationConfig,
    clock: Clock,
    tx: watch::Sender<CertState>,
) {
    // When to ask the CA next (now, at first); when to drop the previous
    // certificate; consecutive failures, for the backoff.
    let mut ask_at = clock.now();
    let mut retire_at: Option<OffsetDateTime> = None;
    let mut failures_in_row = 0u32;
    // Seen as it is now: only a later change means the CA came back.
    let mut back = source.reachable_again();
    loop {
        let now = clock.now();
        if retire_at.is_some_and(|t| now >= t) {
            retire_at = None;
            tx.send_modify(|s| s.previous = None);
        }
        let expired = tx
            .borrow()
            .current
            .as_ref()
            .is_some_and(|c| now >= c.not_after);
        if expired {
            tracing::warn!(
                workload = name,
                "certificate expired before it could be renewed"
            );
            tx.send_modify(|s| {
                s.current = None;
                s.expired = true;
            });
        }
        if now >= ask_at {
            match request(&*source).await {
                Ok(cert) => {
                    let lifetime = (cert.not_after - cert.not_before).unsigned_abs();
                    let renewal = cert.not_before + renewal_offset(&config, lifetime, draw());
                    ask_at = renewal;
                    failures_in_row = 0;
                    let now = clock.now();
                    tracing::info!(
                        workload = name,
                        identity = %cert.identity,
                        not_after = %cert.not_after,
                        next_renewal = %renewal,
                        "certificate issued"
                    );
                    tx.send_modify(|s| {
                        let replaced = s.current.replace(Arc::new(cert));
                        if replaced.is_some() {
                            s.rotations += 1;
                            retire_at = Some(now + config.overlap);
                            s.previous = replaced;
                        }
                        s.next_renewal = Some(renewal);
                        s.last_error = None;
                        s.expired = false;
                    });
                }
                Err(error) => {
                    let delay = backoff(&config, failures_in_row, draw());
                    failures_in_row = failures_in_row.saturating_add(1);
                    ask_at = clock.now() + delay;
                    tracing::warn!(workload = name, %error, retry_in = ?delay, "the CA did not issue a certificate");
                    tx.send_modify(|s| {
                        s.failures += 1;
                        s.last_error = Some(error);
                    });
                }
            }
            continue;
        }
        let expiry = tx.borrow().current.as_ref().map(|c| c.not_after);
        let wake = [Some(ask_at), retire_at, expiry]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(ask_at);
        let came_back = async {
            if let Some(back) = back.as_mut()
                && back.changed().await.is_ok()
            {
                return;
            }
            // A source that cannot tell, or one that is gone.
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = tokio::time::sleep_until(clock.instant_at(wake)) => {}
            () = came_back => {
                if failures_in_row > 0 {
                    // Within a second, spread: every manager of the node
                    // that was failing hears it at once.
                    let delay = backoff(&config, 0, draw());
                    tracing::info!(workload = name, retry_in = ?delay, "the CA is reachable again; asking shortly");
                    ask_at = clock.now() + delay;
                    failures_in_row = 0;
                }
            }
        }
    }
}
