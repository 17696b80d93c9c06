//! Authorization at the destination: which callers may reach a workload,
//! decided with the identity taken from the caller's verified certificate
//! (never from anything the caller says).
//!
//! DENY policies are checked first: any match refuses. Then ALLOW: a
//! workload no ALLOW policy selects admits every caller; once one selects
//! it, a caller must match one of its rules.
//!
//! At L4 only the caller and the port are known. A rule that also names
//! HTTP methods or paths is therefore decided the safe way: an ALLOW rule
//! with them never matches a TCP connection, a DENY rule with them matches
//! as if they were absent — as ztunnel does. A connection to an HTTP port
//! is let in when some request of the caller could be allowed ([`Http::Any`]),
//! and each request is then decided with its method and its normalised
//! path ([`crate::l7::path`]): exact, `prefix*`, `*suffix` or `*`.

use mesh_identity::SpiffeId;
use mesh_model::{
    Object,
    authz::{Action, AuthorizationPolicySpec, Operation, Rule, Source},
    workload::WorkloadSpec,
};

/// An authorization policy as pushed.
pub type AuthorizationPolicy = Object<AuthorizationPolicySpec>;
/// A workload as pushed.
pub type Workload = Object<WorkloadSpec>;

/// What is known about one connection at the destination.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The caller's verified identity; `None` for plaintext.
    pub caller: Option<&'a SpiffeId>,
    /// The destination port on the workload.
    pub port: u16,
    /// What is known of HTTP.
    pub http: Http<'a>,
}

/// What an authorization decision knows of HTTP.
#[derive(Clone, Copy, Debug)]
pub enum Http<'a> {
    /// A TCP connection: rules naming methods or paths fail closed (an
    /// ALLOW never matches, a DENY matches as if they were absent).
    No,
    /// A connection to an HTTP port, before its requests: could any of
    /// them be allowed? ALLOW rules naming methods or paths may match, DENY
    /// rules naming them may not (each request is decided later).
    Any,
    /// One request.
    Request(HttpRequest<'a>),
}

/// What an HTTP request adds to a [`Request`].
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// Normalised ([`crate::l7::path::normalize`]).
    pub path: &'a str,
}

/// The outcome, naming the policy that decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused by this DENY policy (`namespace/name`).
    Denied(String),
    /// ALLOW policies select the workload and none of their rules matched.
    NotAllowed,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        *self == Decision::Allow
    }

    /// Why it was refused, for logs and the refusal's body.
    pub fn reason(&self) -> String {
        match self {
            Decision::Allow => "allowed".to_owned(),
            Decision::Denied(policy) => format!("denied by AuthorizationPolicy {policy}"),
            Decision::NotAllowed => "no AuthorizationPolicy allows this caller".to_owned(),
        }
    }
}

/// Whether `policy` applies to `workload`: same namespace, and its target
/// (a service) is one the workload serves, or no target.
fn selects(policy: &AuthorizationPolicy, workload: &Workload) -> bool {
    policy.namespace() == workload.namespace()
        && policy
            .spec
            .target
            .as_ref()
            .is_none_or(|service| workload.spec.services.contains(service))
}

/// Decides `request` to `workload` under `policies` (any namespace; those
/// not selecting the workload are ignored).
pub fn authorize<'a>(
    policies: impl IntoIterator<Item = &'a AuthorizationPolicy> + Clone,
    workload: &Workload,
    request: &Request<'_>,
) -> Decision {
    let selected = || {
        policies
            .clone()
            .into_iter()
            .filter(|policy| selects(policy, workload))
    };
    for policy in selected().filter(|p| p.spec.action == Action::Deny) {
        if policy
            .spec
            .rules
            .iter()
            .any(|rule| rule_matches(rule, request, Action::Deny))
        {
            return Decision::Denied(format!("{}/{}", policy.namespace(), policy.name()));
        }
    }
    let mut allow = selected()
        .filter(|p| p.spec.action == Action::Allow)
        .peekable();
    if allow.peek().is_none() {
        return Decision::Allow;
    }
    if allow.any(|policy| {
        policy
            .spec
            .rules
            .iter()
            .any(|rule| rule_matches(rule, request, Action::Allow))
    }) {
        Decision::Allow
    } else {
        Decision::NotAllowed
    }
}

