//! The mesh's eBPF programs.
//!
//! `mesh_connect4` runs on every IPv4 `connect()` made by a process in the
//! cgroup it is attached to (the node's pods). Today it counts the connects of
//! captured pods per network namespace; the capture issue grows it into the
//! redirect to the node proxy. The decision itself is
//! `mesh_common::capture::connect4_verdict`, tested on the host.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::bpf_get_netns_cookie,
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use mesh_common::capture::{
    Connect4, ConnectVerdict, Counter, MAX_CAPTURED_NETNS, NetnsCookie, NetnsState,
    connect4_verdict,
};

/// `SOCK_STREAM` from the socket(2) ABI.
const SOCK_STREAM: u32 = 1;
/// `cgroup/connect4` return value that lets the connect proceed.
const ALLOW: i32 = 1;

#[map(name = "CAPTURED_NETNS")]
static CAPTURED_NETNS: HashMap<NetnsCookie, NetnsState> =
    HashMap::with_max_entries(MAX_CAPTURED_NETNS, 0);

#[map(name = "NETNS_CONNECTS")]
static NETNS_CONNECTS: PerCpuHashMap<NetnsCookie, u64> =
    PerCpuHashMap::with_max_entries(MAX_CAPTURED_NETNS, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::LEN, 0);

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    if try_connect4(&ctx).is_err() {
        count(Counter::Error);
    }
    // Counting never refuses a connect.
    ALLOW
}

fn try_connect4(ctx: &SockAddrContext) -> Result<(), ()> {
    let sock_addr: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for the
    // duration of the call; the verifier checks every field access.
    let (user_ip4, sock_type) = unsafe { ((*sock_addr).user_ip4, (*sock_addr).type_) };
    // SAFETY: `bpf_get_netns_cookie` accepts the program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(sock_addr.cast()) };
    let netns = CAPTURED_NETNS.get_ptr(cookie).map(|state| {
        // SAFETY: the pointer comes from a successful map lookup and the
        // value is plain data; userspace only ever replaces it whole.
        unsafe { *state }
    });
    let connect = Connect4 {
        netns,
        tcp: sock_type == SOCK_STREAM,
        dst_ip: u32::from_be(user_ip4),
    };
    match connect4_verdict(connect) {
        ConnectVerdict::Bypass(reason) => count(reason),
        ConnectVerdict::Capture => {
            count(Counter::ConnectCaptured);
            // Userspace creates the slot when it captures the namespace.
            let slot = NETNS_CONNECTS.get_ptr_mut(cookie).ok_or(())?;
            // SAFETY: per-CPU value, and the program runs with preemption
            // disabled, so nothing else writes this slot concurrently.
            unsafe { *slot += 1 };
            debug!(
                ctx,
                "connect4 captured netns={} dst={:i}", cookie, connect.dst_ip
            );
        }
    }
    Ok(())
}

fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU array slot; see `try_connect4`.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
