//! Power cuts under real databases: RocksDB, SQLite and PostgreSQL commit with sync on
//! an earfs mount served by this process while `earfs::fs::backing` records every
//! backing call (a process-wide recorder; one FUSE thread, so the order is exact). From
//! the recording, the states a power cut can leave are rebuilt at many cut points under
//! the persistence model of `tests/common/crashmodel.rs` (docs/architecture.md, "Crash
//! consistency"), each written into a fresh backing directory, mounted, and recovered
//! and checked by the database itself:
//!
//! - RocksDB: `DB::Open` succeeds, every key whose `Put` with `sync=true` returned before
//!   the cut is there with its value, and `ldb checkconsistency` passes;
//! - SQLite (WAL, `synchronous=FULL`): `PRAGMA integrity_check` is ok and every
//!   committed transaction is there;
//! - PostgreSQL (`synchronous_commit=on`, data checksums): recovery succeeds, every
//!   committed transaction is there, amcheck and `pg_checksums --check` are clean.
//!
//! A commit counts as acknowledged at the place in the recording where the harness read
//! the driver's line for it: after the true acknowledgement, so the check is
//! conservative but never stricter than the database's promise.
//!
//! Namespace model: a directory operation (create, rename, unlink) is durable once its
//! directory was fsynced after it (`worst`), or once any fsync returned after it
//! (`ordered`: ext4 commits its journal in order); of the others, a prefix in recorded
//! order persisted.
//!
//! Every run also builds one state that loses a synced write on purpose (the last sync
//! before an acknowledgement is forgotten), and asserts that the database's check
//! reports it: the checker can fail.
//!
//! The tests are `#[ignore]`d (they need root, /dev/fuse, g++, librocksdb-dev, python3
//! and PostgreSQL) and run by `scripts/tier3/powercut.sh`. Counts come from the
//! environment: EARFS_POWERCUT_CUTS (cut points per run, default 30),
//! EARFS_POWERCUT_PG_CUTS (default 10), EARFS_POWERCUT_STATES (states per cut point,
//! default 2), EARFS_POWERCUT_COMMITS (default 300; PostgreSQL:
//! EARFS_POWERCUT_PG_COMMITS, default 60), EARFS_POWERCUT_SEED;
//! EARFS_POWERCUT_WRITEBACK=0 mounts without the FUSE writeback cache (default 1, as
//! the daemon);
//! EARFS_POWERCUT_KEEP=DIR keeps the first failing state there.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::TestDir;
use common::crashmodel::{FileHistory, FileOp, Model};
use earfs::content::{FileFormat, Keyring};
use earfs::crypto::Dek;
use earfs::fs::EarFs;
use earfs::fs::backing::{Op, Recorder, set_process_recorder};
use earfs::fuse::{AdapterOptions, EarFuse, MountConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------
// The recording.

#[derive(Debug, Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
}

