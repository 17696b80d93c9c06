//! Capture state shared with the kernel programs, and the decisions they take.
//!
//! * `cgroup/connect4` and `connect6` ([`connect_verdict`]) rewrite a captured
//!   pod's outbound TCP connect to the node proxy's outbound listener inside
//!   the pod (an address in `127.0.0.0/8` — see [`redirect_v4`] — or
//!   `[::1]`, port [`PROXY_OUTBOUND_PORT`]) and note the original
//!   destination under the socket's cookie.
//! * `sock_ops` moves that note, once the connection is established, to
//!   [`MAP_ORIGINAL_DST`] under (netns cookie, rewritten address, client
//!   port), where the proxy finds it for the connection it accepted.
//! * `sk_lookup` ([`inbound_verdict`]), attached to each captured pod's
//!   namespace, steers inbound TCP to the pod's address onto the proxy's
//!   inbound listener; with no listener there it drops the connection.
//!
//! Addresses cross the map boundary as [`Ip`]: four 32-bit words in host
//! order, most significant first, IPv4 as `::ffff:a.b.c.d`.

/// Cookie the kernel gives a network namespace (`bpf_get_netns_cookie`,
/// `SO_NETNS_COOKIE`). Stable for the namespace's lifetime, never reused.
pub type NetnsCookie = u64;

/// The proxy's outbound listener in every captured pod (`127.0.0.1`, `[::1]`).
pub const PROXY_OUTBOUND_PORT: u16 = 15001;
/// The proxy's inbound plaintext listener in every captured pod (`[::]`).
pub const PROXY_INBOUND_PORT: u16 = 15006;
/// The proxy's inbound mTLS tunnel (HBONE) port in every captured pod.
pub const PROXY_TUNNEL_PORT: u16 = 15008;

/// Map `netns cookie -> PodOutbound`: the captured pods' namespaces.
pub const MAP_CAPTURED_NETNS: &str = "CAPTURED_NETNS";
/// Per-CPU map `netns cookie -> u64`: outbound connects redirected per pod.
pub const MAP_NETNS_CONNECTS: &str = "NETNS_CONNECTS";
/// LRU map `socket cookie -> OriginalDst`, written by the connect programs.
pub const MAP_PENDING_DST: &str = "PENDING_DST";
/// LRU map `OriginalDstKey -> OriginalDst`, written by `sock_ops`, read and
/// removed by the proxy.
pub const MAP_ORIGINAL_DST: &str = "ORIGINAL_DST";
/// Map `Ip -> PodInbound`: the captured pods' addresses.
pub const MAP_POD_INBOUND: &str = "POD_INBOUND";
/// Sock hash `Ip -> socket`: each captured pod's inbound listener.
pub const MAP_INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
/// Per-CPU array of [`Counter`]s.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Array of run-time switches, indexed by [`Setting`].
pub const MAP_SETTINGS: &str = "SETTINGS";

/// The programs' run-time switches, one `u32` slot each in [`MAP_SETTINGS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// Non-zero: the programs emit `aya-log` debug records (one per
    /// redirected connect). Off by default: the records cost ring-buffer
    /// space even when nobody reads them.
    DebugLogs = 0,
}

impl Setting {
    /// Number of settings; the size of [`MAP_SETTINGS`].
    pub const LEN: u32 = 1;
}

/// Program names in the object file.
pub const PROG_CONNECT4: &str = "mesh_connect4";
pub const PROG_CONNECT6: &str = "mesh_connect6";
pub const PROG_SOCK_OPS: &str = "mesh_sock_ops";
pub const PROG_SK_LOOKUP: &str = "mesh_sk_lookup";

/// Maximum number of captured network namespaces (pods) per node.
pub const MAX_CAPTURED_NETNS: u32 = 4096;
/// Maximum number of captured pod addresses per node (IPv4 and IPv6).
pub const MAX_POD_ADDRESSES: u32 = 2 * MAX_CAPTURED_NETNS;
/// Connections between connect and establishment, or accepted and not yet
/// looked up, that the maps hold at once; the oldest are evicted beyond.
pub const MAX_PENDING_CONNECTIONS: u32 = 65536;
/// Excluded ports per pod and direction.
pub const MAX_EXCLUDED_PORTS: usize = 8;
/// Excluded outbound CIDRs per pod.
pub const MAX_EXCLUDED_CIDRS: usize = 4;

/// An IP address as four host-order words, IPv4 mapped into IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ip {
    pub words: [u32; 4],
}

impl Ip {
    /// `::ffff:a.b.c.d` for the IPv4 address `v4` (host order).
    pub const fn v4(v4: u32) -> Self {
        Self {
            words: [0, 0, 0xffff, v4],
        }
    }

