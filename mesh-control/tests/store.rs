//! Store conformance: one suite, run unchanged against SQLite and a real
//! PostgreSQL. `cargo xtask test` starts the PostgreSQL server and sets
//! MESH_TEST_POSTGRES_URL; each test gets a database of its own.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use mesh_control::store::{Applied, ApplyOutcome, Backend, Store, StoreError};
use mesh_model::{Kind, Resource, parse_documents, split::Version};
use sqlx::{Connection as _, Executor as _, Row as _};

static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// A store on a fresh database of `backend`; the guard keeps it alive.
async fn store(backend: Backend) -> (Store, Option<tempfile::TempDir>) {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}?mode=rwc", dir.path().join("mesh.db").display());
            (Store::open(&url).await.unwrap(), Some(dir))
        }
        Backend::Postgres => {
            let base = std::env::var("MESH_TEST_POSTGRES_URL").expect(
                "MESH_TEST_POSTGRES_URL is not set: run `cargo xtask test`, which starts PostgreSQL",
            );
            let db = format!(
                "store_{}_{}",
                std::process::id(),
                DATABASES.fetch_add(1, Ordering::SeqCst)
            );
            sqlx::any::install_default_drivers();
            let mut admin = sqlx::AnyConnection::connect(&base).await.unwrap();
            admin
                .execute(format!("CREATE DATABASE {db}").as_str())
                .await
                .unwrap();
            admin.close().await.unwrap();
            let url = format!("{}/{db}", base.rsplit_once('/').unwrap().0);
            (Store::open(&url).await.unwrap(), None)
        }
    }
}

/// Runs each named test against both backends.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                let (store, _dir) = super::store(super::Backend::Sqlite).await;
                super::$test(store).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                let (store, _dir) = super::store(super::Backend::Postgres).await;
                super::$test(store).await;
            })*
        }
    };
}

conformance!(
    every_kind_round_trips,
    schema_defaults_are_the_seeds,
    apply_bumps_the_revision_once_and_skips_unchanged,
    multi_document_apply_is_all_or_nothing,
    resource_version_guards_updates,
    concurrent_writers_each_get_their_own_revision,
    seed_apply_policy_upserts,
    latest_split_follows_the_seed,
    endpoints_follow_workloads_and_keep_health,
    hostile_values_are_stored_verbatim,
    namespaces_holding_resources_are_not_deleted,
    deletes_are_recorded_and_not_found_is_an_error,
    certificate_keys_are_sealed_at_rest,
    dry_runs_report_and_change_nothing,
    bootstrap_tokens_are_stored_hashed_and_checked,
    two_workloads_cannot_share_an_address,
    service_addresses_are_unique_among_services_and_workloads,
    one_replica_at_a_time_leads,
);

async fn service_addresses_are_unique_among_services_and_workloads(store: Store) {
    store.apply(&parse(SHOP)).await.unwrap();
    let revision = store.revision().await.unwrap();
    let service = |name: &str, vip: &str| {
        parse_one(&format!(
            "apiVersion: mesh.io/v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{ports: [{{port: 80}}], vip: '{vip}'}}\n"
        ))
    };
    for (claim, expected) in [
        (
            service("ratings", "fd00:96:0::a"),
            "Service/shop/ratings: spec.vip: fd00:96::a is already the address of Service shop/reviews",
        ),
        (
            service("ratings", "10.89.0.2"),
            "Service/shop/ratings: spec.vip: 10.89.0.2 is already the address of Workload shop/reviews-v1",
        ),
        (
            parse_one(
                "apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: thief, namespace: shop}\n\
                 spec: {node: node1, ip: 'fd00:96::a', service_account: thief}\n",
            ),
            "Workload/shop/thief: spec.ip: fd00:96::a is already the address of Service shop/reviews",
        ),
    ] {
        let error = store.apply(&claim).await.unwrap_err();
        assert!(error.to_string().contains(expected), "{error}");
        assert_eq!(store.revision().await.unwrap(), revision);
    }
    // Two claimants in one apply: neither lands.
    let mut both = service("ratings", "10.96.0.7");
    both.extend(service("details", "10.96.0.7"));
    let error = store.apply(&both).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("spec.vip: 10.96.0.7 is already the address of Service shop/"),
        "{error}"
    );
    assert_eq!(store.revision().await.unwrap(), revision);
    // A service keeps its own address, moves to a free one, or drops it.
    let mut reviews = parse(SHOP);
    reviews.retain(|r| r.kind() == Kind::Service);
    reviews[0]
        .metadata_mut()
        .labels
        .insert("tier".into(), "x".into());
    store.apply(&reviews).await.unwrap();
    store.apply(&service("reviews", "10.96.0.8")).await.unwrap();
    let stored = store
        .get(Kind::Service, Some("shop"), "reviews")
        .await
        .unwrap();
    let Some(Resource::Service(stored)) = stored else {
        panic!("{stored:?}")
    };
    assert_eq!(stored.spec.vip, Some("10.96.0.8".parse().unwrap()));
    store
        .apply(&service("ratings", "fd00:96::a"))
        .await
        .unwrap();
}

