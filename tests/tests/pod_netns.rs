//! Finding a pod's network namespace as mesh-node does on Kubernetes
//! (`--pod-netns cgroup`), on real cgroups laid out as the kubelet lays
//! them out with either cgroup driver, holding real processes in real
//! network namespaces.

use std::{
    fs,
    os::{
        fd::AsRawFd as _,
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use mesh_e2e::{cgroup, require_root};
use mesh_node::pods::locate::CgroupNetns;

/// A network namespace, cgroups and processes made for the test, all
/// removed when dropped, however the test ends.
struct Fixture {
    netns: String,
    cgroups: PathBuf,
    processes: Vec<Child>,
}

impl Fixture {
    fn new() -> Self {
        let name = format!("mesh-podns-{}", std::process::id());
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(status.success(), "ip netns add {name}");
        let cgroups = cgroup::root().unwrap().join(&name);
        cgroup::create(&cgroups).unwrap();
        Self {
            netns: name,
            cgroups,
            processes: Vec::new(),
        }
    }

    /// A process in `cgroup` (created as needed), in the test's network
    /// namespace or, with `host`, in this one. It is in both before it
    /// runs `sleep`, as a container's processes are.
    #[allow(unsafe_code)]
    fn process_in(&mut self, cgroup: &Path, host: bool) -> u32 {
        cgroup::create(cgroup).unwrap();
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .unwrap();
        let netns =
            (!host).then(|| fs::File::open(Path::new("/run/netns").join(&self.netns)).unwrap());
        let mut command = Command::new("sleep");
        command.arg("600").stdin(Stdio::null());
        // SAFETY: between fork and exec the closure makes only
        // async-signal-safe calls (setns, write) on descriptors the parent
        // keeps open until spawn returns.
        unsafe {
            command.pre_exec(move || {
                if let Some(netns) = &netns
                    && libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        let pid = child.id();
        self.processes.push(child);
        pid
    }

    fn kill(&mut self, pid: u32) {
        let child = self.processes.iter_mut().find(|c| c.id() == pid).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn netns_inode(&self) -> u64 {
        fs::metadata(Path::new("/run/netns").join(&self.netns))
            .unwrap()
            .ino()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = cgroup::kill_all(&self.cgroups, Duration::from_secs(5));
        let _ = cgroup::remove_tree(&self.cgroups);
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
    }
}

const BURSTABLE: &str = "0c1d2e3f-4a5b-4c6d-8e7f-901a2b3c4d5e";
const GUARANTEED: &str = "11111111-2222-4333-8444-555555555555";
const HOST_NETWORK: &str = "99999999-8888-4777-8666-555555555555";
const EMPTY: &str = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee";

fn underscored(uid: &str) -> String {
    uid.replace('-', "_")
}

#[test]
fn pods_are_found_by_uid_under_either_cgroup_driver() {
    require_root().expect("root");
    let mut fixture = Fixture::new();
    let inode = fixture.netns_inode();
    let ino = |path: &Path| fs::metadata(path).unwrap().ino();

    // The systemd driver: QoS slices, the pod's slice, a container scope.
    let systemd = fixture.cgroups.join("kubepods.slice");
    let burstable = systemd.join("kubepods-burstable.slice").join(format!(
        "kubepods-burstable-pod{}.slice",
        underscored(BURSTABLE)
    ));
    let sandbox = fixture.process_in(&burstable.join("cri-containerd-0a1b.scope"), false);
    // A monitor process in the node's namespace, older than the pod's
    // (CRI-O's conmon may live in the pod's cgroup): passed over.
    let guaranteed = systemd.join(format!("kubepods-pod{}.slice", underscored(GUARANTEED)));
    let monitor = fixture.process_in(&guaranteed.join("conmon"), true);
    let container = fixture.process_in(&guaranteed.join("cri-containerd-2c3d.scope"), false);
    assert!(monitor < container);
    // A hostNetwork pod, and a pod whose containers have not started.
    fixture.process_in(
        &systemd
            .join("kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                underscored(HOST_NETWORK)
            ))
            .join("cri-containerd-4e5f.scope"),
        true,
    );
    cgroup::create(&systemd.join(format!("kubepods-pod{}.slice", underscored(EMPTY)))).unwrap();

    let pods = CgroupNetns::with_host_netns(&systemd, Path::new("/proc/self/ns/net"));
    let found = pods.locate(BURSTABLE).unwrap();
    assert_eq!(found, PathBuf::from(format!("/proc/{sandbox}/ns/net")));
    assert_eq!(ino(&found), inode);
    assert_eq!(
        pods.locate(GUARANTEED).unwrap(),
        PathBuf::from(format!("/proc/{container}/ns/net"))
    );
    let why = pods.locate(HOST_NETWORK).unwrap_err();
    assert!(why.contains("hostNetwork"), "{why}");
    let why = pods.locate(EMPTY).unwrap_err();
    assert!(why.contains("holds no process yet"), "{why}");
    // Without a readable node namespace (no hostPID), nothing is guessed.
    let blind = CgroupNetns::with_host_netns(&systemd, Path::new("/nonexistent/ns/net"));
    let why = blind.locate(BURSTABLE).unwrap_err();
    assert!(why.contains("hostPID"), "{why}");
    let why = pods
        .locate("deadbeef-0000-4000-8000-000000000000")
        .unwrap_err();
    assert!(why.contains("no cgroup named after pod"), "{why}");

    // A second container joins: the path found stays while its process
    // lives. The first one goes: the second leads to the same namespace
    // (which the proxy recognises by its cookie).
    let app = fixture.process_in(&burstable.join("cri-containerd-6a7b.scope"), false);
    assert_eq!(pods.locate(BURSTABLE).unwrap(), found);
    fixture.kill(sandbox);
    let again = pods.locate(BURSTABLE).unwrap();
    assert_eq!(again, PathBuf::from(format!("/proc/{app}/ns/net")));
    assert_eq!(ino(&again), inode);

    // The cgroupfs driver: kubepods/<qos>/pod<uid>/<container id>.
    let cgroupfs = fixture.cgroups.join("kubepods");
    let uid = "22222222-3333-4444-8555-666666666666";
    let pid = fixture.process_in(
        &cgroupfs
            .join("burstable")
            .join(format!("pod{uid}"))
            .join("9c8d"),
        false,
    );
    let pods = CgroupNetns::with_host_netns(&cgroupfs, Path::new("/proc/self/ns/net"));
    assert_eq!(
        pods.locate(uid).unwrap(),
        PathBuf::from(format!("/proc/{pid}/ns/net"))
    );
    // Pods of the other layout are not this one's.
    assert!(pods.locate(BURSTABLE).is_err());
}
