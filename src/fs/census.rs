//! Counting a volume's files by format and key version (`earfs info --files`,
//! `earfs status --files`). Reads the first bytes of each backing file's header; needs
//! no key, changes nothing, and may run while the volume is mounted.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::content::{
    FileFormat, HEADER_LEN, backing_size_to_plain_size, header_names, header_never_written,
    size_is_format_independent,
};

/// How many damaged files a census names (it counts them all).
const NAMED_DAMAGED: usize = 20;

/// What a census found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Census {
    /// Regular files, of every kind below. A file with several hard links is one file
    /// (counted at its first name; see `more_links`).
    pub files: u64,
    /// Further names (hard links) of files counted once already.
    #[serde(default)]
    pub more_links: u64,
    pub directories: u64,
    /// Files by the format their header names ("1", "2").
    pub formats: BTreeMap<String, u64>,
    /// Format-1 files whose size is a multiple of 16: their header is rewritten as v2
    /// before their first write that leaves another size. The other v1 files stay v1
    /// until truncated to zero or replaced.
    pub v1_convertible: u64,
    /// Files by the key version their header names ("1", "2", …).
    pub key_versions: BTreeMap<String, u64>,
    /// Empty files: no header yet (they get one of the volume's format at their first
    /// write).
    pub empty: u64,
    /// Files whose header never reached the disk (all zero after a crash): they read
    /// as zeros and get a new header at their first change.
    pub no_header: u64,
    /// Files that are not earfs files: shorter than a header, another magic, a format
    /// this build does not know, or a length that no size codes to.
    pub damaged: u64,
    /// The first damaged files, with the reason.
    pub damaged_files: Vec<(PathBuf, String)>,
}

impl Census {
    fn damaged(&mut self, path: &Path, why: String) {
        self.damaged += 1;
        if self.damaged_files.len() < NAMED_DAMAGED {
            self.damaged_files.push((path.to_path_buf(), why));
        }
    }

    /// Count the file at `path`, unless it is another name of a file in `linked` (the
    /// (device, inode) of the files seen so far that have more than one link).
    fn count(&mut self, path: &Path, linked: &mut HashSet<(u64, u64)>) -> std::io::Result<()> {
        let open = |flags| {
            File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | flags)
                .open(path)
        };
        // O_NOATIME is refused (EPERM) to a caller who does not own the file.
        let mut f = match open(libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0)?,
            r => r?,
        };
        let meta = f.metadata()?;
        if meta.nlink() > 1 && !linked.insert((meta.dev(), meta.ino())) {
            self.more_links += 1;
            return Ok(());
        }
        let len = meta.len();
        self.files += 1;
        if len == 0 {
            self.empty += 1;
            return Ok(());
        }
        let h = read_header_block(&mut f)?;
        let n = h.len();
        if header_never_written(&h[..n]) {
            self.no_header += 1;
            return Ok(());
        }
        match header_names(&h[..n]) {
            Err(e) => self.damaged(path, e.to_string()),
            Ok((format, kv)) => {
                if backing_size_to_plain_size(format, len).is_none() {
                    self.damaged(
                        path,
                        format!(
                            "a length of {len} bytes codes no size in format {}",
                            format.number()
                        ),
                    );
                    return Ok(());
                }
                *self.formats.entry(format.number().to_string()).or_default() += 1;
                *self.key_versions.entry(kv.to_string()).or_default() += 1;
                if format == FileFormat::V1 && size_is_format_independent(len) {
                    self.v1_convertible += 1;
                }
            }
        }
        Ok(())
    }

    /// Files of `format`.
    pub fn of_format(&self, format: FileFormat) -> u64 {
        self.formats
            .get(&format.number().to_string())
            .copied()
            .unwrap_or(0)
    }
}

/// The first bytes of a backing file, up to one header block (fewer if it is shorter).
pub fn read_header_block(f: &mut File) -> std::io::Result<Vec<u8>> {
    let mut h = vec![0u8; HEADER_LEN as usize];
    let mut n = 0;
    while n < h.len() {
        match f.read(&mut h[n..])? {
            0 => break,
            k => n += k,
        }
    }
    h.truncate(n);
    Ok(h)
}

