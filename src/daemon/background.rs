//! The background launcher: `earfs mount` without --foreground starts the daemon as a
//! child and waits on a pipe until it reports that the mount serves (or why not).

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};

use super::{Failure, exit, logging};

/// Environment variable naming the readiness pipe of a background daemon.
pub const READY_FD_ENV: &str = "EARFS_READY_FD";

/// Start the daemon in the background: run this binary with `args` (a mount command
/// with --foreground) as a new session, and return once it reports that the mount
/// serves (or why it failed).
pub fn spawn_background(args: Vec<OsString>, log_file: Option<&Path>) -> Result<(), Failure> {
    let io = |what: &str, e: std::io::Error| Failure::new(exit::FAILURE, format!("{what}: {e}"));
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| io("cannot create a pipe", e.into()))?;
    rustix::io::fcntl_setfd(&w, rustix::io::FdFlags::empty()).map_err(|e| io("fcntl", e.into()))?;
    let exe = std::env::current_exe().map_err(|e| io("cannot find the earfs binary", e))?;
    let stderr = match log_file {
        Some(p) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| io(&format!("cannot open log file {}", p.display()), e))?,
        ),
        None => Stdio::null(),
    };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&w);
    let mut cmd = Command::new(exe);
    if log_file.is_none() {
        cmd.env(logging::TARGET_ENV, "syslog");
    }
    let mut child = cmd
        .args(args)
        .env(READY_FD_ENV, raw.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| io("cannot start the daemon", e))?;
    drop(w);
    let mut msg = String::new();
    let _ = File::from(r).read_to_string(&mut msg);
    let line = msg.lines().next().unwrap_or("");
    if line == "READY" {
        return Ok(());
    }
    if let Some(rest) = line.strip_prefix("FAIL ") {
        let (code, text) = rest.split_once('\t').unwrap_or(("1", rest));
        let _ = child.wait();
        return Err(Failure::new(code.parse().unwrap_or(exit::FAILURE), text));
    }
    let status = child.wait().map_err(|e| io("daemon", e))?;
    Err(Failure::new(
        exit::FAILURE,
        format!(
            "the earfs daemon exited ({status}) before the mount was ready; run with --foreground to see why"
        ),
    ))
}

/// Readiness reporting to a parent `earfs mount` (if any).
pub(super) struct Ready(Option<File>);

impl Ready {
    pub(super) fn from_env() -> Ready {
        let fd: Option<OwnedFd> = std::env::var(READY_FD_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .and_then(crate::sys::inherited_fd);
        // The variable stays set (removing it needs `unsafe` in edition 2024); it is
        // harmless: the daemon starts no child that reads it.
        Ready(fd.map(File::from))
    }
    pub(super) fn detached(&self) -> bool {
        self.0.is_some()
    }
    pub(super) fn ok(&mut self) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(b"READY\n");
        }
    }
    pub(super) fn fail(&mut self, f: &Failure) {
        if let Some(mut p) = self.0.take() {
            let _ = writeln!(p, "FAIL {}\t{}", f.code, f.message.replace('\n', " "));
        }
    }
}
