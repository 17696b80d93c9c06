//! Joining the mesh with the real binaries: mesh-control (SQLite, its own
//! CA), meshctl, and mesh-node without capture. The node joins with the
//! bootstrap token `mesh-control init` made, obtains the certificate of its
//! own workload, is refused another node's, and reports both on its admin
//! endpoint and in its metrics.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mesh_e2e::{
    control::{ControlPlane, meshctl, run_meshctl},
    http,
    process::{Logs, Process, ready_field, workspace_binary},
};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};
use serde_json::Value;

const WORKLOADS: &str = r#"
apiVersion: mesh.io/v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: frontend-1, namespace: shop}
spec: {node: node1, ip: 10.89.0.2, service_account: frontend}
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: reviews-1, namespace: shop}
spec: {node: node2, ip: 10.89.1.2, service_account: reviews, services: [reviews]}
---
apiVersion: mesh.io/v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {ports: [{port: 9080, protocol: http}]}
---
apiVersion: mesh.io/v1
kind: ServicePolicy
metadata: {name: reviews, namespace: shop}
spec: {retry_attempts: 2, timeout_ms: 1000}
"#;

fn certificates(admin: SocketAddr) -> Vec<Value> {
    let response = http::get(admin, "/certificates").unwrap();
    assert_eq!(response.status, 200);
    serde_json::from_str(&response.body).unwrap()
}

fn entry<'a>(certs: &'a [Value], name: &str) -> &'a Value {
    certs
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {certs:?}"))
}

