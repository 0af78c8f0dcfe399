//! Rewriting one backing file in place, into the volume's format and current key
//! version, so that it keeps its inode (its number, every hard link, owner, mode,
//! extended attributes and times): what `earfs reencrypt` does to a file while the
//! volume is mounted (the kernel keeps seeing the same inode) and, offline, to a file
//! with several links.
//!
//! A file cannot change its key in place sector by sector (its one header names one
//! key), so the rewrite is journaled whole, in the volume's work directory
//! ([`WORK_DIR`], hidden from the mount):
//! 1. `rewrite-INO.new`: a new backing file with the same plaintext, synced;
//! 2. `rewrite-INO.json`, written atomically (the commit): the target's path and inode
//!    number and its times;
//! 3. the new file's bytes copied over the target (its holes punched), the target
//!    synced and its times put back;
//! 4. the record and the new file removed, the work directory synced.
//!
//! A crash before (2) leaves the target as it was and a `.new` leftover, which
//! [`finish_pending`] removes; a crash after it leaves a target that may be half
//! copied, which [`finish_pending`] completes from the `.new` file (a byte copy that
//! needs no key). The daemon runs it before it serves a volume and every data command
//! before it starts, so a half-copied file is never read.
//!
//! An offline `earfs reencrypt` leaves two more kinds of leftovers, which
//! [`finish_pending`] cleans up as well: `reencrypt-INO.new` (a new file not yet renamed
//! over its target, which is whole) and [`DIR_TIMES`], the directories' times from
//! before its renames (put back, so a mount after a kill shows them unchanged).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{SeekFrom, Timespec, Timestamps};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use rustix::fs::{Mode, OFlags};

use super::backing;
use super::copy::{Keys, Plain, chunk_buf};
use super::error::{FsError, FsResult};
use super::file::clear_range;
use super::{EarFs, FileKind, Inode, ROOT_ID, is_reserved_root_name, proc_path};

pub use super::reserved::WORK_DIR;

/// In the work directory: every directory's times before an offline `reencrypt`
/// renamed files into them, by path under the root (the root's as "").
pub const DIR_TIMES: &str = "reencrypt-dirs.json";

/// A directory's access and modification times, `(seconds, nanoseconds)` each.
pub type Times = ((i64, i64), (i64, i64));

/// The commit record of one in-place rewrite.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// The target's path relative to the backing root, when the rewrite began (a rename
    /// since is found by inode number).
    pub path: PathBuf,
    /// The target's inode number.
    pub ino: u64,
    /// Its access and modification times, `(seconds, nanoseconds)`.
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
}

/// The work directory of the volume at `root`, created (mode 0700) if missing; the
/// root keeps its times (they are the mount root's).
pub fn work_dir(root: &Path) -> std::io::Result<PathBuf> {
    let dir = root.join(WORK_DIR);
    if dir.is_dir() {
        return Ok(dir);
    }
    let times = times_of(&std::fs::metadata(root)?);
    match std::fs::create_dir(&dir) {
        Ok(()) => {
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
            let r = File::open(root)?;
            set_times(&r, times.0, times.1)?;
            r.sync_all()?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    Ok(dir)
}

/// Create `path` for writing a new backing file (it must not exist; mode 0600).
pub fn create_new(path: &Path) -> std::io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
}

/// The names (and paths) in the work directory of the volume at `root`, sorted by
/// name; none if it does not exist.
pub fn work_entries(root: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let entries = match std::fs::read_dir(root.join(WORK_DIR)) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
        ));
    }
    out.sort();
    Ok(out)
}

