//! `earfs reencrypt BACKING|MOUNTPOINT`: rewrite every file whose key version is not the
//! current one or whose format is not the volume's, so that old data keys can be
//! retired and v1's crash window goes away.
//!
//! - **Not mounted:** a file with one name is written anew beside itself (in the work
//!   directory), given its metadata, synced and renamed over the old one (one write of
//!   the data); a file with several names is rewritten in place (`fs::rewrite`), so
//!   that every name stays one inode.
//! - **Mounted:** each file is rewritten in place by the daemon (a `rewrite` request on
//!   its control socket) under the inode's exclusive content lock: the kernel keeps
//!   the same inode and no reader sees anything but the whole old or the whole new
//!   content. Files open through the mount are skipped and tried again on later passes
//!   (or rewritten too, with `--include-open`).
//!
//! Either way a kill at any point leaves every file whole under its old or its new key;
//! running the command again finishes (the daemon, and every offline command, first
//! completes a rewrite that had committed).

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

use super::{
    Offline, Progress, Rate, Stop, copy_meta, default_jobs, failed_at, human_bytes, parallel,
};
use crate::cli::change::{canonical, daemon_of};
use crate::cli::output;
use crate::content::{
    FileFormat, HEADER_LEN, backing_size_to_plain_size, header_names, header_never_written,
};
use crate::daemon::control::{RewriteRequest, request_reply};
use crate::daemon::{self, Failure, exit};
use crate::fs::copy::Keys;
use crate::fs::rewrite::{self, Rewritten, Times, copy_plain, create_new, rewrite_in_place};
use crate::fs::{census, is_reserved_root_name};
use crate::volume::VolumeConfig;

/// How often a mounted volume's files that were open are tried again, in one run.
const PASSES: u32 = 3;
/// The wait between two passes over files that were open.
const PASS_WAIT: Duration = Duration::from_secs(2);

/// The flags of `earfs reencrypt`.
pub(in crate::cli) struct Options {
    pub rate: Option<u64>,
    pub jobs: Option<usize>,
    pub include_open: bool,
    pub dry_run: bool,
    pub json: bool,
    pub kms_deadline: u64,
}

/// A file to rewrite.
#[derive(Debug)]
struct Job {
    /// Path under the backing root.
    rel: PathBuf,
    /// Plaintext size (for progress).
    size: u64,
    nlink: u64,
}

/// What the walk found: names and sizes only (no file is opened).
#[derive(Debug, Default)]
struct Tree {
    /// Every directory's times (the root's as ""), by path under the root.
    dirs: BTreeMap<PathBuf, Times>,
    /// Every regular file, each inode once, the biggest first.
    files: Vec<Job>,
}

/// The files sorted out by their headers.
#[derive(Debug, Default)]
struct Found {
    /// The files to rewrite.
    jobs: Vec<Job>,
    /// Files already in the volume's format under the current key (or without a header).
    current: u64,
    /// Files whose header or length is not an earfs file's: left alone, named.
    damaged: Vec<(PathBuf, String)>,
}

/// Whether a backing file needs a rewrite, from its header alone (no key needed): the
/// key is checked when it is rewritten. `Err`: damaged, with the reason.
fn needs_rewrite(
    path: &Path,
    format: FileFormat,
    current: u32,
) -> std::io::Result<Result<bool, String>> {
    let mut f = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let len = f.metadata()?.len();
    classify(&mut f, len, format, current)
}

/// [`needs_rewrite`] of an open backing file of `len` bytes.
fn classify(
    f: &mut File,
    len: u64,
    format: FileFormat,
    current: u32,
) -> std::io::Result<Result<bool, String>> {
    if len == 0 {
        return Ok(Ok(false));
    }
    let h = census::read_header_block(f)?;
    if header_never_written(&h) {
        return Ok(Ok(false));
    }
    Ok(match header_names(&h) {
        Err(e) => Err(e.to_string()),
        Ok((f, _)) if backing_size_to_plain_size(f, len).is_none() => Err(format!(
            "a length of {len} bytes codes no size in format {}",
            f.number()
        )),
        Ok((f, kv)) => Ok(f != format || kv != current),
    })
}

