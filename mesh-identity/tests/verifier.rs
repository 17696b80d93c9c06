//! The strict SPIFFE verifier against certificates made on the fly, and the
//! CA's issued certificates through a real rustls handshake.

use std::{sync::Arc, time::Duration};

use mesh_identity::{CertificateAuthority, SpiffeId, SpiffeVerifier, SvidError, TrustBundle};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use time::OffsetDateTime;
use webpki::KeyUsage;

const TD: &str = "cluster.local";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}/ns/{ns}/sa/{sa}")).unwrap()
}

/// A root that can sign test leaves with arbitrary, even broken, profiles.
struct TestRoot {
    params: CertificateParams,
    key: KeyPair,
    der: CertificateDer<'static>,
}

impl TestRoot {
    fn new() -> Self {
        static ROOTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let n = ROOTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("test root {n}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let der = params.self_signed(&key).unwrap().der().clone();
        Self { params, key, der }
    }

    fn bundle(&self) -> TrustBundle {
        TrustBundle::new(TD, vec![self.der.clone()]).unwrap()
    }

    /// A leaf with these SANs; `tweak` may break anything else.
    fn leaf(
        &self,
        sans: &[SanType],
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans.to_vec();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        tweak(&mut params);
        let issuer = Issuer::from_params(&self.params, &self.key);
        params
            .signed_by(&KeyPair::generate().unwrap(), &issuer)
            .unwrap()
            .der()
            .clone()
    }
}

fn uri(value: &str) -> SanType {
    SanType::URI(value.to_owned().try_into().unwrap())
}

fn dns(value: &str) -> SanType {
    SanType::DnsName(value.to_owned().try_into().unwrap())
}

fn now() -> UnixTime {
    UnixTime::now()
}

fn verify(bundle: TrustBundle, cert: &CertificateDer<'_>) -> Result<SpiffeId, SvidError> {
    SpiffeVerifier::new(bundle).verify_peer(cert, &[], now(), KeyUsage::client_auth())
}

#[test]
fn a_valid_svid_is_accepted_with_its_identity() {
    let root = TestRoot::new();
    let cert = root.leaf(&[uri("spiffe://cluster.local/ns/shop/sa/frontend")], |_| {});
    assert_eq!(
        verify(root.bundle(), &cert).unwrap(),
        id("shop", "frontend")
    );
    // Other SAN types beside the one URI are allowed by the spec.
    let cert = root.leaf(
        &[
            uri("spiffe://cluster.local/ns/shop/sa/frontend"),
            dns("frontend.shop"),
        ],
        |_| {},
    );
    assert_eq!(
        verify(root.bundle(), &cert).unwrap(),
        id("shop", "frontend")
    );
}

#[test]
fn san_problems_are_refused() {
    let root = TestRoot::new();
    let cases: [(&[SanType], SvidError); 6] = [
        (&[], SvidError::NoUriSan),
        (
            &[dns("frontend.shop.svc.cluster.local")],
            SvidError::NoUriSan,
        ),
        (&[dns("*.cluster.local")], SvidError::NoUriSan),
        (
            &[
                uri("spiffe://cluster.local/ns/shop/sa/a"),
                uri("spiffe://cluster.local/ns/shop/sa/b"),
            ],
            SvidError::MultipleUriSans(2),
        ),
        (
            &[uri("spiffe://evil.example/ns/shop/sa/frontend")],
            SvidError::WrongTrustDomain {
                id: "spiffe://evil.example/ns/shop/sa/frontend".into(),
                actual: "evil.example".into(),
                expected: TD.into(),
            },
        ),
        (
            &[uri("https://cluster.local/ns/shop/sa/frontend")],
            SvidError::BadSpiffeId(String::new()),
        ),
    ];
    for (sans, expected) in cases {
        let cert = root.leaf(sans, |_| {});
        let error = verify(root.bundle(), &cert).unwrap_err();
        match expected {
            SvidError::BadSpiffeId(_) => assert!(
                matches!(error, SvidError::BadSpiffeId(_)),
                "{sans:?}: {error}"
            ),
            expected => assert_eq!(error, expected, "{sans:?}"),
        }
    }
    let wildcard = root.leaf(&[uri("spiffe://cluster.local/ns/*/sa/frontend")], |_| {});
    assert!(matches!(
        verify(root.bundle(), &wildcard),
        Err(SvidError::BadSpiffeId(_))
    ));
}

#[test]
fn a_leaf_that_is_a_ca_or_can_sign_is_refused() {
    let root = TestRoot::new();
    let san = [uri("spiffe://cluster.local/ns/shop/sa/frontend")];
    let ca_leaf = root.leaf(&san, |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
    });
    let error = verify(root.bundle(), &ca_leaf).unwrap_err();
    // webpki refuses a CA as end entity before the profile check would.
    assert!(
        error == SvidError::LeafIsCa
            || matches!(&error, SvidError::Chain(e) if e.contains("CaUsedAsEndEntity")),
        "{error}"
    );
    let signer = root.leaf(&san, |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign));
    assert_eq!(
        verify(root.bundle(), &signer).unwrap_err(),
        SvidError::LeafCanSign
    );
}

