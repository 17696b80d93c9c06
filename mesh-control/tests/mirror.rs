//! The Kubernetes mirror against recorded API-server answers: lists, then
//! watches with added, modified and deleted objects, and a watch that
//! expires (`410 Gone`) and forces a relist in which an object deleted
//! meanwhile is simply missing. The store must end holding exactly what
//! the cluster holds, what was applied by hand untouched.
//!
//! The answers (`tests/data/kubernetes/*.yaml`) are replayed by a small
//! HTTP server standing in for the API server, in order, one file per
//! resource: a list request gets the next list (or the last one again), a
//! watch request the next watch's events, after which the stream stays
//! open unless it ended with an error event, as the API server does.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    convert::Infallible,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path as UrlPath, Query, State},
    response::{IntoResponse, Response},
    routing::get,
};
use futures_util::stream;
use mesh_control::{kubernetes, store::Store};
use mesh_model::{Kind, Resource, parse_documents};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Reply {
    List(Value),
    Watch(Vec<Value>),
}

#[derive(Default)]
struct Script {
    replies: VecDeque<Reply>,
    last_list: Option<Value>,
    lists: usize,
    watches: usize,
}

type Scripts = Arc<Mutex<HashMap<String, Script>>>;

fn load_scripts() -> Scripts {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kubernetes");
    let mut scripts = HashMap::new();
    for resource in [
        "namespaces",
        "pods",
        "services",
        "servicepolicies",
        "trafficsplits",
        "authorizationpolicies",
    ] {
        let text = std::fs::read_to_string(dir.join(format!("{resource}.yaml"))).unwrap();
        let raw: Value = serde_yaml_ng::from_str(&text).unwrap();
        let replies: VecDeque<Reply> = serde_json::from_value(raw).unwrap();
        scripts.insert(
            resource.to_owned(),
            Script {
                replies,
                ..Script::default()
            },
        );
    }
    Arc::new(Mutex::new(scripts))
}

