//! A cluster of nodes and pods on one machine.
//!
//! # Addressing (stable; node `i` and the `k`-th pod placed on it, from 0)
//!
//! | what                    | network namespace       | IPv4            | IPv6             |
//! |-------------------------|-------------------------|-----------------|------------------|
//! | the fabric (a switch)   | `mesh-<c>-fabric`       | none (bridge `br0`) | none         |
//! | node `i`, link `fabric0`| `mesh-<c>-node<i>`      | `10.88.0.<i+1>/24` | `fd00:88::<i+1>/64` |
//! | node `i`, pod bridge `cni0` | same                | `10.89.<i>.1/24`   | `fd00:89:<i>::1/64` |
//! | pod, link `eth0`        | `mesh-<c>-<ns>-<pod>`   | `10.89.<i>.<k+2>/24` | `fd00:89:<i>::<k+2>/64` |
//!
//! Nodes forward between their pod bridge and the fabric and route every
//! other node's pod range through that node's fabric address, so every pod
//! reaches every other pod by address. Nothing is attached to the machine's
//! own interfaces or namespace: these addresses exist only inside the
//! cluster's namespaces.
//!
//! # Cgroups
//!
//! `<cgroup2>/mesh-<c>/node<i>/<ns>-<pod>` holds a pod's processes; the
//! node's capture programs attach to `<cgroup2>/mesh-<c>/node<i>`.
//! `<cgroup2>/mesh-<c>/system` holds the cluster's own daemons (node proxies,
//! control plane), so tearing the cluster down stops them too.
//!
//! # Lifetime
//!
//! [`Cluster::up`] records the layout in `/run/mesh/clusters/<c>.json`.
//! [`teardown`] works from names alone (namespaces and cgroups that carry the
//! cluster's prefix), so it also cleans up after a run that was killed.

use std::{
    fmt, fs, io,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    cgroup,
    ip::{ip, ip_in},
    netns, process,
};

/// Where running clusters record their layout.
pub const STATE_DIR: &str = "/run/mesh/clusters";
/// The most nodes a cluster has: node addresses are `10.88.0.1..=250`.
pub const MAX_NODES: usize = 250;
/// The most pods on one node: pod addresses are `.2..=.251`.
pub const MAX_PODS_PER_NODE: usize = 250;
/// How long teardown waits for killed processes to go.
const KILL_DEADLINE: Duration = Duration::from_secs(10);

/// What went wrong building, reading or tearing down a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the local cluster needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF); run it as root")]
    NotRoot,
    #[error("invalid cluster: {0}")]
    InvalidSpec(String),
    #[error(
        "cluster {name:?} is already up ({what}); use it, or tear it down first with `cargo xtask cluster down --name {name}`"
    )]
    AlreadyUp { name: String, what: String },
    #[error("no cluster {name:?} is up")]
    NotUp { name: String },
    #[error("no pod {0} in this cluster")]
    NoSuchPod(String),
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// The cluster to build.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Lowercase letters and digits, 1 to 12 of them; it prefixes every
    /// namespace and cgroup the cluster makes.
    pub name: String,
    /// Number of nodes.
    pub nodes: usize,
    /// The pods, in placement order.
    pub pods: Vec<PodSpec>,
}

/// A pod to place on a node.
#[derive(Clone, Debug)]
pub struct PodSpec {
    /// Kubernetes-style namespace (a DNS-1123 label).
    pub namespace: String,
    /// Pod name (a DNS-1123 label), unique within its namespace.
    pub name: String,
    /// Index of the node it runs on.
    pub node: usize,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str, node: usize) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            node,
        }
    }
}

/// The planned (or recorded) layout of a cluster: every name and address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub name: String,
    pub cgroup: PathBuf,
    pub nodes: Vec<NodeLayout>,
    pub pods: Vec<PodLayout>,
}

/// One node's names and addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLayout {
    pub index: usize,
    pub name: String,
    pub netns: String,
    pub fabric_ip4: Ipv4Addr,
    pub fabric_ip6: Ipv6Addr,
    pub gateway_ip4: Ipv4Addr,
    pub gateway_ip6: Ipv6Addr,
    /// The cgroup that holds the node's pods.
    pub cgroup: PathBuf,
}

