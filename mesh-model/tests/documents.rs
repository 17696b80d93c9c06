//! Parsing and validating resource documents as operators write them.

use mesh_model::{
    Kind, ParseError, Resource, namespace::captured, parse_documents, service::LoadBalancer,
};

fn errors(text: &str) -> Vec<String> {
    let problems: Vec<ParseError> = parse_documents(text).expect_err("the input is invalid");
    problems.iter().map(ToString::to_string).collect()
}

const ALL_KINDS: &str = r#"
apiVersion: mesh.io/v1
kind: Namespace
metadata:
  name: shop
  labels:
    mesh.io/capture: enabled
---
apiVersion: mesh.io/v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  ports: [{name: http, port: 9080, protocol: http}]
  load_balancer: consistent_hash
  hash_header: x-user
  vip: 10.96.0.20
---
apiVersion: mesh.io/v1
kind: Workload
metadata: {name: reviews-v2-abc, namespace: shop, labels: {app: reviews}}
spec: {node: node1, ip: 10.89.1.2, services: [reviews], version: v2, service_account: reviews}
---
apiVersion: mesh.io/v1
kind: ServicePolicy
metadata: {name: reviews, namespace: shop}
---
apiVersion: mesh.io/v1
kind: TrafficSplit
metadata: {name: reviews-canary, namespace: shop}
spec:
  destination: reviews
  v1_weight: 95
  v2_weight: 5
  header_match: {x-canary: "true"}
---
apiVersion: mesh.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-from-frontend, namespace: shop}
spec:
  target: reviews
  rules:
  - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/frontend"]}]
    to: [{ports: [9080], methods: [GET], paths: ["/reviews/*"]}]
"#;

#[test]
fn every_kind_parses_with_defaults() {
    let resources = parse_documents(ALL_KINDS).unwrap();
    let kinds: Vec<Kind> = resources.iter().map(Resource::kind).collect();
    assert_eq!(kinds, Kind::ALL);
    let Resource::Namespace(ns) = &resources[0] else {
        panic!()
    };
    assert!(captured(&ns.metadata));
    let Resource::Service(svc) = &resources[1] else {
        panic!()
    };
    assert_eq!(svc.spec.load_balancer, LoadBalancer::ConsistentHash);
    assert_eq!(svc.spec.vip, Some("10.96.0.20".parse().unwrap()));
    // The seed's ServicePolicy defaults.
    let Resource::ServicePolicy(policy) = &resources[3] else {
        panic!()
    };
    assert_eq!(
        (
            policy.spec.retry_attempts,
            policy.spec.timeout_ms,
            policy.spec.cb_threshold,
            policy.spec.cb_window_sec
        ),
        (3, 5000, 50, 30)
    );
    assert_eq!(resources[3].namespace(), Some("shop"));
    assert_eq!(resources[0].namespace(), None);
}

#[test]
fn documents_round_trip() {
    for resource in parse_documents(ALL_KINDS).unwrap() {
        let document = resource.to_document();
        assert_eq!(Resource::from_document(document).unwrap(), resource);
    }
}

#[test]
fn an_omitted_namespace_is_default_and_survives_the_round_trip() {
    let text = "apiVersion: mesh.io/v1\nkind: TrafficSplit\nmetadata: {name: canary}\n\
                spec: {destination: reviews, v1_weight: 90, v2_weight: 10}\n";
    let resource = parse_documents(text).unwrap().remove(0);
    assert_eq!(resource.metadata().namespace.as_deref(), Some("default"));
    assert_eq!(resource.reference(), "TrafficSplit/default/canary");
    let again = Resource::from_document(resource.to_document()).unwrap();
    assert_eq!(again, resource);
}

#[test]
fn json_is_accepted() {
    let resources = parse_documents(
        r#"{"apiVersion": "mesh.io/v1", "kind": "ServicePolicy", "metadata": {"name": "ratings"}, "spec": {"timeout_ms": 250}}"#,
    )
    .unwrap();
    assert_eq!(resources[0].namespace(), Some("default"));
}

#[test]
fn a_rejected_split_names_the_field_and_the_value() {
    let found = errors(
        "apiVersion: mesh.io/v1\nkind: TrafficSplit\nmetadata: {name: reviews}\nspec: {destination: reviews, v2_weight: -5}\n",
    );
    assert_eq!(
        found,
        ["TrafficSplit/reviews: spec.v2_weight: must be >= 0 (got -5)"]
    );
}

