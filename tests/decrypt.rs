//! `earfs decrypt BACKING DEST` and `earfs cat BACKING_FILE` through the real binary,
//! on volumes filled through a real mount: the plaintext tree comes out whole (contents,
//! holes, hard links, metadata), across formats and key versions; refusals; damaged
//! files named; kill -9 at seeded points then a rerun; a DEST that fills up; and `cat`
//! from copies of a backing directory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::tree::*;
use common::{TestDir, init_local, init_local_in, mount_at, run};
use sha2::{Digest, Sha256};

/// The temp dir decrypt keeps at DEST's root while it runs.
const TMP: &str = ".earfs-decrypt-tmp";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "earfs {args:?} failed ({:?}): {}",
        out.status,
        stderr(&out)
    );
    out
}

/// Copy the tree at `src` into the volume at `backing` through a real mount.
fn fill_through_mount(backing: &Path, src: &Path, mnt: &Path) {
    std::fs::create_dir_all(mnt).unwrap();
    let _m = mount_at(backing, mnt);
    copy_contents(src, mnt);
    // The mount's root: its times are the backing root's, not part of the manifest.
}

/// A volume in `d` holding a `make_tree` tree (seed, files, max size): (source tree,
/// backing directory).
fn volume_with_tree(d: &Path, seed: u64, files: usize, max: usize) -> (PathBuf, PathBuf) {
    let src = d.join("src");
    std::fs::create_dir(&src).unwrap();
    make_tree(&src, seed, files, max);
    let backing = d.join("backing");
    init_local(&d.join("key"), &backing);
    fill_through_mount(&backing, &src, &d.join("mnt"));
    (src, backing)
}

/// Every regular file at its final path under `dest` (the temp dir left out) is whole:
/// its content is the one `want` has at that path.
fn no_partial_files(want: &Manifest, dest: &Path) {
    if !dest.exists() {
        return;
    }
    let mut stack = vec![dest.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if dir == dest && e.file_name() == TMP {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let rel = p.strip_prefix(dest).unwrap();
                let w = want
                    .get(rel)
                    .unwrap_or_else(|| panic!("{}: not in the volume", rel.display()));
                let data = std::fs::read(&p).unwrap();
                assert_eq!(
                    (data.len() as u64, hex::encode(Sha256::digest(&data))),
                    (w.size, w.sha256.clone()),
                    "{}: a partial or wrong file at its final path",
                    rel.display()
                );
            }
        }
    }
}

