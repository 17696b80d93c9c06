//! The configuration push between a real control plane (gRPC over TLS on
//! loopback, real CA, SQLite or PostgreSQL) and the node's client: updates
//! arrive, removals too, an invalid push is rejected and the node keeps its
//! last good configuration, a node that missed 50 changes converges to
//! exactly what a fresh node gets, and with two replicas on one PostgreSQL
//! a change written through one reaches a node connected to the other as
//! it commits (LISTEN/NOTIFY), and a node's readiness reports mark its
//! endpoints for callers.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use mesh_control::{
    ca::{CaFiles, Identity},
    grpc::{self, GrpcConfig},
    store::{NodeConfigStatus, Store},
};
use mesh_identity::TrustBundle;
use mesh_model::{
    Kind,
    config::{ConfigResource, NodeConfig},
    parse_documents,
};
use mesh_node::{
    control::ControlPlane,
    identity::{CertManager, Clock, RotationConfig},
    xds::Xds,
};
use sqlx::Executor as _;
use tokio::sync::watch;

const BASE: &str = r#"
apiVersion: mesh.io/v1
kind: Namespace
metadata: {name: shop, labels: {mesh.io/capture: enabled}}
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: frontend-1, namespace: shop}
spec: {node: node1, ip: 10.89.0.2, service_account: frontend}
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: reviews-1, namespace: shop}
spec: {node: node2, ip: 10.89.1.2, service_account: reviews, services: [reviews]}
---
apiVersion: mesh.io/v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {ports: [{port: 9080, protocol: http}]}
"#;

/// Where the test nodes say their admin endpoint is.
const ADMIN: &str = "127.0.0.1:15000";

/// A control plane replica serving the node API.
struct Replica {
    addr: String,
    store: Store,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn replica(store: &Store, identity: &Arc<Identity>, name: &str) -> Replica {
    replica_polling(store, identity, name, Duration::from_millis(20)).await
}

/// A replica reading the store's revision every `poll`.
async fn replica_polling(
    store: &Store,
    identity: &Arc<Identity>,
    name: &str,
    poll: Duration,
) -> Replica {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(grpc::serve(
        listener,
        store.clone(),
        identity.clone(),
        GrpcConfig {
            poll,
            replica: name.to_owned(),
            ..GrpcConfig::default()
        },
        async move {
            let _ = stopped.await;
        },
    ));
    Replica {
        addr,
        store: store.clone(),
        _stop: stop,
    }
}

struct Mesh {
    store: Store,
    identity: Arc<Identity>,
    bundle: TrustBundle,
    _dir: tempfile::TempDir,
}

async fn mesh(store_url: Option<String>) -> Mesh {
    mesh_issuing(store_url, None).await
}

/// [`mesh`], its CA issuing certificates that live `ttl` when given.
async fn mesh_issuing(store_url: Option<String>, ttl: Option<Duration>) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let url = store_url
        .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", dir.path().join("mesh.db").display()));
    let store = Store::open(&url).await.unwrap();
    store.apply(&parse_documents(BASE).unwrap()).await.unwrap();
    let files = CaFiles::in_data_dir(&dir.path().join("control"));
    files.create("cluster.local").unwrap();
    let (mut ca, kek) = files.load().unwrap();
    if let Some(ttl) = ttl {
        ca = ca.with_ttl(ttl).unwrap();
    }
    let bundle = ca.bundle();
    Mesh {
        store,
        identity: Arc::new(Identity::new(ca, kek).with_files(files)),
        bundle,
        _dir: dir,
    }
}

/// A node joined to `replica`, following its configuration.
struct Node {
    xds: Xds,
    identity: CertManager,
}

