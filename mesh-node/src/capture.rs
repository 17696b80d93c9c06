//! Traffic capture: loads the eBPF programs, attaches them to the cgroup that
//! holds this node's pods, and registers each captured pod with the kernel —
//! its namespace (outbound redirect), its addresses and inbound listener
//! (`sk_lookup` steering). The kernel side is `mesh-ebpf`; the map layout is
//! shared through `mesh_common::capture`.
//!
//! # Pinning
//!
//! With a pin directory (on bpffs), maps and links outlive the process:
//! `<dir>/maps/<MAP>`, `<dir>/links/{connect4,connect6,sock_ops}` and
//! `<dir>/pods/<netns cookie>` (each pod's `sk_lookup` link). A stopped
//! `mesh-node` therefore leaves its pods captured — their connects meet no
//! listener and are refused — and a restarted one adopts the same maps and
//! links instead of detaching anything. [`uninstall`] removes it all.
//! Without a pin directory everything is detached when [`Capture`] drops.

mod cgroup;
pub mod logs;
pub mod netns;

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::RawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
        links::{FdLink, PinnedLink},
        sk_lookup::SkLookupLinkId,
    },
    util::nr_cpus,
};
use aya_log::EbpfLogger;
use mesh_common::capture::{
    Counter, Ip, MAP_CAPTURED_NETNS, MAP_COUNTERS, MAP_INBOUND_LISTENERS, MAP_NETNS_CONNECTS,
    MAP_ORIGINAL_DST, MAP_PENDING_DST, MAP_POD_INBOUND, MAP_SETTINGS, NetnsCookie, OriginalDst,
    OriginalDstKey, PROG_CONNECT4, PROG_CONNECT6, PROG_SK_LOOKUP, PROG_SOCK_OPS, PodInbound,
    PodOutbound, Setting,
};
use serde::Serialize;

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

/// Every map, pinned by name when pinning is on.
const MAPS: [&str; 8] = [
    MAP_CAPTURED_NETNS,
    MAP_NETNS_CONNECTS,
    MAP_PENDING_DST,
    MAP_ORIGINAL_DST,
    MAP_POD_INBOUND,
    MAP_INBOUND_LISTENERS,
    MAP_COUNTERS,
    MAP_SETTINGS,
];

/// `BPF_FS_MAGIC` from statfs(2).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Why capture could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    #[error("opening cgroup {path}")]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pin directory {path}: {reason}")]
    PinDir { path: PathBuf, reason: String },
    #[error(
        "loading the eBPF object (is this process root, with CAP_SYS_ADMIN and CAP_NET_ADMIN?)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("eBPF object has no {what} named {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("eBPF program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning or adopting the link of {name} at {path}")]
    Link {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("eBPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("network namespace {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("counting CPUs")]
    Cpus(#[source] io::Error),
    #[error("pod {0} is already captured")]
    AlreadyCaptured(String),
    #[error("pod {0} is not captured")]
    NotCaptured(String),
}

/// Where capture attaches, and whether it outlives the process.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// The cgroup v2 directory holding the node's pods.
    pub cgroup: PathBuf,
    /// A directory on bpffs to pin maps and links under; `None` detaches
    /// everything when the [`Capture`] drops.
    pub pin_dir: Option<PathBuf>,
}

/// What the node tells the kernel about one captured pod.
#[derive(Debug)]
pub struct PodRegistration<'a> {
    /// `namespace/name`.
    pub name: &'a str,
    /// The path of its network namespace.
    pub netns: &'a Path,
    /// The pod's addresses: inbound connections to them are steered.
    pub addresses: &'a [IpAddr],
    /// The proxy's inbound listener inside the pod.
    pub inbound_listener: RawFd,
    pub outbound: PodOutbound,
    pub inbound: PodInbound,
}

