//! `earfs decrypt BACKING DEST`: the plaintext tree of an unmounted volume written
//! into DEST, verified, with owners, modes, `user.*` attributes, times, hard links,
//! symlinks, special files, empty directories and holes.
//!
//! The order of the steps, so that a kill at any point leaves DEST consistent and a
//! rerun finishes:
//! 1. DEST is checked: new, empty, or an interrupted decrypt of the same backing
//!    directory (the record `.earfs-work/op-decrypt.json` in BACKING names DEST, or the
//!    marker `DEST/.earfs-decrypt-tmp/volume` names BACKING and its volume id; the
//!    marker is what recognises a rerun when BACKING is read-only, e.g. a snapshot).
//! 2. The record and the marker are written, the temp dir's leftovers removed, the
//!    directories made (mode 0700 until the end).
//! 3. Per backing inode: its plaintext into `DEST/.earfs-decrypt-tmp/INO` (data ranges
//!    only, so holes stay holes, then the size), hashed as it is read; owner, mode,
//!    attributes and times set; fsync; read back and compared with the hash; renamed to
//!    its first name; its other names linked to it. A file present at a final name is
//!    done (the rename comes after the fsync): a rerun skips it and links the names it
//!    lacks, so a hard-link group stays one inode across a crash. The renames need no
//!    directory fsync of their own: one lost in a crash leaves the temp, which a rerun
//!    removes, and the file is written again; every directory is synced at the end.
//! 4. Symlinks and special files made (a rerun sets their metadata again).
//! 5. Directories' owners, modes, attributes and times set, deepest first, and synced;
//!    DEST's root given the backing root's; the temp dir (the marker) removed, the
//!    root's times set again and the root synced; then the record removed.
//!
//! The job is done when the record is gone (the marker, for a read-only BACKING): a
//! kill after that point leaves a complete DEST, which a rerun refuses as not empty.
//! On a read-only BACKING a kill between the marker's removal and the end (one
//! futimens and an fsync) leaves a complete DEST whose root may have the wrong times.
//!
//! A backing file that cannot be decrypted (a damaged header, a length no size codes
//! to, a read error) does not stop the run: it is named at the end and the command
//! exits 1. Running out of space in DEST stops the run with the path (a temp, never a
//! file at its final name, is left half written) and a rerun finishes.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};

use super::{
    Offline, OpRecord, Progress, Stop, copy_link_meta, copy_meta, failed_at, parallel, sync_dir,
    timestamps,
};
use crate::content::{FileFormat, backing_size_to_plain_size};
use crate::daemon::{self, Failure, exit};
use crate::fs::copy::chunk_buf;
use crate::fs::{FsError, rewrite};

/// The temp directory at DEST's root: files being written, and the marker.
pub(in crate::cli) const TMP_DIR: &str = ".earfs-decrypt-tmp";
/// The marker in [`TMP_DIR`]: which volume and backing directory DEST is a decrypt of.
const MARKER: &str = "volume";
/// Files decrypted at once by default. The work waits on the disk (reads, and an
/// fsync per file) far more than on the CPU: on a 2-CPU VM with a virtio disk, 16
/// workers ran about as fast as `cp -a` and a `sync` (2 workers: 2 to 4 times slower).
pub(in crate::cli) const DEFAULT_JOBS: usize = 16;
/// The name of the operation in its [`OpRecord`].
const OP: &str = "decrypt";

/// What the marker says.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
struct Marker {
    volume_id: String,
    backing: PathBuf,
}

/// One regular file of the volume: a backing inode and all its names.
struct FileJob {
    /// Its names relative to the root, sorted.
    names: Vec<PathBuf>,
    /// Its backing path (at its first name).
    src: PathBuf,
    meta: Metadata,
}

/// Everything under the backing root but the volume's own files.
#[derive(Default)]
struct Tree {
    /// Directories (relative paths), parents before children.
    dirs: Vec<(PathBuf, Metadata)>,
    files: Vec<FileJob>,
    symlinks: Vec<(PathBuf, Metadata)>,
    /// FIFOs, sockets, devices.
    specials: Vec<(PathBuf, Metadata)>,
}

/// What became of one file.
enum Outcome {
    Written,
    /// Present already (a rerun): only missing names linked.
    Present,
    /// Could not be read or decrypted: the reason.
    Damaged(String),
}

