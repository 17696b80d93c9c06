//! `mesh-pod`: the workload the local cluster runs inside its pods.
//!
//! `mesh-pod echo --listen [::]:8080` serves TCP echo and prints
//! `listening <addr>` once bound; `mesh-pod connect --to ADDR --count N`
//! makes N connections, checks each echoes a message back, and prints a JSON
//! summary. It exits non-zero if any connection failed.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::Duration,
};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve TCP echo.
    Echo {
        #[arg(long, default_value = "[::]:8080")]
        listen: SocketAddr,
    },
    /// Connect COUNT times, one connection after another.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Echo { listen } => match echo(listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("mesh-pod echo: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Connect { to, count } => connect(to, count),
    }
}

fn echo(listen: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    println!("listening {}", listener.local_addr()?);
    io::stdout().flush()?;
    for stream in listener.incoming() {
        let stream = stream?;
        thread::spawn(move || {
            let _ = serve(stream);
        });
    }
    Ok(())
}

fn serve(mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

fn connect(to: SocketAddr, count: u32) -> ExitCode {
    let mut failures = Vec::new();
    for attempt in 0..count {
        if let Err(error) = round_trip(to, attempt) {
            failures.push(format!("connection {attempt}: {error}"));
        }
    }
    let summary = serde_json::json!({
        "to": to.to_string(),
        "attempted": count,
        "ok": count as usize - failures.len(),
        "failures": failures,
    });
    println!("{summary}");
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn round_trip(to: SocketAddr, attempt: u32) -> io::Result<()> {
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&to, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let message = format!("mesh-pod {attempt}\n");
    stream.write_all(message.as_bytes())?;
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed)?;
    if echoed != message.as_bytes() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the echo differs from what was sent",
        ));
    }
    Ok(())
}