/// A pod whose network namespace is captured.
#[derive(Clone, Debug, Serialize)]
pub struct CapturedPod {
    /// `namespace/name`.
    pub name: String,
    /// The path of its network namespace when it was captured.
    pub netns: PathBuf,
    /// The kernel's cookie for that namespace.
    pub cookie: NetnsCookie,
    /// The addresses whose inbound traffic is steered to the proxy.
    pub addresses: Vec<IpAddr>,
}

/// A captured pod and what the kernel counted for it.
#[derive(Clone, Debug, Serialize)]
pub struct PodConnects {
    #[serde(flatten)]
    pub pod: CapturedPod,
    /// Outbound connects redirected from the pod's namespace.
    pub connects: u64,
}

/// The original destinations of redirected connections, taken by the proxy
/// as it accepts them. Shared with the proxy's accept loops.
pub struct OriginalDsts {
    map: Mutex<HashMap<MapData, OriginalDstKey, OriginalDst>>,
}

impl std::fmt::Debug for OriginalDsts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginalDsts").finish_non_exhaustive()
    }
}

impl OriginalDsts {
    /// Takes the destination of the connection an outbound listener
    /// accepted in the namespace `netns`: `local` is the accepted socket's
    /// own address (where the connect was rewritten to), `client` its peer.
    /// Each is taken once.
    pub fn take(
        &self,
        netns: NetnsCookie,
        local: SocketAddr,
        client: SocketAddr,
    ) -> Option<SocketAddr> {
        let key = OriginalDstKey {
            netns,
            listener: ip_key(local.ip().to_canonical()),
            port: client.port(),
            _pad: [0; 6],
        };
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let dst = map.get(&key, 0).ok()?;
        if let Err(error) = map.remove(&key) {
            tracing::warn!(%error, "removing a taken original destination");
        }
        Some(SocketAddr::new(ip_addr(&dst.ip), dst.port))
    }
}

/// The capture programs, loaded and attached to one cgroup.
pub struct Capture {
    cgroup: PathBuf,
    pin_dir: Option<PathBuf>,
    captured_netns: HashMap<MapData, NetnsCookie, PodOutbound>,
    netns_connects: PerCpuHashMap<MapData, NetnsCookie, u64>,
    pod_inbound: HashMap<MapData, Ip, PodInbound>,
    listeners: SockHash<MapData, Ip>,
    counters: PerCpuArray<MapData, u64>,
    settings: aya::maps::Array<MapData, u32>,
    original_dsts: std::sync::Arc<OriginalDsts>,
    pods: BTreeMap<String, CapturedPod>,
    /// `sk_lookup` links this value owns (not pinned), by pod.
    sk_lookup_links: BTreeMap<String, SkLookupLinkId>,
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
    nr_cpus: usize,
    /// The cgroup links when pinned (dropping them leaves them attached).
    _pinned: Vec<PinnedLink>,
    /// The cgroup links when not pinned (dropping them detaches).
    _owned: Vec<FdLink>,
    // Owns the programs and their unpinned links; declared last so the maps
    // above are closed before the programs are detached.
    ebpf: Ebpf,
}

