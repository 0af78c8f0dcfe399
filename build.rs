//! Build facts for `earfs --version` and the man pages: the git revision, the build
//! date and the fuser version.
//!
//! - `EARFS_GIT_REVISION`: `git rev-parse --short=12 HEAD`, else the `EARFS_GIT_REVISION` environment variable (a build from a
//!   tarball: set it to the revision the tarball was cut from), else `unknown`.
//! - `EARFS_BUILD_DATE`: `SOURCE_DATE_EPOCH` if set (reproducible builds), else now; as
//!   an RFC 3339 date (UTC).
//! - `EARFS_FUSER_VERSION`: the fuser package's version in Cargo.lock.
//! - `EARFS_RUSTC_VERSION`: `rustc --version` of the compiler building earfs.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-env-changed=EARFS_GIT_REVISION");

    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let rev = git_revision(&manifest)
        .or_else(|| {
            std::env::var("EARFS_GIT_REVISION")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=EARFS_GIT_REVISION={rev}");

    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => match s.trim().parse::<i64>() {
            Ok(n) => n,
            Err(_) => {
                println!("cargo:warning=SOURCE_DATE_EPOCH={s:?} is not a number of seconds");
                now()
            }
        },
        Err(_) => now(),
    };
    println!("cargo:rustc-env=EARFS_BUILD_DATE={}", date(epoch));

    let fuser = std::fs::read_to_string(manifest.join("Cargo.lock"))
        .ok()
        .and_then(|lock| locked_version(&lock, "fuser"))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=EARFS_FUSER_VERSION={fuser}");

    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let rustc_version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=EARFS_RUSTC_VERSION={rustc_version}");
}

/// The short revision of HEAD, or None outside a git work tree (a tarball) or without
/// git. Asks cargo to run this again when HEAD or the branch it names moves.
fn git_revision(dir: &Path) -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        Some(String::from_utf8(out.stdout).ok()?.trim().to_string())
    };
    // Only the work tree that holds this crate: not a parent directory's repository.
    let top = git(&["rev-parse", "--show-toplevel"])?;
    if std::fs::canonicalize(&top).ok()? != std::fs::canonicalize(dir).ok()? {
        return None;
    }
    let rev = git(&["rev-parse", "--short=12", "HEAD"])?;
    for what in ["HEAD", "packed-refs"] {
        if let Some(p) = git(&["rev-parse", "--git-path", what]) {
            println!("cargo:rerun-if-changed={}", dir.join(p).display());
        }
    }
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(p) = git(&["rev-parse", "--git-path", &r])
    {
        println!("cargo:rerun-if-changed={}", dir.join(p).display());
    }
    Some(rev)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DD` (UTC) of a Unix time (Howard Hinnant's civil-from-days).
fn date(epoch: i64) -> String {
    let z = epoch.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The version of package `name` in a Cargo.lock.
fn locked_version(lock: &str, name: &str) -> Option<String> {
    let want = format!("name = \"{name}\"");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == want {
            let v = lines.next()?.trim();
            return Some(
                v.strip_prefix("version = \"")?
                    .strip_suffix('"')?
                    .to_string(),
            );
        }
    }
    None
}
