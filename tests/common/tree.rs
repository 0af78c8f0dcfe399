//! Plaintext trees for the data-command tests (`adopt`, `reencrypt`, `decrypt`, `fsck`):
//! a seeded tree of mixed files ([`make_tree`]), a manifest of everything a copy must
//! keep ([`manifest`]: kinds, contents by hash, modes, owners, times, `user.*`
//! attributes, symlink targets, hard-link groups, sparseness), and a way to kill a
//! command with SIGKILL at seeded random points of its run ([`kill_points`]).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

/// One object of a tree, as a copy must keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// "file", "dir", "symlink", "fifo".
    pub kind: &'static str,
    /// Permission bits (0o7777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time (seconds, nanoseconds); directories' too.
    pub mtime: (i64, i64),
    /// Files: size and SHA-256 of the content.
    pub size: u64,
    pub sha256: String,
    /// Files: whether the file has a hole of at least 64 KiB (blocks allocated well
    /// under its size). Only checked by [`assert_same`] when the source was sparse.
    pub sparse: bool,
    /// Symlinks: the target.
    pub target: Option<PathBuf>,
    /// `user.*` attributes.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Files with more than one name in the tree: the sorted names of the group
    /// (relative paths), the same for every member.
    pub links: Vec<PathBuf>,
}

/// Relative path → entry, for every object under `root` (not `root` itself), skipping
/// the names in `skip` at the top (e.g. `earfs.conf` when reading a backing tree).
pub type Manifest = BTreeMap<PathBuf, Entry>;

fn xattrs_of(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 65536];
    let Ok(n) = rustix::fs::llistxattr(path, &mut names[..]) else {
        return out;
    };
    for name in names[..n]
        .split(|&b| b == 0)
        .filter(|n| n.starts_with(b"user."))
    {
        let name = std::str::from_utf8(name).unwrap();
        let mut v = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(path, name, &mut v[..]).unwrap();
        out.insert(name.to_string(), v[..len].to_vec());
    }
    out
}

/// The manifest of the tree at `root`.
pub fn manifest(root: &Path, skip: &[&str]) -> Manifest {
    let mut m = Manifest::new();
    let mut groups: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            if dir == root && skip.iter().any(|s| OsStr::new(s) == e.file_name()) {
                continue;
            }
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let md = std::fs::symlink_metadata(&path).unwrap();
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                stack.push(path.clone());
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_file() {
                "file"
            } else if std::os::unix::fs::FileTypeExt::is_fifo(&ft) {
                "fifo"
            } else {
                "other"
            };
            let (size, sha256, sparse) = if kind == "file" {
                let data = std::fs::read(&path).unwrap();
                let sparse = md.len() >= 128 * 1024 && md.blocks() * 512 + 64 * 1024 <= md.len();
                (
                    data.len() as u64,
                    hex::encode(Sha256::digest(&data)),
                    sparse,
                )
            } else {
                (0, String::new(), false)
            };
            if kind == "file" && md.nlink() > 1 {
                groups
                    .entry((md.dev(), md.ino()))
                    .or_default()
                    .push(rel.clone());
            }
            m.insert(
                rel,
                Entry {
                    kind,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    mtime: (md.mtime(), md.mtime_nsec()),
                    size,
                    sha256,
                    sparse,
                    target: (kind == "symlink").then(|| std::fs::read_link(&path).unwrap()),
                    xattrs: if kind == "symlink" {
                        BTreeMap::new()
                    } else {
                        xattrs_of(&path)
                    },
                    links: Vec::new(),
                },
            );
        }
    }
    for (_, mut names) in groups {
        if names.len() < 2 {
            continue;
        }
        names.sort();
        for n in &names {
            m.get_mut(n).unwrap().links = names.clone();
        }
    }
    m
}

