//! File content over a backing file: read, write (with read-modify-write of partial
//! blocks), truncate, fallocate and SEEK_DATA/SEEK_HOLE, in format v2 and in v1.
//!
//! Each file carries its format in its header. New files (and files truncated to zero
//! whose header is not of the volume's write format and current key) get the volume's
//! write format; a v1 file whose size is a multiple of 16 has the same bytes as v2 and
//! is switched to v2 (its header rewritten and synced) before a change that would
//! leave it at another size. Other v1 files keep v1's rules.
//!
//! Every function here runs under the inode's content lock (`Inode::content`): shared
//! for reads and seeks, exclusive for anything that changes bytes or size.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};

use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::Errno;

use crate::content::{
    BLOCK, FileCipher, FileFormat, HEADER_LEN, Keyring, MIN_HOLE_LEN, SECTOR, SectorNo, SectorSpan,
    backing_size_to_plain_size, decode_header, header_never_written, is_hole, new_header, pad16,
    plain_off_to_sector, plain_size_to_backing_size, reformat_header, sector_len,
};
use crate::sys::AlignedBuf;

use super::backing::{self, pread_direct, pread_full, pwrite_all};
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
    /// The backing file is longer than 0 but its header block is all zero: the header
    /// never reached the disk before a crash, so nothing in the file was durable. It
    /// reads as zeros of `size` bytes; the first change clears the data and starts a
    /// new header.
    orphan: bool,
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
    /// The file's format (`None` while it has no header).
    pub fn format(&self) -> Option<FileFormat> {
        self.cipher.as_ref().map(|c| c.format())
    }
    /// The format and key version of the file's header (`None` while it has none).
    pub fn cipher_names(&self) -> Option<(FileFormat, u32)> {
        self.cipher.as_ref().map(|c| (c.format(), c.key_version()))
    }
}

/// The volume's data keys: `None` while locked (CMK revoked), with an epoch bumped on
/// every change. A file's cipher is valid only for the epoch it was loaded under, so
/// the data path reads one atomic per operation and takes the lock only to load.
///
/// The one place that holds the running volume's keyring, its epoch, and its current
/// version with since when it is current.
pub struct VolumeKeys {
    /// Taken only to load a file's cipher or to change the keys, never across I/O.
    keys: RwLock<Installed>,
    /// The current epoch, readable without the lock.
    epoch: AtomicU64,
}

/// What [`VolumeKeys`] holds under its lock.
struct Installed {
    keys: Option<Arc<Keyring>>,
    epoch: u64,
    /// The current version last installed (kept while locked).
    current: u32,
    /// When `current` became current, if by a later install than the first.
    current_changed: Option<SystemTime>,
}