impl Meta {
    fn of(st: &rustix::fs::Stat) -> Meta {
        Meta {
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink(PathBuf),
}

/// A recorded backing call (paths relative to the backing directory), or an
/// acknowledged commit.
#[derive(Debug)]
enum Ev {
    Data {
        ino: u64,
        meta: Meta,
        op: FileOp,
    },
    Sync {
        ino: u64,
    },
    Create {
        path: PathBuf,
        ino: u64,
        kind: Kind,
        meta: Meta,
    },
    /// A rename or an unlink.
    Names(DirOp),
    SyncDir {
        path: PathBuf,
    },
    Ack,
    /// The recorder could not describe a call (the run fails).
    Broken(String),
}

struct Rec {
    root: PathBuf,
    evs: Mutex<Vec<Ev>>,
}

impl Rec {
    fn push(&self, ev: Ev) {
        self.evs.lock().unwrap().push(ev);
    }

    /// The path of directory `dir` (and `name` in it) below the backing directory.
    fn path(&self, dir: BorrowedFd<'_>, name: Option<&OsStr>) -> Result<PathBuf, String> {
        let link = format!("/proc/self/fd/{}", dir.as_raw_fd());
        let p = std::fs::read_link(&link).map_err(|e| format!("{link}: {e}"))?;
        let rel = p
            .strip_prefix(&self.root)
            .map_err(|_| format!("{} is not below {}", p.display(), self.root.display()))?;
        Ok(match name {
            Some(n) => rel.join(n),
            None => rel.to_path_buf(),
        })
    }

    fn describe(&self, op: &Op<'_>) -> Result<Option<Ev>, String> {
        let fstat = |fd| rustix::fs::fstat(fd).map_err(|e| format!("fstat: {e}"));
        let data = |fd, op| -> Result<Option<Ev>, String> {
            let st = fstat(fd)?;
            Ok(Some(Ev::Data {
                ino: st.st_ino,
                meta: Meta::of(&st),
                op,
            }))
        };
        match op {
            Op::Read { .. } => Ok(None), // changes nothing
            Op::Write { fd, off, data: d } => data(
                *fd,
                FileOp::Write {
                    off: *off,
                    data: d.to_vec(),
                },
            ),
            Op::SetLen { fd, len } => data(*fd, FileOp::SetLen(*len)),
            Op::Fallocate { fd, mode, off, len } => {
                if mode.contains(rustix::fs::FallocateFlags::PUNCH_HOLE) {
                    data(
                        *fd,
                        FileOp::Punch {
                            off: *off,
                            len: *len,
                        },
                    )
                } else if mode.contains(rustix::fs::FallocateFlags::KEEP_SIZE) {
                    Ok(None) // a reservation changes no byte and no length
                } else {
                    let st = fstat(*fd)?;
                    data(*fd, FileOp::SetLen(st.st_size as u64))
                }
            }
            Op::Sync { fd, .. } => Ok(Some(Ev::Sync {
                ino: fstat(*fd)?.st_ino,
            })),
            Op::Create { dir, name } => {
                let st = rustix::fs::statat(*dir, *name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| format!("stat {name:?}: {e}"))?;
                let kind = match rustix::fs::FileType::from_raw_mode(st.st_mode) {
                    rustix::fs::FileType::RegularFile => Kind::File,
                    rustix::fs::FileType::Directory => Kind::Dir,
                    rustix::fs::FileType::Symlink => {
                        let target = rustix::fs::readlinkat(*dir, *name, Vec::new())
                            .map_err(|e| format!("readlink {name:?}: {e}"))?;
                        Kind::Symlink(PathBuf::from(std::ffi::OsString::from_vec(
                            target.into_bytes(),
                        )))
                    }
                    other => return Err(format!("{name:?}: unsupported file type {other:?}")),
                };
                Ok(Some(Ev::Create {
                    path: self.path(*dir, Some(name))?,
                    ino: st.st_ino,
                    kind,
                    meta: Meta::of(&st),
                }))
            }
            Op::Rename {
                from_dir,
                from,
                to_dir,
                to,
                flags,
            } => Ok(Some(Ev::Names(DirOp::Rename {
                from: self.path(*from_dir, Some(from))?,
                to: self.path(*to_dir, Some(to))?,
                exchange: flags & libc::RENAME_EXCHANGE != 0,
            }))),
            Op::Unlink { dir, name } => Ok(Some(Ev::Names(DirOp::Unlink {
                path: self.path(*dir, Some(name))?,
            }))),
            Op::SyncDir { dir } => Ok(Some(Ev::SyncDir {
                path: self.path(*dir, None)?,
            })),
        }
    }
}

impl Recorder for Rec {
    // Runs on the FUSE thread: never panics, a call it cannot describe fails the run.
    fn record(&self, op: &Op<'_>) {
        match self.describe(op) {
            Ok(Some(ev)) => self.push(ev),
            Ok(None) => {}
            Err(e) => self.push(Ev::Broken(e)),
        }
    }
}

// ---------------------------------------------------------------------------
// Volumes, mounts, snapshots.

fn ring(dek: &Dek) -> Keyring {
    Keyring::new([(1, Dek::from_slice(dek.expose()).unwrap())], 1).unwrap()
}

/// An earfs mount served by this process (one FUSE thread); unmounted when dropped.
struct Mounted {
    unmount: Option<Box<dyn FnOnce() -> std::io::Result<()>>>,
    mnt: PathBuf,
}

fn mount(backing: &Path, mnt: &Path, dek: &Dek, format: FileFormat) -> Mounted {
    let fs = Arc::new(EarFs::new(backing, ring(dek), format).unwrap());
    let cfg = MountConfig {
        fsname: format!("earfs:{}", backing.display()),
        allow_other: true,
        threads: 1,
        options: Vec::new(),
    };
    let adapter = EarFuse::new(
        fs,
        AdapterOptions {
            writeback_cache: env_num("EARFS_POWERCUT_WRITEBACK", 1) == 1,
        },
    );
    let session = earfs::fuse::mount(adapter, mnt, &cfg).unwrap();
    let bg = session.spawn().unwrap();
    std::fs::set_permissions(mnt, std::fs::Permissions::from_mode(0o755)).unwrap();
    Mounted {
        // A session earfs mounted itself (mount(2) as root, `Session::from_fd`) has no
        // fuser mount to drop: unmount it first, so that the session thread sees the
        // device close and the join returns.
        unmount: Some(Box::new({
            let mnt = mnt.to_path_buf();
            move || {
                let _ = rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::empty());
                bg.umount_and_join()
            }
        })),
        mnt: mnt.to_path_buf(),
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(u) = self.unmount.take()
            && let Err(e) = u()
        {
            eprintln!("unmount {}: {e}; detaching", self.mnt.display());
            let _ = rustix::mount::unmount(&self.mnt, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// A node of the backing tree as the snapshot found it.
struct Entry {
    path: PathBuf,
    ino: u64,
    kind: Kind,
    meta: Meta,
    bytes: Vec<u8>,
}

/// Every node below `root` (parents first).
fn snapshot(root: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let mut names: Vec<_> = std::fs::read_dir(root.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            let path = rel.join(&name);
            let full = root.join(&path);
            let md = std::fs::symlink_metadata(&full).unwrap();
            let meta = Meta {
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
            };
            let (kind, bytes) = if md.is_dir() {
                todo.push(path.clone());
                (Kind::Dir, Vec::new())
            } else if md.file_type().is_symlink() {
                (
                    Kind::Symlink(std::fs::read_link(&full).unwrap()),
                    Vec::new(),
                )
            } else {
                (Kind::File, std::fs::read(&full).unwrap())
            };
            out.push(Entry {
                path,
                ino: md.ino(),
                kind,
                meta,
                bytes,
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

// ---------------------------------------------------------------------------
// Crash states.

type NodeId = usize;

#[derive(Clone)]
struct Node {
    kind: Kind,
    meta: Meta,
    data: FileHistory,
}

/// A change of names (paths relative to the backing directory).
#[derive(Debug, Clone)]
enum DirOp {
    Create {
        path: PathBuf,
        node: NodeId,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
        exchange: bool,
    },
    Unlink {
        path: PathBuf,
    },
}

#[derive(Clone)]
struct PendingDirOp {
    op: DirOp,
    /// The directories whose fsync makes it durable.
    dirs: Vec<PathBuf>,
    /// Durable under [worst, ordered].
    durable: [bool; 2],
}

fn parent(p: &Path) -> PathBuf {
    p.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `base/rel`, without a trailing slash when `rel` is empty.
fn under(base: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        base.to_path_buf()
    } else {
        base.join(rel)
    }
}

/// Apply a directory operation to a namespace (path -> node).
fn apply_dir_op(ns: &mut BTreeMap<PathBuf, NodeId>, op: &DirOp) {
    match op {
        DirOp::Create { path, node } => {
            ns.insert(path.clone(), *node);
        }
        DirOp::Unlink { path } => {
            ns.remove(path);
        }
        DirOp::Rename { from, to, exchange } => {
            let take = |ns: &mut BTreeMap<PathBuf, NodeId>, at: &Path| {
                let keys: Vec<PathBuf> = ns.keys().filter(|k| k.starts_with(at)).cloned().collect();
                keys.into_iter()
                    .map(|k| {
                        let n = ns.remove(&k).unwrap();
                        (k.strip_prefix(at).unwrap().to_path_buf(), n)
                    })
                    .collect::<Vec<_>>()
            };
            let moving = take(ns, from);
            let replaced = take(ns, to);
            if moving.is_empty() {
                // The source is not in this state: nothing moves.
                for (rel, n) in replaced {
                    ns.insert(under(to, &rel), n);
                }
                return;
            }
            for (rel, n) in moving {
                ns.insert(under(to, &rel), n);
            }
            if *exchange {
                for (rel, n) in replaced {
                    ns.insert(under(from, &rel), n);
                }
            }
        }
    }
}

/// The recording replayed up to a cut point.
#[derive(Clone)]
struct World {
    nodes: Vec<Node>,
    base: BTreeMap<PathBuf, NodeId>,
    root_meta: Meta,
    ops: Vec<PendingDirOp>,
    ino_node: HashMap<u64, NodeId>,
    live: BTreeMap<PathBuf, NodeId>,
    acked: u64,
}

impl World {
    fn new(base: Vec<Entry>, root_meta: Meta) -> World {
        let mut w = World {
            nodes: Vec::new(),
            base: BTreeMap::new(),
            root_meta,
            ops: Vec::new(),
            ino_node: HashMap::new(),
            live: BTreeMap::new(),
            acked: 0,
        };
        for e in base {
            let n = w.nodes.len();
            w.nodes.push(Node {
                kind: e.kind,
                meta: e.meta,
                data: FileHistory::durable(e.bytes),
            });
            w.ino_node.insert(e.ino, n);
            w.base.insert(e.path.clone(), n);
            w.live.insert(e.path, n);
        }
        w
    }

    fn node_of(&self, ino: u64) -> NodeId {
        *self.ino_node.get(&ino).unwrap_or_else(|| {
            panic!("a backing call on inode {ino}, which no snapshot or create named")
        })
    }

    fn step(&mut self, ev: &Ev) {
        match ev {
            Ev::Data { ino, meta, op } => {
                let n = self.node_of(*ino);
                self.nodes[n].meta = *meta;
                self.nodes[n].data.change(op.clone());
            }
            Ev::Sync { ino } => {
                let n = self.node_of(*ino);
                self.nodes[n].data.sync();
                for op in &mut self.ops {
                    op.durable[1] = true;
                }
            }
            Ev::Create {
                path,
                ino,
                kind,
                meta,
            } => {
                let linked = self
                    .ino_node
                    .get(ino)
                    .filter(|n| self.live.values().any(|m| m == *n) && *kind == Kind::File);
                let n = match linked {
                    Some(&n) => n,
                    None => {
                        self.nodes.push(Node {
                            kind: kind.clone(),
                            meta: *meta,
                            data: FileHistory::default(),
                        });
                        self.nodes.len() - 1
                    }
                };
                self.ino_node.insert(*ino, n);
                self.dir_op(DirOp::Create {
                    path: path.clone(),
                    node: n,
                });
            }
            Ev::Names(op) => self.dir_op(op.clone()),
            Ev::SyncDir { path } => {
                for op in &mut self.ops {
                    if op.dirs.contains(path) {
                        op.durable[0] = true;
                    }
                    op.durable[1] = true;
                }
            }
            Ev::Ack => self.acked += 1,
            Ev::Broken(why) => panic!("the recorder failed: {why}"),
        }
    }

    fn dir_op(&mut self, op: DirOp) {
        apply_dir_op(&mut self.live, &op);
        let dirs = match &op {
            DirOp::Create { path, .. } | DirOp::Unlink { path } => vec![parent(path)],
            DirOp::Rename { from, to, .. } => vec![parent(to), parent(from)],
        };
        self.ops.push(PendingDirOp {
            op,
            dirs,
            durable: [false; 2],
        });
    }

    /// How many directory operations are not durable under `model`.
    fn not_durable(&self, model: Model) -> usize {
        let m = usize::from(model == Model::Ordered);
        self.ops.iter().filter(|o| !o.durable[m]).count()
    }

    /// The namespace with the durable operations and the first `k` others.
    fn namespace(&self, model: Model, k: usize) -> BTreeMap<PathBuf, NodeId> {
        let m = usize::from(model == Model::Ordered);
        let mut ns = self.base.clone();
        let mut others = 0;
        for o in &self.ops {
            if !o.durable[m] {
                others += 1;
                if others > k {
                    continue;
                }
            }
            apply_dir_op(&mut ns, &o.op);
        }
        ns
    }

    /// Write a crash state into `dir`: the namespace `k` (see `namespace`), file bytes
    /// chosen by `pick`.
    fn write_state(
        &self,
        dir: &Path,
        model: Model,
        k: usize,
        pick: &mut dyn FnMut(usize) -> usize,
    ) {
        let ns = self.namespace(model, k);
        let mut written: HashMap<NodeId, PathBuf> = HashMap::new();
        let mut dirs: BTreeSet<PathBuf> = BTreeSet::from([PathBuf::new()]);
        std::fs::create_dir(dir).unwrap();
        for (path, &n) in &ns {
            if !dirs.contains(&parent(path)) {
                continue; // its directory's entry did not persist: unreachable
            }
            let full = dir.join(path);
            let node = &self.nodes[n];
            match &node.kind {
                Kind::Dir => {
                    std::fs::create_dir(&full).unwrap();
                    dirs.insert(path.clone());
                }
                Kind::Symlink(t) => std::os::unix::fs::symlink(t, &full).unwrap(),
                Kind::File => {
                    if let Some(first) = written.get(&n) {
                        std::fs::hard_link(first, &full).unwrap();
                        continue;
                    }
                    std::fs::write(&full, node.data.choices().build(model, pick))
                        .unwrap_or_else(|e| panic!("{}: {e}", full.display()));
                    written.insert(n, full.clone());
                }
            }
            own(&full, node.meta, &node.kind);
        }
        own(dir, self.root_meta, &Kind::Dir);
    }
}

fn own(p: &Path, m: Meta, kind: &Kind) {
    std::os::unix::fs::lchown(p, Some(m.uid), Some(m.gid)).unwrap();
    if !matches!(kind, Kind::Symlink(_)) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m.mode)).unwrap();
    }
}

// ---------------------------------------------------------------------------
// The databases.

/// Outcome of a database's recovery and checks on a crash state.
type Verdict = Result<String, String>;

/// What a crash state came to.
#[derive(Debug)]
enum Outcome {
    Pass,
    /// The database failed its checks (why).
    Fail(String),
    /// The database refused a torn append that was never synced, and every synced byte
    /// of that file read back as synced: its own failure, on plaintext too.
    Tolerated(String),
}

trait Db {
    fn name(&self) -> &'static str;
    /// Create the database on the mount (not recorded); leave nothing running.
    fn prepare(&mut self, mnt: &Path);
    /// Commit with sync, calling `ack` once per acknowledged commit; leave nothing
    /// running.
    fn run(&mut self, mnt: &Path, ack: &dyn Fn());
    /// Recover and check a crash state mounted at `mnt` with `acked` commits
    /// acknowledged; leave nothing running.
    fn check(&mut self, mnt: &Path, acked: u64) -> Verdict;
    /// The file (relative to the mount) that a failure `why` names, if the database
    /// only ever appends to it and reads a torn unsynced append as corruption.
    fn append_only(&self, _why: &str) -> Option<PathBuf> {
        None
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{name}={s} is not a number"))
        })
        .unwrap_or(default)
}

/// Run `cmd` to the end; its stdout and stderr, and whether it succeeded.
fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text.trim().to_string())
}

/// Run a driver that prints "ack N" per acknowledged commit; `ack` for each line.
fn drive(cmd: &mut Command, ack: &dyn Fn()) -> u64 {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut n = 0;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        assert_eq!(line, format!("ack {n}"), "driver output out of order");
        ack();
        n += 1;
    }
    let st = child.wait().unwrap();
    assert!(st.success(), "driver {cmd:?} failed: {st}");
    n
}

fn timeout(secs: u32) -> Command {
    let mut c = Command::new("timeout");
    c.arg(format!("{secs}"));
    c
}

struct Rocks {
    bin: PathBuf,
    commits: u64,
}

impl Rocks {
    /// Compile tests/powercut/rocks.cc against the system's librocksdb.
    fn new() -> Rocks {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/powercut/rocks.cc");
        let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join("powercut-rocks");
        let (ok, text) = output(
            Command::new("g++")
                .args(["-O1", "-std=c++17", "-o"])
                .arg(&bin)
                .arg(&src)
                .arg("-lrocksdb"),
        );
        assert!(
            ok,
            "cannot build the RocksDB driver (g++ and librocksdb-dev: scripts/deps-tier3.sh): {text}"
        );
        Rocks {
            bin,
            commits: env_num("EARFS_POWERCUT_COMMITS", 300),
        }
    }
}

impl Db for Rocks {
    fn name(&self) -> &'static str {
        "rocksdb"
    }
    /// RocksDB appends version edits to the MANIFEST with a sync after each, and reads
    /// a record torn inside the file's length as "Corruption: checksum mismatch",
    /// failing `DB::Open` (its WAL reader, in point-in-time recovery, stops there
    /// instead).
    fn append_only(&self, why: &str) -> Option<PathBuf> {
        let file = why
            .strip_prefix("DB::Open failed: Corruption: checksum mismatch in file ")?
            .trim();
        let name = Path::new(file).file_name()?.to_str()?;
        name.starts_with("MANIFEST-")
            .then(|| Path::new("db").join(name))
    }
    fn prepare(&mut self, mnt: &Path) {
        // An empty database: its files exist before the recording.
        drive(
            Command::new(&self.bin)
                .arg("write")
                .arg(mnt.join("db"))
                .arg("0"),
            &|| {},
        );
    }
    fn run(&mut self, mnt: &Path, ack: &dyn Fn()) {
        let n = drive(
            Command::new(&self.bin)
                .arg("write")
                .arg(mnt.join("db"))
                .arg(self.commits.to_string()),
            ack,
        );
        assert_eq!(n, self.commits);
    }
    fn check(&mut self, mnt: &Path, acked: u64) -> Verdict {
        let db = mnt.join("db");
        let (ok, text) = output(
            timeout(300)
                .arg(&self.bin)
                .arg("check")
                .arg(&db)
                .arg(acked.to_string()),
        );
        if !ok {
            return Err(text);
        }
        let (ok2, ldb) = output(
            timeout(300)
                .arg("ldb")
                .arg(format!("--db={}", db.display()))
                .arg("checkconsistency"),
        );
        if !ok2 {
            return Err(format!("ldb checkconsistency: {ldb}"));
        }
        Ok(text)
    }
}

struct Sqlite {
    script: PathBuf,
    commits: u64,
}

impl Sqlite {
    fn new() -> Sqlite {
        Sqlite {
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/powercut/sqlite.py"),
            commits: env_num("EARFS_POWERCUT_COMMITS", 300),
        }
    }
    fn py(&self, args: &[&str], mnt: &Path) -> Command {
        let mut c = Command::new("python3");
        c.arg(&self.script)
            .arg(args[0])
            .arg(mnt.join("t.db"))
            .args(&args[1..]);
        c
    }
}

impl Db for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }
    fn prepare(&mut self, mnt: &Path) {
        let (ok, text) = output(&mut self.py(&["prepare"], mnt));
        assert!(ok, "sqlite prepare: {text}");
    }
    fn run(&mut self, mnt: &Path, ack: &dyn Fn()) {
        let n = drive(
            &mut self.py(&["write", &self.commits.to_string()], mnt),
            ack,
        );
        assert_eq!(n, self.commits);
    }
    fn check(&mut self, mnt: &Path, acked: u64) -> Verdict {
        let mut c = timeout(300);
        c.arg("python3")
            .arg(&self.script)
            .arg("check")
            .arg(mnt.join("t.db"))
            .arg(acked.to_string());
        match output(&mut c) {
            (true, text) => Ok(text),
            (false, text) => Err(text),
        }
    }
}