/// Damage the header of the backing file at `path` (its magic).
fn damage_header(path: &Path) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(b"XXXXXXXX", 0).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn decrypt_writes_the_whole_tree_with_metadata_links_and_holes() {
    let d = TestDir::new("earfs-decrypt-");
    let (src, backing) = volume_with_tree(d.path(), 11, 60, 400_000);
    let want = manifest(&src, &[]);
    assert!(want.values().any(|e| e.sparse) && want.values().any(|e| e.links.len() == 3));
    let dest = d.path().join("plain");
    let out = ok(&["decrypt", s(&backing), s(&dest)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("wrote the plaintext"), "{text}");
    assert!(stderr(&out).contains("decrypted "), "{}", stderr(&out));
    assert_same(&want, &manifest(&dest, &[]), "decrypt");
    assert!(!dest.join(TMP).exists());
    // The record of the operation is gone, the backing tree unchanged.
    assert!(!backing.join(".earfs-work/op-decrypt.json").exists());
    // The root of DEST has the backing root's owner and mode.
    let (b, p) = (
        std::fs::metadata(&backing).unwrap(),
        std::fs::metadata(&dest).unwrap(),
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!((b.mode(), b.uid(), b.gid()), (p.mode(), p.uid(), p.gid()));
    // Done: a second run into the same, now foreign, DEST is refused.
    let again = run(&["decrypt", s(&backing), s(&dest)]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
}

#[test]
fn decrypt_reads_format_1_and_2_files_under_two_key_versions() {
    let d = TestDir::new("earfs-decrypt-mixed-");
    let src = d.path().join("src");
    let (old, new) = (src.join("old"), src.join("new"));
    std::fs::create_dir_all(&old).unwrap();
    std::fs::create_dir_all(&new).unwrap();
    make_tree(&old, 21, 30, 200_000);
    make_tree(&new, 22, 30, 200_000);
    let backing = d.path().join("backing");
    init_local_in(
        &d.path().join("key"),
        &backing,
        earfs::content::FileFormat::V1,
    );
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    {
        let _m = mount_at(&backing, &mnt);
        copy_tree(&old, &mnt);
    }
    ok(&["upgrade", s(&backing)]);
    ok(&["rotate", s(&backing)]);
    {
        let _m = mount_at(&backing, &mnt);
        copy_tree(&new, &mnt);
    }
    let info = ok(&["info", "--files", "--json", s(&backing)]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let files = &v["files"];
    for (what, key) in [("formats", "1"), ("formats", "2")] {
        assert!(files[what][key].as_u64().unwrap_or(0) > 0, "{v:#}");
    }
    for kv in ["1", "2"] {
        assert!(files["key_versions"][kv].as_u64().unwrap_or(0) > 0, "{v:#}");
    }
    let dest = d.path().join("plain");
    ok(&["decrypt", "--jobs", "3", s(&backing), s(&dest)]);
    assert_same(&manifest(&src, &[]), &manifest(&dest, &[]), "mixed volume");
}

#[test]
fn decrypt_refuses_a_foreign_dest_and_a_mounted_volume() {
    let d = TestDir::new("earfs-decrypt-refuse-");
    let (_src, backing) = volume_with_tree(d.path(), 5, 10, 20_000);
    // A non-empty directory that is not an earlier decrypt of this volume.
    let dest = d.path().join("busy");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("mine"), b"keep me").unwrap();
    let out = run(&["decrypt", s(&backing), s(&dest)]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("not empty") && stderr(&out).contains(s(&dest)),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(dest.join("mine")).unwrap(), b"keep me");
    assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 1);
    // A file as DEST.
    let out = run(&["decrypt", s(&backing), s(&dest.join("mine"))]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // DEST inside the backing directory.
    let out = run(&["decrypt", s(&backing), s(&backing.join("plain"))]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!backing.join("plain").exists());
    // Not a volume.
    let out = run(&["decrypt", s(&d.path().join("src")), s(&d.path().join("x"))]);
    assert_eq!(out.status.code(), Some(10), "{}", stderr(&out));
    // Mounted: the volume's lock is held.
    let mnt = d.path().join("mnt");
    let _m = mount_at(&backing, &mnt);
    let fresh = d.path().join("fresh");
    let out = run(&["decrypt", s(&backing), s(&fresh)]);
    assert_eq!(out.status.code(), Some(18), "{}", stderr(&out));
    assert!(stderr(&out).contains("mounted"), "{}", stderr(&out));
    assert!(!fresh.exists());
}

#[test]
fn decrypt_names_every_damaged_file_and_writes_the_others() {
    let d = TestDir::new("earfs-decrypt-damage-");
    let (src, backing) = volume_with_tree(d.path(), 8, 30, 100_000);
    // Two damaged files: a bad header, and one cut shorter than a header.
    let mut want = manifest(&src, &[]);
    let picks: Vec<PathBuf> = want
        .iter()
        .filter(|(_, e)| e.kind == "file" && e.links.is_empty() && e.size > 8192)
        .map(|(p, _)| p.clone())
        .take(2)
        .collect();
    assert_eq!(picks.len(), 2);
    damage_header(&backing.join(&picks[0]));
    std::fs::OpenOptions::new()
        .write(true)
        .open(backing.join(&picks[1]))
        .unwrap()
        .set_len(100)
        .unwrap();
    let dest = d.path().join("plain");
    let out = run(&["decrypt", s(&backing), s(&dest)]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("2 file(s)"), "{err}");
    for p in &picks {
        assert!(err.contains(s(p)), "{} not named: {err}", p.display());
    }
    // The others are all there, whole; the damaged ones not.
    for p in &picks {
        want.remove(p);
    }
    for p in &picks {
        assert!(!dest.join(p).exists(), "{} written", p.display());
    }
    assert_same(&want, &manifest(&dest, &[]), "decrypt with damaged files");
    assert!(!dest.join(TMP).exists());
}

/// A decrypt killed with SIGKILL at 20 seeded points, each run again to the end.
#[test]
fn decrypt_killed_anywhere_finishes_when_run_again() {
    let d = TestDir::new("earfs-decrypt-kill-");
    let (src, backing) = volume_with_tree(d.path(), 31, 40, 300_000);
    let want = manifest(&src, &[]);
    // Count the calls of a complete run (on a copy: the original stays the start).
    let probe = d.path().join("probe");
    let args = |b: &Path, dest: &Path| -> Vec<String> {
        vec![
            "decrypt".into(),
            "--jobs".into(),
            "1".into(),
            s(b).into(),
            s(dest).into(),
        ]
    };
    let (out, counts) = {
        let a = args(&backing, &probe);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        syscall_counts(&a)
    };
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same(&want, &manifest(&probe, &[]), "complete run under strace");
    // Kills that land after the job is done (its last lines printed) do not count:
    // take points until 20 seeded ones (and the 2 chosen) landed before.
    // Two chosen first: between a hard-link group's first name and its others.
    let mut points = vec![("linkat".to_string(), 1), ("linkat".to_string(), 2)];
    points.extend(kill_points(&counts, 0xdec, 40));

    let mut before_end = 0;
    for (i, (call, k)) in points.iter().enumerate() {
        if before_end >= 22 {
            break;
        }
        // The volume is never changed by decrypt but its record: start from a copy.
        let b = d.path().join(format!("b{i}"));
        copy_tree(&backing, &b);
        let dest = d.path().join(format!("dest{i}"));
        let a = args(&b, &dest);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out_k = run_killed(&a, call, *k);
        let out = &out_k;
        let record = b.join(".earfs-work/op-decrypt.json");
        if was_killed(out) {
            no_partial_files(&want, &dest);
        } else {
            assert!(out.status.success(), "{call}#{k}: {}", stderr(out));
        }
        // Killed after its last step (the record removed): DEST is complete, and a
        // rerun refuses it as not empty.
        let done = dest.exists() && !dest.join(TMP).exists() && !record.exists();
        // The rerun takes the default, parallel path.
        let rerun: Vec<&str> = a
            .iter()
            .copied()
            .filter(|x| *x != "--jobs" && *x != "1")
            .collect();
        let out = run(&rerun);
        eprintln!(
            "kill at {call}#{k}: killed {}, done before {done}",
            was_killed(&out_k)
        );
        if done {
            assert_eq!(out.status.code(), Some(2), "{call}#{k}: {}", stderr(&out));
        } else {
            before_end += 1;
            assert!(
                out.status.success(),
                "rerun after a kill at {call}#{k}: {}",
                stderr(&out)
            );
        }
        assert_same(&want, &manifest(&dest, &[]), &format!("kill at {call}#{k}"));
        assert!(!dest.join(TMP).exists());
        assert!(!b.join(".earfs-work/op-decrypt.json").exists());
        std::fs::remove_dir_all(&b).unwrap();
        std::fs::remove_dir_all(&dest).unwrap();
    }
    assert!(
        before_end >= 22,
        "only {before_end} runs of {} were killed before the end",
        points.len()
    );
}

#[test]
fn decrypt_into_a_full_filesystem_stops_cleanly_and_finishes_after_resize() {
    let d = TestDir::new("earfs-decrypt-enospc-");
    let (src, backing) = volume_with_tree(d.path(), 41, 40, 300_000);
    let want = manifest(&src, &[]);
    // Room for about half of the data (the sparse file's holes take none).
    let data: u64 = want
        .values()
        .filter(|e| e.kind == "file" && !e.sparse)
        .map(|e| e.size)
        .sum();
    assert!(data > 400_000, "{data}");
    let fs = Tmpfs::mount(&d.path().join("small"), data / 2 / 4096 * 4096);
    let dest = fs.0.join("plain");
    let out = run(&["decrypt", s(&backing), s(&dest)]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left"), "{err}");
    assert!(err.contains(s(&dest)), "{err}");
    assert!(err.contains("run the same command again"), "{err}");
    assert!(!err.contains("panick"), "{err}");
    no_partial_files(&want, &dest);
    // The operation is recorded as unfinished (for fsck).
    let rec = std::fs::read_to_string(backing.join(".earfs-work/op-decrypt.json")).unwrap();
    assert!(rec.contains(s(&dest)), "{rec}");
    fs.resize(64 << 20);
    ok(&["decrypt", s(&backing), s(&dest)]);
    assert_same(&want, &manifest(&dest, &[]), "after ENOSPC and resize");
    assert!(!dest.join(TMP).exists());
    assert!(!backing.join(".earfs-work/op-decrypt.json").exists());
}

/// A snapshot is read-only: decrypt keeps no record there, and a rerun is still
/// recognised (by the marker in DEST).
#[test]
fn decrypt_of_a_read_only_snapshot_runs_and_reruns() {
    let d = TestDir::new("earfs-decrypt-ro-");
    let (src, backing) = volume_with_tree(d.path(), 51, 20, 100_000);
    let want = manifest(&src, &[]);
    let ro = d.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let st = Command::new("mount")
        .args(["--bind", "-o", "ro"])
        .arg(&backing)
        .arg(&ro)
        .status()
        .unwrap();
    assert!(st.success());
    let dest = d.path().join("plain");
    // Killed in the middle (at the 10th rename: some files are in place), then again.
    let out = run_killed(&["decrypt", "--jobs", "1", s(&ro), s(&dest)], "rename", 10);
    assert!(was_killed(&out), "{}", stderr(&out));
    no_partial_files(&want, &dest);
    let out = ok(&["decrypt", s(&ro), s(&dest)]);
    assert!(stderr(&out).contains("read-only"), "{}", stderr(&out));
    assert_same(&want, &manifest(&dest, &[]), "from a read-only snapshot");
}

fn cat(args: &[&str]) -> Output {
    let mut a = vec!["cat"];
    a.extend_from_slice(args);
    run(&a)
}

#[test]
fn cat_decrypts_files_of_a_copy_and_files_copied_out_alone() {
    let d = TestDir::new("earfs-cat-");
    let (src, backing) = volume_with_tree(d.path(), 61, 30, 300_000);
    // A copy of the backing directory (a snapshot restored elsewhere).
    let copy = d.path().join("copy");
    copy_tree(&backing, &copy);
    let want = manifest(&src, &[]);
    for (rel, e) in want.iter().filter(|(_, e)| e.kind == "file") {
        let out = cat(&[s(&copy.join(rel))]);
        assert!(out.status.success(), "{}: {}", rel.display(), stderr(&out));
        assert_eq!(
            hex::encode(Sha256::digest(&out.stdout)),
            e.sha256,
            "{}",
            rel.display()
        );
    }
    // The sparse file comes out byte for byte, holes as zeros.
    let out = cat(&[s(&copy.join("base/sparse"))]);
    assert_eq!(out.stdout, std::fs::read(src.join("base/sparse")).unwrap());
    // From a relative path inside the copy, and several files at once.
    let files: Vec<&PathBuf> = want
        .iter()
        .filter(|(p, e)| e.kind == "file" && e.size > 0 && p.starts_with("base"))
        .map(|(p, _)| p)
        .collect();
    let (one, two) = (files[0], files[files.len() - 1]);
    assert_ne!(one, two);
    let out = Command::new(common::earfs())
        .current_dir(copy.join("base"))
        .arg("cat")
        .arg(one.strip_prefix("base").unwrap())
        .arg(Path::new("..").join(two))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut both = std::fs::read(src.join(one)).unwrap();
    both.extend(std::fs::read(src.join(two)).unwrap());
    assert_eq!(out.stdout, both);
    // A file copied out alone, with the config given.
    let lone_dir = d.path().join("lone");
    std::fs::create_dir(&lone_dir).unwrap();
    let lone = lone_dir.join("2619");
    std::fs::copy(copy.join(two), &lone).unwrap();
    let conf = d.path().join("saved-earfs.conf");
    std::fs::copy(copy.join("earfs.conf"), &conf).unwrap();
    let out = cat(&["--conf", s(&conf), s(&lone)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, std::fs::read(src.join(two)).unwrap());
    // Without it: not in a volume.
    let out = cat(&[s(&lone)]);
    assert_eq!(out.status.code(), Some(10), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--conf") && stderr(&out).contains(s(&lone)),
        "{}",
        stderr(&out)
    );
    // A config that was changed does not authenticate.
    let text = std::fs::read_to_string(&conf).unwrap();
    let bad = d.path().join("bad.conf");
    let tampered = text.replacen("volume_id = \"", "volume_id = \"0", 1);
    assert_ne!(tampered, text);
    std::fs::write(&bad, tampered).unwrap();
    let out = cat(&["--conf", s(&bad), s(&lone)]);
    assert_eq!(out.status.code(), Some(15), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    // A wrong key file given for this machine.
    let other_key = d.path().join("other.key");
    let other = d.path().join("other");
    init_local(&other_key, &other);
    let out = cat(&["--key-file", s(&other_key), s(&copy.join(one))]);
    assert_eq!(out.status.code(), Some(14), "{}", stderr(&out));
    // The right one, given explicitly, after the recorded one moved away.
    let moved = d.path().join("moved.key");
    std::fs::rename(d.path().join("key"), &moved).unwrap();
    let out = cat(&[s(&copy.join(one))]);
    assert_eq!(out.status.code(), Some(12), "{}", stderr(&out));
    let out = cat(&["--key-file", s(&moved), s(&copy.join(one))]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, std::fs::read(src.join(one)).unwrap());
}

#[test]
fn cat_fails_on_a_damaged_file_and_closes_quietly_on_a_closed_pipe() {
    let d = TestDir::new("earfs-cat-damage-");
    let (src, backing) = volume_with_tree(d.path(), 71, 20, 300_000);
    // A live backing directory, read while unmounted (no lock needed): a big file.
    let big = manifest(&src, &[])
        .into_iter()
        .filter(|(_, e)| e.kind == "file")
        .max_by_key(|(_, e)| e.size)
        .unwrap()
        .0;
    assert!(
        std::fs::metadata(src.join(&big)).unwrap().len() > 100_000,
        "{}",
        big.display()
    );
    let sh = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} cat {} | head -c 10",
            common::earfs(),
            s(&backing.join(&big))
        ))
        .output()
        .unwrap();
    assert!(sh.status.success());
    assert_eq!(sh.stdout, std::fs::read(src.join(&big)).unwrap()[..10]);
    assert!(
        sh.stderr.is_empty(),
        "stderr: {}",
        String::from_utf8_lossy(&sh.stderr)
    );
    // While mounted, too (read-only, without the lock).
    let mnt = d.path().join("mnt");
    {
        let _m = mount_at(&backing, &mnt);
        let out = cat(&[s(&backing.join("base/sparse"))]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(out.stdout, std::fs::read(src.join("base/sparse")).unwrap());
    }
    damage_header(&backing.join(&big));
    let out = cat(&[s(&backing.join(&big))]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(s(&backing.join(&big))) && stderr(&out).contains("cannot decrypt"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
    // The volume's own files are not files of the volume.
    let out = cat(&[s(&backing.join("earfs.conf"))]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // A directory.
    let out = cat(&[s(&backing.join("base"))]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

/// `earfs cat` of a copy of a volume whose key is in AWS KMS (moto), on "another
/// machine": the recorded credentials file is gone, this machine's is given.
#[test]
fn cat_unwraps_through_aws_kms_with_this_machines_credentials() {
    use common::kms::{Fake, aws_credentials_file, aws_key, provider_flags};
    let d = TestDir::new("earfs-cat-aws-");
    let fake = Fake::aws(false);
    let (arn, _) = aws_key(&fake, "alias/earfs-cat");
    let creds = d.path().join("node-a.credentials");
    aws_credentials_file(&creds, "AKIDNODEA", "secret-a");
    let backing = d.path().join("backing");
    let mut init = vec!["init".to_string()];
    init.extend(provider_flags("aws", &fake, &arn, &creds));
    init.push(s(&backing).into());
    ok(&init.iter().map(String::as_str).collect::<Vec<_>>());
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_tree(&src, 81, 10, 100_000);
    fill_through_mount(&backing, &src, &d.path().join("mnt"));
    let copy = d.path().join("copy");
    copy_tree(&backing, &copy);
    let (rel, e) = manifest(&src, &[])
        .into_iter()
        .filter(|(_, e)| e.kind == "file")
        .max_by_key(|(_, e)| e.size)
        .unwrap();
    // The node's credentials file is not on this machine.
    std::fs::remove_file(&creds).unwrap();
    let out = cat(&[s(&copy.join(&rel))]);
    assert_eq!(out.status.code(), Some(28), "{}", stderr(&out));
    let mine = d.path().join("restore.credentials");
    aws_credentials_file(&mine, "AKIDRESTORE", "secret-b");
    let out = cat(&["--credentials", s(&mine), s(&copy.join(&rel))]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(hex::encode(Sha256::digest(&out.stdout)), e.sha256);
    // Another key than the volume's is refused before any call.
    let out = cat(&[
        "--credentials",
        s(&mine),
        "--key-arn",
        "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-0000-0000-000000000000",
        s(&copy.join(&rel)),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
