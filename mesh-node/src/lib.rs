//! The node proxy: one per node. It loads the capture programs into the
//! kernel, registers the node's captured pods with them, joins the mesh and
//! keeps its workloads' certificates fresh, and serves the admin endpoint
//! (health, capture state, certificates, Prometheus metrics).

pub mod admin;
pub mod capture;
pub mod control;
pub mod directory;
pub mod hbone;
pub mod identity;
pub mod l7;
pub mod pods;
pub mod policy;
pub mod proxy;
pub mod readiness;
pub mod spans;
pub mod stats;
pub mod workloads;
pub mod xds;