/// PostgreSQL (Debian's, the newest under /usr/lib/postgresql), run as user postgres
/// on 127.0.0.1 on a free port; one `psql -c` per commit.
struct Pg {
    bin: PathBuf,
    commits: u64,
    port: u16,
    /// Sockets and the server log, outside the mount.
    aux: tempfile::TempDir,
}

/// The expression of row `id`'s value (rows of arbitrary lengths).
fn pg_value(id: &str) -> String {
    format!("'v' || {id} || ':' || repeat(chr(97 + {id} % 26), 1 + ({id} * 7919) % 3000)")
}

impl Pg {
    fn new() -> Pg {
        let mut bins: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL not installed: scripts/deps-tier3.sh")
            .map(|e| e.unwrap().path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .collect();
        bins.sort_by_key(|b| {
            b.parent()
                .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
                .unwrap_or(0)
        });
        let bin = bins.pop().expect("no PostgreSQL server binaries");
        let aux = tempfile::Builder::new()
            .prefix("earfs-powercut-pg-")
            .tempdir()
            .unwrap();
        let (ok, text) = output(Command::new("chown").arg("postgres:").arg(aux.path()));
        assert!(
            ok,
            "chown postgres (no postgres user? scripts/deps-tier3.sh): {text}"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Pg {
            bin,
            commits: env_num("EARFS_POWERCUT_PG_COMMITS", 60),
            port,
            aux,
        }
    }

    fn as_pg(&self, prog: &str) -> Command {
        let mut c = timeout(300);
        c.args(["runuser", "-u", "postgres", "--"])
            .arg(self.bin.join(prog));
        c
    }

    fn log(&self) -> PathBuf {
        self.aux.path().join("server.log")
    }

    /// Start the server on `data` (recovery included); a guard stops it.
    fn start(&self, data: &Path) -> Result<PgServer<'_>, String> {
        std::fs::write(self.log(), "").unwrap();
        output(Command::new("chown").arg("postgres:").arg(self.log()));
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on -c full_page_writes=on -c checkpoint_timeout=30min",
            self.port,
            self.aux.path().display()
        );
        let (ok, text) = output(
            self.as_pg("pg_ctl")
                .arg("-D")
                .arg(data)
                .arg("-l")
                .arg(self.log())
                .args(["-w", "-t", "120", "-o", &opts, "start"]),
        );
        let server = PgServer {
            pg: self,
            data: data.to_path_buf(),
            stopped: false,
        };
        if ok {
            Ok(server)
        } else {
            let log = std::fs::read_to_string(self.log()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            Err(format!(
                "the server did not start: {text}; log: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ))
        }
    }

    fn psql(&self, sql: &str) -> Result<String, String> {
        let (ok, text) = output(
            self.as_pg("psql")
                .args([
                    "-X",
                    "-q",
                    "-At",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                ])
                .args(["-p", &self.port.to_string(), "-d", "postgres", "-c", sql]),
        );
        if ok {
            Ok(text)
        } else {
            Err(format!("{sql}: {text}"))
        }
    }
}

/// A running server: stopped (immediately, as a crash) when dropped unless stopped.
struct PgServer<'a> {
    pg: &'a Pg,
    data: PathBuf,
    stopped: bool,
}

impl PgServer<'_> {
    fn stop(mut self, mode: &str) -> Result<(), String> {
        self.stopped = true;
        let (ok, text) = output(
            self.pg
                .as_pg("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", mode, "-w", "-t", "120", "stop"]),
        );
        if ok {
            Ok(())
        } else {
            Err(format!("pg_ctl stop: {text}"))
        }
    }
}

