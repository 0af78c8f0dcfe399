//! Which data key versions the running filesystem still holds files of, for
//! `earfs retire-key`. A census of the backing directory sees files by their names;
//! a file unlinked while open has none left (the backing file is unlinked at once, and
//! the daemon keeps it through its descriptors), so only the daemon can count it.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::backing::pread_full;
use super::{EarFs, FileKind, proc_path};
use crate::content::header_names;

/// The files the daemon holds, by the key version their header names: one per inode,
/// however many handles are open on it. Files without a header yet (empty, or a header
/// that never reached the disk) take the current version at their first write and are
/// not counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenKeyUse {
    /// Open files that still have a name in the backing directory (a census sees them
    /// too).
    pub named: BTreeMap<u32, u64>,
    /// Files whose every name was removed while they were open (or while the kernel
    /// still holds them): no census can see them, but they may still be read.
    pub unlinked: BTreeMap<u32, u64>,
    /// Open files whose header could not be read: their version is unknown.
    pub unreadable: u64,
    /// The count of renames and links so far (see [`EarFs::moves`]).
    pub moves: u64,
}

impl OpenKeyUse {
    /// (named, unlinked) files under `version`.
    pub fn of(&self, version: u32) -> (u64, u64) {
        let n = |m: &BTreeMap<u32, u64>| m.get(&version).copied().unwrap_or(0);
        (n(&self.named), n(&self.unlinked))
    }

    fn add(&mut self, file: &File) {
        let read = || -> Result<Option<(u32, bool)>, String> {
            let st = rustix::fs::fstat(file).map_err(|e| e.to_string())?;
            if st.st_size == 0 {
                return Ok(None);
            }
            let mut h = [0u8; 16];
            let n = pread_full(file, &mut h, 0).map_err(|e| e.to_string())?;
            Ok(header_names(&h[..n])
                .ok()
                .map(|(_, kv)| (kv, st.st_nlink == 0)))
        };
        match read() {
            Ok(Some((kv, unlinked))) => {
                let m = if unlinked {
                    &mut self.unlinked
                } else {
                    &mut self.named
                };
                *m.entry(kv).or_default() += 1;
            }
            Ok(None) => {}
            Err(e) => {
                log::warn!("key versions of open files: a header cannot be read: {e}");
                self.unreadable += 1;
            }
        }
    }
}

impl EarFs {
    /// How many renames and links the mount has made (each counts twice: before and
    /// after its system call). A census that started with one value and ends with the
    /// same one saw no file move from a directory it had not read yet into one it had.
    pub fn moves(&self) -> u64 {
        self.moves.load(Ordering::SeqCst)
    }

    pub(super) fn moving(&self) {
        self.moves.fetch_add(1, Ordering::SeqCst);
    }

    /// The key versions of every file the daemon holds open, and of the files the
    /// kernel still holds after their last name was removed. Reads 16 header bytes per
    /// file; takes the handle table's lock only to copy it.
    pub fn open_key_use(&self) -> OpenKeyUse {
        let mut out = OpenKeyUse {
            moves: self.moves(),
            ..OpenKeyUse::default()
        };
        let handles: Vec<_> = self.files.read().values().cloned().collect();
        let mut seen = HashSet::new();
        for h in &handles {
            if seen.insert(h.inode.id) {
                out.add(&h.file);
            }
        }
        // An inode the kernel holds without an open handle can be opened again (through
        // /proc/PID/fd of a process that has it open elsewhere, say): count those whose
        // last name is gone, since no census can see them.
        for inode in self.inodes.all() {
            if inode.kind != FileKind::File || seen.contains(&inode.id) {
                continue;
            }
            if !matches!(rustix::fs::fstat(&inode.fd), Ok(st) if st.st_nlink == 0) {
                continue;
            }
            match File::open(proc_path(&inode.fd)) {
                Ok(f) => out.add(&f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    log::warn!("key versions of open files: inode {}: {e}", inode.id);
                    out.unreadable += 1;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;
    use crate::content::{FileFormat, Keyring};
    use crate::crypto::Dek;
    use crate::fs::{Caller, ROOT_ID};

    const ROOT: Caller = Caller { uid: 0, gid: 0 };

    #[test]
    fn open_files_are_counted_by_key_version_once_per_inode_unlinked_ones_apart() {
        let d = tempfile::tempdir().unwrap();
        let (k1, k2) = (Dek::generate().unwrap(), Dek::generate().unwrap());
        let ring = |current| {
            Keyring::new(
                [
                    (1, Dek::from_slice(k1.expose()).unwrap()),
                    (2, Dek::from_slice(k2.expose()).unwrap()),
                ],
                current,
            )
            .unwrap()
        };
        let fs = EarFs::new(d.path(), ring(1), FileFormat::V2).unwrap();
        let (f, fh) = fs
            .create(ROOT_ID, OsStr::new("f"), 0o600, libc::O_RDWR, ROOT)
            .unwrap();
        fs.write(fh, 0, b"version 1").unwrap();
        fs.set_keys(ring(2));
        let (_, gh) = fs
            .create(ROOT_ID, OsStr::new("g"), 0o600, libc::O_RDWR, ROOT)
            .unwrap();
        fs.write(gh, 0, b"version 2").unwrap();
        // Empty: no header, no version.
        let (_, eh) = fs
            .create(ROOT_ID, OsStr::new("e"), 0o600, libc::O_RDWR, ROOT)
            .unwrap();
        // A second handle on f: still one file.
        let fh2 = fs.open(f.ino, libc::O_RDONLY).unwrap();
        let u = fs.open_key_use();
        assert_eq!(u.named, BTreeMap::from([(1, 1), (2, 1)]), "{u:?}");
        assert!(u.unlinked.is_empty(), "{u:?}");
        assert_eq!((u.of(1), u.unreadable), ((1, 0), 0));

        // Renames and links are counted.
        let m = fs.moves();
        fs.rename(ROOT_ID, OsStr::new("g"), ROOT_ID, OsStr::new("g2"), 0)
            .unwrap();
        assert_eq!(fs.moves(), m + 2);
        assert!(fs.link(f.ino, ROOT_ID, OsStr::new("f")).is_err());
        assert_eq!(fs.moves(), m + 4);

        // Unlinked while open: counted apart, as long as a handle or the kernel's
        // reference holds it.
        fs.unlink(ROOT_ID, OsStr::new("f")).unwrap();
        let u = fs.open_key_use();
        assert_eq!(u.of(1), (0, 1), "{u:?}");
        assert_eq!(u.of(2), (1, 0), "{u:?}");
        fs.release(fh);
        fs.release(fh2);
        assert_eq!(fs.open_key_use().of(1), (0, 1));
        fs.forget(f.ino, 1);
        let u = fs.open_key_use();
        assert_eq!(u.of(1), (0, 0), "{u:?}");
        assert_eq!(u.named, BTreeMap::from([(2, 1)]), "{u:?}");
        fs.release(gh);
        fs.release(eh);
    }
}