/// One pod's names and addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodLayout {
    pub namespace: String,
    pub name: String,
    pub node: usize,
    pub netns: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub cgroup: PathBuf,
}

impl PodLayout {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The path of the pod's network namespace.
    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.netns)
    }
}

impl Layout {
    /// Validates `spec` and computes every name and address, with the cgroup
    /// v2 hierarchy rooted at `cgroup_root`. Pure: touches nothing.
    pub fn plan(spec: &ClusterSpec, cgroup_root: &Path) -> Result<Self, ClusterError> {
        let invalid = |msg: String| Err(ClusterError::InvalidSpec(msg));
        let name = &spec.name;
        if name.is_empty()
            || name.len() > 12
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return invalid(format!(
                "name {name:?}: must be 1 to 12 lowercase letters or digits"
            ));
        }
        if spec.nodes == 0 || spec.nodes > MAX_NODES {
            return invalid(format!(
                "nodes: must be 1 to {MAX_NODES} (got {})",
                spec.nodes
            ));
        }
        let cgroup = cgroup_root.join(format!("mesh-{name}"));
        let nodes: Vec<NodeLayout> = (0..spec.nodes)
            .map(|i| {
                let n = i as u8;
                NodeLayout {
                    index: i,
                    name: format!("node{i}"),
                    netns: format!("mesh-{name}-node{i}"),
                    fabric_ip4: Ipv4Addr::new(10, 88, 0, n + 1),
                    fabric_ip6: Ipv6Addr::new(0xfd00, 0x88, 0, 0, 0, 0, 0, u16::from(n) + 1),
                    gateway_ip4: Ipv4Addr::new(10, 89, n, 1),
                    gateway_ip6: Ipv6Addr::new(0xfd00, 0x89, u16::from(n), 0, 0, 0, 0, 1),
                    cgroup: cgroup.join(format!("node{i}")),
                }
            })
            .collect();

        let mut pods: Vec<PodLayout> = Vec::with_capacity(spec.pods.len());
        let mut per_node = vec![0usize; spec.nodes];
        for (index, pod) in spec.pods.iter().enumerate() {
            for (field, value) in [("namespace", &pod.namespace), ("name", &pod.name)] {
                if !is_dns_label(value) {
                    return invalid(format!(
                        "pods[{index}].{field}: {value:?} is not a DNS-1123 label \
                         (lowercase letters, digits and '-', 1 to 63, starting and ending alphanumeric)"
                    ));
                }
            }
            if pod.node >= spec.nodes {
                return invalid(format!(
                    "pods[{index}].node: {} does not exist (the cluster has {} nodes)",
                    pod.node, spec.nodes
                ));
            }
            if pods
                .iter()
                .any(|p| p.namespace == pod.namespace && p.name == pod.name)
            {
                return invalid(format!(
                    "pods[{index}]: {}/{} is listed twice",
                    pod.namespace, pod.name
                ));
            }
            let k = per_node[pod.node];
            if k >= MAX_PODS_PER_NODE {
                return invalid(format!(
                    "pods[{index}]: node{} already has {MAX_PODS_PER_NODE} pods",
                    pod.node
                ));
            }
            per_node[pod.node] += 1;
            let n = pod.node as u8;
            let host = k as u8 + 2;
            let netns = format!("mesh-{name}-{}-{}", pod.namespace, pod.name);
            if pods.iter().any(|p| p.netns == netns) {
                return invalid(format!(
                    "pods[{index}]: {}/{} and another pod would share the namespace name {netns}",
                    pod.namespace, pod.name
                ));
            }
            pods.push(PodLayout {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                node: pod.node,
                netns,
                ip4: Ipv4Addr::new(10, 89, n, host),
                ip6: Ipv6Addr::new(0xfd00, 0x89, u16::from(n), 0, 0, 0, 0, u16::from(host)),
                cgroup: nodes[pod.node]
                    .cgroup
                    .join(format!("{}-{}", pod.namespace, pod.name)),
            });
        }
        Ok(Self {
            name: name.clone(),
            cgroup,
            nodes,
            pods,
        })
    }

    /// The fabric's namespace name.
    pub fn fabric_netns(&self) -> String {
        format!("mesh-{}-fabric", self.name)
    }

    /// The cgroup of the cluster's own daemons.
    pub fn system_cgroup(&self) -> PathBuf {
        self.cgroup.join("system")
    }

    /// Where node `index`'s proxy pins its capture maps and links (on
    /// bpffs, which [`Cluster::up`] mounts if needed). Teardown removes it.
    pub fn bpf_pin_dir(&self, index: usize) -> PathBuf {
        bpf_pin_root(&self.name).join(format!("node{index}"))
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, id: &str) -> Result<&PodLayout, ClusterError> {
        self.pods
            .iter()
            .find(|p| p.id() == id)
            .ok_or_else(|| ClusterError::NoSuchPod(id.to_owned()))
    }
}