async fn two_workloads_cannot_share_an_address(store: Store) {
    store.apply(&parse(SHOP)).await.unwrap();
    let revision = store.revision().await.unwrap();
    let thief = parse_one(
        "apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: thief, namespace: shop}\n\
         spec: {node: node1, ip: 10.89.0.2, service_account: thief}\n",
    );
    let error = store.apply(&thief).await.unwrap_err();
    assert!(
        error.to_string().contains(
            "Workload/shop/thief: spec.ip: 10.89.0.2 is already the address of Workload shop/reviews-v1"
        ),
        "{error}"
    );
    assert_eq!(store.revision().await.unwrap(), revision);
    assert!(
        store
            .get(Kind::Workload, Some("shop"), "thief")
            .await
            .unwrap()
            .is_none()
    );
    // A workload may keep, or move to a free, address.
    let mut moved = parse(SHOP);
    moved.retain(|r| r.name() == "reviews-v1");
    moved[0]
        .metadata_mut()
        .labels
        .insert("tier".into(), "x".into());
    let outcome = store.apply(&moved).await.unwrap();
    assert_eq!(configured(&outcome), ["Workload/shop/reviews-v1"]);
    // Nor another workload's pod: the node would capture that pod as the
    // thief.
    let claims_the_pod = parse_one(
        "apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: thief, namespace: shop}\n\
         spec: {node: node0, ip: 10.89.0.98, service_account: thief, pod_uid: 0c1d2e3f-4a5b-4c6d-8e7f-901a2b3c4d5e}\n",
    );
    let error = store.apply(&claims_the_pod).await.unwrap_err();
    assert!(
        error.to_string().contains(
            "spec.pod_uid: 0c1d2e3f-4a5b-4c6d-8e7f-901a2b3c4d5e is already the pod of Workload shop/reviews-v1"
        ),
        "{error}"
    );
    let free = parse_one(
        "apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: thief, namespace: shop}\n\
         spec: {node: node1, ip: 10.89.0.99, service_account: thief}\n",
    );
    store.apply(&free).await.unwrap();
}