impl Drop for PgServer<'_> {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = output(self.pg.as_pg("pg_ctl").arg("-D").arg(&self.data).args([
                "-m",
                "immediate",
                "-w",
                "-t",
                "60",
                "stop",
            ]));
        }
    }
}

impl Db for Pg {
    fn name(&self) -> &'static str {
        "postgres"
    }
    fn prepare(&mut self, mnt: &Path) {
        let data = mnt.join("pgdata");
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::chown(&data, Some(pg_uid()), Some(pg_gid())).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let (ok, text) = output(
            self.as_pg("initdb")
                .arg("-D")
                .arg(&data)
                .args(["--data-checksums", "-U", "postgres", "--auth=trust"])
                .args(["-E", "UTF8", "--locale=C"]),
        );
        assert!(ok, "initdb: {text}");
        let server = self.start(&data).unwrap();
        self.psql("CREATE EXTENSION amcheck").unwrap();
        self.psql("CREATE TABLE t (id integer PRIMARY KEY, v text NOT NULL)")
            .unwrap();
        self.psql("CHECKPOINT").unwrap();
        server.stop("fast").unwrap();
    }
    fn run(&mut self, mnt: &Path, ack: &dyn Fn()) {
        let server = self.start(&mnt.join("pgdata")).unwrap();
        for i in 0..self.commits {
            let id = i.to_string();
            self.psql(&format!("INSERT INTO t SELECT {id}, {}", pg_value(&id)))
                .unwrap();
            ack();
            // Checkpoints now and then: relation files written and synced, WAL recycled.
            if i % 20 == 19 {
                self.psql("CHECKPOINT").unwrap();
            }
        }
        drop(server); // a crash (-m immediate), as a power cut would
    }
    fn check(&mut self, mnt: &Path, acked: u64) -> Verdict {
        let data = mnt.join("pgdata");
        // The lock file names a postmaster of the recording, whose PID another process
        // may have by now (PostgreSQL would refuse to start), or is empty if the cut fell
        // in the server's own start (refused too, on plaintext as well). It holds no data.
        match std::fs::remove_file(data.join("postmaster.pid")) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("postmaster.pid: {e}")),
        }
        let server = self.start(&data)?;
        let counts = self.psql(&format!(
            "SELECT count(*), coalesce(max(id) + 1, 0), count(*) FILTER (WHERE v <> {}) FROM t",
            pg_value("id")
        ))?;
        let n: Vec<u64> = counts
            .split('|')
            .map(|x| x.parse().unwrap_or(u64::MAX))
            .collect();
        if n.len() != 3 || n[0] != n[1] || n[2] != 0 {
            return Err(format!(
                "rows (count, max id + 1, wrong values): {counts}: not whole commits 0..n"
            ));
        }
        if n[0] < acked {
            return Err(format!(
                "{} commits present, {acked} acknowledged: commit {} lost",
                n[0], n[0]
            ));
        }
        self.psql("SELECT bt_index_check('t_pkey', true)")?;
        let heap = self.psql("SELECT count(*) FROM verify_heapam('t')")?;
        if heap != "0" {
            return Err(format!("verify_heapam: {heap} problems"));
        }
        server.stop("fast")?;
        let (ok, text) = output(
            self.as_pg("pg_checksums")
                .arg("--check")
                .arg("-D")
                .arg(&data),
        );
        if !ok {
            return Err(format!("pg_checksums --check: {text}"));
        }
        Ok(format!("ok: {} commits ({acked} acknowledged)", n[0]))
    }
}

