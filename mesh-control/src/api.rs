//! The admin API: Kubernetes-style resources over HTTP for meshctl. Bound
//! to loopback by default; every `/api` route needs the admin bearer token.
//!
//! | route | does |
//! |---|---|
//! | `POST /api/v1/apply[?dry_run=true]` | create or update every document of a YAML/JSON body, all or nothing (or only check) |
//! | `GET /api/v1/{kind}[?namespace=]` | list (all namespaces unless one is named) |
//! | `GET /api/v1/{kind}/{name}[?namespace=]` | one resource |
//! | `DELETE /api/v1/{kind}/{name}[?namespace=]` | delete one resource |
//! | `GET /api/v1/services/{name}/describe[?namespace=]` | a service with what applies to it |
//! | `PUT /api/v1/services/{name}/endpoints/health[?namespace=]` | mark one endpoint (`{ip, port, healthy}`) healthy or not (the operator's marking; callers use an endpoint marked healthy that its node observes ready) |
//! | `GET /api/v1/revision` | the store's revision |
//! | `GET /api/v1/certificates[?service_name=]` | what the CA issued (never keys) |
//! | `POST /api/v1/certificates` | issue with a CA-generated key (gateways, VMs) |
//! | `POST /api/v1/nodes/tokens` | make a node bootstrap token (shown once) |
//! | `GET /api/v1/nodes/tokens` | the bootstrap tokens, without secrets |
//! | `DELETE /api/v1/nodes/tokens/{id}` | revoke one |
//! | `GET /api/v1/ca` | the trust domain, certificate lifetime and roots |
//! | `POST /api/v1/ca/rotate-root` | stage a new root, or (`activate`) make it sign |
//! | `POST /api/v1/ca/retire-root` | drop an old root from the bundle |
//! | `GET /api/v1/proxy-status` | each node's configuration: SYNCED, STALE, NACKED or DISCONNECTED |
//! | `GET /healthz`, `GET /version` | unauthenticated |

mod auth;
mod ca;
mod certificates;
mod error;
mod nodes;

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    middleware::from_fn_with_state,
    routing::{get, post},
};
use mesh_model::{
    Document, Kind, Resource, parse_documents_checked, resource::DEFAULT_NAMESPACE,
    service::ServiceRanges,
};
use serde::{Deserialize, Serialize};

pub use auth::generate_token;
pub use certificates::Identity;
pub use error::{ApiError, DisplayChain};

use crate::store::{ApplyOutcome, Endpoint, Store};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// Most documents one apply may carry.
pub const MAX_DOCUMENTS: usize = 1000;

/// `Query`, refused with the API's JSON error (an unknown or malformed
/// parameter names itself) instead of axum's plain text.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        let Query(value) = Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    pub store: Store,
    pub token: Arc<str>,
    /// The CA, for `/api/v1/certificates`; without it those routes answer 503.
    pub identity: Option<Arc<Identity>>,
    /// Where services' addresses may come from.
    pub service_ranges: Arc<ServiceRanges>,
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/revision", get(revision))
        .route("/apply", post(apply))
        .route("/services/{name}/describe", get(describe_service))
        .route(
            "/services/{name}/endpoints/health",
            axum::routing::put(set_endpoint_health),
        )
        .route(
            "/certificates",
            get(certificates::list).post(certificates::issue),
        )
        .route("/proxy-status", get(proxy_status))
        .route("/stats", get(stats))
        .route("/ca", get(ca::get))
        .route("/ca/rotate-root", post(ca::rotate))
        .route("/ca/retire-root", post(ca::retire))
        .route("/nodes/tokens", get(nodes::list).post(nodes::create))
        .route("/nodes/tokens/{id}", axum::routing::delete(nodes::delete))
        .route("/{kind}", get(list))
        .route("/{kind}/{name}", get(get_one).delete(delete))
        .route_layer(from_fn_with_state(state.clone(), auth::require_token))
        .layer(DefaultBodyLimit::max(MAX_BODY));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/version", get(version))
        .nest("/api/v1", api)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(state)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scope {
    namespace: Option<String>,
}

async fn version(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "backend": state.store.backend().name(),
    }))
}

/// One node in `GET /api/v1/proxy-status`.
#[derive(Debug, Serialize)]
pub struct ProxyStatus {
    pub node: String,
    /// `SYNCED` (holds the current revision), `STALE` (behind it),
    /// `NACKED` (rejected a push: see `reason`), `DISCONNECTED`.
    pub state: &'static str,
    pub synced_revision: Option<i64>,
    pub reason: Option<String>,
    pub replica: String,
    pub last_seen: String,
    /// Where the node's admin endpoint listens, as it reported.
    pub admin: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    /// How far back: a duration like `60s` or `5m` (at most `1h`).
    window: Option<String>,
    /// `service` (the default) or `edge` (per calling workload).
    by: Option<String>,
    namespace: Option<String>,
    service: Option<String>,
}

