//! The node proxy: one per node. It loads the capture programs into the
//! kernel, registers the node's captured pods with them, and serves the
//! admin endpoint (health, capture state, Prometheus metrics).

pub mod admin;
pub mod capture;
pub mod identity;
