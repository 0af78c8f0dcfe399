//! `earfs reencrypt`: every file moves to the current key version and the volume's
//! format, keeping its plaintext, metadata and hard links; killed at any point (the
//! command, or the daemon mid-rewrite) nothing is lost and a rerun finishes; a full
//! disk stops it cleanly; mounted, it runs under a verifying fio workload.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::tree::{
    Manifest, Tmpfs, assert_same, copy_contents, kill_points, make_tree, manifest, run_killed,
    syscall_counts, was_killed,
};
use common::{MountGuard, TestDir, earfs, fio, fio_ok, init_local_in, mount_at, run, wait_until};
use earfs::content::FileFormat;
use earfs::fs::census::census;
use rand::{Rng, SeedableRng};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A format-1 volume at `backing` (key file `key`) holding a seeded tree written through
/// a mount at `mnt`, then upgraded to write format 2 and rotated to key version 2: every
/// file is in format 1 under key version 1. Returns the tree's manifest.
fn old_volume(dir: &Path, backing: &Path, key: &Path, files: usize, max: usize) -> Manifest {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    make_tree(&src, 42, files, max);
    let want = manifest(&src, &[]);
    init_local_in(key, backing, FileFormat::V1);
    let mnt = dir.join("fill");
    std::fs::create_dir_all(&mnt).unwrap();
    {
        let _m = mount_at(backing, &mnt);
        copy_contents(&src, &mnt);
        // The mount's root takes the tree root's metadata in the manifest comparisons.
        assert_same(
            &want,
            &manifest(&mnt, &[]),
            "the tree written through the mount",
        );
    }
    ok(run(&["upgrade", s(backing)]), "upgrade");
    ok(run(&["rotate", s(backing)]), "rotate");
    let c = census(backing, |_| {}).unwrap();
    assert_eq!(c.key_versions.get("2"), None, "{c:?}");
    assert!(c.of_format(FileFormat::V1) > 0, "{c:?}");
    want
}

/// Mount `backing` at `mnt` and check that it shows `want`.
fn check_mounted(backing: &Path, mnt: &Path, want: &Manifest, what: &str) {
    std::fs::create_dir_all(mnt).unwrap();
    let _m = mount_at(backing, mnt);
    assert_same(want, &manifest(mnt, &[]), what);
}

/// Every file with a header is in format 2 under key version `key`.
fn all_current(backing: &Path, key: u32) {
    let c = census(backing, |_| {}).unwrap();
    let versions: Vec<_> = c.key_versions.iter().filter(|(_, n)| **n > 0).collect();
    assert_eq!(
        versions,
        vec![(&key.to_string(), &(c.files - c.empty - c.no_header))],
        "{c:?}"
    );
    assert_eq!(c.of_format(FileFormat::V1), 0, "{c:?}");
    assert_eq!(c.damaged, 0, "{c:?}");
}

#[test]
fn offline_reencrypt_moves_every_file_to_the_current_key_and_format_and_keeps_the_rest() {
    let d = TestDir::new("reenc-off");
    let (b, k) = (d.path().join("b"), d.path().join("key"));
    let want = old_volume(d.path(), &b, &k, 60, 400_000);
    let links_before = std::fs::metadata(b.join("a/link-b2")).unwrap();
    // --dry-run counts and changes nothing.
    let before = common::all_backing_bytes(&b);
    let out = ok(run(&["reencrypt", "--dry-run", s(&b)]), "dry run");
    assert!(out.contains("would rewrite"), "{out}");
    assert_eq!(
        common::all_backing_bytes(&b),
        before,
        "a dry run changes nothing"
    );

    let out = ok(run(&["reencrypt", s(&b)]), "reencrypt");
    assert!(
        out.contains("rewritten under key version 2 in format 2"),
        "{out}"
    );
    all_current(&b, 2);
    // A file with three names stayed one inode (rewritten in place).
    let links_after = std::fs::metadata(b.join("a/link-b2")).unwrap();
    assert_eq!(links_after.ino(), links_before.ino());
    assert_eq!(links_after.nlink(), 3);
    assert_eq!(
        std::fs::metadata(b.join("a/b/link-b1")).unwrap().ino(),
        links_after.ino()
    );
    check_mounted(&b, &d.path().join("m"), &want, "after reencrypt");
    // Nothing left to do; the old key version can go.
    let out = ok(run(&["reencrypt", s(&b)]), "reencrypt again");
    assert!(out.starts_with("0 file(s) rewritten"), "{out}");
    ok(run(&["retire-key", "--version", "1", s(&b)]), "retire-key");
    assert!(!b.join(".earfs-work").read_dir().unwrap().any(|_| true));
}

