//! The node's certificate manager against the real mesh CA. Under paused
//! time: a day-long certificate is renewed at about 19.2 h, the old one is
//! kept through the overlap and then retired, a CA outage is ridden out on
//! the still-valid certificate and renewed at once when the CA is said to
//! be back, and an expiry during a long outage is reported. In real time:
//! mTLS connections over loopback keep succeeding while 12-second
//! certificates rotate under them. In memory: the tunnel configurations
//! settle on AES-128-GCM.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use mesh_identity::{CertificateAuthority, SpiffeId, SpiffeVerifier};
use mesh_node::identity::{
    CertManager, CertState, CertificateSource, Clock, Issued, RotationConfig,
};
use rustls::pki_types::UnixTime;
use tokio::{sync::watch, time::Instant};

const HOUR: Duration = Duration::from_secs(3600);

/// The real CA, reachable or not, issuing at the test's (paused) time.
struct TestCa {
    ca: CertificateAuthority,
    clock: Clock,
    down: AtomicBool,
    /// Bumped to say the CA is reachable again (the node's configuration
    /// stream does it when it reconnects).
    back: watch::Sender<u64>,
}

/// The CA as one workload's source of certificates.
struct Workload {
    ca: Arc<TestCa>,
    identity: SpiffeId,
}

impl CertificateSource for Workload {
    async fn issue(&self, csr_pem: &str) -> Result<Issued, String> {
        if self.ca.down.load(Ordering::SeqCst) {
            return Err("the control plane is unreachable".into());
        }
        let issued = self
            .ca
            .ca
            .issue_for_csr(csr_pem, &self.identity, self.ca.clock.now())
            .map_err(|e| e.to_string())?;
        Ok(Issued {
            identity: issued.spiffe_id,
            serial: issued.serial,
            cert: issued.der,
            not_before: issued.not_before,
            not_after: issued.not_after,
        })
    }

    fn reachable_again(&self) -> Option<watch::Receiver<u64>> {
        Some(self.ca.back.subscribe())
    }
}

fn workload(ca: &Arc<TestCa>, identity: SpiffeId) -> Arc<Workload> {
    Arc::new(Workload {
        ca: ca.clone(),
        identity,
    })
}

fn frontend() -> SpiffeId {
    SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").unwrap()
}

fn test_ca(clock: Clock, ttl: Duration) -> Arc<TestCa> {
    Arc::new(TestCa {
        ca: CertificateAuthority::generate("cluster.local", clock.now())
            .unwrap()
            .with_ttl(ttl)
            .unwrap(),
        clock,
        down: AtomicBool::new(false),
        back: watch::Sender::new(0),
    })
}

fn start() -> (Arc<TestCa>, CertManager, Clock, watch::Receiver<CertState>) {
    let clock = Clock::system();
    let ca = test_ca(clock, HOUR * 24);
    let manager = CertManager::start(
        "shop/frontend",
        workload(&ca, frontend()),
        RotationConfig::default(),
        clock,
    );
    let state = manager.subscribe();
    (ca, manager, clock, state)
}

async fn first_certificate(state: &mut watch::Receiver<CertState>) -> CertState {
    state
        .wait_for(|s| s.current.is_some())
        .await
        .unwrap()
        .clone()
}

