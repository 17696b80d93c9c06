//! Traffic capture: loads the eBPF programs, attaches them to the cgroup that
//! holds this node's pods, and tells the kernel which pods' network
//! namespaces are captured. The kernel side is `mesh-ebpf`; the map layout is
//! shared through `mesh_common::capture`.

mod cgroup;
pub mod logs;
pub mod netns;

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{CgroupAttachMode, CgroupSockAddr},
    util::nr_cpus,
};
use aya_log::EbpfLogger;
use mesh_common::capture::{
    Counter, MAP_CAPTURED_NETNS, MAP_COUNTERS, MAP_NETNS_CONNECTS, NetnsCookie, NetnsState,
    PROG_CONNECT4,
};
use serde::Serialize;

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

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
    #[error("loading the eBPF object (is this process root, with CAP_BPF and CAP_NET_ADMIN?)")]
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
    #[error("eBPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("reading the cookie of network namespace {path}")]
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

/// A pod whose network namespace is captured.
#[derive(Clone, Debug, Serialize)]
pub struct CapturedPod {
    /// `namespace/name`.
    pub name: String,
    /// The path of its network namespace when it was captured.
    pub netns: PathBuf,
    /// The kernel's cookie for that namespace.
    pub cookie: NetnsCookie,
}

/// A captured pod and what the kernel counted for it.
#[derive(Clone, Debug, Serialize)]
pub struct PodConnects {
    #[serde(flatten)]
    pub pod: CapturedPod,
    /// `connect()` calls the program saw from the pod's namespace.
    pub connects: u64,
}

/// The capture programs, loaded and attached to one cgroup.
///
/// Dropping it detaches the programs and frees the maps.
pub struct Capture {
    cgroup: PathBuf,
    captured_netns: HashMap<MapData, NetnsCookie, NetnsState>,
    netns_connects: PerCpuHashMap<MapData, NetnsCookie, u64>,
    counters: PerCpuArray<MapData, u64>,
    pods: BTreeMap<String, CapturedPod>,
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
    nr_cpus: usize,
    // Owns the programs and their links; declared last so the maps above are
    // closed before the programs are detached.
    _ebpf: Ebpf,
}

impl Capture {
    /// Loads the programs and attaches them to `cgroup`, which must be a
    /// cgroup v2 directory below (never equal to) the hierarchy's root.
    pub fn attach(cgroup: &Path) -> Result<Self, CaptureError> {
        let cgroup = cgroup::check_attachable(cgroup)?;
        let nr_cpus = nr_cpus().map_err(|(_, e)| CaptureError::Cpus(e))?;
        let mut ebpf = EbpfLoader::new()
            .verifier_log_level(VerifierLogLevel::VERBOSE | VerifierLogLevel::STATS)
            .load(EBPF_OBJECT)
            .map_err(CaptureError::Load)?;
        // A missing log map only costs the kernel-side logs.
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(error) => {
                tracing::warn!(%error, "eBPF logs unavailable");
                None
            }
        };

        let program: &mut CgroupSockAddr = ebpf
            .program_mut(PROG_CONNECT4)
            .ok_or(CaptureError::Missing {
                what: "program",
                name: PROG_CONNECT4,
            })?
            .try_into()
            .map_err(|source| CaptureError::Program {
                name: PROG_CONNECT4,
                source,
            })?;
        program.load().map_err(|source| CaptureError::Program {
            name: PROG_CONNECT4,
            source,
        })?;
        let cgroup_dir = File::open(&cgroup).map_err(|source| CaptureError::OpenCgroup {
            path: cgroup.clone(),
            source,
        })?;
        // `AllowMultiple` is refused with EINVAL by the kernels we run on.
        program
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(|source| CaptureError::Program {
                name: PROG_CONNECT4,
                source,
            })?;

        let captured_netns = HashMap::try_from(take_map(&mut ebpf, MAP_CAPTURED_NETNS)?)
            .map_err(map_error(MAP_CAPTURED_NETNS))?;
        let netns_connects = PerCpuHashMap::try_from(take_map(&mut ebpf, MAP_NETNS_CONNECTS)?)
            .map_err(map_error(MAP_NETNS_CONNECTS))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, MAP_COUNTERS)?)
            .map_err(map_error(MAP_COUNTERS))?;
        tracing::info!(cgroup = %cgroup.display(), program = PROG_CONNECT4, "capture attached");
        Ok(Self {
            cgroup,
            captured_netns,
            netns_connects,
            counters,
            pods: BTreeMap::new(),
            logger,
            nr_cpus,
            _ebpf: ebpf,
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

    /// Captures the pod whose network namespace is at `netns`.
    pub fn capture_pod(&mut self, name: &str, netns: &Path) -> Result<NetnsCookie, CaptureError> {
        if self.pods.contains_key(name) {
            return Err(CaptureError::AlreadyCaptured(name.to_owned()));
        }
        let cookie = netns::cookie(netns).map_err(|source| CaptureError::Netns {
            path: netns.to_owned(),
            source,
        })?;
        // The counter slot exists before the namespace is marked captured, so
        // the program never meets a captured namespace without one.
        let zeros = PerCpuValues::try_from(vec![0u64; self.nr_cpus]).map_err(CaptureError::Cpus)?;
        self.netns_connects
            .insert(cookie, zeros, 0)
            .map_err(map_error(MAP_NETNS_CONNECTS))?;
        self.captured_netns
            .insert(cookie, NetnsState::default(), 0)
            .map_err(map_error(MAP_CAPTURED_NETNS))?;
        tracing::info!(pod = name, cookie, netns = %netns.display(), "pod captured");
        self.pods.insert(
            name.to_owned(),
            CapturedPod {
                name: name.to_owned(),
                netns: netns.to_owned(),
                cookie,
            },
        );
        Ok(cookie)
    }

    /// Stops capturing a pod and forgets its counts.
    pub fn release_pod(&mut self, name: &str) -> Result<(), CaptureError> {
        let pod = self
            .pods
            .remove(name)
            .ok_or_else(|| CaptureError::NotCaptured(name.to_owned()))?;
        self.captured_netns
            .remove(&pod.cookie)
            .map_err(map_error(MAP_CAPTURED_NETNS))?;
        self.netns_connects
            .remove(&pod.cookie)
            .map_err(map_error(MAP_NETNS_CONNECTS))?;
        tracing::info!(pod = name, cookie = pod.cookie, "pod released");
        Ok(())
    }

    /// Connects counted for the namespace `cookie`, summed over CPUs; zero
    /// for a namespace that is not captured.
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
            .field("pods", &self.pods)
            .finish_non_exhaustive()
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name)
        .ok_or(CaptureError::Missing { what: "map", name })
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source }
}
