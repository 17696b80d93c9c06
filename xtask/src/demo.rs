//! `cargo xtask demo`: the mesh at work on a local cluster of three nodes,
//! each claim shown with the figure that proves it.
//!
//! The control plane runs on its embedded SQLite store with its own CA; a
//! node proxy per node joins with a bootstrap token, holds its pods'
//! certificates and captures namespace `shop` with eBPF. The sample
//! application: `frontend` (node0) calls `reviews` (v1 on node1, v2 on
//! node2) and `ratings` (an endpoint on each); `legacy/client` (node0) is
//! outside the mesh. The walkthrough: mTLS on the wire (from a packet
//! capture), an authorization deny, a 95/5 canary and the `X-Canary`
//! override, retries absorbing a flaky upstream, a timeout's 504, the
//! circuit opening and closing, certificates rotating under traffic, the
//! control plane's golden signals and a trace. Everything is torn down at
//! the end, on error and on Ctrl-C.

mod mesh;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
pub(crate) use mesh::meshctl_at;
use mesh::{Mesh, wait_for};
use mesh_e2e::{
    Cluster, ClusterSpec, PodSpec, cluster,
    control::node_command,
    http,
    otlp::Collector,
    process::{Logs, Process, ready_field},
    sniff::Sniffer,
};

use crate::run::{self, root};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

const CLUSTER: &str = "demo";
const FRONTEND: &str = "shop/frontend";
const LEGACY: &str = "legacy/client";
const REVIEWS: [&str; 2] = ["shop/reviews-v1", "shop/reviews-v2"];
const RATINGS: [&str; 2] = ["shop/ratings-1", "shop/ratings-2"];
const REVIEWS_VIP: &str = "10.96.0.10:80";
const RATINGS_VIP: &str = "10.96.0.11:80";
const V1_BODY: &str = "reviews v1: 4 stars";
const V2_BODY: &str = "reviews v2: 4 stars, with photos";
const RATINGS_BODY: &str = "ratings: 4.2";
/// Workload certificates live this long here (24 h by default), so that
/// they rotate while the demo runs.
const CERTIFICATE_TTL: &str = "20s";
const STEPS: usize = 15;

