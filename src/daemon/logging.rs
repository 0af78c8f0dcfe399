//! Logs one line per event: `LEVEL message` with `key=value` fields, never a secret.
//! Where a line goes, first match wins:
//! - a log file (`earfs mount --log-file FILE`, background or foreground): lines
//!   `RFC3339-TIME earfs[PID] LEVEL message`, the time with the local UTC offset; the
//!   file is opened again by name on SIGHUP ([`reopen`]), for logrotate without
//!   copytruncate;
//! - syslog (`/dev/log`, or `EARFS_SYSLOG_SOCKET`) for a background daemon started
//!   without `--log-file` (`EARFS_LOG_TARGET=syslog`, set by `earfs mount`), as
//!   gocryptfs does;
//! - under systemd (JOURNAL_STREAM set), the journal's native protocol: one datagram
//!   per event to `/run/systemd/journal/socket` (or `EARFS_JOURNAL_SOCKET`) with
//!   `MESSAGE=`, `PRIORITY=`, `SYSLOG_IDENTIFIER=earfs` and the structured fields
//!   `VOLUME_ID=`, `MOUNTPOINT=` (once the daemon knows them, [`set_context`]) and
//!   `INODE=`, `ERRNO=` (from the event's `ino`/`errno` key-values); if that socket
//!   does not answer, stderr lines with `<N>` priority prefixes;
//! - stderr (the foreground daemon, the CLI): `earfs[PID] LEVEL message`.
//!
//! The level: `--log-level`/`-v`/`-q` ([`set_flag_level`]) over the config file's
//! `log_level` over `EARFS_LOG` (error, warn, info, debug, trace, off) over info.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Metadata, Record};

/// Environment variable choosing the log target (`syslog`; anything else: stderr).
pub const TARGET_ENV: &str = "EARFS_LOG_TARGET";
/// Environment variable naming the journal's socket (tests; default the systemd one).
pub const JOURNAL_SOCKET_ENV: &str = "EARFS_JOURNAL_SOCKET";
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

struct LogFile {
    path: PathBuf,
    file: File,
}

struct Logger {
    /// Under journald (JOURNAL_STREAM set).
    journald: bool,
    /// The journal's native socket, if it answered at start.
    journal: Option<(UnixDatagram, PathBuf)>,
    syslog: Option<UnixDatagram>,
    file: Mutex<Option<LogFile>>,
    /// Fields of every journal entry (VOLUME_ID, MOUNTPOINT).
    context: Mutex<Vec<(&'static str, String)>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();
/// The level of `EARFS_LOG` (or info), read at start.
static ENV_LEVEL: OnceLock<LevelFilter> = OnceLock::new();
/// The level the command line asked for; wins over the config file, reloads included.
static FLAG_LEVEL: OnceLock<LevelFilter> = OnceLock::new();

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn severity(l: Level) -> u8 {
    match l {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// A level by name (error, warn, info, debug, trace, off).
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s.trim().to_lowercase().as_str() {
        "error" => LevelFilter::Error,
        "warn" | "warning" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        "off" => LevelFilter::Off,
        _ => return None,
    })
}

/// `t` in RFC 3339 with microseconds and the local UTC offset, e.g.
/// `2025-03-01T14:05:09.123456+01:00`.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(since.as_secs()).unwrap_or(0);
    let off = crate::sys::utc_offset_seconds(secs);
    let shifted = if off >= 0 {
        t + Duration::from_secs(u64::from(off.unsigned_abs()))
    } else {
        t.checked_sub(Duration::from_secs(u64::from(off.unsigned_abs())))
            .unwrap_or(UNIX_EPOCH)
    };
    // humantime writes UTC with a `Z`; the shifted time with the offset instead.
    let utc = humantime::format_rfc3339_micros(shifted).to_string();
    let stamp = utc.strip_suffix('Z').unwrap_or(&utc);
    let sign = if off < 0 { '-' } else { '+' };
    let m = off.unsigned_abs() / 60;
    format!("{stamp}{sign}{:02}:{:02}", m / 60, m % 60)
}

/// The key-values of a record (`ino`, `errno`, ...), as text.
struct Pairs(Vec<(String, String)>);

impl<'kvs> log::kv::VisitSource<'kvs> for Pairs {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        self.0.push((key.as_str().to_string(), value.to_string()));
        Ok(())
    }
}