#[test]
fn offline_reencrypt_killed_at_20_seeded_points_loses_nothing_and_a_rerun_finishes() {
    let d = TestDir::new("reenc-kill");
    let (tmpl, k) = (d.path().join("template"), d.path().join("key"));
    let want = old_volume(d.path(), &tmpl, &k, 30, 200_000);
    let copy = |to: &Path| {
        let _ = std::fs::remove_dir_all(to);
        common::tree::copy_tree(&tmpl, to);
    };
    let b = d.path().join("b");
    copy(&b);
    let (out, counts) = syscall_counts(&["reencrypt", "--jobs", "1", s(&b)]);
    ok(out, "traced reencrypt");
    all_current(&b, 2);
    let mut points = kill_points(&counts, 0x5eed_0001, 20);
    // And right after the first renames, before each puts its directory's times back
    // (with one worker: the new file's times, its rename, the directory's times).
    points.extend([2, 4, 6].map(|n| ("utimensat".to_string(), n)));
    let mnt = d.path().join("m");
    let mut killed = 0;
    for (syscall, n) in &points {
        copy(&b);
        let out = run_killed(&["reencrypt", "--jobs", "1", s(&b)], syscall, *n);
        if was_killed(&out) {
            killed += 1;
        }
        // Killed anywhere: the volume mounts (finishing a committed rewrite) and every
        // file reads back whole, under its old key or its new one.
        let what = format!("after a kill at {syscall} #{n}");
        check_mounted(&b, &mnt, &want, &what);
        ok(run(&["reencrypt", "--jobs", "1", s(&b)]), "rerun");
        all_current(&b, 2);
        check_mounted(&b, &mnt, &want, &format!("rerun {what}"));
    }
    assert!(
        killed >= 18,
        "only {killed} of {} runs were killed: {points:?}",
        points.len()
    );
    // The parallel path too, killed once in the middle (strace counts calls per thread:
    // with two workers each makes about half the renames).
    copy(&b);
    let out = run_killed(&["reencrypt", "--jobs", "2", s(&b)], "rename", 5);
    assert!(was_killed(&out), "{out:?}");
    ok(run(&["reencrypt", s(&b)]), "rerun of the parallel run");
    all_current(&b, 2);
    check_mounted(&b, &mnt, &want, "after the parallel run");
}

