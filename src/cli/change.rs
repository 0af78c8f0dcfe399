//! Commands that change a volume's `earfs.conf`: `earfs upgrade` (write format 2),
//! `earfs rotate` (a new current data key version) and `earfs retire-key` (drop a
//! version no file uses). Each works on an unmounted volume
//! (it takes the volume's lock, unwraps the keys through the KMS, checks the MAC and
//! rewrites the config atomically) or on a mounted one, through its daemon's control
//! socket: the daemon does the same and switches at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::kms::retry;
use crate::crypto::Dek;
use crate::daemon::control::{request, request_reply, request_status, sockets};
use crate::daemon::{self, Failure, exit};
use crate::kms::KeyProvider;
use crate::volume::{NEW_VOLUME_FORMAT, VolumeConfig, VolumeError};

/// `earfs upgrade BACKING`.
pub(super) fn upgrade(backing: &Path, deadline: u64) -> Result<(), Failure> {
    let backing = canonical(backing)?;
    let cfg = VolumeConfig::load(&backing)?;
    if cfg.format >= NEW_VOLUME_FORMAT {
        println!(
            "volume {} already writes format {}; nothing to do",
            cfg.volume_id, cfg.format
        );
        return Ok(());
    }
    let (from, to, how) = change(&backing, deadline, "upgrade", |cfg, _, deks| {
        let from = cfg.format;
        cfg.upgrade(&backing, deks, NEW_VOLUME_FORMAT)?;
        Ok((from, cfg.format))
    })?;
    println!(
        "volume {} now writes format {to} (was {from}; {how})",
        cfg.volume_id
    );
    println!(
        "files keep their format: a v1 file whose size is a multiple of 16 becomes v2 before a write leaves it unaligned; other v1 files stay v1 until truncated to zero or replaced (see `earfs info --files {}`)",
        backing.display()
    );
    Ok(())
}

/// `earfs rotate BACKING`.
pub(super) fn rotate(backing: &Path, deadline: u64) -> Result<(), Failure> {
    let backing = canonical(backing)?;
    let cfg = VolumeConfig::load(&backing)?;
    let (from, to, how) = change(&backing, deadline, "rotate", |cfg, provider, deks| {
        let from = cfg.keyring.current;
        let to = cfg.rotate(&backing, provider, deks)?;
        Ok((from, to))
    })?;
    println!(
        "volume {}: data key version {to} is current (was {from}; {how}); files written under older versions keep them and keep reading",
        cfg.volume_id
    );
    Ok(())
}

fn canonical(backing: &Path) -> Result<PathBuf, Failure> {
    std::fs::canonicalize(backing)
        .map_err(|e| Failure::new(exit::NOT_A_VOLUME, format!("{}: {e}", backing.display())))
}

/// Run `offline` on the unmounted volume under its lock (keys unwrapped, MAC checked),
/// or send `request` to the daemon that holds it. Returns (from, to) and how it went.
fn change(
    backing: &Path,
    deadline: u64,
    what: &str,
    offline: impl FnOnce(
        &mut VolumeConfig,
        &dyn KeyProvider,
        &mut Vec<(u32, Dek)>,
    ) -> Result<(u32, u32), VolumeError>,
) -> Result<(u64, u64, &'static str), Failure> {
    let retry = retry(deadline)?;
    match daemon::try_lock_volume(backing)? {
        Some(_lock) => {
            daemon::protect_key_material();
            let mut cfg = VolumeConfig::load(backing)?;
            let provider = cfg.kms.open(retry)?;
            let mut deks = cfg.unlock(backing, provider.as_ref())?;
            let (from, to) = offline(&mut cfg, provider.as_ref(), &mut deks)?;
            Ok((from.into(), to.into(), "not mounted: earfs.conf rewritten"))
        }
        None => {
            let sock = daemon_of(backing)?;
            // The daemon unwraps the keys through the KMS: allow for its deadline.
            let v =
                request(&sock, what, retry.deadline + Duration::from_secs(10)).map_err(|e| {
                    Failure::new(
                        exit::FAILURE,
                        format!(
                            "the daemon serving {} did not {what}: {e}",
                            backing.display()
                        ),
                    )
                })?;
            let n = |k: &str| v[k].as_u64().unwrap_or(0);
            Ok((n("from"), n("to"), "through the running daemon"))
        }
    }
}

/// The control socket of the daemon that serves `backing` (canonical path).
fn daemon_of(backing: &Path) -> Result<PathBuf, Failure> {
    let socks = sockets().map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?;
    for s in socks {
        if let Ok(v) = request_status(&s)
            && v["backing"].as_str() == backing.to_str()
        {
            return Ok(s);
        }
    }
    Err(Failure::new(
        exit::VOLUME_IN_USE,
        format!(
            "volume {} is held by a process that does not answer on a control socket (run as root, or unmount it and run the command again)",
            backing.display()
        ),
    ))
}

