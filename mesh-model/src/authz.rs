//! AuthorizationPolicy: which callers (by verified SPIFFE identity or
//! namespace) may reach a service, on which ports, methods and paths.
//! Enforced at the destination node with the identity from the peer's
//! certificate.

use serde::{Deserialize, Serialize};

use crate::{
    FieldErrors, Kind, Metadata,
    names::{SpiffeId, check_dns_label, quoted},
    resource::Spec,
};

/// The most rules a policy, or entries a rule's list, may hold.
pub const MAX_ITEMS: usize = 64;
/// Methods a rule may name.
pub const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The service whose workloads this protects; absent: every workload
    /// in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default)]
    pub action: Action,
    /// A request matching any rule gets `action`. An `allow` policy with no
    /// rules allows nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// Matches when any `from` entry and any `to` entry match (an empty list
/// matches everything).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
}

/// Who calls: every listed field must match (an empty field matches all).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// SPIFFE IDs, or `*` for any authenticated caller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// The callers' namespaces, or `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

/// What is called: every listed field must match (an empty field matches all).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// HTTP methods (HTTP ports only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Exact paths, prefixes ending in `*`, suffixes starting with `*`, or
    /// `*` (HTTP ports only); matched against the normalised path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

fn check_len<T>(errors: &mut FieldErrors, field: &str, items: &[T]) {
    if items.len() > MAX_ITEMS {
        errors.add(
            field,
            format!("at most {MAX_ITEMS} entries (got {})", items.len()),
        );
    }
}

impl Spec for AuthorizationPolicySpec {
    const KIND: Kind = Kind::AuthorizationPolicy;

    fn validate(&self, _metadata: &Metadata, errors: &mut FieldErrors) {
        if let Some(target) = &self.target
            && let Err(why) = check_dns_label(target)
        {
            errors.add("target", why);
        }
        check_len(errors, "rules", &self.rules);
        for (r, rule) in self.rules.iter().enumerate().take(MAX_ITEMS) {
            errors.nested(&format!("rules[{r}]"), |errors| {
                check_len(errors, "from", &rule.from);
                check_len(errors, "to", &rule.to);
                for (s, source) in rule.from.iter().enumerate().take(MAX_ITEMS) {
                    errors.nested(&format!("from[{s}]"), |errors| check_source(source, errors));
                }
                for (o, operation) in rule.to.iter().enumerate().take(MAX_ITEMS) {
                    errors.nested(&format!("to[{o}]"), |errors| {
                        check_operation(operation, errors)
                    });
                }
            });
        }
    }
}

fn check_source(source: &Source, errors: &mut FieldErrors) {
    check_len(errors, "principals", &source.principals);
    check_len(errors, "namespaces", &source.namespaces);
    for (i, principal) in source.principals.iter().enumerate().take(MAX_ITEMS) {
        if principal != "*"
            && let Err(why) = SpiffeId::parse(principal)
        {
            errors.add(&format!("principals[{i}]"), why);
        }
    }
    for (i, namespace) in source.namespaces.iter().enumerate().take(MAX_ITEMS) {
        if namespace != "*"
            && let Err(why) = check_dns_label(namespace)
        {
            errors.add(&format!("namespaces[{i}]"), why);
        }
    }
}

fn check_operation(operation: &Operation, errors: &mut FieldErrors) {
    check_len(errors, "ports", &operation.ports);
    check_len(errors, "methods", &operation.methods);
    check_len(errors, "paths", &operation.paths);
    for (i, port) in operation.ports.iter().enumerate() {
        if *port == 0 {
            errors.add(&format!("ports[{i}]"), "must be 1 to 65535 (got 0)");
        }
    }
    for (i, method) in operation.methods.iter().enumerate().take(MAX_ITEMS) {
        if !METHODS.contains(&method.as_str()) {
            errors.add(
                &format!("methods[{i}]"),
                format!(
                    "unknown method {}; expected one of {}",
                    quoted(method),
                    METHODS.join(", ")
                ),
            );
        }
    }
    for (i, path) in operation.paths.iter().enumerate().take(MAX_ITEMS) {
        // Exact `/a`, prefix `/a*`, suffix `*.css`, or `*`.
        let body = match path.strip_prefix('*') {
            Some(suffix) => suffix,
            None => path.strip_suffix('*').unwrap_or(path),
        };
        let shaped = path == "*"
            || (path.starts_with('/') && !body.contains('*'))
            || (path.starts_with('*') && !body.is_empty() && !body.contains('*'));
        if !shaped || path.len() > 1024 || path.chars().any(char::is_control) {
            errors.add(
                &format!("paths[{i}]"),
                format!(
                    "{} must be an exact path ('/a'), a prefix ('/a*'), a suffix ('*.css') or '*', at most 1024 characters",
                    quoted(path)
                ),
            );
        }
    }
}