/// Walk the backing tree under `root` for its directories and files (each inode once).
/// Only names and sizes: the headers are read by the parallel workers.
fn walk(root: &Path) -> Result<Tree, Failure> {
    let mut tree = Tree::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let meta = std::fs::metadata(&dir).map_err(|e| failed_at(&dir, e))?;
        let rel = dir.strip_prefix(root).unwrap_or(&dir).to_path_buf();
        tree.dirs.insert(rel, rewrite::times_of(&meta));
        let entries = std::fs::read_dir(&dir).map_err(|e| failed_at(&dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| failed_at(&dir, e))?;
            if dir == root && is_reserved_root_name(&entry.file_name()) {
                continue;
            }
            let path = entry.path();
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(failed_at(&path, e)),
            };
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            if !meta.is_file() || (meta.nlink() > 1 && !seen.insert((meta.dev(), meta.ino()))) {
                continue;
            }
            tree.files.push(Job {
                rel: path.strip_prefix(root).unwrap_or(&path).to_path_buf(),
                size: meta.len().saturating_sub(HEADER_LEN),
                nlink: meta.nlink(),
            });
        }
    }
    // Big files first: the parallel workers then end together.
    tree.files.sort_by_key(|j| std::cmp::Reverse(j.size));
    Ok(tree)
}

/// What one file's header says.
enum Sorted {
    Rewrite,
    Current,
    Damaged(String),
}

/// Tally of the files sorted out, shared by the parallel workers.
#[derive(Default)]
struct Tally {
    jobs: Mutex<Vec<Job>>,
    current: AtomicU64,
    damaged: Mutex<Vec<(PathBuf, String)>>,
}

impl Tally {
    fn add(&self, root: &Path, job: &Job, sorted: Sorted) {
        match sorted {
            Sorted::Rewrite => self.jobs.lock().push(Job {
                rel: job.rel.clone(),
                size: job.size,
                nlink: job.nlink,
            }),
            Sorted::Current => {
                self.current.fetch_add(1, Ordering::Relaxed);
            }
            Sorted::Damaged(why) => self.damaged.lock().push((root.join(&job.rel), why)),
        }
    }

    fn found(self) -> Found {
        let mut jobs = self.jobs.into_inner();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.size));
        let mut damaged = self.damaged.into_inner();
        damaged.sort();
        Found {
            jobs,
            current: self.current.into_inner(),
            damaged,
        }
    }
}

/// Sort a header's verdict (`None`: the file is gone).
fn sorted(
    r: std::io::Result<Result<bool, String>>,
    path: &Path,
) -> Result<Option<Sorted>, Failure> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(failed_at(path, e)),
        Ok(Err(why)) => Ok(Some(Sorted::Damaged(why))),
        Ok(Ok(false)) => Ok(Some(Sorted::Current)),
        Ok(Ok(true)) => Ok(Some(Sorted::Rewrite)),
    }
}

/// Read every file's header, in parallel (on a cold cache each is a disk read), and
/// sort the files out.
fn sort_out(
    root: &Path,
    tree: &Tree,
    format: FileFormat,
    current: u32,
    o: &Options,
    stop: &Stop,
) -> Result<Found, Failure> {
    let tally = Tally::default();
    parallel(
        &tree.files,
        o.jobs.unwrap_or_else(default_jobs),
        stop,
        |job| {
            let path = root.join(&job.rel);
            if let Some(s) = sorted(needs_rewrite(&path, format, current), &path)? {
                tally.add(root, job, s);
            }
            Ok(())
        },
    )?;
    if stop.requested() {
        return Err(stop.failure("reencrypt", "no file rewritten yet"));
    }
    Ok(tally.found())
}

/// `earfs reencrypt TARGET`.
pub(in crate::cli) fn run(target: &Path, o: &Options) -> Result<(), Failure> {
    let target = canonical(target)?;
    // A mountpoint of an earfs mount names its backing directory.
    let backing = match daemon::find_mount(&target) {
        Some(m) if m.fstype.starts_with("fuse.earfs") || m.source.starts_with("earfs:") => {
            PathBuf::from(m.source.trim_start_matches("earfs:"))
        }
        _ => target,
    };
    let cfg = VolumeConfig::load(&backing)?;
    let format = FileFormat::from_number(u64::from(cfg.format)).ok_or_else(|| {
        Failure::new(
            exit::BAD_CONFIG,
            format!("unknown volume format {}", cfg.format),
        )
    })?;
    let current = cfg.keyring.current;
    match daemon::try_lock_volume(&backing)? {
        Some(lock) => offline(&backing, lock, o),
        None => online(&backing, format, current, o),
    }
}

