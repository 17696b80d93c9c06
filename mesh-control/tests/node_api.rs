//! The node API (gRPC over TLS on loopback) against a SQLite store and the
//! real CA: who may obtain which certificate.

use std::sync::Arc;

use mesh_api::v1::{
    CertificateResponse, CreateCertificateRequest, JoinNodeRequest, identity_client::IdentityClient,
};
use mesh_control::{
    ca::{CaFiles, Identity},
    grpc::{self, GrpcConfig, RateLimit},
    store::Store,
};
use mesh_identity::{SpiffeVerifier, TrustBundle, components};
use mesh_model::parse_documents;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use time::OffsetDateTime;
use tonic::{Code, Request, transport::Channel};

const TD: &str = "cluster.local";

struct Server {
    addr: String,
    store: Store,
    identity: Arc<Identity>,
    bundle: TrustBundle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

const WORKLOADS: &str = r#"
apiVersion: mesh.io/v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: frontend-1, namespace: shop}
spec: {node: node1, ip: 10.89.0.2, service_account: frontend}
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: reviews-1, namespace: shop}
spec: {node: node2, ip: 10.89.1.2, service_account: reviews}
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: ratings-1, namespace: shop}
spec: {node: ip-10-0-1-20.ec2.internal, ip: 10.89.2.2, service_account: ratings.v1}
"#;