impl Mesh {
    async fn node(&self, replica: &Replica, name: &str, initial: Option<Arc<NodeConfig>>) -> Node {
        let token = self
            .store
            .create_bootstrap_token(
                None,
                "test",
                time::Duration::hours(1),
                time::OffsetDateTime::now_utc(),
            )
            .await
            .unwrap()
            .token;
        let control =
            ControlPlane::new(&replica.addr, name, self.bundle.clone(), Some(token)).unwrap();
        control.set_admin_address(ADMIN.parse().unwrap());
        let identity = control.start_node_identity(RotationConfig::default(), Clock::system());
        let xds = match initial {
            Some(config) => Xds::resume(control, Vec::new(), config),
            None => Xds::start(control, Vec::new()),
        };
        Node { xds, identity }
    }

    async fn apply(&self, yaml: &str) -> i64 {
        self.store
            .apply(&parse_documents(yaml).unwrap())
            .await
            .unwrap()
            .revision
    }
}

/// Waits (bounded) until the node's configuration satisfies `done`.
async fn until(
    config: &mut watch::Receiver<Arc<NodeConfig>>,
    what: &str,
    done: impl FnMut(&Arc<NodeConfig>) -> bool,
) -> Arc<NodeConfig> {
    tokio::time::timeout(Duration::from_secs(20), config.wait_for(done))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap()
        .clone()
}

