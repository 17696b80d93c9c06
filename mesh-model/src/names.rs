//! Names the mesh accepts: DNS-1123 labels for namespaces, services and
//! pods, subdomains for nodes and service accounts (as Kubernetes); HTTP
//! header names; SPIFFE IDs.

use std::fmt;

/// Longest DNS-1123 label.
pub const MAX_LABEL: usize = 63;

/// A DNS-1123 label: 1 to 63 of `a-z`, `0-9`, `-`, starting and ending
/// alphanumeric. Returns why not.
pub fn check_dns_label(value: &str) -> Result<(), String> {
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Err("must not be empty".into());
    }
    if bytes.len() > MAX_LABEL {
        return Err(format!(
            "must be at most {MAX_LABEL} characters (got {})",
            bytes.len()
        ));
    }
    let ok = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is not a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a letter or digit)",
            quoted(value)
        ))
    }
}

/// Longest DNS-1123 subdomain.
pub const MAX_SUBDOMAIN: usize = 253;

/// A DNS-1123 subdomain, as Kubernetes names nodes and service accounts
/// (`ip-10-0-0-1.ec2.internal`): 1 to 253 characters, DNS-1123 labels
/// joined by single dots. Returns why not.
pub fn check_dns_subdomain(value: &str) -> Result<(), String> {
    if value.len() > MAX_SUBDOMAIN {
        return Err(format!(
            "must be at most {MAX_SUBDOMAIN} characters (got {})",
            value.len()
        ));
    }
    if value.split('.').all(|label| check_dns_label(label).is_ok()) {
        Ok(())
    } else {
        Err(format!(
            "{} is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', each dot-separated part starting and ending with a letter or digit)",
            quoted(value)
        ))
    }
}

/// An HTTP header name as routes match it: a lowercase RFC 9110 token.
pub fn check_header_name(value: &str) -> Result<(), String> {
    let token =
        |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b);
    if value.is_empty() || value.len() > 256 || !value.bytes().all(token) {
        return Err(format!(
            "{} is not a lowercase HTTP header name",
            quoted(value)
        ));
    }
    Ok(())
}

/// A quoted, shortened rendering of user input for error messages: long or
/// hostile values must not flood a response.
pub fn quoted(value: &str) -> String {
    const MAX: usize = 64;
    if value.chars().count() <= MAX {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(MAX).collect();
        format!("{head:?}... ({} characters)", value.chars().count())
    }
}

/// The namespace of the mesh's own components (control plane, nodes): no
/// workload may live there, so no workload can hold their identities.
pub const SYSTEM_NAMESPACE: &str = "mesh-system";

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    /// Parses a workload SPIFFE ID of the mesh's shape.
    pub fn parse(value: &str) -> Result<Self, String> {
        let bad = |why: &str| Err(format!("{} is not a SPIFFE ID: {why}", quoted(value)));
        let Some(rest) = value.strip_prefix("spiffe://") else {
            return bad("must start with spiffe://");
        };
        let Some((trust_domain, path)) = rest.split_once('/') else {
            return bad("must have a path /ns/<namespace>/sa/<service-account>");
        };
        let td_ok = !trust_domain.is_empty()
            && trust_domain.len() <= 255
            && trust_domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if !td_ok {
            return bad("the trust domain must be lowercase letters, digits, '-', '.' or '_'");
        }
        let parts: Vec<&str> = path.split('/').collect();
        let ["ns", namespace, "sa", service_account] = parts.as_slice() else {
            return bad("the path must be /ns/<namespace>/sa/<service-account>");
        };
        if let Err(why) = check_dns_label(namespace) {
            return bad(&why);
        }
        // Kubernetes service accounts are subdomains (the nodes' identities,
        // `node-<node name>`, too).
        if let Err(why) = check_dns_subdomain(service_account) {
            return bad(&why);
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: (*namespace).to_owned(),
            service_account: (*service_account).to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdomains_are_labels_joined_by_single_dots() {
        for good in [
            "node1",
            "ip-10-0-1-20.ec2.internal",
            "a.b-c.d",
            &"a".repeat(63),
        ] {
            assert_eq!(check_dns_subdomain(good), Ok(()), "{good}");
        }
        let long = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(62)
        );
        assert_eq!(long.len(), 254);
        for bad in [
            "",
            ".a",
            "a.",
            "a..b",
            "A.b",
            "a_b.c",
            "-a.b",
            "a.-b",
            &"a".repeat(64),
            &long,
        ] {
            assert!(check_dns_subdomain(bad).is_err(), "{bad:?}");
        }
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/ratings.v1").unwrap();
        assert_eq!(id.service_account, "ratings.v1");
        // Namespaces stay labels; no empty or dot-only segments.
        for bad in [
            "spiffe://cluster.local/ns/shop.eu/sa/web",
            "spiffe://cluster.local/ns/shop/sa/web..x",
            "spiffe://cluster.local/ns/shop/sa/.",
            "spiffe://cluster.local/ns/shop/sa/..",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dns_labels() {
        for good in ["a", "reviews", "v-2", &"x".repeat(63)] {
            assert_eq!(check_dns_label(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Reviews",
            "a_b",
            "a.b",
            "'; DROP TABLE x; --",
            "é",
            &"x".repeat(64),
        ] {
            assert!(check_dns_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn header_names() {
        assert_eq!(check_header_name("x-canary"), Ok(()));
        for bad in ["", "X-Canary", "x canary", "x:y", "ü"] {
            assert!(check_header_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spiffe_ids_round_trip_and_reject_bad_shapes() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").unwrap();
        assert_eq!(id.namespace, "shop");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/frontend");
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe:///ns/a/sa/b",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/sa/b/ns/a",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quoting_shortens_long_values() {
        let long = "a".repeat(1_000_000);
        let shown = quoted(&long);
        assert!(shown.len() < 100, "{shown}");
        assert!(shown.ends_with("(1000000 characters)"));
    }
}