#[test]
fn every_problem_of_every_document_is_reported() {
    let found = errors(
        r#"
apiVersion: mesh.io/v1
kind: ServicePolicy
metadata: {name: a}
spec: {retry_attempts: 99, timeout_ms: 0, cb_threshold: 101}
---
apiVersion: mesh.io/v1
kind: Service
metadata: {name: b}
spec: {ports: [{port: 80}], load_balancer: consistent_hash}
---
apiVersion: mesh.io/v1
kind: ServicePolicy
metadata: {name: fine}
"#,
    );
    assert_eq!(
        found,
        [
            "ServicePolicy/a: spec.retry_attempts: must be <= 10 (got 99)\n\
             ServicePolicy/a: spec.timeout_ms: must be >= 1 (got 0)\n\
             ServicePolicy/a: spec.cb_threshold: must be <= 100 (got 101)",
            "Service/b: spec.hash_header: is required with load_balancer consistent_hash",
        ]
    );
}

#[test]
fn unknown_fields_kinds_and_algorithms_are_named() {
    let found = errors(
        "apiVersion: mesh.io/v1\nkind: TrafficSplit\nmetadata: {name: r}\nspec: {destination: r, v2_wieght: 5}\n",
    );
    assert!(
        found[0].starts_with("TrafficSplit/r: spec.v2_wieght: unknown field `v2_wieght`"),
        "{found:?}"
    );

    let found = errors(
        "apiVersion: mesh.io/v1\nkind: Service\nmetadata: {name: r}\nspec: {ports: [{port: 80}], load_balancer: random}\n",
    );
    assert!(
        found[0].contains("spec.load_balancer: unknown variant `random`"),
        "{found:?}"
    );
    assert!(found[0].contains("least_request"), "{found:?}");

    let found = errors("apiVersion: mesh.io/v1\nkind: Gateway\nmetadata: {name: r}\n");
    assert!(
        found[0].starts_with("Gateway/r: kind: unknown kind \"Gateway\""),
        "{found:?}"
    );

    let found = errors(
        "apiVersion: v1\nkind: Service\nmetadata: {name: r, uid: x}\nspec: {ports: [{port: 80}]}\n",
    );
    assert!(
        found[0].contains("metadata.uid: unknown field `uid`"),
        "{found:?}"
    );
}

#[test]
fn names_and_labels_are_checked() {
    let found = errors(
        "apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {name: \"'; DROP TABLE ServicePolicy; --\"}\n",
    );
    assert!(found[0].contains("metadata.name: "), "{found:?}");
    assert!(found[0].contains("is not a DNS-1123 label"), "{found:?}");

    let found = errors(
        "apiVersion: mesh.io/v1\nkind: Namespace\nmetadata: {name: shop, namespace: x, labels: {mesh.io/capture: yes}}\n",
    );
    assert_eq!(
        found,
        [
            "Namespace/shop: metadata.namespace: a Namespace is not namespaced; remove the field\n\
          Namespace/shop: metadata.labels[\"mesh.io/capture\"]: must be \"enabled\" or \"disabled\" (got \"yes\")"
        ]
    );
}

