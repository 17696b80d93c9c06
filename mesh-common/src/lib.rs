//! Types shared by the kernel side (`mesh-ebpf`) and userspace (`mesh-node`).
//!
//! Everything here is `no_std` and `#[repr(C)]` where it crosses the map
//! boundary, so one definition serves both sides. Decisions the eBPF programs
//! take live here as pure functions so they are unit-tested on the host.
#![no_std]

pub mod capture;

/// `SO_MARK` carried by every socket the node proxy opens. The capture
/// programs never redirect a socket with this mark.
pub const PROXY_MARK: u32 = 0x539;
