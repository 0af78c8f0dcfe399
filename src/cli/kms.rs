//! The KMS commands: building a provider from flags, `init` against a KMS, `init --join`,
//! `kms-check` and `export-keyring`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::{Kms, KmsArgs, output};
use crate::daemon::{self, Failure, exit};
use crate::kms::{
    KeyProvider, KmsOverrides, PermissionCheck, ProviderSpec, Retry, create_key_file,
};
use crate::volume::{self, JoinSource, KeyringExport, VolumeConfig};

/// The KMS bounds for a deadline in seconds.
pub(super) fn retry(seconds: u64) -> Result<Retry, Failure> {
    if !(1..=3600).contains(&seconds) {
        return Err(Failure::new(
            exit::USAGE,
            "--kms-deadline must be between 1 and 3600 seconds",
        ));
    }
    Ok(Retry::with_deadline(Duration::from_secs(seconds)))
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure::new(exit::USAGE, msg)
}

/// Refuse flags that belong to another provider.
fn refuse_foreign(args: &KmsArgs, kms: Kms) -> Result<(), Failure> {
    let mut foreign = Vec::new();
    if kms != Kms::Local && args.key_file.is_some() {
        foreign.push("--key-file");
    }
    if kms != Kms::Aws {
        for (set, name) in [
            (args.key_arn.is_some(), "--key-arn"),
            (args.region.is_some(), "--region"),
            (args.profile.is_some(), "--profile"),
        ] {
            if set {
                foreign.push(name);
            }
        }
    }
    if kms != Kms::Gcp && args.key_resource.is_some() {
        foreign.push("--key-resource");
    }
    if kms == Kms::Local {
        if args.credentials.is_some() {
            foreign.push("--credentials");
        }
        if args.endpoint_url.is_some() {
            foreign.push("--endpoint-url");
        }
    }
    if foreign.is_empty() {
        Ok(())
    } else {
        Err(usage(format!(
            "{} cannot be used with --kms {}",
            foreign.join(", "),
            kms_name(kms)
        )))
    }
}

fn kms_name(kms: Kms) -> &'static str {
    match kms {
        Kms::Local => "local",
        Kms::Aws => "aws",
        Kms::Gcp => "gcp",
    }
}

/// The provider spec the flags describe (checked offline).
pub(super) fn spec(args: &KmsArgs, kms: Kms) -> Result<ProviderSpec, Failure> {
    refuse_foreign(args, kms)?;
    let credentials = args.credentials.as_deref().map(daemon::absolute);
    let spec = match kms {
        Kms::Local => ProviderSpec::Local {
            key_file: daemon::absolute(
                args.key_file
                    .as_deref()
                    .ok_or_else(|| usage("--kms local needs --key-file"))?,
            ),
        },
        Kms::Aws => ProviderSpec::Aws {
            key_arn: args.key_arn.clone().ok_or_else(|| {
                usage("--kms aws needs --key-arn arn:aws:kms:REGION:ACCOUNT:key/ID")
            })?,
            region: args.region.clone(),
            endpoint_url: args.endpoint_url.clone(),
            profile: args.profile.clone(),
            credentials_file: credentials,
        },
        Kms::Gcp => ProviderSpec::Gcp {
            key_resource: args.key_resource.clone().ok_or_else(|| {
                usage(
                    "--kms gcp needs --key-resource projects/P/locations/L/keyRings/R/cryptoKeys/K",
                )
            })?,
            credentials,
            endpoint: args.endpoint_url.clone(),
        },
    };
    spec.validate()?;
    Ok(spec)
}

/// Create a `--kms local` key file that does not exist yet (mode 0600), and say so.
pub(super) fn create_missing_key_file(spec: &ProviderSpec) -> Result<(), Failure> {
    if let ProviderSpec::Local { key_file } = spec
        && !key_file.exists()
    {
        create_key_file(key_file)?;
        eprintln!(
            "created key file {} (mode 0600): keep it safe, without it the data is lost",
            key_file.display()
        );
    }
    Ok(())
}