/// How often `retire-key` counts again when files were renamed in the mount meanwhile.
const RETIRE_ATTEMPTS: u32 = 3;

/// The refusal of `retire-key` while `in_dir` files of the backing directory and
/// `unlinked` files open and unlinked in the running daemon use `version`.
fn still_used(version: u32, in_dir: u64, unlinked: u64, unreadable: u64) -> Failure {
    let total = in_dir + unlinked;
    let unknown = format!(
        "{unreadable} files open in the running daemon have a header that cannot be read (see its log), so whether they use key version {version} is unknown"
    );
    if total == 0 {
        return Failure::new(
            exit::KEY_IN_USE,
            format!("{unknown}; close them, or remove them, first"),
        );
    }
    let mut parts = vec![format!("{in_dir} in the backing directory")];
    if unlinked > 0 {
        parts.push(format!(
            "{unlinked} open and unlinked in the running daemon"
        ));
    }
    let mut msg = format!(
        "{total} {} still {} key version {version} ({}); re-encrypt or remove them first (rewrite a file under the current key: copy it, or truncate it to zero and write it again; `earfs keys` counts them)",
        if total == 1 { "file" } else { "files" },
        if total == 1 { "uses" } else { "use" },
        parts.join(", ")
    );
    if unreadable > 0 {
        msg = format!("{msg}; besides, {unknown}");
    }
    Failure::new(exit::KEY_IN_USE, msg)
}

/// `earfs retire-key BACKING --version N`: drop data key version N from the keyring
/// once no file uses it. Counts the backing directory's files by their headers; on a
/// mounted volume the daemon adds the files it holds open (those unlinked while open
/// have no name left to count) and checks again under its lock before it switches.
pub(super) fn retire_key(backing: &Path, version: u32, deadline: u64) -> Result<(), Failure> {
    let backing = canonical(backing)?;
    let cfg = VolumeConfig::load(&backing)?;
    // The current version and an absent one are refused before anything is counted.
    cfg.check_retirable(&backing, version)?;
    let in_dir = |c: &crate::fs::census::Census| {
        c.key_versions
            .get(&version.to_string())
            .copied()
            .unwrap_or(0)
    };
    let retry = retry(deadline)?;
    let how = match daemon::try_lock_volume(&backing)? {
        Some(_lock) => {
            // Not mounted, and nobody can mount it while we hold the lock: the census
            // is the whole truth (bar copies restored from outside, see docs/kms.md).
            let c = super::files::count_files(&backing)?;
            if in_dir(&c) > 0 {
                return Err(still_used(version, in_dir(&c), 0, 0));
            }
            daemon::protect_key_material();
            let mut cfg = VolumeConfig::load(&backing)?;
            let provider = cfg.kms.open(retry)?;
            let mut deks = cfg.unlock(&backing, provider.as_ref())?;
            cfg.retire(&backing, &mut deks, version)?;
            "not mounted: earfs.conf rewritten"
        }
        None => {
            let sock = daemon_of(&backing)?;
            let failed = |e: String| {
                Failure::new(
                    exit::FAILURE,
                    format!(
                        "the daemon serving {} did not retire key version {version}: {e}",
                        backing.display()
                    ),
                )
            };
            let mut attempt = 0;
            loop {
                attempt += 1;
                // The daemon's open files first, with its count of renames: if a rename
                // happens while we count, the daemon refuses and we count again.
                let open = request(&sock, "open-files", Duration::from_secs(10))
                    .map_err(|e| failed(e.to_string()))?;
                let open: crate::fs::OpenKeyUse =
                    serde_json::from_value(open).map_err(|e| failed(e.to_string()))?;
                let c = super::files::count_files(&backing)?;
                let (_, unlinked) = open.of(version);
                if in_dir(&c) + unlinked + open.unreadable > 0 {
                    return Err(still_used(version, in_dir(&c), unlinked, open.unreadable));
                }
                let v = request_reply(
                    &sock,
                    &format!("retire {version} {}", open.moves),
                    retry.deadline + Duration::from_secs(10),
                )
                .map_err(|e| failed(e.to_string()))?;
                let Some(e) = v.get("error").and_then(|e| e.as_str()) else {
                    break;
                };
                if let Some(u) = v.get("in_use") {
                    let n = |k: &str| u[k].as_u64().unwrap_or(0);
                    // Open files with a name were in the census too: count them once.
                    return Err(still_used(
                        version,
                        in_dir(&c).max(n("named")),
                        n("unlinked"),
                        n("unreadable"),
                    ));
                }
                if v.get("moved").is_some() && attempt < RETIRE_ATTEMPTS {
                    continue;
                }
                return Err(failed(e.to_string()));
            }
            "through the running daemon"
        }
    };
    println!(
        "volume {}: key version {version} retired ({how}); no file used it. Other nodes of a cluster keep it until they import the new keyring (`earfs export-keyring`)",
        cfg.volume_id
    );
    Ok(())
}