fn pg_uid() -> u32 {
    user_id("-u")
}

fn pg_gid() -> u32 {
    user_id("-g")
}

fn user_id(which: &str) -> u32 {
    let (ok, text) = output(Command::new("id").arg(which).arg("postgres"));
    assert!(ok, "no postgres user (scripts/deps-tier3.sh): {text}");
    text.parse().unwrap()
}

// ---------------------------------------------------------------------------
// Running and checking.

#[derive(Default, Debug)]
struct Tally {
    events: usize,
    commits: u64,
    cuts: u64,
    states: u64,
    failed: Vec<String>,
    /// Worst-model states whose failure is the database's own (see `Db::append_only`).
    tolerated: Vec<String>,
    sabotage: Option<Outcome>,
}

struct Plan {
    format: FileFormat,
    cuts: u64,
    states: u64,
    seed: u64,
}

/// Record `db` committing on a fresh volume, then check crash states at `plan.cuts`
/// cut points.
fn power_cut(db: &mut dyn Db, plan: &Plan) -> Tally {
    // The recorder is the process's: one run at a time, whatever --test-threads says.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let started = Instant::now();
    let work = TestDir::new("earfs-powercut-");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let backing = work.path().join("backing");
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let backing = backing.canonicalize().unwrap();
    let dek = Dek::generate().unwrap();
    {
        let _m = mount(&backing, &mnt, &dek, plan.format);
        db.prepare(&mnt);
    }
    // The base state: everything the preparation left, made durable.
    rustix::fs::syncfs(std::fs::File::open(&backing).unwrap()).unwrap();
    let base = snapshot(&backing);
    let root_meta = {
        let md = std::fs::metadata(&backing).unwrap();
        Meta {
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
        }
    };
    let rec = Arc::new(Rec {
        root: backing.clone(),
        evs: Mutex::new(Vec::new()),
    });
    {
        let _m = mount(&backing, &mnt, &dek, plan.format);
        set_process_recorder(Some(rec.clone()));
        let r = rec.clone();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            db.run(&mnt, &move || r.push(Ev::Ack))
        }));
        set_process_recorder(None);
        if let Err(p) = outcome {
            std::panic::resume_unwind(p);
        }
    }
    let final_meta: HashMap<u64, Meta> = snapshot(&backing)
        .into_iter()
        .map(|e| (e.ino, e.meta))
        .collect();
    let mut evs = std::mem::take(&mut *rec.evs.lock().unwrap());
    settle_owners(&mut evs, &final_meta);
    let recorded = started.elapsed();

    // Cut points: half spread evenly, half just before a file sync (where the most
    // changes are pending), and the end.
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let calls: Vec<usize> = (0..evs.len())
        .filter(|&i| !matches!(evs[i], Ev::Ack))
        .collect();
    let before_sync: Vec<usize> = (1..evs.len())
        .filter(|&i| matches!(evs[i], Ev::Sync { .. }) && !matches!(evs[i - 1], Ev::Ack))
        .map(|i| i - 1)
        .collect();
    let mut cuts = BTreeSet::new();
    let spread = plan.cuts / 2;
    for j in 0..spread {
        cuts.insert(calls[(j as usize * calls.len()) / spread as usize]);
    }
    while (cuts.len() as u64) < plan.cuts.min(calls.len() as u64) {
        let pool = if rng.gen_bool(0.8) && !before_sync.is_empty() {
            &before_sync
        } else {
            &calls
        };
        cuts.insert(pool[rng.gen_range(0..pool.len())]);
    }
    cuts.insert(*calls.last().unwrap());
    // The self-test: the commit acknowledged in the middle of the run, none of whose
    // writes persisted (the state of the previous acknowledgement, nothing pending).
    let acks: Vec<usize> = (0..evs.len())
        .filter(|&i| matches!(evs[i], Ev::Ack))
        .collect();
    let sab_ack = acks[acks.len() / 2];
    let sab_from = acks[acks.len() / 2 - 1];
    let mut before_commit: Option<World> = None;

    let mut t = Tally {
        events: evs.len(),
        commits: acks.len() as u64,
        ..Tally::default()
    };
    let scratch = tempfile::Builder::new()
        .prefix("earfs-powercut-")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            Path::new("/dev/shm")
        } else {
            work.path()
        })
        .unwrap();
    let name = db.name();
    let mut world = World::new(base, root_meta);
    let state_dir = scratch.path().join("backing");
    let state_mnt = work.path().join("replay");
    std::fs::create_dir(&state_mnt).unwrap();
    let mut check = |world: &World,
                     model: Model,
                     k: usize,
                     acked: u64,
                     sabotaged: bool,
                     pick: &mut dyn FnMut(usize) -> usize|
     -> Outcome {
        let _ = std::fs::remove_dir_all(&state_dir);
        world.write_state(&state_dir, model, k, pick);
        let m = mount(&state_dir, &state_mnt, &dek, plan.format);
        let why = match db.check(&state_mnt, acked) {
            Ok(_) => return Outcome::Pass,
            Err(why) => why,
        };
        if sabotaged {
            return Outcome::Fail(why);
        }
        keep_evidence(&state_dir, &state_mnt);
        // A torn append to a file the database only appends to, whose synced bytes all
        // read back as at the sync: the database's own failure on any filesystem that
        // persists a length before the data (the worst model; not ext4 data=ordered).
        let Some(rel) = db.append_only(&why).filter(|_| model == Model::Worst) else {
            return Outcome::Fail(why);
        };
        let got = std::fs::read(state_mnt.join(&rel));
        drop(m);
        std::fs::remove_dir_all(&state_dir).unwrap();
        world.write_state(&state_dir, model, k, &mut |_| 0);
        let _m = mount(&state_dir, &state_mnt, &dek, plan.format);
        let synced = std::fs::read(state_mnt.join(&rel));
        match (got, synced) {
            (Ok(got), Ok(synced)) if got.starts_with(&synced) => Outcome::Tolerated(format!(
                "{why} ({} keeps its {} synced bytes; {} unsynced bytes torn)",
                rel.display(),
                synced.len(),
                got.len() - synced.len()
            )),
            (got, synced) => Outcome::Fail(format!(
                "{why} (and the synced bytes of {} do not read back: {} read, {} synced)",
                rel.display(),
                got.map_or_else(|e| e.to_string(), |g| g.len().to_string()),
                synced.map_or_else(|e| e.to_string(), |g| g.len().to_string())
            )),
        }
    };
    for (i, ev) in evs.iter().enumerate() {
        world.step(ev);
        if i == sab_from {
            before_commit = Some(world.clone());
        }
        if i == sab_ack {
            let lost = before_commit.take().unwrap();
            t.sabotage = Some(check(&lost, Model::Worst, 0, world.acked, true, &mut |_| 0));
        }
        if !cuts.contains(&i) {
            continue;
        }
        t.cuts += 1;
        for s in 0..plan.states {
            let model = if s % 2 == 0 {
                Model::Worst
            } else {
                Model::Ordered
            };
            let nd = world.not_durable(model);
            let k = match rng.gen_range(0..3) {
                0 => 0,
                1 => nd,
                _ => rng.gen_range(0..=nd),
            };
            let verdict = check(&world, model, k, world.acked, false, &mut |n| {
                rng.gen_range(0..n)
            });
            t.states += 1;
            let why = match verdict {
                Outcome::Pass => continue,
                Outcome::Tolerated(why) => {
                    if t.tolerated.len() < 5 {
                        eprintln!(
                            "{name} {:?} {model:?}: cut after call {i}: tolerated: {why}",
                            plan.format
                        );
                    }
                    t.tolerated.push(why);
                    continue;
                }
                Outcome::Fail(why) => why,
            };
            {
                let what = format!(
                    "{name} {:?} {model:?}: cut after call {i} of {} ({}), {} acknowledged, {k} of {nd} directory operations: {why}",
                    plan.format,
                    evs.len(),
                    short(ev),
                    world.acked
                );
                if t.failed.len() < 20 {
                    eprintln!("{what}");
                }
                t.failed.push(what);
            }
        }
    }
    println!(
        "powercut {name} {:?}: {} backing calls and {} commits recorded in {:.1} s; {} cut points, {} states checked, {} failed, {} torn unsynced appends the database refuses (worst model); {:.1} s in all",
        plan.format,
        t.events,
        t.commits,
        recorded.as_secs_f64(),
        t.cuts,
        t.states,
        t.failed.len(),
        t.tolerated.len(),
        started.elapsed().as_secs_f64()
    );
    t
}