/// Write `bytes` to `path` atomically: a temporary file, synced, renamed over, and the
/// directory synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = create_new(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Copy `src`'s plaintext into `dst` (a new, empty backing file): its data ranges only,
/// so holes stay holes, then its size. `each` is told the bytes of every chunk copied.
pub fn copy_plain(src: &Plain<'_>, dst: &mut Plain<'_>, mut each: impl FnMut(u64)) -> FsResult<()> {
    let mut buf = chunk_buf(src.size());
    let mut off = 0;
    while let Some((start, end)) = src.next_data(off)? {
        let mut at = start;
        while at < end {
            let want = ((end - at) as usize).min(buf.len());
            let n = src.read_at(at, &mut buf[..want])?;
            if n == 0 {
                return Err(FsError::Os(Errno::IO));
            }
            dst.write_at(at, &buf[..n])?;
            each(n as u64);
            at += n as u64;
        }
        off = end;
    }
    dst.set_size(src.size())?;
    buf.fill(0);
    Ok(())
}

/// The access and modification times of `m`, `(seconds, nanoseconds)` each.
pub fn times_of(m: &std::fs::Metadata) -> ((i64, i64), (i64, i64)) {
    ((m.atime(), m.atime_nsec()), (m.mtime(), m.mtime_nsec()))
}

/// Set the access and modification times of `f`.
pub fn set_times(f: &File, atime: (i64, i64), mtime: (i64, i64)) -> std::io::Result<()> {
    Ok(rustix::fs::futimens(f, &timestamps(atime, mtime))?)
}