/// Open the provider and validate its key; an AWS alias ARN is resolved to its key
/// ARN, which is what the volume stores.
pub(super) fn open_validated(
    args: &KmsArgs,
    kms: Kms,
) -> Result<(ProviderSpec, Box<dyn KeyProvider>), Failure> {
    let r = retry(args.kms_deadline)?;
    let mut spec = spec(args, kms)?;
    create_missing_key_file(&spec)?;
    let provider = spec.open(r)?;
    let desc = provider.validate()?;
    output::say(format_args!("key: {}", desc.key));
    for d in &desc.details {
        output::say(format_args!("  {d}"));
    }
    if let ProviderSpec::Aws { key_arn, .. } = &mut spec
        && *key_arn != desc.key
    {
        output::say(format_args!("  (alias {key_arn} resolved to {})", desc.key));
        *key_arn = desc.key;
        let provider = spec.open(r)?;
        return Ok((spec, provider));
    }
    Ok((spec, provider))
}

/// This node's settings for an existing keyring's key (a volume's, or one to join):
/// the recorded ones, with the per-node flags (credentials, profile, endpoint, region)
/// applied. The key itself cannot change.
pub(super) fn node_spec(args: &KmsArgs, source: &ProviderSpec) -> Result<ProviderSpec, Failure> {
    if let Some(k) = args.kms
        && kms_name(k) != source.name()
    {
        return Err(usage(format!(
            "the keyring to join is wrapped by --kms {}, not {}",
            source.name(),
            kms_name(k)
        )));
    }
    let mismatch = |flag: &str, given: &str| {
        usage(format!(
            "{flag} {given} is not the key of the keyring to join ({}); leave it out",
            source.key_reference()
        ))
    };
    let (kms, given_key) = match source {
        ProviderSpec::Local { .. } => (Kms::Local, None),
        ProviderSpec::Aws { .. } => (Kms::Aws, args.key_arn.as_deref().map(|k| ("--key-arn", k))),
        ProviderSpec::Gcp { .. } => (
            Kms::Gcp,
            args.key_resource.as_deref().map(|k| ("--key-resource", k)),
        ),
    };
    refuse_foreign(args, kms)?;
    if let Some((flag, k)) = given_key
        && k != source.key_reference()
    {
        return Err(mismatch(flag, k));
    }
    Ok(source.with_overrides(&node_overrides(args))?)
}

/// The per-node flags as overrides of a recorded spec: the same as a daemon config's
/// [kms] table (the local provider's "credentials" is its key file).
pub(super) fn node_overrides(args: &KmsArgs) -> KmsOverrides {
    KmsOverrides {
        key_file: args.key_file.as_deref().map(daemon::absolute),
        credentials_file: args.credentials.as_deref().map(daemon::absolute),
        profile: args.profile.clone(),
        region: args.region.clone(),
        endpoint_url: args.endpoint_url.clone(),
    }
}

/// The per-node flags given, by name.
pub(super) fn node_flags(args: &KmsArgs) -> Vec<&'static str> {
    [
        (args.credentials.is_some(), "--credentials"),
        (args.key_file.is_some(), "--key-file"),
        (args.profile.is_some(), "--profile"),
        (args.region.is_some(), "--region"),
        (args.endpoint_url.is_some(), "--endpoint-url"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect()
}

/// `earfs init --join FILE BACKING`.
pub(super) fn join(args: &KmsArgs, file: &Path, backing: &Path) -> Result<VolumeConfig, Failure> {
    volume::check_new(backing)?;
    let source = JoinSource::read(file)?;
    let spec = node_spec(args, source.kms())?;
    daemon::protect_key_material();
    let provider = spec.open(retry(args.kms_deadline)?)?;
    let cfg = volume::join(backing, file, &source, spec, provider.as_ref())?;
    output::say(format_args!(
        "created earfs volume {} in {}, joined to keyring {} ({} key version(s), current {})",
        cfg.volume_id,
        backing.display(),
        cfg.keyring.id,
        cfg.keyring.keys.len(),
        cfg.keyring.current
    ));
    output::say(format_args!(
        "key provider: {} ({})",
        cfg.kms.name(),
        cfg.kms.key_reference()
    ));
    Ok(cfg)
}

/// The checks of one key: its provider spec and each permission tried.
type Side = (ProviderSpec, Vec<PermissionCheck>);

/// One key's checks, in `kms-check --json`.
#[derive(Serialize)]
struct Checked<'a> {
    #[serde(flatten)]
    key: output::KeyRef,
    checks: &'a [PermissionCheck],
}

impl<'a> Checked<'a> {
    fn of((spec, checks): &'a Side) -> Self {
        Checked {
            key: output::KeyRef::of(spec),
            checks,
        }
    }
}

