//! The Debian package (issue 11, item 9): `scripts/package.sh` builds it from the test
//! binary, lintian finds no error in it, `dpkg -i` installs it, the installed earfs,
//! unit, mount helper, man pages and completions work, and `dpkg --purge` leaves the
//! machine as it was. Needs root and a machine where earfs is not installed as a
//! package (CI's).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn sh(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/deps.sh installs it)"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn installed() -> bool {
    let out = sh("dpkg-query", &["-W", "-f=${Status}", "earfs"]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("installed")
}

/// What the package installs (and what must be gone after the purge).
const PATHS: &[&str] = &[
    "/usr/bin/earfs",
    "/usr/sbin/mount.fuse.earfs",
    "/lib/systemd/system/earfs@.service",
    "/etc/earfs",
    "/usr/share/man/man1/earfs.1.gz",
    "/usr/share/man/man1/earfs-mount.1.gz",
    "/usr/share/man/man8/mount.fuse.earfs.8.gz",
    "/usr/share/bash-completion/completions/earfs",
    "/usr/share/zsh/vendor-completions/_earfs",
    "/usr/share/fish/vendor_completions.d/earfs.fish",
    "/usr/share/doc/earfs",
];

/// Purges the package when dropped, so that a failing test leaves nothing installed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "earfs"]).output();
    }
}

#[test]
fn the_deb_builds_lints_installs_works_and_purges() {
    assert!(
        !installed(),
        "the earfs package is installed on this machine; this test installs and purges it: \
         remove it first (dpkg --purge earfs)"
    );
    for p in PATHS {
        assert!(
            std::fs::symlink_metadata(p).is_err(),
            "{p} exists before the install; the test would remove it"
        );
    }

    // Build.
    let out_dir = TestDir::new("earfs-deb-");
    let repo = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(Path::new(repo).join("scripts/package.sh"))
        .arg(out_dir.path())
        .env("EARFS_BIN", earfs())
        .output()
        .unwrap();
    assert!(out.status.success(), "package.sh: {}", text(&out));
    let deb = out_dir
        .path()
        .join(format!("earfs_{}_amd64.deb", env!("CARGO_PKG_VERSION")));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        deb.to_str().unwrap()
    );
    let d = deb.to_str().unwrap();

    // The control fields.
    let field = |f: &str| {
        let o = sh("dpkg-deb", &["-f", d, f]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    assert_eq!(field("Package"), "earfs");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(field("Architecture"), "amd64");
    let depends = field("Depends");
    assert!(
        depends.split(", ").any(|d| d == "fuse3") && depends.contains("libc6 (>="),
        "{depends}"
    );

    // Lintian: no error. Its warnings are printed for the record (the known one: the
    // 0700 mode of /etc/earfs, on purpose).
    let lint = sh("lintian", &["--pedantic", d]);
    let report = String::from_utf8_lossy(&lint.stdout).into_owned();
    println!("lintian:\n{report}");
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{report}");
    let unexpected: Vec<&str> = report
        .lines()
        .filter(|l| {
            l.starts_with("W:") && !l.contains("non-standard-dir-perm 0700 != 0755 [etc/earfs/]")
        })
        .collect();
    assert!(unexpected.is_empty(), "lintian warnings:\n{report}");

    // Install.
    let guard = Installed;
    let out = sh("dpkg", &["-i", d]);
    assert!(out.status.success(), "dpkg -i: {}", text(&out));
    assert!(installed());

    let out = sh("/usr/bin/earfs", &["--version"]);
    assert!(out.status.success(), "{}", text(&out));
    let version = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{version}");
    assert!(
        version.starts_with(&format!("earfs {}\nrevision:", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    for f in ["build date:", "AES kernels:", "fuser:"] {
        assert!(version.contains(f), "{version}");
    }

    // The mount helper is the binary.
    assert_eq!(
        std::fs::read_link("/usr/sbin/mount.fuse.earfs").unwrap(),
        Path::new("../bin/earfs")
    );
    assert_eq!(
        std::fs::canonicalize("/usr/sbin/mount.fuse.earfs").unwrap(),
        std::fs::canonicalize("/usr/bin/earfs").unwrap()
    );

    // /etc/earfs: root's only.
    let m = std::fs::metadata("/etc/earfs").unwrap();
    assert!(m.is_dir());
    assert_eq!(m.permissions().mode() & 0o7777, 0o700);
    assert_eq!((m.uid(), m.gid()), (0, 0));

    // The installed unit, found by name in systemd's unit path, verifies clean.
    let verify = || {
        Command::new("systemd-analyze")
            .args(["verify", "--man=no", "earfs@pkgtest.service"])
            .current_dir("/")
            .output()
            .expect("systemd-analyze (scripts/verify-units.sh installs it)")
    };
    let out = verify();
    let noise = |l: &&str| {
        !l.trim().is_empty()
            && !((l.starts_with("/lib/systemd/") || l.starts_with("/usr/lib/systemd/"))
                && !l.contains("earfs"))
    };
    let said: Vec<String> = text(&out)
        .lines()
        .filter(noise)
        .map(str::to_string)
        .collect();
    assert!(out.status.success() && said.is_empty(), "{said:?}");
    let unit = std::fs::read_to_string("/lib/systemd/system/earfs@.service").unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/earfs mount --foreground --config /etc/earfs/%i.toml"),
        "{unit}"
    );

    // man finds the pages; the completions are where the shells look.
    let out = sh("man", &["-w", "earfs-mount"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "/usr/share/man/man1/earfs-mount.1.gz",
        "{}",
        text(&out)
    );
    let out = sh("man", &["-w", "8", "mount.fuse.earfs"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = sh(
        "bash",
        &[
            "-c",
            "source /usr/share/bash-completion/completions/earfs && complete -p earfs",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        std::fs::metadata("/usr/share/doc/earfs/examples/earfs-example.toml").is_ok()
            && std::fs::metadata(
                "/usr/share/doc/earfs/examples/systemd/postgresql.service.d/earfs.conf"
            )
            .is_ok()
    );

    // Remove: nothing of it is left, and systemd no longer finds the unit.
    let out = sh("dpkg", &["--purge", "earfs"]);
    assert!(out.status.success(), "dpkg --purge: {}", text(&out));
    std::mem::forget(guard);
    assert!(!installed());
    for p in PATHS {
        assert!(
            std::fs::symlink_metadata(p).is_err(),
            "{p} left after the purge"
        );
    }
    let out = verify();
    assert!(
        !out.status.success(),
        "the unit is still found: {}",
        text(&out)
    );
}