#[derive(Debug, Default, clap::Args)]
pub struct Args {
    /// Keep the cluster and mesh-node running at the end, to explore, until
    /// Ctrl-C.
    #[arg(long)]
    keep: bool,
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn heading(n: usize, what: &str) {
    println!("\n[{n}/{STEPS}] {what}");
}

/// What each step showed, for the summary at the end.
type Shown = Vec<(&'static str, String)>;

pub fn run(args: Args) -> anyhow::Result<()> {
    let (interrupt_tx, interrupt_rx) = mpsc::sync_channel(1);
    ctrlc::set_handler(move || {
        INTERRUPTED.store(true, Ordering::SeqCst);
        let _ = interrupt_tx.try_send(());
    })
    .context("installing the Ctrl-C handler")?;
    if !run::is_root() {
        bail!("the demo builds network namespaces and loads eBPF: run it as root");
    }

    heading(1, "set-up and build");
    run::build_binaries(false, &[])?;
    check_interrupted()?;

    let data_dir = std::env::temp_dir().join("mesh-demo-control");
    let mut mesh = match start(&data_dir) {
        Ok(mesh) => mesh,
        Err(error) => {
            // What did start was dropped and so stopped.
            let _ = std::fs::remove_dir_all(&data_dir);
            if INTERRUPTED.load(Ordering::SeqCst) {
                let _ = std::fs::remove_dir_all(logs_dir());
                bail!("interrupted; cluster {CLUSTER} torn down");
            }
            return Err(error.context(format!(
                "the processes' logs are in {}",
                logs_dir().display()
            )));
        }
    };
    let mut shown = Shown::new();
    let walked = walk_through(&mut mesh, &mut shown);
    if walked.is_ok() {
        heading(STEPS, "done: what the demo showed");
        for (what, figure) in &shown {
            println!("    {what:<22} {figure}");
        }
        if args.keep {
            explore(&mesh, &data_dir);
            let _ = interrupt_rx.recv();
        }
    }
    let stopped = mesh.stop();
    let _ = std::fs::remove_dir_all(&data_dir);
    match (walked, stopped) {
        (Ok(()), Ok(report)) => {
            let _ = std::fs::remove_dir_all(logs_dir());
            println!("    cluster {CLUSTER} torn down: {report}");
            Ok(())
        }
        // Ctrl-C also stops the processes a step was waiting on: what that
        // step says about it is noise.
        (Err(_), Ok(report)) if INTERRUPTED.load(Ordering::SeqCst) => {
            let _ = std::fs::remove_dir_all(logs_dir());
            bail!("interrupted; cluster {CLUSTER} torn down: {report}")
        }
        (Err(error), _) | (Ok(()), Err(error)) => Err(error.context(format!(
            "the processes' logs are kept in {}",
            logs_dir().display()
        ))),
    }
}

/// Steps 2 to 4: the cluster, the control plane with the application's
/// resources, the node proxies and the application's servers.
fn start(data_dir: &std::path::Path) -> anyhow::Result<Mesh> {
    heading(2, "a local cluster of 3 nodes");
    if cluster::teardown(CLUSTER)?.was_empty() {
        println!("    (no earlier demo cluster to clear)");
    } else {
        println!("    cleared an earlier demo cluster");
    }
    let cluster = Cluster::up(&ClusterSpec {
        name: CLUSTER.into(),
        nodes: 3,
        pods: vec![
            PodSpec::new("shop", "frontend", 0),
            PodSpec::new("legacy", "client", 0),
            PodSpec::new("shop", "reviews-v1", 1),
            PodSpec::new("shop", "ratings-1", 1),
            PodSpec::new("shop", "reviews-v2", 2),
            PodSpec::new("shop", "ratings-2", 2),
        ],
    })?;
    for pod in &cluster.layout().pods {
        println!(
            "    {:<16} node{}  {:<10} {}",
            pod.id(),
            pod.node,
            pod.ip4,
            pod.ip6
        );
    }
    check_interrupted()?;

    heading(
        3,
        "the control plane: SQLite store, its own CA, the node API",
    );
    let logs = logs_dir();
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    println!(
        "    the processes' logs go to {} (removed at the end unless something failed)",
        logs.display()
    );
    let mut command = cluster.system_command(bin("mesh-control"))?;
    command.env("MESH_CERTIFICATE_TTL", CERTIFICATE_TTL);
    let crate::bench::Control {
        process: control,
        api,
        grpc,
    } = crate::bench::serve_control(command, data_dir, log_file("mesh-control")?)?;
    println!(
        "    mesh-control pid {} admin API {api}, node API {grpc}",
        control.id()
    );
    println!(
        "    workload certificates live {CERTIFICATE_TTL} in the demo (24h by default), so they rotate while it runs"
    );
    let collector = Collector::start()?;
    let mut mesh = Mesh {
        cluster,
        api,
        data_dir: data_dir.to_owned(),
        control: Some(control),
        nodes: Vec::new(),
        apps: HashMap::new(),
        collector,
    };
    for line in mesh
        .meshctl(&["apply", "-f", "-"], &resources(&mesh)?)?
        .lines()
    {
        println!("    meshctl apply: {line}");
    }
    check_interrupted()?;

    heading(
        4,
        "mesh-node on each node: joins the mesh, captures its pods, opens HBONE",
    );
    for index in 0..3 {
        let mut command = node_command(&mesh.cluster, index, &grpc, data_dir, &bin("mesh-node"))?;
        command
            .args(["--stats-interval", "1s"])
            .args(["--trace-endpoint", &mesh.collector.endpoint()]);
        let name = format!("node{index}");
        let (process, ready) = Process::spawn_ready_with(
            &name,
            command,
            "ready",
            Duration::from_secs(30),
            log_file(&name)?,
        )?;
        let admin: SocketAddr = ready_field(&ready, "admin")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("mesh-node said {ready:?}"))?;
        println!(
            "    node{index}: mesh-node pid {} admin http://{admin}",
            process.id()
        );
        mesh.nodes.push((process, admin));
    }
    for pod in [FRONTEND, REVIEWS[0], RATINGS[0], REVIEWS[1], RATINGS[1]] {
        let node = mesh.cluster.pod(pod)?.node;
        wait_for_capture(mesh.nodes[node].1, pod)?;
        println!(
            "    node{node}: captured {pod} (namespace shop is labelled mesh.io/capture=enabled)"
        );
    }
    for (index, (_, admin)) in mesh.nodes.iter().enumerate() {
        for cert in wait_for_certificates(*admin)? {
            println!(
                "    node{index}: {:<8} {:<16} {}",
                cert["holder"].as_str().unwrap_or("?"),
                cert["name"].as_str().unwrap_or("?"),
                cert["spiffe_id"].as_str().unwrap_or("?"),
            );
        }
    }
    println!("    (keys generated on the nodes; the CA chose each identity from the store)");
    println!("    {LEGACY} stays outside the mesh: namespace legacy is not labelled");

    for (pod, body) in [(REVIEWS[0], V1_BODY), (REVIEWS[1], V2_BODY)] {
        mesh.serve(pod, body, &[])?;
    }
    mesh.serve(RATINGS[0], RATINGS_BODY, &["--hang"])?;
    mesh.serve(
        RATINGS[1],
        RATINGS_BODY,
        &["--hang", "--fail-percent", "30"],
    )?;
    println!(
        "    app: reviews v1 and v2 serve HTTP on 8080; ratings-1 too, ratings-2 answers 503 to 30 % of requests"
    );
    Ok(mesh)
}

/// The application's resources: its namespace, workloads and services.
fn resources(mesh: &Mesh) -> anyhow::Result<String> {
    let mut yaml = String::from(
        "apiVersion: mesh.io/v1\nkind: Namespace\nmetadata: {name: shop, labels: {mesh.io/capture: enabled}}\n",
    );
    for (pod, account, services, version) in [
        (FRONTEND, "frontend", "", "v1"),
        (REVIEWS[0], "reviews", "reviews", "v1"),
        (REVIEWS[1], "reviews", "reviews", "v2"),
        (RATINGS[0], "ratings", "ratings", "v1"),
        (RATINGS[1], "ratings", "ratings", "v1"),
    ] {
        let layout = mesh.cluster.pod(pod)?;
        yaml.push_str(&format!(
            "---\napiVersion: mesh.io/v1\nkind: Workload\nmetadata: {{name: {}, namespace: shop}}\n\
             spec: {{node: node{}, ip: {}, service_account: {account}, services: [{services}], version: {version}}}\n",
            layout.name, layout.node, layout.ip4,
        ));
    }
    for (service, vip) in [("reviews", REVIEWS_VIP), ("ratings", RATINGS_VIP)] {
        let ip = vip.trim_end_matches(":80");
        yaml.push_str(&format!(
            "---\napiVersion: mesh.io/v1\nkind: Service\nmetadata: {{name: {service}, namespace: shop}}\n\
             spec: {{vip: {ip}, ports: [{{port: 80, target_port: 8080, protocol: http}}]}}\n"
        ));
    }
    Ok(yaml)
}

fn walk_through(mesh: &mut Mesh, shown: &mut Shown) -> anyhow::Result<()> {
    mtls(mesh, shown)?;
    check_interrupted()?;
    authorization(mesh, shown)?;
    check_interrupted()?;
    canary(mesh, shown)?;
    check_interrupted()?;
    retries(mesh, shown)?;
    check_interrupted()?;
    timeout(mesh, shown)?;
    check_interrupted()?;
    circuit_breaker(mesh, shown)?;
    check_interrupted()?;
    rotation(mesh, shown)?;
    check_interrupted()?;
    golden_signals(mesh, shown)?;
    check_interrupted()?;
    trace(mesh, shown)?;
    check_interrupted()?;
    what_the_nodes_hold(mesh)
}

fn mtls(mesh: &Mesh, shown: &mut Shown) -> anyhow::Result<()> {
    heading(
        5,
        "mTLS on the wire: plain HTTP inside the pods, only TLS between the nodes",
    );
    const PATH: &str = "/reviews/product-0042";
    // The first request may wait for the pods' certificates to be in use.
    wait_for("frontend to reach reviews", || {
        Ok(mesh.requests(FRONTEND, REVIEWS_VIP, &[])?.ok() == 1)
    })?;
    let fabric = Sniffer::start(&mesh.cluster.layout().fabric_netns())?;
    let pod = Sniffer::start(&mesh.cluster.pod(FRONTEND)?.netns)?;
    let answers = mesh.requests(FRONTEND, REVIEWS_VIP, &["--path", PATH, "--count", "10"])?;
    let (wire, inside) = (fabric.stop()?, pod.stop()?);
    ensure!(answers.ok() == 10, "frontend -> reviews: {answers}");
    println!(
        "    {FRONTEND} -> reviews ({REVIEWS_VIP}): 10 requests, {} (v1 ×{}, v2 ×{}: round robin)",
        answers.statuses(),
        answers.body(V1_BODY),
        answers.body(V2_BODY)
    );
    let in_pod = occurrences(&inside, PATH.as_bytes());
    let in_clear = occurrences(&wire, PATH.as_bytes()) + occurrences(&wire, b"reviews v");
    let records = occurrences(&wire, &[0x17, 0x03, 0x03]);
    println!(
        "    captured inside frontend's pod (app <-> mesh-node): the request path, {in_pod} times, in clear text"
    );
    println!(
        "    captured between the nodes: the path or a body {in_clear} times; {records} TLS application-data records"
    );
    ensure!(
        in_pod > 0 && in_clear == 0 && records > 0,
        "the capture does not show mTLS: {in_pod} in the pod, {in_clear} in the clear on the wire, {records} TLS records"
    );

    let direct = mesh.addr(REVIEWS[0], 8080)?;
    let legacy = mesh.requests(LEGACY, &direct, &["--count", "3"])?;
    ensure!(
        legacy.ok() == 0,
        "plaintext from {LEGACY} reached a strict workload: {legacy}"
    );
    println!(
        "    {LEGACY} -> {direct} (reviews-v1, plain text): 3 of 3 refused, as shop is strict mTLS"
    );
    shown.push((
        "mTLS",
        format!(
            "10 requests: {records} TLS records and 0 clear-text bytes between nodes; plaintext from outside refused"
        ),
    ));
    Ok(())
}

fn authorization(mesh: &Mesh, shown: &mut Shown) -> anyhow::Result<()> {
    heading(6, "authorization at the destination");
    let served = |mesh: &Mesh| -> anyhow::Result<u64> {
        Ok(mesh.hits(FRONTEND, &mesh.addr(REVIEWS[0], 8080)?)?
            + mesh.hits(FRONTEND, &mesh.addr(REVIEWS[1], 8080)?)?)
    };
    let before = served(mesh)?;
    mesh.apply(
        "apiVersion: mesh.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {name: no-frontend, namespace: shop}\n\
         spec: {target: reviews, action: deny, rules: [{from: [{principals: ['spiffe://cluster.local/ns/shop/sa/frontend']}]}]}\n",
    )?;
    println!("    meshctl apply: deny spiffe://cluster.local/ns/shop/sa/frontend -> reviews");
    let denied = mesh.requests(FRONTEND, REVIEWS_VIP, &["--count", "5"])?;
    ensure!(
        denied.ok() == 0,
        "the deny policy let requests through: {denied}"
    );
    mesh.change(
        &["delete", "authorizationpolicy", "no-frontend", "-n", "shop"],
        "",
    )?;
    let reached = served(mesh)? - before;
    ensure!(
        reached == 0,
        "{reached} denied requests reached reviews' servers"
    );
    println!(
        "    {FRONTEND} -> reviews: 5 requests, {}; the reviews servers counted {reached} of them",
        denied.statuses()
    );
    let again = mesh.requests(FRONTEND, REVIEWS_VIP, &["--count", "5"])?;
    ensure!(again.ok() == 5, "after the policy's deletion: {again}");
    println!("    policy deleted: 5 requests, {}", again.statuses());
    shown.push((
        "authorization",
        format!(
            "deny policy: 5 of 5 refused ({}), 0 reached the app; deleted: 5 of 5 answered",
            denied.statuses()
        ),
    ));
    Ok(())
}

fn split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: mesh.io/v1\nkind: TrafficSplit\nmetadata: {{name: reviews-canary, namespace: shop}}\n\
         spec: {{destination: reviews, v1_weight: {v1}, v2_weight: {v2}, header_match: {{x-canary: 'true'}}}}\n"
    )
}

