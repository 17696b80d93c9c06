//! Installs what building and testing need, idempotently: a second run only
//! checks, and changes nothing.
//!
//! - Debian packages the tests use (`apt-get`, as root).
//! - The nightly toolchain's `rust-src` (the eBPF build recompiles `core`).
//! - `bpf-linker`, built against the nightly's own libLLVM: no LLVM of that
//!   version is packaged for Debian 12, but the nightly ships one.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run::{self, output, step};

/// Debian packages the build and the tests use.
/// (`prometheus` for `promtool`, which checks the nodes' metrics;
/// `python3-venv` for the trace store's and the manifest validator's
/// environments; `nftables` to lose packets between the test nodes,
/// `iptables` to queue them to the test for a delay.)
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "nftables",
    "postgresql",
    "prometheus",
    "python3-venv",
];
/// The bpf-linker release the eBPF build is verified with.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Runs every set-up step.
pub fn run() -> anyhow::Result<()> {
    step("checking set-up");
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    Ok(())
}

/// Every set-up step, and what only the tests use.
pub fn for_tests() -> anyhow::Result<()> {
    run()?;
    cargo_fuzz()?;
    phoenix()
}

/// The cargo-fuzz release the fuzz targets are run with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, which builds the fuzz targets with libFuzzer and the
/// sanitizer flags on the nightly.
fn cargo_fuzz() -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if let Some(version) = &installed
        && version.ends_with(CARGO_FUZZ_VERSION)
    {
        println!("    {version}: present");
        return Ok(());
    }
    step(&format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} (runs the fuzz targets; about a minute, once)"
    ));
    run::run(
        Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked", "--force"])
            .args(["--version", CARGO_FUZZ_VERSION])
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
    )
}

/// The arize-phoenix release the tracing test reads spans back from.
const PHOENIX_VERSION: &str = "20.26.1";

/// Where the trace backend the tests use lives: a Python venv outside
/// `target/`, so `cargo clean` keeps it. The tests look for it here too.
pub fn phoenix_venv() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(Path::new(&home).join(".cache/mesh/phoenix"))
}

/// arize-phoenix from PyPI: a real OpenTelemetry trace store with a
/// query API, for the tracing test (about 850 MB, 90 s, once).
fn phoenix() -> anyhow::Result<()> {
    let venv = phoenix_venv()?;
    let pip = venv.join("bin/pip");
    let installed = Command::new(&pip)
        .args(["show", "arize-phoenix"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == format!("Version: {PHOENIX_VERSION}"))
        });
    if installed {
        println!("    arize-phoenix {PHOENIX_VERSION}: present");
        return Ok(());
    }
    step(&format!(
        "installing arize-phoenix {PHOENIX_VERSION} (the trace store the tracing test reads; about 90 s, once)"
    ));
    run::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run::run(
        Command::new(&pip)
            .args(["install", "-q", "--disable-pip-version-check"])
            .arg(format!("arize-phoenix=={PHOENIX_VERSION}")),
    )
}

/// Debian packages only the benchmarks use: the reference proxy, the
/// load generators, and perf (to count the proxies' system calls).
const BENCH_PACKAGES: &[&str] = &[
    "haproxy",
    "iperf3",
    "linux-perf",
    "nghttp2-client",
    "nghttp2-server",
    "wrk",
];

/// What `cargo xtask bench datapath` needs beyond the build.
pub fn bench_tools() -> anyhow::Result<()> {
    run()?;
    install(BENCH_PACKAGES)
}

fn apt_packages() -> anyhow::Result<()> {
    install(APT_PACKAGES)
}

