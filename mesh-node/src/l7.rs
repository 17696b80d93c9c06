//! L7 traffic management at the source node: the decisions an HTTP request
//! goes through before and after it leaves — which endpoint
//! ([`balance`]), whether the service is failing ([`breaker`]), whether and
//! when to try again ([`retry`]) — and at the destination, the path an
//! authorization rule is matched against ([`path`]) and the workload's
//! rate limit ([`ratelimit`]); and for a port that declares no protocol,
//! whether the client speaks HTTP ([`sniff`]). Each request is counted
//! and timed at both ends ([`metrics`]), and carries its trace on with a
//! span of the proxy's own ([`trace`]).
//!
//! Each module is a pure policy over explicit inputs (time, random rolls,
//! observed outcomes) so it can be tested exhaustively with paused time.

pub mod balance;
pub mod body;
pub mod breaker;
pub mod metrics;
pub mod path;
pub mod ratelimit;
pub mod retry;
pub mod sniff;
pub mod trace;