/// Panic, naming the first differences, unless `got` keeps everything of `want`:
/// the same objects with the same kind, content, mode, owner, mtime, attributes,
/// targets and link groups, and every file sparse in `want` sparse in `got`.
/// Directory mtimes are compared too.
pub fn assert_same(want: &Manifest, got: &Manifest, what: &str) {
    let mut diffs = Vec::new();
    for (p, w) in want {
        match got.get(p) {
            None => diffs.push(format!("{}: missing", p.display())),
            Some(g) => {
                let mut g2 = g.clone();
                // Sparseness: only "sparse in want ⇒ sparse in got".
                g2.sparse = w.sparse && g.sparse;
                if w.sparse && !g.sparse {
                    diffs.push(format!("{}: no longer sparse", p.display()));
                }
                let mut w2 = w.clone();
                w2.sparse = g2.sparse;
                if w2 != g2 {
                    diffs.push(format!("{}: want {w:?}\n      got {g:?}", p.display()));
                }
            }
        }
    }
    for p in got.keys() {
        if !want.contains_key(p) {
            diffs.push(format!("{}: not expected", p.display()));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} difference(s):\n  {}",
        diffs.len(),
        diffs
            .iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let ts = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &ts,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// Fill `root` (an existing, empty directory) with a seeded tree of about `files`
/// regular files of mixed sizes (empty, 1 byte, odd sizes around 16 and 4096, up to
/// `max_size`), in nested directories, with: empty directories, a sparse file (data,
/// a 1 MiB hole, data, a hole at the end), hard-link groups (across directories),
/// symlinks (relative, absolute, dangling), odd modes, other owners, `user.*`
/// attributes, and old timestamps with nanoseconds. Directory times are set last.
pub fn make_tree(root: &Path, seed: u64, files: usize, max_size: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let dirs = [
        "",
        "base",
        "base/1",
        "base/16384",
        "pg_wal",
        "global",
        "a/b/c/d",
    ];
    for d in &dirs[1..] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for d in ["empty", "a/empty-too"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let fixed = [0usize, 1, 15, 16, 17, 4095, 4096, 4097, 65536 + 3];
    let mut made: Vec<PathBuf> = Vec::new();
    for i in 0..files {
        let dir = dirs[rng.gen_range(0..dirs.len())];
        let size = if i < fixed.len() {
            fixed[i].min(max_size)
        } else {
            match rng.gen_range(0..10) {
                0..=5 => rng.gen_range(0..8192),
                6..=8 => rng.gen_range(0..max_size / 8 + 1),
                _ => rng.gen_range(0..max_size + 1),
            }
        };
        let rel = Path::new(dir).join(format!("f{i}"));
        let mut data = vec![0u8; size];
        rng.fill(&mut data[..]);
        std::fs::write(root.join(&rel), &data).unwrap();
        made.push(rel);
    }
    // A sparse file: 5000 bytes, a 1 MiB hole, 4096 bytes, a hole to the end.
    let sparse = root.join("base/sparse");
    {
        let mut f = std::fs::File::create(&sparse).unwrap();
        let mut d = vec![0u8; 5000];
        rng.fill(&mut d[..]);
        f.write_all(&d).unwrap();
        let mut d = vec![0u8; 4096];
        rng.fill(&mut d[..]);
        std::os::unix::fs::FileExt::write_all_at(&f, &d, (1 << 20) + 8192).unwrap();
        f.set_len(3 << 20).unwrap();
    }
    made.push("base/sparse".into());
    // Hard links: two groups, one across directories, one of three names.
    std::fs::hard_link(root.join(&made[5]), root.join("global/link-a")).unwrap();
    std::fs::hard_link(root.join(&made[7]), root.join("a/b/link-b1")).unwrap();
    std::fs::hard_link(root.join(&made[7]), root.join("a/link-b2")).unwrap();
    // Symlinks.
    symlink("../base/f3", root.join("a/rel-link")).unwrap();
    symlink("/nonexistent/target", root.join("dangling")).unwrap();
    symlink(root.join("base"), root.join("abs-link")).unwrap();
    // Modes, owners, attributes, times.
    for (n, rel) in made.iter().enumerate() {
        let p = root.join(rel);
        let mode = [0o600, 0o644, 0o640, 0o400, 0o755, 0o4755][n % 6];
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        if n % 4 == 1 {
            std::os::unix::fs::lchown(&p, Some(1000 + n as u32), Some(2000)).unwrap();
            // chown clears set-id bits: set the mode again.
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        if n % 5 == 2 {
            rustix::fs::setxattr(
                &p,
                "user.origin",
                format!("file {n}").as_bytes(),
                rustix::fs::XattrFlags::empty(),
            )
            .unwrap();
        }
        set_mtime(
            &p,
            1_600_000_000 + n as i64 * 3600,
            (n as i64 * 7919) % 1_000_000_000,
        );
    }
    rustix::fs::setxattr(
        root.join("base"),
        "user.dir",
        b"directory attribute",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    std::os::unix::fs::lchown(root.join("dangling"), Some(1234), Some(5678)).unwrap();
    set_mtime(&root.join("dangling"), 1_500_000_000, 5);
    // Directories last, deepest first, so that nothing changes their times after.
    let mut all_dirs: Vec<PathBuf> = dirs[1..].iter().map(PathBuf::from).collect();
    all_dirs.extend(["a", "a/b", "a/b/c", "empty", "a/empty-too"].map(PathBuf::from));
    all_dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for (n, d) in all_dirs.iter().enumerate() {
        let p = root.join(d);
        if n % 3 == 0 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o750)).unwrap();
        }
        set_mtime(&p, 1_550_000_000 + n as i64, 123_456_789);
    }
}

/// The total size of the regular files of a manifest.
pub fn total_bytes(m: &Manifest) -> u64 {
    m.values()
        .filter(|e| e.kind == "file")
        .map(|e| e.size)
        .sum()
}

/// `cp -a --sparse=always ARGS…` (hard links and holes kept), which must succeed.
fn cp_a(from: impl AsRef<std::ffi::OsStr>, to: &Path) {
    let out = Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cp -a: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copy a directory tree exactly (`cp -a`, hard links and holes kept): to `to`, or
/// into it as its last name when `to` is a directory.
pub fn copy_tree(from: &Path, to: &Path) {
    cp_a(from, to);
}

/// Copy what is in the directory `from` into the existing directory `into` (a mount,
/// usually): `cp -a FROM/. INTO`.
pub fn copy_contents(from: &Path, into: &Path) {
    cp_a(format!("{}/.", from.display()), into);
}

/// The system calls a kill may be injected into: those that change files and
/// directories, and reads (so that a kill can fall between two writes).
pub const KILL_SYSCALLS: &[&str] = &[
    "openat",
    "read",
    "pread64",
    "write",
    "pwrite64",
    "fsync",
    "fdatasync",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "linkat",
    "mkdirat",
    "fallocate",
    "ftruncate",
    "fchown",
    "fchmod",
    "fsetxattr",
    "utimensat",
    "symlinkat",
];

/// How many times a complete run of `earfs ARGS` calls each syscall of
/// [`KILL_SYSCALLS`] (all threads together), from `strace -f -c`.
pub fn syscall_counts(args: &[&str]) -> (Output, BTreeMap<String, u64>) {
    let list = KILL_SYSCALLS.join(",");
    let summary = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new("strace")
        .args(["-f", "-c", "-U", "name,calls", "-e"])
        .arg(format!("trace={list}"))
        .arg("-o")
        .arg(summary.path())
        .arg(super::earfs())
        .args(args)
        .output()
        .unwrap();
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(summary.path()).unwrap().lines() {
        let mut it = line.split_whitespace();
        if let (Some(name), Some(calls)) = (it.next(), it.next())
            && let Ok(n) = calls.parse::<u64>()
            && KILL_SYSCALLS.contains(&name)
        {
            counts.insert(name.to_string(), n);
        }
    }
    (out, counts)
}

/// `n` seeded kill points `(syscall, k)`: kill on the k-th call of that syscall,
/// chosen with weights by how often a run makes each call, out of `counts` (from a
/// complete run, [`syscall_counts`]).
pub fn kill_points(counts: &BTreeMap<String, u64>, seed: u64, n: usize) -> Vec<(String, u64)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let total: u64 = counts.values().sum();
    assert!(total > 0, "no system calls counted: {counts:?}");
    (0..n)
        .map(|_| {
            let mut pick = rng.gen_range(0..total);
            for (name, &c) in counts {
                if pick < c {
                    return (name.clone(), pick + 1);
                }
                pick -= c;
            }
            unreachable!()
        })
        .collect()
}

/// Run `earfs ARGS` under strace, killed with SIGKILL on entering the `k`-th call of
/// `syscall` by any one thread (strace counts per thread, so with several workers a
/// `k` near the total of [`syscall_counts`] may never come: give `--jobs 1`, or few
/// workers, where the kill must land). Returns the output (the command may have
/// finished first if no thread made `k` calls).
pub fn run_killed(args: &[&str], syscall: &str, k: u64) -> Output {
    Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e"])
        .arg(format!("inject={syscall}:signal=KILL:when={k}"))
        .arg(super::earfs())
        .args(args)
        .output()
        .unwrap()
}

/// Whether a run was killed by SIGKILL (strace reports the tracee's signal as its own
/// exit: 128 + 9, or the signal itself).
pub fn was_killed(out: &Output) -> bool {
    use std::os::unix::process::ExitStatusExt;
    out.status.signal() == Some(9) || out.status.code() == Some(137)
}

/// A tmpfs of `size` bytes mounted at `dir` (created), unmounted on drop: for the
/// ENOSPC tests. Grow it with [`Tmpfs::resize`].
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0755"))
            .arg("earfs-test-tmpfs")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }

    pub fn resize(&self, size: u64) {
        let out = Command::new("mount")
            .args(["-o"])
            .arg(format!("remount,size={size}"))
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}
