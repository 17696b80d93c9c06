//! The document envelope (`apiVersion`, `kind`, `metadata`, `spec`) and the
//! validated [`Resource`] it becomes.

use std::{collections::BTreeMap, fmt, sync::LazyLock};

use regex::Regex;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    API_VERSION, FieldError, FieldErrors,
    authz::AuthorizationPolicySpec,
    names::{SYSTEM_NAMESPACE, check_dns_label, quoted},
    namespace::NamespaceSpec,
    policy::ServicePolicySpec,
    service::ServiceSpec,
    split::TrafficSplitSpec,
    workload::WorkloadSpec,
};

/// The namespace of a namespaced resource whose document names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A document as written, before its spec is checked.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: serde_json::Value,
}

/// Name, namespace and labels of a resource.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The store revision at which the resource last changed. Set by the
    /// store on read; on write, a value makes the write conditional on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<i64>,
}

/// The kinds of resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Namespace,
    Service,
    Workload,
    ServicePolicy,
    TrafficSplit,
    AuthorizationPolicy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Namespace,
        Kind::Service,
        Kind::Workload,
        Kind::ServicePolicy,
        Kind::TrafficSplit,
        Kind::AuthorizationPolicy,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::Workload => "Workload",
            Kind::ServicePolicy => "ServicePolicy",
            Kind::TrafficSplit => "TrafficSplit",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// Whether resources of this kind live in a namespace.
    pub const fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace)
    }

    /// The kind named exactly as in documents (`TrafficSplit`).
    pub fn from_document(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// The kind as people type it on a command line or in a URL: any case,
    /// singular or plural, or a short name (`svc`, `ts`, `sp`, `authz`, `ns`).
    pub fn from_cli(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        Self::ALL.into_iter().find(|kind| {
            lower == kind.as_str().to_ascii_lowercase()
                || lower == kind.plural()
                || kind.short_names().contains(&lower.as_str())
        })
    }

    /// Short names accepted on the command line.
    pub const fn short_names(self) -> &'static [&'static str] {
        match self {
            Kind::Namespace => &["ns"],
            Kind::Service => &["svc"],
            Kind::Workload => &["wl"],
            Kind::ServicePolicy => &["sp"],
            Kind::TrafficSplit => &["ts"],
            Kind::AuthorizationPolicy => &["authz", "ap"],
        }
    }

    /// The plural used in URLs (`trafficsplits`).
    pub fn plural(self) -> String {
        let lower = self.as_str().to_ascii_lowercase();
        match lower.strip_suffix('y') {
            Some(stem) => format!("{stem}ies"),
            None => format!("{lower}s"),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A resource's metadata and typed spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Object<S> {
    pub metadata: Metadata,
    pub spec: S,
}

impl<S> Object<S> {
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// The namespace; `default` when the document named none.
    pub fn namespace(&self) -> &str {
        self.metadata
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE)
    }
}

/// What every spec provides.
pub trait Spec: DeserializeOwned + Serialize {
    const KIND: Kind;
    /// Records every problem with the spec; paths are relative to `spec`.
    fn validate(&self, metadata: &Metadata, errors: &mut FieldErrors);
}

/// A validated resource.
#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    Namespace(Object<NamespaceSpec>),
    Service(Object<ServiceSpec>),
    Workload(Object<WorkloadSpec>),
    ServicePolicy(Object<ServicePolicySpec>),
    TrafficSplit(Object<TrafficSplitSpec>),
    AuthorizationPolicy(Object<AuthorizationPolicySpec>),
}