/// A damaged file in `reencrypt --json`.
#[derive(Serialize)]
struct Damaged<'a> {
    path: &'a Path,
    reason: &'a str,
}

/// What `reencrypt --json` prints (`earfs.reencrypt.v1`).
#[derive(Serialize)]
struct Summary<'a> {
    backing: PathBuf,
    /// Whether the volume was mounted (the daemon rewrote the files).
    mounted: bool,
    dry_run: bool,
    rewritten: u64,
    already_current: u64,
    open_skipped: &'a [PathBuf],
    damaged: Vec<Damaged<'a>>,
    current_key_version: u32,
    format: u16,
    /// --dry-run: the files and bytes a run would rewrite.
    #[serde(skip_serializing_if = "Option::is_none")]
    would_rewrite: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    would_rewrite_bytes: Option<u64>,
}

impl<'a> Summary<'a> {
    fn new(backing: &Path, found: &'a Found, key: u32, format: FileFormat) -> Self {
        Summary {
            backing: backing.to_path_buf(),
            mounted: false,
            dry_run: false,
            rewritten: 0,
            already_current: found.current,
            open_skipped: &[],
            damaged: found
                .damaged
                .iter()
                .map(|(path, reason)| Damaged { path, reason })
                .collect(),
            current_key_version: key,
            format: format.number(),
            would_rewrite: None,
            would_rewrite_bytes: None,
        }
    }
}

/// Print the damaged files and what is left: the exit is 0 only when every file is now
/// in the volume's format under the current key. `skipped_open`: `None` offline (no
/// file can be open), the files left open on a mounted volume.
fn finish(
    backing: &Path,
    found: &Found,
    rewritten: u64,
    skipped_open: Option<&[PathBuf]>,
    key: u32,
    format: FileFormat,
    o: &Options,
) -> Result<(), Failure> {
    let mounted = skipped_open.is_some();
    let skipped_open = skipped_open.unwrap_or_default();
    if o.json {
        output::print(
            "earfs.reencrypt.v1",
            &Summary {
                mounted,
                rewritten,
                open_skipped: skipped_open,
                ..Summary::new(backing, found, key, format)
            },
        )?;
    } else {
        println!(
            "{rewritten} file(s) rewritten under key version {key} in format {}; {} already were",
            format.number(),
            found.current
        );
        for (p, why) in &found.damaged {
            println!("  damaged, left as it is: {}: {why}", p.display());
        }
        for p in skipped_open {
            println!("  open through the mount, not rewritten: {}", p.display());
        }
    }
    if !found.damaged.is_empty() {
        return Err(Failure::new(
            exit::FAILURE,
            format!(
                "{} damaged file(s) were not rewritten (see `earfs fsck {}`)",
                found.damaged.len(),
                backing.display()
            ),
        ));
    }
    if !skipped_open.is_empty() {
        return Err(Failure::new(
            exit::BUSY,
            format!(
                "{} file(s) stayed open through the mount and were not rewritten: run again when they are closed, or with --include-open",
                skipped_open.len()
            ),
        ));
    }
    if !o.json {
        // Mounted, files may have been written meanwhile (in the current version, but a
        // backing file may have been put in place): count them all again. Offline, under
        // the volume's lock, every file was looked at and none is left on another.
        let old: Vec<String> = if mounted {
            let c = census::census(backing, |_| {}).map_err(|e| failed_at(backing, e))?;
            c.key_versions
                .iter()
                .filter(|(v, n)| **n > 0 && v.as_str() != key.to_string())
                .map(|(v, n)| format!("version {v}: {n}"))
                .collect()
        } else {
            Vec::new()
        };
        let retirable: Vec<u32> = VolumeConfig::load(backing)
            .map(|cfg| {
                cfg.keyring
                    .keys
                    .iter()
                    .map(|k| k.version)
                    .filter(|v| *v != key)
                    .collect()
            })
            .unwrap_or_default();
        if old.is_empty() && retirable.is_empty() {
            println!("every file is under key version {key}, the only one");
        } else if old.is_empty() {
            let cmds: Vec<String> = retirable
                .iter()
                .map(|v| format!("earfs retire-key --version {v} {}", backing.display()))
                .collect();
            println!(
                "every file is under key version {key}; no file uses the other versions any more: retire them once backups no longer need them ({})",
                cmds.join("; ")
            );
        } else {
            println!(
                "files on other key versions (written meanwhile?): {}",
                old.join(", ")
            );
        }
    }
    Ok(())
}

