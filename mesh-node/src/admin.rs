//! The node's admin endpoint: health, the capture state, the connections,
//! the certificates (never their keys) and the configuration as JSON,
//! Prometheus metrics, and two switches (`PUT /ebpf-logs`,
//! `PUT /http-access-log`). It binds to loopback by default; anywhere
//! else every route but `/healthz` and `/metrics` needs the admin bearer
//! token. [`metrics_router`] serves just those two, for a scraper on the
//! pod network.

use std::{
    fmt::Write as _,
    sync::{Arc, RwLock, atomic::Ordering},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use mesh_common::capture::Counter;
use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::sync::watch;

use mesh_model::config::NodeConfig;

use crate::{
    capture::{Capture, PodConnects},
    identity::CertState,
};

/// The capture state the admin endpoint reads.
pub type SharedCapture = Arc<RwLock<Capture>>;

/// Whose certificate a manager keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Holder {
    Node,
    Workload,
}

impl Holder {
    fn name(self) -> &'static str {
        match self {
            Holder::Node => "node",
            Holder::Workload => "workload",
        }
    }
}

/// A certificate manager the admin endpoint reports on.
#[derive(Clone, Debug)]
pub struct Tracked {
    pub holder: Holder,
    /// The node's name, or the workload as `namespace/name`.
    pub name: String,
    pub state: watch::Receiver<CertState>,
}

/// The certificate managers the admin endpoint reports on.
pub type SharedTracked = Arc<RwLock<Vec<Tracked>>>;

fn reports(tracked: &SharedTracked) -> Vec<CertificateReport> {
    tracked
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(report)
        .collect()
}

/// Turns the eBPF programs' debug records (and their log filter) on or off.
#[derive(Clone)]
pub struct LogSwitch(pub Arc<dyn Fn(bool) -> Result<(), String> + Send + Sync>);

impl std::fmt::Debug for LogSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogSwitch")
    }
}

/// What the admin endpoint reads from.
#[derive(Clone, Debug, Default)]
pub struct AdminState {
    /// `None` when the node runs without capture (no `--cgroup`).
    pub capture: Option<SharedCapture>,
    /// Switches the eBPF debug records; `None` without capture.
    pub ebpf_logs: Option<LogSwitch>,
    /// The proxy's connections; `None` without capture.
    pub connections: Option<Arc<crate::proxy::Connections>>,
    /// The HBONE tunnels' counts; `None` without a control plane.
    pub tunnels: Option<Arc<crate::hbone::HboneStats>>,
    /// The mesh data path (for the HTTP path's counts); `None` without a
    /// control plane or capture.
    pub mesh: Option<Arc<crate::proxy::MeshPath>>,
    /// The node's and its workloads' certificate managers, as they come
    /// and go.
    pub certificates: SharedTracked,
    /// The pushed configuration and the stream's state; `None` without a
    /// control plane.
    pub config: Option<(
        watch::Receiver<Arc<NodeConfig>>,
        watch::Receiver<crate::xds::XdsStatus>,
    )>,
    /// The revision whose pods were last all captured (see
    /// [`crate::pods::CaptureFollower::synced`]); `None` without a control
    /// plane or capture.
    pub captured: Option<watch::Receiver<Option<i64>>>,
}

/// The admin routes; with a `token`, every route but `/healthz` and
/// `/metrics` asks for it (`Authorization: Bearer <token>`).
pub fn router(state: AdminState, token: Option<Arc<str>>) -> Router {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/ready", get(ready))
        .route("/capture", get(capture_state))
        .route("/connections", get(connections))
        .route("/ebpf-logs", get(ebpf_logs).put(set_ebpf_logs))
        .route(
            "/http-access-log",
            get(http_access_log).put(set_http_access_log),
        )
        .route("/certificates", get(certificates))
        .route("/config", get(config))
        .route("/config/dump", get(config_dump))
        .route("/metrics", get(metrics))
        .with_state(state);
    match token {
        Some(token) => router.layer(axum::middleware::from_fn_with_state(token, require_token)),
        None => router,
    }
}

