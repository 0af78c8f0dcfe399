//! The daemon: startup order (volume → key → checks → mount → ready), the background
//! launcher, signals and unmounting.

pub mod config;
pub mod control;
pub mod exit;
pub mod logging;
mod metrics;
mod mountinfo;
pub mod mountopts;
pub mod notify;
mod state;

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;
use rustix::io::Errno;

use crate::content::FileFormat;
use crate::fs::EarFs;
use crate::fuse::{AdapterOptions, EarFuse, MountConfig};
use crate::kms::{KmsError, KmsOverrides, Retry};

use crate::volume::{VolumeConfig, VolumeError};
pub use config::RevocationPolicy;

pub use mountinfo::{MountEntry, find_mount};

/// A failure with the exit code it maps to and one line for the user.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The exit code of a key provider error.
fn kms_code(k: &KmsError) -> u8 {
    match k {
        KmsError::KeyFileMissing(_) => exit::KEY_MISSING,
        KmsError::KeyFileInsecure { .. } => exit::KEY_INSECURE,
        KmsError::WrongKey(_) | KmsError::InvalidCiphertext { .. } => exit::WRONG_KEY,
        KmsError::InvalidReference(_) => exit::USAGE,
        KmsError::Credentials(_) | KmsError::CredentialsInsecure { .. } => exit::KMS_CREDENTIALS,
        KmsError::AccessDenied { .. } => exit::KMS_DENIED,
        KmsError::KeyUnusable { .. } => exit::KMS_KEY_UNUSABLE,
        KmsError::Checksum { .. } => exit::KMS_CHECKSUM,
        KmsError::Transient { .. } | KmsError::DeadlineExceeded { .. } => exit::KMS_UNAVAILABLE,
        KmsError::KeyFileInvalid { .. }
        | KmsError::KeyFileIo { .. }
        | KmsError::Rejected { .. }
        | KmsError::Crypto(_) => exit::FAILURE,
    }
}

impl From<KmsError> for Failure {
    fn from(e: KmsError) -> Self {
        Failure::new(kms_code(&e), e.to_string())
    }
}

impl From<VolumeError> for Failure {
    fn from(e: VolumeError) -> Self {
        let code = match &e {
            VolumeError::NotAVolume(_) | VolumeError::NoBackingDir(_) => exit::NOT_A_VOLUME,
            VolumeError::AlreadyAVolume(_) | VolumeError::NotEmpty(_) => exit::INIT_REFUSED,
            VolumeError::BadConfig { .. } | VolumeError::ImportRefused { .. } => exit::BAD_CONFIG,
            VolumeError::NotRetirable { .. } => exit::USAGE,
            VolumeError::ConfigMac(_) => exit::CONFIG_TAMPERED,
            VolumeError::Kms(k) => kms_code(k),
            VolumeError::Io { .. } => exit::FAILURE,
        };
        Failure::new(code, e.to_string())
    }
}

/// What `earfs mount` was asked for.
#[derive(Debug, Clone)]
pub struct MountRequest {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    pub threads: usize,
    pub writeback_cache: bool,
    pub options: Vec<String>,
    /// Bounds of the KMS unwrap at start (retries of transient failures included).
    pub kms_retry: Retry,
    /// Per-node KMS settings over those in `earfs.conf`.
    pub kms_overrides: KmsOverrides,
    /// How often the CMK is checked again while mounted; `None`: never.
    pub recheck_interval: Option<Duration>,
    pub revocation_policy: RevocationPolicy,
    /// The Prometheus endpoint (loopback), if any.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// How long SIGTERM waits for a busy mount before giving up.
    pub stop_timeout: Duration,
    pub log_level: log::LevelFilter,
    /// The config file, read again on SIGHUP.
    pub config_file: Option<PathBuf>,
}

/// systemd's credential for the KMS (`LoadCredential=kms:FILE`), if present.
pub fn systemd_kms_credential() -> Option<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    let p = PathBuf::from(dir).join("kms");
    p.exists().then_some(p)
}

