//! `earfs fsck`: planted damage named (all of it, and nothing healthy), counts by
//! format and key version, the config's MAC, the KMS, leftovers of interrupted
//! operations reported and repaired, a mounted volume, kill -9 during `--repair`,
//! and a backing filesystem that fills up during a repair.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::tree::*;
use common::*;
use earfs::content::{FileFormat, Keyring, new_header};
use earfs::crypto::Dek;
use earfs::fs::copy::Keys;
use earfs::fs::rewrite::{Record, copy_plain, create_new, work_dir, write_atomic};
use earfs::kms::Retry;
use earfs::volume::VolumeConfig;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `earfs fsck ARGS BACKING --json`: the exit code and the report.
fn fsck_json(backing: &Path, args: &[&str]) -> (i32, Value) {
    let mut a = vec!["fsck", "--json"];
    a.extend_from_slice(args);
    a.push(s(backing));
    let out = run(&a);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "fsck --json printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let code = out.status.code().unwrap();
    assert_eq!(v["exit_code"], code, "{v:#}");
    (code, v)
}

/// `earfs fsck ARGS BACKING` (text).
fn fsck_text(backing: &Path, args: &[&str]) -> (i32, String, String) {
    let mut a = vec!["fsck"];
    a.extend_from_slice(args);
    a.push(s(backing));
    let out = run(&a);
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(out: Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A local-key volume in a test directory.
struct Vol {
    dir: TestDir,
    backing: PathBuf,
    key: PathBuf,
    mnt: PathBuf,
}

impl Vol {
    fn new(format: FileFormat) -> Vol {
        let dir = TestDir::new("earfs-fsck-");
        Vol::in_dir(dir, format)
    }

    fn in_dir(dir: TestDir, format: FileFormat) -> Vol {
        let backing = dir.path().join("backing");
        let key = dir.path().join("key");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        init_local_in(&key, &backing, format);
        Vol {
            dir,
            backing,
            key,
            mnt,
        }
    }

    fn mount(&self) -> MountGuard {
        mount_at(&self.backing, &self.mnt)
    }

    fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn b(&self, rel: &str) -> PathBuf {
        self.backing.join(rel)
    }
}

/// The volume's keys, unwrapped as the commands do.
fn volume_keys(backing: &Path) -> Keys {
    let cfg = VolumeConfig::load(backing).unwrap();
    let p = cfg.kms.open(Retry::default()).unwrap();
    let ring = cfg.unlock(backing, p.as_ref()).unwrap();
    Keys::new(
        ring,
        FileFormat::from_number(u64::from(cfg.format)).unwrap(),
    )
}

fn times(m: &fs::Metadata) -> ((i64, i64), (i64, i64)) {
    ((m.atime(), m.atime_nsec()), (m.mtime(), m.mtime_nsec()))
}

fn set_times(p: &Path, t: ((i64, i64), (i64, i64))) {
    let ts = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: t.0.0,
            tv_nsec: t.0.1,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: t.1.0,
            tv_nsec: t.1.1,
        },
    };
    rustix::fs::utimensat(rustix::fs::CWD, p, &ts, rustix::fs::AtFlags::empty()).unwrap();
}

/// The state a crash leaves in the middle of a committed in-place rewrite of `rel`
/// (what `reencrypt` does): the new backing file (the current key and format) in the
/// work directory, the commit record, and the target half copied (its first `half`
/// bytes are the new file's, the rest still the old file's).
fn plant_committed_rewrite(backing: &Path, rel: &str, half: usize) {
    let keys = volume_keys(backing);
    let target = backing.join(rel);
    let m = fs::metadata(&target).unwrap();
    let work = work_dir(backing).unwrap();
    let new = work.join(format!("rewrite-{}.new", m.ino()));
    let src = keys.open(File::open(&target).unwrap(), &target).unwrap();
    let mut dst = keys.open(create_new(&new).unwrap(), &new).unwrap();
    copy_plain(&src, &mut dst, |_| {}).unwrap();
    dst.sync().unwrap();
    drop((src, dst));
    let (atime, mtime) = times(&m);
    let rec = Record {
        path: rel.into(),
        ino: m.ino(),
        atime,
        mtime,
    };
    write_atomic(
        &work.join(format!("rewrite-{}.json", m.ino())),
        &serde_json::to_vec(&rec).unwrap(),
    )
    .unwrap();
    let bytes = fs::read(&new).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&target).unwrap();
    f.write_all_at(&bytes[..half.min(bytes.len())], 0).unwrap();
    f.sync_all().unwrap();
}

