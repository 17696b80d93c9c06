//! `meshctl check --node` on this machine, for real: with root's
//! privileges every BPF feature the capture programs use is found; with
//! every capability dropped the check says which are missing and fails;
//! a cgroup mesh-node would refuse is named as such.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use mesh_e2e::{cgroup, process::workspace_binary, require_root};
use serde_json::Value;

struct Checked {
    success: bool,
    findings: Vec<Value>,
}

impl Checked {
    fn level_of(&self, what: &str) -> Vec<&str> {
        self.findings
            .iter()
            .filter(|f| f["what"].as_str().is_some_and(|w| w.contains(what)))
            .map(|f| f["level"].as_str().unwrap())
            .collect()
    }

    fn errors(&self) -> Vec<&str> {
        self.findings
            .iter()
            .filter(|f| f["level"] == "error")
            .map(|f| f["what"].as_str().unwrap())
            .collect()
    }

    fn group(&self, group: &str) -> Vec<&Value> {
        self.findings
            .iter()
            .filter(|f| f["group"] == group)
            .collect()
    }
}

fn check(wrapper: &[&str], cgroup: &Path) -> Checked {
    let meshctl = workspace_binary("meshctl").expect("meshctl is built");
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&meshctl);
            c
        }
        None => Command::new(&meshctl),
    };
    let output = command
        .args(["check", "--node", "-o", "json", "--cgroup"])
        .arg(cgroup)
        .output()
        .expect("running meshctl");
    let findings = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "meshctl check --node printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    Checked {
        success: output.status.success(),
        findings,
    }
}

/// A cgroup made for the test, removed when dropped.
struct TestCgroup(PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn the_node_check_finds_what_this_machine_has_and_what_a_process_lacks() {
    require_root().expect("root");
    let pods = TestCgroup(
        cgroup::root()
            .unwrap()
            .join(format!("mesh-check-{}", std::process::id())),
    );
    cgroup::create(&pods.0).unwrap();

    // Root, as the DaemonSet runs it: the kernel has every feature.
    let full = check(&[], &pods.0);
    assert!(full.success, "errors: {:?}", full.errors());
    assert_eq!(full.errors(), Vec::<&str>::new());
    let bpf = full.group("bpf features");
    assert_eq!(bpf.len(), 11, "{bpf:?}");
    assert!(bpf.iter().all(|f| f["level"] == "pass"), "{bpf:?}");
    for needed in ["CAP_NET_ADMIN:", "CAP_SYS_ADMIN:", "CAP_SYS_PTRACE:"] {
        assert_eq!(full.level_of(needed), ["pass"], "{needed}");
    }
    assert_eq!(full.level_of("below the root"), ["pass"]);
    assert_eq!(full.level_of("at least 5.15"), ["pass"]);

    // Every capability dropped (still uid 0): named one by one, the BPF
    // probe refused, and the check fails.
    let bare = check(
        &["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"],
        &pods.0,
    );
    assert!(!bare.success);
    for needed in ["CAP_NET_ADMIN:", "CAP_SYS_ADMIN:", "CAP_SYS_PTRACE:"] {
        assert_eq!(bare.level_of(needed), ["error"], "{needed}");
    }
    assert_eq!(bare.level_of("CAP_SYS_RESOURCE"), ["warning"]);
    assert_eq!(
        bare.level_of("cannot probe the kernel's BPF features"),
        ["error"]
    );
    assert!(bare.group("bpf features").len() == 1);

    // The root of the hierarchy is refused, as mesh-node refuses it.
    let at_root = check(&[], &cgroup::root().unwrap());
    assert!(!at_root.success);
    assert_eq!(at_root.level_of("root of the cgroup hierarchy"), ["error"]);
}
