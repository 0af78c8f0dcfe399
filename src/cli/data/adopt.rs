//! `earfs adopt SRC BACKING`: turn the plaintext directory SRC into an earfs volume in
//! BACKING, on the same filesystem, one file at a time, so that it needs free space
//! for the largest file rather than for a second copy of the data. SRC stays, empty,
//! as the mountpoint: `earfs mount BACKING SRC`.
//!
//! The order of the steps, and why a crash (kill -9, a power cut) at any point leaves
//! every file readable in one of the two trees, and a rerun finishes the job:
//! 1. A first pass walks SRC (never following a symlink, never crossing into another
//!    filesystem) and refuses sockets, devices, nested mounts and the volume's own
//!    root names by name, before anything changes. It groups hard links.
//! 2. BACKING is created as `earfs init` does (a new or empty directory), or is the
//!    volume of an adopt of the same SRC that was interrupted (its record names SRC),
//!    or a volume that holds no files yet (a crash between init and the record).
//! 3. The record `.earfs-work/op-adopt.json` ([`OpRecord`]) is written (atomically,
//!    synced) before the first change to SRC. It names SRC and holds the metadata of
//!    every directory of SRC as it was before the adopt (their times change when
//!    their files go), to be given to the backing directories at the end.
//! 4. The backing directories are created (and their parents synced).
//! 5. Per file (or hard-link group, or symlink, or FIFO): an encrypted copy in
//!    `.earfs-work/adopt-<ino>.new` (data ranges only, so holes stay holes), its
//!    owner, mode, `user.*` attributes and times, fsync; with `--verify` its plaintext
//!    read back and compared (SHA-256) with the source; then a rename to its path in
//!    the backing tree, the other names of a hard-link group linked to it, fsync of
//!    the backing directories; only then the plaintext names are unlinked. The rename
//!    is the commit: a rerun takes a name present in the backing tree as adopted and
//!    removes its plaintext; a leftover `.new` is removed; a hard-link group with some
//!    of its names in the backing tree gets the others linked to that inode.
//! 6. The backing directories get their metadata from the record, deepest first, the
//!    backing root that of SRC (the mount's root shows it); each is synced.
//! 7. SRC's subdirectories are removed, SRC's filesystem synced (every unlink of a
//!    plaintext name durable), and the record removed.
//!
//! FIFOs are recreated in the backing tree (a FIFO holds no data, and the mount serves
//! FIFOs as the backing filesystem does). Sockets and devices are refused: a socket in
//! a data directory belongs to a server that may still run, and a device has no place
//! in one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io::ErrorKind;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{
    DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::path::{Path, PathBuf};

use clap::Args;
use parking_lot::{Condvar, Mutex};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::super::kms::{self, node_overrides};
use super::super::{Kms, KmsArgs};
use super::{
    Offline, OpRecord, Progress, Stop, copy_link_meta, copy_meta, default_jobs, human_bytes,
    parallel, sync_dir, timestamps,
};
use crate::content::{FileFormat, plain_size_to_backing_size};
use crate::daemon::{self, Failure, exit};
use crate::fs::copy::{CHUNK, Keys, chunk_buf, plain_data_ranges};
use crate::fs::{FsError, is_reserved_root_name, rewrite};
use crate::kms::{ProviderSpec, Retry};
use crate::volume::{self, CONFIG_NAME, CONFIG_TMP_NAME, VolumeConfig};

/// The operation's name in its record.
const OP: &str = "adopt";

/// Space a file may take beyond its data: its header sector and a last partial one.
const PER_FILE: u64 = 2 * 4096;

/// `earfs adopt`'s flags.
#[derive(Debug, Args)]
pub struct AdoptArgs {
    #[command(flatten)]
    kms: KmsArgs,
    /// On-disk format of the new volume's files: 2 (the default) or 1 (see `earfs init`).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=2))]
    format_version: Option<u32>,
    /// Before a plaintext file is removed, read its encrypted copy back through the
    /// cipher and compare its SHA-256 with the source's.
    #[arg(long)]
    verify: bool,
    /// Say what would be done and how much free space it needs; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Files adopted in parallel (default: four per CPU, 4 to 16).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=64))]
    jobs: Option<u64>,
    /// The plaintext directory (the database stopped); it becomes the mountpoint.
    src: PathBuf,
    /// The new volume's directory, on SRC's filesystem: new, empty, or the volume of
    /// an interrupted adopt of SRC.
    backing: PathBuf,
}

/// What kind of object a job moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Symlink,
    Fifo,
}

/// One inode of SRC to move, with all its names in SRC.
#[derive(Debug)]
struct Job {
    kind: Kind,
    /// Relative paths, sorted: a hard-link group has several.
    names: Vec<PathBuf>,
    ino: u64,
    size: u64,
    /// Bytes allocated (less than `size` for a sparse file).
    alloc: u64,
    /// Its link count (more than its names in SRC: it has names outside SRC too).
    nlink: u64,
}

impl Job {
    /// The space its encrypted copy takes, about.
    fn space(&self) -> u64 {
        match self.kind {
            Kind::File => self.alloc.min(self.size.next_multiple_of(4096)) + PER_FILE,
            _ => 4096,
        }
    }
}

/// A directory's metadata as it was before the adopt, kept in the record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct DirMeta {
    /// The relative path's bytes, hex ("" for SRC itself).
    path: String,
    mode: u32,
    uid: u32,
    gid: u32,
    atime: (i64, i64),
    mtime: (i64, i64),
    /// `user.*` attributes: name → value (hex).
    xattrs: BTreeMap<String, String>,
}

impl DirMeta {
    fn rel(&self) -> PathBuf {
        PathBuf::from(std::ffi::OsString::from_vec(
            hex::decode(&self.path).unwrap_or_default(),
        ))
    }

    fn depth(&self) -> usize {
        self.rel().components().count()
    }
}

/// What the first pass found in SRC.
#[derive(Debug, Default)]
struct Walk {
    jobs: Vec<Job>,
    dirs: Vec<DirMeta>,
    refused: Vec<String>,
    /// Directories other than SRC itself, relative.
    subdirs: Vec<PathBuf>,
    /// Whether SRC holds anything at all.
    empty: bool,
}

