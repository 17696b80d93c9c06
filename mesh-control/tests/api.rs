//! The admin API over real HTTP on loopback, against a SQLite store.

use std::{net::SocketAddr, sync::Arc};

use mesh_control::{
    api::{self, AppState, MAX_BODY},
    store::Store,
};
use reqwest::{Client, StatusCode};
use serde_json::Value;

const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

struct Server {
    addr: SocketAddr,
    http: Client,
    store: Store,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("mesh.db").display());
        let store = Store::open(&url).await.unwrap();
        let app = api::router(AppState {
            store: store.clone(),
            token: Arc::from(TOKEN),
            identity: None,
            service_ranges: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = mesh_api::http_server::Limits::default();
        tokio::spawn(mesh_api::http_server::serve(
            listener,
            app,
            limits,
            std::future::pending(),
        ));
        Self {
            addr,
            http: Client::new(),
            store,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn apply(&self, body: impl Into<String>) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.url("/api/v1/apply"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/yaml")
            .body(body.into())
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn revision(&self) -> i64 {
        self.get("/api/v1/revision").await.1["revision"]
            .as_i64()
            .unwrap()
    }
}

const SHOP: &str = "apiVersion: mesh.io/v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
apiVersion: mesh.io/v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec: {ports: [{port: 9080, protocol: http}]}\n---\n\
apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: reviews-v1, namespace: shop}\nspec: {node: node0, ip: 10.89.0.2, services: [reviews]}\n---\n\
apiVersion: mesh.io/v1\nkind: TrafficSplit\nmetadata: {name: reviews-canary, namespace: shop}\nspec: {destination: reviews, v1_weight: 95, v2_weight: 5}\n";

#[tokio::test]
async fn unauthenticated_requests_are_refused() {
    let server = Server::start().await;
    for token in [None, Some("wrong"), Some(&TOKEN[1..])] {
        let mut request = server.http.post(server.url("/api/v1/apply")).body(SHOP);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "unauthorized");
        let read = server
            .http
            .get(server.url("/api/v1/services"))
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(server.revision().await, 0);
    // Health and version stay open, for probes.
    let health = server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn invalid_documents_are_refused_with_every_problem_and_change_nothing() {
    let server = Server::start().await;
    let bad = format!(
        "{SHOP}---\napiVersion: mesh.io/v1\nkind: TrafficSplit\nmetadata: {{name: reviews}}\nspec: {{destination: reviews, v2_weight: -5}}\n---\n\
         apiVersion: mesh.io/v1\nkind: Service\nmetadata: {{name: x}}\nspec: {{ports: [{{port: 80}}], load_balancer: random}}\n"
    );
    let (status, body) = server.apply(bad).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid");
    let problems = body["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2);
    assert_eq!(problems[0]["resource"], "TrafficSplit/reviews");
    assert_eq!(problems[0]["errors"][0]["field"], "spec.v2_weight");
    assert_eq!(problems[0]["errors"][0]["message"], "must be >= 0 (got -5)");
    assert_eq!(problems[1]["errors"][0]["field"], "spec.load_balancer");
    assert_eq!(server.revision().await, 0);
    assert_eq!(
        server.get("/api/v1/services?namespace=shop").await.1["items"],
        Value::Array(vec![])
    );
}

#[tokio::test]
async fn hostile_documents_are_refused_whole_with_the_reason() {
    let server = Server::start().await;
    // 100,000 levels of brackets; indentation 1,000 levels deep; nine
    // levels of nine aliases ("billion laughs"): each beside a valid
    // document that must not be applied either.
    let brackets = format!(
        "{SHOP}---\n{{\"apiVersion\": \"mesh.io/v1\", \"kind\": \"ServicePolicy\", \"spec\": {}1{}}}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let mut indented = format!(
        "{SHOP}---\napiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {{name: a, namespace: shop}}\nspec:\n"
    );
    for level in 1..1_000 {
        indented.push_str(&" ".repeat(level));
        indented.push_str("x:\n");
    }
    let mut laughs = format!(
        "{SHOP}---\napiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {{name: a, namespace: shop}}\n\
         x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    );
    for level in 1..10 {
        let previous = format!("*a{}", level - 1);
        let list = [previous.as_str(); 9].join(", ");
        laughs.push_str(&format!("x{level}: &a{level} [{list}]\n"));
    }
    laughs.push_str("spec: {retry_attempts: *a9}\n");
    for (what, document, reason) in [
        ("brackets", brackets, "nested deeper than 64 levels"),
        ("indentation", indented, "recursion limit exceeded"),
        ("aliases", laughs, "repetition limit exceeded"),
    ] {
        assert!(
            document.len() < MAX_BODY,
            "{what}: {} bytes",
            document.len()
        );
        let (status, body) = server.apply(document).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert_eq!(body["error"], "invalid", "{what}: {body}");
        assert!(body.to_string().contains(reason), "{what}: {body}");
    }
    assert_eq!(server.revision().await, 0);
}

#[tokio::test]
async fn a_service_address_outside_the_service_ranges_is_refused() {
    let server = Server::start().await;
    let service = |vip: &str| {
        format!(
            "{SHOP}---\napiVersion: mesh.io/v1\nkind: Service\nmetadata: {{name: ratings, namespace: shop}}\n\
             spec: {{vip: {vip}, ports: [{{port: 80}}]}}\n"
        )
    };
    // A real host's address: every captured pod's connections to it would
    // go to the service.
    let (status, body) = server.apply(service("93.184.215.14")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let problems = body["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{body}");
    assert_eq!(problems[0]["document"], 5);
    assert_eq!(problems[0]["resource"], "Service/ratings");
    assert_eq!(problems[0]["errors"][0]["field"], "spec.vip");
    let message = problems[0]["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("outside the cluster's service ranges (10.96.0.0/12, fd00:10:96::/112)")
            && message.contains("--service-cidr"),
        "{message}"
    );
    assert_eq!(server.revision().await, 0, "nothing of the apply was kept");
    for vip in ["10.96.0.40", "fd00:10:96::28"] {
        let (status, body) = server.apply(service(vip)).await;
        assert_eq!(status, StatusCode::OK, "{vip}: {body}");
    }
}

#[tokio::test]
async fn golden_signals_are_summed_from_the_nodes_reports() {
    use mesh_control::store::EdgeReport;
    let server = Server::start().await;
    let report = |node_share: u64, source: &str, service: &str, errors: u64| {
        let mut latency = vec![0; mesh_model::stats::LATENCY_BOUNDS.len() + 1];
        latency[6] = node_share; // (0.75, 1] ms
        EdgeReport {
            source_namespace: "shop".into(),
            source_workload: source.into(),
            namespace: "shop".into(),
            service: service.into(),
            requests: node_share,
            errors,
            latency,
            interval_ms: 10_000,
        }
    };
    let store = &server.store;
    store
        .record_request_stats("node0", &[report(600, "frontend", "reviews", 6)])
        .await
        .unwrap();
    store
        .record_request_stats(
            "node1",
            &[
                report(400, "frontend", "reviews", 4),
                report(50, "web", "ratings", 0),
            ],
        )
        .await
        .unwrap();

    let (status, body) = server.get("/api/v1/stats?window=60s&namespace=shop").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["window_seconds"], 60);
    let reviews = &body["items"][0];
    assert_eq!(reviews["service"], "reviews", "{body}");
    assert_eq!(reviews["requests"], 1000);
    assert!((reviews["requests_per_second"].as_f64().unwrap() - 1000.0 / 60.0).abs() < 1e-9);
    assert!((reviews["error_rate"].as_f64().unwrap() - 0.01).abs() < 1e-9);
    let p50 = reviews["p50_ms"].as_f64().unwrap();
    assert!(p50 > 0.75 && p50 <= 1.0, "{p50}");
    assert!(reviews.get("source").is_none());

    let (_, one) = server.get("/api/v1/stats?service=ratings").await;
    assert_eq!(one["items"].as_array().unwrap().len(), 1, "{one}");
    let (_, edges) = server.get("/api/v1/stats?by=edge").await;
    let sources: Vec<&str> = edges["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["shop/frontend", "shop/web"]);

    for bad in ["window=0s", "window=2h", "window=soon", "by=pod", "other=1"] {
        let (status, body) = server.get(&format!("/api/v1/stats?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_and_odd_bodies_400_or_415() {
    let server = Server::start().await;
    let (status, body) = server.apply("#".repeat(MAX_BODY + 1)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"], "too_large");

    let response = server
        .http
        .post(server.url("/api/v1/apply"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/yaml")
        .body(vec![0xff, 0xfe, 0x00])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let response = server
        .http
        .post(server.url("/api/v1/apply"))
        .bearer_auth(TOKEN)
        .header("content-type", "text/html")
        .body(SHOP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let (status, _) = server.apply("").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(server.revision().await, 0);
}

#[tokio::test]
async fn resources_are_created_read_listed_described_and_deleted() {
    let server = Server::start().await;
    let (status, body) = server.apply(SHOP).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["revision"], 1);
    assert_eq!(
        body["results"][3]["resource"],
        "TrafficSplit/shop/reviews-canary"
    );
    assert_eq!(body["results"][3]["action"], "created");

    let (status, split) = server.get("/api/v1/ts/reviews-canary?namespace=shop").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(split["spec"]["v2_weight"], 5);
    assert_eq!(split["metadata"]["resource_version"], 1);

    let (_, list) = server.get("/api/v1/workloads").await;
    assert_eq!(list["items"][0]["metadata"]["name"], "reviews-v1");

    let (status, described) = server
        .get("/api/v1/services/reviews/describe?namespace=shop")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        described["traffic_splits"][0]["metadata"]["name"],
        "reviews-canary"
    );
    assert_eq!(described["endpoints"][0]["ip"], "10.89.0.2");
    assert!(described["policy"].is_null());

    let (status, missing) = server
        .get("/api/v1/trafficsplits/nope?namespace=shop")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(missing["message"], "TrafficSplit/shop/nope not found");
    let (status, _) = server.get("/api/v1/gateways").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let delete = |path: &str| {
        server
            .http
            .delete(server.url(path))
            .bearer_auth(TOKEN)
            .send()
    };
    let response = delete("/api/v1/trafficsplits/reviews-canary?namespace=shop")
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = delete("/api/v1/trafficsplits/reviews-canary?namespace=shop")
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = delete("/api/v1/namespaces/shop").await.unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(server.revision().await, 2);
}

#[tokio::test]
async fn stale_updates_conflict() {
    let server = Server::start().await;
    server.apply(SHOP).await;
    server
        .apply(SHOP.replace("v2_weight: 5", "v2_weight: 10"))
        .await;
    let stale = SHOP.replace(
        "metadata: {name: reviews-canary, namespace: shop}",
        "metadata: {name: reviews-canary, namespace: shop, resource_version: 1}",
    );
    let (status, body) = server.apply(stale).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("changed at revision 2"),
        "{body}"
    );
    assert_eq!(server.revision().await, 2);
}

#[tokio::test]
async fn certificates_need_a_ca() {
    let server = Server::start().await;
    let response = server
        .http
        .post(server.url("/api/v1/certificates"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"namespace": "edge", "service_account": "gateway"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (status, list) = server.get("/api/v1/certificates").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["items"], serde_json::json!([]));
}
