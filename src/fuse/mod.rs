//! The only importer of fuser: a thin adapter from kernel requests to `crate::fs`.
//! Every error is mapped to an errno in one exhaustive match ([`errno`]) and replied
//! in one place ([`fail`]).

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};

use crate::fs::{Attr, Caller, EarFs, FileKind, FsError, SetAttr, SetTime};

pub use fuser::{Session, SessionUnmounter};

/// How long the kernel may cache attributes and names. The mount is exclusive (all
/// changes go through it), so the cache stays right.
const TTL: Duration = Duration::from_secs(1);
/// Largest write the kernel sends in one request.
const MAX_WRITE: u32 = 1 << 20;

/// Mount-time choices of the adapter.
#[derive(Debug, Clone)]
pub struct AdapterOptions {
    /// Negotiate FUSE_WRITEBACK_CACHE (the kernel batches page-sized writes).
    pub writeback_cache: bool,
}

/// The fuser filesystem: an `EarFs` and the adapter's options.
pub struct EarFuse {
    fs: EarFs,
    opts: AdapterOptions,
}

impl EarFuse {
    pub fn new(fs: EarFs, opts: AdapterOptions) -> Self {
        EarFuse { fs, opts }
    }
}

/// The errno for each error: one exhaustive match.
pub fn errno(e: &FsError) -> Errno {
    let code = match e {
        FsError::Os(e) => e.raw_os_error(),
        FsError::Corrupt { .. } | FsError::KeysLocked => libc::EIO,
        FsError::Reserved => libc::EPERM,
        FsError::Stale => libc::ESTALE,
        FsError::NotSupported => libc::EOPNOTSUPP,
        FsError::Invalid => libc::EINVAL,
        FsError::NoData => libc::ENXIO,
        FsError::NoAttr => libc::ENODATA,
        FsError::Range => libc::ERANGE,
        FsError::CrossDevice => libc::EXDEV,
        FsError::NoMemory => libc::ENOMEM,
    };
    Errno::from_i32(code)
}

/// Replies that can carry an error.
trait Fail {
    fn fail(self, e: Errno);
}

macro_rules! impl_fail {
    ($($t:ty),*) => {$(impl Fail for $t { fn fail(self, e: Errno) { self.error(e) } })*};
}
impl_fail!(
    ReplyAttr,
    ReplyCreate,
    ReplyData,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyEmpty,
    ReplyEntry,
    ReplyLseek,
    ReplyOpen,
    ReplyStatfs,
    ReplyWrite,
    ReplyXattr
);

/// Reply an error: the one place errors reach the kernel.
fn fail(reply: impl Fail, op: &str, ino: u64, e: FsError) {
    let code = errno(&e);
    match &e {
        // KeysLocked: the lock itself is logged once, loudly, by the daemon.
        FsError::Os(_)
        | FsError::NoAttr
        | FsError::NoData
        | FsError::Reserved
        | FsError::KeysLocked => {
            log::debug!("op={op} ino={ino} errno={} {e}", code.code())
        }
        _ => log::warn!("op={op} ino={ino} errno={} {e}", code.code()),
    }
    reply.fail(code);
}

fn answer_empty(reply: ReplyEmpty, op: &str, ino: u64, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => fail(reply, op, ino, e),
    }
}

fn answer_entry(reply: ReplyEntry, op: &str, ino: u64, r: Result<Attr, FsError>) {
    match r {
        Ok(a) => reply.entry(&TTL, &fattr(&a), GEN),
        Err(e) => fail(reply, op, ino, e),
    }
}

fn answer_attr(reply: ReplyAttr, op: &str, ino: u64, r: Result<Attr, FsError>) {
    match r {
        Ok(a) => reply.attr(&TTL, &fattr(&a)),
        Err(e) => fail(reply, op, ino, e),
    }
}