/// What `kms-check --json` prints: the key (the volume's, with BACKING), whether every
/// check passed, and with --new-key the key a rewrap would move to.
#[derive(Serialize)]
struct Report<'a> {
    ok: bool,
    #[serde(flatten)]
    key: Checked<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_key: Option<Checked<'a>>,
}

/// `earfs kms-check`: a key from the flags, or an existing volume's (and, with
/// `--new-key`, the key a rewrap would move it to).
pub(super) fn check(
    args: &KmsArgs,
    json: bool,
    new_key: bool,
    backing: Option<&Path>,
) -> Result<(), Failure> {
    // A failure before any check ran is printed by main (earfs.error.v1, `ok` false).
    let sides = run_check(args, new_key, backing)?;
    let all: Vec<&PermissionCheck> = sides.iter().flat_map(|(_, c)| c).collect();
    let ok = all.iter().all(|c| c.ok);
    if json {
        output::print(
            "earfs.kms-check.v1",
            &Report {
                ok,
                key: Checked::of(&sides[0]),
                new_key: sides.get(1).map(Checked::of),
            },
        )?;
    } else {
        for (i, (spec, checks)) in sides.iter().enumerate() {
            if sides.len() > 1 {
                println!(
                    "{}",
                    if i == 0 {
                        "the volume's key (what a rewrap needs of it):"
                    } else {
                        "\nthe new key:"
                    }
                );
            }
            print_table(spec, checks);
        }
    }
    if ok {
        Ok(())
    } else {
        let failed: Vec<&str> = all.iter().filter(|c| !c.ok).map(|c| c.permission).collect();
        let code = if failed == [MAC_ROW] {
            exit::CONFIG_TAMPERED
        } else {
            exit::KMS_CHECK_FAILED
        };
        Err(Failure::new(
            code,
            format!(
                "{} of {} checks failed: {}",
                failed.len(),
                all.len(),
                failed.join(", ")
            ),
        ))
    }
}

fn run_check(args: &KmsArgs, new_key: bool, backing: Option<&Path>) -> Result<Vec<Side>, Failure> {
    daemon::protect_key_material();
    let r = retry(args.kms_deadline)?;
    match backing {
        Some(b) if new_key => {
            let kms = args.kms.ok_or_else(|| {
                usage("--new-key needs the new key: --kms aws --key-arn …, --kms gcp --key-resource … or --kms local --key-file …")
            })?;
            let cfg = VolumeConfig::load(b)?;
            let wrapped = cfg.current_wrapped(b)?;
            // The flags name the new key; the volume's is reached as recorded.
            let old = cfg.kms.open(r)?;
            let mut checks: Vec<PermissionCheck> = old
                .check(&cfg.keyring.id, Some(&wrapped))
                .into_iter()
                .filter(|c| UNWRAP_CALLS.contains(&c.operation))
                .collect();
            if checks.iter().all(|c| c.ok) {
                checks.push(mac_check(&cfg, b, old.as_ref())?);
            }
            let spec_new = spec(args, kms)?;
            let new = spec_new.open(r)?;
            let new_checks = new.check(&cfg.keyring.id, None);
            Ok(vec![(cfg.kms.clone(), checks), (spec_new, new_checks)])
        }
        Some(b) => {
            if args.kms.is_some() || args.key_arn.is_some() || args.key_resource.is_some() {
                return Err(usage(
                    "give either a volume's BACKING directory or a key (--kms …), not both (or add --new-key to check a key to rewrap to)",
                ));
            }
            let cfg = VolumeConfig::load(b)?;
            let wrapped = cfg.current_wrapped(b)?;
            let spec = node_spec(args, &cfg.kms)?;
            let provider = spec.open(r)?;
            let mut checks = provider.check(&cfg.keyring.id, Some(&wrapped));
            // What a mount checks next: the config's MAC under the unwrapped data key.
            if checks.iter().all(|c| c.ok) {
                checks.push(mac_check(&cfg, b, provider.as_ref())?);
            }
            Ok(vec![(spec, checks)])
        }
        None => {
            let kms = args.kms.ok_or_else(|| {
                usage("earfs kms-check needs a volume's BACKING directory, or --kms aws|gcp with its key")
            })?;
            let spec = spec(args, kms)?;
            let provider = spec.open(r)?;
            let probe_ring = format!("earfs-kms-check-{}", uuid::Uuid::new_v4());
            let checks = provider.check(&probe_ring, None);
            Ok(vec![(spec, checks)])
        }
    }
}