/// `/healthz` and `/metrics` alone: read-only, for a scraper.
pub fn metrics_router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /ready`: 200 once the node serves its pods: the first
/// configuration has arrived, the pods it lists are captured, and every
/// certificate of the node and of those workloads is held; else 503 with
/// what is missing. A rolling update with a surge stops the old proxy only
/// once the new one is ready, so no new connection finds a pod without a
/// proxy, or a proxy without the pod's certificate.
async fn ready(State(state): State<AdminState>) -> Response {
    let missing = not_ready(&state);
    if missing.is_empty() {
        return "ready\n".into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {}\n", missing.join("; ")),
    )
        .into_response()
}

/// What keeps the node from being ready (see [`ready`]).
fn not_ready(state: &AdminState) -> Vec<String> {
    let mut missing = Vec::new();
    let reports = reports(&state.certificates);
    let held = |name: &str| reports.iter().any(|r| r.name == name && r.serial.is_some());
    if let Some((config, status)) = &state.config {
        let config = config.borrow().clone();
        if status.borrow().acks == 0 {
            missing.push("no configuration from the control plane yet".to_owned());
        } else {
            let captured = state.captured.as_ref().map(|c| *c.borrow());
            if captured.is_some_and(|synced| synced < Some(config.revision)) {
                missing.push("the configuration's pods are not captured yet".to_owned());
            }
            let without: Vec<String> = crate::workloads::listed(&config)
                .into_iter()
                .map(|(namespace, name)| format!("{namespace}/{name}"))
                .filter(|workload| !held(workload))
                .collect();
            if !without.is_empty() {
                missing.push(format!("no certificate yet for {}", without.join(", ")));
            }
        }
    }
    for report in &reports {
        if report.holder == Holder::Node && report.serial.is_none() {
            missing.push("no node certificate yet".to_owned());
        }
    }
    missing
}

/// Refuses every request but `/healthz` and `/metrics` without the right
/// bearer token.
async fn require_token(
    State(token): State<Arc<str>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if matches!(request.uri().path(), "/healthz" | "/metrics") {
        return next.run(request).await;
    }
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    if mesh_identity::secret::bearer_matches(authorization, &token) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "missing or wrong bearer token: send the one in the node's --admin-token-file\n",
    )
        .into_response()
}

/// One entry of `GET /certificates`.
#[derive(Debug, Serialize)]
pub struct CertificateReport {
    pub holder: Holder,
    pub name: String,
    pub spiffe_id: Option<String>,
    pub serial: Option<String>,
    pub not_after: Option<String>,
    pub next_renewal: Option<String>,
    /// The previous certificate is still served (the overlap window).
    pub overlapping: bool,
    pub rotations: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    pub expired: bool,
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

fn report(tracked: &Tracked) -> CertificateReport {
    let state = tracked.state.borrow();
    let current = state.current.as_ref();
    CertificateReport {
        holder: tracked.holder,
        name: tracked.name.clone(),
        spiffe_id: current.map(|c| c.identity.to_string()),
        serial: current.map(|c| c.serial.clone()),
        not_after: current.map(|c| rfc3339(c.not_after)),
        next_renewal: state.next_renewal.map(rfc3339),
        overlapping: state.previous.is_some(),
        rotations: state.rotations,
        failures: state.failures,
        last_error: state.last_error.clone(),
        expired: state.expired,
    }
}

/// `GET /config`: the revision, every resource's name and version, and the
/// stream's state.
async fn config(State(state): State<AdminState>) -> Response {
    let Some((config, status)) = &state.config else {
        return no_config();
    };
    let config = config.borrow().clone();
    let status = status.borrow().clone();
    Json(serde_json::json!({
        "revision": config.revision,
        "resources": config.versions(),
        "stream": status,
    }))
    .into_response()
}

/// The answer of the configuration's routes on a node without a control
/// plane.
fn no_config() -> Response {
    (
        StatusCode::NOT_FOUND,
        "no configuration: mesh-node runs without --control-plane\n",
    )
        .into_response()
}

/// `GET /config/dump`: the revision and every resource the node holds,
/// with its version and content (`meshctl proxy-config` reads it).
async fn config_dump(State(state): State<AdminState>) -> Response {
    use mesh_model::config::ConfigResource;
    let Some((config, _)) = &state.config else {
        return no_config();
    };
    let config = config.borrow().clone();
    let resources: serde_json::Map<String, serde_json::Value> = config
        .resources
        .iter()
        .map(|(name, (version, resource))| {
            let content = match resource.as_ref() {
                ConfigResource::Object(object) => serde_json::to_value(object.to_document()),
                ConfigResource::Endpoints(set) => serde_json::to_value(set),
                ConfigResource::Address(address) => serde_json::to_value(address),
            }
            .unwrap_or_else(|e| serde_json::Value::String(format!("unprintable: {e}")));
            (
                name.clone(),
                serde_json::json!({ "version": version, "resource": content }),
            )
        })
        .collect();
    Json(serde_json::json!({
        "revision": config.revision,
        "resources": resources,
    }))
    .into_response()
}

async fn certificates(State(state): State<AdminState>) -> Json<Vec<CertificateReport>> {
    Json(reports(&state.certificates))
}

/// `GET /capture`: the cgroup, the programs' counters and every captured pod.
#[derive(Debug, Serialize)]
pub struct CaptureState {
    pub cgroup: String,
    pub counters: std::collections::BTreeMap<&'static str, u64>,
    pub pods: Vec<PodConnects>,
}

async fn capture_state(State(state): State<AdminState>) -> Response {
    let Some(capture) = &state.capture else {
        return capture_off();
    };
    match read_state(capture) {
        Ok(state) => Json(state).into_response(),
        Err(error) => internal_error(error),
    }
}

/// The body of `GET`/`PUT /ebpf-logs` and `/http-access-log`.
#[derive(Debug, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Switch {
    pub enabled: bool,
}

/// A `PUT` of a [`Switch`], or the message of the 400 that says what was
/// expected.
fn switch(
    body: Result<Json<Switch>, axum::extract::rejection::JsonRejection>,
) -> Result<bool, String> {
    body.map(|Json(switch)| switch.enabled)
        .map_err(|rejection| {
            format!(
                "expected {{\"enabled\": true|false}}: {}\n",
                rejection.body_text()
            )
        })
}

async fn ebpf_logs(State(state): State<AdminState>) -> Response {
    let Some(capture) = &state.capture else {
        return capture_off();
    };
    let enabled = capture
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .debug_logs();
    match enabled {
        Ok(enabled) => Json(Switch { enabled }).into_response(),
        Err(error) => internal_error(error.to_string()),
    }
}

/// `PUT /ebpf-logs {"enabled": true}`: the programs' debug records, on or
/// off at once, without reloading anything.
async fn set_ebpf_logs(
    State(state): State<AdminState>,
    body: Result<Json<Switch>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(toggle) = &state.ebpf_logs else {
        return capture_off();
    };
    let enabled = match switch(body) {
        Ok(enabled) => enabled,
        Err(why) => return (StatusCode::BAD_REQUEST, why).into_response(),
    };
    match (toggle.0)(enabled) {
        Ok(()) => {
            tracing::info!(enabled, "eBPF debug records switched");
            Json(Switch { enabled }).into_response()
        }
        Err(error) => internal_error(error),
    }
}

/// `GET /http-access-log`: whether each HTTP request is logged (target
/// `mesh_http_access`: pod, direction, service or caller, method, path,
/// status, flags, body bytes each way, time to the response's end).
async fn http_access_log(State(state): State<AdminState>) -> Response {
    match &state.mesh {
        Some(mesh) => Json(Switch {
            enabled: mesh.http.access_log.load(Ordering::Relaxed),
        })
        .into_response(),
        None => no_mesh_path(),
    }
}

/// `PUT /http-access-log {"enabled": true}`: the records on or off at
/// once.
async fn set_http_access_log(
    State(state): State<AdminState>,
    body: Result<Json<Switch>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(mesh) = &state.mesh else {
        return no_mesh_path();
    };
    let enabled = match switch(body) {
        Ok(enabled) => enabled,
        Err(why) => return (StatusCode::BAD_REQUEST, why).into_response(),
    };
    mesh.http.access_log.store(enabled, Ordering::Relaxed);
    tracing::info!(enabled, "HTTP access records switched");
    Json(Switch { enabled }).into_response()
}

fn no_mesh_path() -> Response {
    (
        StatusCode::NOT_FOUND,
        "this node carries no mesh traffic (mesh-node runs without --cgroup or --control-plane)\n",
    )
        .into_response()
}

fn capture_off() -> Response {
    (
        StatusCode::NOT_FOUND,
        "capture is off on this node (mesh-node runs without --cgroup)\n",
    )
        .into_response()
}

/// `GET /connections`: the connections the proxy carries now, with where
/// each was going.
async fn connections(State(state): State<AdminState>) -> Response {
    match &state.connections {
        Some(connections) => Json(connections.open()).into_response(),
        None => capture_off(),
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut text = String::new();
    if let Some(capture) = &state.capture {
        match read_state(capture) {
            Ok(capture) => text.push_str(&render_metrics(&capture)),
            Err(error) => return internal_error(error),
        }
    }
    if let Some(connections) = &state.connections {
        text.push_str(&render_connection_metrics(connections));
        text.push_str(&render_traffic_metrics(&connections.traffic()));
    }
    if let Some(tunnels) = &state.tunnels {
        text.push_str(&render_tunnel_metrics(tunnels));
    }
    if let Some(mesh) = &state.mesh {
        text.push_str(&render_http_metrics(&mesh.http.stats));
        if let Some(spans) = &mesh.http.spans {
            use std::sync::atomic::Ordering::Relaxed;
            let _ = write!(
                text,
                "# HELP mesh_trace_spans_exported_total Spans the OTLP receiver accepted.\n\
                 # TYPE mesh_trace_spans_exported_total counter\n\
                 mesh_trace_spans_exported_total {}\n\
                 # HELP mesh_trace_spans_dropped_total Spans dropped: the queue was full, or the receiver failed or did not answer.\n\
                 # TYPE mesh_trace_spans_dropped_total counter\n\
                 mesh_trace_spans_dropped_total {}\n",
                spans.exported.load(Relaxed),
                spans.dropped.load(Relaxed)
            );
        }
    }
    text.push_str(&render_certificate_metrics(&reports(&state.certificates)));
    if let Some((config, status)) = &state.config {
        let revision = config.borrow().revision;
        let status = status.borrow().clone();
        let _ = write!(
            text,
            "# HELP mesh_config_revision The control-plane revision of the configuration in use.\n\
             # TYPE mesh_config_revision gauge\n\
             mesh_config_revision {revision}\n\
             # HELP mesh_config_pushes_total Configuration pushes, by outcome.\n\
             # TYPE mesh_config_pushes_total counter\n\
             mesh_config_pushes_total{{outcome=\"ack\"}} {}\n\
             mesh_config_pushes_total{{outcome=\"nack\"}} {}\n\
             # HELP mesh_config_connected 1 while the configuration stream is up.\n\
             # TYPE mesh_config_connected gauge\n\
             mesh_config_connected {}\n",
            status.acks,
            status.nacks,
            u8::from(status.connected)
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// A metric family: name, type, help, and its value for one certificate.
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&CertificateReport) -> Option<f64>,
);

/// Renders the certificates' state in the Prometheus text format.
pub fn render_certificate_metrics(reports: &[CertificateReport]) -> String {
    let mut out = String::new();
    let label = |r: &CertificateReport| {
        format!(
            "holder=\"{}\",name=\"{}\"",
            r.holder.name(),
            escape_label(&r.name)
        )
    };
    let families: [Family; 5] = [
        (
            "mesh_certificate_expiry_timestamp_seconds",
            "gauge",
            "When the certificate in use expires (Unix seconds); absent while there is none.",
            |r| parse_time(r.not_after.as_deref()),
        ),
        (
            "mesh_certificate_next_renewal_timestamp_seconds",
            "gauge",
            "When the certificate will be renewed (Unix seconds).",
            |r| parse_time(r.next_renewal.as_deref()),
        ),
        (
            "mesh_certificate_rotations_total",
            "counter",
            "Certificates replaced by a renewed one.",
            |r| Some(r.rotations as f64),
        ),
        (
            "mesh_certificate_request_failures_total",
            "counter",
            "Certificate requests the CA did not answer with a certificate.",
            |r| Some(r.failures as f64),
        ),
        (
            "mesh_certificate_expired",
            "gauge",
            "1 while the last certificate expired before it could be renewed.",
            |r| Some(if r.expired { 1.0 } else { 0.0 }),
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for report in reports {
            if let Some(value) = value(report) {
                let _ = writeln!(out, "{name}{{{}}} {value}", label(report));
            }
        }
    }
    out
}

fn parse_time(text: Option<&str>) -> Option<f64> {
    let at = OffsetDateTime::parse(text?, &Rfc3339).ok()?;
    Some(at.unix_timestamp() as f64)
}

fn read_state(capture: &SharedCapture) -> Result<CaptureState, String> {
    let capture = capture
        .read()
        .map_err(|_| "capture state lock poisoned".to_owned())?;
    let counters = capture.counters().map_err(|e| e.to_string())?;
    Ok(CaptureState {
        cgroup: capture.cgroup().display().to_string(),
        counters: counters.into_iter().map(|(c, n)| (c.name(), n)).collect(),
        pods: capture.pods().map_err(|e| e.to_string())?,
    })
}

fn internal_error(error: String) -> Response {
    tracing::warn!(%error, "admin request failed");
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response()
}

/// Renders the capture state in the Prometheus text exposition format.
pub fn render_metrics(state: &CaptureState) -> String {
    let mut out = String::new();
    out.push_str(
        "# HELP mesh_capture_events_total Connects seen by the capture programs, by what they did.\n\
         # TYPE mesh_capture_events_total counter\n",
    );
    for counter in Counter::ALL {
        let value = state.counters.get(counter.name()).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "mesh_capture_events_total{{event=\"{}\"}} {value}",
            counter.name()
        );
    }
    out.push_str(
        "# HELP mesh_capture_pod_connects_total Connects from each captured pod's network namespace.\n\
         # TYPE mesh_capture_pod_connects_total counter\n",
    );
    for pod in &state.pods {
        let _ = writeln!(
            out,
            "mesh_capture_pod_connects_total{{pod=\"{}\"}} {}",
            escape_label(&pod.pod.name),
            pod.connects
        );
    }
    let _ = write!(
        out,
        "# HELP mesh_capture_pods Pods captured on this node.\n\
         # TYPE mesh_capture_pods gauge\n\
         mesh_capture_pods {}\n",
        state.pods.len()
    );
    out
}

/// Renders the proxy's connection counts in the Prometheus text format.
pub fn render_connection_metrics(connections: &crate::proxy::Connections) -> String {
    let mut out = String::from(
        "# HELP mesh_proxy_connections_total Connections the proxy accepted in captured pods, by outcome.\n\
         # TYPE mesh_proxy_connections_total counter\n",
    );
    for ((pod, direction, outcome), value) in connections.counts() {
        let _ = writeln!(
            out,
            "mesh_proxy_connections_total{{pod=\"{}\",direction=\"{}\",outcome=\"{}\"}} {value}",
            escape_label(&pod),
            direction.name(),
            outcome.name()
        );
    }
    let _ = write!(
        out,
        "# HELP mesh_proxy_connections_open Connections the proxy carries now.\n\
         # TYPE mesh_proxy_connections_open gauge\n\
         mesh_proxy_connections_open {}\n",
        connections.open_count()
    );
    out
}

/// Renders connections and bytes by pod, peer and security.
pub fn render_traffic_metrics(
    traffic: &[(crate::proxy::TrafficKey, crate::proxy::Traffic)],
) -> String {
    use crate::proxy::Traffic;
    let mut out = String::new();
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&Traffic) -> u64,
    );
    let series: [Series; 5] = [
        (
            "mesh_tcp_connections_opened_total",
            "counter",
            "TCP connections opened, by pod, peer workload or identity, and security.",
            |t| t.opened,
        ),
        (
            "mesh_tcp_connections_closed_total",
            "counter",
            "TCP connections closed.",
            |t| t.closed,
        ),
        (
            "mesh_tcp_sent_bytes_total",
            "counter",
            "Bytes the pod's application sent.",
            |t| t.sent,
        ),
        (
            "mesh_tcp_received_bytes_total",
            "counter",
            "Bytes delivered to the pod's application.",
            |t| t.received,
        ),
        (
            "mesh_tcp_idle_timeouts_total",
            "counter",
            "TCP connections closed because no byte moved either way for --tcp-idle-timeout.",
            |t| t.idle_closed,
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for (key, counts) in traffic {
            let _ = writeln!(
                out,
                "{name}{{direction=\"{}\",pod=\"{}\",peer=\"{}\",security=\"{}\"}} {}",
                key.direction.name(),
                escape_label(&key.pod),
                escape_label(&key.peer),
                key.security.name(),
                value(counts)
            );
        }
    }
    out
}

/// Renders the HBONE tunnels' handshake and pool counts.
pub fn render_tunnel_metrics(stats: &crate::hbone::HboneStats) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    format!(
        "# HELP mesh_tls_handshakes_total Completed mTLS handshakes of HBONE tunnels, by side.\n\
         # TYPE mesh_tls_handshakes_total counter\n\
         mesh_tls_handshakes_total{{side=\"client\"}} {}\n\
         mesh_tls_handshakes_total{{side=\"server\"}} {}\n\
         # HELP mesh_tls_handshake_failures_total Refused or failed mTLS handshakes of HBONE tunnels, by side.\n\
         # TYPE mesh_tls_handshake_failures_total counter\n\
         mesh_tls_handshake_failures_total{{side=\"client\"}} {}\n\
         mesh_tls_handshake_failures_total{{side=\"server\"}} {}\n\
         # HELP mesh_tunnel_streams_opened_total HBONE streams opened as the client.\n\
         # TYPE mesh_tunnel_streams_opened_total counter\n\
         mesh_tunnel_streams_opened_total {}\n\
         # HELP mesh_tunnel_pooled_connections Pooled HBONE connections open now.\n\
         # TYPE mesh_tunnel_pooled_connections gauge\n\
         mesh_tunnel_pooled_connections {}\n\
         # HELP mesh_authz_revoked_streams_total Open inbound tunnel streams and permissive plaintext connections cut because a configuration change no longer allows them.\n\
         # TYPE mesh_authz_revoked_streams_total counter\n\
         mesh_authz_revoked_streams_total {}\n\
         # HELP mesh_tunnel_connections_dropped_total Connections to the tunnel port reset before their handshake: too many handshakes in progress on the node, or from their source address.\n\
         # TYPE mesh_tunnel_connections_dropped_total counter\n\
         mesh_tunnel_connections_dropped_total{{limit=\"node\"}} {}\n\
         mesh_tunnel_connections_dropped_total{{limit=\"source\"}} {}\n",
        stats.client_handshakes.load(Relaxed),
        stats.server_handshakes.load(Relaxed),
        stats.client_handshake_failures.load(Relaxed),
        stats.server_handshake_failures.load(Relaxed),
        stats.streams_opened.load(Relaxed),
        stats.pooled_connections.load(Relaxed),
        stats.streams_revoked.load(Relaxed),
        stats.dropped_at_node_limit.load(Relaxed),
        stats.dropped_at_source_limit.load(Relaxed),
    )
}

/// Renders the HTTP path's request, retry and local-answer counts.
pub fn render_http_metrics(stats: &crate::proxy::HttpStats) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = format!(
        "# HELP mesh_http_requests_total Requests the HTTP path routed to services.\n\
         # TYPE mesh_http_requests_total counter\n\
         mesh_http_requests_total {}\n\
         # HELP mesh_http_retries_total Attempts repeated after a retriable failure.\n\
         # TYPE mesh_http_retries_total counter\n\
         mesh_http_retries_total {}\n\
         # HELP mesh_http_local_responses_total Requests the proxy answered itself, by response flag.\n\
         # TYPE mesh_http_local_responses_total counter\n",
        stats.requests.load(Relaxed),
        stats.retries.load(Relaxed),
    );
    let mut local: Vec<(crate::proxy::Flag, u64)> = stats
        .local
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(flag, count)| (*flag, *count))
        .collect();
    local.sort();
    for (flag, count) in local {
        let _ = writeln!(
            out,
            "mesh_http_local_responses_total{{flag=\"{}\"}} {count}",
            flag.code()
        );
    }
    out.push_str(&stats.by_route.render());
    out
}

/// Escapes a label value as the exposition format requires.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::capture::CapturedPod;

    fn state() -> CaptureState {
        CaptureState {
            cgroup: "/sys/fs/cgroup/pods".into(),
            counters: [("connect_redirected", 10), ("bypass_uncaptured", 4)]
                .into_iter()
                .collect(),
            pods: vec![PodConnects {
                pod: CapturedPod {
                    name: "shop/front\"end".into(),
                    netns: PathBuf::from("/run/netns/x"),
                    cookie: 7,
                    addresses: vec!["10.89.0.2".parse().unwrap()],
                },
                connects: 10,
            }],
        }
    }

    #[test]
    fn metrics_list_every_counter_and_pod() {
        let text = render_metrics(&state());
        assert!(text.contains("mesh_capture_events_total{event=\"connect_redirected\"} 10\n"));
        assert!(text.contains("mesh_capture_events_total{event=\"bypass_uncaptured\"} 4\n"));
        // Counters the kernel has not reported yet are exported as zero.
        assert!(text.contains("mesh_capture_events_total{event=\"error\"} 0\n"));
        assert!(text.contains("mesh_capture_pod_connects_total{pod=\"shop/front\\\"end\"} 10\n"));
        assert!(text.ends_with("mesh_capture_pods 1\n"));
    }

    #[test]
    fn certificate_metrics_have_one_series_per_holder() {
        let reports = [
            CertificateReport {
                holder: Holder::Node,
                name: "node1".into(),
                spiffe_id: Some("spiffe://cluster.local/ns/mesh-system/sa/node-node1".into()),
                serial: Some("ab".into()),
                not_after: Some("2026-11-27T04:00:00Z".into()),
                next_renewal: Some("2026-11-26T23:12:00Z".into()),
                overlapping: false,
                rotations: 2,
                failures: 1,
                last_error: None,
                expired: false,
            },
            CertificateReport {
                holder: Holder::Workload,
                name: "shop/reviews-1".into(),
                spiffe_id: None,
                serial: None,
                not_after: None,
                next_renewal: None,
                overlapping: false,
                rotations: 0,
                failures: 7,
                last_error: Some("PermissionDenied".into()),
                expired: false,
            },
        ];
        let text = render_certificate_metrics(&reports);
        assert!(text.contains(
            "mesh_certificate_expiry_timestamp_seconds{holder=\"node\",name=\"node1\"} 1795752000\n"
        ));
        assert!(
            text.contains("mesh_certificate_rotations_total{holder=\"node\",name=\"node1\"} 2\n")
        );
        assert!(text.contains(
            "mesh_certificate_request_failures_total{holder=\"workload\",name=\"shop/reviews-1\"} 7\n"
        ));
        // No certificate, no expiry series (rather than a misleading 0).
        assert!(!text.contains("expiry_timestamp_seconds{holder=\"workload\""));
        assert_eq!(text.matches("# TYPE ").count(), 5);
    }

    #[test]
    fn readiness_waits_for_the_configuration_its_pods_and_their_certificates() {
        use mesh_model::config::ConfigResource;
        // Without a control plane: nothing to wait for.
        assert!(not_ready(&AdminState::default()).is_empty());

        let (config_tx, config) = watch::channel(Arc::new(NodeConfig::default()));
        let (status_tx, status) = watch::channel(crate::xds::XdsStatus::default());
        let (captured_tx, captured) = watch::channel(None);
        let state = AdminState {
            config: Some((config, status)),
            captured: Some(captured),
            ..AdminState::default()
        };
        assert_eq!(
            not_ready(&state),
            ["no configuration from the control plane yet"]
        );
        // An empty store's first push is revision 0, and lists no pod.
        status_tx.send_modify(|s| s.acks += 1);
        captured_tx.send_replace(Some(0));
        assert!(not_ready(&state).is_empty());
        captured_tx.send_replace(None);
        let workload = mesh_model::parse_documents(
            "apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: web, namespace: shop}\n\
             spec: {node: node0, ip: 10.89.0.2}\n",
        )
        .unwrap()
        .remove(0);
        let mut pushed = NodeConfig {
            revision: 3,
            ..NodeConfig::default()
        };
        pushed.resources.insert(
            "workload".into(),
            ("1".into(), Arc::new(ConfigResource::Object(workload))),
        );
        config_tx.send_replace(Arc::new(pushed));
        // The pass over the configuration before this one does not count.
        captured_tx.send_replace(Some(2));
        assert_eq!(
            not_ready(&state),
            [
                "the configuration's pods are not captured yet",
                "no certificate yet for shop/web"
            ]
        );
        // Captured, and the manager started but not holding one yet.
        captured_tx.send_replace(Some(3));
        let (_cert_tx, cert) = watch::channel(crate::identity::CertState::default());
        state.certificates.write().unwrap().push(Tracked {
            holder: Holder::Workload,
            name: "shop/web".into(),
            state: cert,
        });
        assert_eq!(not_ready(&state), ["no certificate yet for shop/web"]);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }
}