fn is_dns_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// The prefix of every namespace a cluster named `name` makes.
fn netns_prefix(name: &str) -> String {
    format!("mesh-{name}-")
}

fn state_file(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{name}.json"))
}

/// A running cluster. Dropping it tears the cluster down (kills its
/// processes, deletes its namespaces and cgroups), even when a test panics;
/// [`Cluster::keep`] leaves it running instead.
#[derive(Debug)]
pub struct Cluster {
    layout: Layout,
    keep: bool,
}

impl Cluster {
    /// Builds the cluster. Refuses if a cluster of that name (or leftovers of
    /// one) exists; on failure part-way, removes what it made.
    pub fn up(spec: &ClusterSpec) -> Result<Self, ClusterError> {
        crate::require_root()?;
        let root = cgroup::root().map_err(io_error("finding the cgroup v2 hierarchy"))?;
        let layout = Layout::plan(spec, &root)?;
        if let Some(what) = existing(&layout.name)? {
            return Err(ClusterError::AlreadyUp {
                name: layout.name.clone(),
                what,
            });
        }
        ensure_bpffs()?;
        // From here on, dropping `cluster` removes whatever was made.
        let cluster = Self {
            layout,
            keep: false,
        };
        cluster.build()?;
        Ok(cluster)
    }

    /// Attaches to the running cluster `name`, from its recorded layout.
    pub fn open(name: &str) -> Result<Self, ClusterError> {
        let text = match fs::read_to_string(state_file(name)) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ClusterError::NotUp {
                    name: name.to_owned(),
                });
            }
            Err(e) => {
                return Err(io_error(format!("reading {}", state_file(name).display()))(
                    e,
                ));
            }
        };
        let layout = serde_json::from_str(&text).map_err(|e| ClusterError::Io {
            context: format!("parsing {}", state_file(name).display()),
            source: e.into(),
        })?;
        Ok(Self { layout, keep: true })
    }

    /// Names and addresses.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, id: &str) -> Result<&PodLayout, ClusterError> {
        self.layout.pod(id)
    }

    /// Leaves the cluster running when this handle is dropped.
    pub fn keep(mut self) -> Layout {
        self.keep = true;
        self.layout.clone()
    }

    /// A command that runs inside the pod `id`: its network namespace and
    /// its cgroup (so the node's capture programs see it).
    pub fn pod_command(
        &self,
        id: &str,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command, ClusterError> {
        let pod = self.pod(id)?;
        let mut command = Command::new(program);
        process::place_before_exec(&mut command, Some(&pod.netns_path()), Some(&pod.cgroup))
            .map_err(io_error(format!("preparing a command for pod {id}")))?;
        Ok(command)
    }

    /// A command for one of the cluster's daemons: it runs in the machine's
    /// namespace but in the cluster's `system` cgroup, so teardown stops it.
    pub fn system_command(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command, ClusterError> {
        let mut command = Command::new(program);
        process::place_before_exec(&mut command, None, Some(&self.layout.system_cgroup()))
            .map_err(io_error("preparing a command for the system cgroup"))?;
        Ok(command)
    }

    /// Tears the cluster down now, reporting what it removed.
    pub fn down(mut self) -> Result<Teardown, ClusterError> {
        self.keep = true;
        teardown(&self.layout.name)
    }

    fn build(&self) -> Result<(), ClusterError> {
        let l = &self.layout;
        for dir in [&l.cgroup, &l.system_cgroup()] {
            cgroup::create(dir).map_err(io_error("creating the cluster's cgroups"))?;
        }
        let fabric = l.fabric_netns();
        add_netns(&fabric)?;
        ip_in(&fabric, &["link", "add", "br0", "type", "bridge"])?;
        ip_in(&fabric, &["link", "set", "br0", "up"])?;

        for node in &l.nodes {
            add_netns(&node.netns)?;
            for (key, value) in [
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
            ] {
                netns::sysctl(&node.netns, key, value).map_err(io_error("configuring a node"))?;
            }
            let ns = node.netns.as_str();
            let fabric_port = format!("n{}", node.index);
            ip_in(
                &fabric,
                &[
                    "link",
                    "add",
                    &fabric_port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "fabric0",
                    "netns",
                    ns,
                ],
            )?;
            ip_in(
                &fabric,
                &["link", "set", &fabric_port, "master", "br0", "up"],
            )?;
            add_addresses(
                ns,
                "fabric0",
                &node.fabric_ip4.to_string(),
                &node.fabric_ip6.to_string(),
            )?;
            ip_in(ns, &["link", "add", "cni0", "type", "bridge"])?;
            add_addresses(
                ns,
                "cni0",
                &node.gateway_ip4.to_string(),
                &node.gateway_ip6.to_string(),
            )?;
            for other in l.nodes.iter().filter(|o| o.index != node.index) {
                let via4 = other.fabric_ip4.to_string();
                let via6 = other.fabric_ip6.to_string();
                let range4 = format!("10.89.{}.0/24", other.index);
                let range6 = format!("fd00:89:{:x}::/64", other.index);
                ip_in(ns, &["route", "add", &range4, "via", &via4])?;
                ip_in(ns, &["-6", "route", "add", &range6, "via", &via6])?;
            }
            cgroup::create(&node.cgroup).map_err(io_error("creating a node's cgroup"))?;
        }

        let mut veth_index = vec![0usize; l.nodes.len()];
        for pod in &l.pods {
            add_netns(&pod.netns)?;
            let node = &l.nodes[pod.node];
            let veth = format!("vp{}", veth_index[pod.node]);
            veth_index[pod.node] += 1;
            let ns = pod.netns.as_str();
            ip_in(
                &node.netns,
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ],
            )?;
            ip_in(&node.netns, &["link", "set", &veth, "master", "cni0", "up"])?;
            add_addresses(ns, "eth0", &pod.ip4.to_string(), &pod.ip6.to_string())?;
            ip_in(
                ns,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &node.gateway_ip4.to_string(),
                ],
            )?;
            ip_in(
                ns,
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &node.gateway_ip6.to_string(),
                ],
            )?;
            cgroup::create(&pod.cgroup).map_err(io_error("creating a pod's cgroup"))?;
        }

        fs::create_dir_all(STATE_DIR).map_err(io_error(format!("creating {STATE_DIR}")))?;
        let json = serde_json::to_string_pretty(l).map_err(|e| ClusterError::Io {
            context: "encoding the cluster layout".into(),
            source: e.into(),
        })?;
        fs::write(state_file(&l.name), json).map_err(io_error(format!(
            "writing {}",
            state_file(&l.name).display()
        )))?;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(error) = teardown(&self.layout.name) {
            eprintln!("tearing down cluster {}: {error}", self.layout.name);
        }
    }
}