/// The calls that unwrap a data key, one per provider: all that a rewrap needs of the
/// key it moves away from.
const UNWRAP_CALLS: [&str; 3] = ["Decrypt", "cryptoKeys.decrypt", "unwrap"];

/// The row of the `earfs.conf` MAC check.
const MAC_ROW: &str = "earfs.conf";

/// Unwrap every key version and verify the config's MAC, as a mount does.
fn mac_check(
    cfg: &VolumeConfig,
    backing: &Path,
    provider: &dyn KeyProvider,
) -> Result<PermissionCheck, Failure> {
    let (ok, detail) = match cfg.unlock(backing, provider) {
        Ok(deks) => (
            true,
            format!("authenticates ({} key version(s) unwrapped)", deks.len()),
        ),
        Err(volume::VolumeError::ConfigMac(_)) => (
            false,
            "does not authenticate: changed since earfs wrote it, or not this keyring's".into(),
        ),
        Err(e) => return Err(e.into()),
    };
    Ok(PermissionCheck {
        permission: MAC_ROW,
        operation: "HMAC-SHA256",
        ok,
        detail,
    })
}

fn print_table(spec: &ProviderSpec, checks: &[PermissionCheck]) {
    println!("key provider: {} ({})", spec.name(), spec.key_reference());
    let pw = checks
        .iter()
        .map(|c| c.permission.len())
        .max()
        .unwrap_or(10)
        .max(10);
    let ow = checks
        .iter()
        .map(|c| c.operation.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!("{:<pw$}  {:<ow$}  RESULT", "PERMISSION", "CALL");
    for c in checks {
        println!(
            "{:<pw$}  {:<ow$}  {:<6}  {}",
            c.permission,
            c.operation,
            if c.ok { "ok" } else { "FAILED" },
            c.detail
        );
    }
}

/// `earfs export-keyring BACKING [-o FILE]`.
pub(super) fn export_keyring(
    backing: &Path,
    out: Option<&Path>,
    json: bool,
    deadline: u64,
) -> Result<(), Failure> {
    daemon::protect_key_material();
    let cfg = VolumeConfig::load(backing)?;
    let provider = cfg.kms.open(retry(deadline)?)?;
    let keys = cfg.unlock(backing, provider.as_ref())?;
    let text = KeyringExport::of(&cfg, keys.current().1).to_text();
    if json {
        /// What `export-keyring --json` prints.
        #[derive(Serialize)]
        struct Exported<'a> {
            backing: std::path::PathBuf,
            volume_id: &'a str,
            keyring_id: &'a str,
            #[serde(flatten)]
            key: output::KeyRef,
            key_versions: Vec<u32>,
            current_key_version: u32,
            /// The file written (mode 0600), or null: the keyring is then `keyring`.
            output: Option<std::path::PathBuf>,
            #[serde(skip_serializing_if = "Option::is_none")]
            keyring: Option<&'a str>,
        }
        if let Some(p) = out {
            write_private(p, &text)?;
        }
        return output::print(
            "earfs.export-keyring.v1",
            &Exported {
                backing: output::canonical(backing),
                volume_id: &cfg.volume_id,
                keyring_id: &cfg.keyring.id,
                key: output::KeyRef::of(&cfg.kms),
                key_versions: cfg.keyring.keys.iter().map(|k| k.version).collect(),
                current_key_version: cfg.keyring.current,
                output: out.map(output::canonical),
                keyring: out.is_none().then_some(text.as_str()),
            },
        );
    }
    match out {
        None => {
            print!("{text}");
            Ok(())
        }
        Some(p) => {
            write_private(p, &text)?;
            eprintln!(
                "wrote keyring {} ({} key version(s), current {}) to {}; on the other nodes of the cluster: earfs import-keyring {} BACKING; a new node joins with: earfs init --join {} BACKING",
                cfg.keyring.id,
                cfg.keyring.keys.len(),
                cfg.keyring.current,
                p.display(),
                p.display(),
                p.display()
            );
            Ok(())
        }
    }
}

/// Write TEXT to P with mode 0600 (a new file; an existing one is truncated) and sync it.
fn write_private(p: &Path, text: &str) -> Result<(), Failure> {
    let io = |e: std::io::Error| Failure::new(exit::FAILURE, format!("{}: {e}", p.display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}
