//! Commands that change a volume's `earfs.conf`: `earfs upgrade` (write format 2),
//! `earfs rotate` (a new current data key version), `earfs rewrap` (the data keys
//! wrapped again, under the same key or another) and `earfs retire-key` (drop a
//! version no file uses). Each works on an unmounted volume
//! (it takes the volume's lock, unwraps the keys through the KMS, checks the MAC and
//! rewrites the config atomically) or on a mounted one, through its daemon's control
//! socket: the daemon does the same and switches at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::KmsArgs;
use super::kms::{node_flags, node_spec, open_validated, retry};
use crate::crypto::Keyring;
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

pub(super) fn canonical(backing: &Path) -> Result<PathBuf, Failure> {
    std::fs::canonicalize(backing)
        .map_err(|e| Failure::new(exit::NOT_A_VOLUME, format!("{}: {e}", backing.display())))
}

/// Where a change was made.
enum Done<T> {
    /// On the unmounted volume, under its lock.
    Here(T),
    /// By the daemon that serves the volume: its reply.
    Daemon(serde_json::Value),
}

/// Run `offline` on the unmounted volume under its lock (keys unwrapped through the
/// provider `open` gives, MAC checked), or send `request` to the daemon that holds it
/// and wait up to `timeout` for its reply.
fn change_with<T>(
    backing: &Path,
    request_line: &str,
    timeout: Duration,
    open: impl FnOnce(&VolumeConfig) -> Result<Box<dyn KeyProvider>, Failure>,
    offline: impl FnOnce(&mut VolumeConfig, &dyn KeyProvider, &mut Keyring) -> Result<T, VolumeError>,
) -> Result<Done<T>, Failure> {
    match daemon::try_lock_volume(backing)? {
        Some(_lock) => {
            daemon::protect_key_material();
            let mut cfg = VolumeConfig::load(backing)?;
            let provider = open(&cfg)?;
            let mut deks = cfg.unlock(backing, provider.as_ref())?;
            Ok(Done::Here(offline(&mut cfg, provider.as_ref(), &mut deks)?))
        }
        None => {
            let sock = daemon_of(backing)?;
            let what = request_line.split(' ').next().unwrap_or(request_line);
            let v = request(&sock, request_line, timeout).map_err(|e| {
                Failure::new(
                    exit::FAILURE,
                    format!(
                        "the daemon serving {} did not {what}: {e}",
                        backing.display()
                    ),
                )
            })?;
            Ok(Done::Daemon(v))
        }
    }
}

/// [`change_with`] with the volume's own provider, for a change from one version or
/// format number to another: returns (from, to) and how it went.
fn change(
    backing: &Path,
    deadline: u64,
    what: &str,
    offline: impl FnOnce(
        &mut VolumeConfig,
        &dyn KeyProvider,
        &mut Keyring,
    ) -> Result<(u32, u32), VolumeError>,
) -> Result<(u64, u64, &'static str), Failure> {
    let retry = retry(deadline)?;
    // The daemon unwraps the keys through the KMS: allow for its deadline.
    let timeout = retry.deadline + Duration::from_secs(10);
    let open = |cfg: &VolumeConfig| Ok(cfg.kms.open(retry)?);
    Ok(match change_with(backing, what, timeout, open, offline)? {
        Done::Here((from, to)) => (from.into(), to.into(), "not mounted: earfs.conf rewritten"),
        Done::Daemon(v) => {
            let n = |k: &str| v[k].as_u64().unwrap_or(0);
            (n("from"), n("to"), "through the running daemon")
        }
    })
}

/// `earfs rewrap BACKING [--kms … KEY]`: every data key wrapped again, under the
/// volume's own key (after a rotation in the KMS) or the key the flags name.
pub(super) fn rewrap(args: &KmsArgs, backing: &Path) -> Result<(), Failure> {
    let backing = canonical(backing)?;
    let cfg = VolumeConfig::load(&backing)?;
    let r = retry(args.kms_deadline)?;
    daemon::protect_key_material();
    // The new key goes through init's validation before anything changes.
    let (new_spec, new_provider) = match args.kms {
        Some(kms) => {
            let (spec, p) = open_validated(args, kms)?;
            (Some(spec), Some(p))
        }
        None => {
            let desc = node_spec(args, &cfg.kms)?.open(r)?.validate()?;
            println!("key: {}", desc.key);
            for d in &desc.details {
                println!("  {d}");
            }
            (None, None)
        }
    };
    let versions = cfg.keyring.keys.len();
    let request_line = match &new_spec {
        Some(spec) => format!(
            "rewrap {}",
            serde_json::to_string(spec).map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?
        ),
        None => "rewrap".to_string(),
    };
    // Two KMS calls per version (wrap, unwrap again), the unlock and the validation.
    let timeout = r.deadline * (2 * versions as u32 + 4) + Duration::from_secs(10);
    let from = cfg.kms.key_reference();
    let open_old = |cfg: &VolumeConfig| -> Result<Box<dyn KeyProvider>, Failure> {
        match &new_spec {
            // Per-node flags describe the new key; the old one is as recorded.
            Some(_) => Ok(cfg.kms.open(r)?),
            None => Ok(node_spec(args, &cfg.kms)?.open(r)?),
        }
    };
    let offline = |cfg: &mut VolumeConfig,
                   old: &dyn KeyProvider,
                   deks: &mut Keyring|
     -> Result<usize, VolumeError> {
        let to = new_spec.clone().unwrap_or_else(|| cfg.kms.clone());
        let new = new_provider.as_deref().unwrap_or(old);
        let mut done = 0;
        cfg.rewrap(&backing, deks, to, new, &mut |v| {
            done += 1;
            eprintln!("rewrapped key version {v} ({done} of {versions})");
        })
    };
    let flags = node_flags(args);
    if daemon::try_lock_volume(&backing)?.is_none() && new_spec.is_none() && !flags.is_empty() {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "the volume is mounted: its daemon rewraps with its own KMS settings; leave out {} (or unmount it)",
                flags.join(", ")
            ),
        ));
    }
    let (keys, to, how) = match change_with(&backing, &request_line, timeout, open_old, offline)? {
        Done::Here(n) => (
            n,
            VolumeConfig::load(&backing)?.kms.key_reference(),
            "not mounted: earfs.conf rewritten",
        ),
        Done::Daemon(v) => (
            v["keys"].as_u64().unwrap_or(0) as usize,
            v["to"].as_str().unwrap_or_default().to_string(),
            "through the running daemon, which uses the new wrapping at once",
        ),
    };
    println!(
        "volume {}: {keys} data key version(s) wrapped again under {to} (was {from}; {how})",
        cfg.volume_id
    );
    if to != from {
        println!(
            "this volume no longer needs {from}; other nodes of a cluster need the new keyring (`earfs export-keyring`, then `earfs import-keyring` on each) before it is disabled"
        );
    }
    Ok(())
}

/// The control socket of the daemon that serves `backing` (canonical path).
pub(super) fn daemon_of(backing: &Path) -> Result<PathBuf, Failure> {
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
        "{total} {} still {} key version {version} ({}); run `earfs reencrypt` (mounted or not), or remove them, first; `earfs keys` counts them",
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
