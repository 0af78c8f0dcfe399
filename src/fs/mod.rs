//! Filesystem semantics over the backing directory: inodes, handles, per-inode
//! content locks, and every operation a database uses. No fuser, no KMS: the FUSE
//! adapter (src/fuse) calls these methods and replies.

pub mod backing;
pub mod census;
pub mod check;
pub mod copy;
mod dir;
mod error;
mod errseq;
mod file;
mod inode;
mod open_use;
mod reserved;
pub mod rewrite;
pub mod stats;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags, Stat, Timespec, Timestamps};
use rustix::io::Errno;

use crate::content::{
    FileFormat, HEADER_LEN, Keyring, backing_size_to_plain_size, header_format,
    size_is_format_independent,
};

pub use dir::DirEntry;
pub use error::{FsError, FsResult};
pub use file::Content;
pub use inode::{FileKind, Inode, ROOT_ID};
pub use open_use::OpenKeyUse;
pub(crate) use reserved::is_reserved_root_name;
pub use reserved::{CONFIG_NAME, CONFIG_TMP_NAME};

use dir::DirHandle;
use inode::InodeTable;

/// Attributes of a file as the mount shows them (plaintext size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// The caller of an operation that creates something.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A time to set: a value or "now".
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    Now,
    At(SystemTime),
}

/// The changes of a setattr.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    /// Clear set-user-id (and set-group-id with group exec) after the change, as the
    /// kernel asks when an unprivileged caller truncates a set-id file.
    pub kill_suidgid: bool,
}

/// Filesystem statistics.
#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// What the daemon holds for the kernel ([`EarFs::held`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Inodes the kernel knows (each an O_PATH descriptor), the root included.
    pub inodes: usize,
    /// Open file handles (a descriptor each, two with O_DIRECT).
    pub open_files: usize,
    /// Open directory handles.
    pub open_dirs: usize,
}

/// An open regular file.
struct Handle {
    inode: Arc<Inode>,
    file: File,
    direct: Option<File>,
    /// Where this handle is in its inode's writeback errors.
    wb_seen: errseq::Cursor,
}

/// The earfs filesystem over one backing directory.
pub struct EarFs {
    backing: PathBuf,
    inodes: InodeTable,
    keys: file::VolumeKeys,
    /// Open files by handle number. The lock guards the map only, never I/O.
    files: RwLock<HashMap<u64, Arc<Handle>>>,
    /// Open directories by handle number. The lock guards the map only.
    dirs: RwLock<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    /// How many entries `files` and `dirs` hold, for the metrics without their locks.
    open_files: AtomicUsize,
    open_dirs: AtomicUsize,
    /// Whether new files are written in format v2 (else v1); switched by an upgrade.
    writes_v2: AtomicBool,
    /// Renames and links so far, counted before and after each ([`EarFs::moves`]).
    moves: AtomicU64,
}

fn proc_path(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

fn to_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn timespec(t: Option<SetTime>) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        Some(SetTime::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        Some(SetTime::At(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: i64::from(d.subsec_nanos()),
            },
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = i64::from(d.subsec_nanos());
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Timespec {
                    tv_sec: sec,
                    tv_nsec: nsec,
                }
            }
        },
    }
}

impl EarFs {
    /// Serve `backing` with `keys`, writing new files in `format`.
    pub fn new(backing: &Path, keys: Keyring, format: FileFormat) -> FsResult<EarFs> {
        let fd = rustix::fs::open(
            backing,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&fd)?;
        Ok(EarFs {
            backing: backing.to_path_buf(),
            inodes: InodeTable::new(fd, (st.st_dev, st.st_ino), st.st_mode),
            keys: file::VolumeKeys::new(keys),
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            open_files: AtomicUsize::new(0),
            open_dirs: AtomicUsize::new(0),
            writes_v2: AtomicBool::new(format == FileFormat::V2),
            moves: AtomicU64::new(0),
        })
    }

    /// The format new files are written in.
    pub fn write_format(&self) -> FileFormat {
        if self.writes_v2.load(Ordering::Relaxed) {
            FileFormat::V2
        } else {
            FileFormat::V1
        }
    }

    /// Switch the format new files are written in (an upgrade of a running volume).
    pub fn set_write_format(&self, format: FileFormat) {
        self.writes_v2
            .store(format == FileFormat::V2, Ordering::Relaxed);
    }

    /// The format of a file that is not loaded, for its size. Only a length that is not
    /// a multiple of 16 past the header means different sizes in v1 and v2; then the
    /// format is read from the file's header once and kept with the inode (a volume
    /// may hold files of both formats: upgraded, or a v1 file copied in).
    fn format_for_size(&self, inode: &Inode, backing_len: u64) -> FileFormat {
        if size_is_format_independent(backing_len) {
            return FileFormat::V2;
        }
        if let Some(f) = inode.format_hint() {
            return f;
        }
        let fallback = self.write_format();
        let Ok(fd) = rustix::fs::open(
            proc_path(&inode.fd).as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            return fallback;
        };
        let mut h = [0u8; 10];
        match rustix::io::pread(&fd, &mut h, 0).map(|n| header_format(&h[..n])) {
            Ok(Ok(f)) => {
                inode.set_format_hint(f);
                f
            }
            _ => fallback,
        }
    }

    fn is_reserved(parent: u64, name: &OsStr) -> bool {
        parent == ROOT_ID && is_reserved_root_name(name)
    }