/// xattr replies: the size when asked for it, the bytes if they fit, else ERANGE.
fn answer_xattr(reply: ReplyXattr, op: &str, ino: u64, size: u32, r: Result<Vec<u8>, FsError>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => fail(reply, op, ino, FsError::Range),
        Ok(v) => reply.data(&v),
        Err(e) => fail(reply, op, ino, e),
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

const GEN: Generation = Generation(0);

impl Filesystem for EarFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // HANDLE_KILLPRIV_V2: we clear set-id bits on write and truncate ourselves, and
        // the kernel in turn stops asking for security.capability before every write
        // (it sets SB_NOSEC), which saves a round trip per write.
        let mut want = InitFlags::FUSE_HANDLE_KILLPRIV_V2
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO;
        if self.opts.writeback_cache {
            want |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        if let Err(missing) = config.add_capabilities(want) {
            if missing.contains(InitFlags::FUSE_WRITEBACK_CACHE) {
                return Err(io::Error::other(
                    "the kernel does not offer the FUSE writeback cache",
                ));
            }
            log::info!("kernel lacks FUSE capabilities {missing:?}; continuing without them");
            let _ = config.add_capabilities(want - missing);
        }
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        let _ = config.set_time_granularity(Duration::from_nanos(1));
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        answer_entry(reply, "lookup", parent.0, self.fs.lookup(parent.0, name))
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        answer_attr(reply, "getattr", ino.0, self.fs.getattr(ino.0))
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
            // The kernel's FATTR_KILL_SUIDGID is not passed on by fuser: a truncate by
            // anyone but root clears set-id bits, as the kernel would ask.
            kill_suidgid: req.uid() != 0,
        };
        answer_attr(
            reply,
            "setattr",
            ino.0,
            self.fs.setattr(ino.0, fh.map(|f| f.0), set),
        )
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => fail(reply, "readlink", ino.0, e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        answer_entry(
            reply,
            "mknod",
            parent.0,
            self.fs.mknod(parent.0, name, mode, rdev, caller(req)),
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        answer_entry(
            reply,
            "mkdir",
            parent.0,
            self.fs.mkdir(parent.0, name, mode, caller(req)),
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer_empty(reply, "unlink", parent.0, self.fs.unlink(parent.0, name))
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer_empty(reply, "rmdir", parent.0, self.fs.rmdir(parent.0, name))
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        answer_entry(
            reply,
            "symlink",
            parent.0,
            self.fs.symlink(parent.0, link_name, target, caller(req)),
        )
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self
            .fs
            .rename(parent.0, name, newparent.0, newname, flags.bits())
        {
            Ok(()) => reply.ok(),
            Err(e) => fail(reply, "rename", parent.0, e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        answer_entry(
            reply,
            "link",
            ino.0,
            self.fs.link(ino.0, newparent.0, newname),
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.open(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => fail(reply, "open", ino.0, e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut reply = Some(reply);
        let r = self.fs.read(fh.0, offset, size, |d| {
            if let Some(r) = reply.take() {
                r.data(d)
            }
        });
        if let (Err(e), Some(r)) = (r, reply.take()) {
            fail(r, "read", ino.0, e);
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            self.fs.write_killing_suidgid(fh.0, offset, data)
        } else {
            self.fs.write(fh.0, offset, data)
        };
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => fail(reply, "write", ino.0, e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is buffered in the daemon: every write reached the backing file.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        answer_empty(reply, "fsync", ino.0, self.fs.fsync(fh.0, datasync))
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => fail(reply, "opendir", ino.0, e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.fs.readdir(fh.0, offset) {
            Ok(entries) => {
                for e in entries {
                    if reply.add(INodeNo(e.ino), e.offset, file_type(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => fail(reply, "readdir", ino.0, e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match self.fs.readdir(fh.0, offset) {
            Ok(e) => e,
            Err(e) => return fail(reply, "readdirplus", ino.0, e),
        };
        let dir_attr = match self.fs.getattr(ino.0) {
            Ok(a) => a,
            Err(e) => return fail(reply, "readdirplus", ino.0, e),
        };
        for e in entries {
            let dots = e.name == "." || e.name == "..";
            let attr = if dots {
                // The kernel takes no reference for dot entries.
                Attr {
                    ino: e.ino,
                    ..dir_attr
                }
            } else {
                match self.fs.lookup(ino.0, &e.name) {
                    Ok(a) => a,
                    Err(_) => continue, // removed since the snapshot
                }
            };
            if reply.add(
                INodeNo(attr.ino),
                e.offset,
                &e.name,
                &TTL,
                &fattr(&attr),
                GEN,
            ) {
                if !dots {
                    self.fs.forget(attr.ino, 1);
                }
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        answer_empty(reply, "fsyncdir", ino.0, self.fs.fsyncdir(fh.0, datasync))
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => fail(reply, "statfs", ino.0, e),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        answer_empty(
            reply,
            "setxattr",
            ino.0,
            self.fs.setxattr(ino.0, name, value, flags),
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        answer_xattr(
            reply,
            "getxattr",
            ino.0,
            size,
            self.fs.getxattr(ino.0, name, size),
        )
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        answer_xattr(reply, "listxattr", ino.0, size, self.fs.listxattr(ino.0))
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        answer_empty(
            reply,
            "removexattr",
            ino.0,
            self.fs.removexattr(ino.0, name),
        )
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.fs.create(parent.0, name, mode, flags, caller(req)) {
            Ok((a, fh)) => reply.created(
                &TTL,
                &fattr(&a),
                GEN,
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => fail(reply, "create", parent.0, e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        answer_empty(
            reply,
            "fallocate",
            ino.0,
            self.fs.fallocate(fh.0, offset, length, mode),
        )
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.fs.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => fail(reply, "lseek", ino.0, e),
        }
    }
}

/// What a mount needs beyond the filesystem.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub fsname: String,
    pub allow_other: bool,
    pub threads: usize,
    /// Extra `-o` options, passed to the kernel as given.
    pub options: Vec<String>,
}

/// Mount `fs` at `mountpoint`: returns once the kernel handshake is done.
pub fn mount(fs: EarFuse, mountpoint: &Path, cfg: &MountConfig) -> io::Result<Session<EarFuse>> {
    let mut opts = vec![
        MountOption::FSName(cfg.fsname.clone()),
        MountOption::Subtype("earfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
    ];
    for o in &cfg.options {
        opts.push(match o.as_str() {
            "ro" => MountOption::RO,
            "rw" => MountOption::RW,
            "noatime" => MountOption::NoAtime,
            "atime" => MountOption::Atime,
            "nosuid" => MountOption::NoSuid,
            "suid" => MountOption::Suid,
            "noexec" => MountOption::NoExec,
            "exec" => MountOption::Exec,
            "dirsync" => MountOption::DirSync,
            "sync" => MountOption::Sync,
            "async" => MountOption::Async,
            "dev" => MountOption::Dev,
            "nodev" => MountOption::NoDev,
            other => MountOption::CUSTOM(other.to_string()),
        });
    }
    if opts.contains(&MountOption::Dev) {
        opts.retain(|o| *o != MountOption::NoDev);
    }
    let mut config = Config::default();
    config.mount_options = opts;
    config.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(cfg.threads.max(1));
    config.clone_fd = true;
    Session::new(fs, mountpoint, &config)
}
