//! The daemon's descriptor limit at scale: every inode the kernel holds is an O_PATH
//! descriptor of the daemon. It raises its soft RLIMIT_NOFILE to the hard limit at
//! start; at the hard limit, new inodes fail with ENFILE (a warning in the log, once a
//! minute at most, and the errno counter), the control socket keeps answering, and
//! lookups succeed again once the kernel forgets inodes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::*;

/// `earfs mount` of `vol` started under `prlimit --nofile=SOFT:HARD` (the daemon
/// inherits the limits); unmounted when the returned guard drops.
fn mount_limited(vol: &Volume, soft: u64, hard: u64) -> Mount<'_> {
    let nofile = format!("--nofile={soft}:{hard}");
    vol.mount_via(&["prlimit", &nofile, "--"], &[])
}

fn status(mnt: &Path) -> serde_json::Value {
    let out = run(&["status", "--json", mnt.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The soft and hard `Max open files` of process `pid`.
fn nofile(pid: u64) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].parse().unwrap(), f[4].parse().unwrap())
}

fn open_fds(pid: u64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn the_daemon_raises_its_soft_descriptor_limit_to_the_hard_limit_and_holds_more_inodes_than_the_soft_one()
 {
    let vol = Volume::new();
    let m = mount_limited(&vol, 256, 4096);
    let pid = status(&vol.mnt)["pid"].as_u64().unwrap();
    assert_eq!(nofile(pid), (4096, 4096));
    // 1000 files, created then looked up again (the kernel keeps every inode it has
    // seen; each is a descriptor of the daemon): four times the soft limit it started with.
    std::fs::create_dir(m.path("d")).unwrap();
    for i in 0..1000 {
        std::fs::write(m.path(&format!("d/f{i}")), b"").unwrap();
    }
    for i in 0..1000 {
        let md = std::fs::symlink_metadata(m.path(&format!("d/f{i}")))
            .unwrap_or_else(|e| panic!("stat d/f{i}: {e}\nlog: {}", vol.log_text()));
        assert!(md.is_file());
    }
    let fds = open_fds(pid);
    assert!(fds > 1000, "the daemon holds {fds} descriptors");
    assert!(!vol.log_text().contains("out of file descriptors"));
}

#[test]
fn at_the_hard_limit_new_inodes_fail_with_enfile_warned_once_and_lookups_recover_when_the_kernel_forgets()
 {
    let vol = Volume::new();
    {
        let m = vol.mount(&[]);
        std::fs::create_dir(m.path("d")).unwrap();
        for i in 0..600 {
            std::fs::write(m.path(&format!("d/f{i}")), b"x").unwrap();
        }
    }
    let m = mount_limited(&vol, 300, 300);
    let pid = status(&vol.mnt)["pid"].as_u64().unwrap();
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for i in 0..600 {
        let p = m.path(&format!("d/f{i}"));
        match std::fs::symlink_metadata(&p) {
            Ok(_) => ok.push(p),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENFILE), "stat d/f{i}: {e}");
                failed.push(p);
            }
        }
    }
    // The descriptors left over from the inodes (a sixteenth, at least 32) stay free.
    assert!(
        (200..=300 - 32).contains(&ok.len()),
        "{} stats succeeded",
        ok.len()
    );
    assert!(open_fds(pid) < 300);
    // A create fails too, and leaves no file behind.
    let e = std::fs::write(m.path("d/new"), b"y").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENFILE), "create: {e}");
    assert!(!m.backing("d/new").exists());
    // The control socket still answers, and counts the errors by errno.
    let st = status(&vol.mnt);
    let enfile = st["errors_by_errno"]["ENFILE"].as_u64().unwrap_or(0);
    assert!(enfile >= failed.len() as u64, "{st}");
    // A file the kernel already knows still opens and reads.
    assert_eq!(std::fs::read(&ok[0]).unwrap(), b"x");
    // One warning for all those failures, naming the limit and how to raise it.
    let log = vol.log_text();
    assert_eq!(log.matches("out of file descriptors").count(), 1, "{log}");
    assert!(
        log.contains("RLIMIT_NOFILE 300 (hard 300)") && log.contains("LimitNOFILE="),
        "{log}"
    );

    // Removing files makes the kernel forget their inodes: new lookups succeed again.
    for p in &ok[..100] {
        std::fs::remove_file(p).unwrap();
    }
    for p in &failed[..50] {
        assert!(
            wait_until(10, || std::fs::symlink_metadata(p).is_ok()),
            "{} still fails",
            p.display()
        );
    }
    drop(m);
}