/// Environment variable naming the readiness pipe of a background daemon.
pub const READY_FD_ENV: &str = "EARFS_READY_FD";

/// `p` made absolute against the current directory (without resolving links).
pub fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

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
struct Ready(Option<File>);

impl Ready {
    fn from_env() -> Ready {
        let fd: Option<OwnedFd> = std::env::var(READY_FD_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .and_then(crate::sys::inherited_fd);
        // The variable stays set (removing it needs `unsafe` in edition 2024); it is
        // harmless: the daemon starts no child that reads it.
        Ready(fd.map(File::from))
    }
    fn detached(&self) -> bool {
        self.0.is_some()
    }
    fn ok(&mut self) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(b"READY\n");
        }
    }
    fn fail(&mut self, f: &Failure) {
        if let Some(mut p) = self.0.take() {
            let _ = writeln!(p, "FAIL {}\t{}", f.code, f.message.replace('\n', " "));
        }
    }
}

/// Check the mountpoint: a directory, empty, not already a mount.
pub fn check_mountpoint(mp: &Path) -> Result<PathBuf, Failure> {
    let meta = match std::fs::metadata(mp) {
        Ok(m) => m,
        Err(e)
            if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED))
                && clear_stale_mount(mp) =>
        {
            std::fs::metadata(mp).map_err(|e| {
                Failure::new(
                    exit::BAD_MOUNTPOINT,
                    format!("mountpoint {}: {e}", mp.display()),
                )
            })?
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)) => {
            return Err(Failure::new(
                exit::ALREADY_MOUNTED,
                format!(
                    "{} holds a dead FUSE mount (its daemon is gone); clear it with `earfs umount {}`",
                    mp.display(),
                    mp.display()
                ),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Failure::new(
                exit::BAD_MOUNTPOINT,
                format!(
                    "mountpoint {} does not exist; create it with `mkdir -p {}`",
                    mp.display(),
                    mp.display()
                ),
            ));
        }
        Err(e) => {
            return Err(Failure::new(
                exit::BAD_MOUNTPOINT,
                format!("mountpoint {}: {e}", mp.display()),
            ));
        }
    };
    if !meta.is_dir() {
        return Err(Failure::new(
            exit::BAD_MOUNTPOINT,
            format!("mountpoint {} is not a directory", mp.display()),
        ));
    }
    let canon = std::fs::canonicalize(mp).unwrap_or_else(|_| absolute(mp));
    // A dead mount can still answer stat from the kernel's attribute cache; statfs
    // always asks the daemon.
    let dead = |p: &Path| {
        matches!(
            rustix::fs::statfs(p),
            Err(Errno::NOTCONN | Errno::CONNABORTED)
        )
    };
    if find_mount(&canon).is_some() && dead(&canon) {
        clear_stale_mount(&canon);
    }
    if let Some(m) = find_mount(&canon) {
        return Err(Failure::new(
            exit::ALREADY_MOUNTED,
            format!(
                "{} is already a mount point ({} from {}); unmount it first",
                canon.display(),
                m.fstype,
                m.source
            ),
        ));
    }
    let mut it = std::fs::read_dir(&canon).map_err(|e| {
        Failure::new(
            exit::BAD_MOUNTPOINT,
            format!("mountpoint {}: {e}", canon.display()),
        )
    })?;
    if it.next().is_some() {
        return Err(Failure::new(
            exit::MOUNTPOINT_NOT_EMPTY,
            format!(
                "mountpoint {} is not empty; earfs mounts only over an empty directory, so that nothing hides under the mount",
                canon.display()
            ),
        ));
    }
    Ok(canon)
}

/// A dead FUSE mount of a crashed earfs daemon at `mp`: unmount it (and say so).
/// Anything else at `mp` is left alone.
fn clear_stale_mount(mp: &Path) -> bool {
    let path = absolute(mp);
    let Some(m) = find_mount(&path) else {
        return false;
    };
    if !(m.fstype.starts_with("fuse") && m.source.starts_with("earfs:")) {
        return false;
    }
    match unmount(&path) {
        Ok(()) => {
            log::warn!(
                "cleared the dead mount of a crashed earfs daemon at {} ({})",
                path.display(),
                m.source
            );
            true
        }
        Err(f) => {
            log::warn!("cannot clear the dead mount at {}: {f}", path.display());
            false
        }
    }
}