#[test]
fn a_full_disk_stops_reencrypt_cleanly_and_a_rerun_after_space_is_freed_finishes() {
    let d = TestDir::new("reenc-full");
    let k = d.path().join("key");
    let small = Tmpfs::mount(&d.path().join("fs"), 64 << 20);
    let b = small.0.join("b");
    let want = old_volume(d.path(), &b, &k, 30, 100_000);
    // One big file, then fill the disk so that its new copy cannot fit.
    {
        let mnt = d.path().join("fill2");
        std::fs::create_dir_all(&mnt).unwrap();
        let _m = mount_at(&b, &mnt);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut big = vec![0u8; 6 << 20];
        rng.fill(&mut big[..]);
        std::fs::write(mnt.join("big"), &big).unwrap();
    }
    ok(run(&["rotate", s(&b)]), "rotate");
    let st = rustix::fs::statvfs(&small.0).unwrap();
    let free = st.f_bavail * st.f_frsize;
    let filler = free.saturating_sub(3 << 20);
    std::fs::write(small.0.join("filler"), vec![1u8; filler as usize]).unwrap();
    let out = run(&["reencrypt", "--jobs", "1", s(&b)]);
    assert!(
        !out.status.success(),
        "reencrypt should fail on a full disk"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left"), "{err}");
    assert!(err.contains("big"), "the message names the file: {err}");
    // Nothing lost: every file reads back (the big one too).
    let mnt = d.path().join("m");
    {
        std::fs::create_dir_all(&mnt).unwrap();
        let _m = mount_at(&b, &mnt);
        let mut got = manifest(&mnt, &[]);
        assert_eq!(got.remove(Path::new("big")).unwrap().size, 6 << 20);
        assert_same(&want, &got, "after ENOSPC");
    }
    std::fs::remove_file(small.0.join("filler")).unwrap();
    small.resize(128 << 20);
    ok(run(&["reencrypt", s(&b)]), "rerun with space");
    all_current(&b, 3);
}

#[test]
fn mounted_reencrypt_under_a_verifying_fio_workload_rewrites_every_file_in_place() {
    let d = TestDir::new("reenc-online");
    let (b, k, mnt) = (d.path().join("b"), d.path().join("key"), d.path().join("m"));
    init_local_in(&k, &b, FileFormat::V2);
    std::fs::create_dir_all(&mnt).unwrap();
    let _m = mount_at(&b, &mnt);
    // Files written under key version 1, verified at the end.
    let before = [
        "--name=before",
        "--rw=write",
        "--size=16m",
        "--nrfiles=16",
        "--fsync=16",
    ];
    fio_ok(fio(&mnt, &before));
    let ino_before = std::fs::metadata(mnt.join("before.0.0")).unwrap().ino();
    ok(run(&["rotate", s(&b)]), "rotate through the daemon");
    // The workload: random writes verified a little later, on files of their own,
    // while every file of the volume is rewritten (those fio holds open at the end).
    let load = fio(
        &mnt,
        &[
            "--name=load",
            "--rw=randwrite",
            "--size=8m",
            "--numjobs=2",
            "--fsync=8",
            "--verify_backlog=32",
            "--time_based",
            "--runtime=6",
        ],
    );
    std::thread::sleep(Duration::from_secs(1));
    let out = run(&["reencrypt", "--rate", "20MiB/s", s(&mnt)]);
    let text = String::from_utf8_lossy(&out.stdout);
    // fio's own files are open: skipped (exit 23) unless they closed in time.
    assert!(
        out.status.success() || out.status.code() == Some(23),
        "{out:?}"
    );
    assert!(text.contains("rewritten under key version 2"), "{text}");
    let out = ok(
        run(&["reencrypt", "--include-open", s(&mnt)]),
        "reencrypt --include-open",
    );
    assert!(out.contains("rewritten"), "{out}");
    fio_ok(load);
    // Rewritten in place: the kernel sees the same inode.
    assert_eq!(
        std::fs::metadata(mnt.join("before.0.0")).unwrap().ino(),
        ino_before
    );
    // Everything written before verifies, through the running mount and after a remount.
    let mut verify = before.to_vec();
    verify.push("--verify_only");
    fio_ok(fio(&mnt, &verify));
    ok(run(&["reencrypt", s(&mnt)]), "a last pass");
    all_current(&b, 2);
    let st: serde_json::Value =
        serde_json::from_str(&ok(run(&["status", "--json", s(&mnt)]), "status")).unwrap();
    for op in st["ops"].as_array().unwrap() {
        if !["lookup", "getxattr"].contains(&op["op"].as_str().unwrap()) {
            assert_eq!(op["errors"], 0, "{op}");
        }
    }
    drop(_m);
    let _m = mount_at(&b, &mnt);
    fio_ok(fio(&mnt, &verify));
    drop(_m);
    ok(run(&["retire-key", "--version", "1", s(&b)]), "retire-key");
}

/// The daemon's process id, from `earfs status --json`.
fn daemon_pid(mnt: &Path) -> u32 {
    let st: serde_json::Value =
        serde_json::from_str(&ok(run(&["status", "--json", s(mnt)]), "status")).unwrap();
    st["pid"].as_u64().expect("status names the pid") as u32
}

#[test]
fn a_daemon_killed_while_it_rewrites_loses_nothing_and_the_next_mount_finishes() {
    let d = TestDir::new("reenc-daemon-kill");
    let (b, k, mnt) = (d.path().join("b"), d.path().join("key"), d.path().join("m"));
    let want = old_volume(d.path(), &b, &k, 12, 2 << 20);
    std::fs::create_dir_all(&mnt).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0002);
    let mut finished_on_mount = 0;
    for i in 0..20 {
        let guard = mount_at(&b, &mnt);
        let pid = daemon_pid(&mnt);
        let mut cli = Command::new(earfs())
            .args(["reencrypt", "--rate", "8MiB/s", s(&mnt)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..900)));
        common::signal(pid, rustix::process::Signal::KILL);
        let _ = cli.wait();
        assert!(wait_until(10, || !Path::new(&format!("/proc/{pid}")).exists()));
        drop(guard); // clears the dead mount
        let log = d.path().join(format!("log{i}"));
        let out = run(&["mount", "--log-file", s(&log), s(&b), s(&mnt)]);
        ok(out, "mount after the kill");
        let guard = MountGuard(mnt.clone());
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("finished the interrupted rewrite")
        {
            finished_on_mount += 1;
        }
        assert_same(&want, &manifest(&mnt, &[]), &format!("kill {i}"));
        drop(guard);
    }
    eprintln!("{finished_on_mount} of 20 kills left a committed rewrite that the mount finished");
    ok(run(&["reencrypt", s(&b)]), "the rerun");
    all_current(&b, 2);
    check_mounted(&b, &mnt, &want, "after the rerun");
}

#[test]
fn a_damaged_file_is_named_and_left_as_it_is_and_the_rest_is_rewritten() {
    let d = TestDir::new("reenc-damaged");
    let (b, k) = (d.path().join("b"), d.path().join("key"));
    let want = old_volume(d.path(), &b, &k, 12, 50_000);
    // A header with another magic: not an earfs file any more.
    let victim = b.join("base/sparse");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[..8].copy_from_slice(b"garbage!");
    std::fs::write(&victim, &bytes).unwrap();
    let out = run(&["reencrypt", s(&b)]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("damaged, left as it is: ") && stdout.contains("base/sparse"),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 damaged file(s)"),
        "{out:?}"
    );
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        bytes,
        "the damaged file is untouched"
    );
    // Every other file moved to version 2 and reads back.
    let c = census(&b, |_| {}).unwrap();
    assert_eq!(c.key_versions.get("1"), None, "{c:?}");
    assert_eq!(c.damaged, 1, "{c:?}");
    // (The damaged file fails with EIO through the mount: it goes before the check,
    // which then knows the directory's times changed.)
    std::fs::remove_file(&victim).unwrap();
    let mnt = d.path().join("m");
    std::fs::create_dir_all(&mnt).unwrap();
    let _m = mount_at(&b, &mnt);
    let mut got = manifest(&mnt, &[]);
    let mut want = want;
    want.remove(Path::new("base/sparse"));
    got.get_mut(Path::new("base")).unwrap().mtime = want[Path::new("base")].mtime;
    assert_same(&want, &got, "after a reencrypt that met a damaged file");
}