#[test]
fn unknown_roots_and_validity_windows_are_enforced() {
    let root = TestRoot::new();
    let stranger = TestRoot::new();
    let san = [uri("spiffe://cluster.local/ns/shop/sa/frontend")];
    let cert = stranger.leaf(&san, |_| {});
    let error = verify(root.bundle(), &cert).unwrap_err();
    assert!(
        matches!(&error, SvidError::Chain(e) if e.contains("UnknownIssuer")),
        "{error}"
    );

    let expired = root.leaf(&san, |p| {
        p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(7200);
        p.not_after = OffsetDateTime::now_utc() - Duration::from_secs(60);
    });
    let error = verify(root.bundle(), &expired).unwrap_err();
    assert!(
        matches!(&error, SvidError::Chain(e) if e.contains("CertExpired")),
        "{error}"
    );

    let early = root.leaf(&san, |p| {
        p.not_before = OffsetDateTime::now_utc() + Duration::from_secs(3600);
        p.not_after = OffsetDateTime::now_utc() + Duration::from_secs(7200);
    });
    let error = verify(root.bundle(), &early).unwrap_err();
    assert!(
        matches!(&error, SvidError::Chain(e) if e.contains("CertNotValidYet")),
        "{error}"
    );
}

#[test]
fn during_root_rotation_both_roots_are_trusted() {
    let old = TestRoot::new();
    let new = TestRoot::new();
    let san = [uri("spiffe://cluster.local/ns/shop/sa/frontend")];
    let from_old = old.leaf(&san, |_| {});
    let from_new = new.leaf(&san, |_| {});
    let both = TrustBundle::new(TD, vec![old.der.clone(), new.der.clone()]).unwrap();
    assert!(verify(both.clone(), &from_old).is_ok());
    assert!(verify(both, &from_new).is_ok());
    // Once the old root is retired, its certificates are refused.
    assert!(verify(new.bundle(), &from_old).is_err());
}

#[test]
fn an_expected_peer_must_match() {
    let root = TestRoot::new();
    let cert = root.leaf(&[uri("spiffe://cluster.local/ns/shop/sa/frontend")], |_| {});
    let verifier = SpiffeVerifier::new(root.bundle()).expecting(id("shop", "reviews"));
    let error = verifier
        .verify_peer(&cert, &[], now(), KeyUsage::server_auth())
        .unwrap_err();
    assert_eq!(
        error,
        SvidError::UnexpectedPeer {
            actual: "spiffe://cluster.local/ns/shop/sa/frontend".into(),
            expected: "spiffe://cluster.local/ns/shop/sa/reviews".into(),
        }
    );
}