/// Processes that hold something under `mp` (cwd, root, an open file, a mapping):
/// `pid (comm)` each, for the message of a busy unmount.
pub fn holders(mp: &Path) -> Vec<String> {
    let me = std::process::id();
    let under = |p: &Path| p.starts_with(mp);
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = e.path();
        let mut holds = ["cwd", "root"]
            .iter()
            .any(|l| std::fs::read_link(base.join(l)).is_ok_and(|p| under(&p)));
        if !holds && let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            holds = fds
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| under(&p)));
        }
        if !holds && let Ok(maps) = std::fs::read_to_string(base.join("maps")) {
            holds = maps
                .lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .any(|p| under(Path::new(p)));
        }
        if holds {
            let comm = std::fs::read_to_string(base.join("comm")).unwrap_or_default();
            out.push(format!("{pid} ({})", comm.trim()));
        }
    }
    out
}

/// Take the volume's exclusive lock (flock on the backing directory).
fn lock_volume(backing: &Path) -> Result<File, Failure> {
    try_lock_volume(backing)?.ok_or_else(|| {
        Failure::new(
            exit::VOLUME_IN_USE,
            format!(
                "volume {} is already mounted by another earfs daemon; a volume can be mounted only once",
                backing.display()
            ),
        )
    })
}

/// Take the volume's exclusive lock if no daemon holds it (`None`: one does). Held
/// while the returned file is open.
pub fn try_lock_volume(backing: &Path) -> Result<Option<File>, Failure> {
    let dir = File::open(backing)
        .map_err(|e| Failure::new(exit::NOT_A_VOLUME, format!("{}: {e}", backing.display())))?;
    match rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(dir)),
        Err(Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(Failure::new(
            exit::FAILURE,
            format!("cannot lock {}: {e}", backing.display()),
        )),
    }
}

/// Unmount `mp`: umount(2) as root, else fusermount3 -u.
pub fn unmount(mp: &Path) -> Result<(), Failure> {
    match rustix::mount::unmount(mp, rustix::mount::UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::BUSY) => Err(Failure::new(
            exit::BUSY,
            format!(
                "{} is busy: a process has a file or its working directory under it (see `fuser -vm {}`)",
                mp.display(),
                mp.display()
            ),
        )),
        Err(Errno::PERM) => {
            let out = Command::new("fusermount3").arg("-u").arg(mp).output();
            match out {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => Err(Failure::new(
                    exit::FAILURE,
                    String::from_utf8_lossy(&o.stderr).trim().to_string(),
                )),
                Err(e) => Err(Failure::new(exit::FAILURE, format!("fusermount3: {e}"))),
            }
        }
        Err(e) => Err(Failure::new(
            exit::FAILURE,
            format!("cannot unmount {}: {e}", mp.display()),
        )),
    }
}