impl Capture {
    /// Loads the programs and attaches them to `config.cgroup`, which must be
    /// a cgroup v2 directory below (never equal to) the hierarchy's root. With
    /// a pin directory that already holds this node's capture, adopts it.
    pub fn attach(config: &CaptureConfig) -> Result<Self, CaptureError> {
        let cgroup = cgroup::check_attachable(&config.cgroup)?;
        if let Some(dir) = &config.pin_dir {
            prepare_pin_dir(dir)?;
        }
        let nr_cpus = nr_cpus().map_err(|(_, e)| CaptureError::Cpus(e))?;
        let map_paths: Vec<(&str, PathBuf)> = match &config.pin_dir {
            Some(dir) => MAPS
                .iter()
                .map(|name| (*name, dir.join("maps").join(name)))
                .collect(),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        loader.verifier_log_level(VerifierLogLevel::VERBOSE | VerifierLogLevel::STATS);
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(CaptureError::Load)?;
        // A missing log map only costs the kernel-side logs.
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(error) => {
                tracing::warn!(%error, "eBPF logs unavailable");
                None
            }
        };
        let cgroup_dir = File::open(&cgroup).map_err(|source| CaptureError::OpenCgroup {
            path: cgroup.clone(),
            source,
        })?;
        let links = config.pin_dir.as_ref().map(|dir| dir.join("links"));
        let mut pinned = Vec::new();
        let mut owned = Vec::new();
        for (name, link) in [
            (PROG_CONNECT4, "connect4"),
            (PROG_CONNECT6, "connect6"),
            (PROG_SOCK_OPS, "sock_ops"),
        ] {
            let pin = links.as_ref().map(|dir| dir.join(link));
            if let Some(path) = &pin
                && path.exists()
            {
                // Still attached from a previous run: adopt it as it is.
                let adopted = PinnedLink::from_pin(path).map_err(|e| CaptureError::Link {
                    name,
                    path: path.clone(),
                    source: io::Error::other(e),
                })?;
                pinned.push(adopted);
                continue;
            }
            let fd_link = attach_to_cgroup(&mut ebpf, name, &cgroup_dir)?;
            if let Some(path) = pin {
                let link = fd_link.pin(&path).map_err(|e| CaptureError::Link {
                    name,
                    path: path.clone(),
                    source: io::Error::other(e),
                })?;
                pinned.push(link);
            } else {
                // Unpinned: the link lives as long as this value.
                owned.push(fd_link);
            }
        }
        let program: &mut SkLookup = program(&mut ebpf, PROG_SK_LOOKUP)?;
        program.load().map_err(|source| CaptureError::Program {
            name: PROG_SK_LOOKUP,
            source,
        })?;

        let captured_netns = HashMap::try_from(take_map(&mut ebpf, MAP_CAPTURED_NETNS)?)
            .map_err(map_error(MAP_CAPTURED_NETNS))?;
        let netns_connects = PerCpuHashMap::try_from(take_map(&mut ebpf, MAP_NETNS_CONNECTS)?)
            .map_err(map_error(MAP_NETNS_CONNECTS))?;
        let pod_inbound = HashMap::try_from(take_map(&mut ebpf, MAP_POD_INBOUND)?)
            .map_err(map_error(MAP_POD_INBOUND))?;
        let listeners = SockHash::try_from(take_map(&mut ebpf, MAP_INBOUND_LISTENERS)?)
            .map_err(map_error(MAP_INBOUND_LISTENERS))?;
        let original = HashMap::try_from(take_map(&mut ebpf, MAP_ORIGINAL_DST)?)
            .map_err(map_error(MAP_ORIGINAL_DST))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, MAP_COUNTERS)?)
            .map_err(map_error(MAP_COUNTERS))?;
        let settings = aya::maps::Array::try_from(take_map(&mut ebpf, MAP_SETTINGS)?)
            .map_err(map_error(MAP_SETTINGS))?;
        tracing::info!(
            cgroup = %cgroup.display(),
            pinned = ?config.pin_dir,
            adopted = pinned.len(),
            "capture attached"
        );
        Ok(Self {
            cgroup,
            pin_dir: config.pin_dir.clone(),
            captured_netns,
            netns_connects,
            pod_inbound,
            listeners,
            counters,
            settings,
            original_dsts: std::sync::Arc::new(OriginalDsts {
                map: Mutex::new(original),
            }),
            pods: BTreeMap::new(),
            sk_lookup_links: BTreeMap::new(),
            logger,
            nr_cpus,
            _pinned: pinned,
            _owned: owned,
            ebpf,
        })
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The reader of the programs' logs, to be drained by the caller (see
    /// `aya_log::EbpfLogger::flush`). Keep it alive as long as the capture.
    pub fn take_logger(&mut self) -> Option<EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// Switches the programs' debug records on or off, at once, for every
    /// captured pod.
    pub fn set_debug_logs(&mut self, on: bool) -> Result<(), CaptureError> {
        self.settings
            .set(Setting::DebugLogs as u32, u32::from(on), 0)
            .map_err(map_error(MAP_SETTINGS))
    }

    /// Whether the programs' debug records are on.
    pub fn debug_logs(&self) -> Result<bool, CaptureError> {
        let value = self
            .settings
            .get(&(Setting::DebugLogs as u32), 0)
            .map_err(map_error(MAP_SETTINGS))?;
        Ok(value != 0)
    }

    /// Where the proxy finds redirected connections' destinations.
    pub fn original_dsts(&self) -> std::sync::Arc<OriginalDsts> {
        self.original_dsts.clone()
    }

    /// Captures a pod. Its listeners must already be open: from the moment
    /// this returns its outbound connects go to `127.0.0.1:15001`/`[::1]:15001`
    /// in its namespace and its inbound ones to `inbound_listener`.
    ///
    /// A pod a previous run pinned is adopted: its entries are overwritten
    /// and its `sk_lookup` link kept.
    pub fn capture_pod(&mut self, pod: &PodRegistration<'_>) -> Result<NetnsCookie, CaptureError> {
        if self.pods.contains_key(pod.name) {
            return Err(CaptureError::AlreadyCaptured(pod.name.to_owned()));
        }
        let netns_error = |source| CaptureError::Netns {
            path: pod.netns.to_owned(),
            source,
        };
        let cookie = netns::cookie(pod.netns).map_err(netns_error)?;
        // Inbound first: the listener and addresses, then the steering.
        for address in pod.addresses {
            let key = ip_key(*address);
            self.listeners
                .insert(key, pod.inbound_listener, 0)
                .map_err(map_error(MAP_INBOUND_LISTENERS))?;
            self.pod_inbound
                .insert(key, pod.inbound, 0)
                .map_err(map_error(MAP_POD_INBOUND))?;
        }
        let sk_lookup = self.attach_sk_lookup(pod.netns, cookie)?;
        // Outbound last. The counter slot exists before the namespace is
        // marked captured, so the program never meets a captured namespace
        // without one (an adopted slot keeps its count).
        if self.netns_connects.get(&cookie, 0).is_err() {
            let zeros =
                PerCpuValues::try_from(vec![0u64; self.nr_cpus]).map_err(CaptureError::Cpus)?;
            self.netns_connects
                .insert(cookie, zeros, 0)
                .map_err(map_error(MAP_NETNS_CONNECTS))?;
        }
        self.captured_netns
            .insert(cookie, pod.outbound, 0)
            .map_err(map_error(MAP_CAPTURED_NETNS))?;
        tracing::info!(
            pod = pod.name,
            cookie,
            netns = %pod.netns.display(),
            addresses = ?pod.addresses,
            "pod captured"
        );
        self.pods.insert(
            pod.name.to_owned(),
            CapturedPod {
                name: pod.name.to_owned(),
                netns: pod.netns.to_owned(),
                cookie,
                addresses: pod.addresses.to_vec(),
            },
        );
        if let Some(id) = sk_lookup {
            self.sk_lookup_links.insert(pod.name.to_owned(), id);
        }
        Ok(cookie)
    }

    /// Changes a captured pod's exclusions in place: its traffic is never
    /// uncaptured in between.
    pub fn update_pod(
        &mut self,
        name: &str,
        outbound: PodOutbound,
        inbound: PodInbound,
    ) -> Result<(), CaptureError> {
        let pod = self
            .pods
            .get(name)
            .ok_or_else(|| CaptureError::NotCaptured(name.to_owned()))?;
        for address in &pod.addresses {
            self.pod_inbound
                .insert(ip_key(*address), inbound, 0)
                .map_err(map_error(MAP_POD_INBOUND))?;
        }
        self.captured_netns
            .insert(pod.cookie, outbound, 0)
            .map_err(map_error(MAP_CAPTURED_NETNS))?;
        tracing::info!(pod = name, "pod's capture exclusions updated");
        Ok(())
    }

    /// Attaches `sk_lookup` to the pod's namespace, or adopts the link a
    /// previous run pinned. Returns the link id when this value owns it.
    fn attach_sk_lookup(
        &mut self,
        netns: &Path,
        cookie: NetnsCookie,
    ) -> Result<Option<SkLookupLinkId>, CaptureError> {
        let pin = self.pod_link_path(cookie);
        if let Some(path) = &pin
            && path.exists()
        {
            return Ok(None);
        }
        let file = File::open(netns).map_err(|source| CaptureError::Netns {
            path: netns.to_owned(),
            source,
        })?;
        let program: &mut SkLookup = program(&mut self.ebpf, PROG_SK_LOOKUP)?;
        let id = program
            .attach(&file)
            .map_err(|source| CaptureError::Program {
                name: PROG_SK_LOOKUP,
                source,
            })?;
        let Some(path) = pin else {
            return Ok(Some(id));
        };
        let link = program
            .take_link(id)
            .map_err(|source| CaptureError::Program {
                name: PROG_SK_LOOKUP,
                source,
            })?;
        FdLink::from(link)
            .pin(&path)
            .map_err(|e| CaptureError::Link {
                name: PROG_SK_LOOKUP,
                path,
                source: io::Error::other(e),
            })?;
        Ok(None)
    }

    fn pod_link_path(&self, cookie: NetnsCookie) -> Option<PathBuf> {
        self.pin_dir
            .as_ref()
            .map(|dir| dir.join("pods").join(cookie.to_string()))
    }

    /// Stops capturing a pod: outbound first, then inbound steering, then
    /// its counts. Its listeners may close afterwards.
    pub fn release_pod(&mut self, name: &str) -> Result<(), CaptureError> {
        let pod = self
            .pods
            .remove(name)
            .ok_or_else(|| CaptureError::NotCaptured(name.to_owned()))?;
        self.forget(pod.cookie, &pod.addresses)?;
        if let Some(id) = self.sk_lookup_links.remove(name) {
            let program: &mut SkLookup = program(&mut self.ebpf, PROG_SK_LOOKUP)?;
            program.detach(id).map_err(|source| CaptureError::Program {
                name: PROG_SK_LOOKUP,
                source,
            })?;
        }
        tracing::info!(pod = name, cookie = pod.cookie, "pod released");
        Ok(())
    }

    /// Removes a namespace's and its addresses' entries and pinned link.
    fn forget(&mut self, cookie: NetnsCookie, addresses: &[IpAddr]) -> Result<(), CaptureError> {
        ignore_missing(self.captured_netns.remove(&cookie))
            .map_err(map_error(MAP_CAPTURED_NETNS))?;
        if let Some(path) = self.pod_link_path(cookie)
            && let Err(error) = std::fs::remove_file(&path)
            && error.kind() != io::ErrorKind::NotFound
        {
            return Err(CaptureError::Link {
                name: PROG_SK_LOOKUP,
                path,
                source: error,
            });
        }
        self.forget_addresses(addresses.iter().map(|address| ip_key(*address)))?;
        ignore_missing(self.netns_connects.remove(&cookie))
            .map_err(map_error(MAP_NETNS_CONNECTS))?;
        Ok(())
    }

    /// Releases whatever a previous run pinned for pods this run has not
    /// captured (pods deleted while the node was down). Call once the
    /// node knows every pod it should capture. Returns how many it released.
    pub fn prune_unowned(&mut self) -> Result<usize, CaptureError> {
        let owned: std::collections::HashSet<NetnsCookie> =
            self.pods.values().map(|p| p.cookie).collect();
        let owned_ips: std::collections::HashSet<Ip> = self
            .pods
            .values()
            .flat_map(|p| p.addresses.iter().map(|a| ip_key(*a)))
            .collect();
        let stale: Vec<NetnsCookie> = self
            .captured_netns
            .keys()
            .filter_map(Result::ok)
            .filter(|cookie| !owned.contains(cookie))
            .collect();
        let stale_ips: Vec<Ip> = self
            .pod_inbound
            .keys()
            .filter_map(Result::ok)
            .filter(|ip| !owned_ips.contains(ip))
            .collect();
        for cookie in &stale {
            self.forget(*cookie, &[])?;
        }
        self.forget_addresses(stale_ips)?;
        // Links pinned for namespaces no longer captured.
        if let Some(dir) = &self.pin_dir
            && let Ok(entries) = std::fs::read_dir(dir.join("pods"))
        {
            for entry in entries.flatten() {
                let cookie = entry.file_name().to_string_lossy().parse::<u64>().ok();
                if cookie.is_none_or(|c| !owned.contains(&c)) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        if !stale.is_empty() {
            tracing::info!(
                released = stale.len(),
                "released pods left by a previous run"
            );
        }
        Ok(stale.len())
    }

    /// Removes the inbound entries (settings and listener) of these
    /// address keys.
    fn forget_addresses(&mut self, keys: impl IntoIterator<Item = Ip>) -> Result<(), CaptureError> {
        for key in keys {
            ignore_missing(self.pod_inbound.remove(&key)).map_err(map_error(MAP_POD_INBOUND))?;
            ignore_missing(self.listeners.remove(&key))
                .map_err(map_error(MAP_INBOUND_LISTENERS))?;
        }
        Ok(())
    }

    /// Connects redirected from the namespace `cookie`, summed over CPUs;
    /// zero for a namespace that is not captured.
    pub fn connects(&self, cookie: NetnsCookie) -> Result<u64, CaptureError> {
        match self.netns_connects.get(&cookie, 0) {
            Ok(values) => Ok(values.iter().sum()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(0),
            Err(source) => Err(CaptureError::Map {
                name: MAP_NETNS_CONNECTS,
                source,
            }),
        }
    }

    /// Every captured pod with its connect count.
    pub fn pods(&self) -> Result<Vec<PodConnects>, CaptureError> {
        self.pods
            .values()
            .map(|pod| {
                Ok(PodConnects {
                    pod: pod.clone(),
                    connects: self.connects(pod.cookie)?,
                })
            })
            .collect()
    }

    /// The programs' counters, summed over CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, CaptureError> {
        Counter::ALL
            .iter()
            .map(|&counter| {
                let values = self
                    .counters
                    .get(&(counter as u32), 0)
                    .map_err(map_error(MAP_COUNTERS))?;
                Ok((counter, values.iter().sum()))
            })
            .collect()
    }
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("cgroup", &self.cgroup)
            .field("pin_dir", &self.pin_dir)
            .field("pods", &self.pods)
            .finish_non_exhaustive()
    }
}

