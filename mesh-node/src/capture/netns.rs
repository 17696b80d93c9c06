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

type Job = Box<dyn FnOnce() + Send>;

/// A thread that lives in one pod's network namespace and runs short jobs
/// there — making sockets, reading addresses — for the rest of the process.
/// A socket stays in the namespace it was created in, so the proxy's async
/// code uses the sockets this thread makes like any other.
///
/// The thread ends when the last handle is dropped.
#[derive(Clone, Debug)]
pub struct NetnsThread {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl NetnsThread {
    /// Starts the thread and enters the namespace at `netns`.
    pub fn spawn(netns: &Path) -> io::Result<Self> {
        let file = File::open(netns)?;
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let (entered, entered_rx) = std::sync::mpsc::channel();
        thread::Builder::new()
            .name("netns".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                // SAFETY: `file` is an open namespace file; setns only reads
                // the descriptor, and changes this thread alone.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                let result = if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                };
                let ok = result.is_ok();
                let _ = entered.send(result);
                if ok {
                    while let Ok(job) = queue.recv() {
                        job();
                    }
                }
            })?;
        entered_rx
            .recv()
            .map_err(|_| io::Error::other("the namespace thread died"))??;
        Ok(Self { jobs })
    }

    /// Runs `f` inside the namespace and returns its result.
    pub async fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("the namespace thread has stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("the namespace thread dropped the job"))?
    }
}

/// The namespace's global addresses (not loopback, not link-local), read
/// from the calling thread's namespace.
pub fn current_addresses() -> io::Result<Vec<std::net::IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addresses = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, which
        // stays valid until freeifaddrs.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a non-null `ifa_addr` points at a sockaddr whose family
        // says which concrete type it is.
        let address = unsafe {
            match i32::from((*entry.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*entry.ifa_addr.cast::<libc::sockaddr_in>();
                    std::net::IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
                }
                libc::AF_INET6 => {
                    let sin6 = &*entry.ifa_addr.cast::<libc::sockaddr_in6>();
                    std::net::IpAddr::from(sin6.sin6_addr.s6_addr)
                }
                _ => continue,
            }
        };
        let link_local = match address {
            std::net::IpAddr::V4(v4) => v4.is_link_local(),
            std::net::IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        if !address.is_loopback() && !link_local && !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(addresses)
}
