//! The Kubernetes manifests in `deploy/kubernetes`, checked offline as
//! the API server would check them: every object against the Kubernetes
//! OpenAPI schemas (`kubernetes-validate --strict`, from PyPI, installed
//! here), and every mesh custom resource against its CRD's schema, which
//! must agree with the mesh's own validation (mesh-model): the samples
//! pass both, each invalid resource fails both on the field it names, and
//! the CRDs default what the mesh defaults.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use mesh_model::{Kind, parse_documents};
use serde::Deserialize as _;
use serde_json::{Value, json};

/// The validator's release, pinned: its schemas are those of Kubernetes
/// 1.37.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every YAML file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// `kubernetes-validate` in a virtual environment of its own under the
/// target directory, installed from PyPI the first time.
fn validator() -> PathBuf {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kubernetes-validate");
    let program = venv.join("bin/kubernetes-validate");
    if program.is_file() {
        return program;
    }
    let run = |command: &mut Command| {
        let output = command.output().expect("starting python3");
        assert!(
            output.status.success(),
            "{command:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        KUBERNETES_VALIDATE,
    ]));
    program
}

struct Validated {
    success: bool,
    lines: Vec<String>,
}

fn kubernetes_validate(files: &[PathBuf]) -> Validated {
    let output = Command::new(validator())
        .arg("--strict")
        .args(files)
        .output()
        .expect("running kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Validated {
        success: output.status.success(),
        lines: text.lines().map(str::to_owned).collect(),
    }
}

/// The documents of a multi-document YAML file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap())
        .filter(|value| !value.is_null())
        .collect()
}

fn is_mesh_resource(document: &Value) -> bool {
    document["apiVersion"] == "mesh.io/v1"
}

#[test]
fn every_manifest_is_a_valid_kubernetes_object() {
    let files = yaml_files(&deploy());
    let objects: usize = files
        .iter()
        .map(|f| documents(f).iter().filter(|d| !is_mesh_resource(d)).count())
        .sum();
    assert!(objects >= 25, "only {objects} objects in {files:?}");
    let validated = kubernetes_validate(&files);
    assert!(validated.success, "{}", validated.lines.join("\n"));
    let passed = validated
        .lines
        .iter()
        .filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource "))
        .count();
    assert_eq!(passed, objects, "{}", validated.lines.join("\n"));
    // The only objects it has no schema for are the mesh's own, which the
    // CRDs check (below).
    for line in validated.lines.iter().filter(|l| !l.starts_with("INFO ")) {
        assert!(
            line.starts_with("WARN ") && line.contains("with api version mesh.io/v1"),
            "{line}"
        );
    }
}

/// `document` with `field: 1` added at `spec`, or at the top for an object
/// without one.
fn with_unknown_field(mut document: Value, field: &str) -> Value {
    let target = match document.get_mut("spec") {
        Some(spec @ Value::Object(_)) => spec,
        _ => &mut document,
    };
    target
        .as_object_mut()
        .unwrap()
        .insert(field.to_owned(), json!(1));
    document
}

#[test]
fn a_mistyped_field_in_any_manifest_fails_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut objects = 0;
    for (i, file) in yaml_files(&deploy()).iter().enumerate() {
        let broken: Vec<Value> = documents(file)
            .into_iter()
            .filter(|d| !is_mesh_resource(d))
            .map(|d| with_unknown_field(d, "replica"))
            .collect();
        if broken.is_empty() {
            continue;
        }
        objects += broken.len();
        let text: String = broken
            .iter()
            .map(|d| format!("---\n{}", serde_yaml_ng::to_string(d).unwrap()))
            .collect();
        let path = dir.path().join(format!("{i}.yaml"));
        std::fs::write(&path, text).unwrap();
        files.push(path);
    }
    let validated = kubernetes_validate(&files);
    assert!(!validated.success);
    let refused = validated
        .lines
        .iter()
        .filter(|l| l.starts_with("ERROR ") && l.contains("'replica' was unexpected"))
        .count();
    assert_eq!(refused, objects, "{}", validated.lines.join("\n"));
}

