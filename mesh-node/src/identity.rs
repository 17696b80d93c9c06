//! Workload identity on the node: for each workload, a key that never
//! leaves the node, a certificate obtained from the mesh CA by CSR, renewed
//! before it expires and kept beside its successor for a while.

pub mod manager;
pub mod rotation;
pub mod tls;

use std::future::Future;

use mesh_identity::SpiffeId;
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::time::Instant;

pub use manager::{CertManager, CertState, WorkloadCertificate};
pub use rotation::RotationConfig;

/// A certificate as the CA returned it.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The identity the CA certified (its choice, from the store: the node
    /// names a workload, never an identity).
    pub identity: SpiffeId,
    /// Lowercase hex, as `meshctl cert list` shows it.
    pub serial: String,
    pub cert: CertificateDer<'static>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// Where one workload's (or the node's) certificates come from: the
/// control plane's CA, over gRPC.
pub trait CertificateSource: Send + Sync + 'static {
    /// Asks the CA to certify the key of `csr_pem`.
    fn issue(&self, csr_pem: &str) -> impl Future<Output = Result<Issued, String>> + Send;

    /// Changes each time the CA answers again after it was away (the
    /// node's connection to the control plane is back), so a manager
    /// backing off asks at once rather than at its next retry; `None` for
    /// a source that cannot tell.
    fn reachable_again(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Wall-clock time that follows tokio's clock, so certificate lifetimes
/// (wall time) and timers (tokio time) agree, and tests can pause both.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    wall: OffsetDateTime,
    at: Instant,
}

impl Clock {
    /// Anchors tokio's clock to the system clock now.
    pub fn system() -> Self {
        Self {
            wall: OffsetDateTime::now_utc(),
            at: Instant::now(),
        }
    }

    /// The current wall time.
    pub fn now(&self) -> OffsetDateTime {
        self.wall + (Instant::now() - self.at)
    }

    /// The tokio instant at wall time `at` (now if it has passed).
    pub fn instant_at(&self, at: OffsetDateTime) -> Instant {
        let now = self.now();
        if at <= now {
            Instant::now()
        } else {
            Instant::now() + (at - now).unsigned_abs()
        }
    }
}
