//! The file census that `info --files`, `status --files` and `keys` print.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use serde_json::Value;

use super::output;
use crate::content::FileFormat;
use crate::daemon::{Failure, exit};
use crate::fs::census::{Census, census};
use crate::volume::VolumeConfig;

/// Seconds between the plain progress lines printed when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Count the files of `backing` (headers only). On a terminal a spinner line shows the
/// count so far; otherwise a plain line every [`PLAIN_PROGRESS_EVERY`], and, once one
/// was printed, a last line with the total (short runs print nothing).
pub(super) fn count_files(backing: &Path) -> Result<Census, Failure> {
    let started = Instant::now();
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
            bar.set_style(style);
        }
        bar.set_message(format!("counting files in {}", backing.display()));
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    });
    let mut last_line = started;
    let mut printed = false;
    let c = census(backing, |c| match &bar {
        Some(bar) => bar.set_message(format!(
            "counting files in {}: {} read",
            backing.display(),
            c.files
        )),
        None if last_line.elapsed() >= PLAIN_PROGRESS_EVERY => {
            last_line = Instant::now();
            printed = true;
            eprintln!(
                "counting files in {}: {} read so far",
                backing.display(),
                c.files
            );
        }
        None => {}
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let c = c.map_err(|e| Failure::new(exit::FAILURE, format!("counting files: {e}")))?;
    if printed {
        eprintln!(
            "counted {} files in {} in {:.1} s",
            c.files,
            backing.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(c)
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
    if c.more_links > 0 {
        println!(
            "{pad}  more names:  {} (hard links of files counted once)",
            c.more_links
        );
    }
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
        /// One key version in `keys --json`.
        #[derive(serde::Serialize)]
        struct Version {
            version: u32,
            current: bool,
            files: u64,
        }
        /// What `keys --json` prints.
        #[derive(serde::Serialize)]
        struct Keys<'a> {
            backing: std::path::PathBuf,
            volume_id: &'a str,
            keyring_id: &'a str,
            #[serde(flatten)]
            key: output::KeyRef,
            current_key_version: u32,
            versions: Vec<Version>,
            /// Versions that files name but the keyring lacks: file count by version.
            files_under_unknown_versions: std::collections::BTreeMap<String, u64>,
            files: &'a Census,
            /// Always false: keys reads earfs.conf without the key.
            authenticated: bool,
        }
        return output::print(
            "earfs.keys.v1",
            &Keys {
                backing: output::canonical(backing),
                volume_id: &cfg.volume_id,
                keyring_id: &cfg.keyring.id,
                key: output::KeyRef::of(&cfg.kms),
                current_key_version: cfg.keyring.current,
                versions: versions
                    .iter()
                    .map(|&v| Version {
                        version: v,
                        current: v == cfg.keyring.current,
                        files: files(v),
                    })
                    .collect(),
                files_under_unknown_versions: unknown
                    .iter()
                    .map(|(v, n)| (v.to_string(), **n))
                    .collect(),
                files: &c,
                authenticated: false,
            },
        );
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
