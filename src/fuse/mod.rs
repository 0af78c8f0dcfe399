//! The only importer of fuser: a thin adapter from kernel requests to `crate::fs`.
//! Every error is mapped to an errno in one exhaustive match ([`errno`]) and replied
//! in one place (`fail`).

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::stats::{Op, stats, timed};
use crate::fs::{Attr, Caller, EarFs, FileKind, FsError, SetAttr, SetTime};

mod mount;

pub use fuser::{Session, SessionUnmounter};
pub use mount::{FSTYPE, MountConfig, kernel_flags, mount};

/// How long the kernel may cache attributes and names. The mount is exclusive (all
/// changes go through it, and the kernel drops what its own operations change), so the
/// cache stays right however long it lasts; the backing directory is not to be changed
/// behind the mount. One second (libfuse's default) made every `stat` or `open` of a
/// file not touched in the last second a LOOKUP round trip. A minute keeps a
/// database's working set cached and bounds how long a change made behind the mount by
/// mistake stays unseen.
const TTL: Duration = Duration::from_secs(60);
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
    fs: Arc<EarFs>,
    opts: AdapterOptions,
}

impl EarFuse {
    pub fn new(fs: Arc<EarFs>, opts: AdapterOptions) -> Self {
        EarFuse { fs, opts }
    }
}

/// The errno for each error: one exhaustive match.
pub fn errno(e: &FsError) -> Errno {
    let code = match e {
        // The daemon's own descriptor limit, not the caller's: ENFILE (a limit outside
        // the calling process), so that nobody looks for the caller's own open files.
        FsError::Os(e) if e.raw_os_error() == libc::EMFILE => libc::ENFILE,
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
fn fail(reply: impl Fail, op: Op, ino: u64, e: FsError) {
    let code = errno(&e);
    stats().error(op, code.code());
    if code.code() == libc::ENFILE {
        out_of_descriptors();
    }
    let op = op.name();
    match &e {
        // KeysLocked: the lock itself is logged once, loudly, by the daemon.
        FsError::Os(_)
        | FsError::NoAttr
        | FsError::NoData
        | FsError::Reserved
        | FsError::KeysLocked => {
            log::debug!(ino = ino, errno = code.code(); "op={op} ino={ino} errno={} {e}", code.code())
        }
        // ino and errno also as key-values: the journal's INODE= and ERRNO= fields.
        _ => {
            log::warn!(ino = ino, errno = code.code(); "op={op} ino={ino} errno={} {e}", code.code())
        }
    }
    reply.fail(code);
}

/// Seconds between two warnings that the daemon is out of descriptors.
const DESCRIPTOR_WARNING_EVERY: u64 = 60;

/// Warn that the daemon is out of descriptors: at the first failure, then at most once
/// a minute with the count of failures since (the errno counter of the metrics counts
/// every one).
fn out_of_descriptors() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    static SINCE: AtomicU64 = AtomicU64::new(0);
    let since = SINCE.fetch_add(1, Ordering::Relaxed) + 1;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs().max(1));
    let last = LAST.load(Ordering::Relaxed);
    if last != 0 && now < last + DESCRIPTOR_WARNING_EVERY
        || LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    SINCE.fetch_sub(since, Ordering::Relaxed);
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let show = |v: Option<u64>| v.map_or("unlimited".to_string(), |n| n.to_string());
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    log::warn!(
        "out of file descriptors: {open} open, RLIMIT_NOFILE {} (hard {}); every inode the kernel holds keeps one, every open file one or two. Lookups, creates and opens fail with ENFILE ({since} since the last warning) until the kernel forgets inodes. Raise the limit: LimitNOFILE= in the unit (systemctl edit earfs@NAME; earfs@.service sets 1048576), or `ulimit -n` before `earfs mount`",
        show(lim.current),
        show(lim.maximum)
    );
}

fn answer_empty(reply: ReplyEmpty, op: Op, ino: u64, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => fail(reply, op, ino, e),
    }
}