impl Walk {
    fn count(&self, kind: Kind) -> usize {
        self.jobs.iter().filter(|j| j.kind == kind).count()
    }

    fn bytes(&self) -> u64 {
        self.jobs.iter().map(|j| j.size).sum()
    }

    /// Warnings about files that also have names outside SRC: their plaintext stays
    /// there.
    fn outside_links(&self, src: &Path) -> Vec<String> {
        self.jobs
            .iter()
            .filter(|j| j.nlink > j.names.len() as u64)
            .map(|j| {
                format!(
                    "{} has {} more hard link(s) outside SRC: its plaintext stays under that name",
                    src.join(&j.names[0]).display(),
                    j.nlink - j.names.len() as u64
                )
            })
            .collect()
    }

    fn largest(&self) -> Option<&Job> {
        self.jobs
            .iter()
            .filter(|j| j.kind == Kind::File)
            .max_by_key(|j| j.space())
    }

    /// About the free space the adopt needs beyond the largest file: a header and
    /// at most one more block per file (the end of a v2 file), a block per symlink,
    /// FIFO and new directory, the record and `earfs.conf`.
    fn overhead(&self) -> u64 {
        let files = self.count(Kind::File) as u64;
        let others = self.jobs.len() as u64 - files;
        PER_FILE * files + 4096 * (others + self.dirs.len() as u64) + (64 << 10)
    }
}

/// What BACKING is now.
enum State {
    /// Missing, or an empty directory (or one with only the temporary config of an
    /// interrupted `init`): created as `earfs init` does.
    New { exists: bool },
    /// A volume that holds no files yet and no adopt record.
    Fresh(Box<VolumeConfig>),
    /// A volume with an interrupted adopt of SRC: its record.
    Resume(Box<VolumeConfig>, Box<OpRecord>),
    /// A volume with files and no adopt in progress, and SRC empty: nothing to do.
    Done,
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure::new(exit::USAGE, msg)
}

/// `earfs adopt SRC BACKING`.
pub(in crate::cli) fn run(args: AdoptArgs) -> Result<(), Failure> {
    let src = std::fs::canonicalize(&args.src)
        .map_err(|e| Failure::new(exit::FAILURE, format!("{}: {e}", args.src.display())))?;
    let src_meta = std::fs::metadata(&src).map_err(|e| at(&src, e))?;
    if !src_meta.is_dir() {
        return Err(usage(format!("{} is not a directory", src.display())));
    }
    let backing = resolve(&args.backing)?;
    check_paths(&src, &src_meta, &backing)?;
    let walk = walk(&src, src_meta.dev())?;
    let state = state(&src, &backing, &walk)?;
    let format = match &state {
        State::Fresh(cfg) | State::Resume(cfg, _) => FileFormat::from_number(u64::from(cfg.format)),
        _ => FileFormat::from_number(u64::from(
            args.format_version.unwrap_or(volume::NEW_VOLUME_FORMAT),
        )),
    }
    .unwrap_or(FileFormat::V2);
    let avail = rustix::fs::statvfs(&src)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .map_err(|e| at(&src, e))?;
    if args.dry_run {
        return dry_run(&src, &backing, &walk, &state, format, avail);
    }
    if !walk.refused.is_empty() {
        return Err(refusal(&walk));
    }
    if let State::Done = state {
        println!(
            "{} is adopted already (the volume in {} holds its files and no adopt is in progress)",
            src.display(),
            backing.display()
        );
        println!(
            "mount it there: earfs mount {} {}",
            backing.display(),
            src.display()
        );
        return Ok(());
    }
    let largest = walk.largest().map(|j| j.space()).unwrap_or(0);
    if avail < largest {
        let j = walk
            .largest()
            .map(|j| src.join(&j.names[0]))
            .unwrap_or_default();
        return Err(Failure::new(
            exit::FAILURE,
            format!(
                "No space left for the encrypted copy of the largest file, {} ({} needed, {} available on the filesystem of {}): free space, then run the same command again",
                j.display(),
                human_bytes(largest),
                human_bytes(avail),
                src.display()
            ),
        ));
    }
    if avail < largest + walk.overhead() {
        eprintln!(
            "warning: {} free on the filesystem of {}, about {} needed: adopt may run out of space (then free space and run it again)",
            human_bytes(avail),
            src.display(),
            human_bytes(largest + walk.overhead())
        );
    }
    for w in walk.outside_links(&src) {
        eprintln!("warning: {w}");
    }
    daemon::protect_key_material();
    let (vol, dirs) = open_volume(&args, &src, &backing, state, &walk)?;
    let budget = avail.saturating_sub(walk.overhead());
    adopt(&args, &src, &backing, &vol, &walk, dirs, budget)
}

/// BACKING made absolute with its existing part resolved (it may not exist yet).
fn resolve(backing: &Path) -> Result<PathBuf, Failure> {
    let abs = std::path::absolute(backing)
        .map_err(|e| Failure::new(exit::FAILURE, format!("{}: {e}", backing.display())))?;
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        match std::fs::canonicalize(cur) {
            Ok(mut p) => {
                for c in rest.iter().rev() {
                    p.push(c);
                }
                return Ok(p);
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (cur.parent(), cur.file_name()) else {
                    return Err(at(backing, e));
                };
                if name == ".." {
                    return Err(usage(format!(
                        "{}: give BACKING without `..` in its missing part",
                        backing.display()
                    )));
                }
                rest.push(name.to_os_string());
                cur = parent;
            }
            Err(e) => return Err(at(cur, e)),
        }
    }
}

/// The nearest existing directory at or above `p`.
fn existing_ancestor(p: &Path) -> &Path {
    let mut cur = p;
    while !cur.exists() {
        match cur.parent() {
            Some(parent) => cur = parent,
            None => break,
        }
    }
    cur
}

/// Whether `path` is the root of a mount (statx's STATX_ATTR_MOUNT_ROOT; a bind mount
/// of the same filesystem too).
fn is_mount_root(path: &Path) -> bool {
    use rustix::fs::{AtFlags, StatxAttributes, StatxFlags};
    match rustix::fs::statx(
        rustix::fs::CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT,
        StatxFlags::empty(),
    ) {
        Ok(s) => {
            s.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT)
                && s.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
        }
        Err(_) => false,
    }
}

