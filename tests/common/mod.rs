//! Shared helpers of the real-mount tests: a volume in a temp dir and an RAII mount
//! that always unmounts (and checks that nothing is left mounted).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod crashmodel;
pub mod keyring_kill;
pub mod kms;
pub mod tree;

pub fn earfs() -> &'static str {
    env!("CARGO_BIN_EXE_earfs")
}

pub fn run(args: &[&str]) -> Output {
    Command::new(earfs())
        .args(args)
        .output()
        .expect("run earfs")
}

/// The format the suite's volumes are created in (EARFS_TEST_FORMAT, default 2).
pub fn test_format() -> earfs::content::FileFormat {
    let n = std::env::var("EARFS_TEST_FORMAT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    earfs::content::FileFormat::from_number(n).expect("EARFS_TEST_FORMAT is 1 or 2")
}

/// The backing length of a file of `size` plaintext bytes written in the suite's format.
#[allow(dead_code)]
pub fn backing_len(size: u64) -> u64 {
    earfs::content::plain_size_to_backing_size(test_format(), size)
}

/// `earfs init --kms local --key-file KEY BACKING`, which must succeed. With
/// EARFS_TEST_FORMAT=1 the volume is created in format 1 (the suite then checks that v1
/// volumes keep working).
pub fn init_local(key: &Path, backing: &Path) {
    init_local_in(key, backing, test_format());
}

/// `earfs init --kms local --format-version FORMAT --key-file KEY BACKING`.
pub fn init_local_in(key: &Path, backing: &Path, format: earfs::content::FileFormat) {
    let format = format.number().to_string();
    let out = run(&[
        "init",
        "--kms",
        "local",
        "--format-version",
        &format,
        "--key-file",
        key.to_str().unwrap(),
        backing.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `earfs mount BACKING MNT` (must succeed); the guard unmounts on drop.
pub fn mount_at(backing: &Path, mnt: &Path) -> MountGuard {
    let out = run(&["mount", backing.to_str().unwrap(), mnt.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    MountGuard(mnt.to_path_buf())
}

/// Unmounts a mount made outside `Volume` when dropped.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        force_unmount(&self.0);
    }
}

/// A temporary directory that, when dropped, first unmounts anything mounted under
/// it, so that a failing test leaves no mount behind, whatever it mounted.
pub struct TestDir(tempfile::TempDir);

impl TestDir {
    pub fn new(prefix: &str) -> TestDir {
        TestDir(
            tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .expect("temp dir"),
        )
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        for mp in mounts_under(self.0.path()) {
            force_unmount(&mp);
        }
    }
}

/// The mountpoints at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    v.dedup();
    v
}

pub fn is_mounted(mp: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mp = mp.to_string_lossy().replace(' ', "\\040");
    text.lines()
        .any(|l| l.split(' ').nth(4) == Some(mp.as_str()))
}

/// A volume (backing dir + key file) in a temp dir.
pub struct Volume {
    pub dir: tempfile::TempDir,
    pub backing: PathBuf,
    pub key: PathBuf,
    pub mnt: PathBuf,
    pub log: PathBuf,
}

impl Volume {
    pub fn new() -> Volume {
        Volume::in_format(test_format())
    }

    /// A volume that writes `format`, whatever EARFS_TEST_FORMAT says.
    pub fn in_format(format: earfs::content::FileFormat) -> Volume {
        let dir = tempfile::Builder::new()
            .prefix("earfs-test-")
            .tempdir()
            .unwrap();
        let backing = dir.path().join("backing");
        let key = dir.path().join("key");
        let mnt = dir.path().join("mnt");
        let log = dir.path().join("daemon.log");
        std::fs::create_dir(&mnt).unwrap();
        // EARFS_TEST_KMS=aws|gcp runs the whole suite on a volume whose key is in a
        // (fake) KMS; otherwise the local key file.
        match kms::suite_init_args() {
            None => init_local_in(&key, &backing, format),
            Some(mut args) => {
                args.insert(0, "init".into());
                args.push("--format-version".into());
                args.push(format.number().to_string());
                args.push(backing.to_str().unwrap().into());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = run(&args);
                assert!(
                    out.status.success(),
                    "init failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Volume {
            dir,
            backing,
            key,
            mnt,
            log,
        }
    }

    pub fn mount(&self, extra: &[&str]) -> Mount<'_> {
        self.mount_via(&[], extra)
    }

    /// Mount with `earfs` run under `wrapper` (a command and its arguments, such as
    /// `prlimit --nofile=256:4096 --`; empty: earfs itself).
    pub fn mount_via(&self, wrapper: &[&str], extra: &[&str]) -> Mount<'_> {
        let out = self.try_mount_via(wrapper, extra);
        assert!(
            out.status.success(),
            "mount failed: {}\nlog: {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        assert!(is_mounted(&self.mnt));
        Mount { vol: self }
    }

    /// Mount with --allow-other, the temp dir made traversable for other users.
    pub fn mount_for_others(&self) -> Mount<'_> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        self.mount(&["--allow-other"])
    }

    pub fn try_mount(&self, extra: &[&str]) -> Output {
        self.try_mount_via(&[], extra)
    }

    fn try_mount_via(&self, wrapper: &[&str], extra: &[&str]) -> Output {
        let mut args = vec!["mount", "--log-file", self.log.to_str().unwrap()];
        // EARFS_TEST_MOUNT_ARGS runs the whole suite with extra flags (e.g. --no-writeback-cache).
        let env_args = std::env::var("EARFS_TEST_MOUNT_ARGS").unwrap_or_default();
        args.extend(env_args.split_whitespace());
        args.extend_from_slice(extra);
        args.push(self.backing.to_str().unwrap());
        args.push(self.mnt.to_str().unwrap());
        let out = match wrapper.split_first() {
            None => run(&args),
            Some((cmd, rest)) => Command::new(cmd)
                .args(rest)
                .arg(earfs())
                .args(&args)
                .output()
                .unwrap_or_else(|e| panic!("{cmd}: {e}")),
        };
        if out.status.success() {
            // Make sure a successful mount is undone even if the caller drops the output.
            assert!(is_mounted(&self.mnt));
        }
        out
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A live mount; unmounted on drop, even when the test fails.
pub struct Mount<'a> {
    pub vol: &'a Volume,
}

impl Mount<'_> {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.vol.mnt.join(rel)
    }
    pub fn backing(&self, rel: &str) -> PathBuf {
        self.vol.backing.join(rel)
    }
    /// Unmount now (and check it is gone).
    pub fn unmount(self) {}
}

pub fn force_unmount(mp: &Path) {
    for _ in 0..50 {
        if !is_mounted(mp) {
            return;
        }
        let out = run(&["umount", mp.to_str().unwrap()]);
        if out.status.success() {
            continue;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = Command::new("umount").arg("-l").arg(mp).status();
}

impl Drop for Mount<'_> {
    fn drop(&mut self) {
        force_unmount(&self.vol.mnt);
        let left = is_mounted(&self.vol.mnt);
        if left && !std::thread::panicking() {
            panic!("mount {} left behind", self.vol.mnt.display());
        }
    }
}

/// Every byte of every regular file under `dir` (recursively).
pub fn all_backing_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            out.extend(all_backing_bytes(&p));
        } else if ft.is_file() {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Send `sig` to process `pid`.
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::kill_process(pid, sig).expect("kill");
}

/// Poll `cond` every 10 ms for up to `secs` seconds; whether it became true.
pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    cond()
}

/// Run a shell command as uid/gid 65534 (nobody) without supplementary groups.
pub fn as_nobody(cmd: &str) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            cmd,
        ])
        .output()
        .expect("setpriv")
}

