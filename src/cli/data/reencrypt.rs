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
use std::time::Duration;

use serde_json::json;

use super::{
    Offline, Progress, Rate, Stop, copy_meta, default_jobs, failed_at, human_bytes, parallel,
    sync_dir,
};
use crate::cli::change::{canonical, daemon_of};
use crate::content::{
    FileFormat, HEADER_LEN, backing_size_to_plain_size, header_names, header_never_written,
};
use crate::daemon::control::{RewriteRequest, request_reply};
use crate::daemon::{self, Failure, exit};
use crate::fs::copy::Keys;
use crate::fs::rewrite::{self, Rewritten, copy_plain, create_new, rewrite_in_place};
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

/// A directory's access and modification times, `(seconds, nanoseconds)` each.
type Times = ((i64, i64), (i64, i64));

/// The record of every directory's times before the first (interrupted) run, in the
/// work directory: a rename into a directory changes its times, and they are put back
/// from here after each rename, again by a rerun after a kill, and once more at the end
/// (then the record goes).
const DIR_TIMES: &str = "reencrypt-dirs.json";

/// What the walk found.
#[derive(Debug, Default)]
struct Found {
    /// Every directory's times (the root's as ""), by path under the root.
    dirs: BTreeMap<PathBuf, Times>,
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
    if len == 0 {
        return Ok(Ok(false));
    }
    let h = census::read_header_block(&mut f)?;
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

/// Walk the backing tree under `root` for the files to rewrite (each inode once).
fn walk(root: &Path, format: FileFormat, current: u32) -> Result<Found, Failure> {
    let mut found = Found::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let meta = std::fs::metadata(&dir).map_err(|e| failed_at(&dir, e))?;
        let rel = dir.strip_prefix(root).unwrap_or(&dir).to_path_buf();
        found.dirs.insert(rel, rewrite::times_of(&meta));
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
            match needs_rewrite(&path, format, current) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(failed_at(&path, e)),
                Ok(Err(why)) => found.damaged.push((path, why)),
                Ok(Ok(false)) => found.current += 1,
                Ok(Ok(true)) => {
                    let size = meta.len().saturating_sub(HEADER_LEN);
                    let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                    found.jobs.push(Job {
                        rel,
                        size,
                        nlink: meta.nlink(),
                    });
                }
            }
        }
    }
    // Big files first: the parallel workers then end together.
    found.jobs.sort_by_key(|j| std::cmp::Reverse(j.size));
    Ok(found)
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

fn summary_json(
    rewritten: u64,
    current: u64,
    skipped_open: &[PathBuf],
    found: &Found,
    key: u32,
    format: FileFormat,
) -> serde_json::Value {
    json!({
        "rewritten": rewritten,
        "already_current": current,
        "open_skipped": skipped_open,
        "damaged": found.damaged.iter().map(|(p, why)| json!({"path": p, "reason": why})).collect::<Vec<_>>(),
        "current_key_version": key,
        "format": format.number(),
    })
}