/// Refuse BACKING inside SRC or the other way round, SRC as a mount of its own, and
/// BACKING on another filesystem.
fn check_paths(src: &Path, src_meta: &Metadata, backing: &Path) -> Result<(), Failure> {
    if backing == src {
        return Err(usage(format!(
            "SRC and BACKING are the same directory ({}): give BACKING a directory of its own beside SRC, e.g. {}.earfs",
            src.display(),
            src.display()
        )));
    }
    if backing.starts_with(src) {
        return Err(usage(format!(
            "BACKING {} is inside SRC {}: put it beside SRC, on the same filesystem (e.g. {}.earfs)",
            backing.display(),
            src.display(),
            src.display()
        )));
    }
    if src.starts_with(backing) {
        return Err(usage(format!(
            "SRC {} is inside BACKING {}: put BACKING beside SRC",
            src.display(),
            backing.display()
        )));
    }
    if src.to_str().is_none() || backing.to_str().is_none() {
        return Err(usage(format!(
            "{} or {} is not valid UTF-8: rename it first",
            src.display(),
            backing.display()
        )));
    }
    if is_mount_root(src) {
        let how = match daemon::find_mount(src) {
            Some(m) if m.source.starts_with("earfs:") => format!(
                " (it is the earfs mount of {}: the adopt is done)",
                m.source.trim_start_matches("earfs:")
            ),
            Some(m) => format!(" ({})", m.fstype),
            None => String::new(),
        };
        return Err(usage(format!(
            "{} is a mount point{how}: adopt moves files within one filesystem into a directory beside SRC; move the data into a subdirectory of that filesystem first",
            src.display()
        )));
    }
    let anc = existing_ancestor(backing);
    let dev = std::fs::metadata(anc).map_err(|e| at(anc, e))?.dev();
    if dev != src_meta.dev() {
        return Err(usage(format!(
            "BACKING {} is on another filesystem than SRC {}: adopt needs both on one filesystem (it needs free space for the largest file only); choose BACKING beside SRC, e.g. {}.earfs",
            backing.display(),
            src.display(),
            src.display()
        )));
    }
    Ok(())
}

/// The first pass: every object under SRC, refusals named.
fn walk(src: &Path, dev: u64) -> Result<Walk, Failure> {
    let mut w = Walk {
        empty: true,
        ..Walk::default()
    };
    let root_meta = std::fs::symlink_metadata(src).map_err(|e| at(src, e))?;
    w.dirs.push(dir_meta(src, Path::new(""), &root_meta)?);
    let mut by_ino: HashMap<u64, usize> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = src.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| at(&dir, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| at(&dir, e))?;
        names.sort();
        for name in names {
            w.empty = false;
            let rel = rel.join(&name);
            let path = src.join(&rel);
            if rel.parent() == Some(Path::new("")) && is_reserved_root_name(&name) {
                w.refused.push(format!(
                    "{}: this name is the volume's own at the root of BACKING; rename it first",
                    path.display()
                ));
                continue;
            }
            let m = std::fs::symlink_metadata(&path).map_err(|e| at(&path, e))?;
            let ft = m.file_type();
            if ft.is_dir() {
                if m.dev() != dev || is_mount_root(&path) {
                    w.refused.push(format!(
                        "{}: a mount point (another filesystem, or a bind mount): adopt does not cross into it; unmount it or move it out of SRC",
                        path.display()
                    ));
                    continue;
                }
                w.dirs.push(dir_meta(&path, &rel, &m)?);
                w.subdirs.push(rel.clone());
                stack.push(rel);
                continue;
            }
            let kind = if ft.is_file() {
                Kind::File
            } else if ft.is_symlink() {
                Kind::Symlink
            } else if ft.is_fifo() {
                Kind::Fifo
            } else {
                let what = if ft.is_socket() {
                    "a socket (of a server that may still run: stop it, or remove a stale socket)"
                } else if ft.is_block_device() {
                    "a block device (adopt does not move devices: move it out of SRC)"
                } else if ft.is_char_device() {
                    "a character device (adopt does not move devices: move it out of SRC)"
                } else {
                    "of an unknown file type"
                };
                w.refused.push(format!("{} is {what}", path.display()));
                continue;
            };
            if m.nlink() > 1
                && let Some(&i) = by_ino.get(&m.ino())
            {
                w.jobs[i].names.push(rel);
                continue;
            }
            if m.nlink() > 1 {
                by_ino.insert(m.ino(), w.jobs.len());
            }
            w.jobs.push(Job {
                kind,
                names: vec![rel],
                ino: m.ino(),
                size: if kind == Kind::File { m.len() } else { 0 },
                alloc: m.blocks() * 512,
                nlink: m.nlink(),
            });
        }
    }
    for j in &mut w.jobs {
        j.names.sort();
    }
    // Largest first (the space they need is free at the start; the rest fills in
    // around them), then by name: a run with --jobs 1 is always in the same order.
    w.jobs.sort_by(|a, b| {
        (b.kind == Kind::File)
            .cmp(&(a.kind == Kind::File))
            .then(b.space().cmp(&a.space()))
            .then(a.names.cmp(&b.names))
    });
    Ok(w)
}

/// The metadata of the directory at `path` (`rel` in SRC).
fn dir_meta(path: &Path, rel: &Path, m: &Metadata) -> Result<DirMeta, Failure> {
    let mut xattrs = BTreeMap::new();
    for (name, value) in user_xattrs(path).map_err(|e| at(path, e))? {
        xattrs.insert(name, hex::encode(value));
    }
    let ts = timestamps(m);
    Ok(DirMeta {
        path: hex::encode(rel.as_os_str().as_bytes()),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        atime: (ts.last_access.tv_sec, ts.last_access.tv_nsec),
        mtime: (ts.last_modification.tv_sec, ts.last_modification.tv_nsec),
        xattrs,
    })
}