/// `GET /api/v1/stats`: golden signals summed from the nodes' reports.
async fn stats(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<StatsQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let window = match query.window.as_deref() {
        None => std::time::Duration::from_secs(60),
        Some(text) => mesh_model::duration::parse_duration(text)
            .map_err(|why| ApiError::BadRequest(format!("window: {why}")))?,
    };
    if window < std::time::Duration::from_secs(1) || window > std::time::Duration::from_secs(3600) {
        return Err(ApiError::BadRequest(
            "window: must be 1s to 1h (reports are kept an hour)".into(),
        ));
    }
    let by_edge = match query.by.as_deref() {
        None | Some("service") => false,
        Some("edge") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "by: {other:?} is not one of service, edge"
            )));
        }
    };
    let items: Vec<crate::store::Signals> = state
        .store
        .request_signals(window, by_edge)
        .await?
        .into_iter()
        .filter(|s| query.namespace.as_ref().is_none_or(|n| *n == s.namespace))
        .filter(|s| query.service.as_ref().is_none_or(|n| *n == s.service))
        .collect();
    Ok(Json(serde_json::json!({
        "window_seconds": window.as_secs(),
        "by": if by_edge { "edge" } else { "service" },
        "items": items,
    })))
}

/// The node states `proxy-status` shows, in its order.
const NODE_STATES: [&str; 4] = ["SYNCED", "STALE", "NACKED", "DISCONNECTED"];

/// Where node `n` stands against `revision`.
fn node_state(n: &crate::store::NodeConfigStatus, revision: i64) -> &'static str {
    if !n.connected {
        "DISCONNECTED"
    } else if n.nack_revision.is_some() {
        "NACKED"
    } else if n.synced_revision == Some(revision) {
        "SYNCED"
    } else {
        "STALE"
    }
}

/// `GET /metrics` (no token, as `/healthz`): the control plane's state in
/// the Prometheus text format.
async fn metrics(State(state): State<AppState>) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse as _;
    use std::fmt::Write as _;
    let revision = state.store.revision().await?;
    let nodes = state.store.node_statuses().await?;
    let mut text = format!(
        "# HELP mesh_control_revision The store's configuration revision.\n\
         # TYPE mesh_control_revision gauge\n\
         mesh_control_revision {revision}\n\
         # HELP mesh_control_nodes Nodes known to the control plane, by where their configuration stands.\n\
         # TYPE mesh_control_nodes gauge\n"
    );
    for name in NODE_STATES {
        let count = nodes
            .iter()
            .filter(|n| node_state(n, revision) == name)
            .count();
        let _ = writeln!(
            text,
            "mesh_control_nodes{{state=\"{}\"}} {count}",
            name.to_ascii_lowercase()
        );
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn proxy_status(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let revision = state.store.revision().await?;
    let nodes: Vec<ProxyStatus> = state
        .store
        .node_statuses()
        .await?
        .into_iter()
        .map(|n| ProxyStatus {
            state: node_state(&n, revision),
            node: n.node,
            synced_revision: n.synced_revision,
            reason: n.nack_reason,
            replica: n.replica,
            last_seen: n.last_seen,
            admin: n.admin_address,
        })
        .collect();
    Ok(Json(
        serde_json::json!({ "revision": revision, "nodes": nodes }),
    ))
}

async fn revision(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(
        serde_json::json!({ "revision": state.store.revision().await? }),
    ))
}

fn kind(name: &str) -> Result<Kind, ApiError> {
    Kind::from_cli(name).ok_or_else(|| {
        let known: Vec<String> = Kind::ALL.iter().map(|k| k.plural()).collect();
        ApiError::NotFound(format!(
            "unknown kind {name:?}; known: {}",
            known.join(", ")
        ))
    })
}

/// The namespace a namespaced request addresses.
fn namespace_of(kind: Kind, scope: &Scope) -> Option<&str> {
    kind.namespaced()
        .then(|| scope.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE))
}

#[derive(Debug, Serialize)]
struct ApplyResult {
    resource: String,
    action: crate::store::Applied,
}

#[derive(Debug, Serialize)]
struct ApplyResponse {
    revision: i64,
    /// Checked and rolled back: nothing changed.
    dry_run: bool,
    results: Vec<ApplyResult>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyQuery {
    #[serde(default)]
    dry_run: bool,
}

impl ApplyResponse {
    fn new(outcome: ApplyOutcome, dry_run: bool) -> Self {
        Self {
            revision: outcome.revision,
            dry_run,
            results: outcome
                .results
                .into_iter()
                .map(|(resource, action)| ApplyResult { resource, action })
                .collect(),
        }
    }
}

async fn apply(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ApplyQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ApplyResponse>, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(MAX_BODY)
        } else {
            ApiError::BadRequest(rejection.body_text())
        }
    })?;
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let content_type = content_type.to_str().unwrap_or("?");
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if !matches!(
            essence,
            "application/yaml"
                | "application/x-yaml"
                | "text/yaml"
                | "application/json"
                | "text/plain"
        ) {
            return Err(ApiError::UnsupportedMediaType(content_type.to_owned()));
        }
    }
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not UTF-8: {e}")))?;
    let resources = parse_documents_checked(text, |resource| state.service_ranges.check(resource))
        .map_err(ApiError::Invalid)?;
    if resources.is_empty() {
        return Err(ApiError::BadRequest("the body holds no documents".into()));
    }
    if resources.len() > MAX_DOCUMENTS {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_DOCUMENTS} documents per apply (got {})",
            resources.len()
        )));
    }
    if query.dry_run {
        let outcome = state.store.dry_run(&resources).await?;
        return Ok(Json(ApplyResponse::new(outcome, true)));
    }
    let outcome = state.store.apply(&resources).await?;
    tracing::info!(
        revision = outcome.revision,
        documents = resources.len(),
        "applied"
    );
    Ok(Json(ApplyResponse::new(outcome, false)))
}