/// `earfs decrypt BACKING DEST`.
pub(in crate::cli) fn decrypt(
    backing: &Path,
    dest: &Path,
    jobs: Option<usize>,
    deadline: u64,
) -> Result<(), Failure> {
    let backing = std::fs::canonicalize(backing)
        .map_err(|e| Failure::new(exit::NOT_A_VOLUME, format!("{}: {e}", backing.display())))?;
    let dest = resolve(&daemon::absolute(dest))?;
    if dest.starts_with(&backing) || backing.starts_with(&dest) {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "{} and {} overlap: write the plaintext outside the backing directory",
                dest.display(),
                backing.display()
            ),
        ));
    }
    let root_meta = std::fs::metadata(&backing).map_err(|e| failed_at(&backing, e))?;
    let off = Offline::open(&backing, deadline, "decrypt")?;
    let marker = Marker {
        volume_id: off.cfg.volume_id.clone(),
        backing: backing.clone(),
    };
    check_dest(&backing, &dest, &marker)?;
    let tree = walk(&backing)?;
    let tmp = dest.join(TMP_DIR);
    let detail = serde_json::json!({"dest": dest, "tmp": tmp});
    let command = format!("earfs decrypt {} {}", backing.display(), dest.display());
    let recorded = match OpRecord::begin(&backing, OP, command, detail) {
        Ok(()) => true,
        Err(e) if read_only(&e) => {
            eprintln!(
                "note: {} is read-only ({e}): no record of this decrypt is kept in it; a rerun is recognised by {}",
                backing.display(),
                tmp.join(MARKER).display()
            );
            false
        }
        Err(e) => return Err(failed_at(&backing.join(rewrite::WORK_DIR), e)),
    };
    prepare_dest(&dest, &tmp, &marker)?;
    for (rel, _) in &tree.dirs {
        make_dir(&dest.join(rel))?;
    }

    let stop = Stop::on_signals();
    let bytes_total: u64 = tree.files.iter().map(|f| plain_len(&f.meta)).sum();
    let progress = Progress::new("decrypt", tree.files.len() as u64, bytes_total);
    let damaged: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());
    let threads = jobs.unwrap_or(DEFAULT_JOBS);
    let ctx = Ctx {
        off: &off,
        dest: &dest,
        tmp: &tmp,
        progress: &progress,
    };
    let work = |job: &FileJob| {
        match ctx.one_file(job)? {
            Outcome::Written | Outcome::Present => {}
            Outcome::Damaged(why) => damaged.lock().push((job.names[0].clone(), why)),
        }
        progress.file();
        Ok(())
    };
    let ran = if threads == 1 {
        // In this thread: one thread makes every call (and a syscall counted per
        // thread, as strace's fault injection does, counts them all).
        tree.files
            .iter()
            .take_while(|_| !stop.requested())
            .try_for_each(work)
    } else {
        parallel(&tree.files, threads, &stop, work)
    };
    if let Err(e) = ran {
        progress.abandon();
        return Err(e);
    }
    if stop.requested() {
        progress.abandon();
        return Err(stop.failure(
            "decrypt",
            &format!(
                "{} of {} files written to {}",
                progress.files_done(),
                tree.files.len(),
                dest.display()
            ),
        ));
    }
    for (rel, meta) in &tree.symlinks {
        make_symlink(&backing.join(rel), &dest.join(rel), meta)?;
    }
    for (rel, meta) in &tree.specials {
        make_special(&dest.join(rel), meta)?;
    }
    finish_dirs(&backing, &dest, &tree.dirs, &root_meta)?;
    if recorded {
        OpRecord::end(&backing, OP).map_err(|e| failed_at(&backing.join(rewrite::WORK_DIR), e))?;
    }
    progress.finish("decrypted");
    let mut damaged = damaged.into_inner();
    if damaged.is_empty() {
        println!(
            "wrote the plaintext of volume {} to {}: {} files, {} directories, {} symlinks{}",
            off.cfg.volume_id,
            dest.display(),
            tree.files.len(),
            tree.dirs.len() + 1,
            tree.symlinks.len(),
            if tree.specials.is_empty() {
                String::new()
            } else {
                format!(", {} special files", tree.specials.len())
            }
        );
        return Ok(());
    }
    damaged.sort();
    for (p, why) in &damaged {
        eprintln!("earfs: cannot decrypt {}: {why}", backing.join(p).display());
    }
    let list: Vec<String> = damaged
        .iter()
        .map(|(p, why)| format!("{} ({why})", p.display()))
        .collect();
    Err(Failure::new(
        exit::FAILURE,
        format!(
            "{} file(s) of {} could not be decrypted and are missing from {}: {}; the other {} files were written",
            damaged.len(),
            backing.display(),
            dest.display(),
            list.join(", "),
            tree.files.len() - damaged.len()
        ),
    ))
}

