//! The mesh certificate authority: a long-lived root (ECDSA P-256) that
//! signs short-lived workload X.509-SVIDs.
//!
//! The CA decides the identity it certifies from who is authorised, never
//! from what a CSR asks for: a CSR contributes its public key only.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use time::OffsetDateTime;

use crate::{SpiffeId, TrustBundle};

/// Workload certificates live a day unless configured otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Certificates start slightly in the past, for peers whose clocks lag: 5
/// minutes, or a tenth of the lifetime for very short-lived certificates.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Shortest TTL accepted (tests and demos rotate fast; production uses hours).
pub const MIN_TTL: Duration = Duration::from_secs(10);
/// The root lives ten years.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why the CA refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CSR is invalid: {0}")]
    BadCsr(String),
    #[error("the CSR's key must be ECDSA P-256")]
    UnsupportedKey,
    #[error("{id} is not in this CA's trust domain {trust_domain}")]
    ForeignTrustDomain { id: String, trust_domain: String },
    #[error("the CA's own certificate or key is unusable: {0}")]
    BadCa(String),
    #[error("a TTL of {0:?} is outside 10 seconds to 1 year")]
    BadTtl(Duration),
    #[error("signing failed: {0}")]
    Signing(String),
    #[error("no randomness for a serial number: {0}")]
    Random(String),
}

/// A certificate the CA issued.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    pub pem: String,
    pub der: CertificateDer<'static>,
    pub spiffe_id: SpiffeId,
    /// Lowercase hex of the 128-bit serial.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// The CA: its root and signing key.
#[derive(Debug)]
pub struct CertificateAuthority {
    trust_domain: String,
    root_pem: String,
    root_der: CertificateDer<'static>,
    key: KeyPair,
    ttl: Duration,
    /// Other roots peers may chain to (a root rotation's old or next root):
    /// in the bundle, never used to sign.
    trusted: Vec<CertificateDer<'static>>,
}

/// What an operator needs to know of a root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootInfo {
    /// Lowercase hex.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl RootInfo {
    /// Reads a root certificate.
    pub fn of(der: &[u8]) -> Result<Self, CaError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| CaError::BadCa(format!("certificate: {e}")))?;
        let time = |t: x509_parser::time::ASN1Time| {
            OffsetDateTime::from_unix_timestamp(t.timestamp())
                .map_err(|e| CaError::BadCa(format!("validity: {e}")))
        };
        Ok(Self {
            serial: cert.raw_serial_as_string().replace(':', ""),
            not_before: time(cert.validity().not_before)?,
            not_after: time(cert.validity().not_after)?,
        })
    }
}