fn install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        println!("    Debian packages: {} present", packages.join(", "));
        return Ok(());
    }
    if !run::is_root() {
        bail!(
            "Debian packages missing: {}; run as root or `sudo apt-get install -y {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(", ")
    ));
    run::run(Command::new("apt-get").arg("update").arg("-q"))?;
    run::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"installed")
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).context(
        "the nightly toolchain is needed for the eBPF build: `rustup toolchain install nightly`",
    )?;
    Ok(PathBuf::from(sysroot.trim()))
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    let core = sysroot.join("lib/rustlib/src/rust/library/core");
    if core.is_dir() {
        println!("    nightly rust-src: present");
        return Ok(());
    }
    step("installing the nightly toolchain's rust-src");
    run::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn bpf_linker() -> anyhow::Result<()> {
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let llvm = NightlyLlvm::find()?;
    // A bpf-linker that no longer starts (the nightly it was linked against
    // changed) is rebuilt like a missing one.
    if let Some(version) = &installed
        && version.ends_with(BPF_LINKER_VERSION)
        && llvm.prefix_is_current()
    {
        println!("    {version}: present");
        return Ok(());
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {} (about a minute)",
        llvm.major
    ));
    llvm.write_prefix()?;
    run::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--no-default-features",
            ])
            .args(["--version", BPF_LINKER_VERSION])
            .args(["--features", &format!("llvm-{}", llvm.major)])
            .env("LLVM_PREFIX", &llvm.prefix)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
    )
}

/// The nightly toolchain's libLLVM, and the LLVM "prefix" bpf-linker's build
/// expects: `bin/llvm-config` (a placeholder) and `lib/` links to that
/// library. bpf-linker keeps the prefix's `lib/` as its run path, so the
/// prefix lives outside `target/` and survives `cargo clean`.
struct NightlyLlvm {
    /// The library files, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
    libraries: Vec<PathBuf>,
    major: String,
    prefix: PathBuf,
}

impl NightlyLlvm {
    fn find() -> anyhow::Result<Self> {
        let lib = nightly_sysroot()?.join("lib");
        let mut libraries = Vec::new();
        let mut major = None;
        for entry in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
            let path = entry?.path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if !name.starts_with("libLLVM") {
                continue;
            }
            if let Some(version) = name.strip_prefix("libLLVM.so.") {
                major = version.split('.').next().map(str::to_owned);
            }
            libraries.push(path);
        }
        let major = major.with_context(|| {
            format!(
                "no libLLVM.so.<version> in {}: the nightly toolchain looks incomplete",
                lib.display()
            )
        })?;
        let home = std::env::var_os("HOME").context("HOME is not set")?;
        let prefix = Path::new(&home).join(".cache/mesh/llvm-prefix");
        Ok(Self {
            libraries,
            major,
            prefix,
        })
    }

    fn versioned_library(&self) -> &Path {
        self.libraries
            .iter()
            .find(|p| p.to_string_lossy().contains("libLLVM.so."))
            .expect("find() saw a libLLVM.so.<version>")
    }

    /// Whether the prefix links to the nightly's current library.
    fn prefix_is_current(&self) -> bool {
        let link = self.prefix.join("lib/libLLVM.so");
        fs::read_link(&link).is_ok_and(|target| target == self.versioned_library())
            && self.versioned_library().exists()
    }

    fn write_prefix(&self) -> anyhow::Result<()> {
        let bin = self.prefix.join("bin");
        let lib = self.prefix.join("lib");
        if lib.exists() {
            fs::remove_dir_all(&lib).with_context(|| format!("clearing {}", lib.display()))?;
        }
        fs::create_dir_all(&bin)?;
        fs::create_dir_all(&lib)?;
        let config = bin.join("llvm-config");
        fs::write(
            &config,
            "#!/bin/sh\n# placeholder: bpf-linker only needs LLVM_PREFIX/lib\n",
        )?;
        fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        for library in &self.libraries {
            let name = library.file_name().expect("a file");
            std::os::unix::fs::symlink(library, lib.join(name))
                .with_context(|| format!("linking {}", library.display()))?;
        }
        std::os::unix::fs::symlink(self.versioned_library(), lib.join("libLLVM.so"))?;
        Ok(())
    }
}