/// Only one replica at a time holds a role: on PostgreSQL a second
/// session is refused until the first is gone; SQLite has one replica.
async fn one_replica_at_a_time_leads(store: Store) {
    let first = store.try_lead("kubernetes-mirror").await.unwrap();
    let mut first = first.expect("nobody holds it yet");
    assert!(first.held().await);
    let second = store.try_lead("kubernetes-mirror").await.unwrap();
    let other_role = store.try_lead("another-role").await.unwrap();
    assert!(other_role.is_some());
    match store.backend() {
        Backend::Sqlite => assert!(second.is_some()),
        Backend::Postgres => {
            assert!(second.is_none(), "a second session took the lock");
            drop(first);
            // The server releases the lock when the session ends.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let mut taken = None;
            while taken.is_none() && std::time::Instant::now() < deadline {
                taken = store.try_lead("kubernetes-mirror").await.unwrap();
                if taken.is_none() {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
            assert!(taken.is_some(), "the lock outlived its session");
            // A holder whose session the server ends finds out at once.
            let mut holder = taken.unwrap();
            assert!(holder.held().await);
            let mut admin = store.raw_connection().await.unwrap();
            // This test's database only: other tests' sessions (sqlx's
            // migrations take advisory locks too) are not ours to end.
            let row = sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_locks \
                 WHERE locktype = 'advisory' AND granted AND database = \
                 (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(&mut admin)
            .await
            .unwrap();
            assert!(row.try_get::<bool, _>(0).unwrap());
            assert!(!holder.held().await);
            assert!(!holder.held().await, "lost is lost");
        }
    }
}

fn parse(text: &str) -> Vec<Resource> {
    parse_documents(text).unwrap_or_else(|e| panic!("{e:?}"))
}

fn parse_one(text: &str) -> Vec<Resource> {
    let resources = parse(text);
    assert_eq!(resources.len(), 1);
    resources
}

const SHOP: &str = r#"
apiVersion: mesh.io/v1
kind: Namespace
metadata: {name: shop, labels: {mesh.io/capture: enabled}}
---
apiVersion: mesh.io/v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  ports: [{name: http, port: 9080, protocol: http}, {name: admin, port: 9090, target_port: 19090}]
  load_balancer: consistent_hash
  hash_header: x-user
  vip: "fd00:96::a"
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: reviews-v1, namespace: shop, labels: {app: reviews}}
spec: {node: node0, ip: 10.89.0.2, services: [reviews], version: v1, service_account: reviews, pod_uid: 0c1d2e3f-4a5b-4c6d-8e7f-901a2b3c4d5e}
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: reviews-v2, namespace: shop}
spec: {node: node1, ip: "fd00:89:1::2", services: [reviews], version: v2, service_account: reviews}
---
apiVersion: mesh.io/v1
kind: ServicePolicy
metadata: {name: reviews, namespace: shop}
spec:
  timeout_ms: 250
  rate_limit: {requests_per_second: 100, burst: 20, per_source: true}
  retry: {on_statuses: [409, 502], non_idempotent: true, backoff_max_ms: 1000}
---
apiVersion: mesh.io/v1
kind: TrafficSplit
metadata: {name: reviews-canary, namespace: shop}
spec:
  destination: reviews
  source: frontend
  v1_weight: 95
  v2_weight: 5
  header_match: {x-canary: "true", x-user: {prefix: "qa-"}}
---
apiVersion: mesh.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-from-frontend, namespace: shop}
spec:
  target: reviews
  action: deny
  rules:
  - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/frontend"], namespaces: [shop]}]
    to: [{ports: [9080], methods: [GET, POST], paths: ["/reviews/*"]}]
"#;

fn without_version(mut resource: Resource) -> Resource {
    resource.metadata_mut().resource_version = None;
    let namespace = resource.namespace().map(str::to_owned);
    resource.metadata_mut().namespace = namespace;
    resource
}

/// The resources an apply reports as configured (updated).
fn configured(outcome: &ApplyOutcome) -> Vec<&str> {
    outcome
        .results
        .iter()
        .filter(|(_, a)| *a == Applied::Configured)
        .map(|(r, _)| r.as_str())
        .collect()
}

/// A plain connection to the store's database, for checks below the API.
async fn raw(store: &Store) -> sqlx::AnyConnection {
    store.raw_connection().await.unwrap()
}

