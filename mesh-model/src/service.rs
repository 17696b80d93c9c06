//! Services: their ports and protocols, and how callers balance across
//! their endpoints.

use std::{collections::BTreeSet, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::{
    FieldErrors, Kind, Metadata,
    names::{check_dns_label, check_header_name},
    resource::Spec,
};

/// The most ports one service may declare.
pub const MAX_PORTS: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    /// The request header consistent hashing keys on; required with
    /// `consistent_hash`, refused otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
    /// The virtual address callers connect to (a Kubernetes ClusterIP):
    /// the caller's node picks one of the service's healthy endpoints. A
    /// service without one is reached at its workloads' own addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<IpAddr>,
}

impl ServiceSpec {
    /// The port `port` of the service, if it declares one.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// The workloads' port, when it differs from `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
}

impl ServicePort {
    /// The port the service's workloads listen on.
    pub fn workload_port(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// What a port carries: HTTP protocols get L7 policy, TCP gets L4.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
    /// Not declared: the caller's node reads the client's first bytes (no
    /// round trip) and routes HTTP/1.1 or HTTP/2 request by request, and
    /// anything else, or a client that waits for the server to speak
    /// first, as TCP. Declare `tcp` for server-first protocols (they wait
    /// out the detection first) and an HTTP protocol for L7 policy at the
    /// destination (a sniffed port is authorized there at L4).
    #[default]
    Auto,
}

impl Protocol {
    /// Declared as one of the HTTP protocols.
    pub const fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }
}

/// How a caller picks one of a service's healthy endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    /// Power of two choices on in-flight requests.
    LeastRequest,
    /// Sticky by the value of `hash_header`.
    ConsistentHash,
}

impl LoadBalancer {
    pub const fn as_str(self) -> &'static str {
        match self {
            LoadBalancer::RoundRobin => "round_robin",
            LoadBalancer::LeastRequest => "least_request",
            LoadBalancer::ConsistentHash => "consistent_hash",
        }
    }
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

impl Spec for ServiceSpec {
    const KIND: Kind = Kind::Service;

    fn validate(&self, _metadata: &Metadata, errors: &mut FieldErrors) {
        if self.ports.is_empty() {
            errors.add("ports", "must list at least one port");
        }
        if self.ports.len() > MAX_PORTS {
            errors.add(
                "ports",
                format!("at most {MAX_PORTS} ports (got {})", self.ports.len()),
            );
        }
        let mut numbers = BTreeSet::new();
        let mut names = BTreeSet::new();
        for (i, port) in self.ports.iter().enumerate() {
            errors.nested("ports", |errors| {
                errors.nested(&format!("[{i}]"), |errors| {
                    if port.port == 0 {
                        errors.add("port", "must be 1 to 65535 (got 0)");
                    } else if !numbers.insert(port.port) {
                        errors.add("port", format!("{} is listed twice", port.port));
                    }
                    if port.target_port == Some(0) {
                        errors.add("target_port", "must be 1 to 65535 (got 0)");
                    }
                    if let Some(name) = &port.name {
                        if let Err(why) = check_dns_label(name) {
                            errors.add("name", why);
                        } else if !names.insert(name.clone()) {
                            errors.add("name", format!("{name:?} is listed twice"));
                        }
                    }
                });
            });
        }
        if let Some(vip) = self.vip
            && (vip.is_unspecified()
                || vip.is_multicast()
                || vip.is_loopback()
                || is_broadcast(vip))
        {
            errors.add("vip", format!("{vip} cannot be a service's address"));
        }
        match (self.load_balancer, &self.hash_header) {
            (LoadBalancer::ConsistentHash, None) => {
                errors.add(
                    "hash_header",
                    "is required with load_balancer consistent_hash",
                );
            }
            (LoadBalancer::ConsistentHash, Some(header)) => {
                if let Err(why) = check_header_name(header) {
                    errors.add("hash_header", why);
                }
            }
            (other, Some(_)) => errors.add(
                "hash_header",
                format!(
                    "only applies to load_balancer consistent_hash (this service uses {})",
                    other.as_str()
                ),
            ),
            (_, None) => {}
        }
    }
}

/// Where service addresses (`vip`) may come from: the cluster's service
/// ranges, as `--service-cidr` of `mesh-control` (Kubernetes'
/// `--service-cluster-ip-range`). A `vip` anywhere else could claim a real
/// host's address, and every captured pod's connections to it would go to
/// the service instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRanges(Vec<(IpAddr, u8)>);

/// Kubernetes' default IPv4 service range and kind's IPv6 one.
pub const DEFAULT_SERVICE_RANGES: &str = "10.96.0.0/12,fd00:10:96::/112";

impl std::str::FromStr for ServiceRanges {
    type Err = String;

    /// Comma-separated `ADDRESS/PREFIX`es.
    fn from_str(text: &str) -> Result<Self, String> {
        let ranges = text
            .split(',')
            .map(|range| crate::workload::parse_network(range.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(ranges))
    }
}

impl std::fmt::Display for ServiceRanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (address, prefix)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{address}/{prefix}")?;
        }
        Ok(())
    }
}

impl Default for ServiceRanges {
    fn default() -> Self {
        DEFAULT_SERVICE_RANGES
            .parse()
            .expect("the default service ranges parse")
    }
}

impl ServiceRanges {
    pub fn contains(&self, ip: IpAddr) -> bool {
        use crate::workload::address_bits as bits;
        self.0.iter().any(|&(network, prefix)| {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            network.is_ipv4() == ip.is_ipv4() && bits(network) == bits(ip) & mask
        })
    }

    /// The problems of `resource` under these ranges: a service's `vip`
    /// outside them.
    pub fn check(&self, resource: &crate::Resource) -> Vec<crate::FieldError> {
        let crate::Resource::Service(service) = resource else {
            return Vec::new();
        };
        match service.spec.vip {
            Some(vip) if !self.contains(vip) => vec![crate::FieldError {
                field: "spec.vip".into(),
                message: format!(
                    "{vip} is outside the cluster's service ranges ({self}); pick an address \
                     in them, or start mesh-control with --service-cidr covering it"
                ),
            }],
            _ => Vec::new(),
        }
    }
}