fn dry_run(
    backing: &Path,
    mounted: bool,
    found: &Found,
    key: u32,
    format: FileFormat,
    o: &Options,
) -> Result<(), Failure> {
    let bytes: u64 = found.jobs.iter().map(|j| j.size).sum();
    if o.json {
        output::print(
            "earfs.reencrypt.v1",
            &Summary {
                mounted,
                dry_run: true,
                would_rewrite: Some(found.jobs.len()),
                would_rewrite_bytes: Some(bytes),
                ..Summary::new(backing, found, key, format)
            },
        )?;
    } else {
        println!(
            "would rewrite {} file(s), {} of data, under key version {key} in format {} ({} already current; {} damaged)",
            found.jobs.len(),
            human_bytes(bytes),
            format.number(),
            found.current,
            found.damaged.len()
        );
        let largest = found.jobs.first().map(|j| j.size).unwrap_or(0);
        println!(
            "free space needed: {} (the largest file)",
            human_bytes(largest)
        );
    }
    Ok(())
}

/// Not mounted: rewrite under the volume's lock. The workers read each file's header
/// themselves, so that the walk opens no file.
fn offline(backing: &Path, lock: File, o: &Options) -> Result<(), Failure> {
    daemon::protect_key_material();
    let cfg = VolumeConfig::load(backing)?;
    let provider = cfg.kms.open(super::super::kms::retry(o.kms_deadline)?)?;
    let keyring = cfg.unlock(backing, provider.as_ref())?;
    let vol = Offline::with_keys(backing, cfg, keyring, lock)?;
    let keys = &vol.keys;
    let key = keys.current_version();
    let format = keys.format();
    // What a killed run left (new files not renamed, directory times) is cleaned up by
    // now: `Offline` finished it, as the daemon does before it serves.
    let tree = walk(backing)?;
    let stop = Stop::on_signals();
    if o.dry_run {
        let found = sort_out(backing, &tree, format, key, o, &stop)?;
        return dry_run(backing, false, &found, key, format, o);
    }
    let bytes: u64 = tree.files.iter().map(|j| j.size).sum();
    let progress = Progress::new("reencrypt", tree.files.len() as u64, bytes);
    let rate = o.rate.map(Rate::new);
    let work = rewrite::work_dir(backing).map_err(|e| failed_at(backing, e))?;
    // A rename into a directory changes its times: they are put back from this record
    // after each rename, by whatever runs first after a kill, and at the end.
    let dirs = &tree.dirs;
    rewrite::record_dir_times(backing, dirs).map_err(|e| failed_at(&work, e))?;
    let tally = Tally::default();
    let done = parallel(
        &tree.files,
        o.jobs.unwrap_or_else(default_jobs),
        &stop,
        |job| {
            let each = |n: u64| {
                progress.bytes(n);
                if let Some(r) = &rate {
                    r.take(n);
                }
            };
            let sorted = rewrite_offline(backing, &work, keys, job, dirs, each)?;
            if let Some(s) = sorted {
                if !matches!(s, Sorted::Rewrite) {
                    progress.bytes(job.size);
                }
                tally.add(backing, job, s);
            }
            progress.file();
            Ok(())
        },
    );
    if let Err(e) = done {
        progress.abandon();
        return Err(e);
    }
    let found = tally.found();
    if stop.requested() {
        progress.abandon();
        return Err(stop.failure(
            "reencrypt",
            &format!(
                "{} of {} files looked at, {} rewritten",
                progress.files_done(),
                tree.files.len(),
                found.jobs.len()
            ),
        ));
    }
    progress.finish("checked");
    // The renames are made durable here, once for all (each directory synced): each new
    // file was synced before its rename, so until then a power cut leaves either name
    // whole.
    rewrite::end_dir_times(backing, dirs)
        .map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?;
    // Under the volume's lock nothing else wrote: the tally is the whole volume.
    finish(
        backing,
        &found,
        found.jobs.len() as u64,
        None,
        key,
        format,
        o,
    )
}