fn canary(mesh: &Mesh, shown: &mut Shown) -> anyhow::Result<()> {
    heading(
        7,
        "a canary: 95/5 between reviews v1 and v2, X-Canary to force v2",
    );
    mesh.apply(&split(95, 5))?;
    println!("    meshctl apply: TrafficSplit reviews v1 95, v2 5, x-canary: true -> v2");
    let share = |count: u32, header: Option<&str>| -> anyhow::Result<(u64, f64)> {
        let count_arg = count.to_string();
        let mut args = vec!["--count", count_arg.as_str(), "--keep-alive"];
        if let Some(header) = header {
            args.extend(["--header", header]);
        }
        let answers = mesh.requests(FRONTEND, REVIEWS_VIP, &args)?;
        ensure!(
            answers.ok() == u64::from(count),
            "frontend -> reviews: {answers}"
        );
        let v2 = answers.body(V2_BODY);
        Ok((v2, 100.0 * v2 as f64 / f64::from(count)))
    };
    let (v2, percent) = share(2000, None)?;
    println!("    canary share {percent:.1} % of 2000 (v2 answered {v2})");
    // 4.6 standard deviations of a binomial(2000, 5 %) either side.
    ensure!(
        (55..=145).contains(&v2),
        "v2 got {v2} of 2000 under a 95/5 split"
    );
    let (forced, _) = share(100, Some("x-canary: true"))?;
    println!("    with X-Canary: true, {forced} of 100 to v2: the header wins over the weights");
    ensure!(forced == 100, "X-Canary sent {forced} of 100 to v2");
    mesh.apply(&split(50, 50))?;
    let (_, half) = share(1000, None)?;
    println!("    weights moved to 50/50 at run time: v2 share {half:.1} % of 1000");
    ensure!(
        (42.0..=58.0).contains(&half),
        "v2 got {half:.1} % under a 50/50 split"
    );
    mesh.change(
        &["delete", "trafficsplit", "reviews-canary", "-n", "shop"],
        "",
    )?;
    shown.push((
        "canary split",
        format!("canary share {percent:.1} % of 2000; X-Canary {forced} of 100 to v2; 50/50 gave {half:.1} %"),
    ));
    Ok(())
}

