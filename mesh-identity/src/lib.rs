//! Workload identity for mTLS between nodes.
//!
//! - [`ca`]: the mesh certificate authority: a root (ECDSA P-256), and
//!   X.509-SVIDs issued to workloads, from a CSR (the node keeps the key) or
//!   with a key the CA generates (for gateways and VMs outside the mesh).
//! - [`components`]: the identities of the control plane and the nodes.
//! - [`kek`]: the key-encryption key that seals such keys at rest.
//! - [`svid`]: the leaf profile every peer certificate must meet.
//! - [`verifier`]: rustls client and server verifiers that chain to the
//!   trust bundle and then apply that profile strictly. rustls-webpki alone
//!   would accept several URI SANs, wildcards and SAN-less leaves.

pub mod bundle;
pub mod ca;
pub mod components;
pub mod kek;
pub mod secret;
pub mod svid;
pub mod verifier;

pub use bundle::TrustBundle;
pub use ca::{CertificateAuthority, IssuedCertificate, RootInfo};
pub use kek::Kek;
pub use mesh_model::names::SpiffeId;
pub use svid::SvidError;
pub use verifier::SpiffeVerifier;
