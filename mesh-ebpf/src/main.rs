//! The mesh's eBPF programs.
//!
//! * `mesh_connect4` / `mesh_connect6` (cgroup, the node's pods): redirect a
//!   captured pod's TCP connects to the node proxy's outbound listener in the
//!   pod, remembering the original destination under the socket's cookie.
//! * `mesh_sock_ops` (same cgroup): when such a connection is established,
//!   files its original destination under (netns cookie, client port) for
//!   the proxy.
//! * `mesh_sk_lookup` (each captured pod's network namespace): steers inbound
//!   TCP to the pod's addresses onto the proxy's inbound listener, and drops
//!   it when that listener is gone (fail closed).
//!
//! The decisions are `mesh_common::capture`'s pure functions, tested on the
//! host; this file reads the kernel's context, applies them and counts.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sk_lookup, bpf_sock_addr, sk_action},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use mesh_common::{
    PROXY_MARK,
    capture::{
        Connect, ConnectVerdict, Counter, Inbound, InboundVerdict, Ip, MAX_CAPTURED_NETNS,
        MAX_PENDING_CONNECTIONS, MAX_POD_ADDRESSES, NetnsCookie, OriginalDst, OriginalDstKey,
        PROXY_OUTBOUND_PORT, PodInbound, PodOutbound, Setting, connect_verdict, inbound_verdict,
        redirect_v4,
    },
};

/// `SOCK_STREAM` from the socket(2) ABI.
const SOCK_STREAM: u32 = 1;
/// `IPPROTO_TCP`.
const IPPROTO_TCP: u32 = 6;
/// `AF_INET`, `AF_INET6`.
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `cgroup/connect*` return value that lets the connect proceed.
const ALLOW: i32 = 1;

#[map(name = "CAPTURED_NETNS")]
static CAPTURED_NETNS: HashMap<NetnsCookie, PodOutbound> =
    HashMap::with_max_entries(MAX_CAPTURED_NETNS, 0);

#[map(name = "NETNS_CONNECTS")]
static NETNS_CONNECTS: PerCpuHashMap<NetnsCookie, u64> =
    PerCpuHashMap::with_max_entries(MAX_CAPTURED_NETNS, 0);

#[map(name = "PENDING_DST")]
static PENDING_DST: LruHashMap<u64, OriginalDst> =
    LruHashMap::with_max_entries(MAX_PENDING_CONNECTIONS, 0);

#[map(name = "ORIGINAL_DST")]
static ORIGINAL_DST: LruHashMap<OriginalDstKey, OriginalDst> =
    LruHashMap::with_max_entries(MAX_PENDING_CONNECTIONS, 0);

#[map(name = "POD_INBOUND")]
static POD_INBOUND: HashMap<Ip, PodInbound> = HashMap::with_max_entries(MAX_POD_ADDRESSES, 0);

#[map(name = "INBOUND_LISTENERS")]
static INBOUND_LISTENERS: SockHash<Ip> = SockHash::with_max_entries(MAX_POD_ADDRESSES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::LEN, 0);

#[map(name = "SETTINGS")]
static SETTINGS: Array<u32> = Array::with_max_entries(Setting::LEN, 0);

/// Whether userspace switched the debug records on.
fn debug_logs() -> bool {
    SETTINGS
        .get(Setting::DebugLogs as u32)
        .is_some_and(|on| *on != 0)
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    on_connect::<false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    on_connect::<true>(&ctx)
}

/// Both connect hooks. A connect is never refused here: a redirected one to
/// an absent listener is refused by the kernel (nothing listens on the
/// loopback port), which is what keeps capture fail-closed.
///
/// `V6` is a constant so each program reads only its own fields: the
/// verifier rejects a context access through a computed pointer.
fn on_connect<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    if try_connect::<V6>(ctx).is_err() {
        count(Counter::Error);
    }
    ALLOW
}

/// Reads a 32-bit context field with one 4-byte load, as the verifier
/// requires (no merging into wider loads, no computed pointers).
///
/// # Safety
/// `field` must point into the program's context.
unsafe fn ctx_u32(field: *const u32) -> u32 {
    // SAFETY: the caller's contract.
    unsafe { core::ptr::read_volatile(field) }
}