/// The `user.*` extended attributes of `path` (none on a filesystem without them).
fn user_xattrs(path: &Path) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut names = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::llistxattr(path, &mut names[..]) {
            Ok(n) => break n,
            Err(Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    };
    let mut out = Vec::new();
    for name in names[..n]
        .split(|&b| b == 0)
        .filter(|n| n.starts_with(b"user."))
    {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let mut value = vec![0u8; 4096];
        let len = loop {
            match rustix::fs::lgetxattr(path, name, &mut value[..]) {
                Ok(n) => break n,
                Err(Errno::RANGE) => value.resize(value.len() * 4, 0),
                Err(e) => return Err(e.into()),
            }
        };
        value.truncate(len);
        out.push((name.to_string(), value));
    }
    Ok(out)
}

/// Whether the volume root at `backing` holds files (anything but its own names).
fn holds_files(backing: &Path) -> Result<bool, Failure> {
    for e in std::fs::read_dir(backing).map_err(|e| at(backing, e))? {
        let e = e.map_err(|e| at(backing, e))?;
        if !is_reserved_root_name(&e.file_name()) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// What BACKING is, and whether this adopt may go on with it.
fn state(src: &Path, backing: &Path, walk: &Walk) -> Result<State, Failure> {
    let meta = match std::fs::symlink_metadata(backing) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(State::New { exists: false }),
        Err(e) => return Err(at(backing, e)),
    };
    if !meta.is_dir() {
        return Err(Failure::new(
            exit::INIT_REFUSED,
            format!(
                "{} is not a directory: give a new or empty directory as BACKING",
                backing.display()
            ),
        ));
    }
    if !backing.join(CONFIG_NAME).exists() {
        for e in std::fs::read_dir(backing).map_err(|e| at(backing, e))? {
            let e = e.map_err(|e| at(backing, e))?;
            if e.file_name() != OsStr::new(CONFIG_TMP_NAME) {
                return Err(Failure::new(
                    exit::INIT_REFUSED,
                    format!(
                        "{} is not empty and not an earfs volume: give a new or empty directory as BACKING",
                        backing.display()
                    ),
                ));
            }
        }
        return Ok(State::New { exists: true });
    }
    let cfg = Box::new(VolumeConfig::load(backing)?);
    let records = OpRecord::list(backing).map_err(|e| at(backing, e))?;
    if let Some(rec) = records.into_iter().find(|r| r.op == OP) {
        let source = rec.detail.get("source").and_then(|s| s.as_str());
        if source == src.to_str() {
            return Ok(State::Resume(cfg, Box::new(rec)));
        }
        return Err(Failure::new(
            exit::INIT_REFUSED,
            format!(
                "{} holds an adopt of {} in progress, not of {}: finish it with `{}`",
                backing.display(),
                source.unwrap_or("another directory"),
                src.display(),
                rec.command
            ),
        ));
    }
    if !holds_files(backing)? {
        return Ok(State::Fresh(cfg));
    }
    if walk.empty {
        return Ok(State::Done);
    }
    Err(Failure::new(
        exit::INIT_REFUSED,
        format!(
            "{} is an earfs volume that holds files already and no adopt of {} is in progress: adopt needs a new or empty directory",
            backing.display(),
            src.display()
        ),
    ))
}

fn refusal(walk: &Walk) -> Failure {
    let n = walk.refused.len();
    let mut msg = format!(
        "refused, nothing changed: {n} object(s) in SRC cannot be adopted: {}",
        walk.refused[..n.min(5)].join("; ")
    );
    if n > 5 {
        msg.push_str(&format!("; and {} more (see --dry-run)", n - 5));
    }
    Failure::new(exit::FAILURE, msg)
}

/// `--dry-run`: what would be done and the space it needs; nothing changes.
fn dry_run(
    src: &Path,
    backing: &Path,
    walk: &Walk,
    state: &State,
    format: FileFormat,
    avail: u64,
) -> Result<(), Failure> {
    let files = walk.count(Kind::File);
    let groups: Vec<&Job> = walk.jobs.iter().filter(|j| j.names.len() > 1).collect();
    let extra: usize = groups.iter().map(|j| j.names.len() - 1).sum();
    println!("earfs adopt --dry-run: nothing changed");
    println!("source:        {}", src.display());
    println!(
        "backing:       {} ({})",
        backing.display(),
        match state {
            State::New { exists: false } => "new: created as `earfs init` does".to_string(),
            State::New { exists: true } =>
                "empty directory: initialised as `earfs init` does".to_string(),
            State::Fresh(_) => "a volume without files: the adopt starts in it".to_string(),
            State::Resume(..) => "the adopt in progress goes on where it stopped".to_string(),
            State::Done => "adopted already: nothing to do".to_string(),
        }
    );
    println!(
        "would adopt:   {files} files ({}), {} directories, {} symlinks, {} FIFOs",
        human_bytes(walk.bytes()),
        walk.subdirs.len(),
        walk.count(Kind::Symlink),
        walk.count(Kind::Fifo)
    );
    println!(
        "hard links:    {} groups ({extra} more names), each kept one inode",
        groups.len()
    );
    let largest = walk.largest();
    let need = largest.map(|j| j.space()).unwrap_or(0);
    if let Some(j) = largest {
        let enc = plain_size_to_backing_size(format, j.size);
        println!(
            "largest file:  {} ({}, {} encrypted)",
            src.join(&j.names[0]).display(),
            human_bytes(j.size),
            human_bytes(enc)
        );
    }
    println!(
        "space needed:  {} free for the largest file's encrypted copy, about {} with up to 8 KiB per file (its header) and 4 KiB per directory (not a second copy of the data)",
        human_bytes(need),
        human_bytes(need + walk.overhead())
    );
    println!(
        "space free:    {} on the filesystem of {}",
        human_bytes(avail),
        src.display()
    );
    if avail < need {
        println!("not enough free space: free space before the adopt");
    }
    for w in walk.outside_links(src) {
        println!("warning:       {w}");
    }
    for r in &walk.refused {
        println!("refused:       {r}");
    }
    if !walk.refused.is_empty() {
        return Err(refusal(walk));
    }
    if avail < need {
        return Err(Failure::new(
            exit::FAILURE,
            format!(
                "No space left for the largest file: {} needed, {} free",
                human_bytes(need),
                human_bytes(avail)
            ),
        ));
    }
    Ok(())
}

/// Create the volume (or open the one of an interrupted adopt) under its lock, and
/// the directory metadata of SRC from before the adopt: from the record, or taken now
/// and written into a new record.
fn open_volume(
    args: &AdoptArgs,
    src: &Path,
    backing: &Path,
    state: State,
    walk: &Walk,
) -> Result<(Offline, Vec<DirMeta>), Failure> {
    let lock_of = |backing: &Path| {
        daemon::try_lock_volume(backing)?.ok_or_else(|| {
            Failure::new(
                exit::VOLUME_IN_USE,
                format!(
                    "volume {} is mounted: unmount it before `earfs adopt`",
                    backing.display()
                ),
            )
        })
    };
    let (vol, record) = match state {
        State::New { exists } => {
            let Some(kms) = args.kms.kms else {
                return Err(usage(format!(
                    "earfs adopt needs --kms local|aws|gcp (and its key) to create the volume in {}",
                    backing.display()
                )));
            };
            // The key first (a --kms local key file is made, a KMS key validated), so
            // that a bad flag leaves nothing behind.
            let (spec, provider) = if kms == Kms::Local {
                let spec = kms::spec(&args.kms, kms)?;
                kms::create_missing_key_file(&spec)?;
                let provider = spec.open(Retry::default())?;
                (spec, provider)
            } else {
                kms::open_validated(&args.kms, kms)?
            };
            if !exists {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(backing)
                    .map_err(|e| at(backing, e))?;
            }
            let lock = lock_of(backing)?;
            match std::fs::remove_file(backing.join(CONFIG_TMP_NAME)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(at(backing, e)),
            }
            let format = args.format_version.unwrap_or(volume::NEW_VOLUME_FORMAT);
            let cfg = volume::create(backing, spec, provider.as_ref(), format)?;
            eprintln!(
                "created earfs volume {} in {} (key: {} {}, format {})",
                cfg.volume_id,
                backing.display(),
                cfg.kms.name(),
                cfg.kms.key_reference(),
                cfg.format
            );
            let keyring = cfg.unlock(backing, provider.as_ref())?;
            (Offline::with_keys(backing, cfg, keyring, lock)?, None)
        }
        State::Fresh(cfg) => (existing(args, backing, *cfg, lock_of(backing)?)?, None),
        State::Resume(cfg, rec) => {
            eprintln!(
                "resuming the adopt of {} into {} (started {}, interrupted)",
                src.display(),
                backing.display(),
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(rec.started)
                )
            );
            (existing(args, backing, *cfg, lock_of(backing)?)?, Some(rec))
        }
        State::Done => {
            return Err(Failure::new(exit::FAILURE, "nothing to adopt"));
        }
    };
    let dirs = match record {
        Some(rec) => {
            let dirs: Vec<DirMeta> = rec
                .detail
                .get("dirs")
                .cloned()
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| {
                    Failure::new(
                        exit::FAILURE,
                        format!(
                            "{}: the adopt record is damaged ({e}): `earfs fsck` names it",
                            backing.join(rewrite::WORK_DIR).display()
                        ),
                    )
                })?
                .unwrap_or_default();
            // Directories the record lacks (none, unless SRC changed): as they are now.
            let known: BTreeSet<String> = dirs.iter().map(|d| d.path.clone()).collect();
            let mut dirs = dirs;
            dirs.extend(
                walk.dirs
                    .iter()
                    .filter(|d| !known.contains(&d.path))
                    .cloned(),
            );
            dirs
        }
        None => {
            let src_str = src.to_str().unwrap_or_default();
            let detail = serde_json::json!({
                "source": src_str,
                "dirs": serde_json::to_value(&walk.dirs).unwrap_or_default(),
            });
            OpRecord::begin(
                backing,
                OP,
                format!("earfs adopt {} {}", src.display(), backing.display()),
                detail,
            )
            .map_err(|e| at(&backing.join(rewrite::WORK_DIR), e))?;
            walk.dirs.clone()
        }
    };
    Ok((vol, dirs))
}

