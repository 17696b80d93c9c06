//! `meshctl check --node`: whether this machine can run `mesh-node`. Each
//! prerequisite of the capture programs and of the node proxy is checked
//! where it is decided: the kernel's release, the mounts, this process's
//! capabilities, and the kernel's BPF program types, helpers and maps,
//! probed by loading trivial programs and creating maps, as libbpf's
//! `bpftool feature probe` does.
//!
//! Run it where mesh-node runs (`kubectl exec ds/mesh-node -- meshctl check
//! --node`), with the same privileges: the capability findings are this
//! process's.

use std::path::Path;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

use crate::check::{Finding, error, pass, warning};

const KERNEL: &str = "kernel";
const MOUNTS: &str = "mounts";
const CAPABILITIES: &str = "capabilities";
const BPF: &str = "bpf features";

/// The oldest kernel with everything the programs use: `sk_lookup` (5.9)
/// and `bpf_get_netns_cookie` from `sock_ops` (5.15).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// Runs every check on this machine. `cgroup` is the directory mesh-node
/// will attach to (`--cgroup`), when known.
pub fn run(cgroup: Option<&Path>) -> Vec<Finding> {
    let mut findings = Vec::new();
    match std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        Ok(release) => findings.push(kernel(release.trim())),
        Err(e) => findings.push(error(
            KERNEL,
            format!("cannot read the kernel release: {e}"),
            "is /proc mounted?",
        )),
    }
    findings.extend(jit(std::fs::read_to_string(
        "/proc/sys/net/core/bpf_jit_enable",
    )
    .ok()
    .as_deref()));
    match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(mountinfo) => findings.extend(mounts(&mountinfo)),
        Err(e) => findings.push(error(
            MOUNTS,
            format!("cannot read /proc/self/mountinfo: {e}"),
            "is /proc mounted?",
        )),
    }
    if let Some(cgroup) = cgroup {
        findings.push(pod_cgroup(cgroup));
    }
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_capabilities(&status));
    let Some(effective) = effective else {
        findings.push(error(
            CAPABILITIES,
            "cannot read CapEff from /proc/self/status".into(),
            "is /proc mounted?",
        ));
        return findings;
    };
    findings.extend(capabilities(effective));
    if effective & (1 << CAP_BPF | 1 << CAP_SYS_ADMIN) == 0 {
        findings.push(error(
            BPF,
            "cannot probe the kernel's BPF features without CAP_SYS_ADMIN or CAP_BPF".into(),
            "run the check with mesh-node's privileges",
        ));
        return findings;
    }
    findings.extend(bpf_features());
    findings
}

/// The release's major and minor version (`6.1.0-18-amd64` → (6, 1)).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

fn kernel(release: &str) -> Finding {
    let (major, minor) = MIN_KERNEL;
    match kernel_version(release) {
        Some(version) if version >= MIN_KERNEL => pass(
            KERNEL,
            format!("Linux {release} (at least {major}.{minor})"),
        ),
        Some(_) => error(
            KERNEL,
            format!("Linux {release} is older than {major}.{minor}"),
            "the capture programs need sk_lookup and bpf_get_netns_cookie in sock_ops; upgrade the node's kernel",
        ),
        None => warning(
            KERNEL,
            format!("cannot tell the version of kernel release {release:?}"),
            "make sure the kernel is at least 5.15",
        ),
    }
}

fn jit(setting: Option<&str>) -> Option<Finding> {
    match setting.map(str::trim) {
        // Kernels built with CONFIG_BPF_JIT_ALWAYS_ON have no switch to
        // read in some containers; nothing to say then.
        None => None,
        Some("0") => Some(warning(
            KERNEL,
            "the BPF JIT is off (net.core.bpf_jit_enable = 0)".into(),
            "programs run interpreted, slower on every connect: sysctl -w net.core.bpf_jit_enable=1",
        )),
        Some(value) => Some(pass(
            KERNEL,
            format!("the BPF JIT is on (net.core.bpf_jit_enable = {value})"),
        )),
    }
}

/// The filesystem type mounted at `path`, from `/proc/self/mountinfo`
/// (the last mount there wins, as it hides those beneath).
pub fn mount_type<'a>(mountinfo: &'a str, path: &str) -> Option<&'a str> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let separator = fields.iter().position(|f| *f == "-")?;
            (fields.get(4) == Some(&path)).then(|| fields.get(separator + 1).copied())?
        })
        .next_back()
}

