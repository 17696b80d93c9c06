//! Named network namespaces (`/run/netns/NAME`, as `ip netns` keeps them):
//! listing them and writing their sysctls.
#![allow(unsafe_code)]

use std::{
    fs::{self, File},
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    thread,
};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The path of the named namespace `name`.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Names of the named namespaces that start with `prefix`, sorted.
pub fn list(prefix: &str) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Runs `f` on a thread that has entered the namespace `name`; only that
/// thread changes namespace.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let file = File::open(path(name))?;
    thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: `file` is an open namespace file for the whole call.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("thread inside the namespace panicked")))
    })
}

/// Writes the sysctl `key` (dotted, e.g. `net.ipv4.ip_forward`) inside the
/// namespace `name`. `/proc/sys/net` belongs to the namespace of the thread
/// that opens it.
pub fn sysctl(name: &str, key: &str, value: &str) -> io::Result<()> {
    let file = Path::new("/proc/sys").join(key.replace('.', "/"));
    run_in(name, || fs::write(&file, value))
        .map_err(|e| io::Error::new(e.kind(), format!("sysctl {key}={value} in {name}: {e}")))
}