    /// From the kernel's network-order words (`user_ip6`, `local_ip6`).
    pub const fn from_be_words(words: [u32; 4]) -> Self {
        Self {
            words: [
                u32::from_be(words[0]),
                u32::from_be(words[1]),
                u32::from_be(words[2]),
                u32::from_be(words[3]),
            ],
        }
    }

    /// Whether this is an IPv4 address (`::ffff:0:0/96`).
    pub const fn is_v4(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == 0xffff
    }

    /// Loopback (`127.0.0.0/8`, `::1`) or unspecified (`0.0.0.0`, `::`):
    /// a connect that stays inside the pod.
    pub const fn is_local(&self) -> bool {
        let [a, b, c, d] = self.words;
        if self.is_v4() {
            return d >> 24 == 127 || d == 0;
        }
        a == 0 && b == 0 && c == 0 && (d == 1 || d == 0)
    }

    /// Whether `self` is inside `cidr`.
    pub const fn within(&self, cidr: &Cidr) -> bool {
        let mut bits = cidr.prefix_len;
        let mut i = 0;
        while i < 4 {
            let mask = if bits >= 32 {
                u32::MAX
            } else if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            if (self.words[i] ^ cidr.ip.words[i]) & mask != 0 {
                return false;
            }
            bits = bits.saturating_sub(32);
            i += 1;
        }
        true
    }
}

/// An address range; IPv4 ranges are mapped (`10.0.0.0/8` is
/// `::ffff:10.0.0.0/104`). A zero `prefix_len` slot is unused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr {
    pub ip: Ip,
    /// Prefix length in IPv6 terms, 1 to 128.
    pub prefix_len: u32,
}

/// A captured pod's outbound settings, keyed by its namespace's cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodOutbound {
    /// Destination ports never redirected; 0 marks an unused slot.
    pub excluded_ports: [u16; MAX_EXCLUDED_PORTS],
    /// Destination ranges never redirected.
    pub excluded_cidrs: [Cidr; MAX_EXCLUDED_CIDRS],
}

/// A captured pod's inbound settings, keyed by each of its addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInbound {
    /// Local ports whose inbound traffic reaches the application directly.
    pub excluded_ports: [u16; MAX_EXCLUDED_PORTS],
}

/// Where a redirected connection was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalDst {
    pub ip: Ip,
    /// Host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Which redirected connection: the client's namespace, the loopback
/// address its connect was rewritten to, and its local port. The proxy sees
/// the last two as its accepted socket's local address and peer port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OriginalDstKey {
    pub netns: NetnsCookie,
    /// Where the connect was rewritten to (see [`redirect_v4`]).
    pub listener: Ip,
    /// The client's local port, host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

#[cfg(feature = "user")]
mod pod {
    #![allow(unsafe_code)]
    //! Every map key and value is a `#[repr(C)]` struct made only of
    //! integers, with explicit padding fields, so every bit pattern is valid
    //! and no byte is uninitialised: what `aya::Pod` requires.
    use super::*;
    // SAFETY: see the module comment.
    unsafe impl aya::Pod for Ip {}
    // SAFETY: see the module comment.
    unsafe impl aya::Pod for PodOutbound {}
    // SAFETY: see the module comment.
    unsafe impl aya::Pod for PodInbound {}
    // SAFETY: see the module comment.
    unsafe impl aya::Pod for OriginalDst {}
    // SAFETY: see the module comment.
    unsafe impl aya::Pod for OriginalDstKey {}
}

/// What the capture programs count, one slot each in [`MAP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Counter {
    /// An outbound connect redirected to the proxy.
    ConnectRedirected = 0,
    /// A connect from a namespace that is not captured.
    BypassUncaptured = 1,
    /// A connect to a loopback (or unspecified) address.
    BypassLoopback = 2,
    /// A connect on a socket that is not TCP (UDP `connect()`).
    BypassNotTcp = 3,
    /// A connect on a socket marked with the proxy's `SO_MARK`.
    BypassProxyMark = 4,
    /// A connect to a port the pod excludes.
    BypassExcludedPort = 5,
    /// A connect to an address range the pod excludes.
    BypassExcludedCidr = 6,
    /// `sock_ops` moved a redirected connection's destination for the proxy.
    OriginalDstRecorded = 7,
    /// Inbound TCP steered to a pod's inbound listener.
    InboundSteered = 8,
    /// Inbound TCP from the pod's own address (the proxy delivering to the
    /// application, or the pod calling itself) left alone.
    InboundBypassLocal = 9,
    /// Inbound TCP to a proxy port or an excluded port left alone.
    InboundBypassPort = 10,
    /// Inbound TCP to a captured pod whose listener is absent: refused.
    InboundRefused = 11,
    /// A program could not read or update its maps.
    Error = 12,
}