/// Set the access and modification times of `path` (not following a symlink there).
pub fn set_times_at(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> std::io::Result<()> {
    Ok(rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &timestamps(atime, mtime),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

fn timestamps(atime: (i64, i64), mtime: (i64, i64)) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        last_modification: Timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    }
}

fn names(work: &Path, ino: u64) -> (PathBuf, PathBuf) {
    (
        work.join(format!("rewrite-{ino}.new")),
        work.join(format!("rewrite-{ino}.json")),
    )
}

/// Rewrite the backing file `target` (open read-write; `rel` is its path under the
/// backing root `root`) in `keys`' format and current key version, in place. `each` is
/// told the plaintext bytes of every chunk (for progress and a rate limit). The caller
/// makes sure that nothing else changes the file meanwhile.
pub fn rewrite_in_place(
    root: &Path,
    rel: &Path,
    target: &File,
    keys: &Keys,
    mut each: impl FnMut(u64),
) -> FsResult<()> {
    let meta = target.metadata()?;
    let ino = meta.ino();
    let work = work_dir(root)?;
    let (new, rec) = names(&work, ino);
    let _ = std::fs::remove_file(&new);
    let dup = target.try_clone()?;
    let src = keys.open(dup, &root.join(rel))?;
    let made = (|| -> FsResult<()> {
        let mut dst = keys.open(create_new(&new)?, &new)?;
        copy_plain(&src, &mut dst, &mut each)?;
        dst.sync()?;
        Ok(())
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_file(&new);
        return Err(e);
    }
    let (atime, mtime) = times_of(&meta);
    let record = Record {
        path: rel.to_path_buf(),
        ino,
        atime,
        mtime,
    };
    let json = serde_json::to_vec(&record).map_err(|_| FsError::Invalid)?;
    if let Err(e) = write_atomic(&rec, &json) {
        let _ = std::fs::remove_file(&new);
        return Err(e.into());
    }
    // Committed: from here on the rewrite is finished, now or by `finish_pending`.
    copy_over(&new, target)?;
    set_times(target, atime, mtime)?;
    std::fs::remove_file(&rec)?;
    std::fs::remove_file(&new)?;
    File::open(&work)?.sync_all()?;
    Ok(())
}

/// Copy the bytes of the backing file `from` over `target`: its data ranges written,
/// everything else punched, its length set, then `target` synced.
fn copy_over(from: &Path, target: &File) -> FsResult<()> {
    let src = File::open(from)?;
    let len = src.metadata()?.len();
    let mut buf = chunk_buf(len);
    let mut off = 0u64;
    while off < len {
        let start = match rustix::fs::seek(&src, SeekFrom::Data(off)) {
            Ok(s) => s.min(len),
            Err(Errno::NXIO) => len,
            Err(e) => return Err(e.into()),
        };
        clear_range(target, off, start)?;
        if start >= len {
            break;
        }
        let end = match rustix::fs::seek(&src, SeekFrom::Hole(start)) {
            Ok(e) => e.min(len),
            Err(Errno::NXIO) => len,
            Err(e) => return Err(e.into()),
        };
        let mut at = start;
        while at < end {
            let want = ((end - at) as usize).min(buf.len());
            let n = src.read_at(&mut buf[..want], at)?;
            if n == 0 {
                return Err(FsError::Os(Errno::IO));
            }
            target.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        off = end;
    }
    backing::ftruncate(target, len)?;
    backing::sync(target, false)?;
    Ok(())
}

/// What [`finish_pending`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Finished {
    /// Rewrites that had committed and were completed (the targets' paths).
    pub completed: Vec<PathBuf>,
    /// Rewrites that had not committed: their new files were removed.
    pub rolled_back: usize,
    /// Committed rewrites whose target is gone (deleted since): their files were removed.
    pub target_gone: Vec<PathBuf>,
    /// Directories whose times an interrupted offline reencrypt had recorded were given
    /// them back.
    pub dir_times_restored: bool,
}

/// Record the directories' times (atomically) in the work directory of `root`.
pub fn record_dir_times(root: &Path, dirs: &BTreeMap<PathBuf, Times>) -> std::io::Result<()> {
    let json = serde_json::to_vec(dirs).map_err(std::io::Error::other)?;
    write_atomic(&work_dir(root)?.join(DIR_TIMES), &json)
}

/// Give the directory `rel` under `root` its times from `dirs` (if recorded and there).
pub fn restore_dir(
    root: &Path,
    rel: &Path,
    dirs: &BTreeMap<PathBuf, Times>,
) -> std::io::Result<()> {
    let Some((atime, mtime)) = dirs.get(rel) else {
        return Ok(());
    };
    match set_times_at(&root.join(rel), *atime, *mtime) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Give every recorded directory its times back, sync each, then remove the record
/// and sync the work directory. The error names the directory.
pub fn end_dir_times(root: &Path, dirs: &BTreeMap<PathBuf, Times>) -> std::io::Result<()> {
    let named = |p: &Path, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{}: {e}", p.display()))
    };
    for rel in dirs.keys() {
        let path = root.join(rel);
        restore_dir(root, rel, dirs).map_err(|e| named(&path, e))?;
        match File::open(&path).and_then(|d| d.sync_all()) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => r.map_err(|e| named(&path, e))?,
        }
    }
    let work = root.join(WORK_DIR);
    let rec = work.join(DIR_TIMES);
    match std::fs::remove_file(&rec) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        r => r.map_err(|e| named(&rec, e))?,
    }
    File::open(&work)
        .and_then(|d| d.sync_all())
        .map_err(|e| named(&work, e))
}

