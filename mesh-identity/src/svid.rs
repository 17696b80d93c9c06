//! The X.509-SVID leaf profile (SPIFFE X509-SVID §4–5), checked on every
//! peer certificate after its chain is verified: exactly one URI SAN, a
//! workload SPIFFE ID in the expected trust domain, not a CA, not able to
//! sign certificates.

use mesh_model::names::SpiffeId;
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer as _};

/// Why a certificate is not an acceptable workload SVID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("the certificate cannot be parsed: {0}")]
    Malformed(String),
    #[error("the chain does not verify: {0}")]
    Chain(String),
    #[error("the certificate has no URI SAN (a SPIFFE ID is required)")]
    NoUriSan,
    #[error("the certificate has {0} URI SANs; an SVID has exactly one")]
    MultipleUriSans(usize),
    #[error("the URI SAN is not a workload SPIFFE ID: {0}")]
    BadSpiffeId(String),
    #[error("the SPIFFE ID {id} is in trust domain {actual}, not {expected}")]
    WrongTrustDomain {
        id: String,
        actual: String,
        expected: String,
    },
    #[error("the leaf certificate is a CA (basicConstraints cA=true)")]
    LeafIsCa,
    #[error("the leaf certificate may sign certificates or CRLs (keyUsage)")]
    LeafCanSign,
    #[error("the peer is {actual}, not the expected {expected}")]
    UnexpectedPeer { actual: String, expected: String },
}

/// Checks the leaf profile of `der` and returns its SPIFFE ID.
pub fn check_leaf(der: &[u8], trust_domain: &str) -> Result<SpiffeId, SvidError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    if let Ok(Some(constraints)) = cert.basic_constraints()
        && constraints.value.ca
    {
        return Err(SvidError::LeafIsCa);
    }
    if let Ok(Some(usage)) = cert.key_usage()
        && (usage.value.key_cert_sign() || usage.value.crl_sign())
    {
        return Err(SvidError::LeafCanSign);
    }
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(SvidError::Malformed(e.to_string())),
    };
    let uri = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [uri] => *uri,
        many => return Err(SvidError::MultipleUriSans(many.len())),
    };
    let id = SpiffeId::parse(uri).map_err(SvidError::BadSpiffeId)?;
    if id.trust_domain != trust_domain {
        return Err(SvidError::WrongTrustDomain {
            id: id.to_string(),
            actual: id.trust_domain.clone(),
            expected: trust_domain.to_owned(),
        });
    }
    Ok(id)
}