async fn every_kind_round_trips(store: Store) {
    let resources = parse(SHOP);
    let outcome = store.apply(&resources).await.unwrap();
    assert_eq!(outcome.revision, 1);
    assert!(
        outcome.results.iter().all(|(_, a)| *a == Applied::Created),
        "{outcome:?}"
    );
    for resource in &resources {
        let stored = store
            .get(resource.kind(), resource.namespace(), resource.name())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{} is missing", resource.reference()));
        assert_eq!(stored.metadata().resource_version, Some(1));
        assert_eq!(without_version(stored), without_version(resource.clone()));
    }
    let workloads = store.list(Kind::Workload, Some("shop")).await.unwrap();
    let names: Vec<&str> = workloads.iter().map(Resource::name).collect();
    assert_eq!(names, ["reviews-v1", "reviews-v2"]);
    assert!(
        store
            .list(Kind::Workload, Some("other"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.list(Kind::Namespace, None).await.unwrap().len(), 1);
}

async fn schema_defaults_are_the_seeds(store: Store) {
    store.apply(&parse(SHOP)[..1]).await.unwrap();
    // Straight into the seed's tables, relying on the columns' defaults.
    let mut conn = raw(&store).await;
    conn.execute(
        "INSERT INTO ServicePolicy (service_name, namespace, name) VALUES ('ratings.shop', 'shop', 'ratings')",
    )
    .await
    .unwrap();
    conn.execute(
        "INSERT INTO TrafficSplit (destination_service, namespace, name) VALUES ('ratings.shop', 'shop', 'ratings')",
    )
    .await
    .unwrap();
    let policy = store
        .get(Kind::ServicePolicy, Some("shop"), "ratings")
        .await
        .unwrap()
        .unwrap();
    let Resource::ServicePolicy(policy) = policy else {
        panic!("not a policy")
    };
    let spec = &policy.spec;
    assert_eq!(
        (
            spec.retry_attempts,
            spec.timeout_ms,
            spec.cb_threshold,
            spec.cb_window_sec
        ),
        (3, 5000, 50, 30)
    );
    let split = store
        .latest_split("ratings.shop", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            split.spec.v1_weight,
            split.spec.v2_weight,
            split.spec.source
        ),
        (100, 0, None)
    );
    // The constraints mirror validation: a row the API would refuse cannot
    // be written behind its back either.
    let bad = conn
        .execute("INSERT INTO ServicePolicy (service_name, namespace, name, cb_threshold) VALUES ('x.shop', 'shop', 'x', 0)")
        .await;
    assert!(bad.is_err(), "cb_threshold 0 was accepted");
    let bad = conn
        .execute("INSERT INTO TrafficSplit (destination_service, namespace, name, v1_weight, v2_weight) VALUES ('x.shop', 'shop', 'y', 0, 0)")
        .await;
    assert!(bad.is_err(), "weights 0/0 were accepted");
}

async fn apply_bumps_the_revision_once_and_skips_unchanged(store: Store) {
    assert_eq!(store.revision().await.unwrap(), 0);
    let resources = parse(SHOP);
    assert_eq!(store.apply(&resources).await.unwrap().revision, 1);
    let again = store.apply(&resources).await.unwrap();
    assert_eq!(again.revision, 1);
    assert!(again.results.iter().all(|(_, a)| *a == Applied::Unchanged));
    assert_eq!(store.revision().await.unwrap(), 1);

    let changed = parse(&SHOP.replace("timeout_ms: 250", "timeout_ms: 300"));
    let outcome = store.apply(&changed).await.unwrap();
    assert_eq!(outcome.revision, 2);
    assert_eq!(configured(&outcome), ["ServicePolicy/shop/reviews"]);
    let changes = store.changes_since(1).await.unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(
        (
            changes[0].revision,
            changes[0].kind.as_str(),
            changes[0].op.as_str()
        ),
        (2, "ServicePolicy", "upsert")
    );
    assert_eq!(store.changes_since(0).await.unwrap().len(), 8);
}

async fn multi_document_apply_is_all_or_nothing(store: Store) {
    // The last document names a namespace that does not exist: nothing lands.
    let mut resources = parse(SHOP);
    resources.extend(parse_one(
        "apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {name: ghost, namespace: nowhere}\n",
    ));
    let error = store.apply(&resources).await.unwrap_err();
    assert!(matches!(error, StoreError::Conflict { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("namespace nowhere does not exist"),
        "{error}"
    );
    assert_eq!(store.revision().await.unwrap(), 0);
    for kind in Kind::ALL {
        assert!(
            store.list(kind, None).await.unwrap().is_empty(),
            "{kind} rows survived a failed apply"
        );
    }
    assert!(store.endpoints("reviews.shop").await.unwrap().is_empty());
    assert!(store.changes_since(0).await.unwrap().is_empty());
}

async fn resource_version_guards_updates(store: Store) {
    store.apply(&parse(SHOP)).await.unwrap();
    let mut stale = store
        .get(Kind::ServicePolicy, Some("shop"), "reviews")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stale.metadata().resource_version, Some(1));
    store
        .apply(&parse(&SHOP.replace("timeout_ms: 250", "timeout_ms: 400")))
        .await
        .unwrap();
    let Resource::ServicePolicy(policy) = &mut stale else {
        panic!("not a policy")
    };
    policy.spec.retry_attempts = 1;
    let error = store.apply(&[stale.clone()]).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("changed at revision 2 since revision 1"),
        "{error}"
    );
    assert_eq!(store.revision().await.unwrap(), 2);
    stale.metadata_mut().resource_version = Some(2);
    assert_eq!(store.apply(&[stale]).await.unwrap().revision, 3);
}

async fn concurrent_writers_each_get_their_own_revision(store: Store) {
    store.apply(&parse(SHOP)[..1]).await.unwrap();
    let writers = 16;
    let mut tasks = Vec::new();
    for i in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let text = format!(
                "apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {{name: svc-{i}, namespace: shop}}\nspec: {{timeout_ms: {}}}\n",
                100 + i
            );
            store.apply(&parse_one(&text)).await.unwrap().revision
        }));
    }
    let mut revisions = BTreeSet::new();
    for task in tasks {
        assert!(
            revisions.insert(task.await.unwrap()),
            "two writers got one revision"
        );
    }
    // Revisions 2..=17: one each, none lost, none skipped.
    assert_eq!(revisions, (2..=1 + writers as i64).collect());
    assert_eq!(store.revision().await.unwrap(), 1 + writers as i64);
    assert_eq!(
        store
            .list(Kind::ServicePolicy, Some("shop"))
            .await
            .unwrap()
            .len(),
        writers
    );
}

