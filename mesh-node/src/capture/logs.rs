//! Forwards the eBPF programs' `aya-log` records to this process's logger
//! (`RUST_LOG=mesh_ebpf=debug` shows them).
#![allow(unsafe_code)]

use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};

/// Drains the programs' log ring for as long as the runtime runs. The logger
/// is moved into the task, which keeps the ring open.
pub fn spawn_drain(logger: EbpfLogger<&'static dyn log::Log>) -> std::io::Result<()> {
    // SAFETY: the logger owns its ring-buffer map descriptor and returns that
    // same descriptor from `as_raw_fd` until it is dropped, which happens only
    // when the `AsyncFd` that owns it is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    tokio::spawn(async move {
        while let Ok(mut ready) = ring.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
    Ok(())
}
