//! A fixed delay on a namespace's outgoing link, as netem would add (this
//! kernel has no netem): iptables hands each packet leaving through the
//! device to this process over NFQUEUE, and a thread gives it back to the
//! kernel once it has waited the delay. Packets keep their order; when the
//! kernel's queue is full they are dropped, as a full link buffer would.

use std::{
    collections::VecDeque,
    io,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::netns;

/// The NFQUEUE number the rules send to (one queue per namespace).
const QUEUE: u16 = 88;
/// Packets the kernel holds for us before dropping new ones.
const QUEUE_LEN: u32 = 16_384;
/// How often a waiting thread looks for new packets.
const POLL: Duration = Duration::from_millis(1);

/// Delays every TCP packet leaving `device` in some namespaces; removes its
/// rules and stops when dropped.
#[derive(Debug)]
pub struct LinkDelay {
    rules: Vec<(String, Vec<String>)>,
    stop: Arc<AtomicBool>,
    delayed: Arc<AtomicU64>,
    /// Why a thread stopped before it was told to: from then on its
    /// namespace's packets are dropped, not delayed.
    failure: Arc<Mutex<Option<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl LinkDelay {
    /// Delays TCP leaving `device` in each of `namespaces` by `delay`,
    /// IPv4 and IPv6. Both ends of a link delayed add twice `delay` to the
    /// round trip.
    pub fn add(namespaces: &[String], device: &str, delay: Duration) -> io::Result<Self> {
        let mut this = Self {
            rules: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            delayed: Arc::new(AtomicU64::new(0)),
            failure: Arc::default(),
            threads: Vec::new(),
        };
        for name in namespaces {
            // The socket belongs to the namespace it was opened in, so it
            // is bound there, then served from an ordinary thread.
            let queue = netns::run_in(name, || {
                let mut queue = nfq::Queue::open()?;
                queue.bind(QUEUE)?;
                queue.set_copy_range(QUEUE, 0)?;
                queue.set_queue_max_len(QUEUE, QUEUE_LEN)?;
                queue.set_fail_open(QUEUE, false)?;
                queue.set_recv_gso(QUEUE, true)?;
                queue.set_nonblocking(true);
                Ok(queue)
            })?;
            let (stop, delayed) = (this.stop.clone(), this.delayed.clone());
            let (failure, netns) = (this.failure.clone(), name.clone());
            this.threads
                .push(
                    thread::Builder::new()
                        .name(format!("delay-{name}"))
                        .spawn(move || {
                            if let Err(error) = serve(queue, delay, &stop, &delayed) {
                                let mut failure = failure.lock().unwrap_or_else(|e| e.into_inner());
                                failure.get_or_insert(format!("delaying in {netns}: {error}"));
                            }
                        })?,
                );
            for tool in ["iptables", "ip6tables"] {
                let rule: Vec<String> = [
                    "POSTROUTING",
                    "-o",
                    device,
                    "-p",
                    "tcp",
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    &QUEUE.to_string(),
                ]
                .map(str::to_owned)
                .to_vec();
                iptables(name, tool, "-A", &rule)?;
                let mut owned = vec![tool.to_owned()];
                owned.extend(rule);
                this.rules.push((name.clone(), owned));
            }
        }
        Ok(this)
    }

    /// Packets delayed so far.
    pub fn delayed(&self) -> u64 {
        self.delayed.load(Ordering::Relaxed)
    }

    /// Why delaying stopped early, if it did (the link then drops).
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for LinkDelay {
    fn drop(&mut self) {
        // Rules first: a packet queued with no reader would be dropped.
        for (name, rule) in self.rules.drain(..) {
            if let Some((tool, rule)) = rule.split_first()
                && let Err(error) = iptables(&name, tool, "-D", rule)
            {
                eprintln!("removing the delay in {name}: {error}");
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                eprintln!("delay thread panicked");
            }
        }
        if let Some(failure) = self.failure() {
            eprintln!("{failure}");
        }
    }
}

fn iptables(netns: &str, tool: &str, action: &str, rule: &[String]) -> io::Result<()> {
    let output = Command::new("ip")
        .args(["netns", "exec", netns, tool, "-w", "-t", "mangle", action])
        .args(rule)
        .output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{tool} {action} {rule:?} in {netns}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Gives each queued packet back `delay` after it arrived, in order, until
/// told to stop; then gives back what it still holds at once.
fn serve(
    mut queue: nfq::Queue,
    delay: Duration,
    stop: &AtomicBool,
    delayed: &AtomicU64,
) -> io::Result<()> {
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    let accept = |queue: &mut nfq::Queue, mut message: nfq::Message| {
        message.set_verdict(nfq::Verdict::Accept);
        delayed.fetch_add(1, Ordering::Relaxed);
        queue.verdict(message)
    };
    while !stop.load(Ordering::Relaxed) {
        loop {
            match queue.recv() {
                Ok(message) => held.push_back((Instant::now() + delay, message)),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, message)) = held.pop_front() {
                accept(&mut queue, message)?;
            }
        }
        let wait = held.front().map_or(POLL, |(due, _)| {
            due.saturating_duration_since(now).min(POLL)
        });
        thread::sleep(wait);
    }
    for (_, message) in held {
        accept(&mut queue, message)?;
    }
    Ok(())
}
