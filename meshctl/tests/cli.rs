//! meshctl end to end: the real binary against a real control plane (the
//! admin API on loopback, SQLite store).

use std::{io::Write as _, net::SocketAddr, process::Command, sync::Arc};

use mesh_control::{
    api::{self, AppState},
    ca::CaFiles,
    store::Store,
};

const TOKEN: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

/// A control plane on its own runtime thread, for as long as the test runs.
struct ControlPlane {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl ControlPlane {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("mesh.db").display());
        let ca_dir = dir.path().join("control");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let store = Store::open(&url).await.unwrap();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                // The CA in files, as `mesh-control init` makes it, so
                // root rotations have somewhere to go.
                let files = CaFiles::in_data_dir(&ca_dir);
                files.create("cluster.local").unwrap();
                let (ca, kek) = files.load().unwrap();
                let identity = api::Identity::new(ca, kek).with_files(files);
                let app = api::router(AppState {
                    store,
                    token: Arc::from(TOKEN),
                    identity: Some(Arc::new(identity)),
                    service_ranges: Default::default(),
                });
                axum::serve(listener, app).await.unwrap();
            });
        });
        Self {
            addr: rx.recv().unwrap(),
            _dir: dir,
        }
    }

    fn meshctl(&self, args: &[&str]) -> Output {
        self.meshctl_with_token(Some(TOKEN), args)
    }

    fn meshctl_with_token(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_meshctl"));
        command
            .args(["--server", &format!("http://{}", self.addr)])
            .args(args)
            .env_remove("MESH_TOKEN")
            .env("MESH_DATA_DIR", self._dir.path());
        if let Some(token) = token {
            command.env("MESH_TOKEN", token);
        }
        let output = command.output().unwrap();
        Output {
            ok: output.status.success(),
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8(output.stderr).unwrap(),
        }
    }
}

#[derive(Debug)]
struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

const SHOP: &str = "apiVersion: mesh.io/v1\nkind: Namespace\nmetadata: {name: shop, labels: {mesh.io/capture: enabled}}\n---\n\
apiVersion: mesh.io/v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec: {ports: [{port: 9080, protocol: http}]}\n---\n\
apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: reviews-v2, namespace: shop}\nspec: {node: node1, ip: 10.89.1.2, services: [reviews], version: v2}\n---\n\
apiVersion: mesh.io/v1\nkind: TrafficSplit\nmetadata: {name: reviews-canary, namespace: shop}\nspec: {destination: reviews, v1_weight: 95, v2_weight: 5, header_match: {x-canary: \"true\"}}\n";

