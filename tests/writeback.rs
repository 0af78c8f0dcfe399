//! Write errors under the FUSE writeback cache. The kernel writes dirty pages back
//! later, in WRITE requests no caller waits for; a backing write that fails there must
//! surface at `fsync` and at `close` with its errno (ENOSPC stays ENOSPC), once to every
//! open file description that was open when it happened (the kernel's errseq rule: and
//! to the next opener if nobody has seen it yet), and never twice to the same one.
//!
//! ENOSPC comes from a real full backing filesystem (a small tmpfs) under the `earfs`
//! binary. EIO comes from the backing call layer of a mount served by this process
//! (`earfs::fs::backing::fail_process_writes`): this kernel has neither device-mapper
//! (dm-error, dm-flakey) nor fault injection (`CONFIG_FAULT_INJECTION` is off), and a
//! loop device turns a full file under it into ENOSPC, not EIO.
//!
//! Each scenario runs in one Python process (so that descriptors live across steps)
//! and prints one line per step: `STEP ok` or `STEP ERRNO-NAME`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::tree::Tmpfs;
use common::*;
use earfs::content::{FileFormat, Keyring};
use earfs::crypto::Dek;
use earfs::fs::EarFs;
use earfs::fs::backing::fail_process_writes;
use earfs::fuse::{AdapterOptions, EarFuse, MountConfig};
use rustix::io::Errno;

/// Runs `open:NAME`, `write:NAME:MIB`, `fsync:NAME`, `close:NAME` and `sync` steps on
/// the file `argv[1]`; one line per step.
const STEPS: &str = r#"
import errno, os, sys
path, fds = sys.argv[1], {}
for step in sys.argv[2:]:
    op, *arg = step.split(":")
    try:
        if op == "open":
            fds[arg[0]] = os.open(path, os.O_RDWR)
        elif op == "write":
            block = bytes(range(256)) * 4096
            for _ in range(int(arg[1])):
                os.write(fds[arg[0]], block)
        elif op == "fsync":
            os.fsync(fds[arg[0]])
        elif op == "close":
            os.close(fds.pop(arg[0]))
        elif op == "sync":
            os.sync()
        else:
            raise SystemExit("unknown step " + step)
        print(step, "ok")
    except OSError as e:
        print(step, errno.errorcode[e.errno])
"#;

/// Run `steps` on `file`; returns the printed lines.
fn steps(file: &Path, steps: &[&str]) -> Vec<String> {
    let mut args = vec![file.to_str().unwrap()];
    args.extend_from_slice(steps);
    python(STEPS, &args).lines().map(str::to_string).collect()
}

/// The expected lines: `("fsync:a", "ENOSPC")` → `"fsync:a ENOSPC"`.
fn want(lines: &[(&str, &str)]) -> Vec<String> {
    lines.iter().map(|(s, r)| format!("{s} {r}")).collect()
}

// ---------------------------------------------------------------------------
// ENOSPC: the earfs binary on a backing tmpfs of 4 MiB, 8 MiB written.

/// A volume on a small tmpfs, mounted by the binary with the writeback cache.
struct Full {
    mnt: PathBuf,
    log: PathBuf,
    _m: MountGuard,
    _t: Tmpfs,
    _d: TestDir,
}

