//! Commands that change a volume's `earfs.conf`: `earfs upgrade` (write format 2) and
//! `earfs rotate` (a new current data key version). Each works on an unmounted volume
//! (it takes the volume's lock, unwraps the keys through the KMS, checks the MAC and
//! rewrites the config atomically) or on a mounted one, through its daemon's control
//! socket: the daemon does the same and switches at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::kms::retry;
use crate::crypto::Dek;
use crate::daemon::control::{request, request_status, sockets};
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