/// Waits (bounded) until the recorded state of `node` satisfies `done`:
/// the node answers after it swaps its configuration in, so the record
/// trails the node by a round trip.
async fn recorded(
    replica: &Replica,
    node: &str,
    mut done: impl FnMut(&NodeConfigStatus) -> bool,
) -> NodeConfigStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let nodes = replica.store.node_statuses().await.unwrap();
        if let Some(status) = nodes.iter().find(|s| s.node == node)
            && done(status)
        {
            return status.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the control plane never recorded that: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn names(config: &NodeConfig) -> Vec<&str> {
    config.resources.keys().map(String::as_str).collect()
}

#[tokio::test]
async fn updates_and_removals_reach_the_node_and_it_sees_only_its_part() {
    let mesh = mesh(None).await;
    let replica = replica(&mesh.store, &mesh.identity, "a").await;
    let node = mesh.node(&replica, "node1", None).await;
    let mut config = node.xds.config();

    let first = until(&mut config, "the first push", |c| c.revision > 0).await;
    assert_eq!(
        names(&first),
        [
            "address/shop/frontend-1",
            "address/shop/reviews-1",
            "endpoints/shop/reviews",
            "namespace/shop",
            "service/shop/reviews",
            "workload/shop/frontend-1",
        ],
        "node1 gets its own workload, not node2's (only every workload's address)"
    );
    let (_, reviews) = &first.resources["address/shop/reviews-1"];
    let ConfigResource::Address(reviews) = reviews.as_ref() else {
        panic!("{reviews:?}")
    };
    assert!(
        reviews.mesh,
        "reviews-1's namespace is captured: {reviews:?}"
    );
    assert_eq!(
        (reviews.node.as_str(), reviews.service_account.as_str()),
        ("node2", "reviews")
    );

    let revision = mesh
        .apply(
            "apiVersion: mesh.io/v1\nkind: TrafficSplit\nmetadata: {name: reviews, namespace: shop}\nspec: {destination: reviews, v1_weight: 90, v2_weight: 10}\n",
        )
        .await;
    let updated = until(&mut config, "the traffic split", |c| c.revision >= revision).await;
    assert!(updated.resources.contains_key("trafficsplit/shop/reviews"));

    // Another node's workload changing is not node1's business.
    let versions = updated.versions();
    mesh.apply(
        "apiVersion: mesh.io/v1\nkind: Namespace\nmetadata: {name: elsewhere}\n---\n\
         apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: other, namespace: elsewhere}\nspec: {node: node2, ip: 10.89.1.9}\n",
    )
    .await;

    // An endpoint taken out of rotation reaches the callers' node.
    let revision = mesh
        .store
        .set_endpoint_health("reviews.shop", "10.89.1.2".parse().unwrap(), 9080, false)
        .await
        .unwrap();
    let drained = until(&mut config, "the endpoint's health", |c| {
        c.revision >= revision
    })
    .await;
    let (_, endpoints) = &drained.resources["endpoints/shop/reviews"];
    let ConfigResource::Endpoints(set) = endpoints.as_ref() else {
        panic!("{endpoints:?}")
    };
    assert_eq!(set.endpoints.len(), 1);
    assert!(!set.endpoints[0].healthy, "{set:?}");

    let revision = mesh
        .store
        .delete(Kind::Service, Some("shop"), "reviews")
        .await
        .unwrap();
    let removed = until(&mut config, "the removal", |c| c.revision >= revision).await;
    assert!(!removed.resources.contains_key("service/shop/reviews"));
    assert!(!removed.resources.contains_key("endpoints/shop/reviews"));
    // Of another node's namespace, only its workload's address.
    let elsewhere: Vec<&str> = names(&removed)
        .into_iter()
        .filter(|n| n.contains("elsewhere"))
        .collect();
    assert_eq!(elsewhere, ["address/elsewhere/other"]);
    let (_, other) = &removed.resources["address/elsewhere/other"];
    assert!(
        matches!(other.as_ref(), ConfigResource::Address(a) if !a.mesh),
        "an uncaptured namespace's workload takes no tunnels: {other:?}"
    );
    assert_eq!(
        removed.versions().get("workload/shop/frontend-1"),
        versions.get("workload/shop/frontend-1")
    );
    let status = recorded(&replica, "node1", |s| s.synced_revision >= Some(revision)).await;
    assert_eq!(status.admin_address.as_deref(), Some(ADMIN));
}

#[tokio::test]
async fn a_renewed_node_certificate_moves_the_stream_before_the_old_one_expires() {
    // The CA's shortest life, 10 s, renewed at about 8 s: the second
    // renewal comes after the first certificate has expired.
    let mesh = mesh_issuing(None, Some(Duration::from_secs(10))).await;
    let replica = replica(&mesh.store, &mesh.identity, "a").await;
    let node = mesh.node(&replica, "node1", None).await;
    let mut config = node.xds.config();
    until(&mut config, "the first push", |c| c.revision > 0).await;

    let mut identity = node.identity.subscribe();
    tokio::time::timeout(
        Duration::from_secs(30),
        identity.wait_for(|s| s.rotations >= 2),
    )
    .await
    .expect("two renewals within 30 s")
    .unwrap();
    // The control plane cuts a stream when the certificate it was opened
    // with expires: the node moved it to each new certificate first.
    let status = node.xds.status().borrow().clone();
    assert_eq!(status.last_error, None, "{status:?}");
    assert_eq!(status.reconnects, 0, "{status:?}");
    let revision = mesh
        .apply(
            "apiVersion: mesh.io/v1\nkind: TrafficSplit\nmetadata: {name: reviews, namespace: shop}\nspec: {destination: reviews, v1_weight: 90, v2_weight: 10}\n",
        )
        .await;
    until(&mut config, "a change after the renewals", |c| {
        c.revision >= revision
    })
    .await;
    recorded(&replica, "node1", |s| s.synced_revision >= Some(revision)).await;
}

static ELSEWHERE: AtomicUsize = AtomicUsize::new(0);

#[tokio::test]
async fn an_invalid_push_is_nacked_and_the_last_good_config_stays() {
    let mesh = mesh(None).await;
    let replica = replica(&mesh.store, &mesh.identity, "a").await;
    let node = mesh.node(&replica, "node1", None).await;
    let mut config = node.xds.config();
    let good = until(&mut config, "the first push", |c| c.revision > 0).await;

    // Below the API: a port the API would refuse, written the way the
    // store writes (the revision moves and the change is logged).
    let mut raw = mesh.store.raw_connection().await.unwrap();
    raw.execute(
        r#"UPDATE Service SET ports = '[{"port": 0, "protocol": "http"}]' WHERE name = 'reviews';
           UPDATE mesh_revision SET revision = revision + 1 WHERE id = 1;
           INSERT INTO resource_changes (revision, kind, namespace, name, op)
             SELECT revision, 'Service', 'shop', 'reviews', 'upsert' FROM mesh_revision WHERE id = 1;"#,
    )
    .await
    .unwrap();
    // Any write moves the revision; this one is valid in itself.
    let n = ELSEWHERE.fetch_add(1, Ordering::SeqCst);
    let bad_revision = mesh
        .apply(&format!(
            "apiVersion: mesh.io/v1\nkind: Service\nmetadata: {{name: ratings{n}, namespace: shop}}\nspec: {{ports: [{{port: 9090}}]}}\n"
        ))
        .await;

    let mut status = node.xds.status();
    let rejected = tokio::time::timeout(Duration::from_secs(20), status.wait_for(|s| s.nacks > 0))
        .await
        .expect("no NACK")
        .unwrap()
        .clone();
    let reason = rejected.last_nack.unwrap();
    assert!(
        reason.contains(
            "service/shop/reviews: Service/reviews: spec.ports[0].port: must be 1 to 65535 (got 0)"
        ),
        "{reason}"
    );
    // The control plane recorded it, up to the valid write that followed.
    let nacked = recorded(&replica, "node1", |s| s.nack_revision == Some(bad_revision)).await;
    assert_eq!(nacked.nack_reason.as_deref(), Some(reason.as_str()));
    // The whole push was refused: not even the valid new service landed.
    let kept = config.borrow().clone();
    assert_eq!(kept, good, "the node changed its configuration on a NACK");
    assert!(nacked.synced_revision < Some(bad_revision));

    // Fixed through the API: the next push is accepted, NACK cleared.
    let fixed = mesh
        .apply("apiVersion: mesh.io/v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec: {ports: [{port: 9081, protocol: http}]}\n")
        .await;
    let after = until(&mut config, "the fixed push", |c| c.revision >= fixed).await;
    assert!(
        after
            .resources
            .contains_key(&format!("service/shop/ratings{n}"))
    );
    recorded(&replica, "node1", |s| {
        s.nack_revision.is_none() && s.synced_revision >= Some(fixed)
    })
    .await;
}

#[tokio::test]
async fn a_node_that_missed_50_changes_ends_up_identical_to_a_fresh_one() {
    let mesh = mesh(None).await;
    let replica = replica(&mesh.store, &mesh.identity, "a").await;
    let node = mesh.node(&replica, "node1", None).await;
    let mut config = node.xds.config();
    let before = until(&mut config, "the first push", |c| c.revision > 0).await;
    drop(node);

    // 50 changes while it is away: new services, a changed one, removals.
    for i in 0..50 {
        let yaml = match i % 5 {
            0..=2 => format!(
                "apiVersion: mesh.io/v1\nkind: Service\nmetadata: {{name: svc{i}, namespace: shop}}\nspec: {{ports: [{{port: {}}}]}}\n",
                1000 + i
            ),
            3 => format!(
                "apiVersion: mesh.io/v1\nkind: Service\nmetadata: {{name: reviews, namespace: shop}}\nspec: {{ports: [{{port: {}, protocol: http}}]}}\n",
                9000 + i
            ),
            _ => {
                mesh.store
                    .delete(Kind::Service, Some("shop"), &format!("svc{}", i - 4))
                    .await
                    .unwrap();
                continue;
            }
        };
        mesh.apply(&yaml).await;
    }
    let now = mesh.store.revision().await.unwrap();
    assert!(now >= before.revision + 50);

    let returning = mesh.node(&replica, "node1", Some(before.clone())).await;
    let fresh = mesh.node(&replica, "node1", None).await;
    let mut returning_config = returning.xds.config();
    let mut fresh_config = fresh.xds.config();
    let resumed = until(&mut returning_config, "the resync", |c| c.revision >= now).await;
    let clean = until(&mut fresh_config, "the fresh sync", |c| c.revision >= now).await;
    assert_eq!(resumed.versions(), clean.versions());
    assert_eq!(resumed.resources, clean.resources);
    assert!(resumed.resources.contains_key("service/shop/svc2"));
    assert!(!resumed.resources.contains_key("service/shop/svc0"));
}

#[tokio::test]
async fn with_two_replicas_on_postgres_a_change_through_one_reaches_a_node_on_the_other() {
    let base = std::env::var("MESH_TEST_POSTGRES_URL").expect(
        "MESH_TEST_POSTGRES_URL is not set: run `cargo xtask test`, which starts PostgreSQL",
    );
    let db = format!("xds_{}", std::process::id());
    sqlx::any::install_default_drivers();
    {
        use sqlx::Connection as _;
        let mut admin = sqlx::AnyConnection::connect(&base).await.unwrap();
        admin
            .execute(format!("CREATE DATABASE {db}").as_str())
            .await
            .unwrap();
        admin.close().await.unwrap();
    }
    let url = format!("{}/{db}", base.rsplit_once('/').unwrap().0);
    let mesh = mesh(Some(url.clone())).await;
    // Replica B: its own connection pool to the same database.
    let store_b = Store::open(&url).await.unwrap();
    let replica_a = replica(&mesh.store, &mesh.identity, "a").await;
    // B polls hourly: within this test only a notification from A's commit
    // can tell it.
    let replica_b = replica_polling(&store_b, &mesh.identity, "b", Duration::from_secs(3600)).await;
    let node = mesh.node(&replica_b, "node1", None).await;
    let mut config = node.xds.config();
    until(&mut config, "the first push", |c| c.revision > 0).await;

    // Written through replica A's store.
    let revision = mesh
        .apply("apiVersion: mesh.io/v1\nkind: Service\nmetadata: {name: ratings, namespace: shop}\nspec: {ports: [{port: 9090}]}\n")
        .await;
    let updated = until(&mut config, "the change from replica A", |c| {
        c.revision >= revision
    })
    .await;
    assert!(updated.resources.contains_key("service/shop/ratings"));
    let status = recorded(&replica_b, "node1", |s| {
        s.synced_revision == Some(updated.revision)
    })
    .await;
    // Recorded in the shared store by the replica serving the node, with
    // where to reach the node's admin endpoint.
    assert_eq!(status.replica, "b");
    assert_eq!(status.admin_address.as_deref(), Some(ADMIN));
    assert_eq!(replica_a.store.node_statuses().await.unwrap(), [status]);
}

fn reviews_endpoint(config: &NodeConfig) -> mesh_model::config::EndpointEntry {
    let (_, endpoints) = &config.resources["endpoints/shop/reviews"];
    let ConfigResource::Endpoints(set) = endpoints.as_ref() else {
        panic!("endpoints/shop/reviews is {endpoints:?}");
    };
    assert_eq!(set.endpoints.len(), 1, "{set:?}");
    set.endpoints[0].clone()
}

fn reviews_health(healthy: bool) -> mesh_api::v1::EndpointHealth {
    mesh_api::v1::EndpointHealth {
        namespace: "shop".into(),
        service: "reviews".into(),
        ip: "10.89.1.2".into(),
        port: 9080,
        healthy,
    }
}

#[tokio::test]
async fn a_nodes_readiness_report_marks_its_endpoint_for_callers_and_only_its_own() {
    let mesh = mesh(None).await;
    let replica = replica(&mesh.store, &mesh.identity, "a").await;
    // node1 calls reviews; node2 runs reviews-1.
    let caller = mesh.node(&replica, "node1", None).await;
    let owner = mesh.node(&replica, "node2", None).await;
    let mut caller_config = caller.xds.config();
    let first = until(&mut caller_config, "the first push", |c| c.revision > 0).await;
    assert!(reviews_endpoint(&first).healthy);
    until(&mut owner.xds.config(), "node2's first push", |c| {
        c.revision > 0
    })
    .await;

    // The owner says it is down: every caller hears.
    owner
        .xds
        .health_reports()
        .send(reviews_health(false))
        .await
        .unwrap();
    let down = until(&mut caller_config, "the endpoint marked down", |c| {
        c.resources.contains_key("endpoints/shop/reviews") && !reviews_endpoint(c).healthy
    })
    .await;
    let stored = mesh.store.endpoints("reviews.shop").await.unwrap();
    assert!(!stored[0].ready && stored[0].healthy, "{stored:?}");

    // The caller cannot speak for node2's workload. Its report travels on
    // its own stream ahead of its ACK of the next push, so once that ACK is
    // recorded the report has been dealt with.
    caller
        .xds
        .health_reports()
        .send(reviews_health(true))
        .await
        .unwrap();
    let marker = mesh
        .apply("apiVersion: mesh.io/v1\nkind: Service\nmetadata: {name: marker, namespace: shop}\nspec: {ports: [{port: 9090}]}\n")
        .await;
    until(&mut caller_config, "the marker", |c| c.revision >= marker).await;
    recorded(&replica, "node1", |s| s.synced_revision >= Some(marker)).await;
    assert!(!mesh.store.endpoints("reviews.shop").await.unwrap()[0].ready);
    assert!(!reviews_endpoint(&caller_config.borrow()).healthy);

    // The owner says it is back.
    owner
        .xds
        .health_reports()
        .send(reviews_health(true))
        .await
        .unwrap();
    let up = until(&mut caller_config, "the endpoint marked up", |c| {
        reviews_endpoint(c).healthy
    })
    .await;
    assert!(up.revision > down.revision);

    // An operator's drain holds whatever the node observes: readiness
    // going down and back up leaves the endpoint out until the operator
    // puts it back.
    let ip: std::net::IpAddr = "10.89.1.2".parse().unwrap();
    mesh.store
        .set_endpoint_health("reviews.shop", ip, 9080, false)
        .await
        .unwrap();
    until(&mut caller_config, "the drain", |c| {
        !reviews_endpoint(c).healthy
    })
    .await;
    for ready in [false, true] {
        owner
            .xds
            .health_reports()
            .send(reviews_health(ready))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while mesh.store.endpoints("reviews.shop").await.unwrap()[0].ready != ready {
            assert!(
                tokio::time::Instant::now() < deadline,
                "readiness {ready} never recorded"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let after = mesh.store.revision().await.unwrap();
    let drained = until(&mut caller_config, "the readiness changes", |c| {
        c.revision >= after
    })
    .await;
    assert!(!reviews_endpoint(&drained).healthy);
    assert!(reviews_endpoint(&drained).ready);
    mesh.store
        .set_endpoint_health("reviews.shop", ip, 9080, true)
        .await
        .unwrap();
    until(&mut caller_config, "the endpoint put back", |c| {
        reviews_endpoint(c).healthy
    })
    .await;
}

#[tokio::test]
async fn a_push_too_large_for_one_response_arrives_in_parts_and_is_applied_whole() {
    let mesh = mesh(None).await;
    // 3,000 addresses: about 330 KiB of bodies, more than one part holds.
    let mut yaml = String::new();
    for i in 0..3000 {
        yaml.push_str(&format!(
            "---\napiVersion: mesh.io/v1\nkind: Workload\nmetadata: {{name: w{i}, namespace: shop}}\n\
             spec: {{node: node9, ip: 10.90.{}.{}}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    let revision = mesh.apply(&yaml).await;
    let replica = replica(&mesh.store, &mesh.identity, "a").await;
    let node = mesh.node(&replica, "node1", None).await;
    let mut config = node.xds.config();
    // The first configuration the node publishes is the whole push.
    let first = until(&mut config, "the first push", |c| c.revision > 0).await;
    assert_eq!(first.revision, revision);
    let addresses = first
        .resources
        .keys()
        .filter(|name| name.starts_with("address/shop/w"))
        .count();
    assert_eq!(addresses, 3000);
    // One answer, for the whole.
    let mut status = node.xds.status();
    let status = tokio::time::timeout(Duration::from_secs(20), status.wait_for(|s| s.acks > 0))
        .await
        .expect("no ACK")
        .unwrap()
        .clone();
    assert_eq!((status.acks, status.nacks), (1, 0), "{status:?}");
}
