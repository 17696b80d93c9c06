//! Request statistics the nodes report (`RequestStats`), kept an hour and
//! summed over a window into golden signals: per service (`meshctl stat`)
//! and per calling workload and service (`meshctl top`).

use std::collections::BTreeMap;

use mesh_model::stats::{LATENCY_BOUNDS, quantile};
use serde::Serialize;
use sqlx::AnyConnection;
use std::sync::atomic::{AtomicI64, Ordering};

use super::{StoreError, rows::Columns};

/// How long reports are kept.
pub const KEPT_MS: i64 = 60 * 60 * 1000;

/// One report of one edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeReport {
    pub source_namespace: String,
    pub source_workload: String,
    pub namespace: String,
    pub service: String,
    pub requests: u64,
    pub errors: u64,
    /// Requests per latency bucket, `LATENCY_BOUNDS.len() + 1` of them.
    pub latency: Vec<u64>,
    pub interval_ms: u64,
}

/// Golden signals of a service, or of one caller's calls to it, over a
/// window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Signals {
    /// The calling workload (`namespace/name`), for an edge.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub namespace: String,
    pub service: String,
    pub requests: u64,
    pub requests_per_second: f64,
    /// Share of requests answered 5xx, 0 to 1.
    pub error_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

pub(super) async fn record(
    conn: &mut AnyConnection,
    node: &str,
    now_ms: i64,
    reports: &[EdgeReport],
) -> Result<(), StoreError> {
    for report in reports {
        let latency = serde_json::to_string(&report.latency).expect("a list of numbers");
        sqlx::query(
            "INSERT INTO RequestStats (node, reported_at, interval_ms, source_namespace, \
             source_workload, namespace, service, requests, errors, latency) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(node)
        .bind(now_ms)
        .bind(i64::try_from(report.interval_ms).unwrap_or(i64::MAX))
        .bind(&report.source_namespace)
        .bind(&report.source_workload)
        .bind(&report.namespace)
        .bind(&report.service)
        .bind(i64::try_from(report.requests).unwrap_or(i64::MAX))
        .bind(i64::try_from(report.errors).unwrap_or(i64::MAX))
        .bind(latency)
        .execute(&mut *conn)
        .await?;
    }
    // Pruned at most once a minute per replica, not with every report.
    let last = LAST_PRUNE_MS.load(Ordering::Relaxed);
    if now_ms - last >= PRUNE_EVERY_MS
        && LAST_PRUNE_MS
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        sqlx::query("DELETE FROM RequestStats WHERE reported_at < $1")
            .bind(now_ms - KEPT_MS)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// When this process last pruned old reports (Unix milliseconds).
static LAST_PRUNE_MS: AtomicI64 = AtomicI64::new(0);
const PRUNE_EVERY_MS: i64 = 60_000;

/// The reports received after `since_ms`, with when each was.
pub(super) async fn since(
    conn: &mut AnyConnection,
    since_ms: i64,
) -> Result<Vec<(i64, EdgeReport)>, StoreError> {
    let rows = sqlx::query(
        "SELECT reported_at, source_namespace, source_workload, namespace, service, requests, \
         errors, latency, interval_ms FROM RequestStats WHERE reported_at > $1",
    )
    .bind(since_ms)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            let c = Columns::new(row, "RequestStats".into());
            let count = |column: &str| c.int(column).map(|n| u64::try_from(n).unwrap_or(0));
            let latency = c.text("latency")?;
            let report = EdgeReport {
                source_namespace: c.text("source_namespace")?,
                source_workload: c.text("source_workload")?,
                namespace: c.text("namespace")?,
                service: c.text("service")?,
                requests: count("requests")?,
                errors: count("errors")?,
                latency: serde_json::from_str(&latency).map_err(|e| StoreError::Corrupt {
                    reference: "RequestStats".into(),
                    message: format!("latency: {e}"),
                })?,
                interval_ms: count("interval_ms")?,
            };
            Ok((c.int("reported_at")?, report))
        })
        .collect()
}