/// `p` with its deepest existing ancestor canonicalised (DEST may not exist yet).
fn resolve(p: &Path) -> Result<PathBuf, Failure> {
    let mut rest = Vec::new();
    let mut at = p.to_path_buf();
    loop {
        match std::fs::canonicalize(&at) {
            Ok(c) => {
                let mut out = c;
                for r in rest.iter().rev() {
                    out.push(r);
                }
                return Ok(out);
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let Some(name) = at.file_name().map(|n| n.to_os_string()) else {
                    return Err(failed_at(p, e));
                };
                rest.push(name);
                if !at.pop() {
                    return Err(failed_at(p, e));
                }
            }
            Err(e) => return Err(failed_at(p, e)),
        }
    }
}

/// Whether an error says the backing directory cannot be written (a snapshot).
fn read_only(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EROFS | libc::EACCES | libc::EPERM)
    )
}

/// Refuse a DEST that is neither new, nor empty, nor an interrupted decrypt of this
/// backing directory.
fn check_dest(backing: &Path, dest: &Path, marker: &Marker) -> Result<(), Failure> {
    let meta = match std::fs::symlink_metadata(dest) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(failed_at(dest, e)),
    };
    if !meta.is_dir() {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "{} exists and is not a directory: give a new or empty directory",
                dest.display()
            ),
        ));
    }
    let tmp = dest.join(TMP_DIR);
    let theirs = match std::fs::read(tmp.join(MARKER)) {
        Ok(text) => serde_json::from_slice::<Marker>(&text).ok(),
        Err(_) => None,
    };
    if let Some(m) = &theirs
        && m != marker
    {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "{} holds an interrupted decrypt of another volume ({}, from {}): finish that one, or give a new or empty directory",
                dest.display(),
                m.volume_id,
                m.backing.display()
            ),
        ));
    }
    if theirs.is_some() {
        return Ok(());
    }
    let recorded = OpRecord::list(backing)
        .unwrap_or_default()
        .iter()
        .any(|r| r.op == OP && r.detail.get("dest").and_then(|d| d.as_str()) == dest.to_str());
    if recorded {
        return Ok(());
    }
    let mut entries = std::fs::read_dir(dest).map_err(|e| failed_at(dest, e))?;
    // Only our temp dir (a first run killed before its marker was written): empty.
    let foreign = entries.any(|e| e.map(|e| e.file_name() != TMP_DIR).unwrap_or(true));
    if foreign {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "{} is not empty and is not an interrupted `earfs decrypt` of {}: give a new or empty directory",
                dest.display(),
                backing.display()
            ),
        ));
    }
    Ok(())
}

/// A failure writing `path` in DEST; running out of space says what to do.
fn dest_err(path: &Path, e: impl Into<std::io::Error>) -> Failure {
    let e: std::io::Error = e.into();
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => Failure::new(
            exit::FAILURE,
            format!(
                "{}: {e}: free space there and run the same command again to finish",
                path.display()
            ),
        ),
        _ => failed_at(path, e),
    }
}

/// Make DEST and its temp dir, write the marker, clear leftovers of a killed run.
fn prepare_dest(dest: &Path, tmp: &Path, marker: &Marker) -> Result<(), Failure> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| dest_err(parent, e))?;
    }
    make_dir(dest)?;
    make_dir(tmp)?;
    let entries = std::fs::read_dir(tmp).map_err(|e| failed_at(tmp, e))?;
    for e in entries {
        let e = e.map_err(|e| failed_at(tmp, e))?;
        if e.file_name() != MARKER {
            std::fs::remove_file(e.path()).map_err(|err| failed_at(&e.path(), err))?;
        }
    }
    let text = serde_json::to_vec_pretty(marker).map_err(|e| failed_at(tmp, e))?;
    let path = tmp.join(MARKER);
    if std::fs::read(&path).ok().as_deref() != Some(&text[..]) {
        rewrite::write_atomic(&path, &text).map_err(|e| dest_err(&path, e))?;
    }
    sync_dir(dest).map_err(|e| failed_at(dest, e))?;
    if let Some(parent) = dest.parent() {
        sync_dir(parent).map_err(|e| failed_at(parent, e))?;
    }
    Ok(())
}