async fn start(limit: RateLimit) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("mesh.db").display());
    let store = Store::open(&url).await.unwrap();
    store
        .apply(&parse_documents(WORKLOADS).unwrap())
        .await
        .unwrap();
    let files = CaFiles::in_data_dir(&dir.path().join("control"));
    files.create(TD).unwrap();
    let (ca, kek) = files.load().unwrap();
    let bundle = ca.bundle();
    let identity = Arc::new(Identity::new(ca, kek).with_files(files));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(grpc::serve(
        listener,
        store.clone(),
        identity.clone(),
        GrpcConfig {
            csr_limit: limit,
            ..GrpcConfig::default()
        },
        async move {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        store,
        identity,
        bundle,
        stop: Some(stop),
        _dir: dir,
    }
}

/// A key and a CSR for it.
struct Key {
    key: KeyPair,
    csr_pem: String,
}

fn key() -> Key {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr_pem = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    Key { key, csr_pem }
}

impl Server {
    fn tls(&self, client_cert: Option<(&CertificateResponse, &Key)>) -> Arc<rustls::ClientConfig> {
        self.tls_trusting(self.bundle.clone(), client_cert)
    }

    /// A client that recognises the control plane by `bundle`.
    fn tls_trusting(
        &self,
        bundle: TrustBundle,
        client_cert: Option<(&CertificateResponse, &Key)>,
    ) -> Arc<rustls::ClientConfig> {
        let verifier = SpiffeVerifier::new(bundle)
            .expecting(components::control_plane(TD))
            .into_server_verifier();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier);
        let config = match client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from(cert.certificate_der.clone())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.key.serialize_der())),
                )
                .unwrap(),
        };
        Arc::new(config)
    }

    fn client(&self, tls: Arc<rustls::ClientConfig>) -> IdentityClient<Channel> {
        IdentityClient::new(mesh_api::channel::lazy(&self.addr, move || tls.clone()).unwrap())
    }

    async fn token(&self, node: Option<&str>) -> String {
        self.store
            .create_bootstrap_token(
                node,
                "test",
                time::Duration::hours(1),
                OffsetDateTime::now_utc(),
            )
            .await
            .unwrap()
            .token
    }

    /// Joins as `node` with a fresh bootstrap token.
    async fn join(&self, node: &str) -> (CertificateResponse, Key) {
        let key = key();
        let token = self.token(None).await;
        let response = self
            .client(self.tls(None))
            .join_node(with_token(
                JoinNodeRequest {
                    node: node.into(),
                    csr_pem: key.csr_pem.clone(),
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        (response, key)
    }
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        mesh_api::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    request
}

fn workload(namespace: &str, name: &str) -> CreateCertificateRequest {
    CreateCertificateRequest {
        namespace: namespace.into(),
        workload: name.into(),
        csr_pem: key().csr_pem,
    }
}

/// Verifies a response's certificate with the mesh's bundle, returning its
/// identity.
fn verified(server: &Server, response: &CertificateResponse) -> String {
    SpiffeVerifier::new(server.bundle.clone())
        .verify_peer(
            &CertificateDer::from(response.certificate_der.clone()),
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_node_joins_with_a_token_and_gets_its_own_workloads_certificates() {
    let server = start(RateLimit::default()).await;
    let (node_cert, node_key) = server.join("node1").await;
    assert_eq!(
        verified(&server, &node_cert),
        "spiffe://cluster.local/ns/mesh-system/sa/node-node1"
    );
    assert_eq!(node_cert.spiffe_id, verified(&server, &node_cert));
    assert_eq!(node_cert.trust_bundle_der.len(), 1);

    let mut node1 = server.client(server.tls(Some((&node_cert, &node_key))));
    let issued = node1
        .create_certificate(workload("shop", "frontend-1"))
        .await
        .unwrap()
        .into_inner();
    // The identity comes from the workload's record.
    assert_eq!(
        verified(&server, &issued),
        "spiffe://cluster.local/ns/shop/sa/frontend"
    );

    // Renewal of the node's own certificate, with that certificate.
    let renewed = node1
        .join_node(JoinNodeRequest {
            node: "node1".into(),
            csr_pem: key().csr_pem,
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(renewed.serial, node_cert.serial);

    // Everything issued is recorded, with the node that asked.
    let records = server.store.certificates(None).await.unwrap();
    let serials: Vec<(&str, Option<&str>)> = records
        .iter()
        .filter(|r| r.node.is_some())
        .map(|r| (r.service_name.as_str(), r.node.as_deref()))
        .collect();
    assert_eq!(
        serials,
        [
            ("node/node1", Some("node1")),
            ("node/node1", Some("node1")),
            ("shop/frontend-1", Some("node1")),
        ]
    );
    assert!(records.iter().all(|r| r.private_key.is_empty()));
}

/// Kubernetes names nodes, and service accounts, with DNS subdomains.
#[tokio::test]
async fn a_node_named_as_on_eks_joins_and_gets_its_workloads_certificate() {
    let server = start(RateLimit::default()).await;
    let (node_cert, node_key) = server.join("ip-10-0-1-20.ec2.internal").await;
    assert_eq!(
        verified(&server, &node_cert),
        "spiffe://cluster.local/ns/mesh-system/sa/node-ip-10-0-1-20.ec2.internal"
    );
    let mut node = server.client(server.tls(Some((&node_cert, &node_key))));
    let issued = node
        .create_certificate(workload("shop", "ratings-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        verified(&server, &issued),
        "spiffe://cluster.local/ns/shop/sa/ratings.v1"
    );
    // Another node's workload is still another node's.
    let status = node
        .create_certificate(workload("shop", "frontend-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn a_workload_on_another_node_is_permission_denied() {
    let server = start(RateLimit::default()).await;
    let (node_cert, node_key) = server.join("node1").await;
    let mut node1 = server.client(server.tls(Some((&node_cert, &node_key))));
    let before = server.store.certificates(None).await.unwrap().len();

    for (namespace, name) in [
        ("shop", "reviews-1"),
        ("shop", "missing"),
        ("other", "frontend-1"),
    ] {
        let status = node1
            .create_certificate(workload(namespace, name))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{namespace}/{name}: {status:?}"
        );
        // Missing and elsewhere read the same: no existence oracle.
        assert_eq!(
            status.message(),
            format!("workload {namespace}/{name} is not scheduled on node node1")
        );
    }
    // Nor may node1 take node2's certificate.
    let status = node1
        .join_node(JoinNodeRequest {
            node: "node2".into(),
            csr_pem: key().csr_pem,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(server.store.certificates(None).await.unwrap().len(), before);
}

#[tokio::test]
async fn callers_without_credentials_are_unauthenticated() {
    let server = start(RateLimit::default()).await;
    let mut anonymous = server.client(server.tls(None));
    let status = anonymous
        .create_certificate(workload("shop", "frontend-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let join = || JoinNodeRequest {
        node: "node1".into(),
        csr_pem: key().csr_pem,
    };
    let status = anonymous.join_node(join()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let token = server.token(None).await;
    let (id, _) = token.split_once('.').unwrap();
    for bad in [
        format!("{id}.{}", "0".repeat(32)),
        "0123456789ab.0123456789abcdef0123456789abcdef".to_owned(),
        "not-a-token".to_owned(),
        server.token(Some("node2")).await,
    ] {
        let status = anonymous
            .join_node(with_token(join(), &bad))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{bad}: {status:?}");
    }
    // An expired token.
    let expired = server
        .store
        .create_bootstrap_token(
            None,
            "expired",
            time::Duration::minutes(1),
            OffsetDateTime::now_utc() - time::Duration::minutes(2),
        )
        .await
        .unwrap()
        .token;
    let status = anonymous
        .join_node(with_token(join(), &expired))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // A revoked token stops working.
    let revoked = server.token(None).await;
    assert!(
        anonymous
            .join_node(with_token(join(), &revoked))
            .await
            .is_ok()
    );
    let (id, _) = revoked.split_once('.').unwrap();
    assert!(server.store.delete_bootstrap_token(id).await.unwrap());
    let status = anonymous
        .join_node(with_token(join(), &revoked))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_workload_certificate_is_not_a_node_certificate() {
    let server = start(RateLimit::default()).await;
    let (node_cert, node_key) = server.join("node1").await;
    let mut node1 = server.client(server.tls(Some((&node_cert, &node_key))));
    let workload_key = key();
    let frontend = node1
        .create_certificate(CreateCertificateRequest {
            namespace: "shop".into(),
            workload: "frontend-1".into(),
            csr_pem: workload_key.csr_pem.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut as_workload = server.client(server.tls(Some((&frontend, &workload_key))));
    let status = as_workload
        .create_certificate(workload("shop", "frontend-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

#[tokio::test]
async fn bad_requests_name_the_field() {
    let server = start(RateLimit::default()).await;
    let token = server.token(None).await;
    let mut anonymous = server.client(server.tls(None));
    let status = anonymous
        .join_node(with_token(
            JoinNodeRequest {
                node: "Node_1".into(),
                csr_pem: key().csr_pem,
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("node: "), "{status:?}");

    let status = anonymous
        .join_node(with_token(
            JoinNodeRequest {
                node: "node1".into(),
                csr_pem:
                    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                        .into(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("csr_pem: "), "{status:?}");
}

#[tokio::test]
async fn certificate_requests_are_rate_limited_per_node() {
    let server = start(RateLimit {
        burst: 3,
        per_second: 0.001,
    })
    .await;
    // The join takes one token of node1's bucket.
    let (node_cert, node_key) = server.join("node1").await;
    let mut node1 = server.client(server.tls(Some((&node_cert, &node_key))));
    for _ in 0..2 {
        node1
            .create_certificate(workload("shop", "frontend-1"))
            .await
            .unwrap();
    }
    let status = node1
        .create_certificate(workload("shop", "frontend-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("retry in"), "{status:?}");
    // Another node is not held back by node1.
    server.join("node2").await;
}

fn bundle_of(response: &CertificateResponse) -> TrustBundle {
    let roots = response
        .trust_bundle_der
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    TrustBundle::new(TD, roots).unwrap()
}

#[tokio::test]
async fn nodes_keep_working_through_a_root_rotation() {
    let server = start(RateLimit::default()).await;
    let (node_cert, node_key) = server.join("node1").await;
    assert_eq!(node_cert.trust_bundle_der.len(), 1);

    // Stage: the next certificate brings the new root along.
    server
        .identity
        .stage_root(OffsetDateTime::now_utc())
        .await
        .unwrap();
    let mut node1 = server.client(server.tls(Some((&node_cert, &node_key))));
    let renewed_key = key();
    let renewed = node1
        .join_node(JoinNodeRequest {
            node: "node1".into(),
            csr_pem: renewed_key.csr_pem.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let both = bundle_of(&renewed);
    assert_eq!(both.roots().len(), 2);

    // Activate: the control plane re-issues its own certificate from the
    // new root. A node that never saw the new root cannot verify it; one
    // that renewed since staging can.
    server
        .identity
        .activate_staged(OffsetDateTime::now_utc(), true)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut stale = server.client(server.tls(Some((&renewed, &renewed_key))));
        let status = stale
            .create_certificate(workload("shop", "frontend-1"))
            .await;
        if status.is_err() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the control plane still serves a certificate from the old root"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The node's certificate from the old root is still accepted, and what
    // it is issued now chains to the new root.
    let mut current = server.client(server.tls_trusting(both, Some((&renewed, &renewed_key))));
    let issued = current
        .create_certificate(workload("shop", "frontend-1"))
        .await
        .unwrap()
        .into_inner();
    let new_root_only = TrustBundle::new(
        TD,
        vec![CertificateDer::from(issued.trust_bundle_der[0].clone())],
    )
    .unwrap();
    assert!(
        SpiffeVerifier::new(new_root_only)
            .verify_peer(
                &CertificateDer::from(issued.certificate_der.clone()),
                &[],
                UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .is_ok()
    );
    assert_eq!(issued.trust_bundle_der.len(), 2);
}

/// TLS to the node API, then nothing more; the stream.
async fn handshaken(server: &Server) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("mesh-control").unwrap();
    tokio_rustls::TlsConnector::from(server.tls(None))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Reads until the server closes the stream, for at most 30 s.
async fn closed_by_server(stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) {
    use tokio::io::AsyncReadExt as _;
    let read = async {
        let mut buffer = [0; 1024];
        while let Ok(n) = stream.read(&mut buffer).await {
            if n == 0 {
                return;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .expect("the server kept the connection for 30 s");
}

#[tokio::test]
async fn a_client_that_stalls_after_the_tls_handshake_is_dropped_and_others_are_served() {
    use tokio::io::AsyncWriteExt as _;
    let server = start(RateLimit::default()).await;
    // Half the HTTP/2 preface, then silence: dropped at the handshake
    // deadline (10 s), not held.
    let mut stalled = handshaken(&server).await;
    stalled.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    stalled.flush().await.unwrap();
    let started = std::time::Instant::now();
    // Meanwhile a node joins.
    let (joined, _) = server.join("node1").await;
    assert!(!joined.certificate_der.is_empty());
    closed_by_server(&mut stalled).await;
    let held = started.elapsed();
    assert!(held >= std::time::Duration::from_secs(9), "{held:?}");

    // Not HTTP/2 at all: dropped at once.
    let mut confused = handshaken(&server).await;
    confused
        .write_all(b"GET / HTTP/1.1\r\nhost: mesh-control\r\n\r\n")
        .await
        .unwrap();
    confused.flush().await.unwrap();
    let started = std::time::Instant::now();
    closed_by_server(&mut confused).await;
    // Well before the 10 s deadline.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
