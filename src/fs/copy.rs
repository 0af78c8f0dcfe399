//! One backing file's plaintext outside a mount, for the data commands (`adopt`,
//! `reencrypt`, `decrypt`, `cat`, `fsck`). They read and write backing files through
//! the same content code as the mount (`fs::file`), so a file they write is byte
//! for byte a file the mount would write: the volume's format, the current key version,
//! a fresh nonce, holes kept as holes.

use std::fs::File;
use std::path::{Path, PathBuf};

use rustix::fs::SeekFrom;
use rustix::io::Errno;

use crate::content::{FileFormat, Keyring};

use super::backing;
use super::error::{FsError, FsResult};
use super::file::{self, Content, Io, VolumeKeys};

/// How much plaintext one read or write of a copy moves.
pub const CHUNK: usize = 1 << 20;

/// A zeroed buffer for copying a file of `size` bytes in chunks: [`CHUNK`] bytes, or
/// fewer for a smaller file. Most files of a database tree are small, and zeroing (and
/// later wiping) a whole chunk for each cost a tenth of `reencrypt`'s CPU time.
pub fn chunk_buf(size: u64) -> Vec<u8> {
    vec![0u8; size.clamp(1, CHUNK as u64) as usize]
}

/// A volume's keys and write format, for files opened outside a mount.
pub struct Keys {
    keys: VolumeKeys,
    format: FileFormat,
}

impl Keys {
    pub fn new(keyring: Keyring, format: FileFormat) -> Keys {
        Keys {
            keys: VolumeKeys::new(keyring),
            format,
        }
    }

    /// The format new files are written in.
    pub fn format(&self) -> FileFormat {
        self.format
    }

    /// The key version new files are written under.
    pub fn current_version(&self) -> u32 {
        self.keys.versions().map(|(_, c)| c).unwrap_or(0)
    }

    /// Open the backing file `file` (read-write for a writer; `path` names it in
    /// messages): its header is read and checked now. A damaged file fails with
    /// [`FsError::Corrupt`].
    pub fn open(&self, file: File, path: &Path) -> FsResult<Plain<'_>> {
        let mut p = Plain {
            keys: self,
            file,
            path: path.to_path_buf(),
            content: Content::default(),
        };
        let name = || p.path.clone();
        let io = io(self, &p.file, &name);
        file::load(&mut p.content, &io)?;
        Ok(p)
    }
}

fn io<'a>(keys: &'a Keys, file: &'a File, path: &'a dyn Fn() -> PathBuf) -> Io<'a> {
    Io {
        file,
        direct: None,
        keys: &keys.keys,
        epoch: keys.keys.epoch(),
        format: keys.format,
        path,
    }
}

/// One backing file opened through [`Keys::open`].
pub struct Plain<'k> {
    keys: &'k Keys,
    file: File,
    path: PathBuf,
    content: Content,
}

impl Plain<'_> {
    /// The plaintext size.
    pub fn size(&self) -> u64 {
        self.content.size()
    }

    /// The format and key version of the file's header (`None`: no header: an empty
    /// file, or one whose header never reached the disk).
    pub fn header(&self) -> Option<(FileFormat, u32)> {
        self.content.cipher_names()
    }

    /// Whether the file is in the volume's write format under the current key (a file
    /// without a header is: it gets both at its first write).
    pub fn is_current(&self) -> bool {
        match self.header() {
            None => true,
            Some((f, v)) => f == self.keys.format && v == self.keys.current_version(),
        }
    }

    /// Read plaintext at `off` into `buf` (at most [`CHUNK`] bytes at a time); returns
    /// the bytes read, 0 at the end.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> FsResult<usize> {
        let name = || self.path.clone();
        let io = io(self.keys, &self.file, &name);
        let want = buf.len().min(CHUNK) as u32;
        let mut got = 0;
        file::read(&self.content, &io, off, want, |b| {
            buf[..b.len()].copy_from_slice(b);
            got = b.len();
        })?;
        Ok(got)
    }

    /// The next plaintext range at or after `off` that holds data: `(start, end)`, or
    /// `None` when only a hole is left.
    pub fn next_data(&self, off: u64) -> FsResult<Option<(u64, u64)>> {
        let name = || self.path.clone();
        let io = io(self.keys, &self.file, &name);
        let start = match file::seek_data_hole(&self.content, &io, off, true) {
            Ok(s) => s,
            Err(FsError::NoData) => return Ok(None),
            Err(e) => return Err(e),
        };
        let end = match file::seek_data_hole(&self.content, &io, start, false) {
            Ok(e) => e,
            Err(FsError::NoData) => self.size(),
            Err(e) => return Err(e),
        };
        Ok(Some((start, end)))
    }

    /// Write all of `data` at `off` (the first write gives the file its header).
    pub fn write_at(&mut self, off: u64, data: &[u8]) -> FsResult<()> {
        let name = || self.path.clone();
        let io = io(self.keys, &self.file, &name);
        let mut done = 0;
        while done < data.len() {
            let end = data.len().min(done + CHUNK);
            let n = file::write(&mut self.content, &io, off + done as u64, &data[done..end])?;
            if n == 0 {
                return Err(FsError::Os(Errno::IO));
            }
            done += n;
        }
        Ok(())
    }

    /// Set the plaintext size (growing leaves a hole).
    pub fn set_size(&mut self, size: u64) -> FsResult<()> {
        if size == self.size() {
            return Ok(());
        }
        let name = || self.path.clone();
        let io = io(self.keys, &self.file, &name);
        file::truncate(&mut self.content, &io, size)
    }

    /// fsync the backing file.
    pub fn sync(&self) -> FsResult<()> {
        Ok(backing::sync(&self.file, false)?)
    }

    /// The backing file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// The data ranges of a plaintext file (SEEK_DATA/SEEK_HOLE), in order; a filesystem
/// that does not know holes gives the whole file.
pub fn plain_data_ranges(f: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let start = match rustix::fs::seek(f, SeekFrom::Data(off)) {
            Ok(s) => s,
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL | Errno::OPNOTSUPP) if off == 0 => {
                out.push((0, size));
                break;
            }
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match rustix::fs::seek(f, SeekFrom::Hole(start)) {
            Ok(e) => e.min(size),
            Err(Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        out.push((start, end));
        off = end;
    }
    Ok(out)
}
