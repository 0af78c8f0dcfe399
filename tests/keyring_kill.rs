//! Issue 9: every keyring command writes `earfs.conf` atomically, so a crash at any
//! point leaves the old keyring or the new one, whole. Each command is killed with
//! SIGKILL at each of its system calls (strace fault injection, no hooks in the
//! binary); see `tests/common/keyring_kill.rs`. Needs strace (scripts/deps.sh) and root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::keyring_kill::{KillCase, kill_at_every_step};
use earfs::content::FileFormat;
use earfs::volume::VolumeConfig;

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