#[test]
fn huge_values_are_refused_with_a_short_message() {
    let huge = "a".repeat(1 << 20);
    let text = format!("apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {{name: {huge}}}\n");
    let found = errors(&text);
    assert!(found[0].len() < 400, "message of {} bytes", found[0].len());
    assert!(
        found[0].contains("at most 63 characters"),
        "{}",
        &found[0][..200]
    );
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let depth = 100_000;
    let text = format!(
        "{{\"apiVersion\": \"mesh.io/v1\", \"kind\": \"ServicePolicy\", \"metadata\": {{\"name\": \"a\"}}, \"spec\": {}1{}}}",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    assert_eq!(errors(&text), ["document 1: nested deeper than 64 levels"]);
    let yaml = format!(
        "apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {{name: a}}\nspec: {{x: {}1{}}}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    assert_eq!(errors(&yaml), ["document 1: nested deeper than 64 levels"]);
}

#[test]
fn syntax_errors_name_the_document() {
    let found = errors("apiVersion: mesh.io/v1\nkind: [unclosed\n");
    assert!(
        found[0].starts_with("document 1: not valid YAML or JSON"),
        "{found:?}"
    );
}

#[test]
fn kinds_parse_as_people_type_them() {
    for (typed, kind) in [
        ("svc", Kind::Service),
        ("services", Kind::Service),
        ("TrafficSplit", Kind::TrafficSplit),
        ("trafficsplits", Kind::TrafficSplit),
        ("servicepolicies", Kind::ServicePolicy),
        ("authz", Kind::AuthorizationPolicy),
        ("ns", Kind::Namespace),
    ] {
        assert_eq!(Kind::from_cli(typed), Some(kind), "{typed}");
    }
    assert_eq!(Kind::from_cli("gateway"), None);
}

#[test]
fn no_workload_may_live_in_the_mesh_system_namespace() {
    // Its identities are the control plane's and the nodes': a workload
    // there could otherwise be issued a node's certificate.
    let found = errors(
        "apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {name: evil, namespace: mesh-system}\nspec: {node: node1, ip: 10.0.0.9, service_account: node-node1}\n",
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with("Workload/evil: metadata.namespace: \"mesh-system\" is reserved"),
        "{found:?}"
    );
}

#[test]
fn a_pod_uid_is_a_kubernetes_uid() {
    let workload = |uid: &str| {
        format!(
            "apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {{name: api, namespace: shop}}\n\
             spec: {{node: node1, ip: 10.0.0.9, pod_uid: '{uid}'}}\n"
        )
    };
    let resources = parse_documents(&workload("0c1d2e3f-4a5b-4c6d-8e7f-901a2b3c4d5e")).unwrap();
    let Resource::Workload(object) = &resources[0] else {
        panic!("{resources:?}")
    };
    assert_eq!(
        object.spec.pod_uid.as_deref(),
        Some("0c1d2e3f-4a5b-4c6d-8e7f-901a2b3c4d5e")
    );
    for bad in [
        "0C1D2E3F-4A5B-4C6D-8E7F-901A2B3C4D5E",
        "0c1d2e3f4a5b4c6d8e7f901a2b3c4d5e",
        "0c1d2e3f-4a5b-4c6d-8e7f-901a2b3c4d5",
        "../../etc",
        "",
    ] {
        let refused = errors(&workload(bad));
        assert!(
            refused
                .iter()
                .any(|e| e.contains("spec.pod_uid") && e.contains("UUID")),
            "{bad:?}: {refused:?}"
        );
    }
}

#[test]
fn workload_capture_exclusions_are_checked_field_by_field() {
    let workload = |labels: &str, capture: &str| {
        format!(
            "apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {{name: api, namespace: shop, labels: {{{labels}}}}}\n\
             spec: {{node: node1, ip: 10.0.0.9, capture: {{{capture}}}}}\n"
        )
    };
    let good = workload(
        "mesh.io/capture: disabled",
        "exclude_outbound_ports: [5432], exclude_outbound_cidrs: [169.254.169.254/32, 'fd00:99::/32'], exclude_inbound_ports: [15020]",
    );
    let resources = parse_documents(&good).unwrap();
    let Resource::Workload(object) = &resources[0] else {
        panic!("{resources:?}")
    };
    assert!(mesh_model::namespace::opted_out(&object.metadata));
    assert_eq!(
        object.spec.capture.outbound_cidrs(),
        vec![
            ("169.254.169.254".parse().unwrap(), 32),
            ("fd00:99::".parse().unwrap(), 32)
        ]
    );

    let found = errors(&workload(
        "mesh.io/capture: maybe, mesh.io/access-log: verbose",
        "exclude_outbound_ports: [0, 1, 2, 3, 4, 5, 6, 7, 8], exclude_outbound_cidrs: [10.0.0.1/8, 10.0.0.0/33, nonsense, '::/0']",
    ));
    let text = found.join("\n");
    for expected in [
        "metadata.labels[\"mesh.io/capture\"]: must be \"enabled\" or \"disabled\"",
        "metadata.labels[\"mesh.io/access-log\"]: must be \"enabled\" or \"disabled\" (got \"verbose\")",
        "capture.exclude_outbound_ports: at most 8 ports (got 9)",
        "capture.exclude_outbound_ports[0]: must be 1 to 65535 (got 0)",
        "capture.exclude_outbound_cidrs[0]: \"10.0.0.1/8\" has host bits set",
        "capture.exclude_outbound_cidrs[1]: prefix \"33\" must be 1 to 32",
        "capture.exclude_outbound_cidrs[2]: \"nonsense\" is not ADDRESS/PREFIX",
        "capture.exclude_outbound_cidrs[3]: prefix \"0\" must be 1 to 128",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let found = errors(&workload("", "exclude_inbound_ports: [70000]"));
    assert!(
        found[0].contains("capture.exclude_inbound_ports"),
        "{found:?}"
    );
}

#[test]
fn a_service_address_must_be_one_a_caller_can_connect_to() {
    let service = |vip: &str| {
        format!(
            "apiVersion: mesh.io/v1\nkind: Service\nmetadata: {{name: r}}\nspec: {{ports: [{{port: 80}}], vip: '{vip}'}}\n"
        )
    };
    assert!(parse_documents(&service("fd00:96::a")).is_ok());
    for vip in [
        "0.0.0.0",
        "127.0.0.1",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
    ] {
        assert_eq!(
            errors(&service(vip)),
            vec![format!(
                "Service/r: spec.vip: {vip} cannot be a service's address"
            )]
        );
    }
    let found = errors(&service("10.96.0.300"));
    assert!(found[0].contains("invalid IP address syntax"), "{found:?}");
}

#[test]
fn authorization_paths_are_exact_prefix_suffix_or_any() {
    let policy = |path: &str| {
        format!(
            "apiVersion: mesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p}}\n\
             spec: {{rules: [{{to: [{{paths: ['{path}']}}]}}]}}\n"
        )
    };
    for good in ["/a", "/a/*", "/a*", "*.css", "*", "/"] {
        assert!(parse_documents(&policy(good)).is_ok(), "{good}");
    }
    for bad in ["a", "/a*b", "*a*", "**", "*/a*", "/*/a"] {
        let found = errors(&policy(bad));
        assert_eq!(found.len(), 1, "{bad}: {found:?}");
        assert!(
            found[0].contains("spec.rules[0].to[0].paths[0]")
                && found[0].contains("must be an exact path"),
            "{found:?}"
        );
    }
}

#[test]
fn a_rate_limit_names_what_is_out_of_range() {
    let policy = |limit: &str| {
        format!(
            "apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {{name: p}}\nspec: {{rate_limit: {limit}}}\n"
        )
    };
    let resources = parse_documents(&policy("{requests_per_second: 100}")).unwrap();
    let Resource::ServicePolicy(parsed) = &resources[0] else {
        panic!()
    };
    let limit = parsed.spec.rate_limit.unwrap();
    assert_eq!((limit.capacity(), limit.per_source), (100, false));
    assert_eq!(
        errors(&policy("{requests_per_second: 0, burst: 2000000}")),
        vec![
            "ServicePolicy/p: spec.rate_limit.requests_per_second: must be >= 1 (got 0)\n\
             ServicePolicy/p: spec.rate_limit.burst: must be <= 1000000 (got 2000000)"
                .to_owned()
        ]
    );
    let found = errors(&policy("{requests_per_second: 5, per_caller: true}"));
    assert!(found[0].contains("unknown field `per_caller`"), "{found:?}");
}

#[test]
fn retry_settings_default_per_field_and_name_what_is_wrong() {
    let policy = |retry: &str| {
        format!(
            "apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {{name: p}}\nspec: {{retry: {retry}}}\n"
        )
    };
    let resources =
        parse_documents(&policy("{on_statuses: [409, 429], backoff_max_ms: 400}")).unwrap();
    let Resource::ServicePolicy(parsed) = &resources[0] else {
        panic!()
    };
    let retry = parsed.spec.retry.clone().unwrap();
    assert_eq!(retry.on_statuses, [409, 429]);
    assert_eq!(
        (
            retry.backoff_base_ms,
            retry.backoff_max_ms,
            retry.budget_percent
        ),
        (25, 400, 20)
    );
    assert!(!retry.non_idempotent);

    assert_eq!(
        errors(&policy(
            "{on_statuses: [409, 200, 600], backoff_base_ms: 100, backoff_max_ms: 50, budget_percent: 101}"
        )),
        vec![
            "ServicePolicy/p: spec.retry.on_statuses[1]: must be >= 400 (got 200)\n\
             ServicePolicy/p: spec.retry.on_statuses[2]: must be <= 599 (got 600)\n\
             ServicePolicy/p: spec.retry.backoff_max_ms: must be >= backoff_base_ms (100) (got 50)\n\
             ServicePolicy/p: spec.retry.budget_percent: must be <= 100 (got 101)"
                .to_owned()
        ]
    );
    let found = errors(&policy("{retry_on: [409]}"));
    assert!(found[0].contains("unknown field `retry_on`"), "{found:?}");
}

#[test]
fn a_port_without_a_protocol_is_detected_and_says_so() {
    use mesh_model::service::Protocol;
    let resources = parse_documents(
        "apiVersion: mesh.io/v1\nkind: Service\nmetadata: {name: r}\n\
         spec: {ports: [{port: 80}, {port: 5432, protocol: tcp}, {port: 81, protocol: grpc}]}\n",
    )
    .unwrap();
    let Resource::Service(service) = &resources[0] else {
        panic!()
    };
    let protocols: Vec<Protocol> = service.spec.ports.iter().map(|p| p.protocol).collect();
    assert_eq!(protocols, [Protocol::Auto, Protocol::Tcp, Protocol::Grpc]);
    assert_eq!(
        protocols.iter().map(|p| p.is_http()).collect::<Vec<_>>(),
        [false, false, true]
    );
    let written = serde_json::to_value(&service.spec.ports[0]).unwrap();
    assert_eq!(written["protocol"], "auto");
    let found = errors(
        "apiVersion: mesh.io/v1\nkind: Service\nmetadata: {name: r}\nspec: {ports: [{port: 80, protocol: sniff}]}\n",
    );
    assert!(found[0].contains("unknown variant `sniff`"), "{found:?}");
}

#[test]
fn service_addresses_come_from_the_service_ranges() {
    use mesh_model::service::ServiceRanges;
    let ranges = ServiceRanges::default();
    assert_eq!(ranges.to_string(), "10.96.0.0/12, fd00:10:96::/112");
    for (ip, inside) in [
        ("10.96.0.1", true),
        ("10.111.255.254", true),
        ("10.112.0.1", false),
        ("10.95.255.255", false),
        ("8.8.8.8", false),
        ("fd00:10:96::a", true),
        ("fd00:10:96::1:0", false),
        // The IPv4-mapped spelling of an IPv4 range is not in it.
        ("::ffff:10.96.0.1", false),
    ] {
        assert_eq!(ranges.contains(ip.parse().unwrap()), inside, "{ip}");
    }
    let service = |vip: &str| {
        format!(
            "apiVersion: mesh.io/v1\nkind: Service\nmetadata: {{name: r}}\n\
             spec: {{vip: {vip}, ports: [{{port: 80}}]}}\n"
        )
    };
    let text = format!("{}---\n---\n{}", service("10.96.0.10"), service("8.8.8.8"));
    let check = |r: &mesh_model::Resource| ranges.check(r);
    let problems = mesh_model::parse_documents_checked(&text, check).unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    // The empty document between them still counts.
    assert_eq!(problems[0].document, 3);
    assert_eq!(problems[0].errors[0].field, "spec.vip");
    assert!(
        problems[0].errors[0].message.starts_with(
            "8.8.8.8 is outside the cluster's service ranges (10.96.0.0/12, fd00:10:96::/112)"
        ),
        "{problems:?}"
    );
    assert!(mesh_model::parse_documents_checked(&service("10.96.0.10"), check).is_ok());
    for bad in ["10.96.0.1/12", "10.96.0.0", "10.96.0.0/12,", "x/8"] {
        assert!(bad.parse::<ServiceRanges>().is_err(), "{bad}");
    }
    let custom: ServiceRanges = "172.20.0.0/16, fd00::/64".parse().unwrap();
    assert!(custom.contains("172.20.3.4".parse().unwrap()));
    assert!(!custom.contains("10.96.0.1".parse().unwrap()));
}

#[test]
fn deep_block_nesting_is_an_error_not_a_crash() {
    // Indentation nests without a bracket: the parser's own recursion
    // limit stops it, and says where.
    let mut yaml =
        String::from("apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {name: a}\nspec:\n");
    for level in 1..1_000 {
        yaml.push_str(&" ".repeat(level));
        yaml.push_str("x:\n");
    }
    let found = errors(&yaml);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0]
            .starts_with("document 1: not valid YAML or JSON: recursion limit exceeded at line "),
        "{found:?}"
    );
}

#[test]
fn aliases_that_expand_exponentially_are_refused() {
    // "Billion laughs": nine levels of nine references each.
    let mut yaml = String::from(
        "apiVersion: mesh.io/v1\nkind: ServicePolicy\nmetadata: {name: a}\n\
         x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n",
    );
    for level in 1..10 {
        let previous = format!("*a{}", level - 1);
        let list = [previous.as_str(); 9].join(", ");
        yaml.push_str(&format!("x{level}: &a{level} [{list}]\n"));
    }
    yaml.push_str("spec: {retry_attempts: *a9}\n");
    assert_eq!(
        errors(&yaml),
        ["document 1: not valid YAML or JSON: repetition limit exceeded"]
    );
}