async fn seed_apply_policy_upserts(store: Store) {
    store.apply(&parse(SHOP)[..1]).await.unwrap();
    let policy = |retries: i32| {
        parse_one(&format!(
            "apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {{name: ratings, namespace: shop}}\nspec: {{retry_attempts: {retries}}}\n"
        ))
    };
    store.apply(&policy(1)).await.unwrap();
    store.apply(&policy(5)).await.unwrap();
    let rows = store.list(Kind::ServicePolicy, None).await.unwrap();
    assert_eq!(rows.len(), 1, "the upsert made a second row");
    let Resource::ServicePolicy(p) = &rows[0] else {
        panic!("not a policy")
    };
    assert_eq!(p.spec.retry_attempts, 5);
    // Fields the document leaves out take the seed's defaults again.
    assert_eq!(p.spec.timeout_ms, 5000);
}

async fn latest_split_follows_the_seed(store: Store) {
    store.apply(&parse(SHOP)[..1]).await.unwrap();
    let split = |name: &str, extra: &str| {
        parse_one(&format!(
            "apiVersion: mesh.io/v1\nkind: TrafficSplit\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{destination: reviews, {extra}}}\n"
        ))
    };
    let none = |_: &str| None;
    assert_eq!(
        store
            .compute_traffic_split("reviews.shop", None, none, |_| 1)
            .await
            .unwrap(),
        Version::V1
    );

    store
        .apply(&split("all-callers", "v1_weight: 0, v2_weight: 10"))
        .await
        .unwrap();
    store
        .apply(&split(
            "frontend-only",
            "source: frontend, v1_weight: 10, v2_weight: 0",
        ))
        .await
        .unwrap();
    // The seed: the most recently updated split for the destination wins.
    let latest = store
        .latest_split("reviews.shop", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.name, "frontend-only");
    // Scoped to another caller, the frontend's split does not apply.
    let latest = store
        .latest_split("reviews.shop", Some("ratings.shop"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.name, "all-callers");
    let pick = |source: &'static str| {
        let store = store.clone();
        async move {
            store
                .compute_traffic_split("reviews.shop", Some(source), none, |total| total)
                .await
                .unwrap()
        }
    };
    assert_eq!(pick("ratings.shop").await, Version::V2);
    assert_eq!(pick("frontend.shop").await, Version::V1);

    // Updating the older split makes it the latest.
    store
        .apply(&split("all-callers", "v1_weight: 1, v2_weight: 10"))
        .await
        .unwrap();
    assert_eq!(
        store
            .latest_split("reviews.shop", None)
            .await
            .unwrap()
            .unwrap()
            .name,
        "all-callers"
    );

    // Header matches take precedence over weights.
    store
        .apply(&split(
            "frontend-only",
            "source: frontend, v1_weight: 10, v2_weight: 0, header_match: {x-canary: \"true\"}",
        ))
        .await
        .unwrap();
    let canary = |name: &str| (name == "x-canary").then_some("true");
    assert_eq!(
        store
            .compute_traffic_split("reviews.shop", Some("frontend.shop"), canary, |_| 1)
            .await
            .unwrap(),
        Version::V2
    );
}

