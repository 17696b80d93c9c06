//! A packet capture on every interface of one of the cluster's namespaces
//! (the fabric between nodes): what an observer on the wire would see.

use std::{
    io::{self, Read as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::netns;

/// `ETH_P_ALL`: every protocol.
const ETH_P_ALL: u16 = 0x0003;

/// Captures frames until [`Sniffer::stop`].
#[derive(Debug)]
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<io::Result<Vec<u8>>>,
}

impl Sniffer {
    /// Starts capturing in the named namespace; returns once the capture
    /// socket is open, so nothing sent afterwards is missed.
    pub fn start(namespace: &str) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let name = namespace.to_owned();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            netns::run_in(&name, || {
                let socket = Socket::new(
                    Domain::PACKET,
                    Type::RAW,
                    Some(Protocol::from(i32::from(ETH_P_ALL.to_be()))),
                );
                let socket = match socket {
                    Ok(socket) => socket,
                    Err(error) => {
                        let _ = ready_tx.send(Err(io::Error::new(error.kind(), error.to_string())));
                        return Err(error);
                    }
                };
                socket.set_read_timeout(Some(Duration::from_millis(100)))?;
                let _ = ready_tx.send(Ok(()));
                let mut file = std::fs::File::from(std::os::fd::OwnedFd::from(socket));
                let mut seen = Vec::new();
                let mut frame = vec![0u8; 65536];
                while !stopping.load(Ordering::Acquire) {
                    match file.read(&mut frame) {
                        Ok(n) => seen.extend_from_slice(&frame[..n]),
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(seen)
            })
        });
        ready
            .recv()
            .map_err(|_| io::Error::other("the capture thread ended early"))??;
        Ok(Self { stop, thread })
    }

    /// Stops and returns every captured frame's bytes, concatenated.
    pub fn stop(self) -> io::Result<Vec<u8>> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .map_err(|_| io::Error::other("the capture thread panicked"))?
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