macro_rules! each_kind {
    ($value:expr, $object:ident => $body:expr) => {
        match $value {
            Resource::Namespace($object) => $body,
            Resource::Service($object) => $body,
            Resource::Workload($object) => $body,
            Resource::ServicePolicy($object) => $body,
            Resource::TrafficSplit($object) => $body,
            Resource::AuthorizationPolicy($object) => $body,
        }
    };
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Namespace(_) => Kind::Namespace,
            Resource::Service(_) => Kind::Service,
            Resource::Workload(_) => Kind::Workload,
            Resource::ServicePolicy(_) => Kind::ServicePolicy,
            Resource::TrafficSplit(_) => Kind::TrafficSplit,
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    pub fn metadata(&self) -> &Metadata {
        each_kind!(self, o => &o.metadata)
    }

    pub fn metadata_mut(&mut self) -> &mut Metadata {
        each_kind!(self, o => &mut o.metadata)
    }

    pub fn name(&self) -> &str {
        &self.metadata().name
    }

    /// The namespace, `None` for a Namespace.
    pub fn namespace(&self) -> Option<&str> {
        self.kind().namespaced().then(|| {
            self.metadata()
                .namespace
                .as_deref()
                .unwrap_or(DEFAULT_NAMESPACE)
        })
    }

    /// `Kind/name`, or `Kind/namespace/name` where namespaced.
    pub fn reference(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{}/{ns}/{}", self.kind(), self.name()),
            None => format!("{}/{}", self.kind(), self.name()),
        }
    }

    /// The document form, for output.
    pub fn to_document(&self) -> Document {
        let mut metadata = self.metadata().clone();
        metadata.namespace = self.namespace().map(str::to_owned);
        let spec = each_kind!(self, o => serde_json::to_value(&o.spec))
            .expect("specs are plain data and always serialize");
        Document {
            api_version: API_VERSION.to_owned(),
            kind: self.kind().as_str().to_owned(),
            metadata,
            spec,
        }
    }

    /// Checks a document and builds the resource it describes, reporting
    /// every problem found.
    ///
    /// A namespaced resource whose document names no namespace is placed in
    /// `default` here, so the resource equals the one read back from its own
    /// document.
    pub fn from_document(mut document: Document) -> Result<Self, Vec<FieldError>> {
        let mut errors = FieldErrors::new();
        if document.api_version != API_VERSION {
            errors.add(
                "apiVersion",
                format!(
                    "must be {API_VERSION} (got {})",
                    quoted(&document.api_version)
                ),
            );
        }
        let Some(kind) = Kind::from_document(&document.kind) else {
            let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            errors.add(
                "kind",
                format!(
                    "unknown kind {}; expected one of {}",
                    quoted(&document.kind),
                    known.join(", ")
                ),
            );
            return Err(errors.into_vec());
        };
        check_metadata(kind, &document.metadata, &mut errors);
        if kind.namespaced() {
            document
                .metadata
                .namespace
                .get_or_insert_with(|| DEFAULT_NAMESPACE.to_owned());
        }
        let resource = match kind {
            Kind::Namespace => typed(document, &mut errors).map(Resource::Namespace),
            Kind::Service => typed(document, &mut errors).map(Resource::Service),
            Kind::Workload => typed(document, &mut errors).map(Resource::Workload),
            Kind::ServicePolicy => typed(document, &mut errors).map(Resource::ServicePolicy),
            Kind::TrafficSplit => typed(document, &mut errors).map(Resource::TrafficSplit),
            Kind::AuthorizationPolicy => {
                typed(document, &mut errors).map(Resource::AuthorizationPolicy)
            }
        };
        match resource {
            Some(resource) if errors.is_empty() => Ok(resource),
            _ => Err(errors.into_vec()),
        }
    }
}

/// Parses and validates the spec of `document` as `S`.
fn typed<S: Spec>(document: Document, errors: &mut FieldErrors) -> Option<Object<S>> {
    let spec_value = match document.spec {
        serde_json::Value::Null => serde_json::Value::Object(Default::default()),
        value => value,
    };
    let spec: S = match serde_path_to_error::deserialize(spec_value) {
        Ok(spec) => spec,
        Err(error) => {
            let path = error.path().to_string();
            let field = if path == "." {
                "spec".to_owned()
            } else {
                format!("spec.{path}")
            };
            errors.add(&field, error.into_inner().to_string());
            return None;
        }
    };
    errors.nested("spec", |errors| spec.validate(&document.metadata, errors));
    Some(Object {
        metadata: document.metadata,
        spec,
    })
}

static LABEL_KEY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$",
    )
    .expect("valid regex")
});
static LABEL_VALUE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$").expect("valid regex")
});

/// The most labels one resource may carry.
const MAX_LABELS: usize = 64;

fn check_metadata(kind: Kind, metadata: &Metadata, errors: &mut FieldErrors) {
    if let Err(why) = check_dns_label(&metadata.name) {
        errors.add("metadata.name", why);
    }
    match (&metadata.namespace, kind.namespaced()) {
        (Some(_), false) => errors.add(
            "metadata.namespace",
            format!("a {kind} is not namespaced; remove the field"),
        ),
        (Some(ns), true) => {
            if let Err(why) = check_dns_label(ns) {
                errors.add("metadata.namespace", why);
            } else if kind == Kind::Workload && ns == SYSTEM_NAMESPACE {
                errors.add(
                    "metadata.namespace",
                    format!(
                        "{SYSTEM_NAMESPACE:?} is reserved for the mesh's own components; \
                         its identities belong to the control plane and the nodes"
                    ),
                );
            }
        }
        (None, _) => {}
    }
    if metadata.labels.len() > MAX_LABELS {
        errors.add(
            "metadata.labels",
            format!(
                "at most {MAX_LABELS} labels (got {})",
                metadata.labels.len()
            ),
        );
        return;
    }
    for (key, value) in &metadata.labels {
        if !LABEL_KEY.is_match(key) {
            errors.add(
                &format!("metadata.labels[{}]", quoted(key)),
                "is not a valid label key ([prefix/]name, name at most 63 characters)",
            );
        }
        if !LABEL_VALUE.is_match(value) {
            errors.add(
                &format!("metadata.labels[{}]", quoted(key)),
                format!(
                    "{} is not a valid label value (at most 63 of A-Z a-z 0-9 . _ -)",
                    quoted(value)
                ),
            );
        }
    }
    if kind == Kind::Namespace || kind == Kind::Workload {
        crate::namespace::check_mesh_labels(metadata, errors);
    }
    if let Some(version) = metadata.resource_version
        && version < 0
    {
        errors.add(
            "metadata.resource_version",
            format!("must be >= 0 (got {version})"),
        );
    }
}

