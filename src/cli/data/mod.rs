//! The data commands: `earfs adopt`, `reencrypt`, `decrypt`, `cat` and `fsck`. What
//! they share is here: the volume opened offline under its lock, progress (a bar on a
//! terminal, plain lines otherwise), an interrupt that stops between files, a rate
//! limit, files processed in parallel, and the metadata of a file copied from one tree
//! to the other.
//!
//! Every command is safe to interrupt at any point (Ctrl-C, or kill -9) and finishes
//! when run again: see each command's module for the order of its steps.

pub(super) mod adopt;

use std::fs::{File, Metadata};
use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parking_lot::Mutex;

use crate::content::FileFormat;
use crate::crypto::Keyring;
use crate::daemon::{self, Failure, exit};
use crate::fs::copy::Keys;
use crate::fs::rewrite;
use crate::volume::VolumeConfig;

use super::kms::retry;

pub(super) mod cat;
pub(super) mod decrypt;
pub(super) mod fsck;
pub(super) mod reencrypt;

/// Seconds between the plain progress lines printed when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// Exit code of a command stopped by SIGINT or SIGTERM (128 + SIGINT, as a shell
/// reports it); running it again finishes the work.
pub(super) const INTERRUPTED: u8 = 130;

/// A volume opened outside a mount: its lock held, its keys unwrapped.
pub(super) struct Offline {
    pub cfg: VolumeConfig,
    pub keys: Keys,
    /// The volume's lock (an flock on the backing directory), held while this lives.
    _lock: File,
}

impl Offline {
    /// Open the unmounted volume at `backing` (canonical): take its lock (refused with
    /// exit 18 while a daemon serves it), unwrap its keys through the provider it
    /// records, check the MAC, and finish the in-place rewrites an interrupted run
    /// left.
    pub fn open(backing: &Path, deadline: u64, what: &str) -> Result<Offline, Failure> {
        let lock = daemon::try_lock_volume(backing)?.ok_or_else(|| {
            Failure::new(
                exit::VOLUME_IN_USE,
                format!(
                    "volume {} is mounted: unmount it before `earfs {what}`",
                    backing.display()
                ),
            )
        })?;
        daemon::protect_key_material();
        let cfg = VolumeConfig::load(backing)?;
        let provider = cfg.kms.open(retry(deadline)?)?;
        let keyring = cfg.unlock(backing, provider.as_ref())?;
        Self::with_keys(backing, cfg, keyring, lock)
    }

    /// [`Offline::open`] with keys unwrapped already.
    pub fn with_keys(
        backing: &Path,
        cfg: VolumeConfig,
        keyring: Keyring,
        lock: File,
    ) -> Result<Offline, Failure> {
        let format = FileFormat::from_number(u64::from(cfg.format)).ok_or_else(|| {
            Failure::new(
                exit::BAD_CONFIG,
                format!("unknown volume format {}", cfg.format),
            )
        })?;
        finish_rewrites(backing)?;
        Ok(Offline {
            cfg,
            keys: Keys::new(keyring, format),
            _lock: lock,
        })
    }
}

/// Complete the in-place rewrites an interrupted `reencrypt` left in `backing`.
pub(super) fn finish_rewrites(backing: &Path) -> Result<(), Failure> {
    let done = rewrite::finish_pending(backing).map_err(|e| {
        Failure::new(
            exit::FAILURE,
            format!(
                "{}: cannot finish the rewrites an interrupted reencrypt left: {e}",
                backing.display()
            ),
        )
    })?;
    for p in &done.completed {
        eprintln!("finished the interrupted rewrite of {}", p.display());
    }
    if done.dir_times_restored {
        eprintln!("gave the directories back the times an interrupted reencrypt had changed");
    }
    Ok(())
}

