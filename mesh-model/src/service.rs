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