/// Open the existing volume at `backing` with its own key (`--kms` flags may only
/// confirm it; per-node flags apply as at mount).
fn existing(
    args: &AdoptArgs,
    backing: &Path,
    cfg: VolumeConfig,
    lock: File,
) -> Result<Offline, Failure> {
    let a = &args.kms;
    let recorded = &cfg.kms;
    let mut conflicts = Vec::new();
    if let Some(k) = a.kms {
        let name = match k {
            Kms::Local => "local",
            Kms::Aws => "aws",
            Kms::Gcp => "gcp",
        };
        if name != recorded.name() {
            conflicts.push(format!("--kms {name}"));
        }
    }
    match recorded {
        ProviderSpec::Local { key_file } => {
            if let Some(f) = &a.key_file
                && daemon::absolute(f) != *key_file
            {
                conflicts.push(format!("--key-file {}", f.display()));
            }
        }
        ProviderSpec::Aws { key_arn, .. } => {
            if let Some(k) = &a.key_arn
                && k != key_arn
            {
                conflicts.push(format!("--key-arn {k}"));
            }
        }
        ProviderSpec::Gcp { key_resource, .. } => {
            if let Some(k) = &a.key_resource
                && k != key_resource
            {
                conflicts.push(format!("--key-resource {k}"));
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(usage(format!(
            "{} is a volume already, keyed by {} ({}): its adopt goes on with that key; leave out {}",
            backing.display(),
            recorded.name(),
            recorded.key_reference(),
            conflicts.join(" and ")
        )));
    }
    if let Some(f) = args.format_version
        && f != cfg.format
    {
        return Err(usage(format!(
            "{} is a volume of format {} already: leave out --format-version {f}",
            backing.display(),
            cfg.format
        )));
    }
    let spec = recorded.with_overrides(&node_overrides(a))?;
    let provider = spec.open(kms::retry(a.kms_deadline)?)?;
    let keyring = cfg.unlock(backing, provider.as_ref())?;
    Offline::with_keys(backing, cfg, keyring, lock)
}

/// A failure about `path`, naming it; running out of space says what to do.
fn fs_failure(path: &Path, e: FsError) -> Failure {
    match e {
        FsError::Os(Errno::NOSPC) | FsError::Os(Errno::DQUOT) => Failure::new(
            exit::FAILURE,
            format!(
                "{}: No space left on device: free space on its filesystem and run the same command again (it goes on where it stopped; no file is lost)",
                path.display()
            ),
        ),
        e => Failure::new(exit::FAILURE, format!("{}: {e}", path.display())),
    }
}

/// [`fs_failure`] of an I/O error.
fn at(path: &Path, e: impl Into<std::io::Error>) -> Failure {
    let e: std::io::Error = e.into();
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => at(path, e),
        _ => Failure::new(exit::FAILURE, format!("{}: {e}", path.display())),
    }
}

/// Free space shared by the workers: a job starts when the space of the jobs in
/// flight and its own fits the free space at the start (or when no other is in
/// flight), so that parallel jobs never need more than one file's worth beyond it.
struct Budget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn take(&self, n: u64) -> BudgetGuard<'_> {
        let mut used = self.used.lock();
        while *used > 0 && *used + n > self.limit {
            self.freed.wait(&mut used);
        }
        *used += n;
        BudgetGuard { budget: self, n }
    }
}

