//! Open directories: a snapshot of the entries, taken at open and at rewind.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;

use parking_lot::Mutex;
use rustix::fs::{Dir, Mode, OFlags};

use super::error::FsResult;
use super::inode::{FileKind, Inode};

/// One directory entry as readdir returns it.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    /// Offset of the next entry (what the kernel passes back to continue).
    pub offset: u64,
    pub kind: FileKind,
    pub name: OsString,
}

struct Raw {
    dev_ino: u64,
    kind: FileKind,
    name: OsString,
}

/// An open directory.
pub struct DirHandle {
    pub inode: Arc<Inode>,
    fd: OwnedFd,
    /// The snapshot of entries; refreshed when reading from offset 0.
    snapshot: Mutex<Vec<Raw>>,
}

fn kind_of(t: rustix::fs::FileType) -> FileKind {
    use rustix::fs::FileType as T;
    match t {
        T::Directory => FileKind::Dir,
        T::Symlink => FileKind::Symlink,
        T::Fifo => FileKind::Fifo,
        T::Socket => FileKind::Socket,
        T::CharacterDevice => FileKind::CharDevice,
        T::BlockDevice => FileKind::BlockDevice,
        _ => FileKind::File,
    }
}

impl DirHandle {
    pub fn open(inode: Arc<Inode>) -> FsResult<DirHandle> {
        let fd = rustix::fs::openat(
            &inode.fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let d = DirHandle {
            inode,
            fd,
            snapshot: Mutex::new(Vec::new()),
        };
        *d.snapshot.lock() = d.read_all()?;
        Ok(d)
    }

    fn read_all(&self) -> FsResult<Vec<Raw>> {
        let mut dir = Dir::read_from(&self.fd)?;
        dir.rewind();
        let mut out = Vec::new();
        while let Some(e) = dir.read() {
            let e = e?;
            out.push(Raw {
                dev_ino: e.ino(),
                kind: kind_of(e.file_type()),
                name: OsString::from_vec(e.file_name().to_bytes().to_vec()),
            });
        }
        Ok(out)
    }

    /// Entries from `offset`, with node ids mapped by `id_for(dev, ino)`.
    pub fn entries(
        &self,
        offset: u64,
        id_for: impl Fn(u64, u64) -> u64,
    ) -> FsResult<Vec<DirEntry>> {
        let mut snap = self.snapshot.lock();
        if offset == 0 {
            *snap = self.read_all()?;
        }
        let dev = self.inode.key.0;
        Ok(snap
            .iter()
            .enumerate()
            .skip(offset as usize)
            .map(|(i, r)| DirEntry {
                ino: id_for(dev, r.dev_ino),
                offset: i as u64 + 1,
                kind: r.kind,
                name: r.name.clone(),
            })
            .collect())
    }

    pub fn sync(&self, datasync: bool) -> FsResult<()> {
        if datasync {
            rustix::fs::fdatasync(&self.fd)?;
        } else {
            rustix::fs::fsync(&self.fd)?;
        }
        super::backing::synced_dir(&self.fd);
        Ok(())
    }
}
