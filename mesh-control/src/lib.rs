//! The control plane: the mesh's desired state in SQL (SQLite embedded by
//! default, PostgreSQL for production and HA), the resource API and, in the
//! issues that follow, the certificate authority and the configuration push.

pub mod api;
pub mod ca;
pub mod grpc;
pub mod kubernetes;
pub mod snapshot;
pub mod store;