/// mkdir (mode 0700 until [`finish_dirs`]: no one else looks into a tree being
/// written); an existing directory is fine.
fn make_dir(path: &Path) -> Result<(), Failure> {
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => Ok(()),
            _ => Err(Failure::new(
                exit::FAILURE,
                format!(
                    "{}: exists and is not a directory, where the volume has one",
                    path.display()
                ),
            )),
        },
        Err(e) => Err(dest_err(path, e)),
    }
}

/// The plaintext size a backing file's length codes (for the progress total).
fn plain_len(meta: &Metadata) -> u64 {
    backing_size_to_plain_size(FileFormat::V2, meta.len())
        .or_else(|| backing_size_to_plain_size(FileFormat::V1, meta.len()))
        .unwrap_or(0)
}

/// Everything under `backing` but the volume's own files, in name order.
fn walk(backing: &Path) -> Result<Tree, Failure> {
    let mut tree = Tree::default();
    let mut linked: HashMap<(u64, u64), usize> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = backing.join(&rel);
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| failed_at(&dir, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| failed_at(&dir, e))?;
        entries.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in entries {
            let name = e.file_name();
            if rel.as_os_str().is_empty() {
                if crate::fs::is_reserved_root_name(&name) {
                    continue;
                }
                if name == TMP_DIR {
                    return Err(Failure::new(
                        exit::FAILURE,
                        format!(
                            "{}: the volume has a file named {TMP_DIR} at its root, the name earfs decrypt uses for its temp dir; rename it through the mount first",
                            e.path().display()
                        ),
                    ));
                }
            }
            let path = e.path();
            let r = rel.join(&name);
            let meta = std::fs::symlink_metadata(&path).map_err(|err| failed_at(&path, err))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                tree.dirs.push((r.clone(), meta));
                subdirs.push(r);
            } else if ft.is_file() {
                let key = (meta.dev(), meta.ino());
                match linked.get(&key) {
                    Some(&i) if meta.nlink() > 1 => tree.files[i].names.push(r),
                    _ => {
                        if meta.nlink() > 1 {
                            linked.insert(key, tree.files.len());
                        }
                        tree.files.push(FileJob {
                            names: vec![r],
                            src: path,
                            meta,
                        });
                    }
                }
            } else if ft.is_symlink() {
                tree.symlinks.push((r, meta));
            } else {
                tree.specials.push((r, meta));
            }
        }
        // Popped in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    for f in &mut tree.files {
        f.names.sort();
        f.src = backing.join(&f.names[0]);
    }
    // Biggest first, so that the workers end together; name order among equals.
    tree.files
        .sort_by(|a, b| b.meta.len().cmp(&a.meta.len()).then(a.names.cmp(&b.names)));
    Ok(tree)
}

/// Open a backing file for reading without changing its access time.
fn open_backing(path: &Path) -> std::io::Result<File> {
    let open = |flags| {
        File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | flags)
            .open(path)
    };
    // O_NOATIME is refused (EPERM) to a caller who does not own the file.
    match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0),
        r => r,
    }
}

/// The reason of a read-side failure, for the list of damaged files.
fn reason(e: &FsError) -> String {
    match e {
        FsError::Corrupt { reason, .. } => reason.clone(),
        e => e.to_string(),
    }
}

/// Zeros, to hash holes with.
static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// Feed `n` zero bytes to `h` (a hole).
fn hash_zeros(h: &mut Sha256, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// What the workers share.
struct Ctx<'a> {
    off: &'a Offline,
    dest: &'a Path,
    tmp: &'a Path,
    progress: &'a Progress,
}

