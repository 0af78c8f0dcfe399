//! `earfs adopt SRC BACKING` through the real binary and real mounts: a mixed tree
//! adopted and mounted at its old path keeps everything (contents, holes, modes,
//! owners, times, attributes, symlinks, hard links, FIFOs, empty directories); a dry
//! run changes nothing; refusals change nothing; kill -9 at seeded points and a rerun
//! finish the job with no file lost; a filesystem that fills up stops it cleanly, and
//! one with room for the tree and its largest file only is enough.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::tree::*;
use common::{TestDir, mount_at, run};
use sha2::{Digest, Sha256};

/// A plaintext string that must not be found in any backing file.
const MARKER: &[u8] = b"EARFS-ADOPT-PLAINTEXT-MARKER-0123456789";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn adopt(args: &[&str]) -> Output {
    let mut a = vec!["adopt"];
    a.extend_from_slice(args);
    run(&a)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A key file for `--kms local`, made by `earfs init` in a scratch directory (so that
/// a killed adopt never dies while making it).
fn make_key(dir: &Path) -> PathBuf {
    let key = dir.join("key");
    common::init_local(&key, &dir.join("scratch-volume"));
    key
}

/// `make_tree` plus a file holding [`MARKER`] and a FIFO.
fn fill(src: &Path, seed: u64, files: usize, max: usize) {
    std::fs::create_dir_all(src).unwrap();
    make_tree(src, seed, files, max);
    let marker = src.join("global/marker");
    std::fs::write(&marker, MARKER.repeat(100)).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        src.join("pg_wal/fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    // Give SRC itself a PostgreSQL-like root: 0700, another owner, an attribute, a time.
    std::os::unix::fs::chown(src, Some(70), Some(71)).unwrap();
    std::fs::set_permissions(src, std::fs::Permissions::from_mode(0o700)).unwrap();
    rustix::fs::setxattr(src, "user.root", b"r", rustix::fs::XattrFlags::empty()).unwrap();
    set_times(&marker, 1_650_000_000);
    for d in ["global", "pg_wal"] {
        set_times(&src.join(d), 1_560_000_000);
    }
    set_times(src, 1_570_000_000);
}

fn set_times(p: &Path, sec: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: 42,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// What a directory's root must keep: mode, owner, mtime, `user.*` attributes.
type RootMeta = (u32, u32, u32, (i64, i64), Vec<u8>);

fn root_meta(p: &Path) -> RootMeta {
    let m = std::fs::metadata(p).unwrap();
    let mut v = vec![0u8; 64];
    let n = rustix::fs::getxattr(p, "user.root", &mut v[..]).unwrap_or(0);
    v.truncate(n);
    (
        m.mode() & 0o7777,
        m.uid(),
        m.gid(),
        (m.mtime(), m.mtime_nsec()),
        v,
    )
}

/// Every regular file under `dir` (backing tree: its work directory too).
fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                out.push(p);
            }
        }
    }
    out
}

fn sha(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

/// The adopt is complete: SRC is empty, no backing byte holds the marker, no leftover
/// is in the work directory, and the volume mounted at SRC shows `want` (and SRC's
/// root metadata).
fn check_adopted(src: &Path, backing: &Path, want: &Manifest, root: &RootMeta, what: &str) {
    let left: Vec<_> = std::fs::read_dir(src).unwrap().collect();
    assert!(left.is_empty(), "{what}: SRC is not empty: {left:?}");
    for f in all_files(backing) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(MARKER.len()).any(|w| w == MARKER),
            "{what}: plaintext in {}",
            f.display()
        );
    }
    let work: Vec<_> = std::fs::read_dir(backing.join(".earfs-work"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        work.is_empty(),
        "{what}: leftovers in the work dir: {work:?}"
    );
    let _m = mount_at(backing, src);
    assert_same(want, &manifest(src, &[]), what);
    assert_eq!(&root_meta(src), root, "{what}: the mount's root metadata");
}