/// Reads a four-word address from the context, word by word.
///
/// # Safety
/// `field` must point into the program's context.
unsafe fn ctx_ip6(field: *const [u32; 4]) -> Ip {
    let base = field.cast::<u32>();
    // SAFETY: the caller's contract; the four words are in the field.
    unsafe {
        Ip::from_be_words([
            ctx_u32(base),
            ctx_u32(base.add(1)),
            ctx_u32(base.add(2)),
            ctx_u32(base.add(3)),
        ])
    }
}

fn try_connect<const V6: bool>(ctx: &SockAddrContext) -> Result<(), ()> {
    let addr: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for the
    // duration of the call; the verifier checks every field access.
    let (dst, port_be, sock_type, sk) = unsafe {
        let dst = if V6 {
            ctx_ip6(&raw const (*addr).user_ip6)
        } else {
            Ip::v4(u32::from_be(ctx_u32(&raw const (*addr).user_ip4)))
        };
        (
            dst,
            ctx_u32(&raw const (*addr).user_port),
            ctx_u32(&raw const (*addr).type_),
            core::ptr::read_volatile(&raw const (*addr).__bindgen_anon_1.sk),
        )
    };
    if sk.is_null() {
        return Err(());
    }
    // SAFETY: `sk` is the context's non-null socket pointer.
    let mark = unsafe { ctx_u32(&raw const (*sk).mark) };
    let dst_port = u16::from_be(port_be as u16);
    // SAFETY: `bpf_get_netns_cookie` accepts the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(addr.cast()) };
    let pod = CAPTURED_NETNS.get_ptr(netns).map(|pod| {
        // SAFETY: the pointer comes from a successful lookup; userspace only
        // ever replaces the value whole.
        unsafe { &*pod }
    });
    let connect = Connect {
        pod,
        tcp: sock_type == SOCK_STREAM,
        proxy_mark: mark == PROXY_MARK,
        dst,
        dst_port,
    };
    match connect_verdict(&connect) {
        ConnectVerdict::Bypass(reason) => count(reason),
        ConnectVerdict::Redirect => {
            // SAFETY: `bpf_get_socket_cookie` accepts the program's context.
            let socket = unsafe { bpf_get_socket_cookie(addr.cast()) };
            let original = OriginalDst {
                ip: dst,
                port: dst_port,
                _pad: [0; 6],
            };
            PENDING_DST.insert(socket, original, 0).map_err(|_| ())?;
            let listener_port = (PROXY_OUTBOUND_PORT.to_be()) as u32;
            let loopback = redirect_v4(socket).to_be();
            // SAFETY: writing the destination is what connect hooks are for;
            // the verifier allows these fields to be written.
            unsafe {
                if !V6 {
                    write_u32(&raw mut (*addr).user_ip4, loopback);
                } else {
                    // A dual-stack socket dialling a mapped IPv4 address goes
                    // to the mapped loopback address, anything else to `::1`.
                    let (high, low) = if dst.is_v4() {
                        (0xffffu32.to_be(), loopback)
                    } else {
                        (0, 1u32.to_be())
                    };
                    let base = (&raw mut (*addr).user_ip6).cast::<u32>();
                    write_u32(base, 0);
                    write_u32(base.add(1), 0);
                    write_u32(base.add(2), high);
                    write_u32(base.add(3), low);
                }
                write_u32(&raw mut (*addr).user_port, listener_port);
            }
            count(Counter::ConnectRedirected);
            if let Some(slot) = NETNS_CONNECTS.get_ptr_mut(netns) {
                // SAFETY: per-CPU value, and the program runs with preemption
                // disabled, so nothing else writes this slot concurrently.
                unsafe { *slot += 1 };
            }
            if debug_logs() {
                debug!(ctx, "connect redirected netns={} port={}", netns, dst_port);
            }
        }
    }
    Ok(())
}

/// Writes a 32-bit context field with one 4-byte store.
///
/// # Safety
/// `field` must point into the program's context, at a writable field.
unsafe fn write_u32(field: *mut u32, value: u32) {
    // SAFETY: the caller's contract.
    unsafe { core::ptr::write_volatile(field, value) }
}