struct BudgetGuard<'a> {
    budget: &'a Budget,
    n: u64,
}

impl Drop for BudgetGuard<'_> {
    fn drop(&mut self) {
        *self.budget.used.lock() -= self.n;
        self.budget.freed.notify_all();
    }
}

/// What every job needs.
struct Ctx<'a> {
    src: &'a Path,
    backing: &'a Path,
    work: PathBuf,
    keys: &'a Keys,
    verify: bool,
    progress: Progress,
    budget: Budget,
}

/// Steps 4 to 7 (see the module's documentation).
fn adopt(
    args: &AdoptArgs,
    src: &Path,
    backing: &Path,
    vol: &Offline,
    walk: &Walk,
    dirs: Vec<DirMeta>,
    budget: u64,
) -> Result<(), Failure> {
    let stop = Stop::on_signals();
    let work = rewrite::work_dir(backing).map_err(|e| at(backing, e))?;
    remove_leftovers(&work)?;
    make_dirs(backing, &dirs)?;
    let ctx = Ctx {
        src,
        backing,
        work,
        keys: &vol.keys,
        verify: args.verify,
        progress: Progress::new("adopt", walk.jobs.len() as u64, walk.bytes()),
        budget: Budget {
            limit: budget,
            used: Mutex::new(0),
            freed: Condvar::new(),
        },
    };
    let threads = args.jobs.map(|j| j as usize).unwrap_or_else(default_jobs);
    let done = if threads <= 1 {
        // In this thread: one order of calls, run after run.
        walk.jobs
            .iter()
            .take_while(|_| !stop.requested())
            .try_for_each(|job| adopt_job(&ctx, job))
    } else {
        parallel(&walk.jobs, threads, &stop, |job| adopt_job(&ctx, job))
    };
    if let Err(e) = done {
        ctx.progress.abandon();
        return Err(e);
    }
    if stop.requested() {
        ctx.progress.abandon();
        return Err(stop.failure(
            "adopt",
            &format!(
                "{} of {} files adopted",
                ctx.progress.files_done(),
                walk.jobs.len()
            ),
        ));
    }
    ctx.progress.finish("adopted");
    finish_dirs(backing, &dirs)?;
    remove_src_dirs(src, &dirs, walk)?;
    OpRecord::end(backing, OP).map_err(|e| at(&ctx.work, e))?;
    println!(
        "adopted {} into the earfs volume {}; {} is empty now: mount the volume there:",
        src.display(),
        backing.display(),
        src.display()
    );
    println!("  earfs mount {} {}", backing.display(), src.display());
    Ok(())
}

/// Remove the `.new` files an interrupted adopt left in the work directory.
fn remove_leftovers(work: &Path) -> Result<(), Failure> {
    let mut removed = false;
    for e in std::fs::read_dir(work).map_err(|e| at(work, e))? {
        let e = e.map_err(|e| at(work, e))?;
        let name = e.file_name();
        let b = name.as_bytes();
        if b.starts_with(b"adopt-") && b.ends_with(b".new") {
            std::fs::remove_file(e.path()).map_err(|err| at(&e.path(), err))?;
            removed = true;
        }
    }
    if removed {
        sync_dir(work).map_err(|e| at(work, e))?;
    }
    Ok(())
}

/// Create the backing directories that are missing (parents first; mode 0700 until
/// [`finish_dirs`] gives them theirs) and sync the directories that got one.
fn make_dirs(backing: &Path, dirs: &[DirMeta]) -> Result<(), Failure> {
    let mut rels: Vec<PathBuf> = dirs
        .iter()
        .map(DirMeta::rel)
        .filter(|r| !r.as_os_str().is_empty())
        .collect();
    rels.sort_by_key(|r| r.components().count());
    let mut touched = BTreeSet::new();
    for rel in rels {
        let path = backing.join(&rel);
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {
                touched.insert(rel.parent().map(Path::to_path_buf).unwrap_or_default());
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                if !std::fs::symlink_metadata(&path)
                    .map_err(|e| at(&path, e))?
                    .is_dir()
                {
                    return Err(Failure::new(
                        exit::FAILURE,
                        format!(
                            "{} is not a directory, but {} is: was BACKING changed during the adopt?",
                            path.display(),
                            rel.display()
                        ),
                    ));
                }
            }
            Err(e) => return Err(at(&path, e)),
        }
    }
    for rel in touched {
        let p = backing.join(rel);
        sync_dir(&p).map_err(|e| at(&p, e))?;
    }
    Ok(())
}

