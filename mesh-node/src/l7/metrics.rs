//! Per-request metrics, labelled as Istio labels them, so dashboards and
//! queries written for `istio_requests_total` carry over with the prefix
//! changed: a request count and a latency histogram per
//! (reporter, source, destination, version, status, flags), and the
//! sizes of its request and response bodies. The latency
//! is in seconds, Prometheus' base unit (its own checker refuses Istio's
//! `_milliseconds`): `mesh_request_duration_seconds` × 1000 is
//! `istio_request_duration_milliseconds`. Paths and
//! other unbounded values never become labels, and the number of series
//! is capped: past [`MAX_SERIES`], new series are dropped and counted.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// The latency buckets' upper bounds, in seconds (shared with the control
/// plane, which sums the nodes' reports over the same buckets).
pub use mesh_model::stats::LATENCY_BOUNDS as BUCKETS;

/// The size buckets' upper bounds, in bytes: powers of ten, as Istio's.
pub const SIZE_BOUNDS: [u64; 10] = [
    1,
    10,
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
];

/// The bucket (index into a histogram of `SIZE_BOUNDS.len() + 1`) a body
/// of `bytes` falls in: bounds are inclusive.
fn size_bucket(bytes: u64) -> usize {
    SIZE_BOUNDS
        .iter()
        .position(|&bound| bytes <= bound)
        .unwrap_or(SIZE_BOUNDS.len())
}

/// The most series kept.
pub const MAX_SERIES: usize = 10_000;

/// Which end of the hop counted the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reporter {
    /// The caller's node proxy.
    Source,
    /// The destination workload's node proxy.
    Destination,
}

impl Reporter {
    const fn name(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// What one request's series is keyed on. Unknown values are `unknown`,
/// no flags `-`, as Istio writes them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    /// `name.namespace`.
    pub destination_service: String,
    pub destination_version: String,
    pub response_code: u16,
    pub response_flags: &'static str,
}

impl RequestLabels {
    fn render(&self, out: &mut String) {
        let pairs: [(&str, &str); 9] = [
            ("reporter", self.reporter.name()),
            ("source_workload", &self.source_workload),
            ("source_workload_namespace", &self.source_workload_namespace),
            ("source_principal", &self.source_principal),
            ("destination_workload", &self.destination_workload),
            (
                "destination_workload_namespace",
                &self.destination_workload_namespace,
            ),
            ("destination_service", &self.destination_service),
            ("destination_version", &self.destination_version),
            ("response_flags", self.response_flags),
        ];
        for (name, value) in pairs {
            let _ = write!(out, "{name}=\"{}\",", escape(value));
        }
        let _ = write!(out, "response_code=\"{}\"", self.response_code);
    }
}

/// A calling workload and the service it called.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Edge {
    pub source_namespace: String,
    pub source_workload: String,
    pub namespace: String,
    pub service: String,
}

/// An edge's requests, of them those answered 5xx, and their latency
/// histogram (requests per bucket).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeTotals {
    pub requests: u64,
    pub errors: u64,
    pub buckets: [u64; BUCKETS.len() + 1],
}

impl Default for EdgeTotals {
    fn default() -> Self {
        Self {
            requests: 0,
            errors: 0,
            buckets: [0; BUCKETS.len() + 1],
        }
    }
}

/// A label value as the text format needs it.
fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains(['\\', '"', '\n']) {
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        value.into()
    }
}

#[derive(Debug, Default)]
struct Series {
    /// Requests per bucket (not cumulative); the last is past every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    request_bytes: SizeHistogram,
    response_bytes: SizeHistogram,
}

/// Bodies per size bucket (not cumulative), and their total.
#[derive(Debug, Default)]
struct SizeHistogram {
    buckets: [AtomicU64; SIZE_BOUNDS.len() + 1],
    sum: AtomicU64,
}

impl SizeHistogram {
    /// The sum first, then the count (released): a reader that sees the
    /// count sees the sum that goes with it.
    fn record(&self, bytes: u64) {
        self.sum.fetch_add(bytes, Ordering::Relaxed);
        self.buckets[size_bucket(bytes)].fetch_add(1, Ordering::Release);
    }