fn serial(state: &CertState) -> Vec<u8> {
    state
        .current
        .as_ref()
        .map(|c| c.cert.to_vec())
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn renews_at_80_percent_and_keeps_the_old_one_through_the_overlap() {
    let (ca, manager, clock, mut state) = start();
    let start = Instant::now();
    let first = first_certificate(&mut state).await;
    let cert = first.current.clone().unwrap();
    // Valid, and verifiable with the mesh's trust bundle.
    let verified = SpiffeVerifier::new(ca.ca.bundle()).verify_peer(
        &cert.cert,
        &[],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
    );
    assert_eq!(verified.unwrap(), frontend());

    // 80 % +-1 % of the lifetime, counted from not_before. The lifetime is
    // 24 h plus the 5 min backdating, so that is 18.94 h to 19.42 h after
    // issuance.
    let lifetime = (cert.not_after - cert.not_before).unsigned_abs();
    assert_eq!(lifetime, HOUR * 24 + Duration::from_secs(300));
    let renewal = first.next_renewal.unwrap();
    let after_issue = (renewal - clock.now()).unsigned_abs();
    let backdate = (clock.now() - cert.not_before).unsigned_abs();
    let earliest = lifetime.mul_f64(0.79) - backdate;
    let latest = lifetime.mul_f64(0.81) - backdate;
    assert!(
        after_issue >= earliest && after_issue <= latest,
        "renewal {after_issue:?} after issuance, expected {earliest:?}..={latest:?}"
    );
    tokio::time::sleep_until(start + after_issue - Duration::from_secs(60)).await;
    assert_eq!(manager.state().rotations, 0, "renewed early");

    let renewed = state.wait_for(|s| s.rotations == 1).await.unwrap().clone();
    let renewed_at = Instant::now() - start;
    assert!(renewed_at >= after_issue && renewed_at < after_issue + Duration::from_secs(1));
    assert_ne!(serial(&renewed), serial(&first));
    // Both served during the overlap.
    assert_eq!(renewed.previous.as_ref().unwrap().cert, cert.cert);
    assert_eq!(manager.state().failures, 0);

    tokio::time::sleep(RotationConfig::default().overlap - Duration::from_secs(1)).await;
    assert!(
        manager.state().previous.is_some(),
        "retired before the overlap ended"
    );
    let retired = state
        .wait_for(|s| s.previous.is_none())
        .await
        .unwrap()
        .clone();
    assert_eq!(serial(&retired), serial(&renewed));

    // And again a day later.
    state.wait_for(|s| s.rotations == 2).await.unwrap();
    assert!(Instant::now() - start < HOUR * 40);
}

#[tokio::test(start_paused = true)]
async fn a_ca_outage_is_ridden_out_on_the_valid_certificate() {
    let (ca, manager, _clock, mut state) = start();
    let first = first_certificate(&mut state).await;
    ca.down.store(true, Ordering::SeqCst);

    // Past the renewal time: the CA refuses, the certificate is still served.
    state.wait_for(|s| s.failures >= 5).await.unwrap();
    let during = manager.state();
    assert_eq!(serial(&during), serial(&first));
    assert_eq!(
        during.last_error.as_deref(),
        Some("the control plane is unreachable")
    );
    assert!(!during.expired);
    // Backoff: an hour of outage costs dozens of attempts, not thousands.
    let failures_then = during.failures;
    tokio::time::sleep(HOUR).await;
    let failures = manager.state().failures - failures_then;
    assert!(
        (60..=600).contains(&failures),
        "{failures} attempts in an hour"
    );

    ca.down.store(false, Ordering::SeqCst);
    let recovered = state.wait_for(|s| s.rotations == 1).await.unwrap().clone();
    assert!(recovered.last_error.is_none());
    assert!(recovered.current.unwrap().not_after > first.current.unwrap().not_after);
}

#[tokio::test(start_paused = true)]
async fn a_renewal_backing_off_asks_again_within_a_second_when_the_ca_is_back() {
    let (ca, manager, _clock, mut state) = start();
    let first = first_certificate(&mut state).await;
    // Said while nothing failed: nothing to do, nothing asked.
    ca.back.send_modify(|n| *n += 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        (manager.state().failures, manager.state().rotations),
        (0, 0)
    );

    // Failing past the renewal point, six times: the next retry is up to
    // a minute away (the backoff doubles from 1 s to at most 60 s).
    ca.down.store(true, Ordering::SeqCst);
    state.wait_for(|s| s.failures >= 6).await.unwrap();
    ca.down.store(false, Ordering::SeqCst);
    let back = Instant::now();
    ca.back.send_modify(|n| *n += 1);
    let renewed = state.wait_for(|s| s.rotations == 1).await.unwrap().clone();
    // Within the first step of the backoff (1 s, jittered), not the
    // tens of seconds the sixth one would wait.
    assert!(
        Instant::now() - back <= Duration::from_secs(1),
        "renewed {:?} after the CA was back",
        Instant::now() - back
    );
    assert!(renewed.last_error.is_none());
    assert_ne!(serial(&renewed), serial(&first));
}

#[tokio::test(start_paused = true)]
async fn an_expiry_during_a_long_outage_is_reported_and_healed() {
    let (ca, _manager, clock, mut state) = start();
    let first = first_certificate(&mut state).await;
    ca.down.store(true, Ordering::SeqCst);
    let expired = state.wait_for(|s| s.expired).await.unwrap().clone();
    assert!(
        expired.current.is_none(),
        "an expired certificate is still offered"
    );
    assert!(clock.now() >= first.current.unwrap().not_after);

    ca.down.store(false, Ordering::SeqCst);
    let healed = state
        .wait_for(|s| s.current.is_some())
        .await
        .unwrap()
        .clone();
    assert!(!healed.expired);
}

fn reviews() -> SpiffeId {
    SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/reviews").unwrap()
}

/// An mTLS echo server on loopback: one thread per connection.
fn serve(config: Arc<rustls::ServerConfig>) -> std::net::SocketAddr {
    use std::io::{BufRead as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let config = config.clone();
            std::thread::spawn(move || {
                let connection = rustls::ServerConnection::new(config).unwrap();
                let mut tls = std::io::BufReader::new(rustls::StreamOwned::new(connection, stream));
                let mut line = String::new();
                if tls.read_line(&mut line).is_ok() {
                    let _ = tls.get_mut().write_all(line.as_bytes());
                    let _ = tls.get_mut().flush();
                }
            });
        }
    });
    addr
}

