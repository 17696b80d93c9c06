//! Workloads (pods): where they run, who they are, which services they
//! serve. Their addresses and ports become the services' endpoints.

use std::{collections::BTreeSet, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::{
    FieldErrors, Kind, Metadata,
    names::{check_dns_label, check_dns_subdomain},
    resource::Spec,
};

/// Longest version label (the seed's `ServiceEndpoint.version VARCHAR(32)`).
pub const MAX_VERSION: usize = 32;
/// Most excluded ports per direction: the capture programs' fixed slots.
pub const MAX_EXCLUDED_PORTS: usize = 8;
/// Most excluded outbound address ranges.
pub const MAX_EXCLUDED_CIDRS: usize = 4;

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
    /// Traffic of this pod that capture leaves alone (when its namespace
    /// is captured; the label `mesh.io/capture: disabled` opts the whole
    /// pod out).
    #[serde(default, skip_serializing_if = "CaptureExclusions::is_empty")]
    pub capture: CaptureExclusions,
    /// The Kubernetes pod's UID: on Kubernetes the node finds the pod's
    /// network namespace through the pod's cgroup, which is named after it
    /// (`mesh-node --pod-netns cgroup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

/// What capture leaves alone for one pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureExclusions {
    /// Destination ports the pod reaches directly (e.g. a database outside
    /// the mesh).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination ranges the pod reaches directly (`169.254.169.254/32`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_outbound_cidrs: Vec<String>,
    /// The pod's own ports whose inbound traffic reaches it directly (a
    /// health-check port probed from outside the mesh).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_inbound_ports: Vec<u16>,
}

impl CaptureExclusions {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The outbound ranges, parsed; call on validated settings.
    pub fn outbound_cidrs(&self) -> Vec<(IpAddr, u8)> {
        self.exclude_outbound_cidrs
            .iter()
            .filter_map(|text| parse_cidr(text).ok())
            .collect()
    }

    fn validate(&self, errors: &mut FieldErrors) {
        for (field, ports) in [
            ("exclude_outbound_ports", &self.exclude_outbound_ports),
            ("exclude_inbound_ports", &self.exclude_inbound_ports),
        ] {
            if ports.len() > MAX_EXCLUDED_PORTS {
                errors.add(
                    &format!("capture.{field}"),
                    format!("at most {MAX_EXCLUDED_PORTS} ports (got {})", ports.len()),
                );
            }
            for (i, port) in ports.iter().enumerate() {
                if *port == 0 {
                    errors.add(
                        &format!("capture.{field}[{i}]"),
                        "must be 1 to 65535 (got 0)",
                    );
                }
            }
        }
        let cidrs = &self.exclude_outbound_cidrs;
        if cidrs.len() > MAX_EXCLUDED_CIDRS {
            errors.add(
                "capture.exclude_outbound_cidrs",
                format!("at most {MAX_EXCLUDED_CIDRS} ranges (got {})", cidrs.len()),
            );
        }
        for (i, text) in cidrs.iter().enumerate() {
            if let Err(why) = parse_cidr(text) {
                errors.add(&format!("capture.exclude_outbound_cidrs[{i}]"), why);
            }
        }
    }
}

/// Parses `address/prefix` with no host bits set, for a workload's
/// capture exclusions.
pub fn parse_cidr(text: &str) -> Result<(IpAddr, u8), String> {
    parse_network(text).map_err(|why| {
        if why.starts_with("prefix") {
            format!(
                "{why} (to leave all traffic alone, label the workload mesh.io/capture: disabled)"
            )
        } else {
            why
        }
    })
}

/// `ip` as 128 bits, an IPv4 address in the top 32, so a prefix length
/// counts from the top in both families.
pub(crate) fn address_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Parses `address/prefix` (prefix 1 or more) with no host bits set.
pub fn parse_network(text: &str) -> Result<(IpAddr, u8), String> {
    let (address, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not ADDRESS/PREFIX"))?;
    let address: IpAddr = address
        .parse()
        .map_err(|_| format!("{address:?} is not an IP address"))?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=max).contains(p))
        .ok_or_else(|| format!("prefix {prefix:?} must be 1 to {max}"))?;
    let host = address_bits(address)
        .checked_shl(u32::from(prefix))
        .unwrap_or(0);
    if host != 0 {
        return Err(format!("{text:?} has host bits set"));
    }
    Ok((address, prefix))
}

/// Whether `uid` is a pod UID as Kubernetes writes them: a UUID,
/// 8-4-4-4-12 lower-case hex digits.
pub fn is_pod_uid(uid: &str) -> bool {
    let groups: Vec<&str> = uid.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(group, len)| {
            group.len() == len
                && group
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        })
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
        self.capture.validate(errors);
        if let Err(why) = check_dns_subdomain(&self.service_account) {
            errors.add("service_account", why);
        }
        if let Err(why) = check_dns_subdomain(&self.node) {
            errors.add("node", why);
        }
        if self.ip.is_unspecified() || self.ip.is_multicast() || self.ip.is_loopback() {
            errors.add("ip", format!("{} cannot be a workload's address", self.ip));
        }
        if let Some(uid) = &self.pod_uid
            && !is_pod_uid(uid)
        {
            errors.add(
                "pod_uid",
                format!(
                    "must be a UUID in lower case, as Kubernetes writes pod UIDs (got {uid:?})"
                ),
            );
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