/// The CRDs, by kind.
struct Crds(Vec<Value>);

impl Crds {
    fn load() -> Self {
        let crds: Vec<Value> = yaml_files(&deploy().join("crds"))
            .iter()
            .flat_map(|f| documents(f))
            .collect();
        assert!(
            crds.iter().all(|c| c["kind"] == "CustomResourceDefinition"),
            "crds/ holds only CRDs"
        );
        Self(crds)
    }

    fn of(&self, kind: &str) -> &Value {
        self.0
            .iter()
            .find(|c| c["spec"]["names"]["kind"] == kind)
            .unwrap_or_else(|| panic!("no CRD for {kind}"))
    }

    fn schema(&self, kind: &str) -> &Value {
        let versions = self.of(kind)["spec"]["versions"].as_array().unwrap();
        assert_eq!(versions.len(), 1, "{kind}: one version, v1");
        &versions[0]["schema"]["openAPIV3Schema"]
    }

    /// A JSON Schema validator that judges as the API server does with
    /// strict field validation: an object schema that lists its
    /// properties refuses others (the API server's pruning), except where
    /// the schema says `x-kubernetes-preserve-unknown-fields` and in
    /// `metadata`, whose schema the API server owns.
    fn validator(&self, kind: &str) -> jsonschema::Validator {
        let mut schema = self.schema(kind).clone();
        closed(&mut schema, true);
        jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .build(&schema)
            .unwrap_or_else(|e| panic!("{kind}'s schema: {e}"))
    }
}

fn closed(schema: &mut Value, root: bool) {
    let Value::Object(node) = schema else {
        return;
    };
    let preserves = node.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    if node.contains_key("properties") && !preserves {
        node.entry("additionalProperties").or_insert(json!(false));
    }
    for (key, child) in node.iter_mut() {
        match (key.as_str(), child) {
            ("properties", Value::Object(properties)) => {
                for (name, property) in properties.iter_mut() {
                    if !(root && name == "metadata") {
                        closed(property, false);
                    }
                }
            }
            ("items" | "additionalProperties" | "not", child) => closed(child, false),
            ("anyOf" | "allOf" | "oneOf", Value::Array(choices)) => {
                choices.iter_mut().for_each(|c| closed(c, false));
            }
            _ => {}
        }
    }
}

fn problems(validator: &jsonschema::Validator, document: &Value) -> Vec<String> {
    validator
        .iter_errors(document)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect()
}