/// An operation in progress on a volume (`adopt`, `decrypt`): a record in the work
/// directory, written when it starts and removed when it ends, so that `earfs fsck`
/// can name an interrupted one and the command to finish it. `detail` says what
/// (e.g. `{"source": "/var/lib/pg"}`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub(super) struct OpRecord {
    /// "adopt", "decrypt".
    pub op: String,
    /// The command line that finishes it ("earfs adopt /var/lib/pg /data/enc").
    pub command: String,
    /// Anything else the command needs to find its leftovers (paths).
    #[serde(default)]
    pub detail: serde_json::Value,
    /// When it started (seconds since the epoch).
    pub started: u64,
}

impl OpRecord {
    fn path(backing: &Path, op: &str) -> std::path::PathBuf {
        backing
            .join(rewrite::WORK_DIR)
            .join(format!("op-{op}.json"))
    }

    /// Write the record of `op` (atomically, synced), replacing an older one.
    pub fn begin(
        backing: &Path,
        op: &str,
        command: String,
        detail: serde_json::Value,
    ) -> std::io::Result<()> {
        rewrite::work_dir(backing)?;
        let rec = OpRecord {
            op: op.to_string(),
            command,
            detail,
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let json = serde_json::to_vec_pretty(&rec).map_err(std::io::Error::other)?;
        rewrite::write_atomic(&Self::path(backing, op), &json)
    }

    /// Remove the record of `op` (done), and sync the work directory.
    pub fn end(backing: &Path, op: &str) -> std::io::Result<()> {
        match std::fs::remove_file(Self::path(backing, op)) {
            Ok(()) => sync_dir(&backing.join(rewrite::WORK_DIR)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The records of operations in progress (or interrupted) on the volume.
    pub fn list(backing: &Path) -> std::io::Result<Vec<OpRecord>> {
        let mut out = Vec::new();
        for (name, path) in rewrite::work_entries(backing)? {
            if name.starts_with("op-") && name.ends_with(".json") {
                let text = std::fs::read(&path)?;
                let rec = serde_json::from_slice(&text)
                    .map_err(|err| std::io::Error::other(format!("{}: {err}", path.display())))?;
                out.push(rec);
            }
        }
        out.sort_by(|a: &OpRecord, b| a.op.cmp(&b.op));
        Ok(out)
    }
}

/// Set by SIGINT or SIGTERM: the command stops after the files in progress.
#[derive(Clone)]
pub(super) struct Stop(Arc<AtomicBool>);

impl Stop {
    /// Catch SIGINT and SIGTERM from now on.
    pub fn on_signals() -> Stop {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let _ = signal_hook::flag::register(sig, flag.clone());
        }
        Stop(flag)
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// The failure to return when stopped: `done` says how far it got.
    pub fn failure(&self, what: &str, done: &str) -> Failure {
        Failure::new(
            INTERRUPTED,
            format!("{what} interrupted: {done}; run the same command again to finish"),
        )
    }
}

/// Progress of a long command: files and bytes done of a known total. On a terminal an
/// `indicatif` bar (files, bytes, rate, ETA); otherwise a plain line every
/// [`PLAIN_EVERY`] and a summary at the end.
pub(super) struct Progress {
    what: String,
    files_total: u64,
    bytes_total: u64,
    files: AtomicU64,
    bytes: AtomicU64,
    started: Instant,
    last_line: Mutex<Instant>,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(what: &str, files_total: u64, bytes_total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(bytes_total), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(format!("{what}: 0/{files_total} files"));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            what: what.to_string(),
            files_total,
            bytes_total,
            files: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            started: Instant::now(),
            last_line: Mutex::new(Instant::now()),
            bar,
        }
    }

    /// `n` more bytes done.
    pub fn bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.tick();
    }

    /// One more file done.
    pub fn file(&self) {
        self.files.fetch_add(1, Ordering::Relaxed);
        self.tick();
    }

    pub fn files_done(&self) -> u64 {
        self.files.load(Ordering::Relaxed)
    }

    fn tick(&self) {
        let files = self.files.load(Ordering::Relaxed);
        let bytes = self.bytes.load(Ordering::Relaxed);
        match &self.bar {
            Some(bar) => {
                bar.set_position(bytes);
                bar.set_message(format!("{}: {files}/{} files", self.what, self.files_total));
            }
            None => {
                let mut last = self.last_line.lock();
                if last.elapsed() >= PLAIN_EVERY {
                    *last = Instant::now();
                    eprintln!("{}", self.line(files, bytes));
                }
            }
        }
    }

    fn line(&self, files: u64, bytes: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = bytes as f64 / secs;
        let pct = if self.bytes_total > 0 {
            100.0 * bytes as f64 / self.bytes_total as f64
        } else {
            100.0
        };
        let eta = if rate > 0.0 && self.bytes_total > bytes {
            format!(", ETA {:.0} s", (self.bytes_total - bytes) as f64 / rate)
        } else {
            String::new()
        };
        format!(
            "{}: {files}/{} files, {} of {} ({pct:.0}%), {}/s{eta}",
            self.what,
            self.files_total,
            human_bytes(bytes),
            human_bytes(self.bytes_total),
            human_bytes(rate as u64),
        )
    }

    /// Clear the bar and print the summary line.
    pub fn finish(&self, verb: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let files = self.files.load(Ordering::Relaxed);
        let bytes = self.bytes.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        eprintln!(
            "{verb} {files} files, {} in {secs:.1} s ({}/s)",
            human_bytes(bytes),
            human_bytes((bytes as f64 / secs.max(0.001)) as u64)
        );
    }

    /// Clear the bar without a summary (a failure or an interrupt).
    pub fn abandon(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Bytes for a person: "1.5 GiB".
pub(super) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A rate limit in bytes per second, shared by every worker: each chunk moved waits
/// until the bytes so far fit the rate.
pub(super) struct Rate {
    per_sec: u64,
    started: Instant,
    moved: AtomicU64,
}

impl Rate {
    pub fn new(per_sec: u64) -> Rate {
        Rate {
            per_sec,
            started: Instant::now(),
            moved: AtomicU64::new(0),
        }
    }

    /// Account `n` bytes and sleep as long as the total is ahead of the rate.
    pub fn take(&self, n: u64) {
        let moved = self.moved.fetch_add(n, Ordering::Relaxed) + n;
        let due = Duration::from_secs_f64(moved as f64 / self.per_sec as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// Parse a rate: bytes per second with an optional binary or decimal unit and an
/// optional "/s": "100MiB/s", "50M", "1.5GiB/s", "1048576".
pub(super) fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        format!("{s:?} is not a rate: give bytes per second such as 100MiB/s or 50M")
    })?;
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "k" | "KiB" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        u => {
            return Err(format!(
                "unknown unit {u:?} in {s:?}: use K, M, G (binary) or KB, MB, GB"
            ));
        }
    };
    let v = (n * mult).round();
    if !(4096.0..1e15).contains(&v) {
        return Err(format!("{s:?}: a rate must be at least 4KiB/s"));
    }
    Ok(v as u64)
}

/// Run `work` on every job with `threads` workers; the first failure stops the others
/// (each finishes the job it has), as does `stop`. Returns the first failure.
pub(super) fn parallel<T: Sync>(
    jobs: &[T],
    threads: usize,
    stop: &Stop,
    work: impl Fn(&T) -> Result<(), Failure> + Sync,
) -> Result<(), Failure> {
    let next = AtomicU64::new(0);
    let failed: Mutex<Option<Failure>> = Mutex::new(None);
    let quit = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, 64) {
            s.spawn(|| {
                loop {
                    if quit.load(Ordering::Relaxed) || stop.requested() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(job) = jobs.get(i) else { return };
                    if let Err(e) = work(job) {
                        quit.store(true, Ordering::Relaxed);
                        failed.lock().get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    match failed.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The default number of workers: four per CPU, 4 to 16. The work waits on the disk
/// (every file is synced) far more than on the CPU (XTS runs at several GB/s), so more
/// workers than CPUs keep the disk busy: on 2 CPUs, 8 workers adopted a 2 GiB tree
/// twice as fast as 2 (docs/performance.md).
pub(super) fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 4)
        .unwrap_or(8)
        .clamp(4, 16)
}

/// A failure about `path`.
pub(super) fn failed_at(path: &Path, e: impl std::fmt::Display) -> Failure {
    Failure::new(exit::FAILURE, format!("{}: {e}", path.display()))
}

/// Give `dst` (a regular file or directory just written) the owner, permission bits
/// and `user.*` extended attributes of `src` (at `src_path`), and then its access and
/// modification times.
pub(super) fn copy_meta(src: &Metadata, src_path: &Path, dst: &File) -> std::io::Result<()> {
    rustix::fs::fchown(
        dst,
        Some(rustix::process::Uid::from_raw(src.uid())),
        Some(rustix::process::Gid::from_raw(src.gid())),
    )?;
    rustix::fs::fchmod(dst, rustix::fs::Mode::from_raw_mode(src.mode() & 0o7777))?;
    copy_user_xattrs(src_path, dst)?;
    set_times_of(src, dst)
}

/// Give `dst` the access and modification times of `src`.
pub(super) fn set_times_of(src: &Metadata, dst: &File) -> std::io::Result<()> {
    Ok(rustix::fs::futimens(dst, &timestamps(src))?)
}

/// The access and modification times of `m`.
pub(super) fn timestamps(m: &Metadata) -> rustix::fs::Timestamps {
    rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: m.atime(),
            tv_nsec: m.atime_nsec(),
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: m.mtime(),
            tv_nsec: m.mtime_nsec(),
        },
    }
}

/// Give the symlink `dst` the owner and times of `src` (symlinks carry no mode and,
/// on Linux, no `user.*` attributes).
pub(super) fn copy_link_meta(src: &Metadata, dst: &Path) -> std::io::Result<()> {
    rustix::fs::chownat(
        rustix::fs::CWD,
        dst,
        Some(rustix::process::Uid::from_raw(src.uid())),
        Some(rustix::process::Gid::from_raw(src.gid())),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(rustix::fs::utimensat(
        rustix::fs::CWD,
        dst,
        &timestamps(src),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Copy the `user.*` extended attributes of the file at `src` to `dst`. A filesystem
/// without extended attributes has none to copy.
pub(super) fn copy_user_xattrs(src: &Path, dst: &File) -> std::io::Result<()> {
    let mut names = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::llistxattr(src, &mut names[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    };
    for name in names[..n]
        .split(|&b| b == 0)
        .filter(|n| n.starts_with(b"user."))
    {
        let name = std::ffi::OsStr::new(std::str::from_utf8(name).unwrap_or_default());
        if name.is_empty() {
            continue;
        }
        let mut value = vec![0u8; 4096];
        let len = loop {
            match rustix::fs::lgetxattr(src, name, &mut value[..]) {
                Ok(n) => break n,
                Err(rustix::io::Errno::RANGE) => value.resize(value.len() * 4, 0),
                Err(e) => return Err(e.into()),
            }
        };
        rustix::fs::fsetxattr(dst, name, &value[..len], rustix::fs::XattrFlags::empty())?;
    }
    Ok(())
}

/// fsync the directory at `dir`.
pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_take_units_and_refuse_nonsense() {
        assert_eq!(parse_rate("100MiB/s"), Ok(100 << 20));
        assert_eq!(parse_rate("50M"), Ok(50 << 20));
        assert_eq!(parse_rate("1.5GiB/s"), Ok(3 << 29));
        assert_eq!(parse_rate("20MB/s"), Ok(20_000_000));
        assert_eq!(parse_rate("1048576"), Ok(1 << 20));
        for bad in ["", "fast", "10 parsecs", "1", "-5M", "5X/s"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
