//! Namespaces, and the labels that turn capture on for their pods and set
//! how strictly their workloads insist on mTLS.

use serde::{Deserialize, Serialize};

use crate::{FieldErrors, Kind, Metadata, names::quoted, resource::Spec};

/// The label that captures every pod of a namespace: `enabled` or
/// `disabled`. On a workload, `disabled` opts that pod out of its
/// namespace's capture.
pub const CAPTURE_LABEL: &str = "mesh.io/capture";

/// A Namespace has no spec of its own: capture is a label, as operators
/// label Kubernetes namespaces.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {}

impl Spec for NamespaceSpec {
    const KIND: Kind = Kind::Namespace;

    fn validate(&self, _metadata: &Metadata, _errors: &mut FieldErrors) {}
}

/// How a captured workload treats plaintext arriving from outside the
/// mesh: `strict` (refused, the default) or `permissive` (accepted and
/// recorded as plaintext). On a namespace it applies to every workload; on
/// a workload it overrides its namespace's.
pub const MTLS_LABEL: &str = "mesh.io/mtls";

/// Whether plaintext from outside the mesh reaches a captured workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    #[default]
    Strict,
    Permissive,
}

impl MtlsMode {
    pub const fn name(self) -> &'static str {
        match self {
            MtlsMode::Strict => "strict",
            MtlsMode::Permissive => "permissive",
        }
    }

    fn from_label(metadata: &Metadata) -> Option<Self> {
        match metadata.labels.get(MTLS_LABEL)?.as_str() {
            "strict" => Some(MtlsMode::Strict),
            "permissive" => Some(MtlsMode::Permissive),
            _ => None,
        }
    }

    /// The mode of a workload: its own label, else its namespace's, else
    /// strict.
    pub fn of(workload: &Metadata, namespace: Option<&Metadata>) -> Self {
        Self::from_label(workload)
            .or_else(|| namespace.and_then(Self::from_label))
            .unwrap_or_default()
    }
}

/// The label that logs every HTTP request of a workload at its node
/// (`enabled` or `disabled`): on a namespace for all its workloads, on a
/// workload to override its namespace's. The node's own switch
/// (`--http-access-log`, `PUT /http-access-log`) logs every workload.
pub const ACCESS_LOG_LABEL: &str = "mesh.io/access-log";

/// Whether a workload's requests are logged: its own label, else its
/// namespace's, else not.
pub fn access_logged(workload: &Metadata, namespace: Option<&Metadata>) -> bool {
    let label = |metadata: &Metadata| {
        metadata
            .labels
            .get(ACCESS_LOG_LABEL)
            .map(|value| value == "enabled")
    };
    label(workload)
        .or_else(|| namespace.and_then(label))
        .unwrap_or(false)
}

/// Checks the capture, mTLS and access-log labels' values, if present.
pub fn check_mesh_labels(metadata: &Metadata, errors: &mut FieldErrors) {
    for (label, allowed) in [
        (CAPTURE_LABEL, ["enabled", "disabled"]),
        (MTLS_LABEL, ["strict", "permissive"]),
        (ACCESS_LOG_LABEL, ["enabled", "disabled"]),
    ] {
        if let Some(value) = metadata.labels.get(label)
            && !allowed.contains(&value.as_str())
        {
            errors.add(
                &format!("metadata.labels[{label:?}]"),
                format!(
                    "must be \"{}\" or \"{}\" (got {})",
                    allowed[0],
                    allowed[1],
                    quoted(value)
                ),
            );
        }
    }
}

/// Whether a workload with these labels opted out of capture.
pub fn opted_out(metadata: &Metadata) -> bool {
    metadata
        .labels
        .get(CAPTURE_LABEL)
        .is_some_and(|v| v == "disabled")
}

/// Whether a namespace with these labels has its pods captured.
pub fn captured(metadata: &Metadata) -> bool {
    metadata
        .labels
        .get(CAPTURE_LABEL)
        .is_some_and(|v| v == "enabled")
}
