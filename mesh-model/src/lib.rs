//! The mesh's resources as operators write them: Kubernetes-style documents
//! (`apiVersion`, `kind`, `metadata`, `spec`) for Namespace, Service,
//! Workload, ServicePolicy, TrafficSplit and AuthorizationPolicy.
//!
//! Parsing and validation happen here, once, at the edge: a [`Resource`]
//! that exists has been validated. Every problem of a document is reported
//! at once, each naming the field (`spec.v2_weight: must be >= 0 (got -5)`).
//! The pure decisions taken on resources (which version a request goes to)
//! live beside them so the control plane and the node share them.

pub mod authz;
pub mod config;
pub mod duration;
pub mod names;
pub mod namespace;
pub mod policy;
pub mod resource;
pub mod service;
pub mod split;
pub mod stats;
mod validate;
pub mod workload;

pub use resource::{
    Document, Kind, Metadata, Object, ParseError, Resource, parse_documents,
    parse_documents_checked,
};
pub use validate::{FieldError, FieldErrors};

/// The `apiVersion` of every resource.
pub const API_VERSION: &str = "mesh.io/v1";