fn ratings_policy(spec: &str) -> String {
    format!(
        "apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {{name: ratings, namespace: shop}}\nspec: {{{spec}}}\n"
    )
}

fn retries(mesh: &Mesh, shown: &mut Shown) -> anyhow::Result<()> {
    heading(8, "retries absorb a flaky upstream");
    println!("    ratings-2 answers 503 to 30 % of its requests; ratings-1 is healthy");
    mesh.apply(&ratings_policy("retry_attempts: 0"))?;
    let without = mesh.requests(FRONTEND, RATINGS_VIP, &["--count", "200"])?;
    println!(
        "    ServicePolicy retry_attempts: 0  -> 200 requests: {}",
        without.statuses()
    );
    ensure!(
        without.status("503") > 0,
        "the flaky upstream failed nothing: {without}"
    );
    mesh.apply(&ratings_policy("retry_attempts: 3"))?;
    let before = mesh.metric(0, "mesh_http_retries_total")?;
    let with = mesh.requests(FRONTEND, RATINGS_VIP, &["--count", "200"])?;
    let retried = mesh.metric(0, "mesh_http_retries_total")? - before;
    println!(
        "    ServicePolicy retry_attempts: 3  -> 200 requests: {}; node0 retried {retried} (on the other endpoint, 25-250 ms jittered backoff)",
        with.statuses()
    );
    ensure!(
        with.ok() == 200 && retried > 0,
        "retries did not absorb the failures: {with}"
    );
    shown.push((
        "retries",
        format!(
            "{} of 200 failed without retries; 200 of 200 answered with them ({retried} retried)",
            without.status("503")
        ),
    ));
    Ok(())
}

