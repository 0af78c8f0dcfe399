//! The file census that `info --files`, `status --files` and `keys` print.

use std::io::IsTerminal;
use std::path::Path;

use serde_json::Value;

use crate::content::FileFormat;
use crate::daemon::{Failure, exit};
use crate::fs::census::{Census, census};
use crate::volume::VolumeConfig;

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
                "{pad}  format 1:    {n} (of which {} turn format 2 before a write leaves them unaligned; the others stay format 1 until truncated to zero or replaced)",
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

/// `earfs keys BACKING`: the key versions, which is current, the CMK that wraps them,
/// and how many files use each (from the headers; no key needed).
pub(super) fn keys(backing: &Path, json: bool) -> Result<(), Failure> {
    let cfg = VolumeConfig::load(backing)?;
    let c = count_files(backing)?;
    let files = |v: u32| c.key_versions.get(&v.to_string()).copied().unwrap_or(0);
    let mut versions: Vec<u32> = cfg.keyring.keys.iter().map(|k| k.version).collect();
    versions.sort_unstable();
    // Files that name a version the keyring lacks cannot be read on this node.
    let unknown: Vec<(&String, &u64)> = c
        .key_versions
        .iter()
        .filter(|(v, _)| !versions.iter().any(|k| k.to_string() == **v))
        .collect();
    if json {
        let v = serde_json::json!({
            "volume_id": cfg.volume_id,
            "keyring_id": cfg.keyring.id,
            "kms": cfg.kms.name(),
            "key": cfg.kms.key_reference(),
            "current": cfg.keyring.current,
            "versions": versions.iter().map(|&v| serde_json::json!({
                "version": v,
                "current": v == cfg.keyring.current,
                "files": files(v),
            })).collect::<Vec<_>>(),
            "files_under_unknown_versions": unknown.iter().map(|(v, n)| (v.to_string(), **n)).collect::<std::collections::BTreeMap<_, _>>(),
            "files": census_json(&c),
            "authenticated": false,
        });
        println!("{v:#}");
        return Ok(());
    }
    println!("volume:       {}", cfg.volume_id);
    println!("keyring:      {}", cfg.keyring.id);
    println!(
        "wrapped by:   {} ({})",
        cfg.kms.name(),
        cfg.kms.key_reference()
    );
    println!("VERSION  CURRENT  FILES");
    for v in &versions {
        println!(
            "{v:>7}  {:<7}  {}",
            if *v == cfg.keyring.current { "yes" } else { "" },
            files(*v)
        );
    }
    for (v, n) in &unknown {
        println!(
            "{v:>7}  missing  {n} (this keyring lacks version {v}: those files cannot be read here; take the cluster's newer keyring with earfs import-keyring)"
        );
    }
    if c.empty + c.no_header > 0 {
        println!(
            "({} files have no header yet; they take the current version at their first write)",
            c.empty + c.no_header
        );
    }
    Ok(())
}
