//! Where a pushed workload's network namespace is. Locally (the cluster
//! harness, `cargo xtask cluster`) a path template names it. On
//! Kubernetes it is found through the pod's cgroup, which the kubelet
//! names after the pod's UID under the cgroup that holds the pods:
//!
//! - systemd driver: `kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope`
//! - cgroupfs driver: `kubepods/burstable/pod<uid>/<container id>`
//!
//! Every container of a pod shares its network namespace, so any process
//! in the pod's cgroup leads to it: `/proc/<pid>/ns/net`, read with the
//! host's PID namespace (the DaemonSet's `hostPID`). The lowest PID is
//! taken (the sandbox's pause process, which lives as long as the pod), and
//! kept while that process is alive and still the pod's, so the path — what
//! the proxy compares to see whether a pod moved — stays the same.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use super::NetnsTemplate;

/// How deep below the pods' cgroup a pod's cgroup may be (QoS class slice,
/// then the pod).
const POD_DEPTH: usize = 3;

/// What `--pod-netns` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodNetnsSetting {
    Template(NetnsTemplate),
    /// `cgroup`: by pod UID under `--cgroup`.
    Cgroup,
}

impl PodNetnsSetting {
    pub fn parse(value: &str) -> Result<Self, String> {
        if value == "cgroup" {
            return Ok(Self::Cgroup);
        }
        NetnsTemplate::parse(value)
            .map(Self::Template)
            .map_err(|why| format!("{why}, or be `cgroup` (find pods by UID under --cgroup)"))
    }
}

/// Where pushed workloads' network namespaces are.
#[derive(Clone, Debug)]
pub enum PodNetns {
    Template(NetnsTemplate),
    Cgroup(Arc<CgroupNetns>),
}

impl PodNetns {
    /// `setting`, with `pods_cgroup` (the `--cgroup` directory) for
    /// `cgroup`.
    pub fn new(setting: PodNetnsSetting, pods_cgroup: &Path) -> Self {
        match setting {
            PodNetnsSetting::Template(template) => Self::Template(template),
            PodNetnsSetting::Cgroup => Self::Cgroup(Arc::new(CgroupNetns::new(pods_cgroup))),
        }
    }

    /// The network namespace of workload `namespace/name` with pod UID
    /// `pod_uid`, or why it cannot be found (yet).
    pub fn locate(
        &self,
        namespace: &str,
        name: &str,
        pod_uid: Option<&str>,
    ) -> Result<PathBuf, String> {
        match self {
            Self::Template(template) => Ok(template.path(namespace, name)),
            Self::Cgroup(cgroups) => {
                let uid = pod_uid.ok_or_else(|| {
                    "the workload has no pod_uid, which --pod-netns cgroup finds pods by".to_owned()
                })?;
                cgroups.locate(uid)
            }
        }
    }
}

/// Finds pods' network namespaces through their cgroups.
#[derive(Debug)]
pub struct CgroupNetns {
    pods: PathBuf,
    /// The node's own network namespace: init's, `/proc/1/ns/net` with the
    /// host's PIDs.
    host: PathBuf,
    /// Pod UID → the namespace path last found.
    found: Mutex<HashMap<String, PathBuf>>,
}

impl CgroupNetns {
    pub fn new(pods: &Path) -> Self {
        Self::with_host_netns(pods, Path::new("/proc/1/ns/net"))
    }

    /// With `host` standing for the node's network namespace (a test's own).
    pub fn with_host_netns(pods: &Path, host: &Path) -> Self {
        Self {
            pods: pods.to_owned(),
            host: host.to_owned(),
            found: Mutex::new(HashMap::new()),
        }
    }