impl Counter {
    /// Number of counters; the size of [`MAP_COUNTERS`].
    pub const LEN: u32 = 13;
    /// Every counter, in slot order.
    pub const ALL: [Counter; Self::LEN as usize] = [
        Counter::ConnectRedirected,
        Counter::BypassUncaptured,
        Counter::BypassLoopback,
        Counter::BypassNotTcp,
        Counter::BypassProxyMark,
        Counter::BypassExcludedPort,
        Counter::BypassExcludedCidr,
        Counter::OriginalDstRecorded,
        Counter::InboundSteered,
        Counter::InboundBypassLocal,
        Counter::InboundBypassPort,
        Counter::InboundRefused,
        Counter::Error,
    ];

    /// Stable name, used in metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectRedirected => "connect_redirected",
            Counter::BypassUncaptured => "bypass_uncaptured",
            Counter::BypassLoopback => "bypass_loopback",
            Counter::BypassNotTcp => "bypass_not_tcp",
            Counter::BypassProxyMark => "bypass_proxy_mark",
            Counter::BypassExcludedPort => "bypass_excluded_port",
            Counter::BypassExcludedCidr => "bypass_excluded_cidr",
            Counter::OriginalDstRecorded => "original_dst_recorded",
            Counter::InboundSteered => "inbound_steered",
            Counter::InboundBypassLocal => "inbound_bypass_local",
            Counter::InboundBypassPort => "inbound_bypass_port",
            Counter::InboundRefused => "inbound_refused",
            Counter::Error => "error",
        }
    }
}

/// What the connect programs do with one `connect()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectVerdict {
    /// Send it to the proxy's outbound listener.
    Redirect,
    /// Leave the connect alone, for this reason.
    Bypass(Counter),
}

/// The parts of a `connect()` the verdict depends on.
#[derive(Clone, Copy, Debug)]
pub struct Connect<'a> {
    /// The caller's pod, `None` when its namespace is not captured.
    pub pod: Option<&'a PodOutbound>,
    /// The socket is a TCP stream socket.
    pub tcp: bool,
    /// The socket carries [`crate::PROXY_MARK`].
    pub proxy_mark: bool,
    pub dst: Ip,
    /// Host order.
    pub dst_port: u16,
}

/// Decides what to do with an outbound connect.
pub const fn connect_verdict(connect: &Connect<'_>) -> ConnectVerdict {
    let Some(pod) = connect.pod else {
        return ConnectVerdict::Bypass(Counter::BypassUncaptured);
    };
    if !connect.tcp {
        return ConnectVerdict::Bypass(Counter::BypassNotTcp);
    }
    if connect.proxy_mark {
        return ConnectVerdict::Bypass(Counter::BypassProxyMark);
    }
    // Loopback never leaves the pod: nothing to secure.
    if connect.dst.is_local() {
        return ConnectVerdict::Bypass(Counter::BypassLoopback);
    }
    if port_listed(&pod.excluded_ports, connect.dst_port) {
        return ConnectVerdict::Bypass(Counter::BypassExcludedPort);
    }
    let mut i = 0;
    while i < MAX_EXCLUDED_CIDRS {
        let cidr = &pod.excluded_cidrs[i];
        if cidr.prefix_len != 0 && connect.dst.within(cidr) {
            return ConnectVerdict::Bypass(Counter::BypassExcludedCidr);
        }
        i += 1;
    }
    ConnectVerdict::Redirect
}

/// What `sk_lookup` does with one inbound connection in a captured pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundVerdict {
    /// Hand it to the pod's inbound listener (or refuse it if there is none).
    Steer,
    /// Let the kernel's normal lookup find the socket.
    Pass(Option<Counter>),
}

/// The parts of an inbound connection the verdict depends on.
#[derive(Clone, Copy, Debug)]
pub struct Inbound<'a> {
    /// The captured pod owning the local address, `None` for other
    /// addresses (loopback, or a pod that is not captured).
    pub pod: Option<&'a PodInbound>,
    pub tcp: bool,
    pub local: Ip,
    /// Host order.
    pub local_port: u16,
    pub remote: Ip,
}