    /// Attributes from a backing stat. The size of a file is decoded from its backing
    /// length with its format (`inode`; without it, the caller puts the loaded size in).
    fn attr_of(&self, key_st: &Stat, inode: Option<&Inode>) -> Attr {
        let kind = FileKind::from_mode(key_st.st_mode);
        let mut size = key_st.st_size as u64;
        let mut blocks = key_st.st_blocks as u64;
        if kind == FileKind::File {
            let format = match inode {
                Some(i) => self.format_for_size(i, size),
                None => FileFormat::V2,
            };
            size = backing_size_to_plain_size(format, size)
                .or_else(|| backing_size_to_plain_size(FileFormat::V1, size))
                .unwrap_or(0);
            blocks = blocks.saturating_sub(HEADER_LEN / 512);
        }
        Attr {
            ino: self.inodes.id_for((key_st.st_dev, key_st.st_ino)),
            size,
            blocks,
            atime: to_time(key_st.st_atime, key_st.st_atime_nsec as i64),
            mtime: to_time(key_st.st_mtime, key_st.st_mtime_nsec as i64),
            ctime: to_time(key_st.st_ctime, key_st.st_ctime_nsec as i64),
            kind,
            perm: (key_st.st_mode & 0o7777) as u16,
            nlink: key_st.st_nlink as u32,
            uid: key_st.st_uid,
            gid: key_st.st_gid,
            rdev: key_st.st_rdev as u32,
            blksize: 4096,
        }
    }

    fn stat_inode(&self, inode: &Inode) -> FsResult<Attr> {
        self.stat_with(inode, None)
    }

    /// Attributes of `inode`, from `st` if the caller has just taken it (for a new
    /// inode, whose mode was set from it). The content lock (shared) keeps a write or
    /// truncate from running between the stat and the size we report, so a size in the
    /// middle of one never shows. A stat taken here refreshes the inode's mode bits.
    fn stat_with(&self, inode: &Inode, st: Option<Stat>) -> FsResult<Attr> {
        let content = (inode.kind == FileKind::File).then(|| inode.content.read());
        let st = match st {
            Some(st) => st,
            None => {
                let mut mode = inode.mode();
                let st = rustix::fs::fstat(&inode.fd)?;
                *mode = st.st_mode & 0o7777;
                st
            }
        };
        let loaded = content.as_ref().is_some_and(|c| c.size_known());
        let mut attr = self.attr_of(&st, (!loaded).then_some(inode));
        if let Some(c) = content.filter(|c| c.size_known()) {
            attr.size = c.size();
            if let Some(f) = c.format() {
                inode.set_format_hint(f);
            }
        }
        Ok(attr)
    }