/// The directories' times an interrupted offline reencrypt recorded, if any.
pub fn pending_dir_times(root: &Path) -> std::io::Result<Option<BTreeMap<PathBuf, Times>>> {
    let rec = root.join(WORK_DIR).join(DIR_TIMES);
    match std::fs::read(&rec) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", rec.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The rewrites an interrupted run left in the volume at `root`: committed ones
/// (records) and uncommitted new files. Changes nothing.
pub fn pending(root: &Path) -> std::io::Result<(Vec<Record>, Vec<PathBuf>)> {
    let work = root.join(WORK_DIR);
    let mut records = Vec::new();
    let mut loose = Vec::new();
    let mut news = Vec::new();
    for (name, path) in work_entries(root)? {
        if let Some(ino) = name
            .strip_prefix("rewrite-")
            .and_then(|n| n.strip_suffix(".json"))
        {
            let text = std::fs::read(&path)?;
            match serde_json::from_slice::<Record>(&text) {
                Ok(r) if r.ino.to_string() == ino => records.push(r),
                _ => loose.push(path),
            }
        } else if name.starts_with("rewrite-") {
            news.push(path);
        }
    }
    for n in news {
        let committed = records.iter().any(|r| names(&work, r.ino).0 == n);
        if !committed {
            loose.push(n);
        }
    }
    Ok((records, loose))
}

/// Finish what interrupted rewrites left in the volume at `root`: complete every
/// committed one from its new file and remove the rest (an offline reencrypt's new
/// files too), and give the directories back the times an offline reencrypt
/// recorded. Needs no key.
pub fn finish_pending(root: &Path) -> std::io::Result<Finished> {
    let (records, mut loose) = pending(root)?;
    // An offline reencrypt's new files not renamed over their targets (whole).
    for (name, path) in work_entries(root)? {
        if name.starts_with("reencrypt-") && name.ends_with(".new") {
            loose.push(path);
        }
    }
    let dir_times = pending_dir_times(root)?;
    let mut done = Finished::default();
    if let Some(dirs) = &dir_times {
        end_dir_times(root, dirs)?;
        done.dir_times_restored = true;
    }
    if records.is_empty() && loose.is_empty() {
        return Ok(done);
    }
    let work = root.join(WORK_DIR);
    for r in records {
        let (new, rec) = names(&work, r.ino);
        match find_target(root, &r)? {
            Some(path) => {
                let target = File::options()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)?;
                copy_over(&new, &target).map_err(to_io)?;
                set_times(&target, r.atime, r.mtime)?;
                done.completed.push(r.path.clone());
            }
            None => done.target_gone.push(r.path.clone()),
        }
        std::fs::remove_file(&rec)?;
        std::fs::remove_file(&new)?;
    }
    for l in loose {
        std::fs::remove_file(&l)?;
        done.rolled_back += 1;
    }
    File::open(&work)?.sync_all()?;
    Ok(done)
}

fn to_io(e: FsError) -> std::io::Error {
    match e {
        FsError::Os(e) => e.into(),
        e => std::io::Error::other(e.to_string()),
    }
}

/// The target of a record: its recorded path if that is still its inode, else the
/// file with its inode number anywhere under `root` (renamed since), else `None`.
fn find_target(root: &Path, r: &Record) -> std::io::Result<Option<PathBuf>> {
    let at = root.join(&r.path);
    if let Ok(m) = std::fs::symlink_metadata(&at)
        && m.ino() == r.ino
        && m.is_file()
    {
        return Ok(Some(at));
    }
    let dev = std::fs::metadata(root)?.dev();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if dir == root && entry.file_name() == WORK_DIR {
                continue;
            }
            let m = entry.metadata()?;
            if m.is_dir() && m.dev() == dev {
                stack.push(entry.path());
            } else if m.is_file() && m.ino() == r.ino && m.dev() == dev {
                return Ok(Some(entry.path()));
            }
        }
    }
    Ok(None)
}

/// What [`EarFs::rewrite`] did with one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rewritten {
    /// Rewritten in the volume's format under the current key.
    Done,
    /// Already in the volume's format under the current key (or without a header).
    Current,
    /// Open through the mount: skipped, to be tried again on a later pass.
    Open,
    /// No longer there (removed or renamed since it was listed).
    Gone,
}