fn timeout(mesh: &Mesh, shown: &mut Shown) -> anyhow::Result<()> {
    heading(9, "a timeout: 504 when the upstream does not answer");
    mesh.apply(&ratings_policy("timeout_ms: 250, retry_attempts: 0"))?;
    println!("    meshctl apply: ServicePolicy ratings timeout_ms: 250");
    let started = Instant::now();
    let hung = mesh.requests(FRONTEND, RATINGS_VIP, &["--path", "/hang"])?;
    let took = started.elapsed();
    ensure!(
        hung.status("504") == 1 && hung.flag("UT") == 1,
        "a hung upstream gave {hung}"
    );
    println!(
        "    GET /hang (ratings never answers it): 504 with x-mesh-flags: UT after {:.0} ms",
        took.as_secs_f64() * 1000.0
    );
    shown.push((
        "timeout",
        format!(
            "504 (UT) after {:.0} ms with timeout_ms 250",
            took.as_secs_f64() * 1000.0
        ),
    ));
    Ok(())
}

fn circuit_breaker(mesh: &mut Mesh, shown: &mut Shown) -> anyhow::Result<()> {
    heading(
        10,
        "the circuit opens on a failing service and closes when it recovers",
    );
    mesh.apply(&ratings_policy(
        "retry_attempts: 0, cb_threshold: 50, cb_window_sec: 10, cb_recovery_timeout_ms: 2000",
    ))?;
    for pod in RATINGS {
        mesh.serve(pod, RATINGS_BODY, &["--hang", "--fail-percent", "100"])?;
    }
    println!(
        "    ratings-1 and ratings-2 now fail every request (policy: open at 50 % errors over 10 s, retry after 2 s)"
    );
    let started = Instant::now();
    let answers = mesh.requests(FRONTEND, RATINGS_VIP, &["--count", "100"])?;
    let took = started.elapsed();
    let reached = mesh.hits(FRONTEND, &mesh.addr(RATINGS[0], 8080)?)?
        + mesh.hits(FRONTEND, &mesh.addr(RATINGS[1], 8080)?)?;
    let fast = answers.flag("UO");
    ensure!(
        fast > 0 && reached + fast == 100,
        "{reached} requests reached ratings and {fast} failed fast: {answers}"
    );
    println!(
        "    100 requests in {:.0} ms: {reached} reached ratings and failed; then the circuit opened and node0 answered {fast} at once (503, x-mesh-flags: UO), never sending them",
        took.as_secs_f64() * 1000.0
    );
    mesh.serve(RATINGS[0], RATINGS_BODY, &["--hang"])?;
    mesh.serve(RATINGS[1], RATINGS_BODY, &["--hang"])?;
    let recovered = Instant::now();
    wait_for("the circuit to close", || {
        Ok(mesh
            .requests(FRONTEND, RATINGS_VIP, &["--count", "3"])?
            .ok()
            == 3)
    })?;
    let closed = recovered.elapsed().as_secs_f64();
    println!(
        "    ratings healthy again: the circuit closed {closed:.1} s later (half open after the recovery time, probes succeeded)"
    );
    shown.push((
        "circuit breaker",
        format!(
            "opened after {reached} failures, {fast} fast 503s never sent; closed {closed:.1} s after recovery"
        ),
    ));
    Ok(())
}