#[test]
fn apply_get_describe_delete() {
    let cp = ControlPlane::start();
    let shop = file(SHOP);
    let out = cp.meshctl(&["apply", "--dry-run", "-f", shop.path().to_str().unwrap()]);
    assert!(out.ok, "{out:?}");
    assert!(
        out.stdout
            .contains("trafficsplit/shop/reviews-canary created (dry run)\n")
            && out.stdout.ends_with("revision 0 (unchanged: dry run)\n"),
        "{}",
        out.stdout
    );
    let out = cp.meshctl(&["get", "namespaces"]);
    assert_eq!(out.stdout, "No resources found.\n");
    let out = cp.meshctl(&["apply", "-f", shop.path().to_str().unwrap()]);
    assert!(out.ok, "{out:?}");
    assert!(
        out.stdout
            .contains("trafficsplit/shop/reviews-canary created\n"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.ends_with("revision 1\n"), "{}", out.stdout);
    let again = cp.meshctl(&["apply", "-f", shop.path().to_str().unwrap()]);
    assert!(
        again
            .stdout
            .contains("trafficsplit/shop/reviews-canary unchanged\n"),
        "{}",
        again.stdout
    );

    let out = cp.meshctl(&["get", "ts", "-n", "shop"]);
    assert!(out.ok, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(lines[0].starts_with("NAMESPACE   NAME"), "{}", out.stdout);
    assert!(
        lines[1].contains("reviews-canary")
            && lines[1].contains("95/5")
            && lines[1].contains("x-canary=true"),
        "{}",
        out.stdout
    );

    let out = cp.meshctl(&[
        "get",
        "trafficsplit",
        "reviews-canary",
        "-n",
        "shop",
        "-o",
        "json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["spec"]["v1_weight"], 95);
    let out = cp.meshctl(&["get", "workloads", "-A", "-o", "yaml"]);
    assert!(out.stdout.contains("ip: 10.89.1.2"), "{}", out.stdout);

    let out = cp.meshctl(&["describe", "service", "reviews", "-n", "shop"]);
    assert!(out.ok, "{out:?}");
    assert!(
        out.stdout.contains("Service:        reviews.shop"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(
            "reviews-canary: v1 95 / v2 5, from every caller, header match x-canary=true"
        ),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("(defaults, no ServicePolicy)"),
        "{}",
        out.stdout
    );
    let described = cp.meshctl(&["describe", "service", "reviews", "-n", "shop", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_str(&described.stdout).unwrap();
    assert_eq!(
        json["traffic_splits"][0]["metadata"]["name"],
        "reviews-canary"
    );
    assert_eq!(json["endpoints"][0]["ip"], "10.89.1.2", "{json}");
    assert!(
        out.stdout.contains(
            "Retries on:     connect failure, 503, 409; backoff 25-250ms; budget 20% (min 3/s)"
        ),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("10.89.1.2:9080"), "{}", out.stdout);

    let out = cp.meshctl(&["delete", "ts", "reviews-canary", "-n", "shop"]);
    assert!(
        out.ok
            && out
                .stdout
                .contains("trafficsplit/shop/reviews-canary deleted (revision 2)"),
        "{out:?}"
    );
    let out = cp.meshctl(&["get", "ts", "reviews-canary", "-n", "shop"]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("TrafficSplit/shop/reviews-canary not found"),
        "{}",
        out.stderr
    );
}

#[test]
fn an_invalid_file_is_refused_with_the_field_and_changes_nothing() {
    let cp = ControlPlane::start();
    let bad = file(&format!(
        "{SHOP}---\napiVersion: mesh.io/v1\nkind: TrafficSplit\nmetadata: {{name: reviews}}\nspec: {{destination: reviews, v2_weight: -5}}\n"
    ));
    let out = cp.meshctl(&["apply", "-f", bad.path().to_str().unwrap()]);
    assert!(!out.ok, "{out:?}");
    assert!(
        out.stderr
            .contains("TrafficSplit/reviews: spec.v2_weight: must be >= 0 (got -5)"),
        "{}",
        out.stderr
    );
    // All or nothing: the valid documents before it did not land either.
    let out = cp.meshctl(&["get", "namespaces", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["items"], serde_json::json!([]));
}

#[test]
fn missing_or_wrong_tokens_say_what_to_do() {
    let cp = ControlPlane::start();
    let out = cp.meshctl_with_token(Some("nope"), &["get", "services"]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("missing or wrong bearer token"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("hint: set MESH_TOKEN"),
        "{}",
        out.stderr
    );

    let out = cp.meshctl(&["get", "gateways"]);
    assert!(!out.ok);
    assert!(
        out.stderr.contains("unknown kind \"gateways\""),
        "{}",
        out.stderr
    );

    let down = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args([
            "--server",
            "http://127.0.0.1:9",
            "--token",
            TOKEN,
            "get",
            "services",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&down.stderr).contains("is mesh-control running?"));
}

/// The subcommands `help` lists under `Commands:` (less `help` itself).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_command_has_an_example_in_its_help() {
    // Every command and subcommand, found by walking the help itself.
    let mut pending = vec![Vec::<String>::new()];
    let mut seen = 0;
    while let Some(command) = pending.pop() {
        let output = Command::new(env!("CARGO_BIN_EXE_meshctl"))
            .args(&command)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8(output.stdout).unwrap();
        assert!(
            help.contains("Example"),
            "meshctl {command:?} --help has no example:\n{help}"
        );
        seen += 1;
        for sub in subcommands(&help) {
            let mut next = command.clone();
            next.push(sub);
            pending.push(next);
        }
    }
    // The walk did find the tree: the commands, and their subcommands.
    assert!(seen >= 25, "only {seen} commands found");
}

#[test]
fn the_config_file_names_the_server_and_token_file() {
    let cp = ControlPlane::start();
    let token = file(TOKEN);
    let config = file(&format!(
        "server: http://{}\ntoken_file: {}\n",
        cp.addr,
        token.path().display()
    ));
    let output = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args([
            "--config",
            config.path().to_str().unwrap(),
            "get",
            "namespaces",
        ])
        .env_remove("MESH_TOKEN")
        .env_remove("MESH_SERVER")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(stdout, "No resources found.\n");

    let bad = file("server: [oops\n");
    let output = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args([
            "--config",
            bad.path().to_str().unwrap(),
            "get",
            "namespaces",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("parsing the config file"));
}

#[test]
fn cert_issue_writes_a_verifiable_certificate_and_list_never_shows_keys() {
    use std::os::unix::fs::PermissionsExt as _;

    use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject as _};

    let cp = ControlPlane::start();
    let out_dir = cp._dir.path().join("gw");
    let out = cp.meshctl(&[
        "cert",
        "issue",
        "-n",
        "edge",
        "--service-account",
        "gateway",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.ok, "{out:?}");
    assert!(
        out.stdout
            .starts_with("issued spiffe://cluster.local/ns/edge/sa/gateway"),
        "{}",
        out.stdout
    );
    let key_mode = std::fs::metadata(out_dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);
    let cert = CertificateDer::from_pem_file(out_dir.join("cert.pem")).unwrap();
    let bundle = std::fs::read_to_string(out_dir.join("bundle.pem")).unwrap();
    let bundle = mesh_identity::TrustBundle::from_pem("cluster.local", &bundle).unwrap();
    let id = mesh_identity::SpiffeVerifier::new(bundle)
        .verify_peer(&cert, &[], UnixTime::now(), webpki::KeyUsage::client_auth())
        .unwrap();
    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/edge/sa/gateway");

    let out = cp.meshctl(&["cert", "list"]);
    assert!(out.ok, "{out:?}");
    assert!(
        out.stdout.contains("gateway.edge")
            && out.stdout.contains("valid")
            && out.stdout.contains(" ca"),
        "{}",
        out.stdout
    );
    let out = cp.meshctl(&["cert", "list", "-o", "json"]);
    assert!(
        !out.stdout.contains("BEGIN") && !out.stdout.contains("v1:"),
        "a key leaked: {}",
        out.stdout
    );

    let out = cp.meshctl(&[
        "cert",
        "issue",
        "-n",
        "Bad_NS",
        "--service-account",
        "x",
        "--out-dir",
        "/tmp/unused",
    ]);
    assert!(!out.ok);
    assert!(out.stderr.contains("namespace: "), "{}", out.stderr);
}

#[test]
fn node_tokens_are_shown_once_listed_without_secrets_and_revoked() {
    let cp = ControlPlane::start();
    let out = cp.meshctl(&["node", "token", "create", "--node", "node1", "--ttl", "1h"]);
    assert!(out.ok, "{out:?}");
    let token = out.stdout.trim().to_owned();
    let (id, secret) = token.split_once('.').expect("<id>.<secret>");
    assert_eq!((id.len(), secret.len()), (12, 32));
    assert!(out.stderr.contains("node node1 only"), "{out:?}");

    let out = cp.meshctl(&["node", "token", "list"]);
    assert!(out.ok, "{out:?}");
    assert!(
        out.stdout.contains(id) && out.stdout.contains("node1"),
        "{out:?}"
    );
    assert!(
        !out.stdout.contains(secret),
        "the secret is listed: {out:?}"
    );
    let out = cp.meshctl(&["node", "token", "list", "-o", "json"]);
    assert!(
        !out.stdout.contains(secret),
        "the secret is listed: {out:?}"
    );

    let out = cp.meshctl(&["node", "token", "create", "--ttl", "10s"]);
    assert!(!out.ok);
    assert!(out.stderr.contains("ttl_seconds: must be 60 to"), "{out:?}");
    let out = cp.meshctl(&["node", "token", "create", "--ttl", "soon"]);
    assert!(!out.ok);
    assert!(out.stderr.contains("is not a duration"), "{out:?}");

    let out = cp.meshctl(&["node", "token", "delete", id]);
    assert!(out.ok, "{out:?}");
    let out = cp.meshctl(&["node", "token", "delete", id]);
    assert!(!out.ok);
    assert!(out.stderr.contains("not found"), "{out:?}");
    let out = cp.meshctl(&["node", "token", "list"]);
    assert_eq!(out.stdout, "No bootstrap tokens.\n");
}

#[test]
fn ca_roots_rotate_make_before_break() {
    let cp = ControlPlane::start();
    let status = |cp: &ControlPlane| -> serde_json::Value {
        let out = cp.meshctl(&["ca", "status", "-o", "json"]);
        assert!(out.ok, "{out:?}");
        serde_json::from_str(&out.stdout).unwrap()
    };
    let serials = |status: &serde_json::Value, state: &str| -> Vec<String> {
        status["roots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == state)
            .map(|r| r["serial"].as_str().unwrap().to_owned())
            .collect()
    };
    let before = status(&cp);
    assert_eq!(before["trust_domain"], "cluster.local");
    let first = serials(&before, "signing");
    assert_eq!(first.len(), 1);

    // A certificate signed by the first root, still valid.
    let out_dir = tempfile::tempdir().unwrap();
    let out = cp.meshctl(&[
        "cert",
        "issue",
        "-n",
        "edge",
        "--service-account",
        "gateway",
        "--out-dir",
        out_dir.path().to_str().unwrap(),
    ]);
    assert!(out.ok, "{out:?}");

    let out = cp.meshctl(&["ca", "rotate-root"]);
    assert!(out.ok, "{out:?}");
    assert!(out.stdout.contains("staged"), "{out:?}");
    let staged = serials(&status(&cp), "staged");
    assert_eq!(staged.len(), 1);
    // The bundle handed out now holds both roots.
    let out = cp.meshctl(&[
        "cert",
        "issue",
        "-n",
        "edge",
        "--service-account",
        "gateway",
        "--out-dir",
        out_dir.path().join("2").to_str().unwrap(),
    ]);
    assert!(out.ok, "{out:?}");
    let bundle = std::fs::read_to_string(out_dir.path().join("2/bundle.pem")).unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);

    // Too early to activate without --force; a second stage is refused.
    let out = cp.meshctl(&["ca", "rotate-root", "--activate"]);
    assert!(!out.ok);
    assert!(out.stderr.contains("or pass --force"), "{out:?}");
    let out = cp.meshctl(&["ca", "rotate-root"]);
    assert!(!out.ok);
    assert!(out.stderr.contains("already staged"), "{out:?}");
    let out = cp.meshctl(&["ca", "rotate-root", "--activate", "--force"]);
    assert!(out.ok, "{out:?}");
    let after = status(&cp);
    assert_eq!(serials(&after, "signing"), staged);
    assert_eq!(serials(&after, "retiring"), first);

    // The gateway certificates from the first root are alive: retiring it
    // is refused unless forced.
    let out = cp.meshctl(&["ca", "retire-root", &first[0]]);
    assert!(!out.ok);
    assert!(
        out.stderr
            .contains("unexpired certificate(s) chain to root"),
        "{out:?}"
    );
    let out = cp.meshctl(&["ca", "retire-root", &staged[0]]);
    assert!(!out.ok);
    assert!(out.stderr.contains("not retiring"), "{out:?}");
    let out = cp.meshctl(&["ca", "retire-root", &first[0], "--force"]);
    assert!(out.ok, "{out:?}");
    assert_eq!(status(&cp)["roots"].as_array().unwrap().len(), 1);
}

#[test]
fn endpoint_health_is_set_by_service_and_address() {
    let cp = ControlPlane::start();
    let yaml = file(
        "apiVersion: mesh.io/v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: mesh.io/v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec: {ports: [{port: 9080}]}\n---\n\
         apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: reviews-1, namespace: shop}\nspec: {node: node2, ip: 10.89.1.2, services: [reviews]}\n",
    );
    assert!(
        cp.meshctl(&["apply", "-f", yaml.path().to_str().unwrap()])
            .ok
    );
    let out = cp.meshctl(&[
        "endpoint",
        "health",
        "reviews",
        "10.89.1.2:9080",
        "--healthy",
        "false",
        "-n",
        "shop",
    ]);
    assert!(out.ok, "{out:?}");
    assert!(out.stdout.contains("marked unhealthy"), "{out:?}");
    let out = cp.meshctl(&["describe", "service", "reviews", "-n", "shop"]);
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("10.89.1.2"))
        .unwrap_or_else(|| panic!("{out:?}"));
    assert!(line.contains("unhealthy"), "{line}");
    let out = cp.meshctl(&[
        "endpoint",
        "health",
        "reviews",
        "10.89.1.3:9080",
        "--healthy",
        "true",
        "-n",
        "shop",
    ]);
    assert!(!out.ok);
    assert!(out.stderr.contains("not found"), "{out:?}");
}

#[test]
fn check_names_each_problem_with_what_to_do_and_fails_on_errors() {
    let cp = ControlPlane::start();
    let shop = file(SHOP);
    assert!(
        cp.meshctl(&["apply", "-f", shop.path().to_str().unwrap()])
            .ok
    );
    // The canary's v1 has no endpoint: 95 % of reviews' requests would
    // get 503.
    let out = cp.meshctl(&["check"]);
    assert!(!out.ok, "{out:?}");
    assert!(out.stderr.contains("the check found errors"), "{out:?}");
    for line in [
        "control plane\n  ok   mesh-control",
        "ok   the admin token is accepted; the store is at revision 1",
        "certificate authority\n  ok   signing root",
        "nodes\n  WARN no node has connected\n       -> start mesh-node",
        "FAIL shop/reviews: TrafficSplit reviews-canary sends 95 % to v1, which has no healthy endpoint",
        "-> those requests get 503 (flag UH)",
    ] {
        assert!(out.stdout.contains(line), "{line:?} not in\n{}", out.stdout);
    }
    let v1 = file(
        "apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: reviews-v1, namespace: shop}\nspec: {node: node1, ip: 10.89.1.3, services: [reviews]}\n",
    );
    assert!(cp.meshctl(&["apply", "-f", v1.path().to_str().unwrap()]).ok);
    let out = cp.meshctl(&["check", "-o", "json"]);
    assert!(out.ok, "warnings alone pass: {out:?}");
    let findings: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    let services: Vec<_> = findings
        .iter()
        .filter(|f| f["group"] == "services")
        .collect();
    assert_eq!(services.len(), 1, "{findings:?}");
    assert_eq!(services[0]["level"], "pass");
    assert_eq!(
        services[0]["what"],
        "shop/reviews: 2 of 2 endpoints healthy"
    );

    let out = cp.meshctl_with_token(
        Some("0000000000000000000000000000000000000000000000000000000000000000"),
        &["check"],
    );
    assert!(!out.ok);
    assert!(
        out.stdout.contains("FAIL the admin token was refused"),
        "{out:?}"
    );
}

#[test]
fn completions_cover_every_command() {
    let output = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let script = String::from_utf8(output.stdout).unwrap();
    for word in [
        "_meshctl",
        "proxy-status",
        "rotate-root",
        "completions",
        "check",
    ] {
        assert!(
            script.contains(word),
            "{word} missing from the bash completion"
        );
    }
}

#[test]
fn stat_and_top_show_the_nodes_reports() {
    use mesh_control::store::EdgeReport;
    let control = ControlPlane::start();
    // Empty: says so, and what feeds it.
    let empty = control.meshctl(&["stat"]);
    assert!(empty.ok, "{empty:?}");
    assert!(
        empty.stdout.starts_with("No requests in the last 60 s."),
        "{empty:?}"
    );

    // What node0 would report: 1,000 requests from shop/frontend to
    // reviews, 100 of them 503, about a millisecond each.
    let mut latency = vec![0; mesh_model::stats::LATENCY_BOUNDS.len() + 1];
    latency[6] = 1000;
    let report = EdgeReport {
        source_namespace: "shop".into(),
        source_workload: "frontend".into(),
        namespace: "shop".into(),
        service: "reviews".into(),
        requests: 1000,
        errors: 100,
        latency,
        interval_ms: 10_000,
    };
    let url = format!(
        "sqlite://{}?mode=rwc",
        control._dir.path().join("mesh.db").display()
    );
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = Store::open(&url).await.unwrap();
        store
            .record_request_stats("node0", &[report])
            .await
            .unwrap();
    });

    let json = control.meshctl(&["stat", "reviews", "-n", "shop", "-o", "json"]);
    assert!(json.ok, "{json:?}");
    let answer: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let reviews = &answer["items"][0];
    assert_eq!(reviews["requests"], 1000, "{answer}");
    assert!(
        (reviews["error_rate"].as_f64().unwrap() - 0.1).abs() < 1e-9,
        "{answer}"
    );
    let table = control.meshctl(&["stat", "-n", "shop"]);
    assert!(table.ok, "{table:?}");
    assert!(
        table.stdout.contains("shop/reviews") && table.stdout.contains("90.00%"),
        "{}",
        table.stdout
    );
    let top = control.meshctl(&["top"]);
    assert!(
        top.ok && top.stdout.contains("shop/frontend   shop/reviews   1000"),
        "{top:?}"
    );
    let bad = control.meshctl(&["stat", "--window", "2h"]);
    assert!(!bad.ok && bad.stderr.contains("window"), "{bad:?}");
}