/// Look at one file of an unmounted volume and rewrite it if its header says so: a
/// new file synced and renamed over it, the directory's times put back (it is synced
/// once, at the end), or,
/// with several names, in place. `None`: the file is gone.
fn rewrite_offline(
    backing: &Path,
    work: &Path,
    keys: &Keys,
    job: &Job,
    dirs: &BTreeMap<PathBuf, Times>,
    each: impl FnMut(u64),
) -> Result<Option<Sorted>, Failure> {
    let path = backing.join(&job.rel);
    let mut target = match File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(failed_at(&path, e)),
    };
    let meta = target.metadata().map_err(|e| failed_at(&path, e))?;
    let (format, key) = (keys.format(), keys.current_version());
    match sorted(classify(&mut target, meta.len(), format, key), &path)? {
        Some(Sorted::Rewrite) => {}
        other => return Ok(other),
    }
    if meta.nlink() > 1 || job.nlink > 1 {
        // Every name must stay this inode: rewrite it in place, journaled.
        rewrite_in_place(backing, &job.rel, &target, keys, each)
            .map_err(|e| failed_at(&path, e))?;
        return Ok(Some(Sorted::Rewrite));
    }
    // Named by the inode, one job each: a leftover of an earlier run was removed at the
    // start.
    let new = work.join(format!("reencrypt-{}.new", meta.ino()));
    let written = (|| -> Result<(), Failure> {
        let src = keys.open(target, &path).map_err(|e| failed_at(&path, e))?;
        let f = create_new(&new).map_err(|e| failed_at(&new, e))?;
        let mut dst = keys.open(f, &new).map_err(|e| failed_at(&new, e))?;
        copy_plain(&src, &mut dst, each).map_err(|e| failed_at(&path, e))?;
        copy_meta(&meta, &path, dst.file()).map_err(|e| failed_at(&new, e))?;
        dst.sync().map_err(|e| failed_at(&new, e))?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&new);
        return Err(e);
    }
    std::fs::rename(&new, &path).map_err(|e| failed_at(&path, e))?;
    // The rename changed the directory's times: put them back.
    let parent = job.rel.parent().unwrap_or(Path::new(""));
    rewrite::restore_dir(backing, parent, dirs).map_err(|e| failed_at(&backing.join(parent), e))?;
    Ok(Some(Sorted::Rewrite))
}

/// Mounted: the daemon rewrites each file in place.
fn online(backing: &Path, format: FileFormat, key: u32, o: &Options) -> Result<(), Failure> {
    let sock = daemon_of(backing)?;
    let tree = walk(backing)?;
    let stop = Stop::on_signals();
    let mut found = sort_out(backing, &tree, format, key, o, &stop)?;
    if o.dry_run {
        return dry_run(backing, true, &found, key, format, o);
    }
    let bytes: u64 = found.jobs.iter().map(|j| j.size).sum();
    let progress = Progress::new("reencrypt (mounted)", found.jobs.len() as u64, bytes);
    let mut rewritten = 0u64;
    let mut todo: Vec<Job> = std::mem::take(&mut found.jobs);
    let total = todo.len();
    for pass in 1..=PASSES {
        let mut open = Vec::new();
        for job in todo {
            if stop.requested() {
                progress.abandon();
                return Err(stop.failure(
                    "reencrypt",
                    &format!("{rewritten} of {total} files rewritten"),
                ));
            }
            let req = RewriteRequest {
                path: job.rel.clone(),
                rate: o.rate,
                include_open: o.include_open,
            };
            let line = format!(
                "rewrite {}",
                serde_json::to_string(&req)
                    .map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?
            );
            // Generous: a rate-limited big file takes long.
            let timeout = Duration::from_secs(3600 * 24);
            let v = request_reply(&sock, &line, timeout).map_err(|e| {
                progress.abandon();
                Failure::new(
                    exit::FAILURE,
                    format!(
                        "the daemon serving {} did not answer: {e}",
                        backing.display()
                    ),
                )
            })?;
            if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                progress.abandon();
                return Err(failed_at(&backing.join(&job.rel), e));
            }
            let result: Option<Rewritten> = serde_json::from_value(v["result"].clone()).ok();
            progress.bytes(v["bytes"].as_u64().unwrap_or(0));
            match result {
                Some(Rewritten::Open) => open.push(job),
                Some(Rewritten::Done) => {
                    rewritten += 1;
                    progress.file();
                }
                _ => progress.file(),
            }
        }
        todo = open;
        if todo.is_empty() || pass == PASSES {
            break;
        }
        std::thread::sleep(PASS_WAIT);
    }
    progress.finish("rewrote");
    let skipped: Vec<PathBuf> = todo.iter().map(|j| j.rel.clone()).collect();
    finish(backing, &found, rewritten, Some(&skipped), key, format, o)
}
