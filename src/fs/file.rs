//! File content over a backing file: read, write (with read-modify-write of partial
//! sectors), truncate, fallocate and SEEK_DATA/SEEK_HOLE, in format v1.
//!
//! Every function here runs under the inode's content lock (`Inode::content`): shared
//! for reads and seeks, exclusive for anything that changes bytes or size.

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::Errno;

use crate::content::{
    FileCipher, HEADER_LEN, Keyring, MIN_HOLE_LEN, SECTOR, SectorNo, SectorSpan,
    backing_size_to_plain_size, decode_header, is_hole, new_header, plain_off_to_sector,
    plain_size_to_backing_size, sector_len,
};
use crate::sys::AlignedBuf;

use super::error::{FsError, FsResult};
use super::stats::stats;

/// The loaded state of a regular file. Valid while the volume is mounted, since all
/// changes to the backing file go through this module.
#[derive(Debug, Default)]
pub struct Content {
    loaded: bool,
    /// The key epoch the cipher was loaded under; a different epoch means the keys
    /// were locked or replaced since, and the content must be loaded again.
    epoch: u64,
    /// The file's cipher; `None` while the backing file is empty (no header yet).
    cipher: Option<Arc<FileCipher>>,
    /// Plaintext size.
    size: u64,
    /// Set once a corruption has been logged, so that it is logged once per inode.
    corrupt_logged: bool,
}

