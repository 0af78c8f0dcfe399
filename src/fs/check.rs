//! Checking backing files outside a mount, for `earfs fsck`: the header and length of
//! one file, judged by the rules the mount applies when it opens it (a file the mount
//! would fail with EIO is damaged, nothing else is), and the blocks a file holds past
//! its end (a space reservation a crash left behind), which `fsck --repair` frees.
//!
//! Only the header and the length are checked: data sectors carry no MAC (XTS), so
//! their content cannot be told from damage.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::content::{
    FileFormat, HEADER_LEN, HeaderError, Keyring, backing_size_to_plain_size, decode_header,
    header_names, header_never_written,
};

use super::backing;
use super::rewrite::{self, Record, set_times, work_entries};

/// What a damaged file is: a stable short name (`problem`, for scripts) and a line
/// for a person (`reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// "short", "bad-magic", "unknown-format", "unknown-flags", "unknown-key-version",
    /// "bad-mac", "bad-length" or "key-derivation".
    pub problem: &'static str,
    pub reason: String,
}

/// The verdict on one backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Length 0: no header yet (it gets one at its first write).
    Empty,
    /// A header block of zeros: the header never reached the disk before a crash, so
    /// nothing in the file was durable; the mount reads it as zeros. Not damage.
    NoHeader,
    /// A header that checks, and a length that codes `size` bytes in its format
    /// (`size` 0 with a length of 4096 is a header alone).
    Header {
        format: FileFormat,
        key_version: u32,
        size: u64,
    },
    /// A file the mount would fail with EIO.
    Damaged(Damage),
}

fn damage(problem: &'static str, reason: String) -> Verdict {
    Verdict::Damaged(Damage { problem, reason })
}

fn header_damage(e: HeaderError, keys: Option<&Keyring>) -> Verdict {
    match e {
        HeaderError::Short => damage("short", "the header is cut short".into()),
        HeaderError::BadMagic => damage(
            "bad-magic",
            "not an earfs file: no EARFSHDR magic (a plaintext file, another program's, or an overwritten header)".into(),
        ),
        HeaderError::UnsupportedVersion(v) => damage(
            "unknown-format",
            format!("the header names file format {v}, which this earfs does not know"),
        ),
        HeaderError::UnknownFlags(f) => damage(
            "unknown-flags",
            format!("the header has unknown flags {f:#x}"),
        ),
        HeaderError::UnknownKeyVersion(v) => {
            let held: Vec<u32> = keys.map(Keyring::versions).unwrap_or_default();
            damage(
                "unknown-key-version",
                format!(
                    "the header names key version {v}, which the keyring does not hold (it holds {held:?}): another node rotated (import its keyring with `earfs import-keyring`), or the version was retired while this file used it"
                ),
            )
        }
        HeaderError::BadMac => damage(
            "bad-mac",
            "the header MAC does not verify (a damaged header, or a file from another volume)"
                .into(),
        ),
        HeaderError::Crypto(e) => damage("key-derivation", format!("the file key: {e}")),
    }
}

/// Judge a backing file of length `len` whose first bytes are `h` (up to 4096 of
/// them; fewer only if the file is shorter). With `keys` the header is authenticated
/// (MAC, a key version the keyring holds), as the mount does; without, only what
/// needs no key is checked (magic, format, flags, length).
pub fn check_header(h: &[u8], len: u64, keys: Option<&Keyring>) -> Verdict {
    if len == 0 {
        return Verdict::Empty;
    }
    if len < HEADER_LEN || (h.len() as u64) < HEADER_LEN {
        return damage(
            "short",
            format!("the backing file is {len} bytes, shorter than the {HEADER_LEN}-byte header"),
        );
    }
    if header_never_written(h) {
        return Verdict::NoHeader;
    }
    let (format, key_version) = match keys {
        Some(k) => match decode_header(k, h) {
            Ok(c) => (c.format(), c.key_version()),
            Err(e) => return header_damage(e, keys),
        },
        None => match header_names(h) {
            Ok(names) => {
                let flags = u16::from_le_bytes([h[10], h[11]]);
                if flags != 0 {
                    return header_damage(HeaderError::UnknownFlags(flags), None);
                }
                names
            }
            Err(e) => return header_damage(e, None),
        },
    };
    match backing_size_to_plain_size(format, len) {
        Some(size) => Verdict::Header {
            format,
            key_version,
            size,
        },
        None => damage(
            "bad-length",
            format!(
                "a backing length of {len} bytes is not a length of a format-{} file (1 to 15 bytes past the header)",
                format.number()
            ),
        ),
    }
}

/// One backing file, opened and judged.
#[derive(Debug)]
pub struct Checked {
    pub file: File,
    pub meta: Metadata,
    pub verdict: Verdict,
}

