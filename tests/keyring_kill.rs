//! Issue 9: every keyring command writes `earfs.conf` atomically, so a crash at any
//! point leaves the old keyring or the new one, whole. Each command is killed with
//! SIGKILL at each of its system calls (strace fault injection, no hooks in the
//! binary); see `tests/common/keyring_kill.rs`. Needs strace (scripts/deps.sh) and root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::cell::OnceCell;
use std::path::Path;

use common::keyring_kill::{KillCase, kill_at_every_step};
use earfs::content::FileFormat;
use earfs::kms::{LocalProvider, ProviderSpec, create_key_file};
use earfs::volume::{JoinSource, StoredKeyring, VolumeConfig};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `earfs ARGS`, which must succeed.
fn ok(args: &[&str]) {
    let out = common::run(args);
    assert!(
        out.status.success(),
        "earfs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything but the keyring (and the MAC) is unchanged.
fn same_but_keyring(a: &VolumeConfig, b: &VolumeConfig) -> bool {
    (&a.format, &a.volume_id, &a.cipher, a.sector_size, &a.kms)
        == (&b.format, &b.volume_id, &b.cipher, b.sector_size, &b.kms)
}

#[test]
fn rotate_killed_at_each_step_leaves_the_old_keyring_or_the_new_one() {
    // New: the same keyring id and keys, plus exactly one version after the highest,
    // which is current.
    let is_new = |before: &VolumeConfig, after: &VolumeConfig| {
        let (b, a) = (&before.keyring, &after.keyring);
        let next = b.keys.iter().map(|k| k.version).max().unwrap() + 1;
        same_but_keyring(before, after)
            && a.id == b.id
            && a.keys.len() == b.keys.len() + 1
            && a.keys[..b.keys.len()] == b.keys[..]
            && a.keys.last().unwrap().version == next
            && !b
                .keys
                .iter()
                .any(|k| k.wrapped == a.keys.last().unwrap().wrapped)
            && a.current == next
    };
    let r = kill_at_every_step(&KillCase {
        name: "rotate",
        format: FileFormat::V2,
        args: &["rotate", "{backing}"],
        prepare: &|_, _, _| {},
        is_new: &is_new,
        again_exit: 0,
    });
    assert!(r.kills > 7);
}

#[test]
fn upgrade_killed_at_each_step_leaves_format_1_or_format_2() {
    // New: format 2, everything else (the keyring above all) unchanged.
    let is_new = |before: &VolumeConfig, after: &VolumeConfig| {
        let mut same = after.clone();
        same.format = before.format;
        same.mac = before.mac.clone();
        before.format == 1 && after.format == 2 && same == *before
    };
    let r = kill_at_every_step(&KillCase {
        name: "upgrade",
        format: FileFormat::V1,
        args: &["upgrade", "{backing}"],
        prepare: &|_, _, _| {},
        is_new: &is_new,
        again_exit: 0,
    });
    assert!(r.kills > 7);
}

#[test]
fn rewrap_killed_at_each_step_leaves_the_old_wrapping_or_the_new_one() {
    // The new key, made once in `prepare` so that every run moves to the same key.
    let key2: OnceCell<std::path::PathBuf> = OnceCell::new();
    // New: the same keyring id, versions and current version, every key wrapped again
    // (no wrapped blob of before is left) under key2, which earfs.conf now records and
    // which unwraps it. From the new state a run again rewraps from key2 to key2: the
    // same check holds between the two.
    let is_new = |before: &VolumeConfig, after: &VolumeConfig| {
        let key2 = key2.get().unwrap();
        let (b, a) = (&before.keyring, &after.keyring);
        let versions = |r: &StoredKeyring| r.keys.iter().map(|k| k.version).collect::<Vec<_>>();
        let mut same = after.clone();
        same.kms = before.kms.clone();
        same.keyring = before.keyring.clone();
        same.mac = before.mac.clone();
        same == *before
            && after.kms
                == ProviderSpec::Local {
                    key_file: key2.clone(),
                }
            && a.id == b.id
            && a.current == b.current
            && versions(a) == versions(b)
            && a.keys
                .iter()
                .all(|k| !b.keys.iter().any(|o| o.wrapped == k.wrapped))
            && after
                .unlock(Path::new("."), &LocalProvider::open(key2).unwrap())
                .is_ok()
    };
    let r = kill_at_every_step(&KillCase {
        name: "rewrap",
        format: FileFormat::V2,
        args: &[
            "rewrap",
            "{backing}",
            "--kms",
            "local",
            "--key-file",
            "{dir}/key2",
        ],
        // Two versions, so that the rewrap wraps more than one key.
        prepare: &|dir, backing, _| {
            ok(&["rotate", s(backing)]);
            let k = dir.join("key2");
            create_key_file(&k).unwrap();
            key2.set(k).unwrap();
        },
        is_new: &is_new,
        again_exit: 0,
    });
    assert!(r.kills > 7);
}

#[test]
fn import_keyring_killed_at_each_step_leaves_the_old_keyring_or_the_imported_one() {
    // The export of another node of the cluster, which rotated since it joined.
    let ring: OnceCell<StoredKeyring> = OnceCell::new();
    // New: the export's keyring as it is (current 2), the volume (id, format, KMS key)
    // unchanged. A run again has nothing to do.
    let is_new = |before: &VolumeConfig, after: &VolumeConfig| {
        let mut same = after.clone();
        same.keyring = before.keyring.clone();
        same.mac = before.mac.clone();
        same == *before && after.keyring == *ring.get().unwrap() && after.keyring.current == 2
    };
    let r = kill_at_every_step(&KillCase {
        name: "import-keyring",
        format: FileFormat::V2,
        args: &["import-keyring", "{dir}/ring.toml", "{backing}"],
        prepare: &|dir, backing, _| {
            let node2 = dir.join("node2");
            let file = dir.join("ring.toml");
            ok(&["init", "--join", s(&backing.join("earfs.conf")), s(&node2)]);
            ok(&["rotate", s(&node2)]);
            ok(&["export-keyring", "-o", s(&file), s(&node2)]);
            let src = JoinSource::read(&file).unwrap();
            assert_eq!(src.keyring().current, 2);
            ring.set(src.keyring().clone()).unwrap();
        },
        is_new: &is_new,
        again_exit: 0,
    });
    assert!(r.kills > 7);
}

#[test]
fn retire_key_killed_at_each_step_leaves_the_old_keyring_or_the_new_one() {
    // New: version 1 gone, the other versions and the current one unchanged.
    let is_new = |before: &VolumeConfig, after: &VolumeConfig| {
        let (b, a) = (&before.keyring, &after.keyring);
        let rest: Vec<_> = b.keys.iter().filter(|k| k.version != 1).cloned().collect();
        b.keys.iter().any(|k| k.version == 1)
            && same_but_keyring(before, after)
            && a.id == b.id
            && a.current == b.current
            && a.keys == rest
    };
    let r = kill_at_every_step(&KillCase {
        name: "retire-key",
        format: FileFormat::V2,
        args: &["retire-key", "--version", "1", "{backing}"],
        // Make version 2 current, then write the file written before again as a new
        // file (under version 2), so that no file uses version 1 and the mount check
        // after each kill still has the file to read.
        prepare: &|dir, backing, _| {
            ok(&["rotate", s(backing)]);
            let mnt = dir.join("mnt");
            let _m = common::mount_at(backing, &mnt);
            let mut names = std::fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().path());
            let file = names.next().expect("the file written before");
            assert!(names.next().is_none());
            let rows = std::fs::read(&file).unwrap();
            std::fs::remove_file(&file).unwrap();
            std::fs::write(&file, &rows).unwrap();
        },
        is_new: &is_new,
        // Run again, version 1 is absent: refused as a usage error, nothing written.
        again_exit: 2,
    });
    assert!(r.kills > 7);
}