fn rotation(mesh: &Mesh, shown: &mut Shown) -> anyhow::Result<()> {
    heading(11, "certificate rotation under traffic");
    let holders = [(0, FRONTEND), (1, REVIEWS[0]), (2, REVIEWS[1])];
    let rotations = || -> anyhow::Result<Vec<u64>> {
        holders
            .iter()
            .map(|(node, pod)| {
                mesh.metric(
                    *node,
                    &format!(
                        "mesh_certificate_rotations_total{{holder=\"workload\",name=\"{pod}\"}}"
                    ),
                )
            })
            .collect()
    };
    let handshakes = || mesh.metric(0, "mesh_tls_handshakes_total{side=\"client\"}");
    let (start, handshakes_before) = (rotations()?, handshakes()?);
    println!(
        "    sending requests from {FRONTEND} to reviews until its and both reviews' certificates have rotated"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut sent, mut failed) = (0u64, 0u64);
    let batch = |sent: &mut u64, failed: &mut u64| -> anyhow::Result<()> {
        let answers = mesh.requests(FRONTEND, REVIEWS_VIP, &["--count", "50"])?;
        *sent += 50;
        *failed += 50 - answers.ok();
        Ok(())
    };
    let rotated = loop {
        let now = rotations()?;
        if now.iter().zip(&start).all(|(now, was)| now > was) {
            break now;
        }
        ensure!(
            Instant::now() < deadline,
            "certificates did not rotate within 60 s"
        );
        check_interrupted()?;
        batch(&mut sent, &mut failed)?;
    };
    // And after the last rotation, on connections with the new
    // certificates: every rotation counted has traffic after it.
    batch(&mut sent, &mut failed)?;
    let new_connections = handshakes()? - handshakes_before;
    let frontend_rotations = rotated[0] - start[0];
    println!(
        "    {sent} requests while 3 certificates rotated: {failed} failed; node0 opened {new_connections} new tunnel connections, presenting frontend's new certificate"
    );
    ensure!(failed == 0, "{failed} requests failed during the rotation");
    // Every rotation moves new requests to a connection made with the new
    // certificate, even with traffic that never lets a connection idle.
    ensure!(
        new_connections >= frontend_rotations,
        "frontend's certificate rotated {frontend_rotations} times but node0 opened only {new_connections} tunnel connections"
    );
    shown.push((
        "certificate rotation",
        format!("{sent} requests across 3 rotations, {failed} failed"),
    ));
    Ok(())
}

