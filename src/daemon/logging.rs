//! Logs one line per event: `LEVEL message` with `key=value` fields, never a secret.
//! - stderr by default (the foreground daemon, the CLI); under systemd (JOURNAL_STREAM
//!   set) lines carry `<N>` priority prefixes for journald;
//! - syslog (`/dev/log`, or `EARFS_SYSLOG_SOCKET`) for a background daemon started
//!   without `--log-file` (`EARFS_LOG_TARGET=syslog`, set by `earfs mount`), as
//!   gocryptfs does; stderr if no syslog socket answers.
//!
//! Level from `EARFS_LOG` (error, warn, info, debug, trace; default info).

use std::os::unix::net::UnixDatagram;

use log::{Level, LevelFilter, Metadata, Record};

/// Environment variable choosing the log target (`syslog`; anything else: stderr).
pub const TARGET_ENV: &str = "EARFS_LOG_TARGET";

struct StderrLogger {
    journald: bool,
    syslog: Option<UnixDatagram>,
}

fn severity(l: Level) -> u8 {
    match l {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // fuser is chatty at info about its own internals: keep it at debug.
        if r.target().starts_with("fuser")
            && r.level() > Level::Warn
            && log::max_level() < LevelFilter::Debug
        {
            return;
        }
        // After our own umount(2), fuser's session tries to unmount again on drop and
        // warns that the mount is gone (EINVAL): not news.
        if r.target().starts_with("fuser")
            && log::max_level() < LevelFilter::Debug
            && r.args()
                .to_string()
                .starts_with("Failed to umount filesystem: Invalid argument")
        {
            return;
        }
        if let Some(sock) = &self.syslog {
            // RFC 3164 without a timestamp (the syslog daemon adds it); facility daemon.
            let msg = format!(
                "<{}>earfs[{}]: {}",
                3 * 8 + severity(r.level()),
                std::process::id(),
                r.args()
            );
            if sock.send(msg.as_bytes()).is_ok() {
                return;
            }
        }
        let line = if self.journald {
            format!("<{}>{}\n", severity(r.level()), r.args())
        } else {
            format!("earfs[{}] {} {}\n", std::process::id(), r.level(), r.args())
        };
        use std::io::Write;
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Install the logger (once).
pub fn init() {
    let level = match std::env::var("EARFS_LOG")
        .unwrap_or_default()
        .to_lowercase()
        .as_str()
    {
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        "off" => LevelFilter::Off,
        _ => LevelFilter::Info,
    };
    let syslog = (std::env::var(TARGET_ENV).as_deref() == Ok("syslog"))
        .then(|| {
            let path = std::env::var_os("EARFS_SYSLOG_SOCKET").unwrap_or_else(|| "/dev/log".into());
            let sock = UnixDatagram::unbound().ok()?;
            sock.connect(path).ok()?;
            Some(sock)
        })
        .flatten();
    let logger = StderrLogger {
        journald: std::env::var_os("JOURNAL_STREAM").is_some(),
        syslog,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
