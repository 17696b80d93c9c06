//! Network-namespace helpers: running a closure on a thread that has entered
//! a pod's namespace (the in-pod model: one node process, sockets in many
//! pods), and reading a namespace's cookie.
#![allow(unsafe_code)]

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    thread,
};

use mesh_common::capture::NetnsCookie;

/// Runs `f` on a new thread inside the network namespace at `netns`.
///
/// `setns(CLONE_NEWNET)` changes only the calling thread, so the thread is
/// used for `f` alone and ends with it; the rest of the process stays where
/// it was.
pub fn in_netns<T, F>(netns: &Path, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> io::Result<T> + Send,
{
    let file = File::open(netns)?;
    thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: `file` is an open namespace file for the whole call;
                // setns only reads the descriptor.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("thread inside the namespace panicked")))
    })
}

/// The kernel's cookie for the network namespace at `netns`: the key the
/// capture programs see through `bpf_get_netns_cookie`.
pub fn cookie(netns: &Path) -> io::Result<NetnsCookie> {
    in_netns(netns, current_cookie)
}

/// The cookie of the calling thread's network namespace.
pub fn current_cookie() -> io::Result<NetnsCookie> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
