//! Reports to the control plane what each of the node's workloads asked of
//! each service since the previous report (requests, 5xx answers, latency
//! histogram), so it can serve every service's golden signals
//! (`meshctl stat`) and the busiest edges (`meshctl top`) without scraping
//! nodes.

use std::{collections::HashMap, sync::Arc, time::Duration};

use mesh_api::v1::RequestStats;
use tokio::sync::mpsc;

use crate::{
    l7::metrics::{Edge, EdgeTotals},
    proxy::MeshPath,
};

/// Every `interval`, sends what changed since the last report that went
/// out. A report the stream cannot take now is folded into the next; one
/// lost with a broken stream is not sent again.
pub async fn report(
    mesh: Arc<MeshPath>,
    reports: mpsc::Sender<Vec<RequestStats>>,
    interval: Duration,
) {
    let mut sent: HashMap<Edge, EdgeTotals> = HashMap::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut since = tokio::time::Instant::now();
    loop {
        ticker.tick().await;
        let now = tokio::time::Instant::now();
        let totals = mesh.http.stats.by_route.edges();
        let batch = deltas(&sent, &totals, now - since);
        if batch.is_empty() {
            continue;
        }
        match reports.try_send(batch) {
            Ok(()) => {
                sent = totals;
                since = now;
            }
            Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// What each edge of `now` did beyond `sent`, over `covered`; edges that
/// did nothing are left out.
fn deltas(
    sent: &HashMap<Edge, EdgeTotals>,
    now: &HashMap<Edge, EdgeTotals>,
    covered: Duration,
) -> Vec<RequestStats> {
    let none = EdgeTotals::default();
    let mut batch: Vec<RequestStats> = now
        .iter()
        .filter_map(|(edge, totals)| {
            let before = sent.get(edge).unwrap_or(&none);
            let requests = totals.requests.saturating_sub(before.requests);
            if requests == 0 {
                return None;
            }
            Some(RequestStats {
                source_namespace: edge.source_namespace.clone(),
                source_workload: edge.source_workload.clone(),
                namespace: edge.namespace.clone(),
                service: edge.service.clone(),
                requests,
                errors: totals.errors.saturating_sub(before.errors),
                latency_buckets: totals
                    .buckets
                    .iter()
                    .zip(&before.buckets)
                    .map(|(now, before)| now.saturating_sub(*before))
                    .collect(),
                interval_ms: u64::try_from(covered.as_millis()).unwrap_or(u64::MAX),
            })
        })
        .collect();
    batch.sort_by(|a, b| (&a.namespace, &a.service).cmp(&(&b.namespace, &b.service)));
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(service: &str) -> Edge {
        Edge {
            source_namespace: "shop".into(),
            source_workload: "frontend".into(),
            namespace: "shop".into(),
            service: service.into(),
        }
    }

    fn totals(requests: u64, errors: u64, fast: u64) -> EdgeTotals {
        let mut totals = EdgeTotals {
            requests,
            errors,
            ..EdgeTotals::default()
        };
        totals.buckets[0] = fast;
        totals.buckets[10] = requests - fast;
        totals
    }

    #[test]
    fn a_report_holds_what_changed_since_the_last_one() {
        let sent = HashMap::from([
            (edge("reviews"), totals(100, 5, 90)),
            (edge("idle"), totals(7, 0, 7)),
        ]);
        let now = HashMap::from([
            (edge("reviews"), totals(150, 6, 130)),
            (edge("idle"), totals(7, 0, 7)),
            (edge("ratings"), totals(3, 3, 0)),
        ]);
        let batch = deltas(&sent, &now, Duration::from_millis(1500));
        let summary: Vec<(&str, u64, u64, u64, u64)> = batch
            .iter()
            .map(|s| {
                (
                    s.service.as_str(),
                    s.requests,
                    s.errors,
                    s.latency_buckets[0],
                    s.latency_buckets.iter().sum(),
                )
            })
            .collect();
        // The idle edge is left out; the new one is sent whole.
        assert_eq!(
            summary,
            [("ratings", 3, 3, 0, 3), ("reviews", 50, 1, 40, 50)]
        );
        assert!(batch.iter().all(|s| s.interval_ms == 1500));
        assert!(
            batch
                .iter()
                .all(|s| s.latency_buckets.len() == mesh_model::stats::LATENCY_BOUNDS.len() + 1)
        );
    }
}