#[test]
fn a_node_joins_and_holds_only_its_own_workloads_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("control");
    // Both logs kept, at debug level, to be searched for secrets at the end.
    let log = |name: &str| {
        let path = dir.path().join(name);
        (Logs::File(std::fs::File::create(&path).unwrap()), path)
    };
    let (control_logs, control_log) = log("mesh-control.log");
    let (node_logs, node_log) = log("mesh-node.log");
    let mut command = Command::new(workspace_binary("mesh-control").unwrap());
    command.env("RUST_LOG", "debug");
    let control = ControlPlane::start_logged(
        command,
        &data_dir,
        "127.0.0.1:0",
        "127.0.0.1:0",
        control_logs,
    )
    .unwrap();
    let (control, api, grpc) = (control.process, control.api, control.grpc);
    meshctl(&api, &data_dir, &["apply", "-f", "-"], Some(WORKLOADS));

    let mut command = Command::new(workspace_binary("mesh-node").unwrap());
    command
        .args(["--node", "node1", "--control-plane", &grpc])
        .arg("--ca-bundle")
        .arg(data_dir.join("ca/root.pem"))
        .arg("--bootstrap-token-file")
        .arg(data_dir.join("bootstrap-token"))
        // frontend-1 comes from the pushed configuration (it is scheduled
        // on node1); reviews-1 is asked for by hand and must be refused.
        .args(["--workload", "shop/reviews-1"])
        .args(["--admin-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "debug");
    let (_node, ready) = Process::spawn_ready_with(
        "mesh-node",
        command,
        "ready",
        Duration::from_secs(30),
        node_logs,
    )
    .unwrap();
    let admin: SocketAddr = ready_field(&ready, "admin").unwrap().parse().unwrap();

    // Wait for the outcome: node and frontend certified, reviews refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    let certs = loop {
        let certs = certificates(admin);
        let find = |name: &str| certs.iter().find(|c| c["name"] == name);
        let done = find("shop/frontend-1").is_some_and(|c| c["spiffe_id"].is_string())
            && find("shop/reviews-1").is_some_and(|c| c["failures"].as_u64() >= Some(1));
        if done {
            break certs;
        }
        assert!(
            Instant::now() < deadline,
            "no certificates in 30 s: {certs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        entry(&certs, "node1")["spiffe_id"],
        "spiffe://cluster.local/ns/mesh-system/sa/node-node1"
    );
    assert_eq!(
        entry(&certs, "shop/frontend-1")["spiffe_id"],
        "spiffe://cluster.local/ns/shop/sa/frontend"
    );
    let reviews = entry(&certs, "shop/reviews-1");
    assert!(reviews["spiffe_id"].is_null(), "{reviews}");
    let error = reviews["last_error"].as_str().unwrap();
    assert!(
        error.starts_with(
            "PermissionDenied: workload shop/reviews-1 is not scheduled on node node1"
        ),
        "{error}"
    );

    let metrics = http::get(admin, "/metrics").unwrap().body;
    assert!(
        metrics.contains(
            "mesh_certificate_expiry_timestamp_seconds{holder=\"workload\",name=\"shop/frontend-1\"} "
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        "mesh_certificate_request_failures_total{holder=\"workload\",name=\"shop/reviews-1\"} "
    ));
    // The keys stay in the node's memory: no endpoint of it shows one.
    for path in [
        "/certificates",
        "/config",
        "/config/dump",
        "/connections",
        "/metrics",
    ] {
        let body = http::get(admin, path).unwrap().body;
        assert!(!body.contains("PRIVATE KEY"), "{path}: {body}");
    }

    // The CA recorded what it issued, with the node that asked; the serial
    // the node reports is the recorded one.
    let listed = meshctl(&api, &data_dir, &["cert", "list", "-o", "json"], None);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let serial = entry(&certs, "shop/frontend-1")["serial"].as_str().unwrap();
    let record = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["serial"] == serial)
        .unwrap_or_else(|| panic!("serial {serial} not recorded: {listed}"));
    assert_eq!(record["node"], "node1");
    assert_eq!(record["key"], "node");
    assert!(
        !listed.to_string().contains("shop/reviews-1"),
        "a refused request was recorded"
    );

    // The node follows its part of the configuration.
    let deadline = Instant::now() + Duration::from_secs(30);
    let config: Value = loop {
        let config: Value =
            serde_json::from_str(&http::get(admin, "/config").unwrap().body).unwrap();
        if config["revision"].as_i64() >= Some(1) {
            break config;
        }
        assert!(
            Instant::now() < deadline,
            "no configuration in 30 s: {config}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let resources = config["resources"].as_object().unwrap();
    assert!(
        resources.contains_key("workload/shop/frontend-1"),
        "{config}"
    );
    assert!(
        !resources.contains_key("workload/shop/reviews-1"),
        "{config}"
    );
    assert_eq!(config["stream"]["connected"], true);

    // The control plane's view of it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: Value = serde_json::from_str(&meshctl(
            &api,
            &data_dir,
            &["proxy-status", "-o", "json"],
            None,
        ))
        .unwrap();
        let node = &status["nodes"][0];
        if node["state"] == "SYNCED" {
            assert_eq!(node["node"], "node1");
            assert_eq!(node["synced_revision"], status["revision"]);
            assert_eq!(node["admin"], admin.to_string(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "node1 never SYNCED: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let table = meshctl(&api, &data_dir, &["proxy-status"], None);
    assert!(
        table.contains("node1") && table.contains("SYNCED"),
        "{table}"
    );

    // What the node holds, read from the node at the address it reported.
    let held: Value = serde_json::from_str(&meshctl(
        &api,
        &data_dir,
        &["proxy-config", "node1", "-o", "json"],
        None,
    ))
    .unwrap();
    assert_eq!(held["revision"], config["revision"], "{held}");
    assert!(!held.to_string().contains("PRIVATE KEY"), "{held}");
    assert_eq!(
        held["clusters"]["service/shop/reviews"]["resource"]["spec"]["ports"][0]["port"], 9080,
        "{held}"
    );
    assert_eq!(
        held["routes"]["servicepolicy/shop/reviews"]["resource"]["spec"]["timeout_ms"], 1000,
        "{held}"
    );
    assert_eq!(
        held["endpoints"]["endpoints/shop/reviews"]["resource"]["endpoints"][0]["ip"], "10.89.1.2",
        "{held}"
    );
    let secrets = held["secrets"].as_array().unwrap();
    assert!(
        secrets
            .iter()
            .any(|c| c["spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/frontend"),
        "{held}"
    );
    let routes = meshctl(
        &api,
        &data_dir,
        &["proxy-config", "node1", "--type", "routes"],
        None,
    );
    assert!(
        routes.contains(
            "shop/reviews: 2 retries, timeout 1000ms, circuit 50% over 30s, recover 10000ms (ServicePolicy)\n  no split: every version, by the load balancer"
        ),
        "{routes}"
    );
    let endpoints = meshctl(
        &api,
        &data_dir,
        &["proxy-config", "node1", "--type", "endpoints"],
        None,
    );
    assert!(
        endpoints.contains("shop/reviews   10.89.1.2:9080   v1        yes       reviews-1"),
        "{endpoints}"
    );
    // An endpoint that is another node's is named as such, not shown.
    let wrong = run_meshctl(
        &workspace_binary("meshctl").unwrap(),
        &api,
        &data_dir,
        &["proxy-config", "node2", "--admin", &admin.to_string()],
        "",
    )
    .unwrap();
    assert!(!wrong.status.success());
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        said.contains(&format!(
            "the admin endpoint at {admin} is node1's, not node2's"
        )),
        "{said}"
    );

    // The operator's view of one workload.
    let table = meshctl(
        &api,
        &data_dir,
        &["cert", "list", "--workload", "shop/frontend-1"],
        None,
    );
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(
        lines[0].starts_with("SERVICE") && lines[0].ends_with("NODE"),
        "{table}"
    );
    assert!(
        lines[1].contains(serial) && lines[1].contains("valid"),
        "{table}"
    );
    assert!(lines[1].ends_with("node1"), "{table}");

    // A workload deleted from the store leaves the node, certificate too.
    meshctl(
        &api,
        &data_dir,
        &["delete", "workload", "frontend-1", "-n", "shop"],
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while certificates(admin)
        .iter()
        .any(|c| c["name"] == "shop/frontend-1")
    {
        assert!(
            Instant::now() < deadline,
            "shop/frontend-1 still has a certificate manager"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A key the control plane makes itself (for a gateway): it too must
    // stay out of the logs.
    let gateway = dir.path().join("gateway");
    meshctl(
        &api,
        &data_dir,
        &[
            "cert",
            "issue",
            "-n",
            "edge",
            "--service-account",
            "gateway",
            "--out-dir",
            gateway.to_str().unwrap(),
        ],
        None,
    );

    // The control plane stops promptly on SIGTERM even with a node's
    // configuration stream open, and the node keeps what it has (static
    // stability) while it tries to reconnect.
    let held = http::get(admin, "/config").unwrap().body;
    let held: Value = serde_json::from_str(&held).unwrap();
    let status = control.terminate_within(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "mesh-control exited with {status}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now: Value = serde_json::from_str(&http::get(admin, "/config").unwrap().body).unwrap();
        assert_eq!(now["revision"], held["revision"]);
        assert_eq!(now["resources"], held["resources"]);
        if now["stream"]["connected"] == false && now["stream"]["reconnects"].as_u64() >= Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "the node did not notice: {now}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let certs = certificates(admin);
    assert!(entry(&certs, "node1")["spiffe_id"].is_string());

    // No secret in either log (resilience case 19): no PEM private key,
    // and none of the secrets this run made — the CA's key, the key
    // encryption key, the gateway's key, the admin and bootstrap tokens —
    // in any form they are stored in.
    let secret_file = |path: &Path| std::fs::read_to_string(path).unwrap();
    let mut secrets: Vec<String> = Vec::new();
    for pem in [
        secret_file(&data_dir.join("ca/root.key")),
        secret_file(&gateway.join("key.pem")),
    ] {
        secrets.extend(
            pem.lines()
                .filter(|line| !line.starts_with("-----") && line.len() >= 16)
                .map(str::to_owned),
        );
    }
    for file in ["ca/kek", "admin-token", "bootstrap-token"] {
        secrets.push(secret_file(&data_dir.join(file)).trim().to_owned());
    }
    assert!(secrets.len() >= 5 && secrets.iter().all(|s| s.len() >= 16));
    for (path, expected) in [(&control_log, "issued"), (&node_log, "shop/frontend-1")] {
        let text = secret_file(path);
        // The log was kept (the search below is not of an empty file).
        assert!(text.contains(expected), "{}: {text}", path.display());
        assert!(!text.contains("PRIVATE KEY"), "{}", path.display());
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{} holds a secret: {secret}",
                path.display()
            );
        }
    }
}

/// Resilience case 19 with the seal key: a control plane first run without
/// one (its CA's key and KEK in clear, 0600) seals them in place when it
/// starts with one, keeps its root and signs under it, and from then on
/// refuses to start without that key, or with another, saying which.
#[test]
fn a_seal_key_seals_the_cas_secret_files_and_is_needed_from_then_on() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("control");
    let control = ControlPlane::start(&data_dir).unwrap();
    let root = std::fs::read_to_string(control.ca_bundle()).unwrap();
    let read = |name: &str| std::fs::read_to_string(data_dir.join("ca").join(name)).unwrap();
    let (key_pem, kek) = (read("root.key"), read("kek"));
    assert!(key_pem.contains("BEGIN PRIVATE KEY"));
    drop(control);

    let binary = workspace_binary("mesh-control").unwrap();
    let make_key = |path: &Path| {
        let output = Command::new(&binary)
            .args(["seal-key", "--out"])
            .arg(path)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
    };
    let seal_key = dir.path().join("seal-key");
    make_key(&seal_key);
    let with_key = |key: Option<&Path>| {
        let mut command = Command::new(&binary);
        // Only the flag says which key, whatever the environment holds.
        command.env_remove("MESH_SEAL_KEY_FILE");
        if let Some(key) = key {
            command.arg("--seal-key-file").arg(key);
        }
        command
    };
    let control = ControlPlane::start_with(with_key(Some(&seal_key)), &data_dir).unwrap();
    assert_eq!(std::fs::read_to_string(control.ca_bundle()).unwrap(), root);
    let key_lines: Vec<&str> = key_pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    for name in ["root.key", "kek"] {
        let stored = read(name);
        assert!(stored.starts_with("mesh-sealed:"), "{name}: {stored}");
        assert!(!stored.contains("BEGIN"), "{name}");
        assert!(!stored.contains(kek.trim()), "{name}");
        assert!(
            key_lines.iter().all(|line| !stored.contains(line)),
            "{name}"
        );
    }
    // Still the same CA: what it signs verifies under the old root.
    let gateway = dir.path().join("gateway");
    control.meshctl(
        &[
            "cert",
            "issue",
            "-n",
            "edge",
            "--service-account",
            "gateway",
            "--out-dir",
            gateway.to_str().unwrap(),
        ],
        None,
    );
    let der = CertificateDer::from_pem_file(gateway.join("cert.pem")).unwrap();
    let bundle = mesh_identity::TrustBundle::from_pem("cluster.local", &root).unwrap();
    mesh_identity::SpiffeVerifier::new(bundle)
        .verify_peer(
            &der,
            &[],
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .unwrap();
    drop(control);

    // Without the key, or with another, it does not start, and says why.
    let other_key = dir.path().join("other-key");
    make_key(&other_key);
    for (key, expected) in [
        (None, "no seal key is configured"),
        (Some(other_key.as_path()), "does not open with the seal key"),
    ] {
        let mut child = with_key(key)
            .arg("--data-dir")
            .arg(&data_dir)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--grpc-listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A control plane that does start serves until stopped.
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("it started with seal key {key:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(stderr.contains("ca/"), "{stderr}");
    }
}
