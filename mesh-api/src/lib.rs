//! The gRPC API between the control plane and the nodes. The generated
//! types stay at the edges: both sides convert them to domain types right
//! after receiving them.

pub mod channel;
pub mod http_server;

/// An error and its causes on one line, for logs and answers.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Version 1 of the API.
#[allow(missing_debug_implementations, clippy::all)]
pub mod v1 {
    tonic::include_proto!("mesh.v1");
}

/// The OTLP trace messages the node proxy exports spans with (a subset of
/// opentelemetry-proto, same field numbers).
#[allow(missing_debug_implementations, clippy::all)]
pub mod otlp {
    tonic::include_proto!("opentelemetry.proto.trace.v1");
}

/// The metadata key carrying a bootstrap token (`Bearer <id>.<secret>`).
pub const AUTHORIZATION: &str = "authorization";