/// Sums `reports` (each with when it was received) over the window of
/// `window_ms` before `now_ms`, per service, or per calling workload and
/// service when `by_edge`, busiest first. A report covers the
/// `interval_ms` before it was received; its requests count towards the
/// rate in proportion to how much of that falls in the window.
pub fn summarize(
    reports: &[(i64, EdgeReport)],
    now_ms: i64,
    window_ms: i64,
    by_edge: bool,
) -> Vec<Signals> {
    type Key = (Option<String>, String, String);
    #[derive(Default)]
    struct Sum {
        requests: u64,
        in_window: f64,
        errors: u64,
        latency: Vec<u64>,
    }
    let start = now_ms - window_ms;
    let mut sums: BTreeMap<Key, Sum> = BTreeMap::new();
    for (at, report) in reports {
        if report.latency.len() != LATENCY_BOUNDS.len() + 1 {
            continue;
        }
        let interval = i64::try_from(report.interval_ms).unwrap_or(i64::MAX).max(1);
        let covered = (at.min(&now_ms) - (at - interval).max(start)).clamp(0, interval);
        let share = covered as f64 / interval as f64;
        let source =
            by_edge.then(|| format!("{}/{}", report.source_namespace, report.source_workload));
        let key = (source, report.namespace.clone(), report.service.clone());
        let sum = sums.entry(key).or_insert_with(|| Sum {
            latency: vec![0; LATENCY_BOUNDS.len() + 1],
            ..Sum::default()
        });
        sum.requests = sum.requests.saturating_add(report.requests);
        sum.in_window += share * report.requests as f64;
        sum.errors = sum.errors.saturating_add(report.errors);
        for (total, n) in sum.latency.iter_mut().zip(&report.latency) {
            *total = total.saturating_add(*n);
        }
    }
    let seconds = (window_ms as f64 / 1000.0).max(1.0);
    let mut signals: Vec<Signals> = sums
        .into_iter()
        .map(|((source, namespace, service), sum)| Signals {
            source,
            namespace,
            service,
            requests: sum.requests,
            requests_per_second: sum.in_window / seconds,
            error_rate: if sum.requests == 0 {
                0.0
            } else {
                sum.errors as f64 / sum.requests as f64
            },
            p50_ms: quantile(0.5, &sum.latency).map(|s| s * 1000.0),
            p99_ms: quantile(0.99, &sum.latency).map(|s| s * 1000.0),
        })
        .collect();
    signals.sort_by_key(|s| std::cmp::Reverse(s.requests));
    signals
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(
        source: &str,
        service: &str,
        requests: u64,
        errors: u64,
        bucket: usize,
    ) -> EdgeReport {
        let mut latency = vec![0; LATENCY_BOUNDS.len() + 1];
        latency[bucket] = requests;
        EdgeReport {
            source_namespace: "shop".into(),
            source_workload: source.into(),
            namespace: "shop".into(),
            service: service.into(),
            requests,
            errors,
            latency,
            interval_ms: 10_000,
        }
    }

    #[test]
    fn reports_sum_into_rates_errors_and_percentiles() {
        let reports = [
            // Two nodes' frontends and one ratings caller, over 60 s.
            report("frontend", "reviews", 900, 9, 6),
            report("frontend", "reviews", 60, 0, 6),
            report("web", "reviews", 40, 1, 16),
            report("frontend", "ratings", 30, 30, 10),
            // A report of another shape is left out.
            EdgeReport {
                latency: vec![1, 2],
                ..report("odd", "reviews", 5, 0, 0)
            },
        ];
        let now = 1_000_000;
        let reports: Vec<(i64, EdgeReport)> = reports.into_iter().map(|r| (now, r)).collect();
        let services = summarize(&reports, now, 60_000, false);
        assert_eq!(services.len(), 2);
        let reviews = &services[0];
        assert_eq!(
            (reviews.service.as_str(), reviews.requests),
            ("reviews", 1000)
        );
        assert!((reviews.requests_per_second - 1000.0 / 60.0).abs() < 1e-9);
        assert!((reviews.error_rate - 0.01).abs() < 1e-9);
        // 960 of 1000 in (0.75, 1] ms, 40 in (50, 100] ms.
        let (p50, p99) = (reviews.p50_ms.unwrap(), reviews.p99_ms.unwrap());
        assert!(p50 > 0.75 && p50 <= 1.0, "{p50}");
        assert!(p99 > 50.0 && p99 <= 100.0, "{p99}");
        assert_eq!(reviews.source, None);
        assert_eq!(services[1].error_rate, 1.0);

        let edges = summarize(&reports, now, 60_000, true);
        let listed: Vec<(Option<&str>, &str, u64)> = edges
            .iter()
            .map(|e| (e.source.as_deref(), e.service.as_str(), e.requests))
            .collect();
        assert_eq!(
            listed,
            [
                (Some("shop/frontend"), "reviews", 960),
                (Some("shop/web"), "reviews", 40),
                (Some("shop/frontend"), "ratings", 30),
            ]
        );
        assert!(summarize(&[], now, 60_000, false).is_empty());

        // A report received 55 s ago covers the 10 s before it: half of
        // that lies in a 60 s window, so half its requests count towards
        // the rate; all of them towards the count.
        let old = [(now - 55_000, report("frontend", "reviews", 600, 0, 6))];
        let signals = &summarize(&old, now, 60_000, false)[0];
        assert_eq!(signals.requests, 600);
        assert!((signals.requests_per_second - 300.0 / 60.0).abs() < 1e-9);
    }
}
