//! The trust bundle: every root currently trusted for one trust domain.
//! During a root rotation it holds the old and the new root, so peers with
//! certificates from either keep being accepted.

use rustls::pki_types::{CertificateDer, TrustAnchor, pem::PemObject as _};

use crate::SvidError;

/// Roots of one trust domain.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// A bundle from the roots' PEM (one or more certificates).
    pub fn from_pem(trust_domain: &str, pem: &str) -> Result<Self, SvidError> {
        let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SvidError::Malformed(format!("trust bundle: {e}")))?;
        Self::new(trust_domain, roots)
    }

    /// A bundle from DER roots.
    pub fn new(trust_domain: &str, roots: Vec<CertificateDer<'static>>) -> Result<Self, SvidError> {
        if roots.is_empty() {
            return Err(SvidError::Malformed(
                "the trust bundle holds no root".into(),
            ));
        }
        for root in &roots {
            webpki::anchor_from_trusted_cert(root)
                .map_err(|e| SvidError::Malformed(format!("trust bundle root: {e}")))?;
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            roots,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as webpki trust anchors.
    pub(crate) fn anchors(&self) -> Vec<TrustAnchor<'_>> {
        self.roots
            .iter()
            .filter_map(|root| webpki::anchor_from_trusted_cert(root).ok())
            .collect()
    }
}