#[derive(Debug, Serialize)]
struct List {
    items: Vec<Document>,
}

async fn list(
    State(state): State<AppState>,
    Path(kind_name): Path<String>,
    ApiQuery(scope): ApiQuery<Scope>,
) -> Result<Json<List>, ApiError> {
    let kind = kind(&kind_name)?;
    let namespace = if kind.namespaced() {
        scope.namespace.as_deref()
    } else {
        None
    };
    let items = state.store.list(kind, namespace).await?;
    Ok(Json(List {
        items: items.iter().map(Resource::to_document).collect(),
    }))
}

async fn get_one(
    State(state): State<AppState>,
    Path((kind_name, name)): Path<(String, String)>,
    ApiQuery(scope): ApiQuery<Scope>,
) -> Result<Json<Document>, ApiError> {
    let kind = kind(&kind_name)?;
    let namespace = namespace_of(kind, &scope);
    match state.store.get(kind, namespace, &name).await? {
        Some(resource) => Ok(Json(resource.to_document())),
        None => Err(ApiError::NotFound(
            reference(kind, namespace, &name) + " not found",
        )),
    }
}

async fn delete(
    State(state): State<AppState>,
    Path((kind_name, name)): Path<(String, String)>,
    ApiQuery(scope): ApiQuery<Scope>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let kind = kind(&kind_name)?;
    let namespace = namespace_of(kind, &scope);
    let revision = state.store.delete(kind, namespace, &name).await?;
    tracing::info!(revision, resource = %reference(kind, namespace, &name), "deleted");
    Ok(Json(serde_json::json!({ "revision": revision })))
}

fn reference(kind: Kind, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{kind}/{ns}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

/// A service and everything that applies to it.
#[derive(Debug, Serialize)]
pub struct ServiceDescription {
    pub service: Document,
    pub policy: Option<Document>,
    pub traffic_splits: Vec<Document>,
    pub authorization_policies: Vec<Document>,
    pub workloads: Vec<Document>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointHealth {
    ip: std::net::IpAddr,
    port: u16,
    healthy: bool,
}

/// Marks one endpoint healthy or not; nodes calling the service are told
/// through the configuration push.
async fn set_endpoint_health(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(scope): ApiQuery<Scope>,
    Json(request): Json<EndpointHealth>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let namespace = scope.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    let revision = state
        .store
        .set_endpoint_health(
            &format!("{name}.{namespace}"),
            request.ip,
            request.port,
            request.healthy,
        )
        .await?;
    tracing::info!(
        service = %format!("{namespace}/{name}"),
        endpoint = %std::net::SocketAddr::new(request.ip, request.port),
        healthy = request.healthy,
        revision,
        "endpoint health set"
    );
    Ok(Json(serde_json::json!({ "revision": revision })))
}

async fn describe_service(
    State(state): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(scope): ApiQuery<Scope>,
) -> Result<Json<ServiceDescription>, ApiError> {
    let namespace = scope.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    let store = &state.store;
    let Some(service) = store.get(Kind::Service, Some(namespace), &name).await? else {
        return Err(ApiError::NotFound(format!(
            "Service/{namespace}/{name} not found"
        )));
    };
    let policy = store
        .get(Kind::ServicePolicy, Some(namespace), &name)
        .await?;
    let traffic_splits = store
        .list(Kind::TrafficSplit, Some(namespace))
        .await?
        .into_iter()
        .filter(|r| matches!(r, Resource::TrafficSplit(s) if s.spec.destination == name))
        .collect::<Vec<_>>();
    let authorization_policies = store
        .list(Kind::AuthorizationPolicy, Some(namespace))
        .await?
        .into_iter()
        .filter(|r| {
            matches!(r, Resource::AuthorizationPolicy(p)
                if p.spec.target.as_deref().is_none_or(|t| t == name))
        })
        .collect::<Vec<_>>();
    let workloads = store
        .list(Kind::Workload, Some(namespace))
        .await?
        .into_iter()
        .filter(|r| matches!(r, Resource::Workload(w) if w.spec.services.contains(&name)))
        .collect::<Vec<_>>();
    let endpoints = store.endpoints(&format!("{name}.{namespace}")).await?;
    Ok(Json(ServiceDescription {
        service: service.to_document(),
        policy: policy.as_ref().map(Resource::to_document),
        traffic_splits: traffic_splits.iter().map(Resource::to_document).collect(),
        authorization_policies: authorization_policies
            .iter()
            .map(Resource::to_document)
            .collect(),
        workloads: workloads.iter().map(Resource::to_document).collect(),
        endpoints,
    }))
}
