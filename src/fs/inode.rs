//! The inode table: kernel node ids ↔ backing objects held by O_PATH descriptors.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use crate::content::FileFormat;

use parking_lot::{Mutex, MutexGuard, RwLock};
use rustix::io::Errno;

use super::error::{FsError, FsResult};
use super::errseq::ErrSeq;
use super::file::Content;

/// Node id of the root directory (FUSE_ROOT_ID).
pub const ROOT_ID: u64 = 1;
/// Node id used for a backing object whose inode number is 1 but is not the root.
const INO_ONE_ALIAS: u64 = u64::MAX - 1;

/// The type of a backing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    /// From the S_IFMT bits of a mode.
    pub fn from_mode(mode: u32) -> FileKind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            _ => FileKind::File,
        }
    }
}

/// A backing object known to the kernel.
#[derive(Debug)]
pub struct Inode {
    pub id: u64,
    /// Backing (st_dev, st_ino).
    pub key: (u64, u64),
    /// O_PATH descriptor of the backing object; follows it across renames.
    pub fd: OwnedFd,
    pub kind: FileKind,
    /// The file's cipher and plaintext size. Readers share; writes, truncates and
    /// fallocate hold it exclusively (the content lock of DESIGN.md's data path).
    pub content: RwLock<Content>,
    /// The file's format number once read from its header (0: not yet), for the size
    /// of a file that is not loaded.
    format_hint: AtomicU8,
    /// The permission bits (`0o7777`, set-id bits included) as the backing object has
    /// them, so that a write by an unprivileged caller learns whether it must clear
    /// set-id bits without a stat. Every mode change of ours holds this lock from the
    /// change to the update; a stat that refreshes it is taken under it too.
    mode: Mutex<u32>,
    /// Failed writebacks, reported at the next fsync or flush of each handle.
    pub wb_err: ErrSeq,
}

impl Inode {
    /// The format read from the header earlier, if any.
    pub fn format_hint(&self) -> Option<FileFormat> {
        FileFormat::from_number(u64::from(self.format_hint.load(Ordering::Relaxed)))
    }
    /// Keep the format read from the header.
    pub fn set_format_hint(&self, f: FileFormat) {
        self.format_hint.store(f.number() as u8, Ordering::Relaxed);
    }
    /// The permission bits, and the lock to hold while changing them.
    pub fn mode(&self) -> MutexGuard<'_, u32> {
        self.mode.lock()
    }
}

/// Node id → inode and its kernel lookup count. The node id is derived from the
/// backing key (`id_for`), so no reverse map is needed.
pub struct InodeTable {
    /// Protects the map and the counts; never held across I/O.
    by_id: Mutex<HashMap<u64, (Arc<Inode>, u64)>>,
    root_key: (u64, u64),
    /// How many inodes the map holds, for the metrics without taking its lock.
    held: AtomicUsize,
    /// How many inodes may be held ([`inode_cap`]); read again when reached, so that a
    /// limit raised while the daemon runs counts.
    cap: AtomicUsize,
}

/// How many inodes the daemon may hold: its descriptor limit (RLIMIT_NOFILE, soft) less
/// a reserve, so that when the kernel knows that many, the descriptors the daemon
/// needs besides keep working: opening files the kernel already knows, the control
/// socket (`earfs status`), metrics scrapes, KMS connections, the log.
pub fn inode_cap() -> usize {
    match rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
        None => usize::MAX,
        Some(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            n.saturating_sub((n / 16).clamp(32, 4096))
        }
    }
}

impl InodeTable {
    /// A table holding the root (its permission bits are `mode`).
    pub fn new(root_fd: OwnedFd, root_key: (u64, u64), mode: u32) -> Self {
        let root = Arc::new(Inode {
            id: ROOT_ID,
            key: root_key,
            fd: root_fd,
            kind: FileKind::Dir,
            content: RwLock::new(Content::default()),
            format_hint: AtomicU8::new(0),
            mode: Mutex::new(mode & 0o7777),
            wb_err: ErrSeq::default(),
        });
        let mut by_id = HashMap::new();
        by_id.insert(ROOT_ID, (root, 1));
        InodeTable {
            by_id: Mutex::new(by_id),
            root_key,
            held: AtomicUsize::new(1),
            cap: AtomicUsize::new(inode_cap()),
        }
    }

    /// The node id a backing object is known by: its inode number, the root as 1.
    pub fn id_for(&self, key: (u64, u64)) -> u64 {
        if key == self.root_key {
            ROOT_ID
        } else if key.1 == ROOT_ID {
            INO_ONE_ALIAS
        } else {
            key.1
        }
    }

    /// Every inode held (a snapshot; the table lock is released before it is used).
    pub fn all(&self) -> Vec<Arc<Inode>> {
        self.by_id.lock().values().map(|(i, _)| i.clone()).collect()
    }

    pub fn get(&self, id: u64) -> FsResult<Arc<Inode>> {
        self.by_id
            .lock()
            .get(&id)
            .map(|(i, _)| i.clone())
            .ok_or(FsError::Stale)
    }

    /// Register a lookup of the backing object `key` (opened as `fd`, with mode `mode`
    /// as stat gave it): reuse the known inode or insert a new one, and count one kernel
    /// reference. Returns whether the inode is new (a known one may have changed mode
    /// since `mode` was taken; the caller refreshes it). A new inode past [`inode_cap`]
    /// fails with EMFILE (the caller sees ENFILE): `fd` is closed, and lookups succeed
    /// again once the kernel forgets inodes.
    pub fn remember(
        &self,
        key: (u64, u64),
        fd: OwnedFd,
        kind: FileKind,
        mode: u32,
    ) -> FsResult<(Arc<Inode>, bool)> {
        let id = self.id_for(key);
        let mut t = self.by_id.lock();
        if let Some((inode, count)) = t.get_mut(&id) {
            if inode.key != key {
                return Err(FsError::CrossDevice);
            }
            *count += 1;
            return Ok((inode.clone(), false));
        }
        if t.len() >= self.cap.load(Ordering::Relaxed) {
            let cap = inode_cap();
            self.cap.store(cap, Ordering::Relaxed);
            if t.len() >= cap {
                return Err(FsError::Os(Errno::MFILE));
            }
        }
        let inode = Arc::new(Inode {
            id,
            key,
            fd,
            kind,
            content: RwLock::new(Content::default()),
            format_hint: AtomicU8::new(0),
            mode: Mutex::new(mode & 0o7777),
            wb_err: ErrSeq::default(),
        });
        t.insert(id, (inode.clone(), 1));
        self.held.fetch_add(1, Ordering::Relaxed);
        Ok((inode, true))
    }

    /// Drop `n` kernel references; forget the inode at zero (never the root).
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut t = self.by_id.lock();
        let gone = match t.get_mut(&id) {
            Some((_, count)) => {
                *count = count.saturating_sub(n);
                *count == 0
            }
            None => false,
        };
        if gone && t.remove(&id).is_some() {
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// How many inodes the kernel holds (each keeps an O_PATH descriptor open).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}