impl Content {
    /// Whether the content is loaded under the keys of `epoch`.
    pub fn is_loaded(&self, epoch: u64) -> bool {
        self.loaded && self.epoch == epoch
    }
    /// Whether the plaintext size is known (it does not depend on the keys).
    pub fn size_known(&self) -> bool {
        self.loaded
    }
    /// Forget the cipher (the keys were locked): the next access loads again.
    pub fn unload(&mut self) {
        self.loaded = false;
        self.cipher = None;
    }
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// The volume's data keys: `None` while locked (CMK revoked), with an epoch bumped on
/// every change. A file's cipher is valid only for the epoch it was loaded under, so
/// the data path reads one atomic per operation and takes the lock only to load.
pub struct VolumeKeys {
    /// Taken only to load a file's cipher or to change the keys, never across I/O.
    keys: RwLock<(Option<Arc<Keyring>>, u64)>,
    /// The current epoch, readable without the lock.
    epoch: AtomicU64,
}

impl VolumeKeys {
    pub fn new(keys: Keyring) -> Self {
        VolumeKeys {
            keys: RwLock::new((Some(Arc::new(keys)), 1)),
            epoch: AtomicU64::new(1),
        }
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The keys and their epoch; `None` while locked.
    fn snapshot(&self) -> (Option<Arc<Keyring>>, u64) {
        self.keys.read().clone()
    }

    /// Install new keys (`None`: lock) and bump the epoch.
    pub fn set(&self, keys: Option<Keyring>) {
        let mut k = self.keys.write();
        k.0 = keys.map(Arc::new);
        k.1 += 1;
        self.epoch.store(k.1, Ordering::SeqCst);
    }

    /// The key versions held and the current one (None while locked).
    pub fn versions(&self) -> Option<(Vec<u32>, u32)> {
        self.keys
            .read()
            .0
            .as_ref()
            .map(|k| (k.versions(), k.current_version()))
    }
}

/// What the content functions need: the backing file(s), the keys and, for messages,
/// a way to name the backing path.
pub struct Io<'a> {
    pub file: &'a File,
    /// An O_DIRECT descriptor of the same file, for aligned requests.
    pub direct: Option<&'a File>,
    pub keys: &'a VolumeKeys,
    /// The key epoch when the operation started.
    pub epoch: u64,
    pub path: &'a dyn Fn() -> PathBuf,
}

thread_local! {
    static BUF: RefCell<AlignedBuf> = const { RefCell::new(AlignedBuf::new()) };
}

/// Run `f` on a page-aligned scratch buffer of `len` bytes (reused per thread).
fn with_buf<R>(len: usize, f: impl FnOnce(&mut [u8]) -> FsResult<R>) -> FsResult<R> {
    BUF.with(|cell| match cell.try_borrow_mut() {
        Ok(mut b) => {
            if !b.resize(len) {
                return Err(FsError::NoMemory);
            }
            f(b.as_mut_slice())
        }
        Err(_) => {
            let mut b = AlignedBuf::new();
            if !b.resize(len) {
                return Err(FsError::NoMemory);
            }
            f(b.as_mut_slice())
        }
    })
}

/// pread until `buf` is full or end of file; returns the bytes read.
fn pread_full(f: &File, buf: &mut [u8], off: u64) -> FsResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// pwrite all of `buf` or fail with the errno of the failing call.
fn pwrite_all(f: &File, buf: &[u8], off: u64) -> FsResult<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.write_at(&buf[done..], off + done as u64) {
            Ok(0) => return Err(FsError::Os(Errno::NOSPC)),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn corrupt(c: &mut Content, io: &Io<'_>, reason: String) -> FsError {
    let path = (io.path)();
    if !c.corrupt_logged {
        log::error!(
            "op=open path={} errno=EIO damaged file: {reason}",
            path.display()
        );
        c.corrupt_logged = true;
    }
    FsError::Corrupt { path, reason }
}

/// The keys and their epoch, or EIO while they are locked.
fn keys(io: &Io<'_>) -> FsResult<(Arc<Keyring>, u64)> {
    match io.keys.snapshot() {
        (Some(k), epoch) => Ok((k, epoch)),
        (None, _) => Err(FsError::KeysLocked),
    }
}

/// Load header and size from the backing file if not yet loaded under these keys.
pub fn load(c: &mut Content, io: &Io<'_>) -> FsResult<()> {
    if c.is_loaded(io.epoch) {
        return Ok(());
    }
    c.unload();
    let (keys, epoch) = keys(io)?;
    let st = rustix::fs::fstat(io.file)?;
    let backing = st.st_size as u64;
    let Some(size) = backing_size_to_plain_size(backing) else {
        return Err(corrupt(
            c,
            io,
            format!("backing file is {backing} bytes, shorter than the {HEADER_LEN}-byte header"),
        ));
    };
    if backing == 0 {
        c.cipher = None;
    } else {
        let mut h = [0u8; HEADER_LEN as usize];
        let n = pread_full(io.file, &mut h, 0)?;
        match decode_header(&keys, &h[..n]) {
            Ok(cipher) => c.cipher = Some(Arc::new(cipher)),
            Err(e) => return Err(corrupt(c, io, e.to_string())),
        }
    }
    // Keys locked or replaced while we loaded (checked under the content lock, which
    // the lock takes for every file after the epoch changed): keep no cipher of old keys.
    if io.keys.epoch() != epoch {
        c.unload();
        return Err(FsError::KeysLocked);
    }
    c.size = size;
    c.epoch = epoch;
    c.loaded = true;
    Ok(())
}

/// Give an empty backing file its header (a fresh nonce under the current key).
fn ensure_header(c: &mut Content, io: &Io<'_>) -> FsResult<Arc<FileCipher>> {
    if let Some(cipher) = &c.cipher {
        return Ok(cipher.clone());
    }
    let (h, cipher) = new_header(&keys(io)?.0).map_err(|e| FsError::Corrupt {
        path: (io.path)(),
        reason: e.to_string(),
    })?;
    if let Err(e) = pwrite_all(io.file, &h[..], 0) {
        // Leave the file empty, as it was.
        let _ = rustix::fs::ftruncate(io.file, 0);
        return Err(e);
    }
    let cipher = Arc::new(cipher);
    c.cipher = Some(cipher.clone());
    c.size = 0;
    Ok(cipher)
}

/// Read plaintext `[off, off + len)` (cropped at end of file) and hand it to `out`.
pub fn read(c: &Content, io: &Io<'_>, off: u64, len: u32, out: impl FnOnce(&[u8])) -> FsResult<()> {
    let size = c.size;
    let (Some(cipher), true) = (c.cipher.as_ref(), off < size) else {
        out(&[]);
        return Ok(());
    };
    let end = off.saturating_add(u64::from(len)).min(size);
    let Some(span) = SectorSpan::covering(off, end - off) else {
        out(&[]);
        return Ok(());
    };
    let span_len = (span.count() * SECTOR) as usize;
    let want = (span.end.plain_start().min(size) - span.plain_start()) as usize;
    with_buf(span_len, |buf| {
        let aligned = off.is_multiple_of(SECTOR) && u64::from(len) % SECTOR == 0;
        let n = match (io.direct, aligned) {
            (Some(d), true) => pread_full(d, buf, span.first.backing_offset())?,
            _ => pread_full(io.file, &mut buf[..want], span.first.backing_offset())?,
        };
        if n < want {
            return Err(FsError::Corrupt {
                path: (io.path)(),
                reason: format!("backing file ends {} bytes early", want - n),
            });
        }
        let buf = &mut buf[..want];
        cipher.decrypt(span.first, buf);
        stats().decrypted(buf.len());
        let from = (off - span.plain_start()) as usize;
        let to = (end - span.plain_start()) as usize;
        out(&buf[from..to]);
        Ok(())
    })
}

/// Read the `buf.len()` stored bytes of sector `s`; a short read means damage.
fn read_stored(io: &Io<'_>, s: SectorNo, buf: &mut [u8]) -> FsResult<()> {
    let n = pread_full(io.file, buf, s.backing_offset())?;
    if n < buf.len() {
        return Err(FsError::Corrupt {
            path: (io.path)(),
            reason: format!("sector {} is {} bytes short", s.0, buf.len() - n),
        });
    }
    Ok(())
}

/// Read and decrypt the `len` bytes of sector `s` into `out[..len]`.
fn read_sector(
    io: &Io<'_>,
    cipher: &FileCipher,
    s: SectorNo,
    len: usize,
    out: &mut [u8; SECTOR as usize],
) -> FsResult<()> {
    read_stored(io, s, &mut out[..len])?;
    cipher.decrypt(s, &mut out[..len]);
    stats().decrypted(len);
    Ok(())
}

/// Re-encrypt sector `s` for a size change from `old` to `new` bytes of file size:
/// bytes past the old end become zeros, bytes past the new end are dropped. A sector
/// that did not exist before (`old` ends before it) is written as encrypted zeros if it
/// is shorter than a hole may be. Returns (backing offset, old stored bytes) to undo it.
fn reencode_sector(
    io: &Io<'_>,
    cipher: &FileCipher,
    s: SectorNo,
    old: u64,
    new: u64,
) -> FsResult<Option<(u64, Vec<u8>)>> {
    let old_len = sector_len(s, old);
    let new_len = sector_len(s, new);
    if new_len == 0 || old_len == new_len {
        return Ok(None);
    }
    let mut sec = [0u8; SECTOR as usize];
    read_stored(io, s, &mut sec[..old_len])?;
    let raw = sec[..old_len].to_vec();
    // A missing or hole sector is zeros; at a length that may be a hole it stays one.
    let hole = old_len == 0 || is_hole(&raw);
    if hole {
        if new_len >= MIN_HOLE_LEN {
            return Ok(None);
        }
        sec[..old_len].fill(0);
    } else {
        cipher.decrypt(s, &mut sec[..old_len]);
        stats().decrypted(old_len);
    }
    if new_len > old_len {
        sec[old_len..new_len].fill(0);
    }
    cipher.encrypt(s, &mut sec[..new_len]);
    stats().encrypted(new_len);
    pwrite_all(io.file, &sec[..new_len], s.backing_offset())?;
    Ok(Some((s.backing_offset(), raw)))
}

/// After a size change from `old` to `new`, re-encrypt what the format needs: the old
/// last sector if it was short and changes length, and a new short last sector.
fn reencode_edges(
    io: &Io<'_>,
    cipher: &FileCipher,
    old: u64,
    new: u64,
) -> FsResult<Option<(u64, Vec<u8>)>> {
    if new < old {
        if new.is_multiple_of(SECTOR) {
            return Ok(None);
        }
        return reencode_sector(io, cipher, plain_off_to_sector(new), old, new);
    }
    let mut undo = None;
    if !old.is_multiple_of(SECTOR) {
        undo = reencode_sector(io, cipher, plain_off_to_sector(old), old, new)?;
    }
    let last = plain_off_to_sector(new - 1);
    if new > old && last.plain_start() >= old && sector_len(last, new) < MIN_HOLE_LEN {
        // A new short tail beyond the old end: write it as encrypted zeros.
        reencode_sector(io, cipher, last, old, new)?;
    }
    Ok(undo)
}

fn undo(io: &Io<'_>, tail: Option<(u64, Vec<u8>)>, backing_size: Option<u64>) {
    if let Some((off, raw)) = tail {
        let _ = pwrite_all(io.file, &raw, off);
    }
    if let Some(sz) = backing_size {
        let _ = rustix::fs::ftruncate(io.file, sz);
    }
}

/// Reserve backing space for `[from, to)` so that the write that follows cannot hit
/// ENOSPC halfway. Filesystems without fallocate are written without a reservation.
fn reserve(io: &Io<'_>, from: u64, to: u64) -> FsResult<()> {
    if to <= from {
        return Ok(());
    }
    match rustix::fs::fallocate(io.file, FallocateFlags::KEEP_SIZE, from, to - from) {
        Ok(()) => Ok(()),
        Err(Errno::OPNOTSUPP | Errno::NOSYS) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Write `data` at plaintext offset `off`. Returns the bytes written (all of them).
/// On failure the file is left as it was (size, bytes outside the write, and the tail).
pub fn write(c: &mut Content, io: &Io<'_>, off: u64, data: &[u8]) -> FsResult<usize> {
    let len = data.len() as u64;
    let Some(span) = SectorSpan::covering(off, len) else {
        return Ok(0);
    };
    let end = off.checked_add(len).ok_or(FsError::Os(Errno::FBIG))?;
    let had_header = c.cipher.is_some();
    let cipher = ensure_header(c, io)?;
    let old = c.size;
    let new_size = old.max(end);
    let old_backing = plain_size_to_backing_size(old);
    let buf_len = (span.end.plain_start().min(new_size) - span.plain_start()) as usize;
    let new_backing_end = span.first.backing_offset() + buf_len as u64;
    let grows = new_backing_end > old_backing;
    let rollback_size = if !had_header {
        Some(0)
    } else {
        grows.then_some(old_backing)
    };
    if grows
        && let Err(e) = reserve(
            io,
            old_backing.max(span.first.backing_offset()),
            new_backing_end,
        )
    {
        undo(io, None, rollback_size);
        if !had_header {
            c.cipher = None;
        }
        return Err(e);
    }
    // Growing past a short last sector: re-encrypt it at its new length first.
    let mut tail_undo = None;
    if end > old && !old.is_multiple_of(SECTOR) {
        let t = plain_off_to_sector(old);
        if t < span.first {
            match reencode_sector(io, &cipher, t, old, new_size) {
                Ok(u) => tail_undo = u,
                Err(e) => {
                    undo(io, None, rollback_size);
                    return Err(e);
                }
            }
        }
    }
    let res = with_buf(buf_len, |buf| {
        let data_start = (off - span.plain_start()) as usize;
        let data_end = data_start + data.len();
        buf[..data_start].fill(0);
        buf[data_end..].fill(0);
        let last = SectorNo(span.end.0 - 1);
        let edges = [Some(span.first), (last != span.first).then_some(last)];
        for s in edges.into_iter().flatten() {
            let new_len = sector_len(s, new_size) as u64;
            let covered = off <= s.plain_start() && end >= s.plain_start() + new_len;
            let old_len = sector_len(s, old);
            if covered || old_len == 0 {
                continue;
            }
            let mut sec = [0u8; SECTOR as usize];
            read_sector(io, &cipher, s, old_len, &mut sec)?;
            let at = (s.plain_start() - span.plain_start()) as usize;
            buf[at..at + old_len].copy_from_slice(&sec[..old_len]);
        }
        buf[data_start..data_end].copy_from_slice(data);
        cipher.encrypt(span.first, buf);
        stats().encrypted(buf.len());
        let direct_ok = off.is_multiple_of(SECTOR) && (buf_len as u64).is_multiple_of(SECTOR);
        match (io.direct, direct_ok) {
            (Some(d), true) => pwrite_all(d, buf, span.first.backing_offset()),
            _ => pwrite_all(io.file, buf, span.first.backing_offset()),
        }
    });
    if let Err(e) = res {
        undo(io, tail_undo, rollback_size);
        if !had_header {
            c.cipher = None;
        }
        return Err(e);
    }
    c.size = new_size;
    Ok(data.len())
}

/// Set the plaintext size to `new`, zero-extending or cutting.
pub fn truncate(c: &mut Content, io: &Io<'_>, new: u64) -> FsResult<()> {
    if new == 0 {
        // An empty file has no header; the next write starts it under a fresh nonce.
        rustix::fs::ftruncate(io.file, 0)?;
        c.cipher = None;
        c.size = 0;
        return Ok(());
    }
    let had_header = c.cipher.is_some();
    let cipher = ensure_header(c, io)?;
    let old = c.size;
    let tail = reencode_edges(io, &cipher, old, new)?;
    if let Err(e) = rustix::fs::ftruncate(io.file, plain_size_to_backing_size(new)) {
        undo(io, tail, (!had_header).then_some(0));
        if !had_header {
            c.cipher = None;
        }
        return Err(e.into());
    }
    c.size = new;
    Ok(())
}

const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;

/// fallocate with mode 0, KEEP_SIZE or PUNCH_HOLE|KEEP_SIZE on plaintext `[off, off+len)`.
pub fn fallocate(c: &mut Content, io: &Io<'_>, off: u64, len: u64, mode: i32) -> FsResult<()> {
    if mode & !(KEEP_SIZE | PUNCH_HOLE) != 0 {
        return Err(FsError::NotSupported);
    }
    if len == 0 {
        return Err(FsError::Invalid);
    }
    let end = off.checked_add(len).ok_or(FsError::Os(Errno::FBIG))?;
    if mode & PUNCH_HOLE != 0 {
        if mode & KEEP_SIZE == 0 {
            return Err(FsError::NotSupported);
        }
        return punch(c, io, off, end);
    }
    let boff = off + HEADER_LEN;
    if mode & KEEP_SIZE != 0 || end <= c.size {
        rustix::fs::fallocate(io.file, FallocateFlags::KEEP_SIZE, boff, len)?;
        return Ok(());
    }
    // Mode 0 past the end: reserve, re-encrypt a short tail, then set the new size.
    let had_header = c.cipher.is_some();
    let cipher = ensure_header(c, io)?;
    if let Err(e) = rustix::fs::fallocate(io.file, FallocateFlags::KEEP_SIZE, boff, len) {
        if !had_header {
            undo(io, None, Some(0));
            c.cipher = None;
        }
        return Err(e.into());
    }
    let old = c.size;
    let tail = reencode_edges(io, &cipher, old, end)?;
    if let Err(e) = rustix::fs::ftruncate(io.file, plain_size_to_backing_size(end)) {
        undo(io, tail, None);
        return Err(e.into());
    }
    c.size = end;
    Ok(())
}

/// Zero plaintext `[off, end)` within the file: whole sectors become backing holes,
/// partial edge sectors are rewritten with encrypted zeros.
fn punch(c: &mut Content, io: &Io<'_>, off: u64, end: u64) -> FsResult<()> {
    let size = c.size;
    let Some(cipher) = c.cipher.clone() else {
        return Ok(());
    };
    if off >= size {
        return Ok(());
    }
    let end = end.min(size);
    let Some(span) = SectorSpan::covering(off, end - off) else {
        return Ok(());
    };
    // A sector too short to be a hole is rewritten with encrypted zeros instead.
    let covered = |s: SectorNo| {
        let s_start = s.plain_start();
        let len = sector_len(s, size);
        len >= MIN_HOLE_LEN && off <= s_start && end >= s_start + len as u64
    };
    let rmw = |s: SectorNo| -> FsResult<()> {
        let s_start = s.plain_start();
        let s_len = sector_len(s, size);
        let mut sec = [0u8; SECTOR as usize];
        read_sector(io, &cipher, s, s_len, &mut sec)?;
        let a = (off.max(s_start) - s_start) as usize;
        let b = (end.min(s_start + s_len as u64) - s_start) as usize;
        sec[a..b].fill(0);
        cipher.encrypt(s, &mut sec[..s_len]);
        stats().encrypted(s_len);
        pwrite_all(io.file, &sec[..s_len], s.backing_offset())
    };
    // Only the first and the last sector can be partly covered.
    let last = SectorNo(span.end.0 - 1);
    let mut full_from = span.first;
    let mut full_to = span.end;
    if !covered(span.first) {
        rmw(span.first)?;
        full_from = span.first.next();
    }
    if last != span.first && !covered(last) {
        rmw(last)?;
        full_to = last;
    }
    if full_from < full_to {
        let from = full_from;
        let a = from.backing_offset();
        let b = plain_size_to_backing_size(full_to.plain_start().min(size));
        if b > a {
            let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            match rustix::fs::fallocate(io.file, flags, a, b - a) {
                Ok(()) => {}
                // No hole punching in the backing filesystem: zero ciphertext reads as zeros too.
                Err(Errno::OPNOTSUPP | Errno::NOSYS) => zero_fill(io.file, a, b)?,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

fn zero_fill(f: &File, from: u64, to: u64) -> FsResult<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(zeros.len());
        pwrite_all(f, &zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// SEEK_DATA (`data == true`) or SEEK_HOLE from plaintext offset `off`.
pub fn seek_data_hole(c: &Content, io: &Io<'_>, off: u64, data: bool) -> FsResult<u64> {
    let size = c.size;
    if off >= size {
        return Err(FsError::NoData);
    }
    let boff = off + HEADER_LEN;
    let r = rustix::fs::seek(
        io.file,
        if data {
            SeekFrom::Data(boff)
        } else {
            SeekFrom::Hole(boff)
        },
    );
    match r {
        Ok(b) => Ok(b.saturating_sub(HEADER_LEN).clamp(off, size)),
        Err(Errno::NXIO) => {
            if data {
                Err(FsError::NoData)
            } else {
                Ok(size)
            }
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Dek;
    use rand::{Rng, SeedableRng};

    struct Fixture {
        _dir: tempfile::TempDir,
        file: File,
        keys: VolumeKeys,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        let keys = VolumeKeys::new(Keyring::new([(1, Dek::generate().unwrap())], 1).unwrap());
        Fixture {
            _dir: dir,
            file,
            keys,
        }
    }

    /// A fixture and the loaded content state of its (empty) file.
    fn loaded() -> (Fixture, Content) {
        let fx = fixture();
        let mut c = Content::default();
        load(&mut c, &fx.io()).unwrap();
        (fx, c)
    }

    fn no_path() -> PathBuf {
        PathBuf::from("<test>")
    }

    impl Fixture {
        fn io(&self) -> Io<'_> {
            Io {
                file: &self.file,
                direct: None,
                keys: &self.keys,
                epoch: self.keys.epoch(),
                path: &no_path,
            }
        }
        fn read_all(&self, c: &Content) -> Vec<u8> {
            let mut out = Vec::new();
            read(c, &self.io(), 0, u32::MAX, |d| out.extend_from_slice(d)).unwrap();
            out
        }
        fn backing_len(&self) -> u64 {
            self.file.metadata().unwrap().len()
        }
    }

    #[test]
    fn truncate_matrix_across_sector_boundaries() {
        let sizes = [0u64, 1, 15, 16, 17, 4095, 4096, 4097, 8191, 8192, 8193];
        for &from in &sizes {
            for &to in &sizes {
                let (fx, mut c) = loaded();
                let data: Vec<u8> = (0..from).map(|i| (i % 251) as u8 + 1).collect();
                write(&mut c, &fx.io(), 0, &data).unwrap();
                truncate(&mut c, &fx.io(), to).unwrap();
                let mut want = data.clone();
                want.resize(to as usize, 0);
                assert_eq!(fx.read_all(&c), want, "{from} -> {to}");
                assert_eq!(fx.backing_len(), if to == 0 { 0 } else { to + HEADER_LEN });
                // A fresh load from disk agrees.
                let mut c2 = Content::default();
                load(&mut c2, &fx.io()).unwrap();
                assert_eq!(c2.size(), to);
                assert_eq!(fx.read_all(&c2), want);
            }
        }
    }

    #[test]
    fn random_operations_match_a_model() {
        for seed in 0..8u64 {
            let (fx, mut c) = loaded();
            let mut model: Vec<u8> = Vec::new();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            for step in 0..300 {
                match rng.gen_range(0..12) {
                    0..=5 => {
                        let off = rng.gen_range(0..40_000u64);
                        let len = rng.gen_range(1..9000usize);
                        let buf: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
                        assert_eq!(write(&mut c, &fx.io(), off, &buf).unwrap(), len);
                        let end = off as usize + len;
                        if model.len() < end {
                            model.resize(end, 0);
                        }
                        model[off as usize..end].copy_from_slice(&buf);
                    }
                    6 | 7 => {
                        let to = rng.gen_range(0..45_000u64);
                        truncate(&mut c, &fx.io(), to).unwrap();
                        model.resize(to as usize, 0);
                    }
                    8 => {
                        let off = rng.gen_range(0..45_000u64);
                        let len = rng.gen_range(1..20_000u64);
                        fallocate(&mut c, &fx.io(), off, len, PUNCH_HOLE | KEEP_SIZE).unwrap();
                        let a = (off as usize).min(model.len());
                        let b = ((off + len) as usize).min(model.len());
                        model[a..b].fill(0);
                    }
                    9 => {
                        let off = rng.gen_range(0..45_000u64);
                        let len = rng.gen_range(1..20_000u64);
                        let mode = if rng.gen_bool(0.5) { 0 } else { KEEP_SIZE };
                        fallocate(&mut c, &fx.io(), off, len, mode).unwrap();
                        if mode == 0 && (off + len) as usize > model.len() {
                            model.resize((off + len) as usize, 0);
                        }
                    }
                    _ => {
                        let off = rng.gen_range(0..50_000u64);
                        let len = rng.gen_range(1..20_000u32);
                        let mut got = Vec::new();
                        read(&c, &fx.io(), off, len, |d| got.extend_from_slice(d)).unwrap();
                        let a = (off as usize).min(model.len());
                        let b = (off as usize + len as usize).min(model.len());
                        assert_eq!(got, model[a..b], "seed {seed} step {step} read {off}+{len}");
                    }
                }
                assert_eq!(c.size(), model.len() as u64, "seed {seed} step {step}");
            }
            assert_eq!(fx.read_all(&c), model, "seed {seed}");
        }
    }

    #[test]
    fn zeros_written_are_encrypted_but_holes_stay_holes() {
        let (fx, mut c) = loaded();
        write(&mut c, &fx.io(), 0, &[0u8; 8192]).unwrap();
        truncate(&mut c, &fx.io(), 5 * 4096).unwrap();
        let mut raw = vec![0u8; 6 * 4096];
        let n = pread_full(&fx.file, &mut raw, 0).unwrap();
        assert_eq!(n, 6 * 4096);
        assert!(raw[4096..2 * 4096].iter().any(|&b| b != 0));
        assert!(raw[2 * 4096..3 * 4096].iter().any(|&b| b != 0));
        assert!(raw[3 * 4096..].iter().all(|&b| b == 0));
        assert_eq!(fx.read_all(&c), vec![0u8; 5 * 4096]);
    }

    #[test]
    fn short_tails_are_never_stored_as_holes() {
        for (from, to) in [
            (0u64, 4u64),
            (4096, 4100),
            (8192, 4097),
            (4096, 4111),
            (0, 8195),
        ] {
            let (fx, mut c) = loaded();
            if from > 0 {
                truncate(&mut c, &fx.io(), from).unwrap();
            }
            truncate(&mut c, &fx.io(), to).unwrap();
            let tail = (to % 4096) as usize;
            let mut raw = vec![0u8; tail];
            pread_full(&fx.file, &mut raw, HEADER_LEN + to - tail as u64).unwrap();
            assert!(
                raw.iter().any(|&b| b != 0),
                "{from}->{to}: short tail stored as zeros"
            );
            assert_eq!(fx.read_all(&c), vec![0u8; to as usize]);
        }
        // Punching a short tail rewrites it encrypted.
        let (fx, mut c) = loaded();
        write(&mut c, &fx.io(), 0, &[7u8; 4100]).unwrap();
        fallocate(&mut c, &fx.io(), 4096, 4, PUNCH_HOLE | KEEP_SIZE).unwrap();
        let mut want = vec![7u8; 4096];
        want.extend_from_slice(&[0u8; 4]);
        assert_eq!(fx.read_all(&c), want);
    }

    #[test]
    fn seek_data_and_hole() {
        let (fx, mut c) = loaded();
        write(&mut c, &fx.io(), 0, &[1u8; 4096]).unwrap();
        write(&mut c, &fx.io(), 10 * 4096, &[2u8; 100]).unwrap();
        assert_eq!(seek_data_hole(&c, &fx.io(), 0, false).unwrap(), 4096);
        assert_eq!(seek_data_hole(&c, &fx.io(), 4096, true).unwrap(), 10 * 4096);
        assert_eq!(
            seek_data_hole(&c, &fx.io(), 10 * 4096 + 1, false).unwrap(),
            10 * 4096 + 100
        );
        assert!(matches!(
            seek_data_hole(&c, &fx.io(), 10 * 4096 + 100, true),
            Err(FsError::NoData)
        ));
    }

    #[test]
    fn unsupported_fallocate_modes_and_bad_lengths() {
        let (fx, mut c) = loaded();
        assert!(matches!(
            fallocate(&mut c, &fx.io(), 0, 10, libc::FALLOC_FL_ZERO_RANGE),
            Err(FsError::NotSupported)
        ));
        assert!(matches!(
            fallocate(&mut c, &fx.io(), 0, 10, PUNCH_HOLE),
            Err(FsError::NotSupported)
        ));
        assert!(matches!(
            fallocate(&mut c, &fx.io(), 0, 0, 0),
            Err(FsError::Invalid)
        ));
    }

    #[test]
    fn damaged_files_are_reported_not_decrypted() {
        let fx = fixture();
        std::fs::write(fx._dir.path().join("f"), vec![9u8; 100]).unwrap();
        let mut c = Content::default();
        assert!(matches!(
            load(&mut c, &fx.io()),
            Err(FsError::Corrupt { .. })
        ));
        std::fs::write(fx._dir.path().join("f"), vec![9u8; 5000]).unwrap();
        let mut c = Content::default();
        let e = load(&mut c, &fx.io()).unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");
    }
}
