//! The cluster's cgroup v2 directories: creating them, killing what runs in
//! them and removing them.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// The root of the cgroup v2 hierarchy: `/sys/fs/cgroup/unified` on hybrid
/// machines, `/sys/fs/cgroup` where v2 is the only hierarchy.
pub fn root() -> io::Result<PathBuf> {
    for candidate in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let candidate = Path::new(candidate);
        if candidate.join("cgroup.controllers").is_file() {
            return Ok(candidate.to_owned());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no cgroup v2 hierarchy mounted at /sys/fs/cgroup/unified or /sys/fs/cgroup",
    ))
}

/// Creates `path` and any missing parents.
pub fn create(path: &Path) -> io::Result<()> {
    fs::create_dir_all(path)
        .map_err(|e| io::Error::new(e.kind(), format!("creating cgroup {}: {e}", path.display())))
}

/// Process ids in `path` itself (not its children).
pub fn procs(path: &Path) -> io::Result<Vec<u32>> {
    let text = fs::read_to_string(path.join("cgroup.procs"))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Whether any process runs in `path` or below.
pub fn populated(path: &Path) -> io::Result<bool> {
    let events = fs::read_to_string(path.join("cgroup.events"))?;
    Ok(events.lines().any(|line| line.trim() == "populated 1"))
}

/// Kills every process in `path` and below (`cgroup.kill`) and waits until
/// the kernel reports the subtree empty. A process stuck in uninterruptible
/// sleep past `deadline` makes this an error rather than a hang.
pub fn kill_all(path: &Path, deadline: Duration) -> io::Result<()> {
    if !path.exists() || !populated(path)? {
        return Ok(());
    }
    fs::write(path.join("cgroup.kill"), "1")?;
    let start = Instant::now();
    while populated(path)? {
        if start.elapsed() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "processes in {} survived SIGKILL for {deadline:?}",
                    path.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Removes `path` and every cgroup below it, deepest first. The subtree
/// must be empty of processes (see [`kill_all`]). Returns how many cgroups
/// were removed.
pub fn remove_tree(path: &Path) -> io::Result<usize> {
    if !path.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            removed += remove_tree(&entry.path())?;
        }
    }
    fs::remove_dir(path).map_err(|e| {
        io::Error::new(e.kind(), format!("removing cgroup {}: {e}", path.display()))
    })?;
    Ok(removed + 1)
}