async fn endpoints_follow_workloads_and_keep_health(store: Store) {
    store.apply(&parse(SHOP)).await.unwrap();
    let endpoints = store.endpoints("reviews.shop").await.unwrap();
    let seen: Vec<(String, u16, Option<&str>, bool)> = endpoints
        .iter()
        .map(|e| (e.ip.to_string(), e.port, e.version.as_deref(), e.healthy))
        .collect();
    assert_eq!(
        seen,
        [
            ("10.89.0.2".to_owned(), 9080, Some("v1"), true),
            ("10.89.0.2".to_owned(), 19090, Some("v1"), true),
            ("fd00:89:1::2".to_owned(), 9080, Some("v2"), true),
            ("fd00:89:1::2".to_owned(), 19090, Some("v2"), true),
        ]
    );
    let v2: IpAddr = "fd00:89:1::2".parse().unwrap();
    let revision = store
        .set_endpoint_health("reviews.shop", v2, 9080, false)
        .await
        .unwrap();
    assert_eq!(revision, 2);
    assert!(matches!(
        store
            .set_endpoint_health("reviews.shop", v2, 1, false)
            .await,
        Err(StoreError::NotFound(_))
    ));

    // Relabelling v1's version keeps v2's health; v1 leaving drops its endpoints.
    store
        .apply(&parse(&SHOP.replace(
            "services: [reviews], version: v1,",
            "services: [reviews], version: v1b,",
        )))
        .await
        .unwrap();
    let endpoints = store.endpoints("reviews.shop").await.unwrap();
    assert_eq!(endpoints[0].version.as_deref(), Some("v1b"));
    assert!(
        !endpoints[2].healthy,
        "health was reset by an unrelated change"
    );
    store
        .apply(&parse(&SHOP.replace(
            "services: [reviews], version: v1,",
            "services: [], version: v1,",
        )))
        .await
        .unwrap();
    let left: Vec<IpAddr> = store
        .endpoints("reviews.shop")
        .await
        .unwrap()
        .iter()
        .map(|e| e.ip)
        .collect();
    assert_eq!(left, [v2, v2]);
    store
        .delete(Kind::Service, Some("shop"), "reviews")
        .await
        .unwrap();
    assert!(store.endpoints("reviews.shop").await.unwrap().is_empty());
}

async fn hostile_values_are_stored_verbatim(store: Store) {
    store.apply(&parse(SHOP)[..1]).await.unwrap();
    let value = "'; DROP TABLE TrafficSplit; -- \u{1F600} \\\" $1 %s ?";
    let text = format!(
        "apiVersion: mesh.io/v1\nkind: TrafficSplit\nmetadata: {{name: hostile, namespace: shop}}\nspec:\n  destination: reviews\n  header_match: {{x-evil: {}, x-re: {{regex: {}}}}}\n",
        serde_json::to_string(value).unwrap(),
        serde_json::to_string("(a|b)+'\"").unwrap()
    );
    let resources = parse_one(&text);
    store.apply(&resources).await.unwrap();
    let stored = store
        .get(Kind::TrafficSplit, Some("shop"), "hostile")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        without_version(stored),
        without_version(resources[0].clone())
    );
    let header = |name: &str| (name == "x-evil").then_some(value);
    assert_eq!(
        store
            .compute_traffic_split("reviews.shop", None, header, |_| 100)
            .await
            .unwrap(),
        Version::V2
    );
    // The tables are all still there.
    for kind in Kind::ALL {
        store.list(kind, None).await.unwrap();
    }
}