#[sock_ops]
pub fn mesh_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && try_established(&ctx).is_err() {
        count(Counter::Error);
    }
    0
}

/// A connection of a pod's has been established: if the connect program
/// redirected it, file its destination under what the proxy can see — its
/// namespace and the client's port.
fn try_established(ctx: &SockOpsContext) -> Result<(), ()> {
    // SAFETY: `bpf_get_socket_cookie` accepts the program's own context.
    let socket = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the lookup's value is plain data, copied out at once.
    let Some(original) = (unsafe { PENDING_DST.get(socket) }).copied() else {
        return Ok(());
    };
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return Err(());
    }
    // Where the connect was rewritten to: with the client port, what the
    // proxy sees of the connection.
    let ops = ctx.ops;
    // Both fields are read whatever the family: a branch per field lets the
    // compiler load through a selected pointer, which the verifier rejects.
    // SAFETY: `ops` is the program's context; see `ctx_u32`.
    let (ip4, ip6) = unsafe {
        (
            ctx_u32(&raw const (*ops).remote_ip4),
            ctx_ip6(&raw const (*ops).remote_ip6),
        )
    };
    let rewritten = if family == AF_INET {
        Ip::v4(u32::from_be(ip4))
    } else {
        ip6
    };
    let key = OriginalDstKey {
        // SAFETY: `bpf_get_netns_cookie` accepts the program's own context.
        netns: unsafe { bpf_get_netns_cookie(ops.cast()) },
        listener: rewritten,
        port: ctx.local_port() as u16,
        _pad: [0; 6],
    };
    ORIGINAL_DST.insert(key, original, 0).map_err(|_| ())?;
    let _ = PENDING_DST.remove(socket);
    count(Counter::OriginalDstRecorded);
    Ok(())
}

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    match try_sk_lookup(&ctx) {
        Ok(action) => action,
        Err(()) => {
            count(Counter::Error);
            sk_action::SK_PASS
        }
    }
}

fn try_sk_lookup(ctx: &SkLookupContext) -> Result<u32, ()> {
    let lookup: *mut bpf_sk_lookup = ctx.lookup;
    // SAFETY: the kernel hands the program a valid `bpf_sk_lookup`; the
    // verifier checks every field access.
    // Every field is read whatever the family (see `try_established`).
    let (family, protocol, local4, remote4, local6, remote6, local_port) = unsafe {
        (
            ctx_u32(&raw const (*lookup).family),
            ctx_u32(&raw const (*lookup).protocol),
            ctx_u32(&raw const (*lookup).local_ip4),
            ctx_u32(&raw const (*lookup).remote_ip4),
            ctx_ip6(&raw const (*lookup).local_ip6),
            ctx_ip6(&raw const (*lookup).remote_ip6),
            ctx_u32(&raw const (*lookup).local_port),
        )
    };
    let (local, remote) = if family == AF_INET6 {
        (local6, remote6)
    } else {
        (Ip::v4(u32::from_be(local4)), Ip::v4(u32::from_be(remote4)))
    };
    if family != AF_INET && family != AF_INET6 {
        return Ok(sk_action::SK_PASS);
    }
    // SAFETY: the lookup's value is plain data, borrowed only in this call.
    let pod = unsafe { POD_INBOUND.get(local) };
    let inbound = Inbound {
        pod,
        tcp: protocol == IPPROTO_TCP,
        local,
        local_port: local_port as u16,
        remote,
    };
    match inbound_verdict(&inbound) {
        InboundVerdict::Pass(reason) => {
            if let Some(reason) = reason {
                count(reason);
            }
            Ok(sk_action::SK_PASS)
        }
        InboundVerdict::Steer => {
            if INBOUND_LISTENERS.redirect_sk_lookup(ctx, local, 0).is_ok() {
                count(Counter::InboundSteered);
                Ok(sk_action::SK_PASS)
            } else {
                // The pod is captured but its proxy is not listening: never
                // let plaintext reach the application behind its back.
                count(Counter::InboundRefused);
                Ok(sk_action::SK_DROP)
            }
        }
    }
}

fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU array slot; see `try_connect`.
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