    /// The network namespace of the pod with UID `uid`.
    pub fn locate(&self, uid: &str) -> Result<PathBuf, String> {
        let markers = [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))];
        let mut found = self.found.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(path) = found.get(uid)
            && self.still_the_pods(path, &markers)
        {
            return Ok(path.clone());
        }
        found.remove(uid);
        // Forget pods whose process is gone (deleted pods among them).
        found.retain(|_, path| path.exists());
        let cgroup = pod_cgroup(&self.pods, &markers, POD_DEPTH).ok_or_else(|| {
            format!(
                "no cgroup named after pod {uid} under {} (not started yet, or gone)",
                self.pods.display()
            )
        })?;
        let host = fs::metadata(&self.host).map_err(|e| {
            format!(
                "cannot read the node's network namespace {} ({e}): mesh-node needs the host's PIDs (hostPID) and CAP_SYS_PTRACE",
                self.host.display()
            )
        })?;
        let mut pids = pids(&cgroup);
        if pids.is_empty() {
            return Err(format!(
                "the pod's cgroup {} holds no process yet",
                cgroup.display()
            ));
        }
        pids.sort_unstable();
        // The first process (the oldest, barring PID wraparound) that is not
        // in the node's namespace.
        let path = pids
            .iter()
            .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")))
            .find(|path| fs::metadata(path).is_ok_and(|netns| !same_file(&netns, &host)))
            .ok_or_else(|| {
                "the pod shares the node's network namespace (hostNetwork); it is not captured"
                    .to_owned()
            })?;
        found.insert(uid.to_owned(), path.clone());
        Ok(path)
    }

    /// Whether the process behind `netns` (`/proc/<pid>/ns/net`) is alive
    /// and still in a cgroup of the pod: its PID was not reused.
    fn still_the_pods(&self, netns: &Path, markers: &[String; 2]) -> bool {
        let Some(process) = netns.parent().and_then(Path::parent) else {
            return false;
        };
        fs::read_to_string(process.join("cgroup")).is_ok_and(|cgroups| {
            cgroups
                .lines()
                .any(|line| markers.iter().any(|m| line.contains(m.as_str())))
        })
    }
}

/// The cgroup below `dir` (at most `depth` levels) whose name carries one
/// of `markers`, as a whole `-`/`_`/`.`-separated part.
fn pod_cgroup(dir: &Path, markers: &[String; 2], depth: usize) -> Option<PathBuf> {
    if depth == 0 {
        return None;
    }
    let mut children: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| entry.path())
        .collect();
    children.sort();
    for child in &children {
        let name = child.file_name()?.to_string_lossy();
        if markers.iter().any(|marker| names_pod(&name, marker)) {
            return Some(child.clone());
        }
    }
    children
        .iter()
        .find_map(|child| pod_cgroup(child, markers, depth - 1))
}

/// Whether cgroup `name` is the pod's: `pod<uid>` exactly (cgroupfs), or
/// `…-pod<uid_>.slice` (systemd).
fn names_pod(name: &str, marker: &str) -> bool {
    name == marker
        || name
            .strip_suffix(".slice")
            .and_then(|stem| stem.strip_suffix(marker))
            .is_some_and(|before| before.is_empty() || before.ends_with('-'))
}

/// The PIDs in `cgroup` and the cgroups below it (the containers').
fn pids(cgroup: &Path) -> Vec<u32> {
    let mut found: Vec<u32> = fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|procs| {
            procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for entry in fs::read_dir(cgroup).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(pids(&entry.path()));
        }
    }
    found
}

fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8f7e3c1a-58d2-4b6e-9d41-0c2f1e5a7b93";

    fn markers() -> [String; 2] {
        [format!("pod{UID}"), format!("pod{}", UID.replace('-', "_"))]
    }

    #[test]
    fn pod_cgroups_are_recognised_under_both_drivers() {
        let [plain, underscored] = markers();
        assert!(names_pod(&plain, &plain));
        assert!(names_pod(
            &format!("kubepods-burstable-{underscored}.slice"),
            &underscored
        ));
        assert!(names_pod(
            &format!("kubepods-{underscored}.slice"),
            &underscored
        ));
        // Not another pod whose UID ends the same, nor a container.
        assert!(!names_pod(&format!("x{plain}"), &plain));
        assert!(!names_pod(
            &format!("kubepods-x{underscored}.slice"),
            &underscored
        ));
        assert!(!names_pod(&format!("{plain}.scope"), &plain));
    }

    #[test]
    fn the_setting_is_a_template_or_cgroup() {
        assert_eq!(
            PodNetnsSetting::parse("cgroup"),
            Ok(PodNetnsSetting::Cgroup)
        );
        assert!(matches!(
            PodNetnsSetting::parse("/run/netns/{namespace}-{name}"),
            Ok(PodNetnsSetting::Template(_))
        ));
        let refused = PodNetnsSetting::parse("/run/netns/fixed").unwrap_err();
        assert!(refused.contains("or be `cgroup`"), "{refused}");
    }

    #[test]
    fn a_workload_without_a_pod_uid_is_named() {
        let netns = PodNetns::new(PodNetnsSetting::Cgroup, Path::new("/nonexistent"));
        let why = netns.locate("shop", "web", None).unwrap_err();
        assert!(why.contains("no pod_uid"), "{why}");
        let why = netns.locate("shop", "web", Some(UID)).unwrap_err();
        assert!(
            why.contains(&format!("no cgroup named after pod {UID}")),
            "{why}"
        );
    }
}
