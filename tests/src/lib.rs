//! The local cluster: "nodes" and "pods" made of network namespaces, veth
//! pairs, bridges and routes, each pod in its own cgroup, all on one machine.
//! The end-to-end tests (this crate's `tests/`), `cargo xtask cluster` and
//! `cargo xtask demo` run the mesh on it. Addressing is in [`cluster`];
//! nothing here touches the machine's own interfaces or root cgroup.

pub mod cgroup;
pub mod cluster;
pub mod control;
pub mod delay;
pub mod http;
mod ip;
pub mod netns;
pub mod otlp;
pub mod phoenix;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod sniff;

pub use cluster::{Cluster, ClusterError, ClusterSpec, PodSpec};

/// Fails with a clear message unless the process runs as root: the cluster
/// needs CAP_NET_ADMIN and CAP_SYS_ADMIN, capture needs CAP_BPF.
pub fn require_root() -> Result<(), ClusterError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Ok(())
    } else {
        Err(ClusterError::NotRoot)
    }
}
