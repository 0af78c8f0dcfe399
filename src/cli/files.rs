//! `earfs upgrade BACKING`, and the file census that `info --files` and
//! `status --files` print.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::kms::retry;
use crate::content::FileFormat;
use crate::daemon::control::{request, request_status, sockets};
use crate::daemon::{self, Failure, exit};
use crate::fs::census::{Census, census};
use crate::volume::{NEW_VOLUME_FORMAT, VolumeConfig};

/// Make the volume in `backing` write the newest format: offline when no daemon holds
/// it, else through the daemon that does.
pub(super) fn upgrade(backing: &Path, deadline: u64) -> Result<(), Failure> {
    let retry = retry(deadline)?;
    let backing = std::fs::canonicalize(backing)
        .map_err(|e| Failure::new(exit::NOT_A_VOLUME, format!("{}: {e}", backing.display())))?;
    let cfg = VolumeConfig::load(&backing)?;
    let id = cfg.volume_id.clone();
    if cfg.format >= NEW_VOLUME_FORMAT {
        println!(
            "volume {} already writes format {}; nothing to do",
            cfg.volume_id, cfg.format
        );
        return Ok(());
    }
    let (from, to, how) = match daemon::try_lock_volume(&backing)? {
        Some(_lock) => {
            daemon::protect_key_material();
            let mut cfg = cfg;
            let provider = cfg.kms.open(retry)?;
            let deks = cfg.unlock(&backing, provider.as_ref())?;
            let from = cfg.format;
            cfg.upgrade(&backing, &deks, NEW_VOLUME_FORMAT)?;
            (
                from,
                cfg.format,
                "not mounted: earfs.conf rewritten".to_string(),
            )
        }
        None => {
            let sock = daemon_of(&backing)?;
            // The daemon unwraps the keys through the KMS: allow its deadline.
            let v = request(&sock, "upgrade", retry.deadline + Duration::from_secs(10)).map_err(
                |e| {
                    Failure::new(
                        exit::FAILURE,
                        format!(
                            "the daemon serving {} did not upgrade: {e}",
                            backing.display()
                        ),
                    )
                },
            )?;
            let n = |k: &str| v[k].as_u64().unwrap_or(0) as u32;
            (
                n("from"),
                n("format"),
                "through the running daemon".to_string(),
            )
        }
    };
    println!("volume {id} now writes format {to} (was {from}; {how})");
    println!(
        "files keep their format: a v1 file whose size is a multiple of 16 becomes v2 at its next write; other v1 files stay v1 until truncated to zero or replaced (see `earfs info --files {}`)",
        backing.display()
    );
    Ok(())
}

/// The control socket of the daemon that serves `backing` (canonical path).
fn daemon_of(backing: &Path) -> Result<std::path::PathBuf, Failure> {
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
            "volume {} is held by a process that does not answer on a control socket (run as root, or unmount it and run earfs upgrade again)",
            backing.display()
        ),
    ))
}

/// Count the files of `backing`, showing progress on a terminal.
pub(super) fn count_files(backing: &Path) -> Result<Census, Failure> {
    let tty = std::io::stderr().is_terminal();
    let c = census(backing, |c| {
        if tty {
            eprint!("\rcounting files in {}: {}", backing.display(), c.files);
        }
    });
    if tty {
        eprint!("\r\x1b[K");
    }
    c.map_err(|e| Failure::new(exit::FAILURE, format!("counting files: {e}")))
}

/// The census as JSON.
pub(super) fn census_json(c: &Census) -> Value {
    serde_json::to_value(c).unwrap_or_default()
}

/// Print the census for a person, indented by `pad`.
pub(super) fn print_census(c: &Census, pad: &str) {
    println!(
        "{pad}files:         {} in {} directories",
        c.files, c.directories
    );
    for f in FileFormat::ALL.iter().rev() {
        let n = c.of_format(*f);
        if *f == FileFormat::V1 && n > 0 {
            println!(
                "{pad}  format 1:    {n} (of which {} turn format 2 at their next write; the others stay format 1 until truncated to zero or replaced)",
                c.v1_convertible
            );
        } else {
            println!("{pad}  format {}:    {n}", f.number());
        }
    }
    for (v, n) in &c.key_versions {
        println!("{pad}  key version {v}: {n}");
    }
    if c.empty > 0 {
        println!("{pad}  empty:       {} (no header yet)", c.empty);
    }
    if c.no_header > 0 {
        println!(
            "{pad}  no header:   {} (the header never reached the disk: they read as zeros)",
            c.no_header
        );
    }
    if c.damaged > 0 {
        println!("{pad}  not earfs:   {}", c.damaged);
        for (p, why) in &c.damaged_files {
            println!("{pad}    {}: {why}", p.display());
        }
    }
}