/// With EARFS_POWERCUT_KEEP=DIR, copy the first failing crash state there: its backing
/// directory (`DIR/backing`) and its plaintext as mounted (`DIR/plain`).
fn keep_evidence(backing: &Path, mnt: &Path) {
    let Ok(dir) = std::env::var("EARFS_POWERCUT_KEEP") else {
        return;
    };
    let dir = PathBuf::from(dir);
    if dir.exists() {
        return; // the first failure only
    }
    std::fs::create_dir_all(&dir).unwrap();
    for (from, to) in [(backing, "backing"), (mnt, "plain")] {
        let (ok, text) = output(Command::new("cp").arg("-a").arg(from).arg(dir.join(to)));
        assert!(ok, "keeping {}: {text}", from.display());
    }
    eprintln!("kept the failing crash state in {}", dir.display());
}

/// The fs core gives a new node its owner right after creating it (`chown`, not a
/// recorded call). The model takes the two as persisting together: a created node gets
/// the owner and mode seen at its first write after the create, or else the ones it has
/// after the run.
fn settle_owners(evs: &mut [Ev], final_meta: &HashMap<u64, Meta>) {
    let mut later: HashMap<u64, Meta> = HashMap::new();
    for ev in evs.iter_mut().rev() {
        match ev {
            Ev::Data { ino, meta, .. } => {
                later.insert(*ino, *meta);
            }
            Ev::Create { ino, meta, .. } => {
                if let Some(m) = later.remove(ino).or_else(|| final_meta.get(ino).copied()) {
                    *meta = m;
                }
            }
            _ => {}
        }
    }
}

