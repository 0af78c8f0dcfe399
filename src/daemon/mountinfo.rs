//! /proc/self/mountinfo: is a path a mount point, and of what.

use std::path::{Path, PathBuf};

/// One mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// The source earfs gives a mount of `backing` (its `fsname`): `earfs:BACKING`.
pub fn source_of(backing: &Path) -> String {
    format!("earfs:{}", backing.display())
}

impl MountEntry {
    /// Whether this is an earfs mount of `backing` (a canonical path).
    pub fn serves(&self, backing: &Path) -> bool {
        self.fstype == crate::fuse::FSTYPE && self.source == source_of(backing)
    }
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse mountinfo text.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mp = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let source = post.next().unwrap_or("");
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mp)),
                fstype: fstype.to_string(),
                source: unescape(source),
            })
        })
        .collect()
}

/// Whether an earfs mount of `backing` is in the mount table.
pub fn mounted_from(backing: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse(&t).iter().any(|m| m.serves(backing)))
        .unwrap_or(false)
}

/// The topmost mount at exactly `path`, if any.
pub fn find_mount(path: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_escaped_fuse_mount() {
        let t = "36 35 98:0 / /mnt/my\\040dir rw,noatime master:1 - fuse.earfs earfs:/data/a\\040b rw,user_id=0\n\
                 37 35 98:0 / /other rw - ext4 /dev/vda rw\n";
        let m = parse(t);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/my dir"));
        assert_eq!(m[0].fstype, "fuse.earfs");
        assert_eq!(m[0].source, "earfs:/data/a b");
        assert_eq!(m[1].fstype, "ext4");
    }

    #[test]
    fn an_earfs_mount_serves_its_backing_directory_only() {
        let t = "36 35 98:0 / /mnt rw - fuse.earfs earfs:/data/a\\040b rw\n\
                 37 35 98:0 / /m2 rw - fuse.other earfs:/data/c rw\n";
        let m = parse(t);
        assert!(m[0].serves(Path::new("/data/a b")));
        assert!(!m[0].serves(Path::new("/data/a")));
        assert!(
            !m[1].serves(Path::new("/data/c")),
            "not an earfs file system"
        );
        assert_eq!(source_of(Path::new("/data/a b")), m[0].source);
    }
}
