//! `earfs config BACKING [--set KEY=VALUE]…`: show, or change, the per-node KMS settings
//! recorded in `earfs.conf` (a moved local key file, another endpoint, region, profile
//! or credentials file), never the key itself.
//!
//! A change is made on the unmounted volume, under its lock: the data keys are
//! unwrapped through the NEW settings and the config's MAC checked with them, which
//! proves that the settings work and reach the same key; then `earfs.conf` is rewritten
//! atomically under a new MAC. Nothing is written if any of that fails.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::change::canonical;
use super::output;
use crate::daemon::{self, Failure, exit};
use crate::kms::ProviderSpec;
use crate::volume::VolumeConfig;

/// A per-node setting: its name (`kms.FIELD`) and value, unset if `None`.
type Setting = (&'static str, Option<String>);

/// The per-node settings a spec records, by name.
fn settings(spec: &ProviderSpec) -> Vec<Setting> {
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    match spec {
        ProviderSpec::Local { key_file } => {
            vec![("kms.key_file", Some(key_file.display().to_string()))]
        }
        ProviderSpec::Aws {
            region,
            endpoint_url,
            profile,
            credentials_file,
            ..
        } => vec![
            ("kms.region", region.clone()),
            ("kms.endpoint_url", endpoint_url.clone()),
            ("kms.profile", profile.clone()),
            ("kms.credentials_file", path(credentials_file)),
        ],
        ProviderSpec::Gcp {
            credentials,
            endpoint,
            ..
        } => vec![
            ("kms.credentials", path(credentials)),
            ("kms.endpoint", endpoint.clone()),
        ],
    }
}

/// The name of the key field of a spec (which `--set` refuses).
fn key_field(spec: &ProviderSpec) -> &'static str {
    match spec {
        ProviderSpec::Local { .. } => "kms.key_file",
        ProviderSpec::Aws { .. } => "kms.key_arn",
        ProviderSpec::Gcp { .. } => "kms.key_resource",
    }
}

/// `spec` with `name` set to `value` (an empty value unsets an optional setting).
fn set(spec: &ProviderSpec, name: &str, value: &str) -> Result<ProviderSpec, Failure> {
    let usage = |m: String| Failure::new(exit::USAGE, m);
    let name = match name {
        "local.key_file" => "kms.key_file",
        n => n,
    };
    let opt = || (!value.is_empty()).then(|| value.to_string());
    let opt_path = || (!value.is_empty()).then(|| daemon::absolute(Path::new(value)));
    let mut s = spec.clone();
    match (&mut s, name) {
        (ProviderSpec::Local { key_file }, "kms.key_file") => {
            if value.is_empty() {
                return Err(usage(
                    "kms.key_file cannot be unset: a local volume needs its key file".into(),
                ));
            }
            *key_file = daemon::absolute(Path::new(value));
        }
        (ProviderSpec::Aws { region, .. }, "kms.region") => *region = opt(),
        (ProviderSpec::Aws { endpoint_url, .. }, "kms.endpoint_url") => *endpoint_url = opt(),
        (ProviderSpec::Aws { profile, .. }, "kms.profile") => *profile = opt(),
        (
            ProviderSpec::Aws {
                credentials_file, ..
            },
            "kms.credentials_file",
        ) => {
            *credentials_file = opt_path();
        }
        (ProviderSpec::Gcp { credentials, .. }, "kms.credentials") => *credentials = opt_path(),
        (ProviderSpec::Gcp { endpoint, .. }, "kms.endpoint") => *endpoint = opt(),
        _ if name == key_field(spec) || name == "kms.provider" => {
            return Err(usage(format!(
                "{name} names the key itself, which `earfs config` never changes: move the keys to another KMS key with `earfs rewrap`"
            )));
        }
        _ => {
            let known: Vec<&str> = settings(spec).iter().map(|(n, _)| *n).collect();
            return Err(usage(format!(
                "--set {name}: not a per-node setting of a {} volume; those are: {}",
                spec.name(),
                known.join(", ")
            )));
        }
    }
    s.validate()?;
    Ok(s)
}

/// What `config --json` prints.
#[derive(Serialize)]
struct Shown {
    backing: std::path::PathBuf,
    #[serde(flatten)]
    key: output::KeyRef,
    settings: std::collections::BTreeMap<&'static str, Option<String>>,
}

/// `earfs config BACKING [--set NAME=VALUE]… [--json]`.
pub(super) fn run(
    backing: &Path,
    sets: &[String],
    json: bool,
    deadline: u64,
) -> Result<(), Failure> {
    let backing = canonical(backing)?;
    let mut cfg = VolumeConfig::load(&backing)?;
    if sets.is_empty() {
        return show(&backing, &cfg.kms, json);
    }
    let mut spec = cfg.kms.clone();
    for s in sets {
        let (name, value) = s.split_once('=').ok_or_else(|| {
            Failure::new(
                exit::USAGE,
                format!("--set {s}: give NAME=VALUE (an empty VALUE unsets it)"),
            )
        })?;
        spec = set(&spec, name.trim(), value.trim())?;
    }
    if spec == cfg.kms {
        println!(
            "{}: nothing to change",
            crate::volume::config_path(&backing).display()
        );
        return Ok(());
    }
    let Some(_lock) = daemon::try_lock_volume(&backing)? else {
        return Err(Failure::new(
            exit::VOLUME_IN_USE,
            format!(
                "{} is mounted: its recorded settings change only while it is not; unmount it first (until then, a mount takes --key-file, --credentials and the [kms] table of its config)",
                backing.display()
            ),
        ));
    };
    daemon::protect_key_material();
    // Unwrapped through the new settings: they must work, and reach the same key (the
    // config's MAC is checked with the key they give).
    let provider = spec.open(super::kms::retry(deadline)?)?;
    let keys = cfg.unlock(&backing, provider.as_ref())?;
    let before = settings(&cfg.kms);
    cfg.set_node_settings(&backing, &keys, spec)?;
    let path = crate::volume::config_path(&backing);
    for ((name, old), (_, new)) in before.iter().zip(settings(&cfg.kms)) {
        if *old != new {
            let shown = |v: &Option<String>| v.clone().unwrap_or_else(|| "(unset)".into());
            println!(
                "{}: {name}: {} -> {}",
                path.display(),
                shown(old),
                shown(&new)
            );
        }
    }
    Ok(())
}

fn show(backing: &Path, spec: &ProviderSpec, json: bool) -> Result<(), Failure> {
    let all = settings(spec);
    if json {
        return output::print(
            "earfs.config.v1",
            &Shown {
                backing: backing.to_path_buf(),
                key: output::KeyRef::of(spec),
                settings: all.into_iter().collect(),
            },
        );
    }
    println!("volume:   {}", backing.display());
    println!("provider: {}", spec.name());
    println!("key:      {}", spec.key_reference());
    println!(
        "per-node settings (change with `earfs config {} --set NAME=VALUE`):",
        backing.display()
    );
    for (name, v) in all {
        println!("  {name} = {}", v.as_deref().unwrap_or("(unset)"));
    }
    Ok(())
}