    /// Open `name` in `parent` as O_PATH and register it (one kernel reference).
    fn lookup_inode(&self, parent: &Inode, name: &OsStr) -> FsResult<(Arc<Inode>, Attr)> {
        let fd = rustix::fs::openat(
            &parent.fd,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        self.register(fd)
    }

    fn register(&self, fd: OwnedFd) -> FsResult<(Arc<Inode>, Attr)> {
        let st = rustix::fs::fstat(&fd)?;
        let kind = FileKind::from_mode(st.st_mode);
        let (inode, new) = self
            .inodes
            .remember((st.st_dev, st.st_ino), fd, kind, st.st_mode)?;
        // A known inode's mode may have changed since `st` was taken: stat it again under
        // its mode lock.
        let attr = self.stat_with(&inode, new.then_some(st))?;
        Ok((inode, attr))
    }

    /// The content functions' view of one operation (the key epoch is read once, here).
    fn content_io<'a>(
        &'a self,
        file: &'a File,
        direct: Option<&'a File>,
        path: &'a dyn Fn() -> PathBuf,
    ) -> file::Io<'a> {
        file::Io {
            file,
            direct,
            keys: &self.keys,
            epoch: self.keys.epoch(),
            format: self.write_format(),
            path,
        }
    }

    /// Lock the data keys (the CMK was revoked): drop them and every file's cipher, and
    /// wipe the worker threads' plaintext scratch buffers; file I/O fails with EIO until
    /// [`EarFs::set_keys`]. Metadata stays available. Returns the node ids of the
    /// regular files known, whose kernel caches the caller should drop.
    pub fn lock_keys(&self) -> Vec<u64> {
        self.keys.set(None);
        let mut files = Vec::new();
        for inode in self.inodes.all() {
            if inode.kind == FileKind::File {
                inode.content.write().unload();
                files.push(inode.id);
            }
        }
        file::wipe_scratch_buffers();
        files
    }

    /// Install (new) data keys; files load their cipher again on next use.
    pub fn set_keys(&self, keys: Keyring) {
        self.keys.set(Some(keys));
    }

    /// Whether the data keys are locked.
    pub fn keys_locked(&self) -> bool {
        self.keys.versions().is_none()
    }

    /// The key versions in the keyring, and the current one (None while locked).
    pub fn key_versions(&self) -> Option<(Vec<u32>, u32)> {
        self.keys.versions()
    }

    /// When the current key version became current, if a key install after the start
    /// changed it (`None`: the version the fs was created with). A lock keeps it.
    pub fn current_key_changed(&self) -> Option<SystemTime> {
        self.keys.current_changed()
    }

    fn backing_path(&self, inode: &Inode) -> PathBuf {
        std::fs::read_link(proc_path(&inode.fd))
            .unwrap_or_else(|_| self.backing.join(format!("<inode {}>", inode.key.1)))
    }

    // ---- names ----

    /// Look up `name` in `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        if Self::is_reserved(parent, name) {
            return Err(FsError::Os(Errno::NOENT));
        }
        let p = self.inodes.get(parent)?;
        Ok(self.lookup_inode(&p, name)?.1)
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        self.inodes.forget(ino, n);
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let inode = self.inodes.get(ino)?;
        self.stat_inode(&inode)
    }

    /// Change attributes: size first, then mode, owner, times.
    pub fn setattr(&self, ino: u64, fh: Option<u64>, set: SetAttr) -> FsResult<Attr> {
        let inode = self.inodes.get(ino)?;
        let path = proc_path(&inode.fd);
        if let Some(size) = set.size {
            if inode.kind != FileKind::File {
                return Err(FsError::Os(if inode.kind == FileKind::Dir {
                    Errno::ISDIR
                } else {
                    Errno::INVAL
                }));
            }
            let handle = fh.and_then(|fh| self.files.read().get(&fh).cloned());
            let owned;
            let file = match &handle {
                Some(h) => &h.file,
                None => {
                    owned = File::from(rustix::fs::open(
                        &path,
                        OFlags::RDWR | OFlags::CLOEXEC,
                        Mode::empty(),
                    )?);
                    &owned
                }
            };
            let bp = || self.backing_path(&inode);
            let io = self.content_io(file, None, &bp);
            let mut c = inode.content.write();
            file::load(&mut c, &io)?;
            file::truncate(&mut c, &io, size)?;
        }
        if set.kill_suidgid && set.size.is_some() && set.mode.is_none() {
            Self::kill_suidgid_of(&inode)?;
        }
        if set.mode.is_some() || set.uid.is_some() || set.gid.is_some() {
            // A chown can clear set-id bits too: the kept mode is read back after both.
            let mut kept = inode.mode();
            let res = Self::chmod_chown(&inode, &path, set);
            *kept = rustix::fs::fstat(&inode.fd)?.st_mode & 0o7777;
            res?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let ts = Timestamps {
                last_access: timespec(set.atime),
                last_modification: timespec(set.mtime),
            };
            rustix::fs::utimensat(rustix::fs::CWD, &path, &ts, AtFlags::empty())?;
        }
        self.stat_inode(&inode)
    }

    /// The mode and owner changes of a setattr (the caller holds the inode's mode lock).
    fn chmod_chown(inode: &Inode, path: &str, set: SetAttr) -> FsResult<()> {
        if let Some(mode) = set.mode {
            if inode.kind == FileKind::Symlink {
                return Err(FsError::NotSupported);
            }
            rustix::fs::chmodat(
                rustix::fs::CWD,
                path,
                Mode::from_raw_mode(mode & 0o7777),
                AtFlags::empty(),
            )?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            rustix::fs::chownat(
                &inode.fd,
                "",
                set.uid.map(rustix::fs::Uid::from_raw),
                set.gid.map(rustix::fs::Gid::from_raw),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        Ok(())
    }

    /// Give a new object the caller's owner; keep set-id bits that chown would clear.
    fn own(&self, parent: &Inode, name: &OsStr, who: Caller, mode: u32) -> FsResult<()> {
        let pst = rustix::fs::fstat(&parent.fd)?;
        // In a set-group-id directory the backing filesystem already gave the parent's group.
        let gid = (pst.st_mode & libc::S_ISGID == 0).then(|| rustix::fs::Gid::from_raw(who.gid));
        rustix::fs::chownat(
            &parent.fd,
            name,
            Some(rustix::fs::Uid::from_raw(who.uid)),
            gid,
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        if mode & (libc::S_ISUID | libc::S_ISGID) != 0
            && FileKind::from_mode(mode) != FileKind::Dir
            && FileKind::from_mode(mode) != FileKind::Symlink
        {
            rustix::fs::chmodat(
                &parent.fd,
                name,
                Mode::from_raw_mode(mode & 0o7777),
                AtFlags::empty(),
            )?;
        }
        Ok(())
    }

    fn check_new_name(parent: u64, name: &OsStr) -> FsResult<()> {
        if Self::is_reserved(parent, name) {
            return Err(FsError::Reserved);
        }
        Ok(())
    }

    /// Create a file system node (regular file, fifo, socket, device).
    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        who: Caller,
    ) -> FsResult<Attr> {
        Self::check_new_name(parent, name)?;
        let p = self.inodes.get(parent)?;
        let kind = FileKind::from_mode(mode);
        let perm = Mode::from_raw_mode(mode & 0o7777);
        match kind {
            FileKind::File => {
                drop(rustix::fs::openat(
                    &p.fd,
                    name,
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
                    perm,
                )?);
            }
            FileKind::Dir | FileKind::Symlink => return Err(FsError::Invalid),
            _ => {
                let ft = rustix::fs::FileType::from_raw_mode(mode);
                rustix::fs::mknodat(&p.fd, name, ft, perm, u64::from(rdev))?;
            }
        }
        backing::created(&p.fd, name);
        self.finish_create(&p, name, who, mode)
    }

    fn finish_create(&self, p: &Inode, name: &OsStr, who: Caller, mode: u32) -> FsResult<Attr> {
        // A failure undoes the creation: the caller was told it failed. (The kernel holds
        // the parent locked, so nobody else has looked the new name up.) The lookup fails
        // when the daemon is out of descriptors.
        match self
            .own(p, name, who, mode)
            .and_then(|()| self.lookup_inode(p, name))
        {
            Ok((_, attr)) => Ok(attr),
            Err(e) => {
                let flags = if FileKind::from_mode(mode) == FileKind::Dir {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                if rustix::fs::unlinkat(&p.fd, name, flags).is_ok() {
                    backing::unlinked(&p.fd, name);
                }
                Err(e)
            }
        }
    }

    /// Create a directory.
    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, who: Caller) -> FsResult<Attr> {
        Self::check_new_name(parent, name)?;
        let p = self.inodes.get(parent)?;
        rustix::fs::mkdirat(&p.fd, name, Mode::from_raw_mode(mode & 0o7777))?;
        backing::created(&p.fd, name);
        self.finish_create(&p, name, who, libc::S_IFDIR | (mode & 0o7777))
    }

    /// Create a symbolic link.
    pub fn symlink(&self, parent: u64, name: &OsStr, target: &Path, who: Caller) -> FsResult<Attr> {
        Self::check_new_name(parent, name)?;
        let p = self.inodes.get(parent)?;
        rustix::fs::symlinkat(target, &p.fd, name)?;
        backing::created(&p.fd, name);
        self.finish_create(&p, name, who, libc::S_IFLNK | 0o777)
    }

    /// Read a symbolic link.
    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let inode = self.inodes.get(ino)?;
        Ok(rustix::fs::readlinkat(&inode.fd, "", Vec::new())?.into_bytes())
    }

    /// Remove a non-directory.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        if Self::is_reserved(parent, name) {
            return Err(FsError::Os(Errno::NOENT));
        }
        let p = self.inodes.get(parent)?;
        rustix::fs::unlinkat(&p.fd, name, AtFlags::empty())?;
        backing::unlinked(&p.fd, name);
        Ok(())
    }

    /// Remove an empty directory.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        if Self::is_reserved(parent, name) {
            return Err(FsError::Os(Errno::NOENT));
        }
        let p = self.inodes.get(parent)?;
        rustix::fs::unlinkat(&p.fd, name, AtFlags::REMOVEDIR)?;
        backing::unlinked(&p.fd, name);
        Ok(())
    }

    /// Rename, with RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT flags.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        if Self::is_reserved(parent, name) {
            return Err(FsError::Os(Errno::NOENT));
        }
        Self::check_new_name(newparent, newname)?;
        let known = RenameFlags::NOREPLACE | RenameFlags::EXCHANGE | RenameFlags::WHITEOUT;
        let Some(flags) = RenameFlags::from_bits(flags).filter(|f| known.contains(*f)) else {
            return Err(FsError::Invalid);
        };
        let p = self.inodes.get(parent)?;
        let np = self.inodes.get(newparent)?;
        self.moving();
        let r = rustix::fs::renameat_with(&p.fd, name, &np.fd, newname, flags);
        self.moving();
        r?;
        backing::renamed(&p.fd, name, &np.fd, newname, flags.bits());
        Ok(())
    }

    /// Make a hard link to `ino` (the header travels with the content).
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Attr> {
        Self::check_new_name(newparent, newname)?;
        let inode = self.inodes.get(ino)?;
        let np = self.inodes.get(newparent)?;
        self.moving();
        let r = rustix::fs::linkat(&inode.fd, "", &np.fd, newname, AtFlags::EMPTY_PATH);
        self.moving();
        r?;
        backing::created(&np.fd, newname);
        Ok(self.lookup_inode(&np, newname)?.1)
    }

    // ---- files ----

    fn open_backing(&self, inode: &Inode, flags: i32) -> FsResult<(File, Option<File>)> {
        let path = proc_path(&inode.fd);
        let keep = OFlags::from_bits_truncate((flags & (libc::O_SYNC | libc::O_DSYNC)) as u32);
        let base = OFlags::CLOEXEC | keep;
        // Read-write even for write-only opens: partial sectors are read, modified, written.
        let file = match rustix::fs::open(&path, base | OFlags::RDWR, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ACCESS | Errno::ROFS | Errno::PERM | Errno::TXTBSY)
                if flags & libc::O_ACCMODE == libc::O_RDONLY =>
            {
                rustix::fs::open(&path, base | OFlags::RDONLY, Mode::empty())?
            }
            Err(e) => return Err(e.into()),
        };
        // O_DIRECT: a second descriptor for aligned requests; never EINVAL at open.
        let direct = if flags & libc::O_DIRECT != 0 {
            let acc = if flags & libc::O_ACCMODE == libc::O_RDONLY {
                OFlags::RDONLY
            } else {
                OFlags::RDWR
            };
            rustix::fs::open(&path, base | acc | OFlags::DIRECT, Mode::empty())
                .ok()
                .map(File::from)
        } else {
            None
        };
        Ok((File::from(file), direct))
    }

    fn add_handle(&self, inode: Arc<Inode>, file: File, direct: Option<File>) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let old = self.files.write().insert(
            fh,
            Arc::new(Handle {
                wb_seen: inode.wb_err.sample(),
                inode,
                file,
                direct,
            }),
        );
        if old.is_none() {
            self.open_files.fetch_add(1, Ordering::Relaxed);
        }
        fh
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        self.files
            .read()
            .get(&fh)
            .cloned()
            .ok_or(FsError::Os(Errno::BADF))
    }

    /// Open a regular file; returns the handle number.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        let inode = self.inodes.get(ino)?;
        if inode.kind == FileKind::Dir {
            return Err(FsError::Os(Errno::ISDIR));
        }
        let (file, direct) = self.open_backing(&inode, flags)?;
        // Check the header now: a damaged file fails at open, with EIO. Once loaded,
        // an open takes no exclusive lock (unless it truncates).
        let truncate = flags & libc::O_TRUNC != 0;
        if inode.kind == FileKind::File
            && (truncate || !inode.content.read().is_loaded(self.keys.epoch()))
        {
            let bp = || self.backing_path(&inode);
            let io = self.content_io(&file, None, &bp);
            let mut c = inode.content.write();
            file::load(&mut c, &io)?;
            if truncate {
                file::truncate(&mut c, &io, 0)?;
            }
        }
        Ok(self.add_handle(inode, file, direct))
    }

    /// Create and open a regular file.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        who: Caller,
    ) -> FsResult<(Attr, u64)> {
        Self::check_new_name(parent, name)?;
        let p = self.inodes.get(parent)?;
        let perm = Mode::from_raw_mode(mode & 0o7777);
        let created = match rustix::fs::openat(
            &p.fd,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            perm,
        ) {
            Ok(fd) => {
                drop(fd);
                backing::created(&p.fd, name);
                true
            }
            Err(Errno::EXIST) if flags & libc::O_EXCL == 0 => false,
            Err(e) => return Err(e.into()),
        };
        let attr = if created {
            self.finish_create(&p, name, who, libc::S_IFREG | (mode & 0o7777))?
        } else {
            self.lookup_inode(&p, name)?.1
        };
        match self.open(attr.ino, flags) {
            Ok(fh) => Ok((self.getattr(attr.ino)?, fh)),
            Err(e) => {
                self.forget(attr.ino, 1);
                Err(e)
            }
        }
    }

    /// Read up to `size` bytes at `off`; `out` receives the plaintext.
    pub fn read(&self, fh: u64, off: u64, size: u32, out: impl FnOnce(&[u8])) -> FsResult<()> {
        let h = self.handle(fh)?;
        let bp = || self.backing_path(&h.inode);
        let io = self.content_io(&h.file, h.direct.as_ref(), &bp);
        let c = Self::shared_loaded(&h.inode, &io)?;
        file::read(&c, &io, off, size, out)
    }

    /// The content lock held shared, with the content loaded (taking the lock
    /// exclusively only for the first load).
    fn shared_loaded<'a>(
        inode: &'a Inode,
        io: &file::Io<'_>,
    ) -> FsResult<parking_lot::RwLockReadGuard<'a, Content>> {
        let c = inode.content.read();
        if c.is_loaded(io.epoch) {
            return Ok(c);
        }
        drop(c);
        let mut w = inode.content.write();
        file::load(&mut w, io)?;
        Ok(parking_lot::RwLockWriteGuard::downgrade(w))
    }

    /// Clear set-user-id, and set-group-id if group-executable, as a write, truncate or
    /// fallocate by an unprivileged caller must (FUSE_HANDLE_KILLPRIV_V2: the kernel
    /// leaves it to us). The inode keeps its mode bits, so a file without set-id bits
    /// (every database file) costs no system call here.
    fn kill_suidgid_of(inode: &Inode) -> FsResult<()> {
        let mut mode = inode.mode();
        let mut new = *mode & !libc::S_ISUID;
        if *mode & libc::S_IXGRP != 0 {
            new &= !libc::S_ISGID;
        }
        if new != *mode {
            rustix::fs::chmodat(
                rustix::fs::CWD,
                proc_path(&inode.fd),
                Mode::from_raw_mode(new),
                AtFlags::empty(),
            )?;
            *mode = new;
        }
        Ok(())
    }

    /// Write `data` at `off` after clearing set-id bits (the kernel flagged the write).
    pub fn write_killing_suidgid(&self, fh: u64, off: u64, data: &[u8]) -> FsResult<usize> {
        Self::kill_suidgid_of(&self.handle(fh)?.inode)?;
        self.write(fh, off, data)
    }

    /// Write `data` at `off`.
    pub fn write(&self, fh: u64, off: u64, data: &[u8]) -> FsResult<usize> {
        let h = self.handle(fh)?;
        let bp = || self.backing_path(&h.inode);
        let io = self.content_io(&h.file, h.direct.as_ref(), &bp);
        let mut c = h.inode.content.write();
        file::load(&mut c, &io)?;
        file::write(&mut c, &io, off, data)
    }

    /// fsync (or fdatasync) the backing file: exactly one backing call. Then, as a
    /// local filesystem's fsync, a writeback error this handle has not been told of
    /// (see [`EarFs::writeback_failed`]); an error of the sync itself comes first, and
    /// the handle counts as told either way (as ext4's fsync).
    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let h = self.handle(fh)?;
        let synced = backing::sync(&h.file, datasync);
        let earlier = h.inode.wb_err.check_and_advance(&h.wb_seen);
        synced?;
        earlier.map_or(Ok(()), |e| Err(FsError::Os(e)))
    }

    /// A close (FLUSH) of a descriptor of the handle: a writeback error the handle has
    /// not been told of. Nothing is buffered in the daemon, so nothing else to do.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        let h = self.handle(fh)?;
        match h.inode.wb_err.check_and_advance(&h.wb_seen) {
            Some(e) => Err(FsError::Os(e)),
            None => Ok(()),
        }
    }

    /// A write the kernel made from its page cache (FUSE writeback: no caller waits
    /// for it) failed with `errno`: keep it on the inode, for the next fsync or flush
    /// of each of its handles (src/fs/errseq.rs). The failed write itself changed
    /// nothing (`write` undoes what it did).
    pub fn writeback_failed(&self, ino: u64, errno: Errno) {
        if let Ok(inode) = self.inodes.get(ino) {
            inode.wb_err.set(errno);
        }
    }

    /// Close a handle.
    pub fn release(&self, fh: u64) {
        if self.files.write().remove(&fh).is_some() {
            self.open_files.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// fallocate after clearing set-id bits, as for a write by a caller who is not root.
    /// The kernel sends FUSE_FALLOCATE without a kill flag (with HANDLE_KILLPRIV_V2 it
    /// leaves clearing to us), so the adapter decides by the caller.
    pub fn fallocate_killing_suidgid(
        &self,
        fh: u64,
        off: u64,
        len: u64,
        mode: i32,
    ) -> FsResult<()> {
        Self::kill_suidgid_of(&self.handle(fh)?.inode)?;
        self.fallocate(fh, off, len, mode)
    }

    /// fallocate (0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE).
    pub fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32) -> FsResult<()> {
        let h = self.handle(fh)?;
        let bp = || self.backing_path(&h.inode);
        let io = self.content_io(&h.file, None, &bp);
        let mut c = h.inode.content.write();
        file::load(&mut c, &io)?;
        file::fallocate(&mut c, &io, off, len, mode)
    }

    /// lseek SEEK_DATA / SEEK_HOLE (others are the kernel's).
    pub fn lseek(&self, fh: u64, off: i64, whence: i32) -> FsResult<i64> {
        let h = self.handle(fh)?;
        let off = u64::try_from(off).map_err(|_| FsError::Os(Errno::NXIO))?;
        let data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(FsError::Invalid),
        };
        let bp = || self.backing_path(&h.inode);
        let io = self.content_io(&h.file, None, &bp);
        let c = Self::shared_loaded(&h.inode, &io)?;
        let r = file::seek_data_hole(&c, &io, off, data)?;
        i64::try_from(r).map_err(|_| FsError::Invalid)
    }

    // ---- directories ----

    /// Open a directory.
    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let inode = self.inodes.get(ino)?;
        let d = DirHandle::open(inode)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if self.dirs.write().insert(fh, Arc::new(d)).is_none() {
            self.open_dirs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(fh)
    }

    fn dir(&self, fh: u64) -> FsResult<Arc<DirHandle>> {
        self.dirs
            .read()
            .get(&fh)
            .cloned()
            .ok_or(FsError::Os(Errno::BADF))
    }

    /// Entries of an open directory from `offset`; each entry's `offset` resumes after it.
    pub fn readdir(&self, fh: u64, offset: u64) -> FsResult<Vec<DirEntry>> {
        let d = self.dir(fh)?;
        let root = d.inode.id == ROOT_ID;
        let entries = d.entries(offset, |dev, ino| self.inodes.id_for((dev, ino)))?;
        Ok(entries
            .into_iter()
            .filter(|e| !(root && Self::is_reserved(ROOT_ID, &e.name)))
            .collect())
    }

    /// Close a directory.
    pub fn releasedir(&self, fh: u64) {
        if self.dirs.write().remove(&fh).is_some() {
            self.open_dirs.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// What the daemon holds for the kernel: inodes, open files, open directories
    /// (counters kept beside the tables: no lock taken).
    pub fn held(&self) -> Held {
        Held {
            inodes: self.inodes.held(),
            open_files: self.open_files.load(Ordering::Relaxed),
            open_dirs: self.open_dirs.load(Ordering::Relaxed),
        }
    }

    /// fsync a directory.
    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let d = self.dir(fh)?;
        d.sync(datasync)
    }

    /// Filesystem statistics of the backing filesystem.
    pub fn statfs(&self) -> FsResult<StatFs> {
        let root = self.inodes.get(ROOT_ID)?;
        let dir = rustix::fs::openat(
            &root.fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let s = rustix::fs::fstatvfs(dir.as_fd())?;
        Ok(StatFs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: s.f_namemax as u32,
            frsize: s.f_frsize as u32,
        })
    }

    // ---- extended attributes: user.* only, stored as-is (not encrypted) ----

    fn xattr_allowed(name: &OsStr) -> bool {
        name.as_bytes().starts_with(b"user.")
    }

    /// Get an xattr; `size == 0` asks for the length.
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> FsResult<Vec<u8>> {
        if !Self::xattr_allowed(name) {
            return Err(FsError::NoAttr);
        }
        let inode = self.inodes.get(ino)?;
        let path = proc_path(&inode.fd);
        let mut buf = vec![0u8; if size == 0 { 65536 } else { size as usize }];
        let n = match rustix::fs::getxattr(&path, name, &mut buf[..]) {
            Ok(n) => n,
            Err(Errno::NODATA) => return Err(FsError::NoAttr),
            Err(Errno::RANGE) => return Err(FsError::Range),
            Err(e) => return Err(e.into()),
        };
        buf.truncate(n);
        Ok(buf)
    }

    /// Set an xattr (`flags`: XATTR_CREATE / XATTR_REPLACE).
    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> FsResult<()> {
        if !Self::xattr_allowed(name) {
            return Err(FsError::NotSupported);
        }
        let inode = self.inodes.get(ino)?;
        let f = rustix::fs::XattrFlags::from_bits(flags as u32).ok_or(FsError::Invalid)?;
        Ok(rustix::fs::setxattr(proc_path(&inode.fd), name, value, f)?)
    }

    /// List xattr names (user.* only), NUL-separated.
    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let inode = self.inodes.get(ino)?;
        let path = proc_path(&inode.fd);
        let mut buf = vec![0u8; 65536];
        let n = match rustix::fs::listxattr(&path, &mut buf[..]) {
            Ok(n) => n,
            Err(Errno::OPNOTSUPP | Errno::PERM) => 0,
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for name in buf[..n]
            .split(|&b| b == 0)
            .filter(|s| s.starts_with(b"user."))
        {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    /// Remove an xattr.
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        if !Self::xattr_allowed(name) {
            return Err(FsError::NoAttr);
        }
        let inode = self.inodes.get(ino)?;
        match rustix::fs::removexattr(proc_path(&inode.fd), name) {
            Ok(()) => Ok(()),
            Err(Errno::NODATA) => Err(FsError::NoAttr),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Dek;

    fn keyring(dek: &Dek) -> Keyring {
        Keyring::new([(1, Dek::from_slice(dek.expose()).unwrap())], 1).unwrap()
    }

    const ROOT: Caller = Caller { uid: 0, gid: 0 };

    /// A volume in a temporary directory, writing `format`, with a new file `f` (mode
    /// `mode`) open read-write: (directory, fs, the file's attributes, its handle).
    fn volume_with_file(format: FileFormat, mode: u32) -> (tempfile::TempDir, EarFs, Attr, u64) {
        let d = tempfile::tempdir().unwrap();
        let fs = EarFs::new(d.path(), keyring(&Dek::generate().unwrap()), format).unwrap();
        let (attr, fh) = fs
            .create(ROOT_ID, OsStr::new("f"), mode, libc::O_RDWR, ROOT)
            .unwrap();
        (d, fs, attr, fh)
    }

    fn perm_in_backing(d: &Path, name: &str) -> u32 {
        rustix::fs::stat(d.join(name)).unwrap().st_mode & 0o7777
    }

    #[test]
    fn fallocate_by_others_than_root_clears_set_id_bits() {
        for mode in [0, libc::FALLOC_FL_KEEP_SIZE, PUNCH] {
            // (mode before, after a fallocate by someone not root)
            for (before, after) in [(0o6775, 0o775), (0o6745, 0o2745), (0o4700, 0o700)] {
                let name = format!("{before:o} fallocate mode {mode}");
                let (d, fs, attr, fh) = volume_with_file(FileFormat::V2, 0o600);
                fs.write(fh, 0, &[1u8; 5000]).unwrap();
                let set = SetAttr {
                    mode: Some(before),
                    ..SetAttr::default()
                };
                assert_eq!(fs.setattr(attr.ino, None, set).unwrap().perm, before as u16);
                // Root keeps them.
                fs.fallocate(fh, 100, 4000, mode).unwrap();
                assert_eq!(fs.getattr(attr.ino).unwrap().perm, before as u16);
                fs.fallocate_killing_suidgid(fh, 100, 4000, mode).unwrap();
                assert_eq!(fs.getattr(attr.ino).unwrap().perm, after as u16, "{name}");
                assert_eq!(perm_in_backing(d.path(), "f"), after, "{name} backing");
            }
        }
    }

    const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

    #[test]
    fn the_kept_mode_follows_chmod_chown_and_lookup() {
        let (d, fs, attr, fh) = volume_with_file(FileFormat::V2, 0o644);
        let chmod = |m: u32| {
            let set = SetAttr {
                mode: Some(m),
                ..SetAttr::default()
            };
            fs.setattr(attr.ino, None, set).unwrap();
        };
        let perm = || perm_in_backing(d.path(), "f");
        // No set-id bits: nothing to clear.
        fs.write_killing_suidgid(fh, 0, b"a").unwrap();
        assert_eq!(perm(), 0o644);
        // chmod: the next unprivileged write sees the new bits, every time.
        for _ in 0..2 {
            chmod(0o4755);
            fs.write_killing_suidgid(fh, 0, b"b").unwrap();
            assert_eq!(perm(), 0o755);
        }
        // A chown clears set-user-id in the backing filesystem; the kept mode follows,
        // so a later clearing does not put back what it learnt before the chown.
        chmod(0o6745);
        let set = SetAttr {
            uid: Some(65534),
            ..SetAttr::default()
        };
        assert_eq!(fs.setattr(attr.ino, None, set).unwrap().perm, 0o2745);
        chmod(0o6775);
        fs.setattr(attr.ino, None, set).unwrap();
        assert_eq!(perm(), 0o775);
        rustix::fs::chmod(d.path().join("f"), Mode::from_raw_mode(0o4775)).unwrap();
        fs.write_killing_suidgid(fh, 0, b"c").unwrap();
        assert_eq!(
            perm(),
            0o4775,
            "no lookup yet: the kept mode is the old one"
        );
        // A lookup (of a known inode) reads the mode again.
        fs.lookup(ROOT_ID, OsStr::new("f")).unwrap();
        fs.write_killing_suidgid(fh, 0, b"d").unwrap();
        assert_eq!(perm(), 0o775);
        rustix::fs::chmod(d.path().join("f"), Mode::from_raw_mode(0o4775)).unwrap();
        fs.getattr(attr.ino).unwrap();
        fs.fallocate_killing_suidgid(fh, 0, 10, 0).unwrap();
        assert_eq!(perm(), 0o775, "getattr reads the mode again");
    }

    #[test]
    fn a_key_lock_wipes_the_plaintext_buffers_of_worker_threads() {
        let (_d, fs, _, fh) = volume_with_file(FileFormat::V2, 0o600);
        let rows = b"account 42 balance 1000000;".repeat(300);
        let (used, wiped) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        std::thread::scope(|s| {
            s.spawn(|| {
                fs.write(fh, 0, &rows).unwrap();
                let mut got = Vec::new();
                fs.read(fh, 0, rows.len() as u32, |d| got.extend_from_slice(d))
                    .unwrap();
                assert!(got == rows);
                assert!(!file::scratch_is_zero(), "the read left no plaintext");
                used.wait();
                wiped.wait();
                assert!(file::scratch_is_zero(), "plaintext survived the key lock");
            });
            used.wait();
            fs.lock_keys();
            wiped.wait();
        });
    }

    #[test]
    fn getattr_during_writes_and_truncates_never_reports_a_size_in_between() {
        for format in FileFormat::ALL {
            let (_d, fs, attr, fh) = volume_with_file(format, 0o600);
            const A: u64 = 100;
            fs.write(fh, 0, &[1u8; A as usize]).unwrap();
            // Each step takes the file from one of these sizes to another, through
            // backing lengths in between (in v1 a write past a short last sector first
            // re-encrypts that sector at full length).
            let steps: [(u64, u64); 3] = [(8192, 100), (4000, 50), (12, 3)];
            let sizes: Vec<u64> = std::iter::once(A)
                .chain(steps.iter().map(|&(off, len)| off + len))
                .collect();
            let done = AtomicBool::new(false);
            let seen = std::thread::scope(|s| {
                let reader = s.spawn(|| {
                    let mut seen = 0u64;
                    while !done.load(Ordering::Relaxed) {
                        let size = fs.getattr(attr.ino).unwrap().size;
                        assert!(sizes.contains(&size), "{format:?}: getattr saw {size}");
                        seen += 1;
                    }
                    seen
                });
                for i in 0..3000 {
                    let (off, len) = steps[i % steps.len()];
                    fs.write(fh, off, &vec![2u8; len as usize]).unwrap();
                    let set = SetAttr {
                        size: Some(A),
                        ..SetAttr::default()
                    };
                    fs.setattr(attr.ino, Some(fh), set).unwrap();
                }
                done.store(true, Ordering::Relaxed);
                reader.join().unwrap()
            });
            assert!(seen > 0);
        }
    }

    #[test]
    fn replacing_the_keys_during_reads_and_writes_fails_no_request() {
        // A rotate or reload installs a new keyring while requests are loading a file's
        // cipher: they must load again under the new keys, not fail with EIO (only a
        // lock, which wipes the keys, fails them). Several requesters against one
        // swapper, so that on any number of CPUs swaps land inside loads.
        let d = tempfile::tempdir().unwrap();
        let dek = Dek::generate().unwrap();
        let v2 = Dek::generate().unwrap();
        let fs = EarFs::new(d.path(), keyring(&dek), FileFormat::V2).unwrap();
        let rows = b"committed rows ".repeat(1000);
        let files: Vec<(u64, u64)> = (0..4)
            .map(|i| {
                let name = format!("f{i}");
                let (attr, fh) = fs
                    .create(ROOT_ID, OsStr::new(&name), 0o600, libc::O_RDWR, ROOT)
                    .unwrap();
                fs.write(fh, 0, &rows).unwrap();
                (attr.ino, fh)
            })
            .collect();
        let rotated = || {
            Keyring::new(
                [
                    (1, Dek::from_slice(dek.expose()).unwrap()),
                    (2, Dek::from_slice(v2.expose()).unwrap()),
                ],
                2,
            )
            .unwrap()
        };
        let done = AtomicBool::new(false);
        let until = std::time::Instant::now() + Duration::from_secs(2);
        let (swaps, requests, failures) = std::thread::scope(|s| {
            let swapper = s.spawn(|| {
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) {
                    fs.set_keys(if n.is_multiple_of(2) {
                        rotated()
                    } else {
                        keyring(&dek)
                    });
                    n += 1;
                }
                n
            });
            let requesters: Vec<_> = files
                .iter()
                .map(|&(ino, fh)| {
                    let (fs, rows) = (&fs, &rows);
                    s.spawn(move || {
                        let (mut requests, mut failures) = (0u64, Vec::new());
                        while std::time::Instant::now() < until {
                            let mut got = Vec::new();
                            // Small requests: most of their time is the load that races.
                            match fs.read(fh, 0, 100, |b| got.extend_from_slice(b)) {
                                Ok(()) => {
                                    assert!(got == rows[..100], "a read returned other bytes")
                                }
                                Err(e) => failures.push(format!("read: {e}")),
                            }
                            match fs.open(ino, libc::O_RDONLY) {
                                Ok(h) => fs.release(h),
                                Err(e) => failures.push(format!("open: {e}")),
                            }
                            if let Err(e) = fs.write(fh, 0, &rows[..100]) {
                                failures.push(format!("write: {e}"));
                            }
                            requests += 3;
                        }
                        (requests, failures)
                    })
                })
                .collect();
            let (mut requests, mut failures) = (0, Vec::new());
            for r in requesters {
                let (n, f) = r.join().unwrap();
                requests += n;
                failures.extend(f);
            }
            done.store(true, Ordering::Relaxed);
            (swapper.join().unwrap(), requests, failures)
        });
        eprintln!(
            "{swaps} swaps, {requests} requests, {} failed",
            failures.len()
        );
        assert!(
            failures.is_empty(),
            "{} of {requests} requests failed while the keys were replaced {swaps} times, first: {}",
            failures.len(),
            failures[0]
        );
        assert!(
            swaps > 100 && requests > 100,
            "{swaps} swaps, {requests} requests"
        );
        // A lock still fails them.
        fs.lock_keys();
        assert!(matches!(
            fs.read(files[0].1, 0, 10, |_| ()),
            Err(FsError::KeysLocked)
        ));
    }

    #[test]
    fn locked_keys_fail_file_io_and_unlocking_restores_it() {
        let d = tempfile::tempdir().unwrap();
        let dek = Dek::generate().unwrap();
        let fs = EarFs::new(d.path(), keyring(&dek), FileFormat::V2).unwrap();
        let who = Caller { uid: 0, gid: 0 };
        let (attr, fh) = fs
            .create(ROOT_ID, OsStr::new("f"), 0o600, libc::O_RDWR, who)
            .unwrap();
        assert_eq!(fs.write(fh, 0, b"committed rows").unwrap(), 14);
        let read = |fh| {
            let mut got = Vec::new();
            fs.read(fh, 0, 100, |d| got.extend_from_slice(d))
                .map(|()| got)
        };
        assert_eq!(read(fh).unwrap(), b"committed rows");
        fs.lock_keys();
        assert!(fs.keys_locked());
        assert!(fs.key_versions().is_none());
        // Open handles and new opens alike: reads and writes fail, the file is unchanged.
        assert!(matches!(read(fh), Err(FsError::KeysLocked)));
        assert!(matches!(fs.write(fh, 0, b"x"), Err(FsError::KeysLocked)));
        assert!(matches!(
            fs.open(attr.ino, libc::O_RDONLY),
            Err(FsError::KeysLocked)
        ));
        // Metadata still answers.
        assert_eq!(fs.getattr(attr.ino).unwrap().size, 14);
        fs.set_keys(keyring(&dek));
        assert_eq!(read(fh).unwrap(), b"committed rows");
        assert_eq!(fs.key_versions(), Some((vec![1], 1)));
        // The same current version again: not a change of it.
        assert_eq!(fs.current_key_changed(), None);
        let fh2 = fs.open(attr.ino, libc::O_RDONLY).unwrap();
        assert_eq!(read(fh2).unwrap(), b"committed rows");
    }
}