    fn snapshot(&self) -> ([u64; SIZE_BOUNDS.len() + 1], u64) {
        let buckets = std::array::from_fn(|i| self.buckets[i].load(Ordering::Acquire));
        (buckets, self.sum.load(Ordering::Relaxed))
    }
}

/// Where a counted request's body sizes go once its exchange is over
/// (its series, kept from when the request was counted).
#[derive(Debug, Clone)]
pub struct Sizes(Arc<Series>);

impl Sizes {
    /// Counts the request's and the response's body bytes (the response
    /// first: a reader that sees the request counted sees both).
    pub fn record(&self, request: u64, response: u64) {
        self.0.response_bytes.record(response);
        self.0.request_bytes.record(request);
    }
}

/// The node's request series.
#[derive(Debug, Default)]
pub struct RequestMetrics {
    series: RwLock<HashMap<RequestLabels, Arc<Series>>>,
    dropped: AtomicU64,
}

impl RequestMetrics {
    /// Counts one request that took `duration` to its response head;
    /// its body sizes go to the [`Sizes`] returned once they are known.
    /// `None` when the request is not counted (too many series).
    pub fn record(&self, labels: RequestLabels, duration: Duration) -> Option<Sizes> {
        let series = self.series_of(labels);
        let Some(series) = series else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        series.sum_micros.fetch_add(micros, Ordering::Relaxed);
        let bucket = mesh_model::stats::bucket_of(duration.as_secs_f64());
        series.buckets[bucket].fetch_add(1, Ordering::Release);
        Some(Sizes(series))
    }

    fn series_of(&self, labels: RequestLabels) -> Option<Arc<Series>> {
        let read = self.series.read().unwrap_or_else(|e| e.into_inner());
        if let Some(series) = read.get(&labels) {
            return Some(series.clone());
        }
        drop(read);
        let mut write = self.series.write().unwrap_or_else(|e| e.into_inner());
        if write.len() >= MAX_SERIES && !write.contains_key(&labels) {
            return None;
        }
        Some(write.entry(labels).or_default().clone())
    }

    /// What each caller asked of each service since the node started, as
    /// its own node saw it (the source reporter's series, summed over
    /// destinations, versions, statuses and flags).
    pub fn edges(&self) -> HashMap<Edge, EdgeTotals> {
        let series = self.series.read().unwrap_or_else(|e| e.into_inner());
        let mut edges: HashMap<Edge, EdgeTotals> = HashMap::new();
        for (labels, series) in series.iter() {
            if labels.reporter != Reporter::Source {
                continue;
            }
            let (name, namespace) = labels
                .destination_service
                .split_once('.')
                .unwrap_or((&labels.destination_service, ""));
            let edge = Edge {
                source_namespace: labels.source_workload_namespace.clone(),
                source_workload: labels.source_workload.clone(),
                namespace: namespace.to_owned(),
                service: name.to_owned(),
            };
            let totals = edges.entry(edge).or_default();
            for (sum, bucket) in totals.buckets.iter_mut().zip(&series.buckets) {
                let count = bucket.load(Ordering::Relaxed);
                *sum += count;
                totals.requests += count;
                if labels.response_code >= 500 {
                    totals.errors += count;
                }
            }
        }
        edges
    }

