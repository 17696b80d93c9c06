//! Guards the choice of cgroup the capture programs attach to.

use std::path::{Path, PathBuf};

use super::CaptureError;

/// Returns the canonical path of `cgroup` if the programs may attach there:
/// a cgroup v2 directory that is not the root of its hierarchy. Attaching to
/// the root would capture every process on the machine, the proxy included.
pub(super) fn check_attachable(cgroup: &Path) -> Result<PathBuf, CaptureError> {
    let refuse = |reason: &str| CaptureError::Cgroup {
        path: cgroup.to_owned(),
        reason: reason.to_owned(),
    };
    let path = cgroup
        .canonicalize()
        .map_err(|e| refuse(&format!("cannot resolve the path: {e}")))?;
    // Every cgroup v2 directory, the root included, has `cgroup.controllers`;
    // cgroup v1 directories and ordinary directories do not.
    if !path.join("cgroup.controllers").is_file() {
        return Err(refuse("not a cgroup v2 directory"));
    }
    let parent_is_cgroup = path
        .parent()
        .is_some_and(|parent| parent.join("cgroup.controllers").is_file());
    if !parent_is_cgroup {
        return Err(refuse(
            "the root of the cgroup hierarchy: capture attaches only to the cgroup that holds the pods",
        ));
    }
    Ok(path)
}