fn golden_signals(mesh: &Mesh, shown: &mut Shown) -> anyhow::Result<()> {
    heading(
        12,
        "golden signals from the control plane: meshctl stat and meshctl top",
    );
    let reviews = || -> anyhow::Result<serde_json::Value> {
        let json = mesh.meshctl(
            &[
                "stat", "reviews", "-n", "shop", "--window", "10m", "-o", "json",
            ],
            "",
        )?;
        let stat: serde_json::Value =
            serde_json::from_str(&json).context("parsing meshctl stat -o json")?;
        Ok(stat["items"][0].clone())
    };
    // The nodes report every second; the counts settle once every report
    // of the traffic so far is in.
    let mut last = 0;
    wait_for("the nodes' reports to settle", || {
        std::thread::sleep(Duration::from_millis(1500));
        let now = reviews()?["requests"].as_u64().unwrap_or(0);
        let settled = now > 0 && now == last;
        last = now;
        Ok(settled)
    })?;
    for line in mesh
        .meshctl(&["stat", "-n", "shop", "--window", "10m"], "")?
        .lines()
    {
        println!("    {line}");
    }
    println!();
    for line in mesh.meshctl(&["top", "--window", "10m"], "")?.lines() {
        println!("    {line}");
    }
    let item = reviews()?;
    shown.push((
        "golden signals",
        format!(
            "reviews: {} requests, {:.1} % errors, p50 {:.2} ms, p99 {:.2} ms",
            item["requests"],
            100.0 * item["error_rate"].as_f64().unwrap_or(0.0),
            item["p50_ms"].as_f64().unwrap_or(f64::NAN),
            item["p99_ms"].as_f64().unwrap_or(f64::NAN),
        ),
    ));
    Ok(())
}

fn trace(mesh: &Mesh, shown: &mut Shown) -> anyhow::Result<()> {
    heading(
        13,
        "a trace: the app's sampled request, a span at each node",
    );
    const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const APP_SPAN: &str = "00f067aa0ba902b7";
    let header = format!("traceparent: 00-{TRACE_ID}-{APP_SPAN}-01");
    let answers = mesh.requests(FRONTEND, REVIEWS_VIP, &["--header", &header])?;
    ensure!(answers.ok() == 1, "the traced request: {answers}");
    let of_trace = || {
        mesh.collector
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == TRACE_ID)
            .collect::<Vec<_>>()
    };
    wait_for("both spans to reach the collector", || {
        Ok(of_trace().len() == 2)
    })?;
    let mut spans = of_trace();
    spans.sort_by_key(|s| s.kind != "client");
    println!(
        "    frontend sent traceparent 00-{TRACE_ID}-{APP_SPAN}-01; the nodes exported (OTLP/HTTP):"
    );
    for span in &spans {
        println!(
            "    {:<6} span {} parent {} on {}  {:<20} {:>7.2} ms  status {}{}",
            span.kind,
            span.span_id,
            span.parent_span_id,
            span.node,
            span.name,
            span.duration.as_secs_f64() * 1000.0,
            span.attribute("http.response.status_code").unwrap_or("?"),
            span.attribute("server.address")
                .map(|a| format!("  endpoint {a}"))
                .unwrap_or_default(),
        );
    }
    ensure!(
        spans[0].kind == "client"
            && spans[0].parent_span_id == APP_SPAN
            && spans[1].kind == "server"
            && spans[1].parent_span_id == spans[0].span_id,
        "the spans do not chain app -> client -> server: {spans:?}"
    );
    let total = mesh.collector.spans().len();
    println!(
        "    (the collector holds {total} spans: 1 % of the demo's untraced requests are sampled too)"
    );
    shown.push((
        "trace",
        format!(
            "trace {}…: app span -> client span on {} -> server span on {}",
            &TRACE_ID[..8],
            spans[0].node,
            spans[1].node
        ),
    ));
    Ok(())
}