fn short(ev: &Ev) -> String {
    match ev {
        Ev::Data {
            ino,
            op: FileOp::Write { off, data },
            ..
        } => format!("pwrite inode {ino} at {off}, {} bytes", data.len()),
        other => format!("{other:?}").chars().take(100).collect(),
    }
}

fn plan(format: FileFormat, cuts_var: &str, cuts_default: u64) -> Plan {
    Plan {
        format,
        cuts: env_num(cuts_var, cuts_default).max(1),
        states: env_num("EARFS_POWERCUT_STATES", 2).max(1),
        seed: env_num("EARFS_POWERCUT_SEED", 1),
    }
}

/// The v2 run of `db`: no crash state failed, and the state that lost a synced write on
/// purpose was reported.
fn v2_loses_nothing(db: &mut dyn Db, cuts_var: &str, cuts_default: u64) {
    let t = power_cut(db, &plan(FileFormat::V2, cuts_var, cuts_default));
    let name = db.name();
    assert!(
        t.failed.is_empty(),
        "{name} v2: {} of {} crash states failed, e.g.: {:#?}",
        t.failed.len(),
        t.states,
        &t.failed[..t.failed.len().min(20)]
    );
    match &t.sabotage {
        Some(Outcome::Fail(why)) => println!("{name} v2: a lost synced write is reported: {why}"),
        other => panic!("{name} v2: a state that lost a synced write passed the checks: {other:?}"),
    }
}