/// One connection: handshake, echo; returns the server's certificate.
fn round_trip(
    config: Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
) -> Result<Vec<u8>, String> {
    use std::io::{Read as _, Write as _};
    let stream = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let connection = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(connection, stream);
    tls.write_all(b"ping\n").map_err(|e| e.to_string())?;
    let mut reply = [0u8; 5];
    tls.read_exact(&mut reply).map_err(|e| e.to_string())?;
    if &reply != b"ping\n" {
        return Err("wrong echo".into());
    }
    let certs = tls
        .conn
        .peer_certificates()
        .ok_or("no server certificate")?;
    Ok(certs[0].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_keeps_working_across_two_rotations() {
    use mesh_node::identity::tls;
    let clock = Clock::system();
    let ca = test_ca(clock, Duration::from_secs(12));
    let config = RotationConfig {
        overlap: Duration::from_secs(3),
        ..RotationConfig::default()
    };
    let server = CertManager::start("shop/reviews", workload(&ca, reviews()), config, clock);
    let client = CertManager::start("shop/frontend", workload(&ca, frontend()), config, clock);
    let mut server_state = server.subscribe();
    let mut client_state = client.subscribe();
    first_certificate(&mut server_state).await;
    first_certificate(&mut client_state).await;
    let bundle = ca.ca.bundle();
    let addr = serve(tls::server_config(server.subscribe(), bundle.clone()).unwrap());
    let client_config = tls::client_config(client.subscribe(), bundle, reviews()).unwrap();

    let outcome = tokio::task::spawn_blocking(move || {
        // Connections one after another until both sides rotated twice;
        // bounded, in case rotation never comes.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut failures = Vec::new();
        let mut server_certs = std::collections::BTreeSet::new();
        let mut attempts = 0;
        while std::time::Instant::now() < deadline {
            // Read before connecting: the last connection is made after
            // both sides' second rotation.
            let rotated =
                server_state.borrow().rotations >= 2 && client_state.borrow().rotations >= 2;
            attempts += 1;
            match round_trip(client_config.clone(), addr) {
                Ok(cert) => {
                    server_certs.insert(cert);
                }
                Err(error) => failures.push(error),
            }
            if rotated {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (attempts, failures, server_certs.len())
    })
    .await
    .unwrap();
    let (attempts, failures, distinct) = outcome;
    assert!(
        server.state().rotations >= 2 && client.state().rotations >= 2,
        "no two rotations within a minute"
    );
    assert_eq!(
        failures,
        Vec::<String>::new(),
        "{} of {attempts} connections failed",
        failures.len()
    );
    assert!(
        distinct >= 3,
        "the server presented {distinct} certificates over {attempts} connections"
    );
}

/// Drives a handshake between two in-memory connections to its end.
fn handshake(
    client: &mut rustls::ClientConnection,
    server: &mut rustls::ServerConnection,
) -> Result<(), rustls::Error> {
    while client.is_handshaking() || server.is_handshaking() {
        let moved = deliver(&mut **client, &mut **server)? | deliver(&mut **server, &mut **client)?;
        assert!(moved, "the handshake stalled");
    }
    Ok(())
}

/// Whatever `from` has to send, read and processed by `to`; whether there
/// was any.
fn deliver<A, B>(
    from: &mut rustls::ConnectionCommon<A>,
    to: &mut rustls::ConnectionCommon<B>,
) -> Result<bool, rustls::Error> {
    let mut moved = false;
    while from.wants_write() {
        let mut wire = Vec::new();
        from.write_tls(&mut wire).unwrap();
        to.read_tls(&mut wire.as_slice()).unwrap();
        to.process_new_packets()?;
        moved = true;
    }
    Ok(moved)
}

#[tokio::test]
async fn tunnels_settle_on_aes_128_gcm_and_accept_a_peer_preferring_aes_256() {
    use mesh_node::identity::tls;
    let clock = Clock::system();
    let ca = test_ca(clock, HOUR);
    let server = CertManager::start(
        "shop/reviews",
        workload(&ca, reviews()),
        RotationConfig::default(),
        clock,
    );
    let client = CertManager::start(
        "shop/frontend",
        workload(&ca, frontend()),
        RotationConfig::default(),
        clock,
    );
    first_certificate(&mut server.subscribe()).await;
    first_certificate(&mut client.subscribe()).await;
    let bundle = ca.ca.bundle();
    let server_config = tls::server_config(server.subscribe(), bundle.clone()).unwrap();
    let client_config = tls::client_config(client.subscribe(), bundle.clone(), reviews()).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();

    let mut ours = rustls::ClientConnection::new(client_config.clone(), name.clone()).unwrap();
    let mut accepted = rustls::ServerConnection::new(server_config.clone()).unwrap();
    handshake(&mut ours, &mut accepted).unwrap();
    for suite in [
        ours.negotiated_cipher_suite(),
        accepted.negotiated_cipher_suite(),
    ] {
        assert_eq!(
            suite.map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }

    // A client on the library's default order (AES-256-GCM first) gets
    // what it asks for: the server follows the client's order.
    let theirs = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(
        SpiffeVerifier::new(bundle)
            .expecting(reviews())
            .into_server_verifier(),
    )
    .with_client_cert_resolver(client_config.client_auth_cert_resolver.clone());
    let mut other = rustls::ClientConnection::new(Arc::new(theirs), name).unwrap();
    let mut accepted = rustls::ServerConnection::new(server_config).unwrap();
    handshake(&mut other, &mut accepted).unwrap();
    assert_eq!(
        accepted.negotiated_cipher_suite().map(|s| s.suite()),
        Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)
    );
}
