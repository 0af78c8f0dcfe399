//! The daemon as systemd runs it: `earfs mount --foreground --config FILE` under a test
//! NOTIFY_SOCKET; signals, reload, status, metrics, config errors, and CMK revocation
//! end to end against the KMS fakes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::kms::*;
use common::*;
use serde_json::{Value, json};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A foreground daemon with its own runtime dir and notify socket; killed and
/// unmounted on drop.
struct Daemon {
    child: Child,
    mnt: PathBuf,
    runtime: PathBuf,
    log: PathBuf,
    notify: UnixDatagram,
}

impl Daemon {
    fn start(dir: &Path, args: &[&str], extra_env: &[(&str, &str)]) -> Daemon {
        let runtime = dir.join("run");
        let log = dir.join("daemon.log");
        let sock_path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&sock_path);
        let notify = UnixDatagram::bind(&sock_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let child = foreground_command(args, &runtime, &log, extra_env)
            .env("NOTIFY_SOCKET", &sock_path)
            .spawn()
            .unwrap();
        let mnt = dir.join("mnt");
        Daemon {
            child,
            mnt,
            runtime,
            log,
            notify,
        }
    }

    /// The next notification (panics after 30 s).
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification: {e}\nlog: {}", self.log_text()));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Notifications until one contains `what`; all of them.
    fn until(&self, what: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let m = self.next();
            let done = m.contains(what);
            seen.push(m);
            if done {
                return seen;
            }
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: rustix::process::Signal) {
        signal(self.child.id(), sig);
    }

    fn wait(&mut self, secs: u64) -> Option<i32> {
        wait_exit(&mut self.child, secs)
            .unwrap_or_else(|| panic!("the daemon did not exit\nlog: {}", self.log_text()))
    }

    fn status(&self) -> Value {
        let out = Command::new(earfs())
            .args(["status", "--json", s(&self.mnt)])
            .env("EARFS_RUNTIME_DIR", &self.runtime)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `earfs status` in its human form, of every daemon of this test's runtime dir.
    fn status_text(&self) -> String {
        let out = Command::new(earfs())
            .args(["status"])
            .env("EARFS_RUNTIME_DIR", &self.runtime)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        force_unmount(&self.mnt);
    }
}

/// A volume on the local key in `dir` (backing, key, mnt) and a config file naming it.
fn local_volume(dir: &Path, extra: &str) -> PathBuf {
    init_local(&dir.join("key"), &dir.join("backing"));
    std::fs::create_dir_all(dir.join("mnt")).unwrap();
    let cfg = dir.join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "backing = \"{}\"\nmountpoint = \"{}\"\n{extra}",
            s(&dir.join("backing")),
            s(&dir.join("mnt"))
        ),
    )
    .unwrap();
    cfg
}

/// The test's scratch directory; whatever is mounted under it is unmounted when the
/// test ends, pass or fail.
fn tmp() -> TestDir {
    TestDir::new("earfs-daemon-test-")
}

