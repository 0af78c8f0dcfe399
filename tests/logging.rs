//! The daemon's logs: `--log-level`, `-v` and `-q` over the config's `log_level`;
//! `--log-file` with and without `--foreground`, RFC 3339 stamps, the file opened again
//! on SIGHUP (logrotate without copytruncate); the journal's native protocol with
//! structured fields under systemd.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A foreground daemon (`earfs mount --foreground ARGS BACKING MNT`), its stderr in
/// `stderr`; killed on drop (the TestDir unmounts).
struct Foreground {
    child: Child,
    stderr: PathBuf,
}

impl Foreground {
    fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Foreground {
        let stderr = dir.join("stderr");
        let mut child = foreground_command(args, &dir.join("run"), &stderr, env)
            .arg(dir.join("backing"))
            .arg(dir.join("mnt"))
            .spawn()
            .unwrap();
        let mnt = dir.join("mnt");
        let up = wait_until(30, || {
            is_mounted(&mnt) || child.try_wait().unwrap().is_some()
        });
        assert!(
            up && is_mounted(&mnt),
            "not mounted: {}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
        Foreground { child, stderr }
    }

    fn signal(&self, sig: rustix::process::Signal) {
        signal(self.child.id(), sig);
    }

    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM, then the exit code.
    fn stop(&mut self) -> Option<i32> {
        self.signal(rustix::process::Signal::TERM);
        wait_exit(&mut self.child, 20)
            .unwrap_or_else(|| panic!("the daemon did not exit: {}", self.stderr_text()))
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A local volume in `dir` (backing, key, mnt).
fn volume(dir: &Path) {
    init_local(&dir.join("key"), &dir.join("backing"));
    std::fs::create_dir_all(dir.join("mnt")).unwrap();
}

fn tmp() -> TestDir {
    TestDir::new("earfs-logging-test-")
}

/// The level words of a log's lines (`INFO`, `DEBUG`, ...).
fn levels(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split_once("] ")?.1;
            Some(rest.split(' ').next()?.to_string())
        })
        .collect()
}

/// Mount in the background with `--log-file LOG` and `args`, stat a missing name
/// (a lookup answered ENOENT, logged at debug), unmount; the log.
fn background_log(vol: &Volume, args: &[&str]) -> String {
    let _ = std::fs::remove_file(&vol.log);
    let m = vol.mount(args);
    assert!(std::fs::metadata(m.path("missing")).is_err());
    drop(m);
    vol.log_text()
}

#[test]
fn level_flags_filter_lines_and_win_over_the_config() {
    let vol = Volume::new();
    let cfg = vol.dir.path().join("node.toml");
    let log = background_log(&vol, &[]);
    assert!(log.contains("mounted: serving volume"), "{log}");
    assert!(!levels(&log).contains(&"DEBUG".into()), "{log}");
    // -v: debug, e.g. the ENOENT of the lookup, with its inode and errno.
    let log = background_log(&vol, &["-v"]);
    assert!(
        log.lines()
            .any(|l| l.contains(" DEBUG op=lookup ino=1 errno=2")),
        "{log}"
    );
    assert!(!levels(&log).contains(&"TRACE".into()), "{log}");
    // -q: warnings and errors only; this mount has none.
    let log = background_log(&vol, &["-q"]);
    assert!(levels(&log).is_empty(), "{log}");
    // The config's debug level works, and --log-level / -q win over it.
    std::fs::write(&cfg, "log_level = \"debug\"\n").unwrap();
    let log = background_log(&vol, &["--config", s(&cfg)]);
    assert!(levels(&log).contains(&"DEBUG".into()), "{log}");
    let log = background_log(&vol, &["--config", s(&cfg), "--log-level", "warn"]);
    assert!(levels(&log).is_empty(), "{log}");
    let log = background_log(&vol, &["--config", s(&cfg), "-q"]);
    assert!(levels(&log).is_empty(), "{log}");
    // The flags also come before the command, and a bad one is a usage error.
    std::fs::remove_file(&vol.log).unwrap();
    let out = run(&[
        "-q",
        "mount",
        "--log-file",
        s(&vol.log),
        s(&vol.backing),
        s(&vol.mnt),
    ]);
    assert!(out.status.success());
    let _m = Mount { vol: &vol };
    assert!(levels(&vol.log_text()).is_empty(), "{}", vol.log_text());
    for bad in [
        &["-v", "-q"][..],
        &["--log-level", "loud"],
        &["-v", "--log-level", "info"],
    ] {
        let mut args = vec!["mount"];
        args.extend_from_slice(bad);
        args.extend(["/nonexistent/a", "/nonexistent/b"]);
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
    let out = run(&["mount", "--log-level", "loud", "/a", "/b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"loud\" is not a log level"), "{err}");
}

/// Checks `stamp` is `YYYY-MM-DDTHH:MM:SS.ffffff+HH:MM` (or `-HH:MM`) and returns the
/// unix time it names.
fn parse_stamp(stamp: &str) -> u64 {
    let b = stamp.as_bytes();
    assert_eq!(b.len(), 32, "{stamp}");
    for (i, c) in b.iter().enumerate() {
        let want_digit = !matches!(i, 4 | 7 | 10 | 13 | 16 | 19 | 26 | 29);
        assert_eq!(c.is_ascii_digit(), want_digit, "{stamp} at {i}");
    }
    assert_eq!(
        (b[4], b[7], b[10], b[13], b[16], b[19], b[29]),
        (b'-', b'-', b'T', b':', b':', b'.', b':'),
        "{stamp}"
    );
    assert!(b[26] == b'+' || b[26] == b'-', "{stamp}");
    let local = humantime::parse_rfc3339(&format!("{}Z", &stamp[..26]))
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let off =
        stamp[27..29].parse::<i64>().unwrap() * 3600 + stamp[30..32].parse::<i64>().unwrap() * 60;
    let off = if b[26] == b'-' { -off } else { off };
    (local - off) as u64
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn foreground_log_file_has_rfc3339_stamps_and_is_opened_again_on_sighup() {
    let d = tmp();
    volume(d.path());
    let log = d.path().join("logs/earfs.log");
    std::fs::create_dir(d.path().join("logs")).unwrap();
    let start = now();
    let mut dm = Foreground::start(d.path(), &["--log-file", s(&log)], &[]);
    // (the line comes once the mount has answered a request, just after it shows)
    let served = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("mounted: serving volume")
    };
    assert!(
        wait_until(10, served),
        "{:?}",
        std::fs::read_to_string(&log)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    for line in text.lines() {
        let (stamp, rest) = line.split_once(' ').unwrap();
        let t = parse_stamp(stamp);
        assert!(
            t + 1 >= start && t <= now() + 1,
            "{line}: {t} not near {start}"
        );
        assert!(
            rest.starts_with(&format!("earfs[{}] ", dm.child.id())),
            "{line}"
        );
    }
    // Nothing on stderr: the log file has it all.
    assert_eq!(dm.stderr_text(), "");
    // logrotate without copytruncate: rename, then SIGHUP; new lines in a new file.
    let rotated = d.path().join("logs/earfs.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    dm.signal(rustix::process::Signal::HUP);
    assert!(
        wait_until(20, || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("reloaded: key versions")),
        "no new log: {:?} / rotated: {}",
        std::fs::read_to_string(&log),
        std::fs::read_to_string(&rotated).unwrap()
    );
    let new = std::fs::read_to_string(&log).unwrap();
    assert!(
        new.lines()
            .next()
            .unwrap()
            .contains("log file opened again"),
        "{new}"
    );
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(!old.contains("reloaded"), "{old}");
    // The daemon created the new file itself (umask 0): not writable by others.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    assert_eq!(dm.stop(), Some(0), "{}", dm.stderr_text());
    let new = std::fs::read_to_string(&log).unwrap();
    assert!(new.contains("unmounted"), "{new}");
    assert_eq!(dm.stderr_text(), "");
}

#[test]
fn background_log_file_is_opened_again_on_sighup() {
    let vol = Volume::new();
    let _m = vol.mount(&[]);
    let daemon = daemon_pid(&vol);
    let text = vol.log_text();
    let first = text.lines().next().unwrap();
    parse_stamp(first.split(' ').next().unwrap());
    let rotated = vol.dir.path().join("daemon.log.1");
    std::fs::rename(&vol.log, &rotated).unwrap();
    signal(daemon, rustix::process::Signal::HUP);
    assert!(
        wait_until(20, || vol.log_text().contains("reloaded: key versions")),
        "no new log; rotated: {}",
        std::fs::read_to_string(&rotated).unwrap()
    );
}

/// The background daemon's pid (its command line has --foreground and the backing).
fn daemon_pid(vol: &Volume) -> u32 {
    let needle = s(&vol.backing).to_string();
    for e in std::fs::read_dir("/proc").unwrap() {
        let e = e.unwrap();
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("--foreground") && cmd.contains(&needle) {
            return pid;
        }
    }
    panic!("no daemon for {needle}");
}

/// A native journal entry's fields (plain `KEY=value` and binary-safe ones).
fn journal_fields(mut b: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let nl = b.iter().position(|&c| c == b'\n').unwrap();
        let line = &b[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            out.push((
                String::from_utf8(line[..eq].to_vec()).unwrap(),
                line[eq + 1..].to_vec(),
            ));
            b = &b[nl + 1..];
        } else {
            let key = String::from_utf8(line.to_vec()).unwrap();
            let len = u64::from_le_bytes(b[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = b[nl + 9..nl + 9 + len].to_vec();
            assert_eq!(b[nl + 9 + len], b'\n');
            out.push((key, value));
            b = &b[nl + 10 + len..];
        }
    }
    out
}

fn field<'a>(f: &'a [(String, Vec<u8>)], key: &str) -> Option<&'a str> {
    f.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
}

#[test]
fn under_journald_entries_carry_structured_fields() {
    let d = tmp();
    volume(d.path());
    let sock_path = d.path().join("journal.sock");
    let journal = UnixDatagram::bind(&sock_path).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let info = run(&["info", "--json", s(&d.path().join("backing"))]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let volume_id = info["volume_id"].as_str().unwrap().to_string();
    let mnt = std::fs::canonicalize(d.path().join("mnt")).unwrap();
    let mut dm = Foreground::start(
        d.path(),
        &["-v"],
        &[
            ("JOURNAL_STREAM", "8:12345"),
            ("EARFS_JOURNAL_SOCKET", s(&sock_path)),
        ],
    );
    let next = || {
        let mut buf = vec![0u8; 65536];
        let n = journal.recv(&mut buf).unwrap();
        journal_fields(&buf[..n])
    };
    // Every entry after the volume is known names it and the mountpoint.
    let mounted = loop {
        let f = next();
        if field(&f, "MESSAGE").is_some_and(|m| m.starts_with("mounted: serving volume")) {
            break f;
        }
    };
    assert_eq!(field(&mounted, "PRIORITY"), Some("6"), "{mounted:?}");
    assert_eq!(field(&mounted, "SYSLOG_IDENTIFIER"), Some("earfs"));
    assert_eq!(
        field(&mounted, "SYSLOG_PID"),
        Some(dm.child.id().to_string().as_str())
    );
    assert_eq!(field(&mounted, "VOLUME_ID"), Some(volume_id.as_str()));
    assert_eq!(field(&mounted, "MOUNTPOINT"), Some(s(&mnt)));
    // An error answered to the kernel: its inode and errno as fields.
    assert!(std::fs::metadata(mnt.join("missing")).is_err());
    let lookup = loop {
        let f = next();
        if field(&f, "MESSAGE").is_some_and(|m| m.starts_with("op=lookup ino=1 errno=2")) {
            break f;
        }
    };
    assert_eq!(field(&lookup, "INODE"), Some("1"), "{lookup:?}");
    assert_eq!(field(&lookup, "ERRNO"), Some("2"), "{lookup:?}");
    assert_eq!(field(&lookup, "PRIORITY"), Some("7"));
    assert_eq!(field(&lookup, "VOLUME_ID"), Some(volume_id.as_str()));
    // Nothing went to stderr.
    assert_eq!(dm.stop(), Some(0));
    assert_eq!(dm.stderr_text(), "");
}

#[test]
fn under_journald_without_its_socket_lines_go_to_stderr_with_priorities() {
    let d = tmp();
    volume(d.path());
    let mut dm = Foreground::start(
        d.path(),
        &[],
        &[
            ("JOURNAL_STREAM", "8:12345"),
            ("EARFS_JOURNAL_SOCKET", s(&d.path().join("no-such.sock"))),
        ],
    );
    assert_eq!(dm.stop(), Some(0));
    let err = dm.stderr_text();
    assert!(err.contains("<6>mounted: serving volume"), "{err}");
    assert!(
        err.lines()
            .all(|l| l.starts_with("<6>") || l.starts_with("<4>")),
        "{err}"
    );
}