/// Wait until no daemon holds the volume's lock (after an unmount).
pub fn wait_unlocked(backing: &Path, deadline: Duration) -> bool {
    let start = Instant::now();
    loop {
        if let Ok(dir) = File::open(backing) {
            if rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive).is_ok() {
                return true;
            }
        } else {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Keep key material out of swap: lock every page of the process as it is touched
/// (`mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`). Only where it cannot make later
/// allocations fail: with CAP_IPC_LOCK or an unlimited RLIMIT_MEMLOCK.
fn lock_memory() {
    use rustix::mm::{MlockAllFlags, mlockall};
    let can = rustix::thread::capabilities(None)
        .map(|c| {
            c.effective
                .contains(rustix::thread::CapabilitySet::IPC_LOCK)
        })
        .unwrap_or(false)
        || rustix::process::getrlimit(rustix::process::Resource::Memlock)
            .current
            .is_none();
    if !can {
        log::warn!(
            "key material is not locked in memory (no CAP_IPC_LOCK, RLIMIT_MEMLOCK limited); it may be swapped out"
        );
        return;
    }
    if let Err(e) =
        mlockall(MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT)
    {
        log::warn!("key material is not locked in memory: mlockall: {e}");
    }
}

/// For commands that hold plaintext keys (init, kms-check, export-keyring): keep them
/// out of swap and out of core dumps.
pub fn protect_key_material() {
    lock_memory();
    let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
}

fn prepare_process() {
    // The kernel has applied the caller's umask to every mode it sends; ours must not
    // apply again when the backing objects are created.
    rustix::process::umask(rustix::fs::Mode::empty());
    // No swap, no core dumps: the process holds key material.
    protect_key_material();
    // Every inode the kernel holds is an O_PATH descriptor: allow as many as we may.
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(max) = lim.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
}

/// Run the daemon in this process until the volume is unmounted.
pub fn serve(req: &MountRequest) -> Result<(), Failure> {
    let mut ready = Ready::from_env();
    if ready.detached() {
        let _ = rustix::process::setsid();
    }
    match serve_inner(req, &mut ready) {
        Ok(()) => Ok(()),
        Err(f) => {
            ready.fail(&f);
            Err(f)
        }
    }
}

/// Complete the in-place rewrites an interrupted `earfs reencrypt` left (a byte copy;
/// see `fs::rewrite`), before anything reads the files they touched.
fn finish_rewrites(backing: &Path) -> Result<(), Failure> {
    let done = crate::fs::rewrite::finish_pending(backing).map_err(|e| {
        Failure::new(
            exit::FAILURE,
            format!(
                "{}: cannot finish the file rewrites an interrupted reencrypt left: {e}",
                backing.display()
            ),
        )
    })?;
    for p in &done.completed {
        log::warn!("finished the interrupted rewrite of {}", p.display());
    }
    if done.dir_times_restored {
        log::info!("gave the directories back the times an interrupted reencrypt had changed");
    }
    if done.rolled_back > 0 {
        log::info!(
            "removed {} unfinished rewrite(s) of an interrupted reencrypt",
            done.rolled_back
        );
    }
    Ok(())
}

fn serve_inner(req: &MountRequest, ready: &mut Ready) -> Result<(), Failure> {
    prepare_process();
    // Take the signals before anything is mounted: a SIGTERM that arrives while we
    // start is then handled (unmount) as soon as the mount is up, instead of killing
    // the daemon and leaving a dead mount.
    let signals = take_signals();
    log::set_max_level(req.log_level);
    let backing = std::fs::canonicalize(&req.backing)
        .map_err(|_| Failure::from(VolumeError::NoBackingDir(req.backing.clone())))?;
    let cfg = VolumeConfig::load(&backing)?;
    let mountpoint = check_mountpoint(&req.mountpoint)?;
    logging::set_context(&cfg.volume_id, &mountpoint);
    if ready.detached() {
        // A background daemon keeps no directory of the caller busy.
        let _ = std::env::set_current_dir("/");
    }
    let _lock = lock_volume(&backing)?;
    finish_rewrites(&backing)?;
    let metrics_listener = match req.metrics_address {
        Some(addr) => Some(metrics::bind(addr).map_err(|e| {
            Failure::new(
                exit::CONFIG_FILE,
                format!("cannot listen for metrics on {addr}: {e}"),
            )
        })?),
        None => None,
    };
    let spec = cfg.kms.with_overrides(&req.kms_overrides)?;
    let what = format!(
        "unwrapping the data keys of volume {} through {} ({}); KMS deadline {:?}",
        cfg.volume_id,
        spec.name(),
        spec.key_reference(),
        req.kms_retry.deadline
    );
    log::info!("{what}");
    notify::status(&what);
    let provider = spec.open(req.kms_retry)?;
    let keys = cfg.unlock(&backing, provider.as_ref())?;
    let format = FileFormat::from_number(u64::from(cfg.format)).ok_or_else(|| {
        Failure::new(
            exit::BAD_CONFIG,
            format!("unknown volume format {}", cfg.format),
        )
    })?;
    let fs =
        Arc::new(EarFs::new(&backing, keys, format).map_err(|e| {
            Failure::new(exit::NOT_A_VOLUME, format!("{}: {e}", backing.display()))
        })?);
    let mcfg = MountConfig {
        fsname: format!("earfs:{}", backing.display()),
        allow_other: req.allow_other,
        threads: req.threads,
        options: req.options.clone(),
    };
    let adapter = EarFuse::new(
        fs.clone(),
        AdapterOptions {
            writeback_cache: req.writeback_cache,
        },
    );
    let session = crate::fuse::mount(adapter, &mountpoint, &mcfg).map_err(|e| {
        Failure::new(
            exit::FUSE_FAILED,
            format!("cannot mount FUSE at {}: {e} (is the fuse module loaded and /dev/fuse usable? --allow-other as non-root needs user_allow_other in /etc/fuse.conf)", mountpoint.display()),
        )
    })?;
    let cache = crate::fuse::CacheInvalidator::of(&session);
    let running = Arc::new(AtomicBool::new(true));
    let worker = {
        let running = running.clone();
        std::thread::Builder::new()
            .name("earfs-session".into())
            .spawn(move || {
                let r = session.run();
                running.store(false, Ordering::SeqCst);
                r
            })
            .map_err(|e| Failure::new(exit::FAILURE, format!("cannot start threads: {e}")))?
    };
    // Ready only once a request has been served through the mount.
    std::fs::metadata(&mountpoint).map_err(|e| {
        Failure::new(
            exit::FUSE_FAILED,
            format!("mount at {} does not answer: {e}", mountpoint.display()),
        )
    })?;
    let shared = state::Shared::new(state::Started {
        fs,
        cache: Some(cache),
        backing: backing.clone(),
        mountpoint: mountpoint.clone(),
        threads: req.threads,
        writeback_cache: req.writeback_cache,
        config_file: req.config_file.clone(),
        cfg: cfg.clone(),
        provider,
        settings: state::Reloadable {
            recheck_interval: req.recheck_interval,
            policy: req.revocation_policy,
            log_level: req.log_level,
            kms_overrides: req.kms_overrides.clone(),
            kms_retry: req.kms_retry,
        },
    });
    let socket = match control::serve(shared.clone()) {
        Ok(p) => Some(p),
        Err(e) => {
            log::warn!(
                "no control socket in {} ({e}): `earfs status` will not reach this daemon",
                control::runtime_dir().display()
            );
            None
        }
    };
    if let Some(l) = metrics_listener {
        match metrics::serve(shared.clone(), l) {
            Ok(a) => log::info!("metrics at http://{a}/metrics"),
            Err(e) => log::warn!("no metrics endpoint: {e}"),
        }
    }
    spawn_recheck(shared.clone(), running.clone());
    spawn_watchdog(mountpoint.clone(), running.clone());
    let serving = format!(
        "serving volume {} from {} at {} ({} threads, cipher {}, writeback cache {}, CMK recheck {})",
        cfg.volume_id,
        backing.display(),
        mountpoint.display(),
        req.threads,
        crate::crypto::implementation(),
        if req.writeback_cache { "on" } else { "off" },
        match req.recheck_interval {
            Some(d) => format!("every {}", humantime::format_duration(d)),
            None => "off".into(),
        }
    );
    log::info!("mounted: {serving}");
    ready.ok();
    notify::notify(&format!("READY=1\nSTATUS={serving}"));
    watch_signals(signals, shared.clone(), req.stop_timeout);
    let result = match worker.join() {
        Ok(Ok(())) => {
            log::info!("unmounted {}", mountpoint.display());
            Ok(())
        }
        Ok(Err(e)) => Err(Failure::new(
            exit::FAILURE,
            format!("FUSE session ended with an error: {e}"),
        )),
        Err(_) => Err(Failure::new(exit::FAILURE, "FUSE session thread panicked")),
    };
    shared.wake();
    if let Some(p) = socket {
        let _ = std::fs::remove_file(p);
    }
    result
}

/// Check the CMK again every recheck interval (docs/kms.md, docs/operations.md).
fn spawn_recheck(shared: Arc<state::Shared>, running: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("earfs-recheck".into())
        .spawn(move || shared.recheck_loop(&|| !running.load(Ordering::SeqCst)));
    if spawned.is_err() {
        log::warn!("cannot start the CMK recheck thread");
    }
}

/// Ping systemd's watchdog at half its interval, while a request through the mount is
/// answered: a hung daemon stops pinging and systemd restarts it.
fn spawn_watchdog(mountpoint: PathBuf, running: Arc<AtomicBool>) {
    let Some(interval) = notify::watchdog_interval() else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("earfs-watchdog".into())
        .spawn(move || {
            while running.load(Ordering::SeqCst) {
                if rustix::fs::statfs(&mountpoint).is_ok() && running.load(Ordering::SeqCst) {
                    notify::notify("WATCHDOG=1");
                }
                std::thread::sleep(interval / 2);
            }
        });
    if spawned.is_err() {
        log::warn!("cannot start the watchdog thread");
    }
}

/// SIGTERM / SIGINT unmount (retried while busy, naming who holds the mount, until the
/// stop timeout; then the daemon exits with code 23 and leaves the mount erroring).
/// SIGHUP reloads the config file and the keyring.
fn take_signals() -> Option<signal_hook::iterator::Signals> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("cannot install signal handlers ({e}); stop the daemon with `earfs umount`");
            None
        }
    }
}