/// Open the backing file at `path` (without following a symlink, without changing
/// its access time where the caller may) and judge it.
pub fn check_file(path: &Path, keys: Option<&Keyring>) -> std::io::Result<Checked> {
    let open = |flags| {
        File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | flags)
            .open(path)
    };
    // O_NOATIME is refused (EPERM) to a caller who does not own the file.
    let mut file = match open(libc::O_NOATIME) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0)?,
        r => r?,
    };
    let meta = file.metadata()?;
    let len = meta.len();
    let mut h = vec![0u8; HEADER_LEN.min(len) as usize];
    let mut n = 0;
    while n < h.len() {
        match file.read(&mut h[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let verdict = check_header(&h[..n], len, keys);
    Ok(Checked {
        file,
        meta,
        verdict,
    })
}

/// Bytes of the filesystem's blocks that a file of metadata `m` holds past its end,
/// or 0 when none can be told apart from the filesystem's own overhead.
///
/// Allocated space (`st_blocks`) beyond the length rounded up to the block size, less
/// an allowance for the filesystem's own metadata counted in `st_blocks` (extent tree
/// and extended-attribute blocks: 16 blocks and 1/1024 of the length). SEEK_DATA
/// cannot help: it stops at the end of the file, and ext4 and tmpfs report reserved
/// (unwritten) blocks inside the file as holes. So a reservation smaller than the
/// allowance, or one hidden by holes inside a sparse file, is not seen.
pub fn reserved_past_end(m: &Metadata) -> u64 {
    let blk = m.blksize().max(512);
    let len = m.len();
    let allocated = m.blocks().saturating_mul(512);
    let rounded = len.div_ceil(blk).saturating_mul(blk);
    let allowance = 16 * blk + len / 1024;
    if allocated > rounded.saturating_add(allowance) {
        allocated - rounded
    } else {
        0
    }
}

fn times_of(m: &Metadata) -> ((i64, i64), (i64, i64)) {
    ((m.atime(), m.atime_nsec()), (m.mtime(), m.mtime_nsec()))
}

fn trim_record_path(work: &Path, ino: u64) -> PathBuf {
    work.join(format!("trim-{ino}.json"))
}

/// Free the blocks the backing file `rel` (under the volume root `root`) holds past
/// its end; its length, content and times stay. Truncating to the same length frees
/// them (ext4, xfs, tmpfs) but sets the modification time, which the mount shows as
/// the file's: so its times are recorded first (`.earfs-work/trim-INO.json`, written
/// atomically), put back after, and the record removed. [`finish_trim`] puts back
/// the times of a trim a crash interrupted. The caller holds the volume's lock.
pub fn free_past_end(root: &Path, rel: &Path) -> std::io::Result<()> {
    let path = root.join(rel);
    let f = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)?;
    let m = f.metadata()?;
    let work = rewrite::work_dir(root)?;
    let (atime, mtime) = times_of(&m);
    let record = Record {
        path: rel.to_path_buf(),
        ino: m.ino(),
        atime,
        mtime,
    };
    let rec = trim_record_path(&work, m.ino());
    let json = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
    rewrite::write_atomic(&rec, &json)?;
    trim(&f, m.len(), atime, mtime)?;
    std::fs::remove_file(&rec)?;
    File::open(&work)?.sync_all()
}

fn trim(f: &File, len: u64, atime: (i64, i64), mtime: (i64, i64)) -> std::io::Result<()> {
    backing::ftruncate(f, len)?;
    set_times(f, atime, mtime)?;
    backing::sync(f, false)?;
    Ok(())
}

/// The records of trims ([`free_past_end`]) a crash interrupted: each record's path
/// in the work directory and what it holds (a record that does not parse: `None`).
pub fn pending_trims(root: &Path) -> std::io::Result<Vec<(PathBuf, Option<Record>)>> {
    let mut out = Vec::new();
    for (name, path) in work_entries(root)? {
        if let Some(ino) = name
            .strip_prefix("trim-")
            .and_then(|n| n.strip_suffix(".json"))
        {
            let text = std::fs::read(&path)?;
            let rec = serde_json::from_slice::<Record>(&text)
                .ok()
                .filter(|r| r.ino.to_string() == ino);
            out.push((path, rec));
        }
    }
    Ok(out)
}

/// Finish the trim recorded at `rec_path`: trim the file again (if it is still at
/// its recorded path, the same inode) and put its times back, then remove the
/// record. Returns whether the file was found.
pub fn finish_trim(root: &Path, rec_path: &Path, rec: Option<&Record>) -> std::io::Result<bool> {
    let mut found = false;
    if let Some(r) = rec {
        let path = root.join(&r.path);
        if let Ok(f) = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            let m = f.metadata()?;
            if m.is_file() && m.ino() == r.ino {
                trim(&f, m.len(), r.atime, r.mtime)?;
                found = true;
            }
        }
    }
    std::fs::remove_file(rec_path)?;
    if let Some(dir) = rec_path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::{encode_header, new_header};
    use crate::crypto::Dek;

    fn ring(versions: &[u32], current: u32) -> Keyring {
        Keyring::new(
            versions.iter().map(|&v| (v, Dek::generate().unwrap())),
            current,
        )
        .unwrap()
    }

    fn problem(v: Verdict) -> &'static str {
        match v {
            Verdict::Damaged(d) => d.problem,
            other => panic!("not damaged: {other:?}"),
        }
    }

    #[test]
    fn each_kind_of_damage_is_named_and_healthy_files_are_not() {
        let k = ring(&[1, 2], 2);
        let (h2, _) = new_header(&k, FileFormat::V2).unwrap();
        let (h1, _) = new_header(&k, FileFormat::V1).unwrap();
        let keys = Some(&k);
        assert_eq!(check_header(&[], 0, keys), Verdict::Empty);
        assert_eq!(
            check_header(&h2[..], 4096, keys),
            Verdict::Header {
                format: FileFormat::V2,
                key_version: 2,
                size: 0
            }
        );
        assert_eq!(
            check_header(&h1[..], 4096 + 5, keys),
            Verdict::Header {
                format: FileFormat::V1,
                key_version: 2,
                size: 5
            }
        );
        assert_eq!(
            check_header(&[0u8; 4096], 4096 + 7, keys),
            Verdict::NoHeader
        );
        // Every v2 length 1..15 past the header is damage; 16 is size 16.
        for extra in 1..16 {
            assert_eq!(
                problem(check_header(&h2[..], 4096 + extra, keys)),
                "bad-length"
            );
        }
        assert!(matches!(
            check_header(&h2[..], 4096 + 16, keys),
            Verdict::Header { size: 16, .. }
        ));
        assert_eq!(problem(check_header(&[0u8; 100], 100, keys)), "short");
        assert_eq!(problem(check_header(&[0u8; 4095], 4095, keys)), "short");
        assert_eq!(problem(check_header(&[7u8; 4096], 5000, keys)), "bad-magic");
        let mut bad = h2.clone();
        bad[40] ^= 1;
        assert_eq!(problem(check_header(&bad[..], 4096, keys)), "bad-mac");
        let mut bad = h2.clone();
        bad[8] = 9;
        assert_eq!(
            problem(check_header(&bad[..], 4096, keys)),
            "unknown-format"
        );
        assert_eq!(
            problem(check_header(&bad[..], 4096, None)),
            "unknown-format"
        );
        let mut bad = h2.clone();
        bad[10] = 1;
        assert_eq!(problem(check_header(&bad[..], 4096, keys)), "unknown-flags");
        assert_eq!(problem(check_header(&bad[..], 4096, None)), "unknown-flags");
        let other = ring(&[7], 7);
        let h7 = encode_header(&other, FileFormat::V2, 7, &[3u8; 16]).unwrap();
        match check_header(&h7[..], 4096, keys) {
            Verdict::Damaged(d) => {
                assert_eq!(d.problem, "unknown-key-version");
                assert!(d.reason.contains("key version 7"), "{}", d.reason);
            }
            v => panic!("{v:?}"),
        }
        // Without keys a header is judged by what needs none.
        assert_eq!(
            check_header(&h7[..], 4096, None),
            Verdict::Header {
                format: FileFormat::V2,
                key_version: 7,
                size: 0
            }
        );
    }

    #[test]
    fn a_reservation_past_the_end_is_seen_and_freed_with_the_times_kept() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let f = root.join("f");
        std::fs::write(&f, vec![5u8; 5000]).unwrap();
        let file = File::options().write(true).open(&f).unwrap();
        rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::KEEP_SIZE, 5000, 1 << 20).unwrap();
        set_times(&file, (1_000_000, 5), (1_600_000_000, 123)).unwrap();
        drop(file);
        let m = std::fs::metadata(&f).unwrap();
        let past = reserved_past_end(&m);
        assert!(past >= 1 << 20, "{past}");
        free_past_end(root, Path::new("f")).unwrap();
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!(reserved_past_end(&m), 0);
        assert_eq!(m.len(), 5000);
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_600_000_000, 123));
        assert_eq!(std::fs::read(&f).unwrap(), vec![5u8; 5000]);
        assert!(pending_trims(root).unwrap().is_empty());
    }

    #[test]
    fn an_interrupted_trim_puts_the_times_back() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let f = root.join("f");
        std::fs::write(&f, b"data").unwrap();
        let ino = std::fs::metadata(&f).unwrap().ino();
        let work = rewrite::work_dir(root).unwrap();
        let rec = Record {
            path: "f".into(),
            ino,
            atime: (10, 1),
            mtime: (20, 2),
        };
        let at = trim_record_path(&work, ino);
        rewrite::write_atomic(&at, &serde_json::to_vec(&rec).unwrap()).unwrap();
        std::fs::write(work.join("trim-9.json"), b"{torn").unwrap();
        let pending = pending_trims(root).unwrap();
        assert_eq!(pending.len(), 2);
        for (p, r) in &pending {
            let found = finish_trim(root, p, r.as_ref()).unwrap();
            assert_eq!(found, r.is_some());
        }
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (20, 2));
        assert!(pending_trims(root).unwrap().is_empty());
    }
}
