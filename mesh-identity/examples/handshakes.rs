//! Benchmark: full TLS 1.3 mTLS handshakes per second with mesh
//! certificates and the strict SPIFFE verifier, both ends in one thread
//! (so one core does the client's and the server's work). Run by
//! `cargo xtask bench handshakes`; prints one JSON line.
//!
//! Usage: handshakes [COUNT]

use std::{sync::Arc, time::Instant};

use mesh_identity::{CertificateAuthority, SpiffeId, SpiffeVerifier};
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use time::OffsetDateTime;

fn workload(
    ca: &CertificateAuthority,
    who: &SpiffeId,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().expect("key");
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let issued = ca
        .issue_for_csr(&csr, who, OffsetDateTime::now_utc())
        .expect("issue");
    (
        vec![issued.der],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

fn main() {
    let count: u32 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let ca =
        CertificateAuthority::generate("cluster.local", OffsetDateTime::now_utc()).expect("ca");
    let client_id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").expect("id");
    let server_id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/reviews").expect("id");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (server_chain, server_key) = workload(&ca, &server_id);
    let mut server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_client_cert_verifier(SpiffeVerifier::new(ca.bundle()).into_client_verifier())
        .with_single_cert(server_chain, server_key)
        .expect("server config");
    server_config.send_tls13_tickets = 0;
    let (client_chain, client_key) = workload(&ca, &client_id);
    let mut client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(
            SpiffeVerifier::new(ca.bundle())
                .expecting(server_id)
                .into_server_verifier(),
        )
        .with_client_auth_cert(client_chain, client_key)
        .expect("client config");
    client_config.resumption = rustls::client::Resumption::disabled();
    let (server_config, client_config) = (Arc::new(server_config), Arc::new(client_config));
    let name = ServerName::try_from("10.89.1.2").expect("name");

    let mut buf = Vec::with_capacity(16 * 1024);
    let start = Instant::now();
    for _ in 0..count {
        let mut client =
            rustls::ClientConnection::new(client_config.clone(), name.clone()).expect("client");
        let mut server = rustls::ServerConnection::new(server_config.clone()).expect("server");
        while client.is_handshaking() || server.is_handshaking() {
            buf.clear();
            client.write_tls(&mut buf).expect("write");
            if !buf.is_empty() {
                server.read_tls(&mut &buf[..]).expect("read");
                server.process_new_packets().expect("server handshake");
            }
            buf.clear();
            server.write_tls(&mut buf).expect("write");
            if !buf.is_empty() {
                client.read_tls(&mut &buf[..]).expect("read");
                client.process_new_packets().expect("client handshake");
            }
        }
    }
    let elapsed = start.elapsed();
    let per_second = f64::from(count) / elapsed.as_secs_f64();
    println!(
        "{{\"handshakes\": {count}, \"seconds\": {:.3}, \"handshakes_per_second_one_core_both_ends\": {:.0}, \"microseconds_per_handshake\": {:.1}}}",
        elapsed.as_secs_f64(),
        per_second,
        1e6 / per_second
    );
}