/// Decides whether an inbound connection goes to the proxy.
pub const fn inbound_verdict(inbound: &Inbound<'_>) -> InboundVerdict {
    let Some(pod) = inbound.pod else {
        return InboundVerdict::Pass(None);
    };
    if !inbound.tcp {
        return InboundVerdict::Pass(None);
    }
    // From the pod's own address: the proxy delivering a connection it has
    // already handled, or the pod calling itself. Steering it would loop.
    if ip_eq(&inbound.local, &inbound.remote) {
        return InboundVerdict::Pass(Some(Counter::InboundBypassLocal));
    }
    let port = inbound.local_port;
    if port == PROXY_OUTBOUND_PORT
        || port == PROXY_INBOUND_PORT
        || port == PROXY_TUNNEL_PORT
        || port_listed(&pod.excluded_ports, port)
    {
        return InboundVerdict::Pass(Some(Counter::InboundBypassPort));
    }
    InboundVerdict::Steer
}

/// The loopback address an IPv4 connect is rewritten to (host order):
/// `127.1.0.0` to `127.128.255.255`, chosen by the socket's cookie.
///
/// Every redirected connection of a pod goes to port 15001. Spread over
/// 2^23 addresses, their 4-tuples are as independent as the original ones:
/// a client may use one local port towards several destinations, and a
/// port reused right after a reset never meets the previous connection's
/// note. The proxy's listener is bound to `0.0.0.0:15001` and receives them
/// all.
pub const fn redirect_v4(socket_cookie: u64) -> u32 {
    let spread = (socket_cookie & 0x7f_ffff) as u32;
    (127 << 24) + (1 << 16) + spread
}