impl CertificateAuthority {
    /// Generates a new root for `trust_domain`, valid from `now`.
    pub fn generate(trust_domain: &str, now: OffsetDateTime) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "mesh");
        name.push(DnType::CommonName, format!("mesh root CA {trust_domain}"));
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // A signing certificate carries the trust domain with no path.
        params.subject_alt_names = vec![uri(&format!("spiffe://{trust_domain}"))?];
        params.serial_number = Some(random_serial()?);
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_TTL;
        let root = params
            .self_signed(&key)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            root_pem: root.pem(),
            root_der: root.der().clone(),
            key,
            ttl: DEFAULT_TTL,
            trusted: Vec::new(),
        })
    }

    /// The CA from its root certificate and key (PEM).
    pub fn from_pem(trust_domain: &str, root_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::BadCa(format!("key: {e}")))?;
        let root_der = CertificateDer::from_pem_slice(root_pem.as_bytes())
            .map_err(|e| CaError::BadCa(format!("certificate: {e}")))?;
        // The key must be the root's.
        let (_, root) = x509_parser::parse_x509_certificate(&root_der)
            .map_err(|e| CaError::BadCa(format!("certificate: {e}")))?;
        if root.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(CaError::BadCa(
                "the key is not the root certificate's".into(),
            ));
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            root_pem: root_pem.to_owned(),
            root_der,
            key,
            ttl: DEFAULT_TTL,
            trusted: Vec::new(),
        })
    }

    /// Also trusts `roots` (PEM, any number), without signing with them.
    /// The signing root itself is skipped if listed.
    pub fn with_trusted_pem(mut self, roots: &str) -> Result<Self, CaError> {
        let mut found = 0;
        for root in CertificateDer::pem_slice_iter(roots.as_bytes()) {
            found += 1;
            let root = root.map_err(|e| CaError::BadCa(format!("trusted root: {e}")))?;
            webpki::anchor_from_trusted_cert(&root)
                .map_err(|e| CaError::BadCa(format!("trusted root: {e}")))?;
            if root != self.root_der && !self.trusted.contains(&root) {
                self.trusted.push(root);
            }
        }
        if found == 0 && !roots.trim().is_empty() {
            return Err(CaError::BadCa(
                "trusted roots: no PEM certificate in the text".into(),
            ));
        }
        Ok(self)
    }

    /// The trust bundle as PEM, signing root first.
    pub fn bundle_pem(&self) -> String {
        std::iter::once(&self.root_der)
            .chain(&self.trusted)
            .map(|der| {
                pem::encode_config(
                    &pem::Pem::new("CERTIFICATE", der.to_vec()),
                    pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
                )
            })
            .collect()
    }

    /// The signing root, DER.
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// The other trusted roots, DER.
    pub fn trusted(&self) -> &[CertificateDer<'static>] {
        &self.trusted
    }

    /// The lifetime of the certificates this CA issues.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Sets the lifetime of the certificates issued from now on.
    pub fn with_ttl(mut self, ttl: Duration) -> Result<Self, CaError> {
        if ttl < MIN_TTL || ttl > Duration::from_secs(365 * 24 * 3600) {
            return Err(CaError::BadTtl(ttl));
        }
        self.ttl = ttl;
        Ok(self)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root's private key, PEM: for a 0600 file, never the database.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The trust bundle: the signing root, then the other trusted roots.
    pub fn bundle(&self) -> TrustBundle {
        let roots = std::iter::once(&self.root_der)
            .chain(&self.trusted)
            .cloned()
            .collect();
        TrustBundle::new(&self.trust_domain, roots).expect("every root was checked as an anchor")
    }

    /// Issues `identity` a certificate for the public key of `csr_pem`.
    pub fn issue_for_csr(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        if rcgen::PublicKeyData::algorithm(&csr.public_key) != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::UnsupportedKey);
        }
        let request = CertificateSigningRequestParams {
            params: self.workload_params(identity, now)?,
            public_key: csr.public_key,
        };
        let issuer = self.issuer()?;
        let cert = request
            .signed_by(&issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        self.issued(cert, identity, now)
    }

    /// Issues `identity` a certificate with a key generated here; returns
    /// the certificate and the key's PEM. For workloads outside the mesh
    /// (gateways, VMs); mesh workloads send CSRs instead.
    pub fn issue_with_key(
        &self,
        identity: &SpiffeId,
        now: OffsetDateTime,
    ) -> Result<(IssuedCertificate, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let params = self.workload_params(identity, now)?;
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        Ok((self.issued(cert, identity, now)?, key.serialize_pem()))
    }

    fn backdate(&self) -> Duration {
        BACKDATE.min(self.ttl / 10)
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CaError> {
        Issuer::from_ca_cert_der(&self.root_der, &self.key)
            .map_err(|e| CaError::BadCa(e.to_string()))
    }

    /// The X.509-SVID profile.
    fn workload_params(
        &self,
        identity: &SpiffeId,
        now: OffsetDateTime,
    ) -> Result<CertificateParams, CaError> {
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                id: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "mesh");
        params.distinguished_name = name;
        params.subject_alt_names = vec![uri(&identity.to_string())?];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial()?);
        params.not_before = now - self.backdate();
        params.not_after = now + self.ttl;
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    fn issued(
        &self,
        cert: rcgen::Certificate,
        identity: &SpiffeId,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, CaError> {
        let serial = x509_parser::parse_x509_certificate(cert.der())
            .map(|(_, parsed)| parsed.raw_serial_as_string().replace(':', ""))
            .map_err(|e| CaError::Signing(e.to_string()))?;
        Ok(IssuedCertificate {
            pem: cert.pem(),
            der: cert.der().clone(),
            spiffe_id: identity.clone(),
            serial,
            not_before: now - self.backdate(),
            not_after: now + self.ttl,
        })
    }
}

fn uri(value: &str) -> Result<SanType, CaError> {
    let ia5 = value
        .to_owned()
        .try_into()
        .map_err(|e: rcgen::Error| CaError::Signing(e.to_string()))?;
    Ok(SanType::URI(ia5))
}

/// A positive 128-bit random serial.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|e| CaError::Random(e.to_string()))?;
    // Positive, and never shortened by DER's minimal encoding.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}