fn watch_signals(
    signals: Option<signal_hook::iterator::Signals>,
    shared: Arc<state::Shared>,
    stop_timeout: Duration,
) {
    use signal_hook::consts::SIGHUP;
    let Some(mut signals) = signals else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("earfs-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    logging::reopen_on_hup();
                    notify::notify(&format!(
                        "RELOADING=1\nMONOTONIC_USEC={}",
                        notify::monotonic_usec()
                    ));
                    match shared.reload() {
                        Ok(()) => notify::notify("READY=1\nSTATUS=reloaded"),
                        Err(e) => {
                            log::error!("reload failed, still serving with the old keys: {e}");
                            notify::notify(&format!("READY=1\nSTATUS=reload failed: {e}"));
                        }
                    }
                    continue;
                }
                let mp = shared.mountpoint.clone();
                notify::notify("STOPPING=1");
                log::info!("signal {sig}: unmounting {}", mp.display());
                stop(&mp, stop_timeout);
            }
        });
    if spawned.is_err() {
        log::warn!("cannot start the signal thread");
    }
}

/// Unmount, retrying while busy until `timeout`.
fn stop(mp: &Path, timeout: Duration) {
    let start = Instant::now();
    let mut last_report: Option<Instant> = None;
    loop {
        match unmount(mp) {
            Ok(()) => return,
            Err(f) if f.code == exit::BUSY => {
                if last_report.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    let who = holders(mp);
                    let msg = if who.is_empty() {
                        format!("{} is busy; retrying", mp.display())
                    } else {
                        format!(
                            "{} is busy, held by {}; retrying",
                            mp.display(),
                            who.join(", ")
                        )
                    };
                    log::warn!("{msg}");
                    notify::status(&format!("stopping: {msg}"));
                    last_report = Some(Instant::now());
                }
                if start.elapsed() >= timeout {
                    log::error!(
                        "{} is still busy after {}; exiting without unmounting: the mount now fails with ENOTCONN until `earfs umount {}`",
                        mp.display(),
                        humantime::format_duration(timeout),
                        mp.display()
                    );
                    std::process::exit(i32::from(exit::BUSY));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(f) => {
                log::error!("{f}");
                return;
            }
        }
    }
}