    /// The series in the Prometheus text format, in label order.
    pub fn render(&self) -> String {
        let series = self.series.read().unwrap_or_else(|e| e.into_inner());
        let mut sorted: Vec<(&RequestLabels, &Arc<Series>)> = series.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = String::new();
        out.push_str(
            "# HELP mesh_requests_total HTTP requests, by reporter, source, destination, status and flags.\n\
             # TYPE mesh_requests_total counter\n",
        );
        // Each series read once, so its buckets, count and +Inf agree
        // even while requests land; its labels written once.
        let snapshots: Vec<Snapshot> = sorted
            .iter()
            .map(|(key, series)| {
                let mut labels = String::new();
                key.render(&mut labels);
                Snapshot {
                    labels,
                    buckets: std::array::from_fn(|i| series.buckets[i].load(Ordering::Acquire)),
                    sum_micros: series.sum_micros.load(Ordering::Relaxed),
                    request_bytes: series.request_bytes.snapshot(),
                    response_bytes: series.response_bytes.snapshot(),
                }
            })
            .collect();
        for Snapshot {
            labels, buckets, ..
        } in &snapshots
        {
            let count: u64 = buckets.iter().sum();
            let _ = writeln!(out, "mesh_requests_total{{{labels}}} {count}");
        }
        out.push_str(
            "# HELP mesh_request_duration_seconds Time from a request's arrival at the node proxy to its response head.\n\
             # TYPE mesh_request_duration_seconds histogram\n",
        );
        for snapshot in &snapshots {
            let sum = snapshot.sum_micros as f64 / 1e6;
            histogram(
                &mut out,
                "mesh_request_duration_seconds",
                &snapshot.labels,
                &BUCKETS,
                &snapshot.buckets,
                sum,
            );
        }
        out.push_str(
            "# HELP mesh_request_bytes Request body sizes, counted when the exchange ends.\n\
             # TYPE mesh_request_bytes histogram\n",
        );
        for Snapshot {
            labels,
            request_bytes: (buckets, sum),
            ..
        } in &snapshots
        {
            histogram(
                &mut out,
                "mesh_request_bytes",
                labels,
                &SIZE_BOUNDS,
                buckets,
                *sum,
            );
        }
        out.push_str(
            "# HELP mesh_response_bytes Response body sizes sent to the client, counted when the exchange ends.\n\
             # TYPE mesh_response_bytes histogram\n",
        );
        for Snapshot {
            labels,
            response_bytes: (buckets, sum),
            ..
        } in &snapshots
        {
            histogram(
                &mut out,
                "mesh_response_bytes",
                labels,
                &SIZE_BOUNDS,
                buckets,
                *sum,
            );
        }
        let _ = write!(
            out,
            "# HELP mesh_request_series_dropped_total Requests not counted because the node holds {MAX_SERIES} request series already.\n\
             # TYPE mesh_request_series_dropped_total counter\n\
             mesh_request_series_dropped_total {}\n",
            self.dropped.load(Ordering::Relaxed)
        );
        out
    }
}

/// One series, read once.
struct Snapshot {
    labels: String,
    buckets: [u64; BUCKETS.len() + 1],
    sum_micros: u64,
    request_bytes: ([u64; SIZE_BOUNDS.len() + 1], u64),
    response_bytes: ([u64; SIZE_BOUNDS.len() + 1], u64),
}