fn full_volume(name: &str) -> Full {
    let d = TestDir::new(&format!("earfs-wb-{name}-"));
    let t = Tmpfs::mount(&d.path().join("fs"), 4 << 20);
    let backing = d.path().join("fs/backing");
    let key = d.path().join("key");
    let mnt = d.path().join("mnt");
    let log = d.path().join("daemon.log");
    std::fs::create_dir(&mnt).unwrap();
    init_local(&key, &backing);
    let out = run(&[
        "mount",
        "--writeback-cache",
        "--log-file",
        log.to_str().unwrap(),
        backing.to_str().unwrap(),
        mnt.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = MountGuard(mnt.clone());
    std::fs::write(mnt.join("f"), b"start").unwrap();
    Full {
        mnt,
        log,
        _m: m,
        _t: t,
        _d: d,
    }
}

#[test]
fn enospc_at_fsync_reaches_each_open_descriptor_once() {
    let v = full_volume("fsync");
    let got = steps(
        &v.mnt.join("f"),
        &[
            "open:a",
            "open:b",
            "write:a:8",
            "fsync:a",
            "fsync:a",
            "open:c",
            "fsync:b",
            "fsync:b",
            "fsync:c",
            "close:a",
            "close:b",
            "close:c",
        ],
    );
    assert_eq!(
        got,
        want(&[
            ("open:a", "ok"),
            ("open:b", "ok"),
            ("write:a:8", "ok"),
            ("fsync:a", "ENOSPC"),
            ("fsync:a", "ok"),
            // Opened after the error was seen: not told.
            ("open:c", "ok"),
            ("fsync:b", "ENOSPC"),
            ("fsync:b", "ok"),
            ("fsync:c", "ok"),
            ("close:a", "ok"),
            ("close:b", "ok"),
            ("close:c", "ok"),
        ]),
        "daemon log:\n{}",
        std::fs::read_to_string(&v.log).unwrap_or_default()
    );
}

#[test]
fn enospc_at_close_reaches_each_open_descriptor_once() {
    let v = full_volume("close");
    let got = steps(
        &v.mnt.join("f"),
        &["open:a", "open:b", "write:b:8", "close:a", "close:b"],
    );
    assert_eq!(
        got,
        want(&[
            ("open:a", "ok"),
            ("open:b", "ok"),
            ("write:b:8", "ok"),
            ("close:a", "ENOSPC"),
            ("close:b", "ENOSPC"),
        ])
    );
}

#[test]
fn enospc_seen_at_fsync_is_not_repeated_at_close_and_still_reaches_the_others() {
    let v = full_volume("mixed");
    let got = steps(
        &v.mnt.join("f"),
        &[
            "open:a",
            "open:b",
            "write:a:8",
            "fsync:a",
            "close:a",
            "close:b",
        ],
    );
    assert_eq!(
        got,
        want(&[
            ("open:a", "ok"),
            ("open:b", "ok"),
            ("write:a:8", "ok"),
            ("fsync:a", "ENOSPC"),
            ("close:a", "ok"),
            ("close:b", "ENOSPC"),
        ])
    );
}

#[test]
fn enospc_nobody_has_seen_reaches_the_next_opener_and_is_never_lost() {
    let v = full_volume("unseen");
    // sync(2) writes the pages back (the error happens there) but reports nothing.
    let got = steps(
        &v.mnt.join("f"),
        &[
            "open:a",
            "write:a:8",
            "sync",
            "open:b",
            "fsync:b",
            "open:c",
            "fsync:c",
            "close:a",
            "close:b",
            "close:c",
        ],
    );
    assert_eq!(
        got,
        want(&[
            ("open:a", "ok"),
            ("write:a:8", "ok"),
            ("sync", "ok"),
            ("open:b", "ok"),
            // Nobody had seen it: the next opener does (as the kernel's errseq_sample).
            ("fsync:b", "ENOSPC"),
            ("open:c", "ok"),
            ("fsync:c", "ok"),
            ("close:a", "ENOSPC"),
            ("close:b", "ok"),
            ("close:c", "ok"),
        ])
    );
}

// ---------------------------------------------------------------------------
// EIO: a mount served by this process whose backing writes fail with EIO.

/// The process-wide write fault is shared: one in-process mount at a time.
static SERVED: Mutex<()> = Mutex::new(());

/// An earfs mount served by this process with the writeback cache; unmounted (and the
/// write fault cleared) when dropped, even if the test fails.
struct Served {
    unmount: Option<Box<dyn FnOnce() -> std::io::Result<()>>>,
    mnt: PathBuf,
}

fn serve(backing: &Path, mnt: &Path, dek: &Dek) -> Served {
    let ring = Keyring::new([(1, Dek::from_slice(dek.expose()).unwrap())], 1).unwrap();
    let fs = Arc::new(EarFs::new(backing, ring, FileFormat::V2).unwrap());
    let cfg = MountConfig {
        fsname: format!("earfs:{}", backing.display()),
        allow_other: true,
        threads: 2,
        options: Vec::new(),
    };
    let adapter = EarFuse::new(
        fs,
        AdapterOptions {
            writeback_cache: true,
        },
    );
    let session = earfs::fuse::mount(adapter, mnt, &cfg).unwrap();
    let bg = session.spawn().unwrap();
    std::fs::set_permissions(mnt, std::fs::Permissions::from_mode(0o755)).unwrap();
    Served {
        // Unmount first, so that the session thread sees the device close and the join
        // returns (a session earfs mounted itself has no fuser mount to drop).
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

impl Drop for Served {
    fn drop(&mut self) {
        fail_process_writes(None);
        if let Some(u) = self.unmount.take()
            && let Err(e) = u()
        {
            eprintln!("unmount {}: {e}; detaching", self.mnt.display());
            let _ = rustix::mount::unmount(&self.mnt, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// Serve a fresh volume holding `f` (64 KiB, synced), arm the EIO fault, run `s`, and
/// check after a remount that `f` still holds exactly what it held: nothing durable
/// changed on the error path.
fn with_eio(name: &str, s: &[&str]) -> Vec<String> {
    let _one = SERVED.lock().unwrap_or_else(|e| e.into_inner());
    let d = TestDir::new(&format!("earfs-wb-eio-{name}-"));
    let backing = d.path().join("backing");
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let dek = Dek::generate().unwrap();
    let before: Vec<u8> = (0..64 << 10).map(|i| (i * 7 % 251) as u8).collect();
    let got;
    {
        let m = serve(&backing, &mnt, &dek);
        let f = m.mnt.join("f");
        std::fs::write(&f, &before).unwrap();
        std::fs::File::open(&f).unwrap().sync_all().unwrap();
        fail_process_writes(Some(Errno::IO));
        got = steps(&f, s);
    }
    let m = serve(&backing, &mnt, &dek);
    assert_eq!(
        std::fs::read(m.mnt.join("f")).unwrap(),
        before,
        "the failed writes changed the file"
    );
    got
}

#[test]
fn eio_at_fsync_and_close_reaches_each_open_descriptor_once() {
    let got = with_eio(
        "fsync",
        &[
            "open:a",
            "open:b",
            "write:a:1",
            "fsync:a",
            "fsync:a",
            "close:a",
            "fsync:b",
            "close:b",
        ],
    );
    assert_eq!(
        got,
        want(&[
            ("open:a", "ok"),
            ("open:b", "ok"),
            ("write:a:1", "ok"),
            ("fsync:a", "EIO"),
            ("fsync:a", "ok"),
            ("close:a", "ok"),
            ("fsync:b", "EIO"),
            ("close:b", "ok"),
        ])
    );
}

#[test]
fn eio_at_close_reaches_each_open_descriptor_once() {
    let got = with_eio(
        "close",
        &["open:a", "open:b", "write:b:1", "close:b", "close:a"],
    );
    assert_eq!(
        got,
        want(&[
            ("open:a", "ok"),
            ("open:b", "ok"),
            ("write:b:1", "ok"),
            ("close:b", "EIO"),
            ("close:a", "EIO"),
        ])
    );
}

// ---------------------------------------------------------------------------
// The default.

/// `earfs status MNT`'s line about the writeback cache.
fn cache_line(v: &Volume) -> String {
    let out = run(&["status", v.mnt.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains("writeback cache"))
        .unwrap_or_else(|| panic!("no writeback cache line in: {text}"))
        .to_string()
}

#[test]
fn the_writeback_cache_is_on_by_default_and_each_way_to_turn_it_off_does() {
    let v = Volume::new();
    let conf = v.dir.path().join("off.toml");
    std::fs::write(&conf, "writeback_cache = false\n").unwrap();
    let conf = format!("--config={}", conf.display());
    let opt_conf = format!("config={}", v.dir.path().join("off.toml").display());
    for (args, on) in [
        (vec![], true),
        (vec!["--writeback-cache"], true),
        (vec!["--no-writeback-cache"], false),
        (vec!["-o", "no_writeback_cache"], false),
        (vec![conf.as_str()], false),
        // A flag wins over the config file, and over -o.
        (vec![conf.as_str(), "--writeback-cache"], true),
        (vec!["-o", "no_writeback_cache", "--writeback-cache"], true),
        (vec!["-o", &opt_conf], false),
        // Of the two flags, the last wins.
        (vec!["--no-writeback-cache", "--writeback-cache"], true),
        (vec!["--writeback-cache", "--no-writeback-cache"], false),
    ] {
        // Not Volume::mount: EARFS_TEST_MOUNT_ARGS must not change the default here.
        let mut argv = vec!["mount"];
        argv.extend_from_slice(&args);
        argv.extend([v.backing.to_str().unwrap(), v.mnt.to_str().unwrap()]);
        let out = run(&argv);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _m = MountGuard(v.mnt.clone());
        let line = cache_line(&v);
        let want = if on {
            "writeback cache on"
        } else {
            "writeback cache off"
        };
        assert!(line.contains(want), "{args:?}: {line}");
    }
}
