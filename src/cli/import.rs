//! `earfs import-keyring FILE BACKING`: merge a newer export of the cluster's keyring
//! (after `earfs rotate`, a retired version or a rewrap on another node) into this
//! node's existing volume. Unmounted: under the volume's lock, here. Mounted: through
//! the daemon's control socket (the daemon reads FILE and switches at once). Either way
//! the files are counted per key version from their headers here first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::KmsArgs;
use super::change::{canonical, daemon_of};
use super::files::count_files;
use super::kms::{node_flags, node_overrides, node_spec, retry};
use crate::daemon::control::request_reply;
use crate::daemon::{self, Failure, exit};
use crate::kms::ProviderSpec;
use crate::volume::{self, Imported, JoinSource, VolumeConfig};

/// `earfs import-keyring FILE BACKING`.
pub(super) fn import_keyring(args: &KmsArgs, file: &Path, backing: &Path) -> Result<(), Failure> {
    let backing = canonical(backing)?;
    let source = JoinSource::read(file)?;
    let file = std::fs::canonicalize(file)
        .map_err(|e| Failure::new(exit::FAILURE, format!("{}: {e}", file.display())))?;
    let r = retry(args.kms_deadline)?;
    let cfg = VolumeConfig::load(&backing)?;
    // Refusals that need no key come first, before the KMS and the file count. They
    // are checked again once the file has authenticated.
    cfg.check_import_id(&file, &source)?;
    // The key of the import, this node's way: --kms, --key-arn and --key-resource may
    // only confirm it.
    node_spec(args, source.kms())?;
    let files = files_of_dropped(&cfg, &backing, &source)?;
    cfg.check_import_versions(&file, &source, &files)?;
    let (out, how) = match daemon::try_lock_volume(&backing)? {
        Some(_lock) => (
            offline(args, &file, &backing, &source, &files)?,
            "not mounted: earfs.conf rewritten",
        ),
        None => (
            online(args, &file, &backing, r.deadline)?,
            "through the running daemon",
        ),
    };
    let after = VolumeConfig::load(&backing)?;
    let versions: Vec<u32> = after.keyring.keys.iter().map(|k| k.version).collect();
    match out {
        None => println!(
            "volume {}: keyring {} is already as in {} (key versions {versions:?}, current {}); nothing to do",
            after.volume_id,
            after.keyring.id,
            file.display(),
            after.keyring.current
        ),
        Some(i) => {
            println!(
                "volume {}: imported keyring {} from {} ({how})",
                after.volume_id,
                after.keyring.id,
                file.display()
            );
            println!(
                "key versions {versions:?}, current {} (was {}); added {:?}, dropped {:?}",
                i.to, i.from, i.added, i.dropped
            );
            println!(
                "wrapped by:   {} ({}){}",
                after.kms.name(),
                after.kms.key_reference(),
                if i.kms_changed {
                    " — moved to this KMS key"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

/// Files per key version, counted from the headers, when the import lacks a version
/// this volume has (empty otherwise: nothing would be dropped).
fn files_of_dropped(
    cfg: &VolumeConfig,
    backing: &Path,
    source: &JoinSource,
) -> Result<BTreeMap<u32, u64>, Failure> {
    let ring = source.keyring();
    let drops = cfg.keyring.keys.iter().any(|k| !ring.has(k.version));
    if !drops {
        return Ok(BTreeMap::new());
    }
    let c = count_files(backing)?;
    Ok(c.key_versions
        .iter()
        .filter_map(|(v, n)| v.parse::<u32>().ok().map(|v| (v, *n)))
        .collect())
}

/// The import on an unmounted volume, under its lock: this volume's own earfs.conf
/// unlocks first (its keys unwrap, its MAC checks), then the import's keys unwrap with
/// this node's access to the import's KMS key.
fn offline(
    args: &KmsArgs,
    file: &Path,
    backing: &Path,
    source: &JoinSource,
    files: &BTreeMap<u32, u64>,
) -> Result<Option<Imported>, Failure> {
    daemon::protect_key_material();
    let r = retry(args.kms_deadline)?;
    let mut cfg = VolumeConfig::load(backing)?;
    let same = volume::same_key(source.kms(), &cfg.kms);
    // This volume's key, with the per-node flags when they are for its provider (a
    // local key file given is the import's key, not this volume's).
    let own_spec = if same {
        node_spec(args, &cfg.kms)?
    } else if cfg.kms.name() == source.kms().name()
        && !matches!(cfg.kms, ProviderSpec::Local { .. })
    {
        cfg.kms.with_overrides(&node_overrides(args))?
    } else {
        cfg.kms.clone()
    };
    let own = own_spec.open(r)?;
    let mut deks = cfg.unlock(backing, own.as_ref())?;
    let (spec, other) = if same {
        (cfg.kms.clone(), None)
    } else {
        let spec = node_spec(args, source.kms())?;
        let p = spec.open(r)?;
        (spec, Some(p))
    };
    let provider = other.as_deref().unwrap_or(own.as_ref());
    Ok(cfg.import(backing, file, source, spec, provider, &mut deks, files)?)
}

/// The import through the daemon that serves the volume.
fn online(
    args: &KmsArgs,
    file: &Path,
    backing: &Path,
    deadline: Duration,
) -> Result<Option<Imported>, Failure> {
    let flags = node_flags(args);
    if !flags.is_empty() {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "volume {} is mounted: its daemon imports the keyring with its own per-node KMS settings (its config file's [kms] table, or its mount flags); leave out {}, or unmount the volume and import it then",
                backing.display(),
                flags.join(", ")
            ),
        ));
    }
    let path: &str = file
        .to_str()
        .filter(|p| !p.contains('\n') && p.len() < 900)
        .ok_or_else(|| {
            Failure::new(
                exit::USAGE,
                format!(
                    "{}: the daemon takes a UTF-8 path of one line under 900 bytes; copy the file to a shorter path",
                    file.display()
                ),
            )
        })?;
    let sock: PathBuf = daemon_of(backing)?;
    // The daemon unwraps this volume's keys and the import's: allow for two deadlines.
    let v = request_reply(
        &sock,
        &format!("import-keyring {path}"),
        deadline * 2 + Duration::from_secs(10),
    )
    .map_err(|e| {
        Failure::new(
            exit::FAILURE,
            format!(
                "the daemon serving {} did not answer the import: {e}",
                backing.display()
            ),
        )
    })?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        let code = v
            .get("exit_code")
            .and_then(|c| c.as_u64())
            .and_then(|c| u8::try_from(c).ok())
            .unwrap_or(exit::FAILURE);
        return Err(Failure::new(
            code,
            format!(
                "the daemon serving {} did not import: {e}",
                backing.display()
            ),
        ));
    }
    if v["changed"].as_bool() != Some(true) {
        return Ok(None);
    }
    let n = |k: &str| {
        v[k].as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .unwrap_or(0)
    };
    let list = |k: &str| -> Vec<u32> {
        v[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(Some(Imported {
        from: n("from"),
        to: n("to"),
        added: list("added"),
        dropped: list("dropped"),
        kms_changed: v["kms_changed"].as_bool() == Some(true),
    }))
}
