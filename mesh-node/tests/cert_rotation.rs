//! The node's certificate manager against the real mesh CA, under paused
//! time: a day-long certificate is renewed at about 19.2 h, the old one is
//! kept through the overlap and then retired, a CA outage is ridden out on
//! the still-valid certificate, and an expiry during a long outage is
//! reported.

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
}

impl CertificateSource for TestCa {
    async fn issue(&self, identity: &SpiffeId, csr_pem: &str) -> Result<Issued, String> {
        if self.down.load(Ordering::SeqCst) {
            return Err("the control plane is unreachable".into());
        }
        let issued = self
            .ca
            .issue_for_csr(csr_pem, identity, self.clock.now())
            .map_err(|e| e.to_string())?;
        Ok(Issued {
            cert: issued.der,
            not_before: issued.not_before,
            not_after: issued.not_after,
        })
    }
}

fn frontend() -> SpiffeId {
    SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").unwrap()
}

fn start() -> (Arc<TestCa>, CertManager, Clock, watch::Receiver<CertState>) {
    let clock = Clock::system();
    let ca = Arc::new(TestCa {
        ca: CertificateAuthority::generate("cluster.local", clock.now()).unwrap(),
        clock,
        down: AtomicBool::new(false),
    });
    let manager = CertManager::start(frontend(), ca.clone(), RotationConfig::default(), clock);
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

    // 80 % of 24 h 5 min (5 min backdated), +-1 % jitter: 19.04 h to 19.52 h
    // after issuance.
    let renewal = first.next_renewal.unwrap();
    let after_issue = (renewal - clock.now()).unsigned_abs();
    assert!(
        after_issue > HOUR.mul_f64(19.0) && after_issue < HOUR.mul_f64(19.6),
        "renewal {after_issue:?} after issuance"
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