fn answer_entry(reply: ReplyEntry, op: Op, ino: u64, r: Result<Attr, FsError>) {
    match r {
        Ok(a) => reply.entry(&TTL, &fattr(&a), GEN),
        Err(e) => fail(reply, op, ino, e),
    }
}

fn answer_attr(reply: ReplyAttr, op: Op, ino: u64, r: Result<Attr, FsError>) {
    match r {
        Ok(a) => reply.attr(&TTL, &fattr(&a)),
        Err(e) => fail(reply, op, ino, e),
    }
}

/// xattr replies: the size when asked for it, the bytes if they fit, else ERANGE.
fn answer_xattr(reply: ReplyXattr, op: Op, ino: u64, size: u32, r: Result<Vec<u8>, FsError>) {
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
        let _t = timed(Op::Lookup);
        answer_entry(reply, Op::Lookup, parent.0, self.fs.lookup(parent.0, name))
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _t = timed(Op::Forget);
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _t = timed(Op::Getattr);
        answer_attr(reply, Op::Getattr, ino.0, self.fs.getattr(ino.0))
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
        let _t = timed(Op::Setattr);
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
            Op::Setattr,
            ino.0,
            self.fs.setattr(ino.0, fh.map(|f| f.0), set),
        )
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _t = timed(Op::Readlink);
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => fail(reply, Op::Readlink, ino.0, e),
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
        let _t = timed(Op::Mknod);
        answer_entry(
            reply,
            Op::Mknod,
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
        let _t = timed(Op::Mkdir);
        answer_entry(
            reply,
            Op::Mkdir,
            parent.0,
            self.fs.mkdir(parent.0, name, mode, caller(req)),
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = timed(Op::Unlink);
        answer_empty(reply, Op::Unlink, parent.0, self.fs.unlink(parent.0, name))
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = timed(Op::Rmdir);
        answer_empty(reply, Op::Rmdir, parent.0, self.fs.rmdir(parent.0, name))
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _t = timed(Op::Symlink);
        answer_entry(
            reply,
            Op::Symlink,
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
        let _t = timed(Op::Rename);
        match self
            .fs
            .rename(parent.0, name, newparent.0, newname, flags.bits())
        {
            Ok(()) => reply.ok(),
            Err(e) => fail(reply, Op::Rename, parent.0, e),
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
        let _t = timed(Op::Link);
        answer_entry(
            reply,
            Op::Link,
            ino.0,
            self.fs.link(ino.0, newparent.0, newname),
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _t = timed(Op::Open);
        match self.fs.open(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => fail(reply, Op::Open, ino.0, e),
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
        let _t = timed(Op::Read);
        let mut reply = Some(reply);
        let r = self.fs.read(fh.0, offset, size, |d| {
            if let Some(r) = reply.take() {
                r.data(d)
            }
        });
        if let (Err(e), Some(r)) = (r, reply.take()) {
            fail(r, Op::Read, ino.0, e);
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
        let _t = timed(Op::Write);
        let r = if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            self.fs.write_killing_suidgid(fh.0, offset, data)
        } else {
            self.fs.write(fh.0, offset, data)
        };
        match r {
            Ok(n) => reply.written(n as u32),
            // A writeback from the kernel's page cache: no caller waits for this reply,
            // and the kernel would report an error only to the first close, not to each
            // descriptor. The daemon keeps it instead and reports it, errno kept, at the
            // next fsync and close of every descriptor (EarFs::writeback_failed).
            Err(e) if write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) => {
                let code = errno(&e);
                stats().error(Op::Write, code.code());
                log::warn!(
                    ino = ino.0, errno = code.code();
                    "writeback of {} bytes at {offset} of ino {} failed: {e}; reported at the next fsync or close of each open descriptor",
                    data.len(), ino.0
                );
                self.fs
                    .writeback_failed(ino.0, rustix::io::Errno::from_raw_os_error(code.code()));
                reply.written(data.len() as u32)
            }
            Err(e) => fail(reply, Op::Write, ino.0, e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _t = timed(Op::Flush);
        // Nothing is buffered in the daemon; a close reports a failed writeback.
        answer_empty(reply, Op::Flush, ino.0, self.fs.flush(fh.0))
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
        let _t = timed(Op::Release);
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
        let _t = timed(Op::Fsync);
        answer_empty(reply, Op::Fsync, ino.0, self.fs.fsync(fh.0, datasync))
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _t = timed(Op::Opendir);
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => fail(reply, Op::Opendir, ino.0, e),
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
        let _t = timed(Op::Readdir);
        match self.fs.readdir(fh.0, offset) {
            Ok(entries) => {
                for e in entries {
                    if reply.add(INodeNo(e.ino), e.offset, file_type(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => fail(reply, Op::Readdir, ino.0, e),
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
        let _t = timed(Op::Readdirplus);
        let entries = match self.fs.readdir(fh.0, offset) {
            Ok(e) => e,
            Err(e) => return fail(reply, Op::Readdirplus, ino.0, e),
        };
        let dir_attr = match self.fs.getattr(ino.0) {
            Ok(a) => a,
            Err(e) => return fail(reply, Op::Readdirplus, ino.0, e),
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
        let _t = timed(Op::Releasedir);
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
        let _t = timed(Op::Fsyncdir);
        answer_empty(reply, Op::Fsyncdir, ino.0, self.fs.fsyncdir(fh.0, datasync))
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let _t = timed(Op::Statfs);
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => fail(reply, Op::Statfs, ino.0, e),
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
        let _t = timed(Op::Setxattr);
        answer_empty(
            reply,
            Op::Setxattr,
            ino.0,
            self.fs.setxattr(ino.0, name, value, flags),
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _t = timed(Op::Getxattr);
        answer_xattr(
            reply,
            Op::Getxattr,
            ino.0,
            size,
            self.fs.getxattr(ino.0, name, size),
        )
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _t = timed(Op::Listxattr);
        answer_xattr(reply, Op::Listxattr, ino.0, size, self.fs.listxattr(ino.0))
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _t = timed(Op::Removexattr);
        answer_empty(
            reply,
            Op::Removexattr,
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
        let _t = timed(Op::Create);
        match self.fs.create(parent.0, name, mode, flags, caller(req)) {
            Ok((a, fh)) => reply.created(
                &TTL,
                &fattr(&a),
                GEN,
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => fail(reply, Op::Create, parent.0, e),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _t = timed(Op::Fallocate);
        // The kernel sends no kill flag with fallocate: anyone but root (CAP_FSETID, as
        // for truncate above) clears set-id bits, as fallocate on a local filesystem does.
        let r = if req.uid() != 0 {
            self.fs
                .fallocate_killing_suidgid(fh.0, offset, length, mode)
        } else {
            self.fs.fallocate(fh.0, offset, length, mode)
        };
        answer_empty(reply, Op::Fallocate, ino.0, r)
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
        let _t = timed(Op::Lseek);
        match self.fs.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => fail(reply, Op::Lseek, ino.0, e),
        }
    }
}

/// Drops the kernel's cached file data (FUSE_NOTIFY_INVAL_INODE), so that reads reach
/// the daemon again: used when the data keys are locked, so that cached plaintext is
/// not served either.
pub struct CacheInvalidator(fuser::Notifier);

impl CacheInvalidator {
    /// The invalidator of a session (take it before the session runs).
    pub fn of(session: &Session<EarFuse>) -> Self {
        CacheInvalidator(session.notifier())
    }

    /// Invalidate the cached data of these inodes; returns how many failed (an inode
    /// the kernel no longer knows fails harmlessly).
    pub fn invalidate(&self, inodes: &[u64]) -> usize {
        inodes
            .iter()
            .filter(|ino| self.0.inval_inode(INodeNo(**ino), 0, -1).is_err())
            .count()
    }
}