fn rule_matches(rule: &Rule, request: &Request<'_>, action: Action) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, request.caller)))
        && (rule.to.is_empty()
            || rule
                .to
                .iter()
                .any(|o| operation_matches(o, request, action)))
}

fn source_matches(source: &Source, caller: Option<&SpiffeId>) -> bool {
    let principal = source.principals.is_empty()
        || caller.is_some_and(|id| {
            let id = id.to_string();
            source.principals.iter().any(|p| p == "*" || *p == id)
        });
    let namespace = source.namespaces.is_empty()
        || caller.is_some_and(|id| {
            source
                .namespaces
                .iter()
                .any(|n| n == "*" || *n == id.namespace)
        });
    principal && namespace
}

fn operation_matches(operation: &Operation, request: &Request<'_>, action: Action) -> bool {
    let port = operation.ports.is_empty() || operation.ports.contains(&request.port);
    let needs_http = !operation.methods.is_empty() || !operation.paths.is_empty();
    match request.http {
        Http::Request(http) => {
            port && (operation.methods.is_empty()
                || operation
                    .methods
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(http.method)))
                && (operation.paths.is_empty()
                    || operation
                        .paths
                        .iter()
                        .any(|p| crate::l7::path::matches(p, http.path)))
        }
        Http::No => port && !(needs_http && action == Action::Allow),
        Http::Any => port && !(needs_http && action == Action::Deny),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_model::{Resource, parse_documents};

    fn parse(yaml: &str) -> Vec<Resource> {
        parse_documents(yaml).unwrap()
    }

    fn workload(services: &str) -> Workload {
        let yaml = format!(
            "apiVersion: mesh.io/v1\nkind: Workload\nmetadata: {{name: b, namespace: shop}}\n\
             spec: {{node: n1, ip: 10.89.1.2, services: [{services}]}}\n"
        );
        match parse(&yaml).remove(0) {
            Resource::Workload(w) => w,
            other => panic!("{other:?}"),
        }
    }

    fn policies(yaml: &str) -> Vec<AuthorizationPolicy> {
        parse(yaml)
            .into_iter()
            .map(|r| match r {
                Resource::AuthorizationPolicy(p) => p,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")).unwrap()
    }

    fn decide(policies: &[AuthorizationPolicy], caller: Option<&SpiffeId>, port: u16) -> Decision {
        authorize(
            policies,
            &workload("reviews"),
            &Request {
                caller,
                port,
                http: Http::No,
            },
        )
    }

    const ONLY_FRONTEND: &str = "apiVersion: mesh.io/v1\nkind: AuthorizationPolicy\n\
        metadata: {name: only-frontend, namespace: shop}\n\
        spec: {target: reviews, action: allow, rules: [{from: [{principals: ['spiffe://cluster.local/ns/shop/sa/frontend']}], to: [{ports: [8080]}]}]}\n";

    #[test]
    fn without_policies_everyone_is_allowed() {
        assert_eq!(decide(&[], None, 8080), Decision::Allow);
        assert_eq!(decide(&[], Some(&id("x", "y")), 1), Decision::Allow);
    }

    #[test]
    fn an_allow_policy_admits_only_what_it_lists() {
        let p = policies(ONLY_FRONTEND);
        assert_eq!(
            decide(&p, Some(&id("shop", "frontend")), 8080),
            Decision::Allow
        );
        assert_eq!(
            decide(&p, Some(&id("shop", "other")), 8080),
            Decision::NotAllowed
        );
        assert_eq!(
            decide(&p, Some(&id("shop", "frontend")), 9090),
            Decision::NotAllowed
        );
        assert_eq!(decide(&p, None, 8080), Decision::NotAllowed);
        // A policy for another service, or namespace, does not select b.
        let other = policies(&ONLY_FRONTEND.replace("target: reviews", "target: ratings"));
        assert_eq!(decide(&other, None, 8080), Decision::Allow);
        let elsewhere = policies(&ONLY_FRONTEND.replace("namespace: shop}", "namespace: bank}"));
        assert_eq!(decide(&elsewhere, None, 8080), Decision::Allow);
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = policies(&format!(
            "{ONLY_FRONTEND}---\napiVersion: mesh.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: no-8080, namespace: shop}}\n\
             spec: {{action: deny, rules: [{{from: [{{namespaces: [shop]}}], to: [{{ports: [8080]}}]}}]}}\n"
        ));
        assert_eq!(
            decide(&p, Some(&id("shop", "frontend")), 8080),
            Decision::Denied("shop/no-8080".into())
        );
        // Plaintext has no namespace: the deny rule does not match it, and
        // the allow policy does not admit it either.
        assert_eq!(decide(&p, None, 8080), Decision::NotAllowed);
    }

    #[test]
    fn wildcards_need_an_authenticated_caller() {
        let p = policies(
            "apiVersion: mesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: any, namespace: shop}\n\
             spec: {rules: [{from: [{principals: ['*']}]}]}\n",
        );
        assert_eq!(decide(&p, Some(&id("bank", "x")), 1), Decision::Allow);
        assert_eq!(decide(&p, None, 1), Decision::NotAllowed);
        let empty = policies(
            "apiVersion: mesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: none, namespace: shop}\nspec: {}\n",
        );
        assert_eq!(
            decide(&empty, Some(&id("shop", "frontend")), 1),
            Decision::NotAllowed
        );
    }

    #[test]
    fn http_only_rules_fail_closed_at_l4() {
        let allow = policies(
            "apiVersion: mesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: gets, namespace: shop}\n\
             spec: {rules: [{to: [{methods: [GET]}]}]}\n",
        );
        assert_eq!(
            decide(&allow, Some(&id("shop", "frontend")), 8080),
            Decision::NotAllowed
        );
        let deny = policies(
            "apiVersion: mesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\n\
             spec: {action: deny, rules: [{to: [{paths: ['/admin*'], ports: [8080]}]}]}\n",
        );
        assert_eq!(
            decide(&deny, Some(&id("shop", "frontend")), 8080),
            Decision::Denied("shop/no-admin".into())
        );
        assert_eq!(
            decide(&deny, Some(&id("shop", "frontend")), 9090),
            Decision::Allow
        );
    }

    #[test]
    fn http_requests_are_decided_on_method_and_normalised_path() {
        let rules = policies(
            "apiVersion: mesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\n\
             spec: {action: deny, rules: [{to: [{paths: ['/admin/*', '*.bak']}]}]}\n---\n\
             apiVersion: mesh.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: reads, namespace: shop}\n\
             spec: {rules: [{from: [{namespaces: [shop]}], to: [{methods: [GET, HEAD], paths: ['/reviews/*', '/health'], ports: [8080]}]}]}\n",
        );
        let frontend = id("shop", "frontend");
        let ask = |method: &str, raw: &str, port: u16| {
            let path = crate::l7::path::normalize(raw).unwrap();
            authorize(
                &rules,
                &workload("reviews"),
                &Request {
                    caller: Some(&frontend),
                    port,
                    http: Http::Request(HttpRequest {
                        method,
                        path: &path,
                    }),
                },
            )
        };
        let denied = Decision::Denied("shop/no-admin".into());
        assert_eq!(ask("GET", "/reviews/1", 8080), Decision::Allow);
        assert_eq!(ask("HEAD", "/health", 8080), Decision::Allow);
        assert_eq!(ask("GET", "/health/x", 8080), Decision::NotAllowed);
        assert_eq!(ask("POST", "/reviews/1", 8080), Decision::NotAllowed);
        assert_eq!(ask("GET", "/reviews/1", 9090), Decision::NotAllowed);
        assert_eq!(ask("GET", "/admin/users", 8080), denied);
        assert_eq!(ask("GET", "/reviews/../admin/users", 8080), denied);
        assert_eq!(ask("GET", "/%61dmin/users", 8080), denied);
        assert_eq!(ask("GET", "//admin//users", 8080), denied);
        assert_eq!(ask("GET", "/reviews/db.bak", 8080), denied);
        // DENY first, whatever ALLOW says.
        assert_eq!(ask("GET", "/reviews/../admin/x", 8080), denied);
    }
}