fn csr(key: &KeyPair, sans: Vec<String>) -> String {
    CertificateParams::new(sans)
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

#[test]
fn the_ca_issues_the_svid_profile_from_a_csr() {
    let t0 = OffsetDateTime::now_utc();
    let ca = CertificateAuthority::generate(TD, t0).unwrap();
    let key = KeyPair::generate().unwrap();
    // The CSR asks for another identity: the CA certifies the authorised one.
    let request = csr(&key, vec!["admin.example".into()]);
    let issued = ca
        .issue_for_csr(&request, &id("shop", "frontend"), t0)
        .unwrap();
    assert_eq!(issued.spiffe_id, id("shop", "frontend"));
    assert_eq!(issued.serial.len(), 32, "{}", issued.serial);
    assert_eq!(issued.not_after - t0, time::Duration::hours(24));
    assert_eq!(t0 - issued.not_before, time::Duration::minutes(5));

    let verified = SpiffeVerifier::new(ca.bundle())
        .verify_peer(&issued.der, &[], now(), KeyUsage::server_auth())
        .unwrap();
    assert_eq!(verified, id("shop", "frontend"));
    let (_, parsed) = x509_parser::parse_x509_certificate(&issued.der).unwrap();
    let san = parsed.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names.len(),
        1,
        "only the SPIFFE ID: {:?}",
        san.value.general_names
    );
    assert!(!parsed.basic_constraints().unwrap().unwrap().value.ca);
    let eku = parsed.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);

    // Serials are random: a second certificate for the same identity differs.
    let again = ca
        .issue_for_csr(&request, &id("shop", "frontend"), t0)
        .unwrap();
    assert_ne!(again.serial, issued.serial);
}

#[test]
fn the_ca_refuses_foreign_identities_bad_csrs_and_other_keys() {
    let t0 = OffsetDateTime::now_utc();
    let ca = CertificateAuthority::generate(TD, t0).unwrap();
    let key = KeyPair::generate().unwrap();
    let foreign = SpiffeId::parse("spiffe://other.domain/ns/a/sa/b").unwrap();
    assert!(ca.issue_for_csr(&csr(&key, vec![]), &foreign, t0).is_err());
    let mut tampered = csr(&key, vec![]);
    tampered.replace_range(70..74, "AAAA");
    assert!(ca.issue_for_csr(&tampered, &id("a", "b"), t0).is_err());
    let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let error = ca
        .issue_for_csr(&csr(&ed25519, vec![]), &id("a", "b"), t0)
        .unwrap_err();
    assert!(error.to_string().contains("ECDSA P-256"), "{error}");
    assert!(ca.with_ttl(Duration::from_secs(1)).is_err());
}

#[test]
fn the_ca_round_trips_through_pem_and_server_side_keys_work() {
    let t0 = OffsetDateTime::now_utc();
    let ca = CertificateAuthority::generate(TD, t0).unwrap();
    let reloaded = CertificateAuthority::from_pem(TD, ca.root_pem(), &ca.key_pem()).unwrap();
    let (cert, key_pem) = reloaded.issue_with_key(&id("edge", "gateway"), t0).unwrap();
    assert!(key_pem.contains("PRIVATE KEY"));
    assert!(
        SpiffeVerifier::new(ca.bundle())
            .verify_peer(&cert.der, &[], now(), KeyUsage::client_auth())
            .is_ok()
    );
    // A key that is not the root's is refused.
    let other = CertificateAuthority::generate(TD, t0).unwrap();
    assert!(CertificateAuthority::from_pem(TD, ca.root_pem(), &other.key_pem()).is_err());
}

