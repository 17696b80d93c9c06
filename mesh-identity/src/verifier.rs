//! rustls verifiers for mesh mTLS. Both sides verify the peer's chain to a
//! root of the trust bundle (signatures, validity window, EKU), then the
//! leaf's SVID profile, then — where the caller knows it — the exact peer
//! identity. There is no hostname check: peers are named by SPIFFE ID, not
//! by DNS.

use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use webpki::{EndEntityCert, KeyUsage};

use crate::{SpiffeId, SvidError, TrustBundle, svid::check_leaf};

/// Verifies peers against a trust bundle and the SVID profile.
#[derive(Debug)]
pub struct SpiffeVerifier {
    bundle: TrustBundle,
    expected: Option<SpiffeId>,
    client_auth_optional: bool,
    algorithms: WebPkiSupportedAlgorithms,
    root_names: Vec<DistinguishedName>,
}

impl SpiffeVerifier {
    /// Accepts any workload of the bundle's trust domain.
    pub fn new(bundle: TrustBundle) -> Self {
        let algorithms = CryptoProvider::get_default()
            .map(|p| p.signature_verification_algorithms)
            .unwrap_or(rustls::crypto::ring::default_provider().signature_verification_algorithms);
        Self {
            bundle,
            expected: None,
            client_auth_optional: false,
            algorithms,
            root_names: Vec::new(),
        }
    }

    /// Accepts only `peer` (a client dialling a known destination).
    pub fn expecting(mut self, peer: SpiffeId) -> Self {
        self.expected = Some(peer);
        self
    }

    /// As a server, also lets clients in without a certificate (a server
    /// that authenticates some callers otherwise, as the control plane
    /// does nodes holding only a bootstrap token). A certificate that is
    /// presented is still verified in full.
    pub fn client_certificate_optional(mut self) -> Self {
        self.client_auth_optional = true;
        self
    }

    /// Verifies a peer's certificate chain for `usage` at `now`, returning
    /// its identity.
    pub fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, SvidError> {
        let cert =
            EndEntityCert::try_from(end_entity).map_err(|e| SvidError::Malformed(e.to_string()))?;
        let anchors = self.bundle.anchors();
        cert.verify_for_usage(
            self.algorithms.all,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| SvidError::Chain(e.to_string()))?;
        let id = check_leaf(end_entity, self.bundle.trust_domain())?;
        if let Some(expected) = &self.expected
            && *expected != id
        {
            return Err(SvidError::UnexpectedPeer {
                actual: id.to_string(),
                expected: expected.to_string(),
            });
        }
        Ok(id)
    }

    // Handshake signatures are checked the same way in both directions.
    fn tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    /// A shareable client-side (server certificate) verifier.
    pub fn into_server_verifier(self) -> Arc<dyn ServerCertVerifier> {
        Arc::new(self)
    }

    /// A shareable server-side (client certificate) verifier.
    pub fn into_client_verifier(self) -> Arc<dyn ClientCertVerifier> {
        Arc::new(self)
    }
}

fn tls_error(error: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(error),
    )))
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify_peer(end_entity, intermediates, now, KeyUsage::server_auth())
            .map(|_| ServerCertVerified::assertion())
            .map_err(tls_error)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.root_names
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.client_auth_optional
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify_peer(end_entity, intermediates, now, KeyUsage::client_auth())
            .map(|_| ClientCertVerified::assertion())
            .map_err(tls_error)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