async fn answer(
    State(scripts): State<Scripts>,
    UrlPath(resource): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let mut scripts = scripts.lock().unwrap();
    let Some(script) = scripts.get_mut(&resource) else {
        return (axum::http::StatusCode::NOT_FOUND, "no such resource").into_response();
    };
    if !watching {
        script.lists += 1;
        if matches!(script.replies.front(), Some(Reply::List(_))) {
            let Some(Reply::List(list)) = script.replies.pop_front() else {
                unreachable!()
            };
            script.last_list = Some(list);
        }
        let list = script
            .last_list
            .clone()
            .expect("each script starts with a list");
        return axum::Json(list).into_response();
    }
    script.watches += 1;
    let events = match script.replies.front() {
        Some(Reply::Watch(_)) => match script.replies.pop_front() {
            Some(Reply::Watch(events)) => events,
            _ => unreachable!(),
        },
        _ => Vec::new(),
    };
    // The API server ends a watch after an error event; otherwise the
    // stream stays open.
    let ends = events.last().is_some_and(|e| e["type"] == "ERROR");
    let lines = events.into_iter().map(|event| {
        Ok::<_, Infallible>(Bytes::from(format!(
            "{}\n",
            serde_json::to_string(&event).unwrap()
        )))
    });
    let body = if ends {
        Body::from_stream(stream::iter(lines))
    } else {
        use futures_util::StreamExt as _;
        Body::from_stream(stream::iter(lines).chain(stream::pending()))
    };
    Response::builder()
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

/// The fake API server's address.
async fn api_server(scripts: Scripts) -> String {
    let app = Router::new()
        .route("/api/v1/{resource}", get(answer))
        .route("/apis/mesh.io/v1/{resource}", get(answer))
        .with_state(scripts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{address}")
}

/// Every resource in the store as `reference -> document`, without the
/// revision.
async fn contents(store: &Store) -> BTreeMap<String, Value> {
    let mut all = BTreeMap::new();
    for kind in Kind::ALL {
        for mut resource in store.list(kind, None).await.unwrap() {
            resource.metadata_mut().resource_version = None;
            let document = serde_json::to_value(resource.to_document()).unwrap();
            all.insert(resource.reference(), document);
        }
    }
    all
}

fn managed(labels: Value) -> Value {
    let mut labels = labels;
    labels["mesh.io/managed-by"] = json!("kubernetes");
    labels
}

fn document(kind: &str, namespace: Option<&str>, name: &str, labels: Value, spec: Value) -> Value {
    let mut metadata = json!({"name": name, "labels": labels});
    if let Some(ns) = namespace {
        metadata["namespace"] = json!(ns);
    }
    let resource = Resource::from_document(
        serde_json::from_value(json!({
            "apiVersion": "mesh.io/v1", "kind": kind, "metadata": metadata, "spec": spec,
        }))
        .unwrap(),
    )
    .unwrap();
    serde_json::to_value(resource.to_document()).unwrap()
}

/// What the store must hold once the mirror has followed the recording.
fn expected() -> BTreeMap<String, Value> {
    let uid = |n: u32| format!("5f0c3a1e-9b2d-4c7e-8a1f-00000000000{n}");
    let ns = |name: &str, extra: Value| {
        let mut labels = json!({"kubernetes.io/metadata.name": name});
        if let Value::Object(extra) = extra {
            labels.as_object_mut().unwrap().extend(extra);
        }
        (
            format!("Namespace/{name}"),
            document("Namespace", None, name, managed(labels), json!({})),
        )
    };
    BTreeMap::from([
        ns("default", json!({})),
        ns("kube-system", json!({})),
        ns("legacy", json!({})),
        ns("shop", json!({"mesh.io/capture": "enabled"})),
        // Applied by hand, before the mirror started: left alone.
        (
            "ServicePolicy/shop/manual".into(),
            document(
                "ServicePolicy",
                Some("shop"),
                "manual",
                json!({}),
                json!({"timeout_ms": 750}),
            ),
        ),
        // The named target port resolved through the selected pods.
        (
            "Service/shop/reviews".into(),
            document(
                "Service",
                Some("shop"),
                "reviews",
                managed(json!({"app": "reviews"})),
                json!({"vip": "10.96.0.20", "ports": [{"name": "http", "port": 9080, "protocol": "http", "target_port": 8080}]}),
            ),
        ),
        // Added during the first watch; headless, so no vip.
        (
            "Service/shop/details".into(),
            document(
                "Service",
                Some("shop"),
                "details",
                managed(json!({})),
                json!({"ports": [{"name": "http-api", "port": 8000, "protocol": "http"}]}),
            ),
        ),
        // Its UDP port is not the mesh's.
        (
            "Service/kube-system/kube-dns".into(),
            document(
                "Service",
                Some("kube-system"),
                "kube-dns",
                managed(json!({"k8s-app": "kube-dns"})),
                json!({"vip": "10.96.0.10", "ports": [{"name": "dns-tcp", "port": 53, "protocol": "auto"}]}),
            ),
        ),
        (
            "Workload/shop/reviews-v2-5c6b4".into(),
            document(
                "Workload",
                Some("shop"),
                "reviews-v2-5c6b4",
                managed(json!({"app": "reviews", "version": "v2", "track": "canary"})),
                json!({"node": "node1", "ip": "10.89.1.2", "service_account": "reviews", "services": ["reviews"],
                       "version": "v2", "pod_uid": uid(2), "capture": {"exclude_outbound_ports": [5432, 6379]}}),
            ),
        ),
        // The ratings service went in the relist: the pod serves nothing.
        (
            "Workload/shop/ratings-8b7f6".into(),
            document(
                "Workload",
                Some("shop"),
                "ratings-8b7f6",
                managed(json!({"app": "ratings"})),
                json!({"node": "node1", "ip": "10.89.1.3", "service_account": "ratings", "pod_uid": uid(3)}),
            ),
        ),
        // In its grace period: still captured, no longer an endpoint of
        // reviews, which selects it.
        (
            "Workload/shop/reviews-v1-old-4d3c2".into(),
            document(
                "Workload",
                Some("shop"),
                "reviews-v1-old-4d3c2",
                managed(json!({"app": "reviews", "version": "v1"})),
                json!({"node": "node1", "ip": "10.89.1.5", "service_account": "reviews", "version": "v1",
                       "pod_uid": "5f0c3a1e-9b2d-4c7e-8a1f-00000000000a"}),
            ),
        ),
        // A split the mirror wrote earlier, which the cluster now holds in a
        // form the mesh refuses: the stored one is kept, not deleted.
        (
            "TrafficSplit/shop/broken".into(),
            document(
                "TrafficSplit",
                Some("shop"),
                "broken",
                managed(json!({})),
                json!({"destination": "reviews", "v1_weight": 90, "v2_weight": 10}),
            ),
        ),
        // Pending in the list, running in the watch.
        (
            "Workload/shop/details-v1-9c8d7".into(),
            document(
                "Workload",
                Some("shop"),
                "details-v1-9c8d7",
                managed(json!({"app": "details", "version": "v1"})),
                json!({"node": "ip-10-0-1-20.ec2.internal", "ip": "10.89.1.4", "service_account": "details", "services": ["details"],
                       "version": "v1", "pod_uid": uid(6)}),
            ),
        ),
        (
            "Workload/kube-system/coredns-6f6b679f8f-x7x2q".into(),
            document(
                "Workload",
                Some("kube-system"),
                "coredns-6f6b679f8f-x7x2q",
                managed(json!({"k8s-app": "kube-dns"})),
                json!({"node": "node0", "ip": "10.89.0.10", "service_account": "coredns", "services": ["kube-dns"],
                       "pod_uid": uid(4)}),
            ),
        ),
        (
            "ServicePolicy/shop/reviews".into(),
            document(
                "ServicePolicy",
                Some("shop"),
                "reviews",
                managed(json!({"team": "shop"})),
                json!({"retry_attempts": 2, "timeout_ms": 2000}),
            ),
        ),
        (
            "TrafficSplit/shop/reviews-canary".into(),
            document(
                "TrafficSplit",
                Some("shop"),
                "reviews-canary",
                managed(json!({})),
                json!({"destination": "reviews", "v1_weight": 50, "v2_weight": 50, "header_match": {"x-canary": "true"}}),
            ),
        ),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_converges_on_the_cluster_through_watches_and_a_relist() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("mesh.db").display());
    let store = Store::open(&url).await.unwrap();
    // Before the mirror: a namespace and a policy applied by hand, a
    // workload an earlier run of the mirror wrote for a pod gone since, and
    // a split it wrote that the cluster has since changed into one the
    // mesh refuses.
    let before = parse_documents(
        "apiVersion: mesh.io/v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {name: manual, namespace: shop}\nspec: {timeout_ms: 750}\n---\n\
         apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: gone-pod, namespace: shop, labels: {mesh.io/managed-by: kubernetes}}\n\
         spec: {node: node0, ip: 10.89.0.99}\n---\n\
         apiVersion: mesh.io/v1\nkind: TrafficSplit\nmetadata: {name: broken, namespace: shop, labels: {mesh.io/managed-by: kubernetes}}\n\
         spec: {destination: reviews, v1_weight: 90, v2_weight: 10}\n",
    )
    .unwrap();
    store.apply(&before).await.unwrap();

    let scripts = load_scripts();
    let api = api_server(scripts.clone()).await;
    let config = kube::Config::new(api.parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mirror = tokio::spawn(kubernetes::mirror(client, store.clone(), async {
        let _ = stop_rx.await;
    }));

    let want = expected();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = contents(&store).await;
    while got != want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = contents(&store).await;
    }
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    for (reference, document) in &want {
        if let Some(stored) = got.get(reference) {
            assert_eq!(stored, document, "{reference}");
        }
    }
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );

    // The services' watch expired: they were listed again, and the relist
    // is what removed the ratings service.
    {
        let scripts = scripts.lock().unwrap();
        assert_eq!(scripts["services"].lists, 2);
        assert!(scripts["services"].watches >= 2);
        assert_eq!(scripts["pods"].lists, 1);
    }
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(5), mirror)
        .await
        .expect("the mirror stops when told")
        .unwrap();
}
