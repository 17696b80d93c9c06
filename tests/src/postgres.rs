//! A private PostgreSQL server for tests: `initdb` in a temporary
//! directory, a free loopback port, trust authentication for the `mesh`
//! role, durability off (tests, not data). Stopped and deleted on drop.
//! As root it runs as the `postgres` system user, since PostgreSQL refuses
//! to run as root.

use std::{
    ffi::CString,
    fs, io,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::process::free_port;

/// A running test server.
#[derive(Debug)]
pub struct TestPostgres {
    dir: PathBuf,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    port: u16,
    /// `None` while stopped.
    child: Option<Child>,
    url: String,
}

impl TestPostgres {
    /// Initialises and starts a server; returns once it accepts connections.
    pub fn start() -> io::Result<Self> {
        let bin = bin_dir()?;
        let user = run_as()?;
        let dir = std::env::temp_dir().join(format!("mesh-pg-{}-{}", std::process::id(), unique()));
        fs::create_dir_all(&dir)?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        let data = dir.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "mesh",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdout(Stdio::null());
        as_user(&mut initdb, user);
        let output = initdb.output()?;
        if !output.status.success() {
            let _ = fs::remove_dir_all(&dir);
            return Err(io::Error::other(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }

        let port = free_port()?;
        let mut server = Self {
            url: format!("postgres://mesh@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            user,
            port,
            child: None,
        };
        server.resume()?;
        Ok(server)
    }

    /// Starts the stopped server again, on its port and data; returns once
    /// it accepts connections. Does nothing if it runs.
    pub fn resume(&mut self) -> io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log_path = self.dir.join("postgres.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(&log_path, Some(uid), Some(gid))?;
        }
        let mut postgres = Command::new(self.bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .args(["-c", "max_connections=400", "-c", "shared_buffers=64MB"])
            .stdout(log.try_clone()?)
            .stderr(log);
        as_user(&mut postgres, self.user);
        self.child = Some(postgres.spawn()?);
        self.wait_ready(Duration::from_secs(60))
    }

    /// Stops the server ("fast" shutdown: sessions end, the server exits
    /// promptly); [`Self::resume`] starts it again.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: signals our own child, which has not been reaped yet.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// `postgres://mesh@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn wait_ready(&self, deadline: Duration) -> io::Result<()> {
        let start = Instant::now();
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()?;
            if ready.success() {
                return Ok(());
            }
            if start.elapsed() > deadline {
                let log = fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("PostgreSQL did not accept connections within {deadline:?}:\n{log}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The newest installed PostgreSQL's `bin/`.
fn bin_dir() -> io::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("PostgreSQL is not installed (/usr/lib/postgresql: {e})"),
            )
        })?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no PostgreSQL server under /usr/lib/postgresql",
        )
    })
}

/// As root, the `postgres` user's uid and gid; otherwise run as ourselves.
fn run_as() -> io::Result<Option<(u32, u32)>> {
    if crate::require_root().is_err() {
        return Ok(None);
    }
    let name = CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam returns a pointer into static storage or null; it is
    // read immediately, before any other call could overwrite it.
    #[allow(unsafe_code)]
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "running as root, but there is no postgres user to run PostgreSQL as (apt-get install postgresql)",
        ));
    }
    // SAFETY: non-null pointer from getpwnam, see above.
    #[allow(unsafe_code)]
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Some((uid, gid)))
}

fn as_user(command: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid).current_dir("/");
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