async fn namespaces_holding_resources_are_not_deleted(store: Store) {
    store.apply(&parse(SHOP)).await.unwrap();
    let error = store
        .delete(Kind::Namespace, None, "shop")
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("still holds 6 resources"),
        "{error}"
    );
    for resource in parse(SHOP).iter().skip(1) {
        store
            .delete(resource.kind(), resource.namespace(), resource.name())
            .await
            .unwrap();
    }
    store.delete(Kind::Namespace, None, "shop").await.unwrap();
    assert!(store.list(Kind::Namespace, None).await.unwrap().is_empty());
}

async fn deletes_are_recorded_and_not_found_is_an_error(store: Store) {
    store.apply(&parse(SHOP)).await.unwrap();
    let revision = store
        .delete(Kind::TrafficSplit, Some("shop"), "reviews-canary")
        .await
        .unwrap();
    assert_eq!(revision, 2);
    assert!(
        store
            .get(Kind::TrafficSplit, Some("shop"), "reviews-canary")
            .await
            .unwrap()
            .is_none()
    );
    let change = store.changes_since(1).await.unwrap();
    assert_eq!(
        (change[0].name.as_str(), change[0].op.as_str()),
        ("reviews-canary", "delete")
    );
    let error = store
        .delete(Kind::TrafficSplit, Some("shop"), "reviews-canary")
        .await
        .unwrap_err();
    assert!(
        matches!(error, StoreError::NotFound(ref r) if r == "TrafficSplit/shop/reviews-canary"),
        "{error}"
    );
    assert_eq!(store.revision().await.unwrap(), 2);
    let raw_count = raw(&store)
        .await
        .fetch_one("SELECT COUNT(*) AS n FROM TrafficSplit")
        .await
        .unwrap()
        .try_get::<i64, _>("n")
        .unwrap();
    assert_eq!(raw_count, 0);
}

async fn certificate_keys_are_sealed_at_rest(store: Store) {
    use mesh_control::store::NewCertificate;
    use mesh_identity::{CertificateAuthority, Kek, SpiffeId, kek::KekError};

    let now = time::OffsetDateTime::now_utc();
    let ca = CertificateAuthority::generate("cluster.local", now).unwrap();
    let (kek, _) = Kek::generate().unwrap();
    let gateway = SpiffeId::parse("spiffe://cluster.local/ns/edge/sa/gateway").unwrap();
    // The seed's server-side issuance: the CA generates the key.
    let (cert, key_pem) = ca.issue_with_key(&gateway, now).unwrap();
    let sealed = kek.seal(key_pem.as_bytes(), "gateway.edge").unwrap();
    store
        .record_certificate(&NewCertificate {
            service_name: "gateway.edge",
            spiffe_id: &gateway.to_string(),
            serial: &cert.serial,
            cert_pem: &cert.pem,
            sealed_key: Some(&sealed),
            node: None,
            issued_at: now,
            expiry: cert.not_after,
        })
        .await
        .unwrap();
    // A CSR issuance: the key never left its node, nothing is stored.
    let later = now + std::time::Duration::from_secs(1);
    let (renewed, _) = ca.issue_with_key(&gateway, later).unwrap();
    store
        .record_certificate(&NewCertificate {
            service_name: "gateway.edge",
            spiffe_id: &gateway.to_string(),
            serial: &renewed.serial,
            cert_pem: &renewed.pem,
            sealed_key: None,
            node: Some("node1"),
            issued_at: later,
            expiry: renewed.not_after,
        })
        .await
        .unwrap();

    // Below the API: no row holds a plaintext key.
    let rows = raw(&store)
        .await
        .fetch_all("SELECT private_key FROM CertificateRecord")
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let stored: String = row.try_get("private_key").unwrap();
        assert!(
            !stored.contains("BEGIN"),
            "a plaintext key is stored: {stored}"
        );
    }

    let records = store.certificates(Some("gateway.edge")).await.unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].serial, cert.serial);
    assert_eq!(records[0].spiffe_id, gateway.to_string());
    assert!(
        records[0]
            .expiry
            .starts_with(&cert.not_after.year().to_string()),
        "{}",
        records[0].expiry
    );
    assert_eq!(records[1].node.as_deref(), Some("node1"));
    assert_eq!(records[1].private_key, "");
    let opened = kek.open(&records[0].private_key, "gateway.edge").unwrap();
    assert_eq!(opened, key_pem.as_bytes());
    let (wrong, _) = Kek::generate().unwrap();
    assert!(matches!(
        wrong.open(&records[0].private_key, "gateway.edge"),
        Err(KekError::WrongKek { .. })
    ));
}