impl EarFs {
    /// Rewrite the file at `rel` (a path under the backing root) in place, in the
    /// volume's format under the current key, while the volume is mounted: under the
    /// inode's exclusive content lock, so that no read or write through the mount sees
    /// anything but the whole old or the whole new content, and the kernel keeps the
    /// same inode. A file open through the mount is skipped ([`Rewritten::Open`])
    /// unless `include_open`: its handles stay valid (the inode is the same) and its
    /// I/O waits while it is rewritten.
    pub fn rewrite(
        &self,
        rel: &Path,
        include_open: bool,
        each: impl FnMut(u64),
    ) -> FsResult<Rewritten> {
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            || rel
                .components()
                .next()
                .is_some_and(|c| is_reserved_root_name(c.as_os_str()))
        {
            return Err(FsError::Invalid);
        }
        let root = self.inodes.get(ROOT_ID)?;
        // No symbolic link on the way: the path cannot lead out of the backing tree.
        let fd = match rustix::fs::openat2(
            &root.fd,
            rel,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            rustix::fs::ResolveFlags::BENEATH | rustix::fs::ResolveFlags::NO_SYMLINKS,
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV) => {
                return Ok(Rewritten::Gone);
            }
            Err(e) => return Err(e.into()),
        };
        let st = rustix::fs::fstat(&fd)?;
        if FileKind::from_mode(st.st_mode) != FileKind::File {
            return Ok(Rewritten::Gone);
        }
        // Held (one reference of our own) for the rewrite, so that a lookup meanwhile
        // finds this inode and its lock.
        let (inode, _) =
            self.inodes
                .remember((st.st_dev, st.st_ino), fd, FileKind::File, st.st_mode)?;
        let result = self.rewrite_inode(&inode, rel, include_open, each);
        self.inodes.forget(inode.id, 1);
        result
    }

    fn rewrite_inode(
        &self,
        inode: &Inode,
        rel: &Path,
        include_open: bool,
        each: impl FnMut(u64),
    ) -> FsResult<Rewritten> {
        let mut c = inode.content.write();
        if !include_open && self.files.read().values().any(|h| h.inode.id == inode.id) {
            return Ok(Rewritten::Open);
        }
        let target = File::from(rustix::fs::open(
            proc_path(&inode.fd),
            OFlags::RDWR | OFlags::CLOEXEC,
            Mode::empty(),
        )?);
        let keyring = match self.keys.snapshot() {
            (Some(k), _) => (*k).clone(),
            (None, _) => return Err(FsError::KeysLocked),
        };
        let keys = Keys::new(keyring, self.write_format());
        {
            let name = || self.backing_path(inode);
            let probe = keys.open(target.try_clone()?, &name())?;
            if probe.is_current() {
                return Ok(Rewritten::Current);
            }
        }
        let done = rewrite_in_place(&self.backing, rel, &target, &keys, each);
        // The header changed (or may have): the next access loads it again; its size is
        // now coded in the volume's format.
        c.unload();
        if done.is_ok() {
            inode.set_format_hint(keys.format());
        }
        done.map(|()| Rewritten::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::{FileFormat, Keyring};
    use crate::crypto::Dek;

    fn keyring(versions: &[(u32, &Dek)], current: u32) -> Keyring {
        Keyring::new(versions.iter().map(|(v, d)| (*v, (*d).clone())), current).unwrap()
    }

    fn write_file(keys: &Keys, path: &Path, data: &[(u64, &[u8])], size: u64) {
        let mut p = keys.open(create_new(path).unwrap(), path).unwrap();
        for (off, d) in data {
            p.write_at(*off, d).unwrap();
        }
        p.set_size(size).unwrap();
        p.sync().unwrap();
    }

    fn read_all(keys: &Keys, path: &Path) -> (Vec<u8>, Option<(FileFormat, u32)>) {
        let p = keys.open(File::open(path).unwrap(), path).unwrap();
        let mut out = vec![0u8; p.size() as usize];
        let mut off = 0;
        while off < out.len() {
            let n = p.read_at(off as u64, &mut out[off..]).unwrap();
            assert!(n > 0);
            off += n;
        }
        (out, p.header())
    }

    #[test]
    fn a_rewrite_keeps_plaintext_inode_links_and_times_and_takes_the_current_key() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let d1 = Dek::generate().unwrap();
        let d2 = Dek::generate().unwrap();
        let old = Keys::new(keyring(&[(1, &d1)], 1), FileFormat::V1);
        let new = Keys::new(keyring(&[(1, &d1), (2, &d2)], 2), FileFormat::V2);
        let f = root.join("f");
        // Data, a hole of 3 sectors, data, and a size past the last data.
        write_file(
            &old,
            &f,
            &[(0, b"first"), (5 * 4096, b"second")],
            9 * 4096 + 7,
        );
        std::fs::hard_link(&f, root.join("g")).unwrap();
        let (want, h) = read_all(&old, &f);
        assert_eq!(h, Some((FileFormat::V1, 1)));
        let before = std::fs::metadata(&f).unwrap();
        let target = File::options().read(true).write(true).open(&f).unwrap();
        let mut moved = 0;
        rewrite_in_place(root, Path::new("f"), &target, &new, |n| moved += n).unwrap();
        // The two data sectors, and v1's 7-byte tail (a short tail is never a hole).
        assert_eq!(moved, 4096 * 2 + 7, "the hole is not copied");
        let (got, h) = read_all(&new, &root.join("g"));
        assert_eq!(got, want);
        assert_eq!(h, Some((FileFormat::V2, 2)));
        let after = std::fs::metadata(&f).unwrap();
        assert_eq!(after.ino(), before.ino());
        assert_eq!(after.nlink(), 2);
        assert_eq!(
            (after.mtime(), after.mtime_nsec()),
            (before.mtime(), before.mtime_nsec())
        );
        assert!(
            after.blocks() < 8 * 8,
            "the hole stayed a hole: {} blocks",
            after.blocks()
        );
        assert_eq!(pending(root).unwrap(), (vec![], vec![]));
    }

    #[test]
    fn a_committed_rewrite_is_finished_and_an_uncommitted_one_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let d1 = Dek::generate().unwrap();
        let d2 = Dek::generate().unwrap();
        let old = Keys::new(keyring(&[(1, &d1)], 1), FileFormat::V2);
        let new = Keys::new(keyring(&[(1, &d1), (2, &d2)], 2), FileFormat::V2);
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        for name in ["a", "b"] {
            write_file(&old, &root.join(name), &[(0, &data)], data.len() as u64);
        }
        let work = work_dir(root).unwrap();
        // "a": committed, then the copy stopped half way (garbage over the first half).
        let a = root.join("a");
        let ino_a = std::fs::metadata(&a).unwrap().ino();
        let (new_a, rec_a) = names(&work, ino_a);
        write_file(&new, &new_a, &[(0, &data)], data.len() as u64);
        let m = std::fs::metadata(&a).unwrap();
        let (atime, mtime) = times_of(&m);
        let rec = Record {
            path: "renamed-since".into(),
            ino: ino_a,
            atime,
            mtime,
        };
        write_atomic(&rec_a, &serde_json::to_vec(&rec).unwrap()).unwrap();
        File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .write_all_at(&[0x5a; 20_000], 0)
            .unwrap();
        // "b": a new file without a record (not committed).
        let ino_b = std::fs::metadata(root.join("b")).unwrap().ino();
        std::fs::write(names(&work, ino_b).0, b"partial").unwrap();
        let (recs, loose) = pending(root).unwrap();
        assert_eq!(recs, vec![rec]);
        assert_eq!(loose, vec![names(&work, ino_b).0]);

        let done = finish_pending(root).unwrap();
        assert_eq!(done.completed, vec![PathBuf::from("renamed-since")]);
        assert_eq!(done.rolled_back, 1);
        assert_eq!(
            read_all(&new, &a),
            (data.clone(), Some((FileFormat::V2, 2)))
        );
        assert_eq!(
            read_all(&old, &root.join("b")),
            (data, Some((FileFormat::V2, 1)))
        );
        assert_eq!(pending(root).unwrap(), (vec![], vec![]));
        assert_eq!(finish_pending(root).unwrap(), Finished::default());
    }
}