/// `dd` one 4 KiB block with O_DIRECT (past the page cache): whether it worked.
fn direct_read(file: &Path) -> bool {
    Command::new("dd")
        .args([
            &format!("if={}", s(file)),
            "of=/dev/null",
            "bs=4096",
            "count=1",
            "iflag=direct",
        ])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn systemd_sees_status_ready_reloading_stopping_and_watchdog() {
    let d = tmp();
    let cfg = local_volume(d.path(), "[kms]\nrecheck_interval = \"1h\"\n");
    let mut dm = Daemon::start(
        d.path(),
        &["--config", s(&cfg)],
        &[
            ("WATCHDOG_USEC", "400000"),
            ("JOURNAL_STREAM", "8:12345"),
            ("EARFS_JOURNAL_SOCKET", "/nonexistent/journal.sock"),
        ],
    );
    let start = dm.until("READY=1");
    // READY comes only once the mount answers, and after a STATUS of the unwrap.
    assert!(is_mounted(&dm.mnt), "READY before the mount: {start:?}");
    assert!(
        start[0].starts_with("STATUS=unwrapping the data keys"),
        "{start:?}"
    );
    assert!(
        start.last().unwrap().contains("STATUS=serving volume"),
        "{start:?}"
    );
    // The watchdog is pinged at half the interval.
    dm.until("WATCHDOG=1");
    dm.until("WATCHDOG=1");
    // SIGHUP: RELOADING=1 (with the monotonic time), then READY=1 again.
    dm.signal(rustix::process::Signal::HUP);
    let reload = dm.until("READY=1");
    assert!(
        reload
            .iter()
            .any(|m| m.starts_with("RELOADING=1\nMONOTONIC_USEC=")),
        "{reload:?}"
    );
    assert!(dm.log_text().contains("reloaded: key versions [1]"));
    // Under systemd (JOURNAL_STREAM) every line carries a journald priority prefix.
    let log = dm.log_text();
    assert!(
        log.lines()
            .all(|l| l.starts_with("<6>") || l.starts_with("<4>")),
        "{log}"
    );
    // SIGTERM: STOPPING=1, unmount, exit 0.
    dm.signal(rustix::process::Signal::TERM);
    dm.until("STOPPING=1");
    assert_eq!(dm.wait(20), Some(0), "{}", dm.log_text());
    assert!(!is_mounted(&dm.mnt));
    // The control socket is gone with the daemon.
    assert!(
        std::fs::read_dir(&dm.runtime).unwrap().next().is_none(),
        "socket left behind"
    );
}

#[test]
fn sigterm_on_a_busy_mount_names_the_holder_and_gives_up_at_the_stop_timeout() {
    let d = tmp();
    let cfg = local_volume(d.path(), "stop_timeout = \"2s\"\n");
    let mut dm = Daemon::start(d.path(), &["--config", s(&cfg)], &[]);
    dm.until("READY=1");
    // (spawn returns once `sleep` is exec'd: its comm is "sleep" from then on)
    let mut holder = Command::new("sleep")
        .arg("60")
        .current_dir(&dm.mnt)
        .spawn()
        .unwrap();
    dm.signal(rustix::process::Signal::TERM);
    let stopping = dm.until("busy");
    assert!(
        stopping
            .iter()
            .any(|m| m.contains(&format!("held by {} (sleep)", holder.id()))),
        "{stopping:?}"
    );
    assert_eq!(dm.wait(20), Some(23), "{}", dm.log_text());
    let log = dm.log_text();
    assert!(log.contains("still busy after 2s"), "{log}");
    // The daemon is gone but the mount stays, erroring: never the bare directory.
    assert!(is_mounted(&dm.mnt));
    let _ = holder.kill();
    let _ = holder.wait();
    let e = std::fs::metadata(dm.mnt.join("x")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    // The next start clears the dead mount.
    let dm2 = Daemon::start(d.path(), &["--config", s(&cfg)], &[]);
    dm2.until("READY=1");
    assert!(dm2.log_text().contains("cleared the dead mount"));
}

#[test]
fn status_and_metrics_after_a_known_workload() {
    let d = tmp();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = local_volume(
        d.path(),
        &format!("metrics_address = \"{addr}\"\nthreads = 3\n"),
    );
    let dm = Daemon::start(d.path(), &["--config", s(&cfg)], &[]);
    dm.until("READY=1");
    // Four 64 KiB O_DIRECT writes, one O_DIRECT read of 256 KiB, one missing file.
    // O_DIRECT, so that each write reaches the daemon as it was made: through the
    // writeback cache (on by default) the kernel would gather them into fewer WRITEs.
    // The writes come from dd, not from this process: a fork by a test running in
    // parallel makes this process's pages copy-on-write, and the kernel's FUSE write
    // path then stops copying at the first such page and sends the rest as another,
    // unaligned write (seen here as 6 writes and a re-encrypted partial sector).
    let f = dm.mnt.join("table");
    let src = d.path().join("sevens");
    std::fs::write(&src, [7u8; 262144]).unwrap();
    let out = Command::new("dd")
        .args([
            &format!("if={}", s(&src)),
            &format!("of={}", s(&f)),
            "bs=65536",
            "count=4",
            "oflag=direct",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = Command::new("dd")
        .args([
            &format!("if={}", s(&f)),
            "of=/dev/null",
            "bs=262144",
            "count=1",
            "iflag=direct",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(std::fs::metadata(dm.mnt.join("missing")).is_err());
    let st = dm.status();
    assert_eq!(
        st["mountpoint"],
        s(&std::fs::canonicalize(&dm.mnt).unwrap())
    );
    assert_eq!(st["provider"], "local");
    assert_eq!(st["threads"], 3);
    assert_eq!(st["key_versions"], json!([1]));
    assert_eq!(st["keys_locked"], false);
    assert_eq!(st["revocation"]["state"], "ok");
    assert_eq!(st["recheck_interval_seconds"], 900);
    assert_eq!(st["bytes_encrypted"], 262144, "{st}");
    assert!(st["bytes_decrypted"].as_u64().unwrap() >= 262144, "{st}");
    let op = |name: &str| {
        st["ops"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["op"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(op("write")["count"], 4, "{st}");
    assert_eq!(op("create")["count"], 1, "{st}");
    assert!(
        st["errors_by_errno"]["ENOENT"].as_u64().unwrap() >= 1,
        "{st}"
    );
    // The human form names the same things.
    let text = dm.status_text();
    assert!(text.contains("revocation:    ok (policy lock)"), "{text}");
    assert!(text.contains("262144 encrypted"), "{text}");
    // Only root may ask.
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let nobody_status = || {
        let out = as_nobody(&format!(
            "EARFS_RUNTIME_DIR={} {} status",
            s(&dm.runtime),
            earfs()
        ));
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // The runtime directory is root's (0700)…
    let err = nobody_status();
    assert!(err.contains("earfs status needs root"), "{err}");
    // …and even with it and the socket opened up, the daemon checks the peer.
    std::fs::set_permissions(
        &dm.runtime,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for sock in std::fs::read_dir(&dm.runtime).unwrap() {
        std::fs::set_permissions(
            sock.unwrap().path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o666),
        )
        .unwrap();
    }
    let err = nobody_status();
    assert!(
        err.contains("only root may use the control socket"),
        "{err}"
    );
    // Metrics.
    let (code, page) = http_get(&addr, "/metrics");
    assert_eq!(code, 200);
    assert_eq!(metric(&page, "earfs_operations_total{op=\"write\"}"), 4.0);
    assert_eq!(metric(&page, "earfs_bytes_encrypted_total"), 262144.0);
    assert!(metric(&page, "earfs_errors_total{errno=\"ENOENT\"}") >= 1.0);
    assert_eq!(
        metric(
            &page,
            "earfs_operation_duration_seconds_bucket{op=\"write\",le=\"+Inf\"}"
        ),
        4.0
    );
    assert_eq!(
        metric(
            &page,
            "earfs_operation_duration_seconds_count{op=\"write\"}"
        ),
        4.0
    );
    assert_eq!(metric(&page, "earfs_keys_locked"), 0.0);
    assert_eq!(metric(&page, "earfs_key_versions"), 1.0);
    assert!(metric(&page, "earfs_cmk_last_success_timestamp_seconds") > 1.7e9);
    assert!(page.contains("# TYPE earfs_operation_duration_seconds histogram"));
    assert_eq!(http_get(&addr, "/").0, 404);
}

#[test]
fn status_and_metrics_say_since_when_the_current_key_version_is_current() {
    let d = tmp();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = local_volume(d.path(), &format!("metrics_address = \"{addr}\"\n"));
    let dm = Daemon::start(d.path(), &["--config", s(&cfg)], &[]);
    dm.until("READY=1");
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let scrape = || {
        let (code, page) = http_get(&addr, "/metrics");
        assert_eq!(code, 200);
        (
            metric(&page, "earfs_current_key_version"),
            metric(&page, "earfs_current_key_version_changed_timestamp_seconds"),
        )
    };
    // At start: version 1, current since the start.
    let st = dm.status();
    let started = st["started"].as_u64().unwrap();
    assert_eq!(st["current_key_version"], 1, "{st}");
    assert_eq!(st["current_key_version_since"], started, "{st}");
    assert_eq!(scrape(), (1.0, started as f64));
    // Let the clock pass the start's second, so that a change shows.
    assert!(wait_until(3, || now() > started));
    // A reload that keeps the version keeps the time.
    dm.signal(rustix::process::Signal::HUP);
    dm.until("READY=1");
    assert_eq!(dm.status()["current_key_version_since"], started);
    // A rotate through the daemon: version 2, since the rotate.
    let before = now();
    let out = Command::new(earfs())
        .args(["rotate", s(&d.path().join("backing"))])
        .env("EARFS_RUNTIME_DIR", &dm.runtime)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let st = dm.status();
    assert_eq!(st["current_key_version"], 2, "{st}");
    let since = st["current_key_version_since"].as_u64().unwrap();
    assert!(since >= before && since > started && since <= now(), "{st}");
    assert_eq!(scrape(), (2.0, since as f64));
    // The human form says it too.
    let text = dm.status_text();
    assert!(text.contains("[1,2] (current 2 since "), "{text}");
}

#[test]
fn config_errors_name_the_key_and_the_file_and_flags_override_the_file() {
    let d = tmp();
    let cfg = local_volume(d.path(), "");
    let mount = |args: &[&str]| {
        let mut a = vec!["mount"];
        a.extend_from_slice(args);
        let out = run(&a);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let bad = d.path().join("bad.toml");
    for (text, words) in [
        ("backing = \"/x\"\nthread = 2\n", "unknown field `thread`"),
        (
            "[kms]\nrecheck_interval = \"soon\"\n",
            "kms.recheck_interval",
        ),
        (
            "metrics_address = \"10.0.0.1:9814\"\n",
            "not a loopback address",
        ),
    ] {
        std::fs::write(&bad, text).unwrap();
        let (c, err) = mount(&["--config", s(&bad)]);
        assert_eq!(c, Some(30), "{err}");
        assert!(err.contains("bad.toml") && err.contains(words), "{err}");
    }
    let (c, err) = mount(&["--config", s(&d.path().join("absent.toml"))]);
    assert_eq!(c, Some(30), "{err}");
    let (c, err) = mount(&["--metrics-address", "0.0.0.0:1", "/a", "/b"]);
    assert_eq!(c, Some(2), "{err}");
    // A config naming a local key cannot take AWS settings.
    std::fs::write(
        &bad,
        format!(
            "backing = \"{}\"\nmountpoint = \"{}\"\n[kms]\nprofile = \"x\"\n",
            s(&d.path().join("backing")),
            s(&d.path().join("mnt"))
        ),
    )
    .unwrap();
    let (c, err) = mount(&["--config", s(&bad)]);
    assert_eq!(c, Some(2), "{err}");
    assert!(err.contains("kms.profile does not apply"), "{err}");
    // A metrics port that is taken fails the start before anything is mounted.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (c, err) = mount(&["--config", s(&cfg), "--metrics-address", &addr]);
    assert_eq!(c, Some(30), "{err}");
    assert!(err.contains("cannot listen for metrics"), "{err}");
    assert!(!is_mounted(&d.path().join("mnt")));
    // Flags override the file.
    let dm = Daemon::start(
        d.path(),
        &[
            "--config",
            s(&cfg),
            "--threads",
            "5",
            "--revocation-policy",
            "warn",
        ],
        &[],
    );
    dm.until("READY=1");
    let st = dm.status();
    assert_eq!(st["threads"], 5);
    assert_eq!(st["revocation_policy"], "warn");
}

/// `earfs init FLAGS BACKING`, which must succeed.
fn init_with(flags: Vec<String>, backing: &Path) {
    let mut a = vec!["init".to_string()];
    a.extend(flags);
    a.push(s(backing).into());
    let out = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The recheck against a KMS: revoke, see EIO and why; restore, see the data again.
fn revocation_round_trip(
    init_args: Vec<String>,
    revoke: &dyn Fn(),
    restore: &dyn Fn(),
    throttle: &dyn Fn(),
    unthrottle: &dyn Fn(),
) {
    let d = tmp();
    let backing = d.path().join("backing");
    init_with(init_args, &backing);
    std::fs::create_dir_all(d.path().join("mnt")).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dm = Daemon::start(
        d.path(),
        &[
            "--recheck-interval",
            "1s",
            "--kms-deadline",
            "3",
            "--metrics-address",
            &addr,
            s(&backing),
            s(&d.path().join("mnt")),
        ],
        &[],
    );
    dm.until("READY=1");
    let f = dm.mnt.join("data");
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&f, &data).unwrap();
    assert!(direct_read(&f));
    // A passing KMS fault does not lock anything.
    throttle();
    assert!(
        wait_until(20, || dm.status()["last_cmk_check"]["ok"] == false),
        "{}",
        dm.log_text()
    );
    let st = dm.status();
    assert_eq!(st["revocation"]["state"], "ok", "{st}");
    assert_eq!(st["last_cmk_check"]["definitive"], false, "{st}");
    assert!(direct_read(&f));
    unthrottle();
    assert!(wait_until(20, || dm.status()["last_cmk_check"]["ok"] == true));
    // Revoked: within a recheck, file I/O fails with EIO (page cache too), and status
    // and metrics say why.
    revoke();
    assert!(
        wait_until(20, || !direct_read(&f)),
        "still readable: {}",
        dm.log_text()
    );
    let e = std::fs::read(&f).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let st = dm.status();
    assert_eq!(st["revocation"]["state"], "locked", "{st}");
    assert_eq!(st["keys_locked"], true);
    assert!(
        st["revocation"]["reason"].as_str().unwrap().len() > 10,
        "{st}"
    );
    assert_eq!(st["key_versions"], json!([]));
    let (_, page) = http_get(&addr, "/metrics");
    assert_eq!(metric(&page, "earfs_keys_locked"), 1.0);
    assert_eq!(metric(&page, "earfs_cmk_revoked"), 1.0);
    assert!(dm.log_text().contains("CMK revoked"));
    // Metadata still answers.
    assert_eq!(std::fs::metadata(&f).unwrap().len(), 65536);
    // Restored: I/O resumes by itself, data intact.
    restore();
    assert!(wait_until(20, || direct_read(&f)), "{}", dm.log_text());
    assert_eq!(std::fs::read(&f).unwrap(), data);
    let st = dm.status();
    assert_eq!(st["revocation"]["state"], "ok", "{st}");
    assert_eq!(st["keys_locked"], false);
    assert!(dm.log_text().contains("file I/O resumes"));
}

#[test]
fn revocation_with_aws_kms_locks_and_resumes() {
    let fake = Fake::aws(false);
    let (arn, _) = aws_key(&fake, "alias/revoke");
    let dir = tmp();
    let creds = dir.path().join("creds");
    aws_credentials_file(&creds, "AKIDREV", "secret");
    let args = provider_flags("aws", &fake, &arn, &creds);
    let state = |st: &str| {
        fake.post("/__fake/key-state", json!({ "keyId": arn, "state": st }));
    };
    revocation_round_trip(
        args,
        &|| state("Disabled"),
        &|| state("Enabled"),
        &|| {
            fake.post(
                "/__fake/faults",
                json!({"op": "DescribeKey", "count": -1, "errorType": "ThrottlingException", "message": "Rate exceeded"}),
            );
        },
        &|| {
            fake.post("/__fake/reset", json!({}));
        },
    );
}

#[test]
fn revocation_with_google_cloud_kms_locks_and_resumes() {
    let fake = Fake::gcp();
    let key = gcp_key(&fake, "revoke", "k");
    let dir = tmp();
    let sa = dir.path().join("sa.json");
    gcp_service_account(&fake, "node@p.iam.gserviceaccount.com", &["*"], &sa);
    let args = provider_flags("gcp", &fake, &key, &sa);
    let perms = |p: &[&str]| {
        fake.post(
            "/__fake/permissions",
            json!({ "email": "node@p.iam.gserviceaccount.com", "permissions": p }),
        );
    };
    revocation_round_trip(
        args,
        // Revoked by IAM: the node's permission to decrypt is taken away.
        &|| perms(&["cloudkms.cryptoKeys.get", "cloudkms.keyRings.get"]),
        &|| perms(&["*"]),
        &|| {
            fake.post(
                "/__fake/faults",
                json!({"match": "cryptoKeys/k", "status": 503, "count": -1}),
            );
        },
        &|| {
            fake.post("/__fake/reset-faults", json!({}));
        },
    );
}

#[test]
fn revocation_policy_warn_keeps_serving() {
    let fake = Fake::gcp();
    let key = gcp_key(&fake, "warn", "k");
    let d = tmp();
    let sa = d.path().join("sa.json");
    gcp_service_account(&fake, "node@p.iam.gserviceaccount.com", &["*"], &sa);
    let backing = d.path().join("backing");
    init_with(provider_flags("gcp", &fake, &key, &sa), &backing);
    std::fs::create_dir_all(d.path().join("mnt")).unwrap();
    let dm = Daemon::start(
        d.path(),
        &[
            "--recheck-interval",
            "1s",
            "--revocation-policy",
            "warn",
            s(&backing),
            s(&d.path().join("mnt")),
        ],
        &[],
    );
    dm.until("READY=1");
    let f = dm.mnt.join("data");
    std::fs::write(&f, b"still here").unwrap();
    fake.post(
        "/__fake/crypto-keys/version-state",
        json!({ "name": key, "state": "DISABLED" }),
    );
    assert!(wait_until(20, || dm.status()["revocation"]["state"] == "warning"));
    let st = dm.status();
    assert!(
        st["revocation"]["reason"]
            .as_str()
            .unwrap()
            .contains("DISABLED"),
        "{st}"
    );
    assert_eq!(st["keys_locked"], false);
    assert!(direct_read(&f));
    dm.until("WARNING: CMK revoked");
}

#[test]
fn systemd_credential_overrides_the_credentials_file_named_at_init() {
    let fake = Fake::aws(true);
    let (arn, _) = aws_key(&fake, "alias/cred");
    let user = fake.post(
        "/__fake/users",
        json!({ "name": "node", "actions": ["kms:DescribeKey", "kms:ListAliases", "kms:GenerateDataKeyWithoutPlaintext", "kms:Decrypt", "kms:Encrypt"] }),
    );
    let d = tmp();
    let at_init = d.path().join("init-credentials");
    aws_credentials_file(
        &at_init,
        user["accessKeyId"].as_str().unwrap(),
        user["secretAccessKey"].as_str().unwrap(),
    );
    let backing = d.path().join("backing");
    init_with(provider_flags("aws", &fake, &arn, &at_init), &backing);
    // The file named at init is gone; systemd hands the credential over instead
    // (LoadCredential=kms:… puts it at $CREDENTIALS_DIRECTORY/kms).
    let creds_dir = d.path().join("credentials");
    std::fs::create_dir(&creds_dir).unwrap();
    std::fs::rename(&at_init, creds_dir.join("kms")).unwrap();
    std::fs::create_dir_all(d.path().join("mnt")).unwrap();
    let dm = Daemon::start(
        d.path(),
        &[s(&backing), s(&d.path().join("mnt"))],
        &[("CREDENTIALS_DIRECTORY", s(&creds_dir))],
    );
    dm.until("READY=1");
    std::fs::write(dm.mnt.join("f"), b"x").unwrap();
    drop(dm);
    // Without it, the start fails on the missing file, as a credentials error.
    let mnt = d.path().join("mnt");
    let out = run(&["mount", s(&backing), s(&mnt)]);
    assert_eq!(
        out.status.code(),
        Some(28),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("init-credentials"), "{stderr}");
    // `--credentials` names this node's file instead…
    let by_flag = d.path().join("flag-credentials");
    std::fs::rename(creds_dir.join("kms"), &by_flag).unwrap();
    let dm = Daemon::start(
        d.path(),
        &[s(&backing), s(&mnt), "--credentials", s(&by_flag)],
        &[],
    );
    dm.until("READY=1");
    assert_eq!(std::fs::read(dm.mnt.join("f")).unwrap(), b"x");
    drop(dm);
    // …and so does the config's kms.credentials_file,
    let by_config = d.path().join("config-credentials");
    std::fs::rename(&by_flag, &by_config).unwrap();
    let cfg = d.path().join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "backing = \"{}\"\nmountpoint = \"{}\"\n[kms]\ncredentials_file = \"{}\"\n",
            s(&backing),
            s(&mnt),
            s(&by_config)
        ),
    )
    .unwrap();
    let dm = Daemon::start(d.path(), &["--config", s(&cfg)], &[]);
    dm.until("READY=1");
    assert_eq!(std::fs::read(dm.mnt.join("f")).unwrap(), b"x");
    drop(dm);
    // …which a flag overrides (here with a file that is not there: refused, by name).
    let out = run(&["mount", "--config", s(&cfg), "--credentials", s(&by_flag)]);
    assert_eq!(out.status.code(), Some(28));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains("flag-credentials"), "{stderr}");
    // A file named in the config that others can read is refused like any other.
    std::fs::set_permissions(
        &by_config,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let out = run(&["mount", "--config", s(&cfg)]);
    assert_eq!(out.status.code(), Some(28));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains("chmod 600") && stderr.contains("config-credentials"),
        "{stderr}"
    );
}