impl Ctx<'_> {
    /// Write one backing inode's plaintext to all its names in DEST.
    fn one_file(&self, job: &FileJob) -> Result<Outcome, Failure> {
        let finals: Vec<PathBuf> = job.names.iter().map(|n| self.dest.join(n)).collect();
        let mut present = None;
        for f in &finals {
            match std::fs::symlink_metadata(f) {
                Ok(m) if m.is_file() => {
                    present = Some(f.clone());
                    break;
                }
                Ok(_) => {
                    return Err(Failure::new(
                        exit::FAILURE,
                        format!(
                            "{}: exists and is not a regular file, where the volume has one",
                            f.display()
                        ),
                    ));
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(failed_at(f, e)),
            }
        }
        let outcome = match &present {
            Some(_) => {
                self.progress.bytes(plain_len(&job.meta));
                Outcome::Present
            }
            None => match self.write_file(job, &finals[0])? {
                Some(why) => return Ok(Outcome::Damaged(why)),
                None => Outcome::Written,
            },
        };
        let first = present.unwrap_or_else(|| finals[0].clone());
        for f in &finals {
            if *f == first {
                continue;
            }
            match std::fs::hard_link(&first, f) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(dest_err(f, e)),
            }
        }
        Ok(outcome)
    }

    /// Decrypt `job` into a temp, verify it, and rename it to `target`. Returns the
    /// reason when the backing file cannot be read or decrypted (nothing is left
    /// behind then).
    fn write_file(&self, job: &FileJob, target: &Path) -> Result<Option<String>, Failure> {
        let src = &job.src;
        let file = match open_backing(src) {
            Ok(f) => f,
            Err(e) => return Ok(Some(e.to_string())),
        };
        let plain = match self.off.keys.open(file, src) {
            Ok(p) => p,
            Err(e) => return Ok(Some(reason(&e))),
        };
        let size = plain.size();
        let tmp = self.tmp.join(job.meta.ino().to_string());
        let _ = std::fs::remove_file(&tmp);
        let out = rewrite::create_new(&tmp).map_err(|e| dest_err(&tmp, e))?;
        let cleanup = |f: Failure| {
            let _ = std::fs::remove_file(&tmp);
            f
        };
        let mut hash = Sha256::new();
        let mut buf = chunk_buf(size);
        let mut hashed = 0u64;
        let mut off = 0;
        let mut data = 0u64;
        loop {
            let range = match plain.next_data(off) {
                Ok(r) => r,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Ok(Some(reason(&e)));
                }
            };
            let Some((start, end)) = range else { break };
            let end = end.min(size);
            if start >= end {
                break;
            }
            hash_zeros(&mut hash, start - hashed);
            let mut at = start;
            while at < end {
                let want = ((end - at) as usize).min(buf.len());
                let n = match plain.read_at(at, &mut buf[..want]) {
                    Ok(0) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Ok(Some(format!(
                            "the data ends at {at}, before its size of {size} bytes"
                        )));
                    }
                    Ok(n) => n,
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Ok(Some(reason(&e)));
                    }
                };
                hash.update(&buf[..n]);
                out.write_all_at(&buf[..n], at)
                    .map_err(|e| cleanup(dest_err(target, e)))?;
                self.progress.bytes(n as u64);
                data += n as u64;
                at += n as u64;
            }
            hashed = end;
            off = end;
        }
        hash_zeros(&mut hash, size - hashed);
        buf.fill(0);
        drop(buf);
        out.set_len(size)
            .map_err(|e| cleanup(dest_err(target, e)))?;
        self.progress
            .bytes(plain_len(&job.meta).saturating_sub(data));
        let want = hash.finalize();
        copy_meta(&job.meta, src, &out).map_err(|e| cleanup(dest_err(target, e)))?;
        out.sync_all().map_err(|e| cleanup(dest_err(target, e)))?;
        drop(out);
        let got = read_back(&tmp, &job.meta).map_err(|e| cleanup(failed_at(&tmp, e)))?;
        if got != want[..] {
            let _ = std::fs::remove_file(&tmp);
            return Err(Failure::new(
                exit::FAILURE,
                format!(
                    "{}: the plaintext written to {} reads back different from {} (SHA-256 {} instead of {}): check the disk of {}",
                    job.names[0].display(),
                    target.display(),
                    src.display(),
                    hex::encode(got),
                    hex::encode(want),
                    self.dest.display()
                ),
            ));
        }
        std::fs::rename(&tmp, target).map_err(|e| cleanup(dest_err(target, e)))?;
        Ok(None)
    }
}

/// SHA-256 of the file at `path` read back, without changing its access time (if
/// the read had to change it, the times of `meta` are set again and synced).
fn read_back(path: &Path, meta: &Metadata) -> std::io::Result<Vec<u8>> {
    let (mut f, noatime) = match File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOATIME)
        .open(path)
    {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => (File::open(path)?, false),
        Err(e) => return Err(e),
    };
    let mut h = Sha256::new();
    let mut buf = chunk_buf(meta.len());
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.fill(0);
    if !noatime {
        let w = File::options().write(true).open(path)?;
        super::set_times_of(meta, &w)?;
        w.sync_all()?;
    }
    Ok(h.finalize().to_vec())
}