async fn dry_runs_report_and_change_nothing(store: Store) {
    let outcome = store.dry_run(&parse(SHOP)).await.unwrap();
    assert_eq!(outcome.revision, 0);
    assert!(
        outcome.results.iter().all(|(_, a)| *a == Applied::Created),
        "{outcome:?}"
    );
    assert_eq!(store.revision().await.unwrap(), 0);
    for kind in Kind::ALL {
        assert!(
            store.list(kind, None).await.unwrap().is_empty(),
            "{kind} rows survived a dry run"
        );
    }
    assert!(store.changes_since(0).await.unwrap().is_empty());

    // A dry run meets the same conflicts as the real thing.
    let orphan = parse_one(
        "apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {name: ghost, namespace: nowhere}\n",
    );
    assert!(matches!(
        store.dry_run(&orphan).await,
        Err(StoreError::Conflict { .. })
    ));

    store.apply(&parse(SHOP)).await.unwrap();
    let changed = parse(&SHOP.replace("timeout_ms: 250", "timeout_ms: 999"));
    let outcome = store.dry_run(&changed).await.unwrap();
    assert_eq!(outcome.revision, 1);
    assert_eq!(configured(&outcome), ["ServicePolicy/shop/reviews"]);
    let Some(Resource::ServicePolicy(policy)) = store
        .get(Kind::ServicePolicy, Some("shop"), "reviews")
        .await
        .unwrap()
    else {
        panic!("the policy is gone")
    };
    assert_eq!(policy.spec.timeout_ms, 250);
    assert_eq!(store.revision().await.unwrap(), 1);
}

async fn bootstrap_tokens_are_stored_hashed_and_checked(store: Store) {
    use mesh_control::store::TokenRejected;
    use time::{Duration, OffsetDateTime};

    let now = OffsetDateTime::now_utc();
    let any = store
        .create_bootstrap_token(None, "any node", Duration::hours(1), now)
        .await
        .unwrap();
    let bound = store
        .create_bootstrap_token(Some("node2"), "node2 only", Duration::hours(2), now)
        .await
        .unwrap();
    let (_, secret) = any.token.split_once('.').unwrap();

    // Below the API: only digests are stored.
    let rows = raw(&store)
        .await
        .fetch_all("SELECT token_id, secret_sha256 FROM NodeBootstrapToken")
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let stored: String = row.try_get("secret_sha256").unwrap();
        assert_eq!(stored.len(), 64);
        assert!(!stored.contains(secret));
    }

    let accepted = store
        .check_bootstrap_token(&any.token, "node1", now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(accepted.id, any.id);
    assert_eq!(
        store
            .check_bootstrap_token(&bound.token, "node1", now)
            .await
            .unwrap(),
        Err(TokenRejected::OtherNode {
            bound: "node2".into(),
            asked: "node1".into()
        })
    );
    assert!(
        store
            .check_bootstrap_token(&bound.token, "node2", now)
            .await
            .unwrap()
            .is_ok()
    );
    let wrong = format!("{}.{}", any.id, "f".repeat(32));
    assert_eq!(
        store
            .check_bootstrap_token(&wrong, "node1", now)
            .await
            .unwrap(),
        Err(TokenRejected::WrongSecret)
    );
    let later = now + Duration::hours(1) + Duration::seconds(1);
    assert!(matches!(
        store
            .check_bootstrap_token(&any.token, "node1", later)
            .await
            .unwrap(),
        Err(TokenRejected::Expired(_))
    ));

    let listed = store.bootstrap_tokens().await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, [any.id.as_str(), bound.id.as_str()]);
    assert_eq!(listed[1].node.as_deref(), Some("node2"));
    assert!(store.delete_bootstrap_token(&any.id).await.unwrap());
    assert!(!store.delete_bootstrap_token(&any.id).await.unwrap());
    assert_eq!(
        store
            .check_bootstrap_token(&any.token, "node1", now)
            .await
            .unwrap(),
        Err(TokenRejected::Unknown)
    );
}