/// Loads every program into the kernel without attaching anything, so the
/// verifier judges them on this kernel; returns their names. A rejected
/// program's error carries the verifier's log, ending with its reason.
pub fn check_programs() -> Result<Vec<&'static str>, CaptureError> {
    let mut ebpf = EbpfLoader::new()
        .verifier_log_level(VerifierLogLevel::VERBOSE | VerifierLogLevel::STATS)
        .load(EBPF_OBJECT)
        .map_err(CaptureError::Load)?;
    let load_error = |name| move |source| CaptureError::Program { name, source };
    for name in [PROG_CONNECT4, PROG_CONNECT6] {
        let program: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        program.load().map_err(load_error(name))?;
    }
    let sock_ops: &mut SockOps = program(&mut ebpf, PROG_SOCK_OPS)?;
    sock_ops.load().map_err(load_error(PROG_SOCK_OPS))?;
    let sk_lookup: &mut SkLookup = program(&mut ebpf, PROG_SK_LOOKUP)?;
    sk_lookup.load().map_err(load_error(PROG_SK_LOOKUP))?;
    Ok(vec![
        PROG_CONNECT4,
        PROG_CONNECT6,
        PROG_SOCK_OPS,
        PROG_SK_LOOKUP,
    ])
}

/// Detaches everything a pinned capture left under `pin_dir` by removing
/// the pins (the kernel detaches a link when its last reference goes).
/// Pods captured there are no longer redirected, nor refused.
pub fn uninstall(pin_dir: &Path) -> io::Result<bool> {
    match std::fs::remove_dir_all(pin_dir) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// Where bpffs is conventionally mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at `path` unless one is already there (as Cilium's agent
/// does; a DaemonSet usually mounts the host's instead).
pub fn ensure_bpffs(path: &Path) -> io::Result<()> {
    if is_bpffs(path)? {
        return Ok(());
    }
    std::fs::create_dir_all(path)?;
    let target =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: every argument is a valid NUL-terminated string or null.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    tracing::info!(path = %path.display(), "mounted bpffs");
    Ok(())
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let path =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: `statfs` only writes into `stat`, which is large enough.
    #[allow(unsafe_code)]
    let stat = unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        if libc::statfs(path.as_ptr(), &mut stat) != 0 {
            return Err(io::Error::last_os_error());
        }
        stat
    };
    Ok(stat.f_type == BPF_FS_MAGIC)
}