#[test]
fn the_crds_name_the_kinds_as_the_mesh_does() {
    let crds = Crds::load();
    let mut kinds = BTreeSet::new();
    for crd in &crds.0 {
        let names = &crd["spec"]["names"];
        let kind = Kind::from_document(names["kind"].as_str().unwrap())
            .unwrap_or_else(|| panic!("{names}: not a mesh kind"));
        kinds.insert(kind);
        assert!(kind.namespaced());
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        assert_eq!(crd["spec"]["group"], "mesh.io");
        assert_eq!(names["plural"], kind.plural());
        assert_eq!(
            crd["metadata"]["name"],
            format!("{}.mesh.io", kind.plural())
        );
        let short: Vec<&str> = names["shortNames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(short, kind.short_names(), "{kind}");
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1");
        assert_eq!(version["served"], true);
        assert_eq!(version["storage"], true);
    }
    // Namespaces, services and workloads come from Kubernetes' own
    // objects; the policies are the mesh's.
    assert_eq!(
        kinds,
        BTreeSet::from([
            Kind::ServicePolicy,
            Kind::TrafficSplit,
            Kind::AuthorizationPolicy
        ])
    );
}

#[test]
fn the_samples_satisfy_their_crds_and_the_mesh() {
    let crds = Crds::load();
    let path = deploy().join("samples/policies.yaml");
    let samples = documents(&path);
    let mut kinds = BTreeSet::new();
    for sample in &samples {
        let kind = sample["kind"].as_str().unwrap();
        kinds.insert(kind.to_owned());
        let validator = crds.validator(kind);
        assert_eq!(
            problems(&validator, sample),
            Vec::<String>::new(),
            "{sample}"
        );
        // The check can fail: an unknown field in the sample is refused.
        let typo = with_unknown_field(sample.clone(), "retry_atempts");
        assert!(!validator.is_valid(&typo), "{typo}");
    }
    assert_eq!(kinds.len(), 3, "a sample of every kind");
    let text = std::fs::read_to_string(&path).unwrap();
    let resources = parse_documents(&text).unwrap_or_else(|problems| {
        panic!(
            "{}",
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    assert_eq!(resources.len(), samples.len());
}

/// The invalid resources, each with the field its `# rejects:` comment
/// names.
fn invalid_resources() -> Vec<(String, Value, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/kubernetes/invalid-resources.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    text.split("\n---\n")
        .filter_map(|part| {
            let field = part
                .lines()
                .find_map(|l| l.strip_prefix("# rejects: "))?
                .trim()
                .to_owned();
            let document: Value = serde_yaml_ng::from_str(part).unwrap();
            Some((part.to_owned(), document, field))
        })
        .collect()
}

#[test]
fn invalid_resources_are_refused_by_the_crd_and_by_the_mesh_on_the_same_field() {
    let crds = Crds::load();
    let cases = invalid_resources();
    assert!(cases.len() >= 20, "{} cases", cases.len());
    for (text, document, field) in &cases {
        let validator = crds.validator(document["kind"].as_str().unwrap());
        assert!(
            !problems(&validator, document).is_empty(),
            "the CRD accepts:\n{text}"
        );
        let refused = parse_documents(text).expect_err(text);
        let fields: Vec<&str> = refused
            .iter()
            .flat_map(|p| &p.errors)
            .map(|e| e.field.as_str())
            .collect();
        assert_eq!(fields, [field.as_str()], "{text}");
    }
}

/// Fills in the defaults `schema` declares, as the API server does:
/// into the objects present, depth first.
fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(object) => {
            let Some(properties) = schema["properties"].as_object() else {
                return;
            };
            for (name, property) in properties {
                if let Some(default) = property.get("default")
                    && !object.contains_key(name)
                {
                    object.insert(name.clone(), default.clone());
                }
                if let Some(child) = object.get_mut(name) {
                    apply_defaults(property, child);
                }
            }
        }
        Value::Array(list) => {
            if let Some(items) = schema.get("items") {
                list.iter_mut().for_each(|v| apply_defaults(items, v));
            }
        }
        _ => {}
    }
}

#[test]
fn the_crds_default_what_the_mesh_defaults() {
    let crds = Crds::load();
    // The smallest resources of each kind, and with each optional block
    // present but empty.
    let minimal: [(&str, Value); 5] = [
        ("ServicePolicy", json!({})),
        ("ServicePolicy", json!({"retry": {}})),
        ("TrafficSplit", json!({"destination": "reviews"})),
        ("AuthorizationPolicy", json!({})),
        (
            "AuthorizationPolicy",
            json!({"rules": [{"from": [{"namespaces": ["shop"]}]}]}),
        ),
    ];
    for (kind, spec) in minimal {
        let mut document = json!({
            "apiVersion": "mesh.io/v1",
            "kind": kind,
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": spec,
        });
        // What the mesh makes of the document, written back in full.
        let text = serde_json::to_string(&document).unwrap();
        let resource = parse_documents(&text).unwrap().remove(0);
        let meshs = serde_json::to_value(resource.to_document()).unwrap();
        apply_defaults(crds.schema(kind), &mut document);
        assert_eq!(
            problems(&crds.validator(kind), &document),
            Vec::<String>::new()
        );
        assert_eq!(document["spec"], meshs["spec"], "{kind}");
    }
}