/// Adopt one job: its encrypted copy committed by a rename into the backing tree, its
/// other names linked, the backing directories synced, then its plaintext names
/// unlinked.
fn adopt_job(ctx: &Ctx<'_>, job: &Job) -> Result<(), Failure> {
    // The names already in the backing tree: all one inode.
    let mut have: Option<(PathBuf, u64)> = None;
    let mut missing = Vec::new();
    for n in &job.names {
        let b = ctx.backing.join(n);
        match std::fs::symlink_metadata(&b) {
            Ok(m) => {
                if kind_of(&m) != Some(job.kind) {
                    return Err(Failure::new(
                        exit::FAILURE,
                        format!(
                            "{} exists in BACKING but is not what {} is: was BACKING changed during the adopt?",
                            b.display(),
                            ctx.src.join(n).display()
                        ),
                    ));
                }
                match &have {
                    Some((first, ino)) if *ino != m.ino() => {
                        return Err(Failure::new(
                            exit::FAILURE,
                            format!(
                                "{} and {} are names of one file in SRC but two files in BACKING: was BACKING changed during the adopt?",
                                ctx.backing.join(first).display(),
                                b.display()
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => have = Some((n.clone(), m.ino())),
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => missing.push(n.clone()),
            Err(e) => return Err(at(&b, e)),
        }
    }
    let first_src = ctx.src.join(&job.names[0]);
    let mut to_sync = BTreeSet::new();
    // Space for the copy, held until the plaintext is gone.
    let _space = have.is_none().then(|| ctx.budget.take(job.space()));
    let have = match have {
        Some((rel, _)) => {
            if ctx.verify && job.kind == Kind::File {
                verify(ctx, &first_src, &ctx.backing.join(&rel))?;
            }
            ctx.progress.bytes(job.size);
            rel
        }
        None => {
            let new = ctx.work.join(format!("adopt-{}.new", job.ino));
            let made = match job.kind {
                Kind::File => copy_file(ctx, job, &first_src, &new),
                Kind::Symlink => make_symlink(&first_src, &new),
                Kind::Fifo => make_fifo(&first_src, &new),
            };
            if let Err(e) = made {
                let _ = std::fs::remove_file(&new);
                return Err(e);
            }
            let rel = job.names[0].clone();
            let dst = ctx.backing.join(&rel);
            std::fs::rename(&new, &dst).map_err(|e| at(&dst, e))?;
            missing.retain(|m| *m != rel);
            to_sync.insert(parent_of(&rel));
            rel
        }
    };
    for m in &missing {
        let from = ctx.backing.join(&have);
        let to = ctx.backing.join(m);
        std::fs::hard_link(&from, &to).map_err(|e| at(&to, e))?;
        to_sync.insert(parent_of(m));
    }
    for d in &to_sync {
        let p = ctx.backing.join(d);
        sync_dir(&p).map_err(|e| at(&p, e))?;
    }
    // Committed and durable: the plaintext names go.
    for n in &job.names {
        let p = ctx.src.join(n);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(at(&p, e)),
        }
    }
    ctx.progress.file();
    Ok(())
}

fn parent_of(rel: &Path) -> PathBuf {
    rel.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn kind_of(m: &Metadata) -> Option<Kind> {
    let ft = m.file_type();
    if ft.is_file() {
        Some(Kind::File)
    } else if ft.is_symlink() {
        Some(Kind::Symlink)
    } else if ft.is_fifo() {
        Some(Kind::Fifo)
    } else {
        None
    }
}

/// Write the encrypted copy of the regular file `src_path` to `new`: its data ranges
/// (holes stay holes), its size, its metadata, synced; with `--verify` read back and
/// compared.
fn copy_file(ctx: &Ctx<'_>, job: &Job, src_path: &Path, new: &Path) -> Result<(), Failure> {
    let fail = |e: FsError| {
        let mut f = fs_failure(new, e);
        f.message = f.message.replacen(
            &new.display().to_string(),
            &format!(
                "{} (the encrypted copy of {})",
                new.display(),
                src_path.display()
            ),
            1,
        );
        f
    };
    let src = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(src_path)
        .map_err(|e| at(src_path, e))?;
    let meta = src.metadata().map_err(|e| at(src_path, e))?;
    if meta.ino() != job.ino {
        return Err(changed(src_path));
    }
    let size = meta.len();
    let _ = std::fs::remove_file(new);
    let f = rewrite::create_new(new).map_err(|e| fail(e.into()))?;
    let mut dst = ctx.keys.open(f, new).map_err(fail)?;
    let ranges = plain_data_ranges(&src, size).map_err(|e| at(src_path, e))?;
    let mut buf = chunk_buf(size);
    let mut copied = 0;
    for (start, end) in ranges {
        let mut off = start;
        while off < end {
            let want = ((end - off) as usize).min(buf.len());
            let n = src
                .read_at(&mut buf[..want], off)
                .map_err(|e| at(src_path, e))?;
            if n == 0 {
                return Err(changed(src_path));
            }
            dst.write_at(off, &buf[..n]).map_err(fail)?;
            ctx.progress.bytes(n as u64);
            copied += n as u64;
            off += n as u64;
        }
    }
    dst.set_size(size).map_err(fail)?;
    ctx.progress.bytes(size.saturating_sub(copied));
    if dst.size() != size || src.metadata().map(|m| m.len()).ok() != Some(size) {
        return Err(changed(src_path));
    }
    copy_meta(&meta, src_path, dst.file()).map_err(|e| fail(e.into()))?;
    dst.sync().map_err(fail)?;
    drop(dst);
    if ctx.verify {
        verify(ctx, src_path, new)?;
    }
    Ok(())
}

fn changed(path: &Path) -> Failure {
    Failure::new(
        exit::FAILURE,
        format!(
            "{} changed while adopt read it: stop every process that writes in SRC (the database), then run the same command again",
            path.display()
        ),
    )
}

/// `--verify`: the SHA-256 of the plaintext of `src_path` and of the backing file
/// `enc` read back through the cipher must be equal.
fn verify(ctx: &Ctx<'_>, src_path: &Path, enc: &Path) -> Result<(), Failure> {
    let mut h = Sha256::new();
    let src = File::open(src_path).map_err(|e| at(src_path, e))?;
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    loop {
        let n = src.read_at(&mut buf, off).map_err(|e| at(src_path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    let want = h.finalize();
    let f = File::open(enc).map_err(|e| at(enc, e))?;
    let plain = ctx.keys.open(f, enc).map_err(|e| fs_failure(enc, e))?;
    let mut h = Sha256::new();
    let mut off = 0u64;
    while off < plain.size() {
        let n = plain
            .read_at(off, &mut buf)
            .map_err(|e| fs_failure(enc, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    if off != plain.size() || h.finalize() != want {
        return Err(Failure::new(
            exit::FAILURE,
            format!(
                "--verify: the encrypted copy {} does not read back as {} (SHA-256 differs): the plaintext is kept; check the disk and memory, then run again",
                enc.display(),
                src_path.display()
            ),
        ));
    }
    Ok(())
}

/// The symlink `src_path` made again at `new`: its target verbatim, owner and times.
fn make_symlink(src_path: &Path, new: &Path) -> Result<(), Failure> {
    let meta = std::fs::symlink_metadata(src_path).map_err(|e| at(src_path, e))?;
    let target = std::fs::read_link(src_path).map_err(|e| at(src_path, e))?;
    let _ = std::fs::remove_file(new);
    std::os::unix::fs::symlink(&target, new).map_err(|e| at(new, e))?;
    copy_link_meta(&meta, new).map_err(|e| at(new, e))
}

/// The FIFO `src_path` made again at `new`: owner, mode and times (Linux keeps no
/// `user.*` attributes on FIFOs).
fn make_fifo(src_path: &Path, new: &Path) -> Result<(), Failure> {
    use rustix::fs::{AtFlags, FileType, Mode};
    let meta = std::fs::symlink_metadata(src_path).map_err(|e| at(src_path, e))?;
    let _ = std::fs::remove_file(new);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        new,
        FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    )
    .map_err(|e| at(new, e))?;
    rustix::fs::chownat(
        rustix::fs::CWD,
        new,
        Some(rustix::process::Uid::from_raw(meta.uid())),
        Some(rustix::process::Gid::from_raw(meta.gid())),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| at(new, e))?;
    std::fs::set_permissions(new, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(|e| at(new, e))?;
    rustix::fs::utimensat(
        rustix::fs::CWD,
        new,
        &timestamps(&meta),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| at(new, e))?;
    Ok(())
}

/// Give every backing directory the metadata its SRC directory had before the adopt,
/// deepest first, the backing root last (SRC's own); sync each.
fn finish_dirs(backing: &Path, dirs: &[DirMeta]) -> Result<(), Failure> {
    let mut dirs: Vec<&DirMeta> = dirs.iter().collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.depth()));
    for d in dirs {
        let path = backing.join(d.rel());
        let f = File::open(&path).map_err(|e| at(&path, e))?;
        let set = || -> std::io::Result<()> {
            rustix::fs::fchown(
                &f,
                Some(rustix::process::Uid::from_raw(d.uid)),
                Some(rustix::process::Gid::from_raw(d.gid)),
            )?;
            rustix::fs::fchmod(&f, rustix::fs::Mode::from_raw_mode(d.mode))?;
            for (name, value) in &d.xattrs {
                let value = hex::decode(value).map_err(std::io::Error::other)?;
                rustix::fs::fsetxattr(&f, name, &value, rustix::fs::XattrFlags::empty())?;
            }
            rustix::fs::futimens(
                &f,
                &rustix::fs::Timestamps {
                    last_access: rustix::fs::Timespec {
                        tv_sec: d.atime.0,
                        tv_nsec: d.atime.1,
                    },
                    last_modification: rustix::fs::Timespec {
                        tv_sec: d.mtime.0,
                        tv_nsec: d.mtime.1,
                    },
                },
            )?;
            f.sync_all()
        };
        set().map_err(|e| at(&path, e))?;
    }
    Ok(())
}

/// Remove SRC's subdirectories (empty now), deepest first, and make every unlink and
/// removal in SRC durable (one sync of the filesystem, which is BACKING's too).
fn remove_src_dirs(src: &Path, dirs: &[DirMeta], walk: &Walk) -> Result<(), Failure> {
    let mut rels: BTreeSet<PathBuf> = dirs.iter().map(DirMeta::rel).collect();
    rels.extend(walk.subdirs.iter().cloned());
    let mut rels: Vec<PathBuf> = rels
        .into_iter()
        .filter(|r| !r.as_os_str().is_empty())
        .collect();
    rels.sort_by_key(|r| std::cmp::Reverse(r.components().count()));
    for rel in rels {
        let p = src.join(&rel);
        match std::fs::remove_dir(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty => {
                return Err(Failure::new(
                    exit::FAILURE,
                    format!(
                        "{} is not empty: something wrote in SRC during the adopt; stop it, then run the same command again",
                        p.display()
                    ),
                ));
            }
            Err(e) => return Err(at(&p, e)),
        }
    }
    let d = File::open(src).map_err(|e| at(src, e))?;
    rustix::fs::syncfs(&d).map_err(|e| at(src, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_needs_its_allocated_space_and_a_header() {
        let j = Job {
            kind: Kind::File,
            names: vec![PathBuf::from("a")],
            ino: 1,
            size: 3 << 20,
            alloc: 12 << 10,
            nlink: 1,
        };
        assert_eq!(
            j.space(),
            (12 << 10) + PER_FILE,
            "a sparse file needs its data"
        );
        let j = Job {
            alloc: 8 << 10,
            size: 10,
            ..j
        };
        assert_eq!(j.space(), 4096 + PER_FILE);
    }

    #[test]
    fn dir_paths_round_trip_through_hex() {
        let d = DirMeta {
            path: hex::encode(b"base/\xff16384"),
            mode: 0o700,
            uid: 0,
            gid: 0,
            atime: (0, 0),
            mtime: (0, 0),
            xattrs: BTreeMap::new(),
        };
        assert_eq!(d.rel().as_os_str().as_bytes(), b"base/\xff16384");
        assert_eq!(d.depth(), 2);
    }

    #[test]
    fn the_budget_lets_one_job_past_its_limit_and_waits_for_space() {
        let b = Budget {
            limit: 10,
            used: Mutex::new(0),
            freed: Condvar::new(),
        };
        let big = b.take(100);
        assert_eq!(*b.used.lock(), 100, "one job alone always starts");
        drop(big);
        let a = b.take(6);
        let started = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let _c = b.take(6);
                started.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!started.load(std::sync::atomic::Ordering::SeqCst));
            drop(a);
        });
        assert!(started.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(*b.used.lock(), 0);
    }
}
