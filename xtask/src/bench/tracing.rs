//! `cargo xtask bench tracing`: what span export costs a request on the L7
//! path, with every request sampled: without export, exporting to a
//! collector that is up, and to one that is down (nothing listens).
//! Export must never slow the data path; a down collector only costs the
//! spans, counted as dropped.

use anyhow::Context as _;
use mesh_e2e::{cluster, http, otlp::Collector, process::free_port};

use super::datapath::{self, Figures, L7_VIP, Scale, Target};
use crate::run::step;

/// A counter on a node proxy's `/metrics`; 0 when absent.
fn counter(admin: std::net::SocketAddr, name: &str) -> anyhow::Result<f64> {
    match http::metric(admin, name)? {
        Some(value) => value
            .parse()
            .with_context(|| format!("{admin}'s {name} is {value:?}")),
        None => Ok(0.0),
    }
}

pub fn run(scale: Scale) -> anyhow::Result<super::Report> {
    step("benchmark: span export on the L7 path, collector up and down (release builds)");
    if !crate::run::is_root() {
        anyhow::bail!("the tracing benchmark builds network namespaces: run it as root");
    }
    datapath::build()?;
    let collector = Collector::start()?;
    // A port nothing listens on: connections are refused at once.
    let down = format!("http://127.0.0.1:{}", free_port()?);
    let up = collector.endpoint();
    let data_dir = std::env::temp_dir().join("mesh-bench-tracing");
    let mut rows = Vec::new();
    for (label, args) in [
        ("off", vec![]),
        (
            "up",
            vec!["--trace-endpoint", &up, "--trace-sample-ratio", "1"],
        ),
        (
            "down",
            vec!["--trace-endpoint", &down, "--trace-sample-ratio", "1"],
        ),
    ] {
        let setup = datapath::up(&data_dir, &args)?;
        let pids: Vec<u32> = setup.nodes.iter().map(|n| n.id()).collect();
        let side: Figures = datapath::measure(
            &setup.cluster,
            &Target {
                label,
                client: "shop/client",
                http: format!("{L7_VIP}:80"),
                h2: None,
                bulk: None,
                echo: None,
                proxies: &pids,
            },
            scale,
        )?;
        let mut exported = 0.0;
        let mut dropped = 0.0;
        for admin in &setup.admins {
            exported += counter(*admin, "mesh_trace_spans_exported_total")?;
            dropped += counter(*admin, "mesh_trace_spans_dropped_total")?;
        }
        println!("      spans exported {exported:.0}, dropped {dropped:.0}");
        rows.push((label, side, exported, dropped));
        drop(setup);
        cluster::teardown("benchhbone").context("tearing the cluster down")?;
    }
    let _ = std::fs::remove_dir_all(&data_dir);
    let off = rows[0].1.p50;
    let mut table = String::from(
        "| span export | c=1 p50 µs | c=1 p99 µs | p50 vs off | c=16 requests/s | spans exported | spans dropped |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut json = serde_json::Map::new();
    for (label, side, exported, dropped) in &rows {
        json.insert(
            (*label).to_owned(),
            serde_json::json!({
                "c1_p50_us": side.p50,
                "c1_p99_us": side.p99,
                "c16_requests_per_second": side.rps_c16,
                "spans_exported": exported,
                "spans_dropped": dropped,
            }),
        );
        table.push_str(&format!(
            "| {label} | {:.1} | {:.1} | {:+.1} | {:.0} | {exported:.0} | {dropped:.0} |\n",
            side.p50,
            side.p99,
            side.p50 - off,
            side.rps_c16,
        ));
    }
    let body = format!(
        "The L7 path of `bench datapath` (a client pod on node0 calling an HTTP\n\
         service on node1 through both node proxies), three times over: without\n\
         span export; every request sampled (`--trace-sample-ratio 1`, a client\n\
         and a server span per request) and exported over OTLP/HTTP to a\n\
         collector on loopback that accepts everything; and the same with the\n\
         collector down (nothing listens on its port). Same workload as the\n\
         datapath benchmark, median of its runs; the span counters are summed\n\
         over both nodes.\n\n\
         {table}\n\
         Recording a span only queues it (4096 at most, then dropped and\n\
         counted); a background task sends them in batches of up to 512, a\n\
         batch waiting at most 1 s to fill, one export request at a time (5 s\n\
         at most each): no request waits for an export. Read `down` against\n\
         `up` for what a down collector does to requests, and both against\n\
         `off` for what recording every request's spans costs (the default\n\
         samples 1 %). The collector runs inside the benchmark's own process,\n\
         on the same 2 cores as the proxies, client and server, decoding every\n\
         batch: with it up, that work competes with the proxies.\n\n\
         Machine: {}. Reproduce: `cargo xtask bench tracing` (root).",
        super::machine()
    );
    Ok(super::Report {
        name: "tracing",
        title: "Span export, collector up and down",
        body,
        json: json.into(),
    })
}