/// A named namespace with loopback up and IPv6 duplicate-address detection
/// off (the addresses are planned, and DAD would delay them by seconds).
fn add_netns(name: &str) -> Result<(), ClusterError> {
    ip(&["netns", "add", name])?;
    for key in [
        "net.ipv6.conf.all.accept_dad",
        "net.ipv6.conf.default.accept_dad",
    ] {
        netns::sysctl(name, key, "0").map_err(io_error("configuring a namespace"))?;
    }
    ip_in(name, &["link", "set", "lo", "up"])
}

fn add_addresses(netns: &str, dev: &str, ip4: &str, ip6: &str) -> Result<(), ClusterError> {
    let prefix4 = format!("{ip4}/24");
    let prefix6 = format!("{ip6}/64");
    ip_in(netns, &["addr", "add", &prefix4, "dev", dev])?;
    ip_in(netns, &["addr", "add", &prefix6, "dev", dev, "nodad"])?;
    ip_in(netns, &["link", "set", dev, "up"])
}

/// What exists of a cluster named `name`, if anything.
fn existing(name: &str) -> Result<Option<String>, ClusterError> {
    let namespaces =
        netns::list(&netns_prefix(name)).map_err(io_error("listing network namespaces"))?;
    let has_state = state_file(name).exists();
    Ok(match (has_state, namespaces.len()) {
        (false, 0) => None,
        (true, n) => Some(format!("{n} network namespaces")),
        (false, n) => Some(format!(
            "{n} network namespaces left by an interrupted run, no recorded layout"
        )),
    })
}

