//! Child processes of the cluster (servers in pods, node proxies) that are
//! killed when their handle is dropped, and that say when they are ready.

use std::{
    fs::{self, File},
    io::{self, BufRead as _, BufReader, Write as _},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

/// Marks the lines of the channel that came from stderr.
const LOG_MARK: &str = "\u{0}log\u{0}";

/// A running child process, killed and reaped on drop.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: Option<mpsc::Receiver<String>>,
}

/// Where a process's stderr (its log) goes, besides [`Process::wait_for_log`].
#[derive(Debug)]
pub enum Logs {
    /// To this process's stderr.
    Inherit,
    /// Appended to a file.
    File(std::fs::File),
}

impl Process {
    /// Starts `command` with stdout captured line by line.
    pub fn spawn(name: &str, command: Command) -> io::Result<Self> {
        Self::spawn_with(name, command, Logs::Inherit)
    }

    /// [`Process::spawn`], its log going to `logs`.
    pub fn spawn_with(name: &str, mut command: Command, logs: Logs) -> io::Result<Self> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {name}: {e}")))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (lines_tx, lines_rx) = mpsc::channel();
        // Stderr (logs) is passed through, and also offered to
        // `wait_for_log`.
        let logs_tx = lines_tx.clone();
        let mut logs = logs;
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                match &mut logs {
                    Logs::Inherit => eprintln!("{line}"),
                    Logs::File(file) => {
                        let _ = writeln!(file, "{line}");
                    }
                }
                if logs_tx.send(format!("{LOG_MARK}{line}")).is_err() {
                    break;
                }
            }
        });
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            name: name.to_owned(),
            child,
            stdin,
            stdout: Some(lines_rx),
        })
    }

    /// Starts `command` and waits until it prints a line starting with
    /// `ready_prefix` on stdout; returns the process and that line. The
    /// process exiting first, or `timeout` passing, is an error.
    pub fn spawn_ready(
        name: &str,
        command: Command,
        ready_prefix: &str,
        timeout: Duration,
    ) -> io::Result<(Self, String)> {
        Self::spawn_ready_with(name, command, ready_prefix, timeout, Logs::Inherit)
    }

    /// [`Process::spawn_ready`], its log going to `logs`.
    pub fn spawn_ready_with(
        name: &str,
        command: Command,
        ready_prefix: &str,
        timeout: Duration,
        logs: Logs,
    ) -> io::Result<(Self, String)> {
        let mut process = Self::spawn_with(name, command, logs)?;
        let line = process.wait_for_line(ready_prefix, timeout)?;
        Ok((process, line))
    }

    /// Waits for a stdout line starting with `prefix`.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> io::Result<String> {
        self.wait_for(timeout, prefix, |line| {
            (!line.starts_with(LOG_MARK) && line.starts_with(prefix)).then(|| line.to_owned())
        })
    }

    /// Waits for a line of stderr (the process's log) containing `text`.
    pub fn wait_for_log(&mut self, text: &str, timeout: Duration) -> io::Result<String> {
        self.wait_for(timeout, text, |line| {
            let log = line.strip_prefix(LOG_MARK)?;
            log.contains(text).then(|| log.to_owned())
        })
    }

    fn wait_for(
        &mut self,
        timeout: Duration,
        prefix: &str,
        wanted: impl Fn(&str) -> Option<String>,
    ) -> io::Result<String> {
        let lines = self.stdout.as_ref().expect("stdout is captured");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => match wanted(&line) {
                    Some(found) => return Ok(found),
                    None => continue,
                },
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "{} printed no {prefix:?} line within {timeout:?}",
                            self.name
                        ),
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    return Err(io::Error::other(format!(
                        "{} exited ({status}) before printing {prefix:?}",
                        self.name
                    )));
                }
            }
        }
    }

    /// Writes one line to the process's stdin.
    pub fn send_line(&mut self, line: &str) -> io::Result<()> {
        use std::io::Write as _;
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other(format!("{}: stdin is closed", self.name)))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()
    }

    /// Closes the process's stdin and waits for it to exit.
    pub fn finish(mut self) -> io::Result<ExitStatus> {
        drop(self.stdin.take());
        self.child.wait()
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(mut self) -> io::Result<()> {
        self.child.kill()?;
        self.child.wait().map(|_| ())
    }

    /// Kills the process at once (SIGKILL) and reaps it, keeping the
    /// handle (for a field that cannot be moved out).
    pub fn kill_now(&mut self) -> io::Result<()> {
        self.child.kill()?;
        self.child.wait().map(|_| ())
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Asks the process to stop (SIGTERM) and waits for it.
    pub fn terminate(mut self) -> io::Result<ExitStatus> {
        self.signal_term()?;
        self.child.wait()
    }

    /// Asks the process to stop (SIGTERM) and waits at most `limit`; a
    /// process still running then is killed and reported as an error.
    pub fn terminate_within(mut self, limit: Duration) -> io::Result<ExitStatus> {
        self.signal_term()?;
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if std::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} did not stop within {limit:?} of SIGTERM", self.name),
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and returns at once; see [`Process::exited`].
    pub fn request_stop(&self) -> io::Result<()> {
        self.signal_term()
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    fn signal_term(&self) -> io::Result<()> {
        self.signal(libc::SIGTERM)
    }

    /// Freezes the process (SIGSTOP): the kernel still completes TCP
    /// handshakes on its listeners, but nothing is accepted.
    pub fn pause(&self) -> io::Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) -> io::Result<()> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: signals our own child, which has not been reaped yet.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Makes `command` start inside the network namespace at `netns` and the
/// cgroup v2 directory `cgroup` (each when given) before it executes, so the
/// new process never runs an instruction of its own outside them.
pub fn place_before_exec(
    command: &mut Command,
    netns: Option<&Path>,
    cgroup: Option<&Path>,
) -> io::Result<()> {
    let open = |path: &Path, write: bool| -> io::Result<OwnedFd> {
        let file = if write {
            fs::OpenOptions::new().write(true).open(path)
        } else {
            File::open(path)
        };
        file.map(OwnedFd::from)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    };
    let netns = netns.map(|path| open(path, false)).transpose()?;
    let procs = cgroup
        .map(|path| open(&path.join("cgroup.procs"), true))
        .transpose()?;
    // SAFETY: the closure runs between fork and exec and makes only
    // async-signal-safe system calls (write, setns) on descriptors it owns;
    // it allocates nothing.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            if let Some(procs) = &procs {
                // "0" moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(netns) = &netns
                && libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// The value of `key` in a ready line such as
/// `ready api=http://127.0.0.1:15100 grpc=127.0.0.1:15012`.
pub fn ready_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.strip_prefix("ready ")?
        .split_whitespace()
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

/// A binary of this workspace, from the target directory the running test
/// was built in (`cargo build --bins` first; `cargo xtask test` does).
pub fn workspace_binary(name: &str) -> io::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| io::Error::other(format!("{} has no target directory", exe.display())))?;
    let path = profile_dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is not built: run `cargo build --bins` (cargo xtask test does)",
                path.display()
            ),
        ))
    }
}

/// A loopback port nothing listens on now, for a server that cannot report
/// the one it picked itself (another process may take it first; rarely).
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_fields() {
        let line = "ready api=http://127.0.0.1:1 grpc=127.0.0.1:2";
        assert_eq!(ready_field(line, "api"), Some("http://127.0.0.1:1"));
        assert_eq!(ready_field(line, "grpc"), Some("127.0.0.1:2"));
        assert_eq!(ready_field(line, "gr"), None);
        assert_eq!(
            ready_field("ready admin=127.0.0.1:3", "admin"),
            Some("127.0.0.1:3")
        );
        assert_eq!(ready_field("not ready", "admin"), None);
    }
}