#[test]
#[ignore = "needs root, /dev/fuse and the databases: scripts/tier3/powercut.sh"]
fn rocksdb_v2_keeps_every_synced_put() {
    v2_loses_nothing(&mut Rocks::new(), "EARFS_POWERCUT_CUTS", 30);
}

#[test]
#[ignore = "needs root, /dev/fuse and the databases: scripts/tier3/powercut.sh"]
fn sqlite_v2_keeps_every_committed_transaction() {
    v2_loses_nothing(&mut Sqlite::new(), "EARFS_POWERCUT_CUTS", 30);
}

#[test]
#[ignore = "needs root, /dev/fuse and the databases: scripts/tier3/powercut.sh"]
fn postgres_v2_keeps_every_committed_transaction() {
    v2_loses_nothing(&mut Pg::new(), "EARFS_POWERCUT_PG_CUTS", 10);
}

/// Format v1 rewrites the ciphertext of up to 31 synced bytes at the unaligned tail of
/// a file whose size changes: RocksDB's WAL appends records of arbitrary length with a
/// sync each, so a cut between one record's write and its sync can lose the record
/// before it. The same run as on v2 must see it.
#[test]
#[ignore = "needs root, /dev/fuse and the databases: scripts/tier3/powercut.sh"]
fn rocksdb_v1_loses_synced_puts() {
    let t = power_cut(
        &mut Rocks::new(),
        &plan(FileFormat::V1, "EARFS_POWERCUT_CUTS", 30),
    );
    let lost = t
        .failed
        .iter()
        .filter(|f| f.contains("acknowledged key") || f.contains("DB::Open failed"))
        .count();
    println!(
        "rocksdb v1: {} of {} crash states failed, {lost} with a synced Put lost or DB::Open failing; e.g. {:?}",
        t.failed.len(),
        t.states,
        t.failed.first()
    );
    assert!(
        lost > 0,
        "no crash state of the v1 run lost a synced Put or failed to open: the tail window was not reached"
    );
}