/// What [`teardown`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Teardown {
    pub namespaces: usize,
    pub cgroups: usize,
    pub had_state: bool,
    /// Pinned capture state was removed.
    pub pinned: bool,
}

impl Teardown {
    /// Whether there was nothing to remove.
    pub fn was_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl fmt::Display for Teardown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "removed {} network namespaces and {} cgroups",
            self.namespaces, self.cgroups
        )
    }
}

/// Removes everything of the cluster `name`: kills its processes, deletes
/// its namespaces (their veths and bridges go with them), removes its
/// cgroups and its recorded layout. Works from names alone, so it cleans up
/// after an interrupted run too; with nothing to remove it does nothing.
pub fn teardown(name: &str) -> Result<Teardown, ClusterError> {
    crate::require_root()?;
    let mut report = Teardown::default();
    let root = cgroup::root().map_err(io_error("finding the cgroup v2 hierarchy"))?;
    let cluster_cgroup = root.join(format!("mesh-{name}"));
    cgroup::kill_all(&cluster_cgroup, KILL_DEADLINE).map_err(io_error(format!(
        "stopping the processes of cluster {name}"
    )))?;
    // The nodes' pinned capture: removing the pins detaches the programs.
    match fs::remove_dir_all(bpf_pin_root(name)) {
        Ok(()) => report.pinned = true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(io_error(format!(
                "removing {}",
                bpf_pin_root(name).display()
            ))(e));
        }
    }
    for ns in netns::list(&netns_prefix(name)).map_err(io_error("listing network namespaces"))? {
        ip(&["netns", "del", &ns])?;
        report.namespaces += 1;
    }
    report.cgroups = cgroup::remove_tree(&cluster_cgroup)
        .map_err(io_error(format!("removing the cgroups of cluster {name}")))?;
    match fs::remove_file(state_file(name)) {
        Ok(()) => report.had_state = true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(format!("removing {}", state_file(name).display()))(e)),
    }
    Ok(report)
}

/// Where bpffs is mounted for the nodes' pinned capture state.
const BPFFS: &str = "/sys/fs/bpf";

fn bpf_pin_root(cluster: &str) -> PathBuf {
    Path::new(BPFFS).join(format!("mesh-{cluster}"))
}