/// Creates `<dir>/{maps,links,pods}`, refusing a directory not on bpffs.
fn prepare_pin_dir(dir: &Path) -> Result<(), CaptureError> {
    let refuse = |reason: String| CaptureError::PinDir {
        path: dir.to_owned(),
        reason,
    };
    for sub in ["maps", "links", "pods"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| refuse(e.to_string()))?;
    }
    if !is_bpffs(dir).map_err(|e| refuse(e.to_string()))? {
        return Err(refuse(
            "not on a BPF filesystem; mount one (mount -t bpf bpf /sys/fs/bpf) or choose a directory below it".into(),
        ));
    }
    Ok(())
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, CaptureError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(CaptureError::Missing {
            what: "program",
            name,
        })?
        .try_into()
        .map_err(|source| CaptureError::Program { name, source })
}

/// Loads and attaches a cgroup program, returning its link.
fn attach_to_cgroup(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
) -> Result<FdLink, CaptureError> {
    let error = |source| CaptureError::Program { name, source };
    let invalid = |e: aya::programs::links::LinkError| CaptureError::Program {
        name,
        source: aya::programs::ProgramError::IOError(io::Error::other(e)),
    };
    // `AllowMultiple` is refused with EINVAL by the kernels we run on.
    if name == PROG_SOCK_OPS {
        let program: &mut SockOps = program(ebpf, name)?;
        program.load().map_err(error)?;
        let id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(error)?;
        FdLink::try_from(program.take_link(id).map_err(error)?).map_err(invalid)
    } else {
        let program: &mut CgroupSockAddr = program(ebpf, name)?;
        program.load().map_err(error)?;
        let id = program
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(error)?;
        FdLink::try_from(program.take_link(id).map_err(error)?).map_err(invalid)
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name)
        .ok_or(CaptureError::Missing { what: "map", name })
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source }
}

fn ignore_missing(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// The map key for an address (IPv4 mapped into IPv6).
pub fn ip_key(address: IpAddr) -> Ip {
    let v6 = match address {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let mut words = [0u32; 4];
    for (i, word) in words.iter_mut().enumerate() {
        *word = u32::from_be_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
    }
    Ip { words }
}

/// The address a map key stands for.
pub fn ip_addr(ip: &Ip) -> IpAddr {
    let mut octets = [0u8; 16];
    for (i, word) in ip.words.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&word.to_be_bytes());
    }
    let v6 = std::net::Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_keys_round_trip_and_map_ipv4() {
        for text in ["10.89.1.2", "fd00:89:1::2", "::1", "0.0.0.0"] {
            let address: IpAddr = text.parse().unwrap();
            assert_eq!(ip_addr(&ip_key(address)), address);
        }
        let key = ip_key("10.89.1.2".parse().unwrap());
        assert!(key.is_v4());
        assert_eq!(key.words[3], u32::from_be_bytes([10, 89, 1, 2]));
    }
}