/// Writes one histogram series: cumulative buckets over `bounds` from
/// `counts` (per bucket, the last past every bound), `+Inf`, sum and count.
fn histogram<B: std::fmt::Display>(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[B],
    counts: &[u64],
    sum: impl std::fmt::Display,
) {
    let mut cumulative = 0;
    for (bound, count) in bounds.iter().zip(counts) {
        cumulative += count;
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
    }
    let count: u64 = counts.iter().sum();
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels},le=\"+Inf\"}} {count}\n\
         {name}_sum{{{labels}}} {sum}\n\
         {name}_count{{{labels}}} {count}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(code: u16) -> RequestLabels {
        RequestLabels {
            reporter: Reporter::Source,
            source_workload: "frontend".into(),
            source_workload_namespace: "shop".into(),
            source_principal: "spiffe://cluster.local/ns/shop/sa/frontend".into(),
            destination_workload: "reviews-v1".into(),
            destination_workload_namespace: "shop".into(),
            destination_service: "reviews.shop".into(),
            destination_version: "v1".into(),
            response_code: code,
            response_flags: "-",
        }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    }

    #[test]
    fn requests_land_in_cumulative_buckets_with_count_and_sum() {
        let metrics = RequestMetrics::default();
        for micros in [40, 100, 250, 900, 1_000, 40_000_000] {
            metrics.record(labels(200), Duration::from_micros(micros));
        }
        metrics.record(labels(503), Duration::from_millis(2));
        let text = metrics.render();
        let ok = "reporter=\"source\",source_workload=\"frontend\",source_workload_namespace=\"shop\",\
                  source_principal=\"spiffe://cluster.local/ns/shop/sa/frontend\",\
                  destination_workload=\"reviews-v1\",destination_workload_namespace=\"shop\",\
                  destination_service=\"reviews.shop\",destination_version=\"v1\",\
                  response_flags=\"-\",response_code=\"200\"";
        assert_eq!(
            line(&text, &format!("mesh_requests_total{{{ok}}}")),
            format!("mesh_requests_total{{{ok}}} 6")
        );
        let bucket = |le: &str| {
            let prefix = format!("mesh_request_duration_seconds_bucket{{{ok},le=\"{le}\"}} ");
            line(&text, &prefix)[prefix.len()..].parse::<u64>().unwrap()
        };
        // 0.04 and 0.1 ms; then 0.25; 0.9 and 1.0 (bounds are inclusive);
        // 40 s is past every bound.
        assert_eq!(bucket("0.00005"), 1);
        assert_eq!(bucket("0.0001"), 2);
        assert_eq!(bucket("0.0003"), 3);
        assert_eq!(bucket("0.001"), 5);
        assert_eq!(bucket("30"), 5);
        assert_eq!(bucket("+Inf"), 6);
        assert!(text.contains(&format!(
            "mesh_request_duration_seconds_sum{{{ok}}} 40.00229\n"
        )));
        assert!(text.contains(&format!("mesh_request_duration_seconds_count{{{ok}}} 6\n")));
        assert!(text.contains("response_code=\"503\"} 1\n"));
        assert!(text.contains("mesh_request_series_dropped_total 0\n"));
    }

    #[test]
    fn body_sizes_land_in_power_of_ten_buckets_of_the_requests_series() {
        let metrics = RequestMetrics::default();
        let sizes = metrics.record(labels(200), Duration::ZERO).unwrap();
        sizes.record(0, 1);
        metrics
            .record(labels(200), Duration::ZERO)
            .unwrap()
            .record(11, 1_000_000);
        // A request whose exchange has not ended yet is not in the sizes.
        let _pending = metrics.record(labels(200), Duration::ZERO).unwrap();
        let text = metrics.render();
        let ok = "reporter=\"source\",source_workload=\"frontend\",source_workload_namespace=\"shop\",\
                  source_principal=\"spiffe://cluster.local/ns/shop/sa/frontend\",\
                  destination_workload=\"reviews-v1\",destination_workload_namespace=\"shop\",\
                  destination_service=\"reviews.shop\",destination_version=\"v1\",\
                  response_flags=\"-\",response_code=\"200\"";
        let value = |name: &str, le: Option<&str>| {
            let prefix = match le {
                Some(le) => format!("{name}{{{ok},le=\"{le}\"}} "),
                None => format!("{name}{{{ok}}} "),
            };
            line(&text, &prefix)[prefix.len()..].to_owned()
        };
        assert_eq!(value("mesh_requests_total", None), "3");
        assert_eq!(value("mesh_request_bytes_bucket", Some("1")), "1");
        assert_eq!(value("mesh_request_bytes_bucket", Some("10")), "1");
        assert_eq!(value("mesh_request_bytes_bucket", Some("100")), "2");
        assert_eq!(value("mesh_request_bytes_bucket", Some("+Inf")), "2");
        assert_eq!(value("mesh_request_bytes_sum", None), "11");
        assert_eq!(value("mesh_request_bytes_count", None), "2");
        assert_eq!(value("mesh_response_bytes_bucket", Some("1")), "1");
        assert_eq!(value("mesh_response_bytes_bucket", Some("100000")), "1");
        assert_eq!(value("mesh_response_bytes_bucket", Some("1000000")), "2");
        assert_eq!(value("mesh_response_bytes_sum", None), "1000001");
        assert_eq!(value("mesh_response_bytes_count", None), "2");
    }

    #[test]
    fn series_are_capped_and_label_values_escaped() {
        let metrics = RequestMetrics::default();
        for code in 0..MAX_SERIES as u16 {
            metrics.record(labels(code), Duration::ZERO);
        }
        // A known series still counts; a new one is dropped and counted.
        metrics.record(labels(0), Duration::ZERO);
        metrics.record(labels(u16::MAX), Duration::ZERO);
        let text = metrics.render();
        assert!(text.contains("response_code=\"0\"} 2\n"));
        assert!(!text.contains(&format!("response_code=\"{}\"", u16::MAX)));
        assert!(text.contains("mesh_request_series_dropped_total 1\n"));

        let metrics = RequestMetrics::default();
        let mut odd = labels(200);
        odd.destination_version = "a\"b\\c\nd".into();
        metrics.record(odd, Duration::ZERO);
        assert!(
            metrics
                .render()
                .contains("destination_version=\"a\\\"b\\\\c\\nd\"")
        );
    }
}