fn mounts(mountinfo: &str) -> Vec<Finding> {
    let cgroup = match (
        mount_type(mountinfo, "/sys/fs/cgroup"),
        mount_type(mountinfo, "/sys/fs/cgroup/unified"),
    ) {
        (Some("cgroup2"), _) => pass(MOUNTS, "cgroup v2 is mounted at /sys/fs/cgroup".into()),
        (_, Some("cgroup2")) => warning(
            MOUNTS,
            "hybrid cgroups: v2 is mounted at /sys/fs/cgroup/unified, v1 holds the controllers"
                .into(),
            "capture works when the pods' cgroups exist under /sys/fs/cgroup/unified (pass one there as --cgroup); a unified hierarchy (systemd.unified_cgroup_hierarchy=1) is simpler",
        ),
        (Some(other), _) => error(
            MOUNTS,
            format!("/sys/fs/cgroup is {other} and no cgroup v2 hierarchy is mounted"),
            "boot with systemd.unified_cgroup_hierarchy=1; the capture programs attach to a cgroup v2 directory",
        ),
        (None, _) => error(
            MOUNTS,
            "nothing is mounted at /sys/fs/cgroup".into(),
            "mount cgroup v2 there (the DaemonSet mounts the host's with a hostPath volume)",
        ),
    };
    let bpffs = match mount_type(mountinfo, "/sys/fs/bpf") {
        Some("bpf") => pass(MOUNTS, "bpffs is mounted at /sys/fs/bpf".into()),
        Some(other) => error(
            MOUNTS,
            format!("/sys/fs/bpf is {other}, not bpffs"),
            "mount bpffs there: mount -t bpf bpf /sys/fs/bpf",
        ),
        None => warning(
            MOUNTS,
            "bpffs is not mounted at /sys/fs/bpf".into(),
            "mount it on the node (mount -t bpf bpf /sys/fs/bpf, or a systemd sys-fs-bpf.mount): mesh-node pins the capture state there so pods stay captured while it restarts; the DaemonSet mounts the host's /sys/fs/bpf",
        ),
    };
    vec![cgroup, bpffs]
}