/// The problems of one document of a multi-document input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParseError {
    /// 1-based position of the document in the input.
    pub document: usize,
    /// `Kind/name` when the document got that far.
    pub resource: Option<String>,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let subject = match &self.resource {
            Some(resource) => resource.clone(),
            None => format!("document {}", self.document),
        };
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{subject}: {error}")?;
        }
        Ok(())
    }
}

/// Parses a YAML stream (documents separated by `---`) or a JSON document
/// into validated resources. Either every document is valid, or the
/// problems of every invalid document are returned.
pub fn parse_documents(text: &str) -> Result<Vec<Resource>, Vec<ParseError>> {
    parse_documents_checked(text, |_| Vec::new())
}

/// [`parse_documents`], with `check` adding the problems a valid resource
/// has in the setting it is applied to (a server's own limits), reported
/// like every other problem, under the document's number.
pub fn parse_documents_checked(
    text: &str,
    check: impl Fn(&Resource) -> Vec<FieldError>,
) -> Result<Vec<Resource>, Vec<ParseError>> {
    if let Some(problem) = too_deep(text) {
        return Err(vec![ParseError {
            document: 1,
            resource: None,
            errors: vec![FieldError {
                field: String::new(),
                message: problem,
            }],
        }]);
    }
    let values: Box<dyn Iterator<Item = Result<serde_json::Value, String>>> =
        if text.trim_start().starts_with('{') {
            // JSON: one document, parsed by the JSON parser (fast, bounded depth).
            Box::new(std::iter::once(
                serde_json::from_str(text).map_err(|e| e.to_string()),
            ))
        } else {
            Box::new(
                serde_yaml_ng::Deserializer::from_str(text)
                    .map(|yaml| serde_json::Value::deserialize(yaml).map_err(|e| e.to_string())),
            )
        };
    let mut resources = Vec::new();
    let mut problems = Vec::new();
    for (index, value) in values.enumerate() {
        let number = index + 1;
        let fail = |resource: Option<String>, field: &str, message: String| ParseError {
            document: number,
            resource,
            errors: vec![FieldError {
                field: field.to_owned(),
                message,
            }],
        };
        let value = match value {
            Ok(serde_json::Value::Null) => continue,
            Ok(value) => value,
            Err(error) => {
                problems.push(fail(None, "", format!("not valid YAML or JSON: {error}")));
                // A syntax error ends the stream: nothing after it can be trusted.
                break;
            }
        };
        let label = describe(&value);
        let document: Document = match serde_path_to_error::deserialize(value) {
            Ok(document) => document,
            Err(error) => {
                let path = error.path().to_string();
                let field = if path == "." { String::new() } else { path };
                problems.push(fail(label, &field, error.into_inner().to_string()));
                continue;
            }
        };
        match Resource::from_document(document).and_then(|resource| {
            let errors = check(&resource);
            if errors.is_empty() {
                Ok(resource)
            } else {
                Err(errors)
            }
        }) {
            Ok(resource) => resources.push(resource),
            Err(errors) => problems.push(ParseError {
                document: number,
                resource: label,
                errors,
            }),
        }
    }
    if problems.is_empty() {
        Ok(resources)
    } else {
        Err(problems)
    }
}

/// The deepest nesting of `[` and `{` accepted in an input. Resources nest
/// a few levels; deeper input is hostile, and YAML parsers are slow on it.
pub const MAX_NESTING: usize = 64;

/// Why `text` nests too deep, judged on its brackets (an overestimate:
/// brackets inside quoted strings count too, which only errs on refusal).
fn too_deep(text: &str) -> Option<String> {
    let mut depth = 0usize;
    for byte in text.bytes() {
        match byte {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(format!("nested deeper than {MAX_NESTING} levels"));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// `Kind/name` of a raw document, if it says.
fn describe(value: &serde_json::Value) -> Option<String> {
    let kind = value.get("kind")?.as_str()?;
    let name = value.get("metadata")?.get("name")?.as_str()?;
    Some(format!("{}/{}", shorten(kind), shorten(name)))
}

fn shorten(value: &str) -> String {
    if value.chars().count() <= 64 {
        value.to_owned()
    } else {
        format!("{}...", value.chars().take(64).collect::<String>())
    }
}