/// Count the files under `backing`. `progress` is called every 1000 files. A file that
/// cannot be opened or read fails the census (an operator must know it was not
/// counted); one that vanishes while the census runs is skipped.
pub fn census(backing: &Path, mut progress: impl FnMut(&Census)) -> std::io::Result<Census> {
    let mut c = Census::default();
    let mut linked = HashSet::new();
    let mut stack = vec![backing.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let top = dir == backing;
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !top => continue,
            Err(e) => return Err(with_path(&dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| with_path(&dir, e))?;
            let name = entry.file_name();
            if top && super::is_reserved_root_name(&name) {
                continue;
            }
            let path = entry.path();
            let kind = match entry.file_type() {
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(with_path(&path, e)),
            };
            if kind.is_dir() {
                c.directories += 1;
                stack.push(path);
            } else if kind.is_file() {
                match c.count(&path, &mut linked) {
                    Ok(()) if c.files.is_multiple_of(1000) => progress(&c),
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(with_path(&path, e)),
                }
            }
        }
    }
    Ok(c)
}

fn with_path(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::{Keyring, new_header};
    use crate::crypto::Dek;
    use crate::fs::CONFIG_NAME;

    fn file(dir: &Path, name: &str, bytes: &[u8]) {
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    #[test]
    fn a_census_counts_files_by_format_key_version_and_kind() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path();
        let keys = Keyring::new([(3, Dek::generate().unwrap())], 3).unwrap();
        let (h1, _) = new_header(&keys, FileFormat::V1).unwrap();
        let (h2, _) = new_header(&keys, FileFormat::V2).unwrap();
        std::fs::create_dir_all(b.join("sub/deeper")).unwrap();
        file(b, CONFIG_NAME, b"not counted");
        // v1: 4096 + 32 is a multiple of 16 (convertible); + 5 is not.
        file(b, "a", &[&h1[..], &[1u8; 32]].concat());
        file(b, "sub/b", &[&h1[..], &[1u8; 5]].concat());
        // v2: 4096 + 16 + 3 codes size 3.
        file(b, "sub/deeper/c", &[&h2[..], &[1u8; 19]].concat());
        file(b, "sub/deeper/d", &h2[..]);
        file(b, "empty", b"");
        file(b, "orphan", &[0u8; 4096 + 16]);
        file(b, "short", b"EARFSHDR");
        file(b, "foreign", &[9u8; 5000]);
        // v2 with a length 1..15 bytes past the header codes no size.
        file(b, "cut", &[&h2[..], &[1u8; 7]].concat());
        std::os::unix::fs::symlink("a", b.join("link")).unwrap();
        // Two more names of "a": still one file.
        std::fs::hard_link(b.join("a"), b.join("a2")).unwrap();
        std::fs::hard_link(b.join("a"), b.join("sub/a3")).unwrap();

        let mut calls = 0;
        let c = census(b, |_| calls += 1).unwrap();
        assert_eq!(c.files, 9, "{c:?}");
        assert_eq!(c.directories, 2);
        assert_eq!(c.more_links, 2);
        assert_eq!(c.of_format(FileFormat::V1), 2);
        assert_eq!(c.of_format(FileFormat::V2), 2);
        assert_eq!(c.v1_convertible, 1);
        assert_eq!(c.key_versions.get("3"), Some(&4));
        assert_eq!((c.empty, c.no_header, c.damaged), (1, 1, 3));
        let mut named: Vec<_> = c
            .damaged_files
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        named.sort();
        assert_eq!(named, ["cut", "foreign", "short"]);
        assert_eq!(calls, 0);
    }

    #[test]
    fn a_census_of_a_missing_directory_fails_with_its_path() {
        let d = tempfile::tempdir().unwrap();
        let e = census(&d.path().join("gone"), |_| {}).unwrap_err();
        assert!(e.to_string().contains("gone"), "{e}");
    }
}