fn pod_cgroup(cgroup: &Path) -> Finding {
    let shown = cgroup.display();
    let is_cgroup = |dir: &Path| dir.join("cgroup.controllers").is_file();
    if !is_cgroup(cgroup) {
        return error(
            MOUNTS,
            format!("{shown} is not a cgroup v2 directory"),
            "pass the cgroup that holds the pods (kubepods.slice with systemd, kubepods with cgroupfs)",
        );
    }
    if !cgroup.parent().is_some_and(is_cgroup) {
        return error(
            MOUNTS,
            format!("{shown} is the root of the cgroup hierarchy"),
            "mesh-node refuses to attach there (it would capture every process on the machine); pass the pods' cgroup",
        );
    }
    pass(
        MOUNTS,
        format!("{shown} is a cgroup v2 directory below the root"),
    )
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_BPF: u32 = 39;

/// The effective capability set from `/proc/<pid>/status`.
pub fn effective_capabilities(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// What each capability mesh-node uses is for; `required` ones fail the
/// check when missing. (CAP_BPF is not among them: CAP_SYS_ADMIN, which
/// setns needs anyway, stands for it, and the programs' verification needs
/// more than CAP_BPF alone.)
const NEEDED: [(u32, &str, bool, &str); 4] = [
    (
        CAP_NET_ADMIN,
        "CAP_NET_ADMIN",
        true,
        "attaching programs to the pods' cgroup and network namespaces, and marking the proxy's own sockets (SO_MARK)",
    ),
    (
        CAP_SYS_ADMIN,
        "CAP_SYS_ADMIN",
        true,
        "entering the pods' network namespaces (setns) and loading the capture programs",
    ),
    (
        CAP_SYS_PTRACE,
        "CAP_SYS_PTRACE",
        true,
        "opening other processes' /proc/<pid>/ns/net to find the pods' network namespaces",
    ),
    (
        CAP_SYS_RESOURCE,
        "CAP_SYS_RESOURCE",
        false,
        "raising the open-file limit to fs.nr_open (each carried connection holds two)",
    ),
];

fn capabilities(effective: u64) -> Vec<Finding> {
    NEEDED
        .iter()
        .map(|&(bit, name, required, why)| {
            let what = format!("{name}: {why}");
            match (effective & (1 << bit) != 0, required) {
                (true, _) => pass(CAPABILITIES, what),
                (false, true) => error(
                    CAPABILITIES,
                    format!("missing {what}"),
                    "grant it in mesh-node's securityContext.capabilities.add",
                ),
                (false, false) => warning(
                    CAPABILITIES,
                    format!("missing {what}"),
                    "without it the proxy keeps the hard limit it was started with",
                ),
            }
        })
        .collect()
}

/// Asks the kernel itself: each program type, helper and map type the
/// capture programs use is loaded or created once.
fn bpf_features() -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut verdict = |what: String, supported: Result<bool, String>, hint: &str| {
        findings.push(match supported {
            Ok(true) => pass(BPF, what),
            Ok(false) => error(BPF, format!("{what}: not supported by this kernel"), hint),
            Err(e) => error(BPF, format!("{what}: the probe failed: {e}"), hint),
        });
    };
    const UPGRADE: &str = "the capture programs need it; upgrade the kernel (5.15 or later with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF, CONFIG_BPF_JIT)";
    for (program, name) in [
        (ProgramType::CgroupSockAddr, "cgroup/connect4 and connect6"),
        (ProgramType::SockOps, "sock_ops"),
        (ProgramType::SkLookup, "sk_lookup"),
    ] {
        verdict(
            format!("program type {name}"),
            is_program_supported(program).map_err(|e| e.to_string()),
            UPGRADE,
        );
    }
    for (program, helper, name) in [
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
            "bpf_get_netns_cookie from cgroup/connect",
        ),
        (
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_get_netns_cookie,
            "bpf_get_netns_cookie from sock_ops",
        ),
        (
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "bpf_get_socket_cookie from sock_ops",
        ),
        (
            ProgramType::SkLookup,
            BpfHelper::BPF_FUNC_sk_assign,
            "bpf_sk_assign from sk_lookup",
        ),
    ] {
        verdict(
            format!("helper {name}"),
            is_helper_supported(program, helper).map_err(|e| e.to_string()),
            UPGRADE,
        );
    }
    for (map, name) in [
        (MapType::LruHash, "LRU hash"),
        (MapType::PerCpuHash, "per-CPU hash"),
        (MapType::PerCpuArray, "per-CPU array"),
        (MapType::SockHash, "sockhash"),
    ] {
        verdict(
            format!("map type {name}"),
            is_map_supported(map).map_err(|e| e.to_string()),
            UPGRADE,
        );
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;

    #[test]
    fn kernel_releases_are_read_as_distributions_write_them() {
        assert_eq!(kernel_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.15.0-105-generic"), Some((5, 15)));
        assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(kernel_version("5.10.209+"), Some((5, 10)));
        assert_eq!(kernel_version("6.9rc3"), Some((6, 9)));
        assert_eq!(kernel_version("garbage"), None);
        assert_eq!(kernel("5.15.0-105-generic").level, Level::Pass);
        assert_eq!(kernel("5.10.0-28-amd64").level, Level::Error);
        assert_eq!(kernel("4.19.0").level, Level::Error);
        assert_eq!(kernel("vendor").level, Level::Warning);
    }

    #[test]
    fn mounts_are_read_from_mountinfo() {
        let v2 = "\
25 30 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
26 30 0:23 / /sys/fs/bpf rw,nosuid shared:10 - bpf bpf rw,mode=700
";
        assert_eq!(mount_type(v2, "/sys/fs/cgroup"), Some("cgroup2"));
        assert_eq!(mount_type(v2, "/sys/fs/bpf"), Some("bpf"));
        assert!(mounts(v2).iter().all(|f| f.level == Level::Pass));
        // cgroup v1 (a tmpfs holding the controllers), no bpffs; optional
        // fields before the separator vary in number.
        let v1 =
            "25 30 0:22 / /sys/fs/cgroup ro,nosuid shared:9 master:3 - tmpfs tmpfs ro,mode=755\n";
        let levels: Vec<Level> = mounts(v1).iter().map(|f| f.level).collect();
        assert_eq!(levels, [Level::Error, Level::Warning]);
        // Hybrid: v1 controllers, v2 beside them.
        let hybrid = format!("{v1}41 25 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n");
        let levels: Vec<Level> = mounts(&hybrid).iter().map(|f| f.level).collect();
        assert_eq!(levels, [Level::Warning, Level::Warning]);
        // A later mount hides an earlier one.
        let over = format!("{v2}27 30 0:24 / /sys/fs/bpf rw - tmpfs tmpfs rw\n");
        assert_eq!(mount_type(&over, "/sys/fs/bpf"), Some("tmpfs"));
    }

    #[test]
    fn capabilities_are_decoded_and_explained() {
        let status = "Name:\tmeshctl\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let all = effective_capabilities(status).unwrap();
        assert!(capabilities(all).iter().all(|f| f.level == Level::Pass));
        let only_bpf = capabilities(1 << CAP_BPF);
        let missing: Vec<&str> = only_bpf
            .iter()
            .filter(|f| f.level == Level::Error)
            .map(|f| f.what.as_str())
            .collect();
        assert_eq!(missing.len(), 3, "{missing:?}");
        assert!(missing[0].starts_with("missing CAP_NET_ADMIN: attaching"));
        assert!(missing[1].starts_with("missing CAP_SYS_ADMIN: entering"));
        assert_eq!(
            only_bpf.last().map(|f| f.level),
            Some(Level::Warning),
            "CAP_SYS_RESOURCE is optional"
        );
        assert_eq!(effective_capabilities("CapEff:\tzz\n"), None);
    }
}