const fn port_listed(ports: &[u16; MAX_EXCLUDED_PORTS], port: u16) -> bool {
    let mut i = 0;
    while i < MAX_EXCLUDED_PORTS {
        if ports[i] != 0 && ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

const fn ip_eq(a: &Ip, b: &Ip) -> bool {
    a.words[0] == b.words[0]
        && a.words[1] == b.words[1]
        && a.words[2] == b.words[2]
        && a.words[3] == b.words[3]
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn v4(a: u8, b: u8, c: u8, d: u8) -> Ip {
        Ip::v4(u32::from_be_bytes([a, b, c, d]))
    }

    fn v6(text: &str) -> Ip {
        // The host tests may use std to parse.
        extern crate std;
        let addr: std::net::Ipv6Addr = text.parse().unwrap();
        let octets = addr.octets();
        let mut words = [0u32; 4];
        for (i, word) in words.iter_mut().enumerate() {
            *word = u32::from_be_bytes([
                octets[4 * i],
                octets[4 * i + 1],
                octets[4 * i + 2],
                octets[4 * i + 3],
            ]);
        }
        Ip { words }
    }

    fn connect<'a>(pod: Option<&'a PodOutbound>, dst: Ip, dst_port: u16) -> Connect<'a> {
        Connect {
            pod,
            tcp: true,
            proxy_mark: false,
            dst,
            dst_port,
        }
    }

    #[test]
    fn captured_tcp_to_a_pod_is_redirected_v4_and_v6() {
        let pod = PodOutbound::default();
        for dst in [v4(10, 89, 1, 2), v4(128, 0, 0, 1), v6("fd00:89:1::2")] {
            assert_eq!(
                connect_verdict(&connect(Some(&pod), dst, 8080)),
                ConnectVerdict::Redirect,
                "{dst:?}"
            );
        }
    }

    #[test]
    fn bypass_reasons_in_order() {
        let pod = PodOutbound::default();
        let to_pod = connect(Some(&pod), v4(10, 89, 1, 2), 8080);
        let cases = [
            (
                Connect {
                    pod: None,
                    ..to_pod
                },
                Counter::BypassUncaptured,
            ),
            (
                Connect {
                    tcp: false,
                    ..to_pod
                },
                Counter::BypassNotTcp,
            ),
            (
                Connect {
                    proxy_mark: true,
                    ..to_pod
                },
                Counter::BypassProxyMark,
            ),
        ];
        for (connect, reason) in cases {
            assert_eq!(connect_verdict(&connect), ConnectVerdict::Bypass(reason));
        }
    }

    #[test]
    fn loopback_and_unspecified_stay_in_the_pod() {
        let pod = PodOutbound::default();
        for dst in [
            v4(127, 0, 0, 1),
            v4(127, 255, 255, 254),
            v4(0, 0, 0, 0),
            v6("::1"),
            v6("::"),
        ] {
            assert_eq!(
                connect_verdict(&connect(Some(&pod), dst, 80)),
                ConnectVerdict::Bypass(Counter::BypassLoopback),
                "{dst:?}"
            );
        }
        // `::2` and `126.x` are ordinary addresses.
        for dst in [v6("::2"), v4(126, 255, 255, 255)] {
            assert_eq!(
                connect_verdict(&connect(Some(&pod), dst, 80)),
                ConnectVerdict::Redirect
            );
        }
    }

    #[test]
    fn excluded_ports_and_cidrs_bypass() {
        let mut pod = PodOutbound::default();
        pod.excluded_ports[3] = 5432;
        pod.excluded_cidrs[1] = Cidr {
            ip: v4(169, 254, 0, 0),
            prefix_len: 96 + 16,
        };
        pod.excluded_cidrs[2] = Cidr {
            ip: v6("fd00:99::"),
            prefix_len: 32,
        };
        let verdict = |dst, port| connect_verdict(&connect(Some(&pod), dst, port));
        assert_eq!(
            verdict(v4(10, 0, 0, 1), 5432),
            ConnectVerdict::Bypass(Counter::BypassExcludedPort)
        );
        assert_eq!(verdict(v4(10, 0, 0, 1), 5433), ConnectVerdict::Redirect);
        // Port 0 marks an empty slot, not "port 0 excluded".
        assert_eq!(verdict(v4(10, 0, 0, 1), 0), ConnectVerdict::Redirect);
        assert_eq!(
            verdict(v4(169, 254, 169, 254), 80),
            ConnectVerdict::Bypass(Counter::BypassExcludedCidr)
        );
        assert_eq!(verdict(v4(169, 255, 0, 1), 80), ConnectVerdict::Redirect);
        assert_eq!(
            verdict(v6("fd00:99:ffff::1"), 80),
            ConnectVerdict::Bypass(Counter::BypassExcludedCidr)
        );
        assert_eq!(verdict(v6("fd00:9a::1"), 80), ConnectVerdict::Redirect);
    }

    #[test]
    fn cidr_matching_at_word_boundaries() {
        let all = Cidr {
            ip: Ip::default(),
            prefix_len: 128,
        };
        assert!(Ip::default().within(&all));
        assert!(!v6("::1").within(&all));
        let v4_any = Cidr {
            ip: v4(0, 0, 0, 0),
            prefix_len: 96,
        };
        assert!(v4(1, 2, 3, 4).within(&v4_any));
        assert!(!v6("fd00::1").within(&v4_any));
        let host = Cidr {
            ip: v4(10, 1, 2, 3),
            prefix_len: 128,
        };
        assert!(v4(10, 1, 2, 3).within(&host));
        assert!(!v4(10, 1, 2, 4).within(&host));
    }

    fn inbound<'a>(pod: Option<&'a PodInbound>, local_port: u16, remote: Ip) -> Inbound<'a> {
        Inbound {
            pod,
            tcp: true,
            local: v4(10, 89, 1, 2),
            local_port,
            remote,
        }
    }

    #[test]
    fn inbound_to_a_captured_pod_is_steered_except_proxy_and_excluded_ports() {
        let mut pod = PodInbound::default();
        pod.excluded_ports[0] = 9090;
        let client = v4(10, 89, 0, 2);
        let verdict = |port, remote| inbound_verdict(&inbound(Some(&pod), port, remote));
        assert_eq!(verdict(8080, client), InboundVerdict::Steer);
        for port in [
            PROXY_OUTBOUND_PORT,
            PROXY_INBOUND_PORT,
            PROXY_TUNNEL_PORT,
            9090,
        ] {
            assert_eq!(
                verdict(port, client),
                InboundVerdict::Pass(Some(Counter::InboundBypassPort))
            );
        }
        assert_eq!(
            verdict(8080, v4(10, 89, 1, 2)),
            InboundVerdict::Pass(Some(Counter::InboundBypassLocal))
        );
        assert_eq!(
            inbound_verdict(&inbound(None, 8080, client)),
            InboundVerdict::Pass(None)
        );
        assert_eq!(
            inbound_verdict(&Inbound {
                tcp: false,
                ..inbound(Some(&pod), 8080, client)
            }),
            InboundVerdict::Pass(None)
        );
    }

    #[test]
    fn redirect_addresses_stay_in_loopback_and_follow_the_cookie() {
        let first = redirect_v4(0);
        assert_eq!(first.to_be_bytes(), [127, 1, 0, 0]);
        assert_eq!(redirect_v4(0x7f_ffff).to_be_bytes(), [127, 128, 255, 255]);
        // Consecutive sockets get different addresses; the space wraps.
        assert_ne!(redirect_v4(41), redirect_v4(42));
        assert_eq!(redirect_v4(0x80_0000), first);
        for cookie in [0, 1, 0x12_3456, u64::MAX] {
            let address = Ip::v4(redirect_v4(cookie));
            assert!(address.is_local(), "{cookie}: {address:?}");
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