/// Print the damaged files and what is left: the exit is 0 only when every file is now
/// in the volume's format under the current key.
fn finish(
    backing: &Path,
    found: &Found,
    rewritten: u64,
    skipped_open: &[PathBuf],
    key: u32,
    format: FileFormat,
    o: &Options,
) -> Result<(), Failure> {
    if o.json {
        println!(
            "{}",
            summary_json(rewritten, found.current, skipped_open, found, key, format)
        );
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
        let c = census::census(backing, |_| {}).map_err(|e| failed_at(backing, e))?;
        let old: Vec<String> = c
            .key_versions
            .iter()
            .filter(|(v, n)| **n > 0 && v.as_str() != key.to_string())
            .map(|(v, n)| format!("version {v}: {n}"))
            .collect();
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

fn dry_run(found: &Found, key: u32, format: FileFormat, o: &Options) {
    let bytes: u64 = found.jobs.iter().map(|j| j.size).sum();
    if o.json {
        let mut v = summary_json(0, found.current, &[], found, key, format);
        v["would_rewrite"] = json!(found.jobs.len());
        v["would_rewrite_bytes"] = json!(bytes);
        println!("{v}");
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
}

/// Not mounted: rewrite under the volume's lock.
fn offline(backing: &Path, lock: File, o: &Options) -> Result<(), Failure> {
    daemon::protect_key_material();
    let cfg = VolumeConfig::load(backing)?;
    let provider = cfg.kms.open(super::super::kms::retry(o.kms_deadline)?)?;
    let keyring = cfg.unlock(backing, provider.as_ref())?;
    let vol = Offline::with_keys(backing, cfg, keyring, lock)?;
    let keys = &vol.keys;
    let key = keys.current_version();
    remove_stale_temps(backing)?;
    let found = walk(backing, keys.format(), key)?;
    if o.dry_run {
        dry_run(&found, key, keys.format(), o);
        return Ok(());
    }
    let stop = Stop::on_signals();
    let bytes: u64 = found.jobs.iter().map(|j| j.size).sum();
    let progress = Progress::new("reencrypt", found.jobs.len() as u64, bytes);
    let rate = o.rate.map(Rate::new);
    let work = rewrite::work_dir(backing).map_err(|e| failed_at(backing, e))?;
    let dirs = dir_times(backing, &work, &found.dirs)?;
    let done = parallel(
        &found.jobs,
        o.jobs.unwrap_or_else(default_jobs),
        &stop,
        |job| {
            let each = |n: u64| {
                progress.bytes(n);
                if let Some(r) = &rate {
                    r.take(n);
                }
            };
            rewrite_offline(backing, &work, keys, job, &dirs, each)?;
            progress.file();
            Ok(())
        },
    );
    if let Err(e) = done {
        progress.abandon();
        return Err(e);
    }
    if stop.requested() {
        progress.abandon();
        return Err(stop.failure(
            "reencrypt",
            &format!(
                "{} of {} files rewritten",
                progress.files_done(),
                found.jobs.len()
            ),
        ));
    }
    progress.finish("rewrote");
    restore_dir_times(backing, &dirs)?;
    let rec = work.join(DIR_TIMES);
    std::fs::remove_file(&rec).map_err(|e| failed_at(&rec, e))?;
    sync_dir(&work).map_err(|e| failed_at(&work, e))?;
    finish(
        backing,
        &found,
        found.jobs.len() as u64,
        &[],
        key,
        keys.format(),
        o,
    )
}

/// The directories' times before the first run: from the record an interrupted run
/// left (and put back now), or from this walk (and recorded).
fn dir_times(
    backing: &Path,
    work: &Path,
    walked: &BTreeMap<PathBuf, Times>,
) -> Result<BTreeMap<PathBuf, Times>, Failure> {
    let rec = work.join(DIR_TIMES);
    match std::fs::read(&rec) {
        Ok(bytes) => {
            let dirs: BTreeMap<PathBuf, Times> =
                serde_json::from_slice(&bytes).map_err(|e| failed_at(&rec, e))?;
            restore_dir_times(backing, &dirs)?;
            Ok(dirs)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let json = serde_json::to_vec(walked).map_err(|e| failed_at(&rec, e))?;
            rewrite::write_atomic(&rec, &json).map_err(|e| failed_at(&rec, e))?;
            Ok(walked.clone())
        }
        Err(e) => Err(failed_at(&rec, e)),
    }
}

/// Put back the times of the directory `rel` (if it is recorded and still there).
fn restore_dir(backing: &Path, rel: &Path, dirs: &BTreeMap<PathBuf, Times>) -> Result<(), Failure> {
    let Some((atime, mtime)) = dirs.get(rel) else {
        return Ok(());
    };
    let path = backing.join(rel);
    match File::open(&path) {
        Ok(d) => rewrite::set_times(&d, *atime, *mtime).map_err(|e| failed_at(&path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(failed_at(&path, e)),
    }
}

fn restore_dir_times(backing: &Path, dirs: &BTreeMap<PathBuf, Times>) -> Result<(), Failure> {
    for rel in dirs.keys() {
        restore_dir(backing, rel, dirs)?;
    }
    Ok(())
}

/// Remove new files a killed offline reencrypt left (not committed: the old file is
/// whole under its old key).
fn remove_stale_temps(backing: &Path) -> Result<(), Failure> {
    for (name, path) in rewrite::work_entries(backing).map_err(|e| failed_at(backing, e))? {
        if name.starts_with("reencrypt-") && name.ends_with(".new") {
            std::fs::remove_file(&path).map_err(|err| failed_at(&path, err))?;
        }
    }
    Ok(())
}

/// Rewrite one file of an unmounted volume.
fn rewrite_offline(
    backing: &Path,
    work: &Path,
    keys: &Keys,
    job: &Job,
    dirs: &BTreeMap<PathBuf, Times>,
    each: impl FnMut(u64),
) -> Result<(), Failure> {
    let path = backing.join(&job.rel);
    let open = || {
        File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
    };
    let target = match open() {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(failed_at(&path, e)),
    };
    let meta = target.metadata().map_err(|e| failed_at(&path, e))?;
    if meta.nlink() > 1 || job.nlink > 1 {
        // Every name must stay this inode: rewrite it in place, journaled.
        return rewrite_in_place(backing, &job.rel, &target, keys, each)
            .map_err(|e| failed_at(&path, e));
    }
    let new = work.join(format!("reencrypt-{}.new", meta.ino()));
    let _ = std::fs::remove_file(&new);
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
    restore_dir(backing, parent, dirs)?;
    sync_dir(path.parent().unwrap_or(backing)).map_err(|e| failed_at(&path, e))
}

/// Mounted: the daemon rewrites each file in place.
fn online(backing: &Path, format: FileFormat, key: u32, o: &Options) -> Result<(), Failure> {
    let sock = daemon_of(backing)?;
    let mut found = walk(backing, format, key)?;
    if o.dry_run {
        dry_run(&found, key, format, o);
        return Ok(());
    }
    let stop = Stop::on_signals();
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
    finish(backing, &found, rewritten, &skipped, key, format, o)
}
