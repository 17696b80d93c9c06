//! Namespaces, and the label that turns capture on for their pods.

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

/// Checks the capture label's value, if present.
pub fn check_capture_label(metadata: &Metadata, errors: &mut FieldErrors) {
    if let Some(value) = metadata.labels.get(CAPTURE_LABEL)
        && value != "enabled"
        && value != "disabled"
    {
        errors.add(
            &format!("metadata.labels[{CAPTURE_LABEL:?}]"),
            format!(
                "must be \"enabled\" or \"disabled\" (got {})",
                quoted(value)
            ),
        );
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
