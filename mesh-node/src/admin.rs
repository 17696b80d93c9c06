//! The node's admin endpoint: health, the capture state as JSON and
//! Prometheus metrics. It binds to loopback by default and only reads.

use std::{
    fmt::Write as _,
    sync::{Arc, RwLock},
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

use crate::capture::{Capture, PodConnects};

/// What the admin endpoint reads from.
pub type SharedCapture = Arc<RwLock<Capture>>;

/// The admin routes.
pub fn router(capture: SharedCapture) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/capture", get(capture_state))
        .route("/metrics", get(metrics))
        .with_state(capture)
}

/// `GET /capture`: the cgroup, the programs' counters and every captured pod.
#[derive(Debug, Serialize)]
pub struct CaptureState {
    pub cgroup: String,
    pub counters: std::collections::BTreeMap<&'static str, u64>,
    pub pods: Vec<PodConnects>,
}

async fn capture_state(State(capture): State<SharedCapture>) -> Response {
    match read_state(&capture) {
        Ok(state) => Json(state).into_response(),
        Err(error) => internal_error(error),
    }
}

async fn metrics(State(capture): State<SharedCapture>) -> Response {
    match read_state(&capture) {
        Ok(state) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            render_metrics(&state),
        )
            .into_response(),
        Err(error) => internal_error(error),
    }
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
            counters: [("connect_captured", 10), ("bypass_uncaptured", 4)]
                .into_iter()
                .collect(),
            pods: vec![PodConnects {
                pod: CapturedPod {
                    name: "shop/front\"end".into(),
                    netns: PathBuf::from("/run/netns/x"),
                    cookie: 7,
                },
                connects: 10,
            }],
        }
    }

    #[test]
    fn metrics_list_every_counter_and_pod() {
        let text = render_metrics(&state());
        assert!(text.contains("mesh_capture_events_total{event=\"connect_captured\"} 10\n"));
        assert!(text.contains("mesh_capture_events_total{event=\"bypass_uncaptured\"} 4\n"));
        // Counters the kernel has not reported yet are exported as zero.
        assert!(text.contains("mesh_capture_events_total{event=\"error\"} 0\n"));
        assert!(text.contains("mesh_capture_pod_connects_total{pod=\"shop/front\\\"end\"} 10\n"));
        assert!(text.ends_with("mesh_capture_pods 1\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }
}