/// What the kernel counted on node0 and what each node holds.
fn what_the_nodes_hold(mesh: &Mesh) -> anyhow::Result<()> {
    heading(14, "what the kernel counted and what each node holds");
    let state: serde_json::Value =
        serde_json::from_str(&http::get(mesh.nodes[0].1, "/capture")?.body)
            .context("parsing mesh-node's /capture")?;
    let counters = &state["counters"];
    println!(
        "    node0's kernel counted: connect_redirected={} bypass_uncaptured={} bypass_loopback={} error={}",
        counters["connect_redirected"],
        counters["bypass_uncaptured"],
        counters["bypass_loopback"],
        counters["error"]
    );
    ensure!(
        counters["error"] == 0 && counters["connect_redirected"].as_u64() > Some(0),
        "the kernel counted errors or no redirects: {state}"
    );
    println!("    meshctl proxy-status (the pushed configuration, per node):");
    for line in mesh.meshctl(&["proxy-status"], "")?.lines() {
        println!("      {line}");
    }
    println!("    meshctl proxy-config node0 --type routes (read from node0's admin endpoint):");
    for line in mesh
        .meshctl(&["proxy-config", "node0", "--type", "routes"], "")?
        .lines()
    {
        println!("      {line}");
    }
    println!("    meshctl check:");
    for line in mesh
        .meshctl(&["check"], "")
        .context("meshctl check found errors")?
        .lines()
    {
        println!("      {line}");
    }
    Ok(())
}

/// With `--keep`: where to look while the mesh runs.
fn explore(mesh: &Mesh, data_dir: &std::path::Path) {
    for (index, (_, admin)) in mesh.nodes.iter().enumerate() {
        println!(
            "    node{index}: http://{admin}/metrics (and /capture, /certificates, /connections, /config)"
        );
    }
    println!(
        "    meshctl: MESH_DATA_DIR={} target/debug/meshctl --server {} stat -n shop",
        data_dir.display(),
        mesh.api
    );
    println!(
        "    a pod: ip netns exec mesh-{CLUSTER}-shop-frontend target/debug/mesh-pod http --to {REVIEWS_VIP}"
    );
    println!(
        "    logs: {}/{{mesh-control,node0,node1,node2}}.log",
        logs_dir().display()
    );
    println!("    still running; press Ctrl-C to tear everything down");
}

/// Waits until the node has captured `pod`, as the pushed configuration says.
fn wait_for_capture(admin: SocketAddr, pod: &str) -> anyhow::Result<()> {
    wait_for(&format!("mesh-node to capture {pod}"), || {
        let state: serde_json::Value = serde_json::from_str(&http::get(admin, "/capture")?.body)
            .context("parsing mesh-node's /capture")?;
        Ok(state["pods"]
            .as_array()
            .is_some_and(|pods| pods.iter().any(|p| p["name"] == pod)))
    })
}

/// Waits until the node holds its own and its pods' certificates.
fn wait_for_certificates(admin: SocketAddr) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut certs: Vec<serde_json::Value> = Vec::new();
    wait_for("mesh-node's certificates", || {
        certs = serde_json::from_str(&http::get(admin, "/certificates")?.body)
            .context("parsing mesh-node's /certificates")?;
        Ok(!certs.is_empty() && certs.iter().all(|c| c["spiffe_id"].is_string()))
    })?;
    Ok(certs)
}

/// Where the control plane's and the node proxies' logs go.
fn logs_dir() -> PathBuf {
    std::env::temp_dir().join("mesh-demo-logs")
}

fn log_file(name: &str) -> anyhow::Result<Logs> {
    let path = logs_dir().join(format!("{name}.log"));
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(Logs::File(file))
}

fn occurrences(haystack: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() {
        return 0;
    }
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

fn bin(name: &str) -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    target.join("debug").join(name)
}