/// No file is lost: every file and symlink of `want` is at its SRC path with its
/// content, or in the backing tree at the same path.
fn check_none_lost(src: &Path, backing: &Path, want: &Manifest, what: &str) {
    for (rel, e) in want {
        if e.kind == "dir" {
            continue;
        }
        let p = src.join(rel);
        match std::fs::symlink_metadata(&p) {
            Ok(_) if e.kind == "file" => {
                assert_eq!(sha(&p), e.sha256, "{what}: {} changed", rel.display())
            }
            Ok(_) => {}
            Err(_) => assert!(
                std::fs::symlink_metadata(backing.join(rel)).is_ok(),
                "{what}: {} is in neither tree",
                rel.display()
            ),
        }
    }
}

#[test]
fn adopt_then_mount_at_the_old_path_keeps_everything() {
    let d = TestDir::new("earfs-adopt-");
    let key = make_key(d.path());
    let src = d.path().join("data");
    let backing = d.path().join("data.earfs");
    fill(&src, 11, 40, 300_000);
    let want = manifest(&src, &[]);
    assert!(want.values().any(|e| e.kind == "fifo"));
    assert!(want.values().any(|e| e.sparse));
    let root = root_meta(&src);
    let out = adopt(&[
        "--kms",
        "local",
        "--key-file",
        s(&key),
        s(&src),
        s(&backing),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("earfs mount {} {}", s(&backing), s(&src))),
        "{}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("adopted "), "{}", text(&out));
    // The backing files are earfs files, not the plaintext.
    let b = backing.join("base/sparse");
    assert_ne!(
        std::fs::read(&b).unwrap().len() as u64,
        want[Path::new("base/sparse")].size
    );
    check_adopted(&src, &backing, &want, &root, "adopt");
    // Run again: nothing left to do.
    let out = adopt(&[s(&src), s(&backing)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("adopted already"),
        "{}",
        text(&out)
    );
}

#[test]
fn verify_passes_on_a_healthy_run() {
    let d = TestDir::new("earfs-adopt-");
    let key = make_key(d.path());
    let src = d.path().join("data");
    let backing = d.path().join("backing");
    fill(&src, 12, 20, 200_000);
    let want = manifest(&src, &[]);
    let root = root_meta(&src);
    let out = adopt(&[
        "--verify",
        "--kms",
        "local",
        "--key-file",
        s(&key),
        s(&src),
        s(&backing),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    check_adopted(&src, &backing, &want, &root, "adopt --verify");
}

#[test]
fn dry_run_changes_nothing_and_names_the_space_needed() {
    let d = TestDir::new("earfs-adopt-");
    let key = d.path().join("key");
    let src = d.path().join("data");
    let backing = d.path().join("backing");
    fill(&src, 13, 20, 200_000);
    let want = manifest(&src, &[]);
    let root = root_meta(&src);
    let largest = want
        .iter()
        .filter(|(_, e)| e.kind == "file" && !e.sparse)
        .max_by_key(|(_, e)| e.size)
        .map(|(p, _)| src.join(p))
        .unwrap();
    let out = adopt(&[
        "--dry-run",
        "--kms",
        "local",
        "--key-file",
        s(&key),
        s(&src),
        s(&backing),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for want_line in [
        "nothing changed",
        "space needed:",
        "space free:",
        "hard links:",
    ] {
        assert!(stdout.contains(want_line), "{want_line}: {}", text(&out));
    }
    assert!(
        stdout.contains(&format!("largest file:  {}", s(&largest))),
        "{}",
        text(&out)
    );
    assert!(!backing.exists(), "BACKING created by a dry run");
    assert!(!key.exists(), "key file created by a dry run");
    assert_same(&want, &manifest(&src, &[]), "after --dry-run");
    assert_eq!(root_meta(&src), root);
    // An existing empty BACKING stays empty.
    std::fs::create_dir(&backing).unwrap();
    let out = adopt(&["--dry-run", s(&src), s(&backing)]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_dir(&backing).unwrap().count(), 0);
}

#[test]
fn refusals_change_nothing() {
    let d = TestDir::new("earfs-adopt-");
    let key = make_key(d.path());
    let src = d.path().join("data");
    fill(&src, 14, 10, 50_000);
    let backing = d.path().join("backing");
    let kms = ["--kms", "local", "--key-file", s(&key)];
    let try_adopt = |src: &Path, backing: &Path| {
        let mut a: Vec<&str> = kms.to_vec();
        a.push(s(src));
        a.push(s(backing));
        adopt(&a)
    };
    let expect = |out: &Output, code: i32, words: &[&str]| {
        assert_eq!(out.status.code(), Some(code), "{}", text(out));
        let err = String::from_utf8_lossy(&out.stderr);
        for w in words {
            assert!(err.contains(w), "{w:?} not in: {}", text(out));
        }
    };

    // A socket and a device, by name; nothing changes.
    let sock = src.join("base/.s.PGSQL.5432");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let dev = src.join("a/null-device");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &dev,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    let want = manifest(&src, &[]);
    let out = try_adopt(&src, &backing);
    expect(&out, 1, &[s(&sock), "socket", s(&dev), "device"]);
    assert!(!backing.exists());
    assert_same(&want, &manifest(&src, &[]), "after refusing a socket");
    // --dry-run lists them too, and fails.
    let out = adopt(&["--dry-run", s(&src), s(&backing)]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(s(&sock)));
    std::fs::remove_file(&sock).unwrap();
    std::fs::remove_file(&dev).unwrap();

    // A nested mount, by name.
    let nested = src.join("a/b/mounted");
    std::fs::create_dir(&nested).unwrap();
    {
        let _t = Tmpfs::mount(&nested, 1 << 20);
        let out = try_adopt(&src, &backing);
        expect(&out, 1, &[s(&nested), "mount point"]);
        assert!(!backing.exists());
    }
    std::fs::remove_dir(&nested).unwrap();
    let want = manifest(&src, &[]);

    // BACKING on another filesystem.
    let other = d.path().join("other");
    let _t = Tmpfs::mount(&other, 1 << 20);
    let out = try_adopt(&src, &other.join("backing"));
    expect(&out, 2, &["another filesystem"]);
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 0);

    // BACKING inside SRC, SRC inside BACKING.
    let inside = src.join("base/backing");
    let out = try_adopt(&src, &inside);
    expect(&out, 2, &["inside SRC"]);
    assert!(!inside.exists());
    let out = try_adopt(&src.join("base"), &src);
    expect(&out, 2, &["inside BACKING"]);

    // A BACKING that holds something else.
    let foreign = d.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("keep-me"), b"x").unwrap();
    let out = try_adopt(&src, &foreign);
    expect(&out, 21, &["not empty"]);
    assert_eq!(std::fs::read(foreign.join("keep-me")).unwrap(), b"x");

    // A volume that holds files (and no adopt of SRC).
    let vol = d.path().join("scratch-volume");
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    {
        let _m = mount_at(&vol, &mnt);
        std::fs::write(mnt.join("a-file"), b"data").unwrap();
    }
    let out = try_adopt(&src, &vol);
    assert_eq!(out.status.code(), Some(21), "{}", text(&out));

    assert_same(&want, &manifest(&src, &[]), "after the refusals");
}

/// Kill the adopt with SIGKILL at 20 seeded points (with --jobs 1: the same order of
/// calls every run); after each, no file is lost, and a rerun finishes the job.
#[test]
fn killed_at_seeded_points_a_rerun_finishes() {
    // With one job the adopt runs in one thread: every point is reached.
    killed_runs(0xAD0B7, 20, &["--jobs", "1"], 20);
}

/// The same with the default number of workers (their calls interleave). strace
/// counts the calls of each thread apart, so a point past a thread's last call is not
/// reached: some of these runs finish.
#[test]
fn killed_in_parallel_a_rerun_finishes() {
    killed_runs(0xAD0B8, 6, &["--jobs", "2"], 2);
}

/// Kill `points` runs of the adopt (`extra` flags) at seeded points, at least
/// `min_killed` of them before they finish.
fn killed_runs(seed: u64, points: usize, extra: &[&str], min_killed: usize) {
    let d = TestDir::new("earfs-adopt-kill-");
    let key = make_key(d.path());
    let tpl = d.path().join("template");
    fill(&tpl, seed, 40, 300_000);
    let want = manifest(&tpl, &[]);
    let root = root_meta(&tpl);
    let args_for = |src: &Path, backing: &Path| -> Vec<String> {
        let mut a: Vec<String> = vec!["adopt".into()];
        a.extend(extra.iter().map(|s| s.to_string()));
        for x in ["--kms", "local", "--key-file", s(&key), s(src), s(backing)] {
            a.push(x.to_string());
        }
        a
    };
    let counted = d.path().join("counted");
    copy_tree(&tpl, &counted);
    let args = args_for(&counted, &d.path().join("counted.earfs"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, counts) = syscall_counts(&args);
    assert!(out.status.success(), "{}", text(&out));
    let mut killed = 0;
    for (i, (call, k)) in kill_points(&counts, seed, points).into_iter().enumerate() {
        let what = format!("kill {i} at {call} #{k}");
        let src = d.path().join(format!("src{i}"));
        let backing = d.path().join(format!("src{i}.earfs"));
        copy_tree(&tpl, &src);
        let args = args_for(&src, &backing);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_killed(&args, &call, k);
        if was_killed(&out) {
            killed += 1;
        } else {
            assert!(out.status.success(), "{what}: {}", text(&out));
        }
        check_none_lost(&src, &backing, &want, &what);
        let in_src = all_files(&src).len();
        let in_backing = if backing.exists() {
            all_files(&backing).len()
        } else {
            0
        };
        eprintln!(
            "{what}: {}, {in_src} files in SRC, {in_backing} in BACKING",
            if was_killed(&out) {
                "killed"
            } else {
                "finished"
            }
        );
        let out = run(&args);
        assert!(out.status.success(), "{what}: rerun: {}", text(&out));
        check_adopted(&src, &backing, &want, &root, &what);
        std::fs::remove_dir_all(&backing).unwrap();
    }
    assert!(
        killed >= min_killed,
        "only {killed} of {points} runs were killed"
    );
}

/// A rerun of an interrupted adopt: its --kms flags may only confirm the volume's key.
#[test]
fn a_rerun_needs_no_kms_flags_and_refuses_another_key() {
    let d = TestDir::new("earfs-adopt-");
    let key = make_key(d.path());
    let src = d.path().join("data");
    let backing = d.path().join("backing");
    fill(&src, 15, 20, 100_000);
    let want = manifest(&src, &[]);
    let root = root_meta(&src);
    let args = [
        "adopt",
        "--jobs",
        "1",
        "--kms",
        "local",
        "--key-file",
        s(&key),
        s(&src),
        s(&backing),
    ];
    // Renames: earfs.conf, the record, then one per adopted file.
    let out = run_killed(&args, "rename", 6);
    assert!(was_killed(&out), "{}", text(&out));
    assert!(backing.join(".earfs-work/op-adopt.json").exists());
    check_none_lost(&src, &backing, &want, "killed");
    let other = d.path().join("other-key");
    let out = adopt(&[
        "--kms",
        "local",
        "--key-file",
        s(&other),
        s(&src),
        s(&backing),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("leave out --key-file"),
        "{}",
        text(&out)
    );
    assert!(!other.exists());
    // Another SRC is refused: the volume holds the adopt of this one.
    let src2 = d.path().join("data2");
    std::fs::create_dir(&src2).unwrap();
    let out = adopt(&[s(&src2), s(&backing)]);
    assert_eq!(out.status.code(), Some(21), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("earfs adopt {}", s(&src))),
        "{}",
        text(&out)
    );
    let out = adopt(&[s(&src), s(&backing)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming"));
    check_adopted(&src, &backing, &want, &root, "resumed");
}

fn used_bytes(p: &Path) -> u64 {
    let s = rustix::fs::statvfs(p).unwrap();
    (s.f_blocks - s.f_bfree) * s.f_frsize
}

/// The most blocks one file of `dir` takes.
fn largest_alloc(dir: &Path) -> u64 {
    all_files(dir)
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().blocks() * 512)
        .max()
        .unwrap()
}

const PAGE: u64 = 4096;

/// A filesystem with room for the tree, its largest file and a few blocks per file
/// (headers) is enough: no second copy of the data is needed. With the default
/// number of workers.
#[test]
fn room_for_the_largest_file_is_enough() {
    let d = TestDir::new("earfs-adopt-space-");
    let key = make_key(d.path());
    let t = Tmpfs::mount(&d.path().join("fs"), 64 << 20);
    let src = t.0.join("data");
    let backing = t.0.join("data.earfs");
    fill(&src, 16, 30, 2_000_000);
    let want = manifest(&src, &[]);
    let root = root_meta(&src);
    let objects = want.len() as u64;
    let largest = largest_alloc(&src);
    let slack = 2 * PAGE * objects + 16 * PAGE;
    let data: u64 = all_files(&src)
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().blocks() * 512)
        .sum();
    assert!(
        largest + slack < data / 2,
        "the test needs a tree much larger than its largest file: {largest} + {slack} vs {data}"
    );
    t.resize(used_bytes(&t.0) + largest + 2 * PAGE + slack);
    let out = adopt(&[
        "--kms",
        "local",
        "--key-file",
        s(&key),
        s(&src),
        s(&backing),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    check_adopted(&src, &backing, &want, &root, "adopt in little space");
}

/// Too little space for the largest file: refused before anything changes. Room for
/// it but not for every header (a tree of small files, each needs a block more
/// encrypted): a clean stop with "No space left" naming the path, no file lost, no
/// leftover; after the filesystem grows, a rerun finishes.
#[test]
fn a_full_filesystem_stops_it_cleanly_and_a_rerun_finishes() {
    let d = TestDir::new("earfs-adopt-space-");
    let key = make_key(d.path());
    let t = Tmpfs::mount(&d.path().join("fs"), 64 << 20);
    let src = t.0.join("data");
    let backing = t.0.join("data.earfs");
    fill(&src, 17, 40, 12_000);
    let want = manifest(&src, &[]);
    let root = root_meta(&src);
    let used = used_bytes(&t.0);
    let largest = largest_alloc(&src);
    let args = [
        "--jobs",
        "1",
        "--kms",
        "local",
        "--key-file",
        s(&key),
        s(&src),
        s(&backing),
    ];

    t.resize(used + largest / 2);
    let out = adopt(&args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No space left"),
        "{}",
        text(&out)
    );
    assert!(!backing.exists(), "refused, yet BACKING was created");
    assert_same(&want, &manifest(&src, &[]), "refused for space");

    t.resize(used + largest + 6 * PAGE);
    let out = adopt(&args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("No space left on device") && err.contains(s(&backing)),
        "{}",
        text(&out)
    );
    check_none_lost(&src, &backing, &want, "out of space");
    let work: Vec<_> = std::fs::read_dir(backing.join(".earfs-work"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        work.iter().all(|n| !n.ends_with(".new")),
        "a partial copy is left: {work:?}"
    );
    let adopted = all_files(&backing).len();
    assert!(adopted > 1, "stopped before the first file");
    assert!(
        std::fs::read_dir(&src).unwrap().count() > 0,
        "the filesystem did not fill up"
    );

    t.resize(64 << 20);
    let out = adopt(&args);
    assert!(out.status.success(), "{}", text(&out));
    check_adopted(&src, &backing, &want, &root, "after the filesystem grew");
}
