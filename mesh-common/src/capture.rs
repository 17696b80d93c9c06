//! Capture state shared with the `cgroup/connect4` program: which network
//! namespaces are captured, what the program counts, and the verdict it takes
//! for each connect.

/// Cookie the kernel gives a network namespace (`bpf_get_netns_cookie`,
/// `SO_NETNS_COOKIE`). Stable for the namespace's lifetime, never reused.
pub type NetnsCookie = u64;

/// Name of the map `netns cookie -> NetnsState` that userspace fills with the
/// namespaces of captured pods.
pub const MAP_CAPTURED_NETNS: &str = "CAPTURED_NETNS";
/// Name of the per-CPU map `netns cookie -> connects seen` for captured pods.
pub const MAP_NETNS_CONNECTS: &str = "NETNS_CONNECTS";
/// Name of the per-CPU array of [`Counter`]s.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Name of the `cgroup/connect4` program in the object file.
pub const PROG_CONNECT4: &str = "mesh_connect4";

/// Maximum number of captured network namespaces (pods) per node.
pub const MAX_CAPTURED_NETNS: u32 = 4096;

/// Per-namespace capture settings written by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsState {
    /// Reserved for per-pod capture flags; zero today.
    pub flags: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
#[allow(unsafe_code)]
// SAFETY: `NetnsState` is `#[repr(C)]`, made only of integers, with explicit
// padding, so every bit pattern is valid and it has no uninitialised bytes.
unsafe impl aya::Pod for NetnsState {}

/// What the capture programs count, one slot each in [`MAP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A connect from a captured namespace (and not bypassed).
    ConnectCaptured = 0,
    /// A connect from a namespace that is not captured.
    BypassUncaptured = 1,
    /// A connect to a loopback address.
    BypassLoopback = 2,
    /// A connect on a socket that is not TCP (UDP `connect()`).
    BypassNotTcp = 3,
    /// The program could not update its maps.
    Error = 4,
}

impl Counter {
    /// Number of counters; the size of [`MAP_COUNTERS`].
    pub const LEN: u32 = 5;
    /// Every counter, in slot order.
    pub const ALL: [Counter; Self::LEN as usize] = [
        Counter::ConnectCaptured,
        Counter::BypassUncaptured,
        Counter::BypassLoopback,
        Counter::BypassNotTcp,
        Counter::Error,
    ];

    /// Stable name, used in metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectCaptured => "connect_captured",
            Counter::BypassUncaptured => "bypass_uncaptured",
            Counter::BypassLoopback => "bypass_loopback",
            Counter::BypassNotTcp => "bypass_not_tcp",
            Counter::Error => "error",
        }
    }
}

/// What the connect program does with one `connect()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectVerdict {
    /// The connect belongs to a captured pod: count it.
    Capture,
    /// Leave the connect alone, for this reason.
    Bypass(Counter),
}

/// The parts of an IPv4 `connect()` the verdict depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect4 {
    /// Capture state of the caller's namespace; `None` when not captured.
    pub netns: Option<NetnsState>,
    /// The socket is a TCP stream socket.
    pub tcp: bool,
    /// Destination address, host byte order.
    pub dst_ip: u32,
}

/// Decides what to do with an IPv4 connect.
pub const fn connect4_verdict(connect: Connect4) -> ConnectVerdict {
    if connect.netns.is_none() {
        return ConnectVerdict::Bypass(Counter::BypassUncaptured);
    }
    if !connect.tcp {
        return ConnectVerdict::Bypass(Counter::BypassNotTcp);
    }
    let dst_ip = connect.dst_ip;
    // 127.0.0.0/8 never leaves the pod: nothing to secure.
    if dst_ip >> 24 == 127 {
        return ConnectVerdict::Bypass(Counter::BypassLoopback);
    }
    ConnectVerdict::Capture
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ip(a: u8, b: u8, c: u8, d: u8) -> u32 {
        u32::from_be_bytes([a, b, c, d])
    }

    fn captured_tcp(dst_ip: u32) -> Connect4 {
        Connect4 {
            netns: Some(NetnsState::default()),
            tcp: true,
            dst_ip,
        }
    }

    #[test]
    fn uncaptured_namespace_bypasses() {
        let connect = Connect4 {
            netns: None,
            ..captured_tcp(ip(10, 0, 0, 1))
        };
        assert_eq!(
            connect4_verdict(connect),
            ConnectVerdict::Bypass(Counter::BypassUncaptured)
        );
    }

    #[test]
    fn udp_connect_bypasses() {
        let connect = Connect4 {
            tcp: false,
            ..captured_tcp(ip(10, 0, 0, 1))
        };
        assert_eq!(
            connect4_verdict(connect),
            ConnectVerdict::Bypass(Counter::BypassNotTcp)
        );
    }

    #[test]
    fn loopback_bypasses_even_when_captured() {
        for dst in [ip(127, 0, 0, 1), ip(127, 255, 255, 254)] {
            assert_eq!(
                connect4_verdict(captured_tcp(dst)),
                ConnectVerdict::Bypass(Counter::BypassLoopback)
            );
        }
    }

    #[test]
    fn captured_namespace_to_pod_is_captured() {
        for dst in [ip(10, 89, 1, 2), ip(128, 0, 0, 1), ip(126, 255, 255, 255)] {
            assert_eq!(connect4_verdict(captured_tcp(dst)), ConnectVerdict::Capture);
        }
    }

    #[test]
    fn counter_slots_match_their_discriminants() {
        for (slot, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, slot);
        }
        assert_eq!(Counter::ALL.len(), Counter::LEN as usize);
    }
}