/// The symlink at `dst` pointing where the backing one at `src` does, with its owner
/// and times (set again on a rerun).
fn make_symlink(src: &Path, dst: &Path, meta: &Metadata) -> Result<(), Failure> {
    let target = std::fs::read_link(src).map_err(|e| failed_at(src, e))?;
    match std::fs::symlink_metadata(dst) {
        Ok(m) if m.file_type().is_symlink() => {
            let have = std::fs::read_link(dst).map_err(|e| failed_at(dst, e))?;
            if have != target {
                std::fs::remove_file(dst).map_err(|e| failed_at(dst, e))?;
                std::os::unix::fs::symlink(&target, dst).map_err(|e| dest_err(dst, e))?;
            }
        }
        Ok(_) => {
            return Err(Failure::new(
                exit::FAILURE,
                format!(
                    "{}: exists and is not a symlink, where the volume has one",
                    dst.display()
                ),
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            std::os::unix::fs::symlink(&target, dst).map_err(|e| dest_err(dst, e))?;
        }
        Err(e) => return Err(failed_at(dst, e)),
    }
    copy_link_meta(meta, dst).map_err(|e| failed_at(dst, e))
}

/// A FIFO, socket or device node at `dst` like the backing one, with its owner, mode
/// and times (set again on a rerun).
fn make_special(dst: &Path, meta: &Metadata) -> Result<(), Failure> {
    use rustix::fs::{AtFlags, CWD, FileType, Mode};
    let ft = meta.file_type();
    let kind = if ft.is_fifo() {
        FileType::Fifo
    } else if ft.is_socket() {
        FileType::Socket
    } else if ft.is_char_device() {
        FileType::CharacterDevice
    } else {
        FileType::BlockDevice
    };
    match std::fs::symlink_metadata(dst) {
        Ok(m) if m.file_type() == ft && m.rdev() == meta.rdev() => {}
        Ok(_) => {
            return Err(Failure::new(
                exit::FAILURE,
                format!(
                    "{}: exists and is not the special file the volume has there",
                    dst.display()
                ),
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            rustix::fs::mknodat(CWD, dst, kind, Mode::from_raw_mode(0o600), meta.rdev())
                .map_err(|e| dest_err(dst, e))?;
        }
        Err(e) => return Err(failed_at(dst, e)),
    }
    rustix::fs::chownat(
        CWD,
        dst,
        Some(rustix::process::Uid::from_raw(meta.uid())),
        Some(rustix::process::Gid::from_raw(meta.gid())),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| failed_at(dst, e))?;
    rustix::fs::chmodat(
        CWD,
        dst,
        Mode::from_raw_mode(meta.mode() & 0o7777),
        AtFlags::empty(),
    )
    .map_err(|e| failed_at(dst, e))?;
    rustix::fs::utimensat(CWD, dst, &timestamps(meta), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| failed_at(dst, e))?;
    Ok(())
}

/// The directories' metadata, deepest first, and every directory synced; then DEST's
/// root given the backing root's, the temp dir (with the marker) removed, the root's
/// times set again (the removal changed them) and the root synced.
fn finish_dirs(
    backing: &Path,
    dest: &Path,
    dirs: &[(PathBuf, Metadata)],
    root_meta: &Metadata,
) -> Result<(), Failure> {
    let mut order: Vec<&(PathBuf, Metadata)> = dirs.iter().collect();
    order.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
    let set = |src: &Path, dst: &Path, meta: &Metadata| -> Result<(), Failure> {
        let d = File::open(dst).map_err(|e| failed_at(dst, e))?;
        copy_meta(meta, src, &d).map_err(|e| dest_err(dst, e))
    };
    for (rel, meta) in &order {
        set(&backing.join(rel), &dest.join(rel), meta)?;
    }
    for (rel, _) in &order {
        let d = dest.join(rel);
        sync_dir(&d).map_err(|e| failed_at(&d, e))?;
    }
    set(backing, dest, root_meta)?;
    let tmp = dest.join(TMP_DIR);
    match std::fs::remove_dir_all(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(failed_at(&tmp, e)),
    }
    let root = File::open(dest).map_err(|e| failed_at(dest, e))?;
    super::set_times_of(root_meta, &root).map_err(|e| failed_at(dest, e))?;
    root.sync_all().map_err(|e| failed_at(dest, e))
}
