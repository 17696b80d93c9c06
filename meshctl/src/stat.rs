//! `meshctl stat` and `meshctl top`: golden signals the control plane sums
//! from the nodes' request reports.

use std::fmt::Write as _;

use crate::output::{self, Format};

/// What to ask for and how to show it.
pub struct Ask<'a> {
    pub by_edge: bool,
    pub namespace: Option<&'a str>,
    pub service: Option<&'a str>,
    pub window: &'a str,
    pub format: Format,
}

/// One rendering of the signals.
pub fn once(client: &crate::client::Client, ask: &Ask<'_>) -> anyhow::Result<String> {
    let mut query = vec![
        ("window", ask.window),
        ("by", if ask.by_edge { "edge" } else { "service" }),
    ];
    if let Some(namespace) = ask.namespace {
        query.push(("namespace", namespace));
    }
    if let Some(service) = ask.service {
        query.push(("service", service));
    }
    let answer = client.get_json("/api/v1/stats", &query)?;
    Ok(match ask.format {
        Format::Json => format!("{}\n", serde_json::to_string_pretty(&answer)?),
        Format::Yaml => serde_yaml_ng::to_string(&answer)?,
        Format::Table => table(&answer, ask.by_edge),
    })
}

/// The signals as a table, busiest first.
pub fn table(answer: &serde_json::Value, by_edge: bool) -> String {
    let items = answer["items"].as_array().cloned().unwrap_or_default();
    let window = answer["window_seconds"].as_u64().unwrap_or(0);
    if items.is_empty() {
        return format!(
            "No requests in the last {window} s. Nodes report every 10 s (mesh-node \
             --stats-interval); only HTTP ports (declared, or detected on auto ports) are counted.\n"
        );
    }
    let mut head = vec!["SERVICE", "REQUESTS", "RPS", "SUCCESS", "P50", "P99"];
    if by_edge {
        head.insert(0, "FROM");
    }
    let mut rows = vec![head.into_iter().map(str::to_owned).collect::<Vec<_>>()];
    for item in &items {
        let ms = |key: &str| item[key].as_f64().map_or("-".to_owned(), format_ms);
        let mut row = vec![
            format!(
                "{}/{}",
                item["namespace"].as_str().unwrap_or("?"),
                item["service"].as_str().unwrap_or("?")
            ),
            item["requests"].as_u64().unwrap_or(0).to_string(),
            format!("{:.1}", item["requests_per_second"].as_f64().unwrap_or(0.0)),
            format!(
                "{:.2}%",
                100.0 * (1.0 - item["error_rate"].as_f64().unwrap_or(0.0))
            ),
            ms("p50_ms"),
            ms("p99_ms"),
        ];
        if by_edge {
            row.insert(0, item["source"].as_str().unwrap_or("?").to_owned());
        }
        rows.push(row);
    }
    let mut out = output::align(&rows);
    let _ = writeln!(out, "(last {window} s)");
    out
}

/// A latency for people: µs below a millisecond.
fn format_ms(ms: f64) -> String {
    if ms < 1.0 {
        format!("{:.0}µs", ms * 1000.0)
    } else if ms < 100.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.0}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_print_as_a_table() {
        let answer = serde_json::json!({
            "window_seconds": 60,
            "items": [
                {"source": "shop/frontend", "namespace": "shop", "service": "reviews", "requests": 1200,
                 "requests_per_second": 20.0, "error_rate": 0.005, "p50_ms": 0.42, "p99_ms": 12.34},
                {"source": "shop/web", "namespace": "shop", "service": "ratings", "requests": 3,
                 "requests_per_second": 0.05, "error_rate": 0.0, "p50_ms": null, "p99_ms": 250.0},
            ],
        });
        assert_eq!(
            table(&answer, true),
            "FROM            SERVICE        REQUESTS   RPS    SUCCESS   P50     P99\n\
             shop/frontend   shop/reviews   1200       20.0   99.50%    420µs   12.3ms\n\
             shop/web        shop/ratings   3          0.1    100.00%   -       250ms\n\
             (last 60 s)\n"
        );
        assert!(table(&answer, false).starts_with("SERVICE        REQUESTS"));
        let empty = serde_json::json!({"window_seconds": 60, "items": []});
        assert!(table(&empty, false).starts_with("No requests in the last 60 s."));
    }
}