#[test]
fn a_ca_after_root_rotation_still_trusts_the_old_root_without_signing_with_it() {
    let t0 = OffsetDateTime::now_utc();
    let old = CertificateAuthority::generate(TD, t0).unwrap();
    let (from_old, _) = old.issue_with_key(&id("shop", "frontend"), t0).unwrap();
    let new = CertificateAuthority::generate(TD, t0)
        .unwrap()
        // The signing root listed again is not duplicated.
        .with_trusted_pem(&format!(
            "{}{}",
            old.root_pem(),
            CertificateAuthority::generate(TD, t0).unwrap().root_pem()
        ))
        .unwrap()
        .with_trusted_pem(old.root_pem())
        .unwrap();
    assert_eq!(new.trusted().len(), 2);
    assert_eq!(new.bundle().roots()[0], *new.root_der());
    let (from_new, _) = new.issue_with_key(&id("shop", "frontend"), t0).unwrap();
    for cert in [&from_old, &from_new] {
        assert!(
            SpiffeVerifier::new(new.bundle())
                .verify_peer(&cert.der, &[], now(), KeyUsage::client_auth())
                .is_ok()
        );
    }
    // New certificates chain to the new root only.
    assert!(
        SpiffeVerifier::new(old.bundle())
            .verify_peer(&from_new.der, &[], now(), KeyUsage::client_auth())
            .is_err()
    );
    assert!(new.with_trusted_pem("not a certificate").is_err());
}

/// Runs a TLS handshake between two in-memory connections.
fn handshake(
    client: &mut rustls::ClientConnection,
    server: &mut rustls::ServerConnection,
) -> Result<(), rustls::Error> {
    let mut buf = Vec::new();
    for _ in 0..10 {
        buf.clear();
        client.write_tls(&mut buf).unwrap();
        if !buf.is_empty() {
            server.read_tls(&mut &buf[..]).unwrap();
            server.process_new_packets()?;
        }
        buf.clear();
        server.write_tls(&mut buf).unwrap();
        if !buf.is_empty() {
            client.read_tls(&mut &buf[..]).unwrap();
            client.process_new_packets()?;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("the handshake did not finish")
}

fn workload(
    ca: &CertificateAuthority,
    who: &SpiffeId,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let issued = ca
        .issue_for_csr(&csr(&key, vec![]), who, OffsetDateTime::now_utc())
        .unwrap();
    (
        vec![issued.der],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// A TLS 1.3 handshake: the client holds a certificate from `client.0`,
/// the server from `server.0`; both trust `trust`'s root; the client
/// expects the server to be `expect`.
fn mtls(
    trust: &CertificateAuthority,
    client: (&CertificateAuthority, &SpiffeId),
    server: (&CertificateAuthority, &SpiffeId),
    expect: &SpiffeId,
) -> Result<(), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (server_chain, server_key) = workload(server.0, server.1);
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(SpiffeVerifier::new(trust.bundle()).into_client_verifier())
        .with_single_cert(server_chain, server_key)
        .unwrap();
    let (client_chain, client_key) = workload(client.0, client.1);
    let verifier = SpiffeVerifier::new(trust.bundle()).expecting(expect.clone());
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier.into_server_verifier())
        .with_client_auth_cert(client_chain, client_key)
        .unwrap();
    // Pods are dialled by address; the identity check replaces the name check.
    let name = rustls::pki_types::ServerName::try_from("10.89.1.2").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(client_config), name).unwrap();
    let mut server = rustls::ServerConnection::new(Arc::new(server_config)).unwrap();
    handshake(&mut client, &mut server)
}

#[test]
fn mutual_tls_with_issued_certificates() {
    let ca = CertificateAuthority::generate(TD, OffsetDateTime::now_utc()).unwrap();
    let frontend = id("shop", "frontend");
    let reviews = id("shop", "reviews");
    mtls(&ca, (&ca, &frontend), (&ca, &reviews), &reviews).unwrap();
    // The client dials reviews but meets ratings: refused by the client.
    let error = mtls(
        &ca,
        (&ca, &frontend),
        (&ca, &id("shop", "ratings")),
        &reviews,
    )
    .unwrap_err();
    assert!(error.to_string().contains("UnexpectedPeer"), "{error}");
    // A client certified by another mesh's CA: refused by the server.
    let stranger = CertificateAuthority::generate(TD, OffsetDateTime::now_utc()).unwrap();
    assert!(mtls(&ca, (&stranger, &frontend), (&ca, &reviews), &reviews).is_err());
}