/// Run a Python snippet (for mmap, fcntl locks); returns stdout, panics on failure.
pub fn python(code: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `fio` on `dir` with crc32c verification that fails at the first mismatch, and no
/// verify state files left in the working directory; `args` name the job.
pub fn fio(dir: &Path, args: &[&str]) -> std::process::Child {
    Command::new("fio")
        .arg(format!("--directory={}", dir.display()))
        .args([
            "--ioengine=psync",
            "--bs=4k",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fio (installed by scripts/deps-tier3.sh)")
}

/// Wait for a [`fio`] run, which must succeed.
pub fn fio_ok(child: std::process::Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `--json` document TEXT follows the JSON Schema its `"schema"` field names
/// (docs/schemas/; checked by tests/fixtures/validate_json.py).
pub fn assert_follows_schema(text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("doc.json");
    std::fs::write(&doc, text).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(root.join("tests/fixtures/validate_json.py"))
        .arg(root.join("docs/schemas"))
        .arg(&doc)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{text}\ndoes not follow its schema: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A free TCP port on 127.0.0.1 (for a metrics endpoint).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` from the HTTP server at `addr`: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut r = String::new();
    c.read_to_string(&mut r).unwrap();
    let code = r.split(' ').nth(1).unwrap().parse().unwrap();
    (code, r.split_once("\r\n\r\n").unwrap().1.to_string())
}

/// The metrics page a daemon serves at `addr` (`GET /metrics`, which must answer 200).
pub fn scrape(addr: &str) -> String {
    let (code, page) = http_get(addr, "/metrics");
    assert_eq!(code, 200, "GET /metrics from {addr}:\n{page}");
    page
}

/// The value of the sample `series` (name and labels as written) in a Prometheus text
/// page.
pub fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
        .trim()
        .parse()
        .unwrap()
}

/// `earfs mount --foreground ARGS` as a test starts it: its own runtime directory
/// (control socket), stdin and stdout closed, stderr into the file `stderr`, outside any
/// systemd (no NOTIFY_SOCKET, JOURNAL_STREAM or WATCHDOG_USEC), then `env` set.
pub fn foreground_command(
    args: &[&str],
    runtime: &Path,
    stderr: &Path,
    env: &[(&str, &str)],
) -> Command {
    let mut cmd = Command::new(earfs());
    cmd.arg("mount")
        .arg("--foreground")
        .args(args)
        .env("EARFS_RUNTIME_DIR", runtime)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .env_remove("WATCHDOG_USEC")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Wait up to `secs` for `child` to exit: `Some(code)` (the code `None` if a signal
/// ended it), or `None` if it still runs.
pub fn wait_exit(child: &mut std::process::Child, secs: u64) -> Option<Option<i32>> {
    let mut code = None;
    wait_until(secs, || {
        code = child.try_wait().unwrap().map(|st| st.code());
        code.is_some()
    });
    code
}