/// An in-place rewrite of `rel` interrupted before it committed: a partial new file.
fn plant_uncommitted_rewrite(backing: &Path, rel: &str) {
    let ino = fs::metadata(backing.join(rel)).unwrap().ino();
    let work = work_dir(backing).unwrap();
    fs::write(work.join(format!("rewrite-{ino}.new")), vec![0x5a; 6000]).unwrap();
}

/// Blocks reserved past the end of backing file `rel` (as an interrupted write leaves
/// them), its times kept.
fn plant_reservation(backing: &Path, rel: &str) {
    let p = backing.join(rel);
    let m = fs::metadata(&p).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::KEEP_SIZE, m.len(), 1 << 20).unwrap();
    drop(f);
    set_times(&p, times(&m));
}

fn damaged_of(v: &Value) -> BTreeMap<String, String> {
    v["damaged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["path"].as_str().unwrap().to_string(),
                d["problem"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn leftover_kinds(v: &Value) -> Vec<(String, String)> {
    let mut k: Vec<(String, String)> = v["leftovers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["kind"].as_str().unwrap().to_string(),
                l["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    k.sort();
    k
}

fn counts(v: &Value, key: &str) -> BTreeMap<String, u64> {
    v["counts"][key]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
        .collect()
}

fn map(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

fn patterned(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn every_damaged_file_is_named_with_its_reason_and_no_healthy_one() {
    let v = Vol::new(FileFormat::V1);
    let mut want: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
    // Format 1, key version 1.
    {
        let _m = v.mount();
        for (name, n) in [("h1-one", 1), ("h1-fifteen", 15), ("h1-big", 5000)] {
            let data = patterned(n, 1);
            fs::write(v.m(name), &data).unwrap();
            want.insert(name, data);
        }
    }
    ok(run(&["upgrade", s(&v.backing)]), "upgrade");
    // Format 2, key version 1: a hard link across directories, a sparse file.
    {
        let _m = v.mount();
        fs::create_dir(v.m("sub")).unwrap();
        for (name, n) in [("h2-sixteen", 16), ("h2-seventeen", 17)] {
            let data = patterned(n, 2);
            fs::write(v.m(name), &data).unwrap();
            want.insert(name, data);
        }
        fs::hard_link(v.m("h2-seventeen"), v.m("sub/h2-link")).unwrap();
        want.insert("sub/h2-link", want["h2-seventeen"].clone());
        let f = File::create(v.m("h2-sparse")).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", 3 << 20).unwrap();
        let mut sparse = vec![0u8; (3 << 20) + 4];
        sparse[..4].copy_from_slice(b"head");
        sparse[3 << 20..].copy_from_slice(b"tail");
        want.insert("h2-sparse", sparse);
    }
    ok(run(&["rotate", s(&v.backing)]), "rotate");
    // Format 2, key version 2: 4097 bytes, a header alone (truncated to 0), empty.
    {
        let _m = v.mount();
        let data = patterned(4097, 3);
        fs::write(v.m("sub/h3-4097"), &data).unwrap();
        want.insert("sub/h3-4097", data);
        fs::write(v.m("h3-header-only"), b"gone soon").unwrap();
        File::options()
            .write(true)
            .open(v.m("h3-header-only"))
            .unwrap()
            .set_len(0)
            .unwrap();
        want.insert("h3-header-only", Vec::new());
        File::create(v.m("h3-empty")).unwrap();
        want.insert("h3-empty", Vec::new());
        std::os::unix::fs::symlink("h1-big", v.m("h3-symlink")).unwrap();
    }
    assert_eq!(fs::metadata(v.b("h3-header-only")).unwrap().len(), 4096);
    // A header block that never reached the disk: zeros. Not damage.
    fs::write(v.b("h-orphan"), vec![0u8; 4096 + 100]).unwrap();

    // Planted damage, from a healthy v2 file (4112 bytes, key version 1).
    let good = fs::read(v.b("h2-sixteen")).unwrap();
    assert_eq!(good.len(), 4112);
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    let other = Keyring::new([(9, Dek::generate().unwrap())], 9).unwrap();
    let (h9, _) = new_header(&other, FileFormat::V2).unwrap();
    let planted: Vec<(&str, Vec<u8>, &str)> = vec![
        ("d-magic", with(&|b| b[0] ^= 0x20), "bad-magic"),
        ("sub/d-mac", with(&|b| b[40] ^= 1), "bad-mac"),
        (
            "d-key-version",
            [&h9[..], &[7u8; 16][..]].concat(),
            "unknown-key-version",
        ),
        ("d-format", with(&|b| b[8] = 3), "unknown-format"),
        ("d-flags", with(&|b| b[10] = 1), "unknown-flags"),
        ("d-hundred", patterned(100, 9), "short"),
        (
            "sub/d-v2-tail",
            [&good[..4096], &[1u8; 5][..]].concat(),
            "bad-length",
        ),
        (
            "d-plaintext",
            b"a plaintext file that never went through earfs\n".repeat(200),
            "bad-magic",
        ),
    ];
    for (name, bytes, _) in &planted {
        fs::write(v.b(name), bytes).unwrap();
    }
    let want_damaged: BTreeMap<String, String> = planted
        .iter()
        .map(|(n, _, p)| (n.to_string(), p.to_string()))
        .collect();

    let (code, r) = fsck_json(&v.backing, &[]);
    assert_eq!(code, 4, "{r:#}");
    assert_eq!(damaged_of(&r), want_damaged, "{r:#}");
    assert_eq!(r["config"]["status"], "authenticated");
    assert_eq!(r["headers_authenticated"], true);
    assert_eq!(counts(&r, "formats"), map(&[("1", 3), ("2", 5)]), "{r:#}");
    assert_eq!(
        counts(&r, "key_versions"),
        map(&[("1", 6), ("2", 2)]),
        "{r:#}"
    );
    let c = &r["counts"];
    assert_eq!(c["files"], 3 + 3 + 3 + 1 + 8, "{r:#}");
    assert_eq!(
        (
            &c["empty"],
            &c["header_only"],
            &c["no_header"],
            &c["more_links"],
            &c["damaged"]
        ),
        (&1.into(), &1.into(), &1.into(), &1.into(), &8.into()),
        "{r:#}"
    );
    assert_eq!((&c["directories"], &c["symlinks"]), (&1.into(), &1.into()));
    assert_eq!(c["reserved_past_end"], 0, "{r:#}");
    assert_eq!(r["leftovers"].as_array().unwrap().len(), 0);
    assert_eq!(r["problems_left"], 8);
    assert_eq!(r["result"], "problems left");

    // The text report names each damaged file with its reason, and no healthy one.
    let (tcode, out, err) = fsck_text(&v.backing, &[]);
    assert_eq!(tcode, 4, "{out}{err}");
    for (name, _, problem) in &planted {
        assert!(
            out.contains(&format!("  {name}: {problem}: ")),
            "{name} not named:\n{out}"
        );
    }
    for healthy in want.keys().chain(["h-orphan"].iter()) {
        let base = Path::new(healthy).file_name().unwrap().to_str().unwrap();
        assert!(!out.contains(base), "{healthy} named:\n{out}");
    }
    assert!(out.contains("damaged:      8 files"), "{out}");
    assert!(err.contains("8 problems left"), "{err}");

    // fsck judges as the mount does: every damaged file fails with EIO, every healthy
    // one reads back.
    let _m = v.mount();
    for (name, data) in &want {
        assert_eq!(&fs::read(v.m(name)).unwrap(), data, "{name}");
    }
    let orphan = fs::read(v.m("h-orphan")).unwrap();
    assert!(!orphan.is_empty() && orphan.iter().all(|&b| b == 0));
    for (name, _, _) in &planted {
        let e = fs::read(v.m(name)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{name}: {e}");
    }
}

#[test]
fn a_clean_volume_exits_0_a_tampered_config_4_a_missing_key_8() {
    let v = Vol::new(FileFormat::V2);
    {
        let _m = v.mount();
        fs::write(v.m("a"), patterned(70_000, 4)).unwrap();
        fs::write(v.m("b"), b"x").unwrap();
    }
    let (code, out, err) = fsck_text(&v.backing, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("result:       clean"), "{out}");
    let (code, r) = fsck_json(&v.backing, &[]);
    assert_eq!((code, &r["result"]), (0, &"clean".into()), "{r:#}");
    assert_eq!(r["counts"]["files"], 2);
    // --repair on a clean volume changes nothing: still 0.
    let (code, r) = fsck_json(&v.backing, &["--repair"]);
    assert_eq!((code, &r["repaired"]), (0, &0.into()), "{r:#}");

    // A mounted volume: a check may run (and says it may race); a repair is refused.
    {
        let _m = v.mount();
        let (code, out, err) = fsck_text(&v.backing, &[]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(err.contains("is mounted"), "{err}");
        let (code, r) = fsck_json(&v.backing, &[]);
        assert_eq!((code, &r["mounted"]), (0, &true.into()));
        let (code, out, err) = fsck_text(&v.backing, &["--repair"]);
        assert_eq!(code, 8, "{out}{err}");
        assert!(
            err.contains("is mounted: unmount it before `earfs fsck --repair`"),
            "{err}"
        );
        let (code, r) = fsck_json(&v.backing, &["--repair"]);
        assert_eq!(code, 8);
        assert_eq!(r["result"], "error");
    }

    // earfs.conf altered: a problem found (4), the files still checked without keys.
    let conf = v.b("earfs.conf");
    let orig = fs::read_to_string(&conf).unwrap();
    let id_line = orig
        .lines()
        .find(|l| l.starts_with("volume_id"))
        .unwrap()
        .to_string();
    let tampered = orig.replace(
        &id_line,
        "volume_id = \"00000000-0000-4000-8000-000000000000\"",
    );
    assert_ne!(tampered, orig);
    fs::write(&conf, &tampered).unwrap();
    let (code, r) = fsck_json(&v.backing, &[]);
    assert_eq!(code, 4, "{r:#}");
    assert_eq!(r["config"]["status"], "tampered");
    assert_eq!(r["headers_authenticated"], false);
    assert_eq!(r["counts"]["files"], 2);
    assert_eq!(r["problems_left"], 1);
    let (code, out, _) = fsck_text(&v.backing, &[]);
    assert_eq!(code, 4);
    assert!(out.contains("earfs.conf:   PROBLEM"), "{out}");
    fs::write(&conf, &orig).unwrap();
    assert_eq!(fsck_json(&v.backing, &[]).0, 0);

    // A key file given with --key-file that does not exist, then the volume's own key
    // file gone: operational errors (8), nothing checked.
    let (code, out, err) = fsck_text(
        &v.backing,
        &["--key-file", s(&v.dir.path().join("no-such-key"))],
    );
    assert_eq!(code, 8, "{out}{err}");
    assert!(err.contains("no-such-key"), "{err}");
    // A flag of another provider: a usage error, 8.
    let (code, _, err) = fsck_text(&v.backing, &["--profile", "p"]);
    assert_eq!(code, 8, "{err}");
    fs::rename(&v.key, v.dir.path().join("key.moved")).unwrap();
    let (code, r) = fsck_json(&v.backing, &[]);
    assert_eq!(code, 8, "{r:#}");
    assert_eq!(r["result"], "error");
    assert!(
        r["errors"][0].as_str().unwrap().contains(s(&v.key)),
        "{r:#}"
    );
    // The node's override finds it elsewhere.
    let moved = v.dir.path().join("key.moved");
    assert_eq!(fsck_json(&v.backing, &["--key-file", s(&moved)]).0, 0);
    // Not a volume: 8.
    let (code, _, err) = fsck_text(v.dir.path(), &[]);
    assert_eq!(code, 8, "{err}");
    assert!(err.contains("not an earfs volume"), "{err}");
}

/// Everything of the files of the mount of `v`, for comparing before and after.
fn read_all(v: &Vol, names: &[&str]) -> BTreeMap<String, Vec<u8>> {
    let _m = v.mount();
    names
        .iter()
        .map(|n| (n.to_string(), fs::read(v.m(n)).unwrap()))
        .collect()
}

#[test]
fn leftovers_are_reported_then_repaired_except_an_interrupted_decrypt() {
    let v = Vol::new(FileFormat::V2);
    let names = ["big", "other", "reserved", "small"];
    {
        let _m = v.mount();
        fs::write(v.m("big"), patterned(300_000, 5)).unwrap();
        fs::write(v.m("other"), patterned(50_000, 6)).unwrap();
        fs::write(v.m("reserved"), patterned(9_000, 7)).unwrap();
        fs::write(v.m("small"), b"17 bytes of data.").unwrap();
        fs::create_dir(v.m("sub")).unwrap();
    }
    let want = read_all(&v, &names);
    ok(run(&["rotate", s(&v.backing)]), "rotate");
    let big_meta = fs::metadata(v.b("big")).unwrap();
    plant_committed_rewrite(&v.backing, "big", 4096 + 3 * 4096 + 100);
    plant_uncommitted_rewrite(&v.backing, "other");
    let work = v.b(".earfs-work");
    fs::write(work.join("adopt-1.new"), b"half an adopted file").unwrap();
    fs::write(work.join("reencrypt-77.new"), b"half a reencrypted file").unwrap();
    // An offline reencrypt killed after a rename into `sub`, before it put the
    // directory's times back.
    let sub_times = ((1_500_000_000i64, 7i64), (1_500_000_001i64, 123_456_789i64));
    let dirs = serde_json::json!({ "sub": sub_times });
    fs::write(work.join("reencrypt-dirs.json"), dirs.to_string()).unwrap();
    let op = serde_json::json!({
        "op": "decrypt",
        "command": format!("earfs decrypt {} /restore/plain", v.backing.display()),
        "detail": {"dest": "/restore/plain", "tmp": "/restore/plain/.earfs-decrypt-tmp"},
        "started": 1_700_000_000u64,
    });
    fs::write(work.join("op-decrypt.json"), op.to_string()).unwrap();
    fs::write(work.join("notes.txt"), b"an operator's file").unwrap();
    fs::write(v.b(".earfs.conf.tmp"), b"format = 2\n").unwrap();
    plant_reservation(&v.backing, "reserved");
    let ino_big = big_meta.ino();
    let ino_other = fs::metadata(v.b("other")).unwrap().ino();

    // Read-only: reported, nothing changed.
    let before = all_backing_bytes(&v.backing);
    let (code, r) = fsck_json(&v.backing, &[]);
    assert_eq!(code, 4, "{r:#}");
    let kinds = leftover_kinds(&r);
    let want_kinds: Vec<(String, String)> = vec![
        ("config-tmp", ".earfs.conf.tmp".to_string()),
        ("interrupted-op", ".earfs-work/op-decrypt.json".into()),
        (
            "reencrypt-dir-times",
            ".earfs-work/reencrypt-dirs.json".into(),
        ),
        (
            "rewrite-committed",
            format!(".earfs-work/rewrite-{ino_big}.json"),
        ),
        (
            "rewrite-uncommitted",
            format!(".earfs-work/rewrite-{ino_other}.new"),
        ),
        ("temp-file", ".earfs-work/adopt-1.new".into()),
        ("temp-file", ".earfs-work/reencrypt-77.new".into()),
        ("unknown", ".earfs-work/notes.txt".into()),
    ]
    .into_iter()
    .map(|(k, p)| (k.to_string(), p))
    .collect();
    assert_eq!(kinds, want_kinds, "{r:#}");
    assert_eq!(r["problems_left"], 7, "{r:#}");
    // The half-copied file is not called damaged: it is being rewritten.
    assert_eq!(damaged_of(&r), BTreeMap::new(), "{r:#}");
    assert_eq!(r["counts"]["being_rewritten"], 1);
    let past = r["reserved_past_end"].as_array().unwrap();
    assert_eq!(past.len(), 1, "{r:#}");
    assert_eq!(past[0]["path"], "reserved");
    assert!(past[0]["bytes"].as_u64().unwrap() >= 1 << 20);
    assert_eq!(past[0]["freed"], false);
    assert_eq!(
        before,
        all_backing_bytes(&v.backing),
        "read-only fsck changed bytes"
    );
    let (code, out, _) = fsck_text(&v.backing, &[]);
    assert_eq!(code, 4);
    assert!(
        out.contains(&format!(
            "finish it with: earfs decrypt {} /restore/plain",
            v.backing.display()
        )),
        "{out}"
    );
    assert!(out.contains("/restore/plain/.earfs-decrypt-tmp"), "{out}");
    assert!(out.contains("--repair frees it"), "{out}");

    // --repair: all but the decrypt's record repaired: 1 | 4.
    let (code, r) = fsck_json(&v.backing, &["--repair"]);
    assert_eq!(code, 5, "{r:#}");
    assert_eq!(r["repaired"], 7, "{r:#}");
    assert_eq!(r["problems_left"], 1, "{r:#}");
    for l in r["leftovers"].as_array().unwrap() {
        let want_repair = match l["kind"].as_str().unwrap() {
            "rewrite-committed" | "reencrypt-dir-times" => Value::from("completed"),
            "interrupted-op" | "unknown" => Value::Null,
            _ => Value::from("removed"),
        };
        assert_eq!(l["repair"], want_repair, "{l:#}");
        assert_eq!(l["problem"], l["kind"] == "interrupted-op", "{l:#}");
    }
    assert_eq!(r["reserved_past_end"][0]["freed"], true, "{r:#}");
    let sub = fs::metadata(v.b("sub")).unwrap();
    assert_eq!(
        times(&sub).1,
        sub_times.1,
        "the directory's recorded mtime put back"
    );
    assert_eq!(r["counts"]["being_rewritten"], 0);
    assert_eq!(damaged_of(&r), BTreeMap::new());
    // The rewritten file took the current key version (2); the others kept 1.
    assert_eq!(counts(&r, "key_versions"), map(&[("1", 3), ("2", 1)]));
    let m = fs::metadata(v.b("big")).unwrap();
    assert_eq!(
        (m.ino(), times(&m).1),
        (ino_big, times(&big_meta).1),
        "inode and mtime kept"
    );

    // Again: only the decrypt's record is left (4), and the operator's file.
    let (code, r) = fsck_json(&v.backing, &["--repair"]);
    assert_eq!(code, 4, "{r:#}");
    assert_eq!(r["repaired"], 0);
    assert_eq!(
        leftover_kinds(&r),
        vec![
            (
                "interrupted-op".into(),
                ".earfs-work/op-decrypt.json".into()
            ),
            ("unknown".into(), ".earfs-work/notes.txt".into())
        ]
    );
    assert_eq!(r["counts"]["reserved_past_end"], 0);
    // The decrypt finished (its record removed): clean.
    fs::remove_file(work.join("op-decrypt.json")).unwrap();
    let (code, out, err) = fsck_text(&v.backing, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(fs::metadata(work.join("notes.txt")).is_ok());
    assert!(!v.b(".earfs.conf.tmp").exists());

    // Everything reads back as it was written, the half-copied file included.
    assert_eq!(read_all(&v, &names), want);
}

/// The starting state of the crash tests: the tree `src` copied into a new volume
/// (key version 1), rotated (key version 2), then leftovers planted: a committed
/// rewrite of a big file and of the sparse file (half copied), an uncommitted one,
/// temporary files, a stale `.earfs.conf.tmp`, and blocks reserved past the end of two
/// files.
fn crash_start(dir: TestDir, src: &Path) -> Vol {
    let v = Vol::in_dir(dir, FileFormat::V2);
    {
        let _m = v.mount();
        copy_contents(src, &v.mnt);
    }
    ok(run(&["rotate", s(&v.backing)]), "rotate");
    let sparse = "base/sparse".to_string();
    let mut files: Vec<(u64, String)> = manifest(src, &[])
        .iter()
        .filter(|(p, e)| {
            e.kind == "file" && e.links.is_empty() && e.size > 0 && **p != Path::new(&sparse)
        })
        .map(|(p, e)| (e.size, p.to_str().unwrap().to_string()))
        .collect();
    files.sort();
    let biggest = files.last().unwrap().1.clone();
    plant_committed_rewrite(&v.backing, &biggest, 4096 + 5 * 4096 + 7);
    plant_committed_rewrite(&v.backing, &sparse, 4096 + 100);
    let others: Vec<&String> = files
        .iter()
        .map(|(_, p)| p)
        .filter(|p| **p != biggest)
        .collect();
    plant_uncommitted_rewrite(&v.backing, others[0]);
    plant_reservation(&v.backing, others[1]);
    plant_reservation(&v.backing, others[2]);
    let work = v.b(".earfs-work");
    fs::write(work.join("adopt-1.new"), vec![1u8; 10_000]).unwrap();
    fs::write(work.join("reencrypt-5.new"), vec![2u8; 5_000]).unwrap();
    fs::write(v.b(".earfs.conf.tmp"), b"junk").unwrap();
    v
}

#[test]
fn repair_killed_at_20_points_then_run_again_finishes() {
    let d = TestDir::new("earfs-fsck-kill-");
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    make_tree(&src, 11, 40, 300_000);
    let want = manifest(&src, &[]);
    let case = |name: &str| crash_start(TestDir::new(name), &src);

    // A complete run, counted.
    let v = case("earfs-fsck-count-");
    // --json: the report is one write, so that the kill points fall in the repair.
    let args = ["fsck", "--repair", "--json", s(&v.backing)];
    let (out, mut calls) = syscall_counts(&args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Kill where the repair changes something (or reads what it copies), not in
    // the reads of every header.
    calls.remove("read");
    calls.remove("openat");
    drop(v);
    let points = kill_points(&calls, 20_240_611, 20);
    eprintln!("calls of a complete repair: {calls:?}\nkill points: {points:?}");
    let mut killed = 0;
    for (i, (syscall, k)) in points.iter().enumerate() {
        let v = case("earfs-fsck-case-");
        let args = ["fsck", "--repair", "--json", s(&v.backing)];
        let out = run_killed(&args, syscall, *k);
        if was_killed(&out) {
            killed += 1;
            // Whatever the kill left, no file is damaged.
            let (code, r) = fsck_json(&v.backing, &[]);
            assert!(code == 0 || code == 4, "point {i}: {r:#}");
            assert_eq!(damaged_of(&r), BTreeMap::new(), "point {i} ({syscall} {k})");
        }
        let (code, r) = fsck_json(&v.backing, &["--repair"]);
        assert!(code == 0 || code == 1, "point {i} ({syscall} {k}): {r:#}");
        let (code, r) = fsck_json(&v.backing, &[]);
        assert_eq!(code, 0, "point {i} ({syscall} {k}): {r:#}");
        assert_eq!(r["counts"]["reserved_past_end"], 0);
        let _m = v.mount();
        assert_same(
            &want,
            &manifest(&v.mnt, &[]),
            &format!("kill {i} at {syscall} #{k}"),
        );
    }
    assert!(killed >= 15, "only {killed} of 20 runs were killed");
}

#[test]
fn a_repair_that_runs_out_of_space_stops_cleanly_and_finishes_after() {
    let d = TestDir::new("earfs-fsck-enospc-");
    let fs_dir = d.path().join("fs");
    let tmpfs = Tmpfs::mount(&fs_dir, 16 << 20);
    let backing = fs_dir.join("backing");
    let key = d.path().join("key");
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    init_local_in(&key, &backing, FileFormat::V2);
    let data = patterned(2 << 20, 8);
    {
        let _m = mount_at(&backing, &mnt);
        fs::write(mnt.join("f"), &data).unwrap();
    }
    ok(run(&["rotate", s(&backing)]), "rotate");
    plant_committed_rewrite(&backing, "f", 4096 + 8192);
    // As if the copy had punched the rest of the file on its way: completing it must
    // allocate 1 MiB.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(backing.join("f"))
        .unwrap();
    rustix::fs::fallocate(
        &f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        4096 + (1 << 20),
        1 << 20,
    )
    .unwrap();
    drop(f);
    // Fill the filesystem.
    let filler = fs_dir.join("filler");
    {
        let f = File::create(&filler).unwrap();
        let chunk = vec![0x77u8; 64 << 10];
        let mut off = 0u64;
        while f.write_all_at(&chunk, off).is_ok() {
            off += chunk.len() as u64;
        }
        let mut small = vec![0x77u8; 4096];
        while f.write_all_at(&small, off).is_ok() {
            off += 4096;
        }
        small.clear();
    }
    // An operational error (8), and the rewrite still left (4).
    let (code, out, err) = fsck_text(&backing, &["--repair"]);
    assert_eq!(code, 8 | 4, "{out}{err}");
    assert!(out.contains("No space left on device"), "{out}");
    assert!(
        out.contains(".earfs-work: cannot finish the interrupted rewrites (of f)"),
        "{out}"
    );
    // Nothing lost: the rewrite is still recorded.
    let (code, r) = fsck_json(&backing, &[]);
    assert_eq!(code, 4, "{r:#}");
    assert_eq!(r["leftovers"][0]["kind"], "rewrite-committed", "{r:#}");
    tmpfs.resize(64 << 20);
    let (code, r) = fsck_json(&backing, &["--repair"]);
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["leftovers"][0]["repair"], "completed");
    let (code, _, err) = fsck_text(&backing, &[]);
    assert_eq!(code, 0, "{err}");
    let _m = mount_at(&backing, &mnt);
    assert_eq!(fs::read(mnt.join("f")).unwrap(), data);
}

#[test]
fn an_interrupted_check_says_so_and_a_second_run_finishes() {
    let v = Vol::new(FileFormat::V2);
    for d in 0..10 {
        let dir = v.b(&format!("d{d}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..100 {
            File::create(dir.join(format!("f{f}"))).unwrap();
        }
    }
    // SIGINT on the 300th file opened: the walk stops between files.
    let out = std::process::Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e"])
        .arg("inject=openat:signal=INT:when=300")
        .arg(earfs())
        .args(["fsck", "--json", s(&v.backing)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&r["result"], &r["exit_code"]),
        (&"interrupted".into(), &130.into())
    );
    let (code, r) = fsck_json(&v.backing, &[]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(
        (&r["counts"]["files"], &r["counts"]["empty"]),
        (&1000.into(), &1000.into())
    );
}