/// A journal field name for a record key: `ino` is `INODE`, others upper case
/// (A-Z, 0-9 and `_` only, as journald requires).
fn journal_key(k: &str) -> Option<String> {
    let name: String = match k {
        "ino" | "inode" => "INODE".into(),
        other => other
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect(),
    };
    (!name.is_empty() && name.as_bytes()[0].is_ascii_uppercase()).then_some(name)
}

/// One field of a native journal entry: `KEY=value\n`, or for a value with a newline
/// the binary-safe form `KEY\n`, its length as 64-bit little endian, the value, `\n`.
pub fn journal_field(buf: &mut Vec<u8>, key: &str, value: &[u8]) {
    buf.extend_from_slice(key.as_bytes());
    if value.contains(&b'\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

impl Logger {
    fn journal_entry(&self, r: &Record<'_>, msg: &str) -> Vec<u8> {
        let mut b = Vec::with_capacity(256);
        journal_field(&mut b, "MESSAGE", msg.as_bytes());
        journal_field(
            &mut b,
            "PRIORITY",
            severity(r.level()).to_string().as_bytes(),
        );
        journal_field(&mut b, "SYSLOG_IDENTIFIER", b"earfs");
        journal_field(
            &mut b,
            "SYSLOG_PID",
            std::process::id().to_string().as_bytes(),
        );
        for (k, v) in lock(&self.context).iter() {
            journal_field(&mut b, k, v.as_bytes());
        }
        let mut pairs = Pairs(Vec::new());
        let _ = r.key_values().visit(&mut pairs);
        for (k, v) in &pairs.0 {
            if let Some(k) = journal_key(k) {
                journal_field(&mut b, &k, v.as_bytes());
            }
        }
        b
    }

    fn to_journal(&self, r: &Record<'_>, msg: &str) -> bool {
        let Some((sock, path)) = &self.journal else {
            return false;
        };
        let entry = self.journal_entry(r, msg);
        // journald may have restarted since: then send to the path again.
        sock.send(&entry).is_ok() || sock.send_to(&entry, path).is_ok()
    }

    fn to_file(&self, r: &Record<'_>, msg: &str) -> bool {
        let mut f = lock(&self.file);
        let Some(lf) = f.as_mut() else {
            return false;
        };
        let line = format!(
            "{} earfs[{}] {} {msg}\n",
            rfc3339(SystemTime::now()),
            std::process::id(),
            r.level()
        );
        lf.file.write_all(line.as_bytes()).is_ok()
    }
}

impl log::Log for Logger {
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
        let msg = r.args().to_string();
        // After our own umount(2), fuser's session tries to unmount again on drop and
        // warns that the mount is gone (EINVAL): not news.
        if r.target().starts_with("fuser")
            && log::max_level() < LevelFilter::Debug
            && msg.starts_with("Failed to umount filesystem: Invalid argument")
        {
            return;
        }
        if self.to_file(r, &msg) {
            return;
        }
        if let Some(sock) = &self.syslog {
            // RFC 3164 without a timestamp (the syslog daemon adds it); facility daemon.
            let line = format!(
                "<{}>earfs[{}]: {msg}",
                3 * 8 + severity(r.level()),
                std::process::id(),
            );
            if sock.send(line.as_bytes()).is_ok() {
                return;
            }
        }
        if self.journald && self.to_journal(r, &msg) {
            return;
        }
        let line = if self.journald {
            format!("<{}>{msg}\n", severity(r.level()))
        } else {
            format!("earfs[{}] {} {msg}\n", std::process::id(), r.level())
        };
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

fn journal_socket() -> Option<(UnixDatagram, PathBuf)> {
    let path = PathBuf::from(
        std::env::var_os(JOURNAL_SOCKET_ENV).unwrap_or_else(|| JOURNAL_SOCKET.into()),
    );
    let sock = UnixDatagram::unbound().ok()?;
    sock.connect(&path).ok()?;
    Some((sock, path))
}

/// Install the logger (once).
pub fn init() {
    let level =
        parse_level(&std::env::var("EARFS_LOG").unwrap_or_default()).unwrap_or(LevelFilter::Info);
    let _ = ENV_LEVEL.set(level);
    let syslog = (std::env::var(TARGET_ENV).as_deref() == Ok("syslog"))
        .then(|| {
            let path = std::env::var_os("EARFS_SYSLOG_SOCKET").unwrap_or_else(|| "/dev/log".into());
            let sock = UnixDatagram::unbound().ok()?;
            sock.connect(path).ok()?;
            Some(sock)
        })
        .flatten();
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let logger = LOGGER.get_or_init(|| Logger {
        journald,
        journal: if journald { journal_socket() } else { None },
        syslog,
        file: Mutex::new(None),
        context: Mutex::new(Vec::new()),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// The level the command line asked for (`--log-level`, `-v`, `-q`): applied now, and
/// kept over the config file's `log_level`, at start and on reloads.
pub fn set_flag_level(level: LevelFilter) {
    let _ = FLAG_LEVEL.set(level);
    log::set_max_level(level);
}

/// The daemon's level, given the config file's: the command line's, else the file's,
/// else `EARFS_LOG`'s, else info.
pub fn effective_level(config: Option<LevelFilter>) -> LevelFilter {
    FLAG_LEVEL
        .get()
        .copied()
        .or(config)
        .or_else(|| ENV_LEVEL.get().copied())
        .unwrap_or(LevelFilter::Info)
}

fn open_log(path: &Path) -> std::io::Result<File> {
    // Explicit mode: the daemon runs with umask 0.
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// Log to `path` (appended) from now on; `path` should be absolute (the background
/// daemon changes its directory to `/`, and [`reopen`] opens it by name).
pub fn log_to_file(path: &Path) -> std::io::Result<()> {
    let file = open_log(path)?;
    if let Some(l) = LOGGER.get() {
        *lock(&l.file) = Some(LogFile {
            path: path.to_path_buf(),
            file,
        });
    }
    Ok(())
}

/// SIGHUP: open the log file again by its name (after logrotate renamed it, the new
/// lines go to a new file). Whether there is a log file; an error leaves the old one.
pub fn reopen() -> std::io::Result<bool> {
    let Some(l) = LOGGER.get() else {
        return Ok(false);
    };
    let mut g = lock(&l.file);
    let Some(lf) = g.as_mut() else {
        return Ok(false);
    };
    lf.file = open_log(&lf.path)?;
    Ok(true)
}

/// [`reopen`] for the SIGHUP handler: says what it did in the (new) log.
pub fn reopen_on_hup() {
    match reopen() {
        Ok(true) => log::info!("SIGHUP: log file opened again"),
        Ok(false) => {}
        Err(e) => log::error!(
            "SIGHUP: cannot open the log file again ({e}); still writing to the old one"
        ),
    }
}

/// The fields every journal entry of the daemon carries from now on.
pub fn set_context(volume_id: &str, mountpoint: &Path) {
    if let Some(l) = LOGGER.get() {
        *lock(&l.context) = vec![
            ("VOLUME_ID", volume_id.to_string()),
            ("MOUNTPOINT", mountpoint.to_string_lossy().into_owned()),
        ];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_has_micros_and_an_offset() {
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let s = rfc3339(t);
        // 2023-11-14T22:13:20.123456 in UTC; the local offset moves the clock time.
        assert_eq!(s.len(), "2023-11-14T22:13:20.123456+00:00".len(), "{s}");
        assert_eq!(&s[19..26], ".123456", "{s}");
        let (sign, hh, mm) = (&s[26..27], &s[27..29], &s[30..32]);
        assert!(sign == "+" || sign == "-", "{s}");
        let off = i64::from(crate::sys::utc_offset_seconds(1_700_000_000));
        let want = off.abs() / 3600 * 100 + off.abs() % 3600 / 60;
        let got: i64 = format!("{hh}{mm}").parse().unwrap_or(-1);
        assert_eq!(got, want, "{s}");
        let back = humantime::parse_rfc3339(&format!("{}Z", &s[..26])).unwrap_or(UNIX_EPOCH);
        let back = back
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        assert_eq!(back - off, 1_700_000_000, "{s}");
    }

    #[test]
    fn journal_fields_plain_and_binary_safe() {
        let mut b = Vec::new();
        journal_field(&mut b, "MESSAGE", b"one line");
        journal_field(&mut b, "MESSAGE", b"two\nlines");
        let mut want = b"MESSAGE=one line\nMESSAGE\n".to_vec();
        want.extend_from_slice(&9u64.to_le_bytes());
        want.extend_from_slice(b"two\nlines\n");
        assert_eq!(b, want);
        assert_eq!(journal_key("ino").as_deref(), Some("INODE"));
        assert_eq!(journal_key("errno").as_deref(), Some("ERRNO"));
        assert_eq!(journal_key("_x"), None);
    }

    #[test]
    fn levels_by_name() {
        assert_eq!(parse_level("DEBUG"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("off"), Some(LevelFilter::Off));
        assert_eq!(parse_level("loud"), None);
    }
}
