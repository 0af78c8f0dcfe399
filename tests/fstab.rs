//! fstab and mount(8): `mount -t fuse.earfs`, an fstab line mounted with `mount DIR`
//! and `mount -a` (both with `-T FILE`, a temp fstab), mount.fuse3's `earfs#SOURCE`,
//! the mount's type (`findmnt -t fuse.earfs`), and the unit systemd-fstab-generator
//! makes of the line, verified with `systemd-analyze verify`. Needs root (mount(8)
//! runs /sbin/mount.fuse.earfs, which these tests link to the built binary and remove).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

use common::{MountGuard, Volume, earfs, is_mounted};

const HELPER: &str = "/sbin/mount.fuse.earfs";

/// /sbin/mount.fuse.earfs -> the binary under test, while the guard lives (the tests
/// that use it run one at a time). Refuses to replace a helper someone else installed.
struct HelperLink {
    _lock: MutexGuard<'static, ()>,
}

static HELPER_LOCK: Mutex<()> = Mutex::new(());

impl HelperLink {
    fn install() -> HelperLink {
        let lock = HELPER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let ours = PathBuf::from(earfs());
        match std::fs::read_link(HELPER) {
            Ok(t) if t == ours => {}
            Ok(t) => panic!(
                "{HELPER} exists and points to {} (an installed earfs?); remove it to run these tests",
                t.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert!(
                    !Path::new(HELPER).exists(),
                    "{HELPER} exists and is not a link; remove it to run these tests"
                );
                std::os::unix::fs::symlink(&ours, HELPER).unwrap();
            }
            Err(e) => panic!("{HELPER}: {e}"),
        }
        HelperLink { _lock: lock }
    }
}

impl Drop for HelperLink {
    fn drop(&mut self) {
        if std::fs::read_link(HELPER).is_ok_and(|t| t == Path::new(earfs())) {
            let _ = std::fs::remove_file(HELPER);
        }
    }
}

fn cmd(prog: &str, args: &[&str]) -> Output {
    Command::new(prog).args(args).output().unwrap()
}

fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `findmnt -t fuse.earfs` for `mnt`: (source, fstype, options), or None.
fn findmnt_earfs(mnt: &Path) -> Option<(String, String, String)> {
    let o = cmd(
        "findmnt",
        &[
            "-n",
            "-t",
            "fuse.earfs",
            "-o",
            "SOURCE,FSTYPE,OPTIONS",
            "--mountpoint",
            s(mnt),
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    if !o.status.success() || out.is_empty() {
        return None;
    }
    let f: Vec<&str> = out.split_whitespace().collect();
    Some((f[0].into(), f[1].into(), f[2].into()))
}

/// A daemon config for the fstab line's config= option.
fn config_file(vol: &Volume) -> PathBuf {
    let p = vol.dir.path().join("pg.toml");
    std::fs::write(
        &p,
        "threads = 3\noptions = [\"noatime\", \"nofail\"]\nlog_level = \"info\"\n",
    )
    .unwrap();
    p
}

fn fstab_line(vol: &Volume, options: &str) -> String {
    format!(
        "# earfs, as the operator guide writes it\n{} {} fuse.earfs {options} 0 0\n",
        s(&vol.backing),
        s(&vol.mnt)
    )
}

fn status_threads(mnt: &Path) -> serde_json::Value {
    let out = ok(
        &Command::new(earfs())
            .args(["status", "--json", s(mnt)])
            .output()
            .unwrap(),
        "earfs status",
    );
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["threads"].clone()
}

#[test]
fn an_fstab_line_mounts_with_mount_dir_and_mount_a() {
    let _helper = HelperLink::install();
    let vol = Volume::new();
    let _guard = MountGuard(vol.mnt.clone());
    let cfg = config_file(&vol);
    let opts = format!(
        "allow_other,config={},nofail,_netdev,x-systemd.requires=network-online.target,x-systemd.mount-timeout=2min,comment=db",
        s(&cfg)
    );
    let auto = vol.dir.path().join("fstab");
    std::fs::write(&auto, fstab_line(&vol, &opts)).unwrap();
    let noauto = vol.dir.path().join("fstab.noauto");
    std::fs::write(&noauto, fstab_line(&vol, &format!("noauto,{opts}"))).unwrap();

    // `mount -a` skips a noauto line...
    ok(
        &cmd("mount", &["-a", "-T", s(&noauto)]),
        "mount -a (noauto)",
    );
    assert!(!is_mounted(&vol.mnt), "mount -a mounted a noauto line");
    // ...which `mount DIR` mounts; it returns once the mount serves.
    ok(&cmd("mount", &["-T", s(&noauto), s(&vol.mnt)]), "mount DIR");
    let (source, fstype, options) = findmnt_earfs(&vol.mnt).expect("findmnt -t fuse.earfs");
    assert_eq!(source, format!("earfs:{}", s(&vol.backing)));
    assert_eq!(fstype, "fuse.earfs");
    let options: Vec<&str> = options.split(',').collect();
    for o in [
        "allow_other",
        "noatime",
        "nosuid",
        "nodev",
        "default_permissions",
    ] {
        assert!(options.contains(&o), "{o} missing from {options:?}");
    }
    assert_eq!(status_threads(&vol.mnt), 3, "threads from config=");
    std::fs::write(
        vol.mnt.join("pg_control"),
        b"written through an fstab mount",
    )
    .unwrap();
    // The mount is earfs's: `earfs umount` knows it; the data is encrypted.
    ok(&cmd(earfs(), &["umount", s(&vol.mnt)]), "earfs umount");
    assert!(!is_mounted(&vol.mnt));
    let raw = std::fs::read(vol.backing.join("pg_control")).unwrap();
    assert!(
        !common::contains(&raw, b"written through"),
        "plaintext in the backing file"
    );

    // `mount -a -T FILE` mounts the line, and umount(8) unmounts it.
    ok(&cmd("mount", &["-a", "-T", s(&auto)]), "mount -a");
    let (_, fstype, _) = findmnt_earfs(&vol.mnt).expect("findmnt -t fuse.earfs after mount -a");
    assert_eq!(fstype, "fuse.earfs");
    assert_eq!(
        std::fs::read(vol.mnt.join("pg_control")).unwrap(),
        b"written through an fstab mount"
    );
    // Mounted already: mount -a leaves it alone and succeeds.
    ok(&cmd("mount", &["-a", "-T", s(&auto)]), "mount -a again");
    ok(&cmd("umount", &[s(&vol.mnt)]), "umount");
    assert!(common::wait_until(10, || !is_mounted(&vol.mnt)));
    // The daemon exits after the kernel lets the mount go: give it time to.
    assert!(
        common::wait_until(10, || earfs::daemon::try_lock_volume(&vol.backing)
            .unwrap()
            .is_some()),
        "the daemon still holds the volume 10 s after umount"
    );
}

#[test]
fn mount_t_fuse_earfs_takes_fuse_and_earfs_options_and_refuses_unknown_ones() {
    let _helper = HelperLink::install();
    let vol = Volume::new();
    let _guard = MountGuard(vol.mnt.clone());
    let (b, m) = (s(&vol.backing), s(&vol.mnt));

    // A typo is refused by name before anything is mounted, with mount(8)'s code 1.
    let o = cmd("mount", &["-t", "fuse.earfs", b, m, "-o", "noatime,nofial"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unknown mount option \"nofial\""), "{err}");
    assert!(!is_mounted(&vol.mnt));
    // A bad value too.
    let o = cmd("mount", &["-t", "fuse.earfs", b, m, "-o", "threads=many"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("threads=many"));
    // A mount failure (here: no volume) is mount(8)'s 32.
    let empty = vol.dir.path().join("not-a-volume");
    std::fs::create_dir(&empty).unwrap();
    let o = cmd("mount", &["-t", "fuse.earfs", s(&empty), m]);
    assert_eq!(o.status.code(), Some(32), "{o:?}");
    // mount -f checks and mounts nothing.
    ok(
        &cmd("mount", &["-f", "-t", "fuse.earfs", b, m, "-o", "ro"]),
        "mount -f",
    );
    assert!(!is_mounted(&vol.mnt));

    std::fs::set_permissions(vol.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    ok(
        &cmd(
            "mount",
            &[
                "-t",
                "fuse.earfs",
                b,
                m,
                "-o",
                "allow_other,default_permissions,ro,noexec,threads=2,writeback_cache,nofail,_netdev,defaults,x-systemd.automount",
            ],
        ),
        "mount -t fuse.earfs",
    );
    let (_, fstype, options) = findmnt_earfs(&vol.mnt).expect("findmnt -t fuse.earfs");
    assert_eq!(fstype, "fuse.earfs");
    let options: Vec<&str> = options.split(',').collect();
    for o in ["ro", "noexec", "allow_other"] {
        assert!(options.contains(&o), "{o} missing from {options:?}");
    }
    for o in ["nofail", "_netdev", "defaults"] {
        assert!(
            !options.iter().any(|x| x.contains(o)),
            "{o} reached the kernel: {options:?}"
        );
    }
    assert_eq!(status_threads(&vol.mnt), 2);
    // ro reached the kernel; allow_other lets another user in (fuser's own check too).
    assert!(
        std::fs::write(vol.mnt.join("x"), b"x").is_err(),
        "ro mount took a write"
    );
    let other = common::as_nobody(&format!("ls -a {m}"));
    assert!(
        other.status.success(),
        "nobody: {}",
        String::from_utf8_lossy(&other.stderr)
    );
    ok(&cmd(earfs(), &["umount", m]), "earfs umount");
}

#[test]
fn mount_fuse3_runs_earfs_as_its_helper() {
    let vol = Volume::new();
    let _guard = MountGuard(vol.mnt.clone());
    // mount.fuse3 'earfs#SOURCE' runs `earfs SOURCE DIR -o OPTS` from PATH.
    let bin = vol.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(earfs(), bin.join("earfs")).unwrap();
    let path = format!("{}:{}", s(&bin), std::env::var("PATH").unwrap_or_default());
    let o = Command::new("mount.fuse3")
        .args([
            &format!("earfs#{}", s(&vol.backing)),
            s(&vol.mnt),
            "-o",
            "allow_other,nofail,_netdev,threads=2",
        ])
        .env("PATH", &path)
        .output()
        .unwrap();
    ok(&o, "mount.fuse3");
    let (source, fstype, _) = findmnt_earfs(&vol.mnt).expect("findmnt -t fuse.earfs");
    assert_eq!(fstype, "fuse.earfs");
    assert_eq!(source, format!("earfs:{}", s(&vol.backing)));
    std::fs::write(vol.mnt.join("f"), b"via mount.fuse3").unwrap();
    assert_eq!(
        std::fs::read(vol.mnt.join("f")).unwrap(),
        b"via mount.fuse3"
    );
    ok(&cmd("umount", &[s(&vol.mnt)]), "umount");
    // A typo through mount.fuse3 is refused too.
    let o = Command::new("mount.fuse3")
        .args([
            &format!("earfs#{}", s(&vol.backing)),
            s(&vol.mnt),
            "-o",
            "nofial",
        ])
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nofial"));
    assert!(!is_mounted(&vol.mnt));
}

/// systemd-fstab-generator turns the line into a .mount unit that systemd-analyze
/// verify accepts (scripts/verify-units.sh's noise rule: lines about system units in
/// /lib, /usr/lib or /etc/systemd are not ours).
#[test]
fn the_generators_unit_of_the_line_verifies() {
    let dir = common::TestDir::new("earfs-fstab-gen-");
    let out = dir.path().join("units");
    std::fs::create_dir(&out).unwrap();
    let fstab = dir.path().join("fstab");
    std::fs::write(
        &fstab,
        "/data/enc /var/lib/postgresql fuse.earfs allow_other,config=/etc/earfs/pg.toml,nofail,_netdev,x-systemd.requires=network-online.target,x-systemd.after=network-online.target,x-systemd.mount-timeout=2min 0 0\n",
    )
    .unwrap();
    let generator = "/usr/lib/systemd/system-generators/systemd-fstab-generator";
    let o = Command::new(generator)
        .args([s(&out), s(&out), s(&out)])
        .env("SYSTEMD_FSTAB", &fstab)
        .env("SYSTEMD_PROC_CMDLINE", "")
        .output()
        .unwrap();
    ok(&o, "systemd-fstab-generator");
    let unit = out.join("var-lib-postgresql.mount");
    let text = std::fs::read_to_string(&unit).unwrap();
    for want in [
        "What=/data/enc",
        "Where=/var/lib/postgresql",
        "Type=fuse.earfs",
        "Requires=network-online.target",
        "TimeoutSec=2min",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    // _netdev: a remote filesystem, pulled in by remote-fs.target; nofail: wanted, not
    // required.
    assert!(
        out.join("remote-fs.target.wants/var-lib-postgresql.mount")
            .exists(),
        "not wanted by remote-fs.target"
    );
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "var-lib-postgresql.mount"])
        .current_dir(&out)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let noise = |l: &str| {
        l.starts_with("/lib/systemd/")
            || l.starts_with("/usr/lib/systemd/")
            || l.starts_with("/etc/systemd/")
    };
    let bad: Vec<&str> = all
        .lines()
        .filter(|l| !l.trim().is_empty() && !noise(l))
        .collect();
    assert!(
        o.status.success() && bad.is_empty(),
        "systemd-analyze verify: {}\n{}",
        o.status,
        bad.join("\n")
    );
}