/// Mounts bpffs at `/sys/fs/bpf` unless it is mounted there already.
fn ensure_bpffs() -> Result<(), ClusterError> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").map_err(io_error("reading /proc/self/mounts"))?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, target, kind) = (fields.next(), fields.next(), fields.next());
        target == Some(BPFFS) && kind == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    let output = Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .output()
        .map_err(io_error("running mount"))?;
    if !output.status.success() {
        return Err(ClusterError::Command {
            command: format!("mount -t bpf bpf {BPFFS}"),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(())
}

/// How a recorded cluster stands now.
#[derive(Debug)]
pub struct Status {
    pub layout: Layout,
    /// Namespaces of the layout that are missing.
    pub missing_namespaces: Vec<String>,
    /// Processes running in each pod's cgroup, in layout order.
    pub pod_processes: Vec<usize>,
}

/// The status of the cluster `name`.
pub fn status(name: &str) -> Result<Status, ClusterError> {
    let cluster = Cluster::open(name)?;
    let layout = cluster.keep();
    let present =
        netns::list(&netns_prefix(name)).map_err(io_error("listing network namespaces"))?;
    let expected = std::iter::once(layout.fabric_netns())
        .chain(layout.nodes.iter().map(|n| n.netns.clone()))
        .chain(layout.pods.iter().map(|p| p.netns.clone()));
    let missing_namespaces = expected.filter(|ns| !present.contains(ns)).collect();
    let pod_processes = layout
        .pods
        .iter()
        .map(|p| cgroup::procs(&p.cgroup).map(|v| v.len()).unwrap_or(0))
        .collect();
    Ok(Status {
        layout,
        missing_namespaces,
        pod_processes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pods: Vec<PodSpec>) -> ClusterSpec {
        ClusterSpec {
            name: "t1".into(),
            nodes: 2,
            pods,
        }
    }

    #[test]
    fn plan_assigns_documented_addresses() {
        let layout = Layout::plan(
            &spec(vec![
                PodSpec::new("shop", "frontend", 0),
                PodSpec::new("shop", "reviews", 1),
                PodSpec::new("legacy", "client", 0),
            ]),
            Path::new("/cg"),
        )
        .unwrap();
        assert_eq!(layout.cgroup, Path::new("/cg/mesh-t1"));
        let node1 = &layout.nodes[1];
        assert_eq!(node1.netns, "mesh-t1-node1");
        assert_eq!(node1.fabric_ip4, Ipv4Addr::new(10, 88, 0, 2));
        assert_eq!(node1.fabric_ip6, "fd00:88::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(node1.gateway_ip4, Ipv4Addr::new(10, 89, 1, 1));
        let frontend = layout.pod("shop/frontend").unwrap();
        assert_eq!(frontend.ip4, Ipv4Addr::new(10, 89, 0, 2));
        assert_eq!(frontend.netns, "mesh-t1-shop-frontend");
        assert_eq!(
            frontend.cgroup,
            Path::new("/cg/mesh-t1/node0/shop-frontend")
        );
        // The second pod on node 0 takes the next address there.
        let client = layout.pod("legacy/client").unwrap();
        assert_eq!(client.ip4, Ipv4Addr::new(10, 89, 0, 3));
        assert_eq!(client.ip6, "fd00:89:0::3".parse::<Ipv6Addr>().unwrap());
        let reviews = layout.pod("shop/reviews").unwrap();
        assert_eq!(reviews.ip4, Ipv4Addr::new(10, 89, 1, 2));
        assert_eq!(reviews.ip6, "fd00:89:1::2".parse::<Ipv6Addr>().unwrap());
    }

    fn plan_error(spec: &ClusterSpec) -> String {
        Layout::plan(spec, Path::new("/cg"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn plan_rejects_bad_names_with_the_field() {
        let mut bad = spec(vec![]);
        bad.name = "Dev-1".into();
        assert!(plan_error(&bad).contains("name \"Dev-1\""));
        let bad = spec(vec![PodSpec::new("shop", "Front_end", 0)]);
        assert!(
            plan_error(&bad).contains("pods[0].name"),
            "{}",
            plan_error(&bad)
        );
        let bad = spec(vec![PodSpec::new("-shop", "a", 0)]);
        assert!(plan_error(&bad).contains("pods[0].namespace"));
    }

    #[test]
    fn plan_rejects_unknown_nodes_duplicates_and_sizes() {
        assert!(plan_error(&spec(vec![PodSpec::new("a", "b", 2)])).contains("pods[0].node: 2"));
        let dup = spec(vec![PodSpec::new("a", "b", 0), PodSpec::new("a", "b", 1)]);
        assert!(plan_error(&dup).contains("listed twice"));
        // "a-b"/"c" and "a"/"b-c" would both be namespace mesh-t1-a-b-c.
        let clash = spec(vec![
            PodSpec::new("a-b", "c", 0),
            PodSpec::new("a", "b-c", 1),
        ]);
        assert!(plan_error(&clash).contains("share the namespace name"));
        let mut none = spec(vec![]);
        none.nodes = 0;
        assert!(plan_error(&none).contains("nodes: must be 1 to 250"));
        let full = ClusterSpec {
            name: "t1".into(),
            nodes: 1,
            pods: (0..=MAX_PODS_PER_NODE)
                .map(|i| PodSpec::new("a", &format!("p{i}"), 0))
                .collect(),
        };
        assert!(plan_error(&full).contains("already has 250 pods"));
    }

    #[test]
    fn dns_labels() {
        for good in ["a", "shop", "a-b", "x1", &"a".repeat(63)] {
            assert!(is_dns_label(good), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }
}
