//! `cargo xtask bench config-push`: how fast a change written through the
//! API reaches the nodes it concerns, with 100 simulated nodes, 1,000
//! services and 10,000 endpoints on the embedded store. The nodes are the
//! node's real configuration client (see `mesh-node/examples/config_push.rs`),
//! all in one process next to `mesh-control` on this machine's two cores.

use std::process::{Command, Stdio};

use anyhow::{Context as _, ensure};

use super::capture::release_bin;
use crate::run::step;

pub fn run(quick: bool) -> anyhow::Result<super::Report> {
    step(
        "benchmark: configuration push at 100 nodes, 1,000 services, 10,000 endpoints (release builds)",
    );
    super::build()?;
    let data_dir = std::env::temp_dir().join("mesh-bench-config-push");
    let control = super::serve_control(
        Command::new(release_bin("mesh-control")),
        &data_dir,
        mesh_e2e::process::Logs::Inherit,
    )?;
    let output = Command::new(release_bin("examples/config_push"))
        .args(["--api", &control.api, "--grpc", &control.grpc])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--control-pid", &control.process.id().to_string()])
        .args(if quick {
            ["--changes", "20", "--certificates", "200"]
        } else {
            ["--changes", "100", "--certificates", "1000"]
        })
        .stderr(Stdio::inherit())
        .output()
        .context("running the config push benchmark")?;
    drop(control);
    let _ = std::fs::remove_dir_all(&data_dir);
    ensure!(
        output.status.success(),
        "the config push benchmark failed: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("the benchmark printed {output:?}"))?;
    let number = |value: &serde_json::Value, key: &str| value[key].as_f64().unwrap_or(f64::NAN);

    let mut table = String::from(
        "| change | nodes it concerns | p50 ms | p99 ms | max ms | of which the API write, p50 ms |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for row in result["timings"].as_array().context("no timings")? {
        table.push_str(&format!(
            "| {} ({} changes) | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            row["kind"].as_str().unwrap_or("?"),
            row["changes"],
            row["nodes_per_change"],
            number(row, "p50_ms"),
            number(row, "p99_ms"),
            number(row, "max_ms"),
            number(row, "write_p50_ms"),
        ));
    }
    println!("{table}");
    let body = format!(
        "{} simulated nodes follow a mesh of {} namespaces, {} services (each with a\n\
         ServicePolicy) and {} workloads, one endpoint each; every node holds every\n\
         workload's address plus the namespaces it runs workloads in ({} resources on\n\
         node-000). Each node is the node's real configuration client (own node\n\
         certificate, gRPC stream over mTLS, validation, atomic swap, ACK) without the\n\
         data path, all in one process beside `mesh-control` on the embedded SQLite\n\
         store. Changes are written through the admin API one at a time; each is timed\n\
         from the write until every node it concerns holds it (a node ACKs right after\n\
         it swaps the push in).\n\n\
         {table}\n\
         Target: p99 ≤ 100 ms from the API write to all affected nodes.\n\n\
         | figure | value |\n|---|---:|\n\
         | all nodes in sync from connecting | {:.1} s |\n\
         | loading the mesh through the API ({} applies) | {:.1} s |\n\
         | mesh-control CPU per change (all nodes' pushes, ACKs, status) | {:.1} ms |\n\
         | mesh-control RSS, mesh loaded, no node connected | {:.0} MiB |\n\
         | mesh-control RSS, {} nodes connected and in sync | {:.0} MiB |\n\
         | mesh-control RSS after the changes | {:.0} MiB |\n\
         | workload certificates issued, {} asked for at once | {:.0} /s |\n\
         | mesh-control CPU per certificate | {:.2} ms |\n\n\
         The simulated nodes share the machine's two cores with `mesh-control`, so\n\
         the times include their validation and swaps too. A workload change\n\
         concerns every node (each holds every address); a service's policy or\n\
         endpoints concern the nodes running workloads in its namespace.\n\
         Certificates: workloads spread over all the nodes ask for theirs at once,\n\
         each through the node's real client (a P-256 key and CSR, the gRPC call over\n\
         the node's mTLS channel, the CA's check that the workload runs on that node,\n\
         the signature, the record in the store), timed until the last is held.\n\n\
         Machine: {}. Reproduce: `cargo xtask bench config-push`.",
        result["nodes"],
        result["namespaces"],
        result["services"],
        result["workloads"],
        result["resources_per_node"],
        number(&result, "initial_sync_s"),
        result["namespaces"],
        number(&result, "load_s"),
        number(&result, "control_cpu_ms_per_change"),
        number(&result, "control_rss_mib_before_nodes"),
        result["nodes"],
        number(&result, "control_rss_mib_loaded"),
        number(&result, "control_rss_mib_end"),
        result["certificates"],
        number(&result, "certificates_per_second"),
        number(&result, "control_cpu_ms_per_certificate"),
        super::machine(),
    );
    Ok(super::Report {
        name: "config-push",
        title: "Configuration push",
        body,
        json: result,
    })
}