impl VolumeKeys {
    pub fn new(keys: Keyring) -> Self {
        VolumeKeys {
            keys: RwLock::new(Installed {
                current: keys.current_version(),
                keys: Some(Arc::new(keys)),
                epoch: 1,
                current_changed: None,
            }),
            epoch: AtomicU64::new(1),
        }
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The keys and their epoch; `None` while locked.
    pub(super) fn snapshot(&self) -> (Option<Arc<Keyring>>, u64) {
        let k = self.keys.read();
        (k.keys.clone(), k.epoch)
    }

    /// Install new keys (`None`: lock) and bump the epoch. A lock keeps the current
    /// version; keys with another current version note when it changed.
    pub fn set(&self, keys: Option<Keyring>) {
        let mut k = self.keys.write();
        if let Some(new) = &keys
            && new.current_version() != k.current
        {
            k.current = new.current_version();
            k.current_changed = Some(SystemTime::now());
        }
        k.keys = keys.map(Arc::new);
        k.epoch += 1;
        self.epoch.store(k.epoch, Ordering::SeqCst);
    }

    /// The key versions held and the current one (None while locked).
    pub fn versions(&self) -> Option<(Vec<u32>, u32)> {
        self.keys
            .read()
            .keys
            .as_ref()
            .map(|k| (k.versions(), k.current_version()))
    }

    /// When the current version became current, if an install after the first changed
    /// it (`None`: it is the version the keys were created with).
    pub fn current_changed(&self) -> Option<SystemTime> {
        self.keys.read().current_changed
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
    /// The format the volume writes new files in.
    pub format: FileFormat,
    pub path: &'a dyn Fn() -> PathBuf,
}

/// Every thread's scratch buffer (see [`with_buf`]), so that a key lock can wipe them.
static SCRATCH: Mutex<Vec<Weak<Mutex<AlignedBuf>>>> = Mutex::new(Vec::new());

thread_local! {
    /// This thread's scratch buffer: plaintext passes through it. Locked only by this
    /// thread and, to wipe it, by a key lock.
    static BUF: Arc<Mutex<AlignedBuf>> = {
        let buf = Arc::new(Mutex::new(AlignedBuf::new()));
        let mut all = SCRATCH.lock();
        all.retain(|b| b.strong_count() > 0);
        all.push(Arc::downgrade(&buf));
        buf
    };
}

/// Run `f` on a page-aligned scratch buffer of `len` bytes (reused per thread; a
/// nested use, or one while a key lock wipes it, gets a buffer of its own).
fn with_buf<R>(len: usize, f: impl FnOnce(&mut [u8]) -> FsResult<R>) -> FsResult<R> {
    BUF.with(|cell| match cell.try_lock() {
        Some(mut b) => {
            if !b.resize(len) {
                return Err(FsError::NoMemory);
            }
            f(b.as_mut_slice())
        }
        None => {
            // Wiped when dropped.
            let mut b = AlignedBuf::new();
            if !b.resize(len) {
                return Err(FsError::NoMemory);
            }
            f(b.as_mut_slice())
        }
    })
}

/// Wipe every thread's scratch buffer (the plaintext of the last read or write each
/// thread made), waiting for one in use. Called when the keys are locked. A thread's
/// buffer is also wiped when the thread ends.
pub fn wipe_scratch_buffers() {
    let all: Vec<_> = SCRATCH.lock().iter().filter_map(Weak::upgrade).collect();
    for buf in all {
        buf.lock().wipe();
    }
}

/// Whether this thread's scratch buffer holds nothing but zeros (for tests).
#[cfg(test)]
pub fn scratch_is_zero() -> bool {
    BUF.with(|b| b.lock().as_slice().iter().all(|&x| x == 0))
}

fn set_len(f: &File, len: u64) -> FsResult<()> {
    Ok(backing::ftruncate(f, len)?)
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
///
/// Keys replaced while it loads (a rotate or reload installed a new keyring) make it
/// load again under the new ones; only keys locked (revocation wiped them) fail it.
pub fn load(c: &mut Content, io: &Io<'_>) -> FsResult<()> {
    if c.is_loaded(io.epoch) {
        return Ok(());
    }
    loop {
        c.unload();
        let (keys, epoch) = keys(io)?;
        let loaded = load_under(c, io, &keys);
        // Keys locked or replaced while we loaded (checked under the content lock, which
        // the lock takes for every file after the epoch changed): keep no cipher of old
        // keys. Replaced: load again under the new ones, which may also hold the version
        // of a header the old ones did not know (`keys` fails if they are now locked).
        // Each turn needs another install during one header read, so this ends.
        if io.keys.epoch() != epoch {
            continue;
        }
        let size = loaded?;
        c.size = size;
        c.epoch = epoch;
        c.loaded = true;
        return Ok(());
    }
}

/// Read the header under `keys` into `c` (its cipher, or none) and return the
/// plaintext size.
fn load_under(c: &mut Content, io: &Io<'_>, keys: &Keyring) -> FsResult<u64> {
    let st = rustix::fs::fstat(io.file)?;
    let backing = st.st_size as u64;
    c.orphan = false;
    if backing == 0 {
        c.cipher = None;
        return Ok(0);
    }
    if backing < HEADER_LEN {
        return Err(corrupt(
            c,
            io,
            format!("backing file is {backing} bytes, shorter than the {HEADER_LEN}-byte header"),
        ));
    }
    let mut h = [0u8; HEADER_LEN as usize];
    let n = pread_full(io.file, &mut h, 0)?;
    let format = if header_never_written(&h[..n]) {
        c.orphan = true;
        c.cipher = None;
        io.format
    } else {
        match decode_header(keys, &h[..n]) {
            Ok(cipher) => {
                let f = cipher.format();
                c.cipher = Some(cipher);
                f
            }
            Err(e) => return Err(corrupt(c, io, e.to_string())),
        }
    };
    match backing_size_to_plain_size(format, backing)
        .or_else(|| c.orphan.then(|| backing - HEADER_LEN))
    {
        Some(s) => Ok(s),
        None => {
            c.cipher = None;
            Err(corrupt(
                c,
                io,
                format!(
                    "backing length {backing} is not a length of a v2 file (1 to 15 bytes past the header)"
                ),
            ))
        }
    }
}

fn header_error(io: &Io<'_>, e: crate::content::HeaderError) -> FsError {
    FsError::Corrupt {
        path: (io.path)(),
        reason: e.to_string(),
    }
}

/// Write a header: through the O_DIRECT descriptor when the handle has one, so that it
/// reaches the disk no later than data written through that descriptor. O_DIRECT needs
/// an aligned buffer, so the header is copied into the page-aligned scratch buffer first;
/// a backing filesystem that still refuses it (EINVAL) gets it buffered.
fn write_header(io: &Io<'_>, h: &[u8]) -> FsResult<()> {
    match io.direct {
        Some(d) => match with_buf(h.len(), |buf| {
            buf.copy_from_slice(h);
            pwrite_all(d, buf, 0)
        }) {
            Err(FsError::Os(Errno::INVAL)) => pwrite_all(io.file, h, 0),
            r => r,
        },
        None => pwrite_all(io.file, h, 0),
    }
}

/// Give a file without a header its header (a fresh nonce under the current key, in the
/// volume's write format). An orphan (a header that never reached the disk) first has
/// its data cleared and synced, so that no ciphertext under the lost nonce can ever be
/// read under the new one; it keeps its size, as zeros.
fn ensure_header(c: &mut Content, io: &Io<'_>) -> FsResult<Arc<FileCipher>> {
    if let Some(cipher) = &c.cipher {
        return Ok(cipher.clone());
    }
    let (h, cipher) = new_header(&keys(io)?.0, io.format).map_err(|e| header_error(io, e))?;
    if c.orphan {
        let len = rustix::fs::fstat(io.file)?.st_size as u64;
        clear_range(io.file, HEADER_LEN, len)?;
        backing::sync(io.file, true)?;
        write_header(io, &h[..])?;
        let want = plain_size_to_backing_size(cipher.format(), c.size);
        if want != len {
            set_len(io.file, want)?;
        }
        if cipher.format() == FileFormat::V1 {
            // v1: a tail shorter than 16 bytes is never a hole; store encrypted zeros.
            reencode_sector(io, &cipher, plain_off_to_sector(c.size), 0, c.size)?;
        }
        c.cipher = Some(cipher.clone());
        c.orphan = false;
        return Ok(cipher);
    }
    if let Err(e) = write_header(io, &h[..]) {
        // Leave the file empty, as it was.
        let _ = set_len(io.file, 0);
        return Err(e);
    }
    c.cipher = Some(cipher.clone());
    c.size = 0;
    Ok(cipher)
}

/// Before a change that leaves a v1 file at a size that is not a multiple of 16 in a
/// volume that writes v2: a v1 file whose size is a multiple of 16 is stored exactly as
/// v2 would store it, so rewrite its header as v2 (same key version and nonce) and sync
/// it first. Other v1 files keep v1.
fn upgrade_if_aligned(c: &mut Content, io: &Io<'_>, new_size: u64) -> FsResult<()> {
    let Some(cipher) = &c.cipher else {
        return Ok(());
    };
    if cipher.format() != FileFormat::V1
        || io.format != FileFormat::V2
        || !c.size.is_multiple_of(BLOCK)
        || new_size.is_multiple_of(BLOCK)
    {
        return Ok(());
    }
    let (h, v2) =
        reformat_header(&keys(io)?.0, cipher, FileFormat::V2).map_err(|e| header_error(io, e))?;
    write_header(io, &h[..])?;
    backing::sync(io.file, true)?;
    c.cipher = Some(v2);
    Ok(())
}

/// Zero backing bytes `[from, to)`: punch a hole, or write zeros where the backing
/// filesystem cannot punch.
pub(super) fn clear_range(f: &File, from: u64, to: u64) -> FsResult<()> {
    if to <= from {
        return Ok(());
    }
    let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    match backing::fallocate(f, flags, from, to - from) {
        Ok(()) => Ok(()),
        Err(Errno::OPNOTSUPP | Errno::NOSYS) => zero_fill(f, from, to),
        Err(e) => Err(e.into()),
    }
}

/// Read plaintext `[off, off + len)` (cropped at end of file) and hand it to `out`.
pub fn read(c: &Content, io: &Io<'_>, off: u64, len: u32, out: impl FnOnce(&[u8])) -> FsResult<()> {
    let size = c.size;
    if off >= size {
        out(&[]);
        return Ok(());
    }
    let end = off.saturating_add(u64::from(len)).min(size);
    let Some(cipher) = c.cipher.as_ref() else {
        // An orphan: nothing of it was durable; it reads as zeros.
        return with_buf((end - off) as usize, |buf| {
            buf.fill(0);
            out(buf);
            Ok(())
        });
    };
    let Some(span) = SectorSpan::covering(off, end - off) else {
        out(&[]);
        return Ok(());
    };
    let v2 = cipher.format() == FileFormat::V2;
    let span_len = (span.count() * SECTOR) as usize;
    let data_end = span.end.plain_start().min(size);
    // v2 stores the last block padded to 16 bytes.
    let stored_end = if v2 { pad16(data_end) } else { data_end };
    let want = (stored_end - span.plain_start()) as usize;
    with_buf(span_len, |buf| {
        let aligned = off.is_multiple_of(SECTOR) && u64::from(len) % SECTOR == 0;
        let n = match (io.direct, aligned) {
            (Some(d), true) => pread_direct(d, buf, span.first.backing_offset())?,
            _ => pread_full(io.file, &mut buf[..want], span.first.backing_offset())?,
        };
        if n < want {
            return Err(FsError::Corrupt {
                path: (io.path)(),
                reason: format!("backing file ends {} bytes early", want - n),
            });
        }
        let buf = &mut buf[..want];
        if v2 {
            cipher.decrypt_blocks(span.plain_start(), buf);
        } else {
            cipher.decrypt(span.first, buf);
        }
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
        let _ = set_len(io.file, sz);
    }
}

/// Reserve backing space for `[from, to)` so that the write that follows cannot hit
/// ENOSPC halfway. Filesystems without fallocate are written without a reservation.
fn reserve(io: &Io<'_>, from: u64, to: u64) -> FsResult<()> {
    if to <= from {
        return Ok(());
    }
    match backing::fallocate(io.file, FallocateFlags::KEEP_SIZE, from, to - from) {
        Ok(()) => Ok(()),
        Err(Errno::OPNOTSUPP | Errno::NOSYS) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Write `data` at plaintext offset `off`. Returns the bytes written (all of them).
/// On failure the file is left as it was (size, bytes outside the write, and the tail).
pub fn write(c: &mut Content, io: &Io<'_>, off: u64, data: &[u8]) -> FsResult<usize> {
    let len = data.len() as u64;
    if len == 0 {
        return Ok(0);
    }
    let end = off.checked_add(len).ok_or(FsError::Os(Errno::FBIG))?;
    upgrade_if_aligned(c, io, c.size.max(end))?;
    // An orphan gets its header below but keeps its size: a failure rolls back to that.
    let had_header = c.cipher.is_some() || c.orphan;
    let cipher = ensure_header(c, io)?;
    match cipher.format() {
        FileFormat::V2 => write_v2(c, io, &cipher, had_header, off, data),
        FileFormat::V1 => write_v1(c, io, &cipher, had_header, off, data),
    }
}

/// The old stored bytes of a backing range, to put back if an operation fails.
type Undo = Option<(u64, Vec<u8>)>;

/// Save backing `[from, to)` for an undo.
fn save(io: &Io<'_>, from: u64, to: u64) -> FsResult<Undo> {
    if to <= from {
        return Ok(None);
    }
    let mut raw = vec![0u8; (to - from) as usize];
    let n = pread_full(io.file, &mut raw, from)?;
    raw.truncate(n);
    Ok(Some((from, raw)))
}

/// Decrypt the stored v2 block that starts at plaintext `at` (a multiple of 16).
fn decrypt_block_v2(cipher: &FileCipher, at: u64, stored: &[u8]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b.copy_from_slice(&stored[..16]);
    cipher.decrypt_blocks(at, &mut b);
    stats().decrypted(16);
    b
}

/// Read and decrypt the v2 block that starts at plaintext `at` (a multiple of 16).
fn read_block_v2(io: &Io<'_>, cipher: &FileCipher, at: u64) -> FsResult<[u8; 16]> {
    let mut b = [0u8; 16];
    let n = pread_full(io.file, &mut b, HEADER_LEN + at)?;
    if n < b.len() {
        return Err(FsError::Corrupt {
            path: (io.path)(),
            reason: format!("block at {at} is {} bytes short", b.len() - n),
        });
    }
    Ok(decrypt_block_v2(cipher, at, &b))
}

/// The v2 block at plaintext `at`, decrypted from the bytes an undo record already
/// holds when it starts there (saving a second read of the same block), else read.
fn block_v2(io: &Io<'_>, cipher: &FileCipher, saved: &Undo, at: u64) -> FsResult<[u8; 16]> {
    match saved {
        Some((o, raw)) if *o == HEADER_LEN + at && raw.len() >= 16 => {
            Ok(decrypt_block_v2(cipher, at, raw))
        }
        _ => read_block_v2(io, cipher, at),
    }
}

/// v2 write: the 16-byte blocks that `[off, end)` touches are encrypted and written
/// with one pwrite; a partly covered first or last block that holds file data is read
/// and merged. When the write ends the file, the zero marker bytes that code the size
/// follow in the same pwrite. No byte outside the touched blocks changes, and a touched
/// block decrypts the same whatever the backing length: a crash keeps every durable byte.
fn write_v2(
    c: &mut Content,
    io: &Io<'_>,
    cipher: &FileCipher,
    had_header: bool,
    off: u64,
    data: &[u8],
) -> FsResult<usize> {
    let end = off + data.len() as u64;
    let old = c.size;
    let new_size = old.max(end);
    let b0 = off - off % BLOCK;
    let b1 = pad16(end);
    let markers = if end == new_size { end % BLOCK } else { 0 };
    let blocks_len = (b1 - b0) as usize;
    let buf_len = blocks_len + markers as usize;
    let at = HEADER_LEN + b0;
    let old_backing = plain_size_to_backing_size(FileFormat::V2, old);
    let grows = at + buf_len as u64 > old_backing;
    // The old last block and its markers, if this write rewrites them: restored on failure
    // so that the bytes past the old size stay zero. An append merges from these bytes
    // too, so the block is read once.
    let tail_undo = if !old.is_multiple_of(BLOCK) && b1 > old - old % BLOCK {
        save(io, HEADER_LEN + old - old % BLOCK, old_backing)?
    } else {
        None
    };
    let rollback_size = if !had_header {
        Some(0)
    } else {
        grows.then_some(old_backing)
    };
    let fail = |c: &mut Content, e: FsError, undo_tail: Undo| {
        undo(io, undo_tail, rollback_size);
        if !had_header {
            c.cipher = None;
        }
        e
    };
    if grows && let Err(e) = reserve(io, old_backing.max(at), at + buf_len as u64) {
        return Err(fail(c, e, None));
    }
    let res = with_buf(buf_len, |buf| {
        let from = (off - b0) as usize;
        let to = from + data.len();
        buf[..from].fill(0);
        buf[to..].fill(0);
        // Partly covered edge blocks that hold file data are merged.
        let first_partial = !off.is_multiple_of(BLOCK) && b0 < old;
        let last_at = b1 - BLOCK;
        let last_partial = !end.is_multiple_of(BLOCK) && end < old;
        if first_partial {
            let blk = block_v2(io, cipher, &tail_undo, b0)?;
            buf[..16].copy_from_slice(&blk);
        }
        if last_partial && !(first_partial && last_at == b0) {
            let blk = block_v2(io, cipher, &tail_undo, last_at)?;
            let i = (last_at - b0) as usize;
            buf[i..i + 16].copy_from_slice(&blk);
        }
        buf[from..to].copy_from_slice(data);
        cipher.encrypt_blocks(b0, &mut buf[..blocks_len]);
        stats().encrypted(blocks_len);
        let direct_ok = at.is_multiple_of(SECTOR) && (buf_len as u64).is_multiple_of(SECTOR);
        match (io.direct, direct_ok) {
            (Some(d), true) => pwrite_all(d, buf, at),
            _ => pwrite_all(io.file, buf, at),
        }
    });
    if let Err(e) = res {
        return Err(fail(c, e, tail_undo));
    }
    // Filling the old last block exactly drops its markers: the length shrinks by them.
    let new_backing = plain_size_to_backing_size(FileFormat::V2, new_size);
    if new_backing < old_backing
        && let Err(e) = set_len(io.file, new_backing)
    {
        return Err(fail(c, e, tail_undo));
    }
    c.size = new_size;
    Ok(data.len())
}

/// v1 write: whole sectors, the short last sector re-encrypted at its new length.
fn write_v1(
    c: &mut Content,
    io: &Io<'_>,
    cipher: &Arc<FileCipher>,
    had_header: bool,
    off: u64,
    data: &[u8],
) -> FsResult<usize> {
    let len = data.len() as u64;
    let Some(span) = SectorSpan::covering(off, len) else {
        return Ok(0);
    };
    let end = off + len;
    let cipher = cipher.clone();
    let old = c.size;
    let new_size = old.max(end);
    let old_backing = plain_size_to_backing_size(FileFormat::V1, old);
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
    // Growing past a short last sector: re-encrypt it at its new length first. When the
    // write itself rewrites that sector, keep its old bytes to put back on failure.
    let mut tail_undo = None;
    if end > old && !old.is_multiple_of(SECTOR) && plain_off_to_sector(old) >= span.first {
        tail_undo = save(io, plain_off_to_sector(old).backing_offset(), old_backing)?;
    }
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
            // The old short last sector was saved for the undo: decrypt it from there
            // rather than read it a second time.
            match &tail_undo {
                Some((o, raw)) if *o == s.backing_offset() && raw.len() == old_len => {
                    sec[..old_len].copy_from_slice(raw);
                    cipher.decrypt(s, &mut sec[..old_len]);
                    stats().decrypted(old_len);
                }
                _ => read_sector(io, &cipher, s, old_len, &mut sec)?,
            }
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

/// Whether a file's header is the one a new file would get now (the volume's write
/// format and the current key version).
fn header_is_current(cipher: &FileCipher, io: &Io<'_>) -> FsResult<bool> {
    Ok(cipher.format() == io.format && cipher.key_version() == keys(io)?.0.current_version())
}

/// Set the plaintext size to `new`, zero-extending or cutting. On failure the file is
/// left as it was.
pub fn truncate(c: &mut Content, io: &Io<'_>, new: u64) -> FsResult<()> {
    if new == 0 {
        return truncate_to_zero(c, io);
    }
    if new == c.size && c.cipher.is_some() {
        return Ok(());
    }
    upgrade_if_aligned(c, io, new)?;
    let had_header = c.cipher.is_some() || c.orphan;
    let cipher = ensure_header(c, io)?;
    let res = match cipher.format() {
        FileFormat::V2 => truncate_v2(c, io, &cipher, new),
        FileFormat::V1 => truncate_v1(c, io, &cipher, new),
    };
    if let Err(e) = res {
        if !had_header {
            let _ = set_len(io.file, 0);
            c.cipher = None;
            c.size = 0;
        }
        return Err(e);
    }
    c.size = new;
    Ok(())
}

/// Truncate to zero. A header of the volume's write format and current key version is
/// kept (the file is its header alone), so that a crash before the next sync leaves
/// each block old or new, never ciphertext under another nonce. Any other header is
/// removed and the removal synced before the next write starts a new header.
fn truncate_to_zero(c: &mut Content, io: &Io<'_>) -> FsResult<()> {
    if let Some(cipher) = &c.cipher
        && header_is_current(cipher, io)?
    {
        set_len(io.file, HEADER_LEN)?;
        c.size = 0;
        return Ok(());
    }
    set_len(io.file, 0)?;
    if c.cipher.is_some() || c.orphan {
        backing::sync(io.file, true)?;
    }
    c.cipher = None;
    c.orphan = false;
    c.size = 0;
    Ok(())
}

/// v2 truncate. Up: only the length changes (the old last block's padding and markers
/// are zero already). Down to a size that is not a multiple of 16: the block that holds
/// the new end is rewritten with its tail zeroed, and the block after it (whose first
/// bytes become the markers) is stored as zeros, before one `ftruncate` to the new
/// length. Every step leaves bytes past the new end reading as their old value or zero,
/// and the length is only ever the old or the new one.
fn truncate_v2(c: &mut Content, io: &Io<'_>, cipher: &FileCipher, new: u64) -> FsResult<()> {
    let old = c.size;
    let new_backing = plain_size_to_backing_size(FileFormat::V2, new);
    if new > old || new.is_multiple_of(BLOCK) {
        return set_len(io.file, new_backing);
    }
    let cut = new - new % BLOCK;
    let next = pad16(new);
    // Blocks `cut` and (if it holds old data) `next`: saved to put back on failure.
    let saved_to = if next < pad16(old) {
        next + BLOCK
    } else {
        next
    };
    let undo_rec = save(io, HEADER_LEN + cut, HEADER_LEN + saved_to)?;
    let res = (|| {
        let mut blk = block_v2(io, cipher, &undo_rec, cut)?;
        blk[(new % BLOCK) as usize..].fill(0);
        cipher.encrypt_blocks(cut, &mut blk);
        stats().encrypted(16);
        pwrite_all(io.file, &blk, HEADER_LEN + cut)?;
        if next < pad16(old) {
            pwrite_all(io.file, &[0u8; BLOCK as usize], HEADER_LEN + next)?;
        }
        set_len(io.file, new_backing)
    })();
    if let Err(e) = res {
        undo(io, undo_rec, None);
        return Err(e);
    }
    Ok(())
}

/// v1 truncate: the backing file grows first (so a failure such as EFBIG changes
/// nothing), then the short tail sectors are re-encoded; every step is undone on failure.
fn truncate_v1(c: &mut Content, io: &Io<'_>, cipher: &FileCipher, new: u64) -> FsResult<()> {
    let old = c.size;
    let old_backing = plain_size_to_backing_size(FileFormat::V1, old);
    let new_backing = plain_size_to_backing_size(FileFormat::V1, new);
    if new > old {
        set_len(io.file, new_backing)?;
        match reencode_edges(io, cipher, old, new) {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = set_len(io.file, old_backing);
                Err(e)
            }
        }
    } else {
        let tail = reencode_edges(io, cipher, old, new)?;
        if let Err(e) = set_len(io.file, new_backing) {
            undo(io, tail, None);
            return Err(e);
        }
        Ok(())
    }
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
    // v2 stores the block that holds the end padded to 16 bytes.
    let reserve_len = pad16(end) - off;
    backing::fallocate(io.file, FallocateFlags::KEEP_SIZE, boff, reserve_len)?;
    if mode & KEEP_SIZE != 0 || end <= c.size {
        return Ok(());
    }
    // Mode 0 past the end: reserved, now set the new size (as a truncate up does).
    truncate(c, io, end)
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
    if cipher.format() == FileFormat::V2 {
        return punch_v2(io, &cipher, size, off, end.min(size));
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
        let b = plain_size_to_backing_size(FileFormat::V1, full_to.plain_start().min(size));
        if b > a {
            let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            match backing::fallocate(io.file, flags, a, b - a) {
                Ok(()) => {}
                // No hole punching in the backing filesystem: zero ciphertext reads as zeros too.
                Err(Errno::OPNOTSUPP | Errno::NOSYS) => zero_fill(io.file, a, b)?,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// v2 punch of plaintext `[off, end)`, `end <= size`: a partly covered block is
/// rewritten with the range zeroed; whole blocks (and the last block, padding included,
/// when the range reaches the end of the file) are stored as zeros.
fn punch_v2(io: &Io<'_>, cipher: &FileCipher, size: u64, off: u64, end: u64) -> FsResult<()> {
    let zero_part = |at: u64, a: u64, b: u64| -> FsResult<()> {
        let mut blk = read_block_v2(io, cipher, at)?;
        blk[(a - at) as usize..(b - at) as usize].fill(0);
        cipher.encrypt_blocks(at, &mut blk);
        stats().encrypted(16);
        pwrite_all(io.file, &blk, HEADER_LEN + at)
    };
    let whole_end = if end == size { pad16(size) } else { end };
    let first = off - off % BLOCK;
    let last = whole_end - whole_end % BLOCK;
    if first == last && !off.is_multiple_of(BLOCK) {
        // Inside one block.
        return zero_part(first, off, whole_end);
    }
    let mut from = off;
    if !off.is_multiple_of(BLOCK) {
        zero_part(first, off, first + BLOCK)?;
        from = first + BLOCK;
    }
    let mut to = whole_end;
    if !whole_end.is_multiple_of(BLOCK) {
        zero_part(last, last, whole_end)?;
        to = last;
    }
    clear_range(io.file, HEADER_LEN + from, HEADER_LEN + to)
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
        format: FileFormat,
    }

    fn fixture() -> Fixture {
        fixture_in(FileFormat::V2)
    }

    fn fixture_in(format: FileFormat) -> Fixture {
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
            format,
        }
    }

    /// A fixture and the loaded content state of its (empty) file.
    fn loaded() -> (Fixture, Content) {
        loaded_in(FileFormat::V2)
    }

    fn loaded_in(format: FileFormat) -> (Fixture, Content) {
        let fx = fixture_in(format);
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
                format: self.format,
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
        for format in FileFormat::ALL {
            truncate_matrix(format);
        }
    }

    fn truncate_matrix(format: FileFormat) {
        let sizes = [
            0u64, 1, 15, 16, 17, 31, 33, 4095, 4096, 4097, 8191, 8192, 8193,
        ];
        for &from in &sizes {
            for &to in &sizes {
                let (fx, mut c) = loaded_in(format);
                let data: Vec<u8> = (0..from).map(|i| (i % 251) as u8 + 1).collect();
                write(&mut c, &fx.io(), 0, &data).unwrap();
                truncate(&mut c, &fx.io(), to).unwrap();
                let mut want = data.clone();
                want.resize(to as usize, 0);
                assert_eq!(fx.read_all(&c), want, "{format:?} {from} -> {to}");
                // Truncating to zero keeps a current header: the file is its header alone.
                let want_len = match (from, to) {
                    (0, 0) => 0,
                    (_, 0) => HEADER_LEN,
                    _ => plain_size_to_backing_size(format, to),
                };
                assert_eq!(fx.backing_len(), want_len, "{format:?} {from} -> {to}");
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
        for format in FileFormat::ALL {
            random_operations(format);
        }
    }

    fn random_operations(format: FileFormat) {
        for seed in 0..8u64 {
            let (fx, mut c) = loaded_in(format);
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
                        assert_eq!(
                            got,
                            model[a..b],
                            "{format:?} seed {seed} step {step} read {off}+{len}"
                        );
                    }
                }
                assert_eq!(c.size(), model.len() as u64, "seed {seed} step {step}");
            }
            assert_eq!(fx.read_all(&c), model, "seed {seed}");
        }
    }

    #[test]
    fn a_failed_truncate_or_fallocate_leaves_the_file_as_it_was() {
        // 17 TiB is past ext4's largest file (the test's backing is ext4 here): ftruncate
        // and fallocate fail with EFBIG.
        let huge = 17u64 << 40;
        for format in FileFormat::ALL {
            for size in [0u64, 5, 100, 4000, 4097] {
                let (fx, mut c) = loaded_in(format);
                let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
                write(&mut c, &fx.io(), 0, &data).unwrap();
                let before = std::fs::read(fx._dir.path().join("f")).unwrap();
                let e = truncate(&mut c, &fx.io(), huge).unwrap_err();
                assert!(matches!(e, FsError::Os(Errno::FBIG)), "{e:?}");
                let after = std::fs::read(fx._dir.path().join("f")).unwrap();
                assert!(
                    after == before,
                    "{format:?} {size}: truncate changed the file"
                );
                assert_eq!(c.size(), size);
                assert!(fallocate(&mut c, &fx.io(), huge - 10, 10, 0).is_err());
                let after = std::fs::read(fx._dir.path().join("f")).unwrap();
                assert!(
                    after == before,
                    "{format:?} {size}: fallocate changed the file"
                );
                assert_eq!(fx.read_all(&c), data);
                let mut c2 = Content::default();
                load(&mut c2, &fx.io()).unwrap();
                assert_eq!(c2.size(), size);
            }
        }
    }

    /// A backing call seen by [`Calls`]: whether its descriptor is O_DIRECT, and where.
    #[derive(Debug, Clone, PartialEq)]
    enum Call {
        Read {
            direct: bool,
            off: u64,
            len: usize,
            got: usize,
        },
        Write {
            direct: bool,
            off: u64,
            len: usize,
        },
    }

    /// Records this thread's backing reads and writes.
    #[derive(Default)]
    struct Calls(std::cell::RefCell<Vec<Call>>);

    fn is_direct(fd: std::os::fd::BorrowedFd<'_>) -> bool {
        rustix::fs::fcntl_getfl(fd)
            .unwrap()
            .contains(rustix::fs::OFlags::DIRECT)
    }

    impl backing::Recorder for Calls {
        fn record(&self, op: &backing::Op<'_>) {
            let call = match *op {
                backing::Op::Read { fd, off, len, got } => Call::Read {
                    direct: is_direct(fd),
                    off,
                    len,
                    got,
                },
                backing::Op::Write { fd, off, data } => Call::Write {
                    direct: is_direct(fd),
                    off,
                    len: data.len(),
                },
                _ => return,
            };
            self.0.borrow_mut().push(call);
        }
    }

    /// The calls `f` makes on this thread.
    fn calls_of<R>(f: impl FnOnce() -> R) -> (R, Vec<Call>) {
        let rec = std::rc::Rc::new(Calls::default());
        backing::set_thread_recorder(Some(rec.clone()));
        let r = f();
        backing::set_thread_recorder(None);
        (r, rec.0.take())
    }

    impl Fixture {
        /// An O_DIRECT descriptor of the fixture's file.
        fn open_direct(&self) -> File {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(self._dir.path().join("f"))
                .unwrap()
        }
    }

    #[test]
    fn the_header_of_a_new_file_is_written_through_the_o_direct_descriptor() {
        for format in FileFormat::ALL {
            // Aligned (the data goes O_DIRECT too) and unaligned first writes.
            for (off, len) in [(0u64, 8192usize), (100, 50)] {
                let (fx, mut c) = loaded_in(format);
                let direct = fx.open_direct();
                let io = Io {
                    direct: Some(&direct),
                    ..fx.io()
                };
                let data = vec![7u8; len];
                let (r, calls) = calls_of(|| write(&mut c, &io, off, &data));
                assert_eq!(r.unwrap(), len);
                let header: Vec<_> = calls
                    .iter()
                    .filter(|c| matches!(c, Call::Write { off: 0, .. }))
                    .collect();
                assert_eq!(
                    header,
                    [&Call::Write {
                        direct: true,
                        off: 0,
                        len: HEADER_LEN as usize
                    }],
                    "{format:?} write {off}+{len}: {calls:?}"
                );
                let mut want = vec![0u8; off as usize];
                want.extend_from_slice(&data);
                assert_eq!(fx.read_all(&c), want);
            }
        }
    }

    #[test]
    fn a_short_o_direct_read_is_the_end_of_the_file() {
        for format in FileFormat::ALL {
            for size in [5000usize, 4097, 8191] {
                let (fx, mut c) = loaded_in(format);
                let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
                write(&mut c, &fx.io(), 0, &data).unwrap();
                let direct = fx.open_direct();
                let io = Io {
                    direct: Some(&direct),
                    ..fx.io()
                };
                // An aligned request for the last sector, which the file ends inside.
                let mut got = Vec::new();
                let (r, calls) =
                    calls_of(|| read(&c, &io, 4096, 4096, |d| got.extend_from_slice(d)));
                r.unwrap();
                assert!(got == data[4096..], "{format:?} {size}: wrong bytes");
                let direct_reads: Vec<_> = calls
                    .iter()
                    .filter(|c| matches!(c, Call::Read { direct: true, .. }))
                    .collect();
                assert_eq!(
                    direct_reads,
                    [&Call::Read {
                        direct: true,
                        off: 2 * 4096,
                        len: 4096,
                        got: (plain_size_to_backing_size(format, size as u64) - 2 * 4096).min(4096)
                            as usize,
                    }],
                    "{format:?} {size}: one aligned O_DIRECT read, short at the end"
                );
            }
        }
    }

    #[test]
    fn an_append_that_fails_part_way_restores_the_old_tail() {
        for format in FileFormat::ALL {
            // Old sizes that end inside a 16-byte block and inside a sector.
            for old in [100u64, 4100, 4096 + 16] {
                let (fx, mut c) = loaded_in(format);
                let data: Vec<u8> = (0..old).map(|i| (i % 251) as u8 + 1).collect();
                write(&mut c, &fx.io(), 0, &data).unwrap();
                let path = fx._dir.path().join("f");
                let before = std::fs::read(&path).unwrap();
                // The append's pwrite stores 1000 bytes (the old last block or sector
                // rewritten, new data after it), then fails as btrfs may after fallocate.
                backing::fail_thread_write(1, 1000);
                let e = write(&mut c, &fx.io(), old, &[0xa5u8; 8000]).unwrap_err();
                backing::fail_thread_write(0, 0);
                assert!(matches!(e, FsError::Os(Errno::NOSPC)), "{e:?}");
                let after = std::fs::read(&path).unwrap();
                assert_eq!(after.len(), before.len(), "{format:?} {old}: length");
                let differ = after.iter().zip(&before).filter(|(a, b)| a != b).count();
                assert_eq!(differ, 0, "{format:?} {old}: backing bytes changed");
                assert_eq!(c.size(), old);
                assert!(fx.read_all(&c) == data, "{format:?} {old}: content");
                // Growing now shows zeros past the old end, not the failed append's bytes.
                truncate(&mut c, &fx.io(), old + 500).unwrap();
                let mut want = data.clone();
                want.resize(old as usize + 500, 0);
                assert!(fx.read_all(&c) == want, "{format:?} {old}: grown");
                // A later write succeeds and reads back, also after a fresh load.
                write(&mut c, &fx.io(), old + 500, b"next record").unwrap();
                want.extend_from_slice(b"next record");
                assert!(fx.read_all(&c) == want, "{format:?} {old}: next write");
                let mut c2 = Content::default();
                load(&mut c2, &fx.io()).unwrap();
                assert!(fx.read_all(&c2) == want, "{format:?} {old}: reloaded");
            }
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
        let loaded = || loaded_in(FileFormat::V1);
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
