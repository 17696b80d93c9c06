//! Workloads (pods): where they run, who they are, which services they
//! serve. Their addresses and ports become the services' endpoints.

use std::{collections::BTreeSet, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::{FieldErrors, Kind, Metadata, names::check_dns_label, resource::Spec};

/// Longest version label (the seed's `ServiceEndpoint.version VARCHAR(32)`).
pub const MAX_VERSION: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// The Kubernetes service account: the workload's identity.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The node the workload is scheduled on; only that node may obtain its
    /// certificate.
    pub node: String,
    pub ip: IpAddr,
    /// Services (in the workload's namespace) this workload serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// The version traffic splits route on (`v1`, `v2`).
    #[serde(default = "default_version")]
    pub version: String,
}

fn default_service_account() -> String {
    "default".into()
}

fn default_version() -> String {
    "v1".into()
}

impl Spec for WorkloadSpec {
    const KIND: Kind = Kind::Workload;

    fn validate(&self, _metadata: &Metadata, errors: &mut FieldErrors) {
        if let Err(why) = check_dns_label(&self.service_account) {
            errors.add("service_account", why);
        }
        if let Err(why) = check_dns_label(&self.node) {
            errors.add("node", why);
        }
        if self.ip.is_unspecified() || self.ip.is_multicast() || self.ip.is_loopback() {
            errors.add("ip", format!("{} cannot be a workload's address", self.ip));
        }
        let mut seen = BTreeSet::new();
        for (i, service) in self.services.iter().enumerate() {
            if let Err(why) = check_dns_label(service) {
                errors.add(&format!("services[{i}]"), why);
            } else if !seen.insert(service) {
                errors.add(
                    &format!("services[{i}]"),
                    format!("{service:?} is listed twice"),
                );
            }
        }
        if self.version.is_empty()
            || self.version.len() > MAX_VERSION
            || !self
                .version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            errors.add(
                "version",
                format!(
                    "must be 1 to {MAX_VERSION} of A-Z a-z 0-9 - _ . (got {:?})",
                    self.version
                ),
            );
        }
    }
}
