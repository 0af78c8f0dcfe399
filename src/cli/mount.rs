//! `earfs mount`: flags, the config file, and how they combine (flags win).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::default_threads;
use crate::daemon::config::{FileConfig, parse_duration, parse_interval, parse_metrics_address};
use crate::daemon::mountopts::{self, MountOpt};
use crate::daemon::{self, Failure, MountRequest, RevocationPolicy, exit};
use crate::kms::{KmsOverrides, Retry};

#[derive(Debug, Clone, Args)]
pub struct MountArgs {
    /// Stay in the foreground (for systemd and debugging); logs go to stderr.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// Settings file (e.g. /etc/earfs/NAME.toml); flags given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Let other users (e.g. the database user) use the mount; the kernel checks permissions (also -o allow_other).
    #[arg(long)]
    pub allow_other: bool,
    /// FUSE request threads [default: 4 per core, 16 to 64].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Let the kernel cache writes (FUSE writeback cache): the default; write errors
    /// then surface at fsync and close. Overrides `writeback_cache = false` in --config.
    #[arg(long, overrides_with = "no_writeback_cache")]
    pub writeback_cache: bool,
    /// Send every write to the daemon at once (no FUSE writeback cache; also
    /// -o no_writeback_cache, `writeback_cache = false` in --config).
    #[arg(long, overrides_with = "writeback_cache")]
    pub no_writeback_cache: bool,
    /// Mount options, comma-separated, as mount -o and an fstab line take them: mount
    /// flags (ro, rw, noatime, relatime, nosuid, nodev, noexec, sync, dirsync, …), FUSE's
    /// allow_other and default_permissions, earfs's own settings as NAME=VALUE (config,
    /// threads, writeback_cache, no_writeback_cache, log_file, kms_deadline, recheck_interval,
    /// revocation_policy, metrics_address, stop_timeout, credentials; a flag given too
    /// wins), and fstab's (nofail, _netdev, noauto, defaults, x-systemd.*, …: ignored).
    /// Anything else is refused (exit 2).
    #[arg(short = 'o', value_delimiter = ',', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Log file (appended; RFC 3339 time stamps; opened again on SIGHUP, for logrotate), of the background daemon or, with --foreground, of this one. Without it the background daemon logs to syslog, the foreground one to stderr (the journal under systemd).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// How long unwrapping the data keys through the KMS may take, retries of throttling, timeouts and 5xx included ("90s", "2m"; a bare number is seconds) [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = crate::daemon::config::parse_deadline_seconds)]
    pub kms_deadline: Option<u64>,
    /// How often the KMS key is checked again while mounted ("15m", "1h"; "0": never) [default: 15m].
    #[arg(long, value_name = "DURATION")]
    pub recheck_interval: Option<String>,
    /// What a revoked key does: lock (wipe the data keys, file I/O fails with EIO until the key is back) or warn [default: lock].
    #[arg(long, value_enum)]
    pub revocation_policy: Option<RevocationPolicy>,
    /// Serve Prometheus metrics at http://ADDR/metrics (a loopback address, e.g. 127.0.0.1:9814).
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<String>,
    /// How long a stop waits for a busy mount to be let go ("60s") [default: 60s].
    #[arg(long, value_name = "DURATION")]
    pub stop_timeout: Option<String>,
    /// KMS credentials file for this node, over the one named at init (mode 0600).
    #[arg(long, value_name = "FILE")]
    pub credentials: Option<PathBuf>,
    /// A local volume's key file, over the one recorded at init (e.g. after it moved;
    /// `earfs config --set kms.key_file=FILE` records the new path).
    #[arg(long, value_name = "FILE", conflicts_with = "credentials")]
    pub key_file: Option<PathBuf>,
    /// Once the mount serves, print it as JSON (docs/json.md); not with --foreground.
    #[arg(long, conflicts_with = "foreground")]
    pub json: bool,
    /// Backing directory of the volume (holds earfs.conf and the encrypted files).
    pub backing: Option<PathBuf>,
    /// Empty directory to mount the plaintext view on.
    pub mountpoint: Option<PathBuf>,
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure::new(exit::USAGE, msg)
}

/// The request the flags and the config file make together.
pub fn request(a: &MountArgs) -> Result<MountRequest, Failure> {
    let file = match &a.config {
        Some(p) => FileConfig::load(&daemon::absolute(p))?,
        None => FileConfig::default(),
    };
    let from_file = |what: &str| {
        usage(format!(
            "earfs mount needs {what}: give it as an argument or in the --config file"
        ))
    };
    let backing = a
        .backing
        .clone()
        .or(file.backing.clone())
        .ok_or_else(|| from_file("the backing directory"))?;
    let mountpoint = a
        .mountpoint
        .clone()
        .or(file.mountpoint.clone())
        .ok_or_else(|| from_file("the mountpoint"))?;
    let threads = a.threads.or(file.threads).unwrap_or_else(default_threads);
    if threads == 0 || threads > 256 {
        return Err(usage("--threads must be between 1 and 256"));
    }
    let mut options: Vec<String> = file.options.clone().unwrap_or_default();
    options.extend(a.options.iter().cloned());
    let kms_deadline = match a.kms_deadline {
        Some(s) => super::kms::retry(s)?,
        None => file
            .kms_deadline
            .map_or_else(Retry::default, Retry::with_deadline),
    };
    let recheck_interval = match &a.recheck_interval {
        Some(s) => parse_interval(s).map_err(|m| usage(format!("--recheck-interval: {m}")))?,
        None => file
            .recheck_interval
            .unwrap_or(Some(Duration::from_secs(15 * 60))),
    };
    let metrics_address = match &a.metrics_address {
        Some(s) => {
            Some(parse_metrics_address(s).map_err(|m| usage(format!("--metrics-address: {m}")))?)
        }
        None => file.metrics_address,
    };
    let stop_timeout = match &a.stop_timeout {
        Some(s) => parse_duration(s).map_err(|m| usage(format!("--stop-timeout: {m}")))?,
        None => file.stop_timeout.unwrap_or(Duration::from_secs(60)),
    };
    let mut kms_overrides = KmsOverrides {
        credentials_file: a
            .credentials
            .as_deref()
            .map(daemon::absolute)
            .or(file.kms.credentials_file.clone()),
        key_file: a.key_file.as_deref().map(daemon::absolute),
        ..file.kms.clone()
    };
    if kms_overrides.credentials_file.is_none() {
        kms_overrides.credentials_file = daemon::systemd_kms_credential();
    }
    Ok(MountRequest {
        backing,
        mountpoint,
        allow_other: a.allow_other || file.allow_other.unwrap_or(false),
        threads,
        // On by default; the last of --writeback-cache and --no-writeback-cache wins,
        // then the config file.
        writeback_cache: if a.no_writeback_cache {
            false
        } else {
            a.writeback_cache || file.writeback_cache.unwrap_or(true)
        },
        options,
        kms_retry: kms_deadline,
        kms_overrides,
        recheck_interval,
        revocation_policy: a
            .revocation_policy
            .or(file.revocation_policy)
            .unwrap_or(RevocationPolicy::Lock),
        metrics_address,
        stop_timeout,
        log_level: daemon::logging::effective_level(file.log_level.map(|l| l.filter())),
        config_file: a.config.as_ref().map(|_| file.path.clone()),
    })
}

/// The `-o` options folded into the flags they stand for: earfs's own options set
/// their flag unless it was given too (the flag wins), `allow_other` sets
/// --allow-other, `default_permissions` and fstab's options (`nofail`, `x-systemd.*`,
/// …) are dropped; what is left is for the kernel. An unknown option or a bad value
/// is a usage error naming it (exit 2), so that it never reaches the kernel.
pub fn fold_options(mut a: MountArgs) -> Result<MountArgs, Failure> {
    let given = std::mem::take(&mut a.options);
    for o in given.iter().filter(|o| !o.is_empty()) {
        let bad = |m: String| usage(format!("-o {o}: {m}"));
        match mountopts::classify(o).map_err(|m| usage(format!("-o: {m}")))? {
            MountOpt::Userspace | MountOpt::Implied => {}
            MountOpt::AllowOther => a.allow_other = true,
            MountOpt::Kernel(k) => a.options.push(k),
            MountOpt::Earfs(name, v) => {
                let v = v.unwrap_or_default();
                match name {
                    "writeback_cache" if !a.no_writeback_cache => a.writeback_cache = true,
                    "no_writeback_cache" if !a.writeback_cache => a.no_writeback_cache = true,
                    "writeback_cache" | "no_writeback_cache" => {}
                    "config" => {
                        a.config.get_or_insert_with(|| PathBuf::from(&v));
                    }
                    "log_file" => {
                        a.log_file.get_or_insert_with(|| PathBuf::from(&v));
                    }
                    "credentials" => {
                        a.credentials.get_or_insert_with(|| PathBuf::from(&v));
                    }
                    "threads" => {
                        let n = v
                            .parse::<usize>()
                            .map_err(|_| bad("not a number of threads (1 to 256)".into()))?;
                        a.threads.get_or_insert(n);
                    }
                    "kms_deadline" => {
                        let s = crate::daemon::config::parse_deadline_seconds(&v).map_err(bad)?;
                        a.kms_deadline.get_or_insert(s);
                    }
                    "recheck_interval" => {
                        parse_interval(&v).map_err(bad)?;
                        a.recheck_interval.get_or_insert(v);
                    }
                    "stop_timeout" => {
                        parse_duration(&v).map_err(bad)?;
                        a.stop_timeout.get_or_insert(v);
                    }
                    "metrics_address" => {
                        parse_metrics_address(&v).map_err(bad)?;
                        a.metrics_address.get_or_insert(v);
                    }
                    "revocation_policy" => {
                        let p = <RevocationPolicy as clap::ValueEnum>::from_str(&v, false)
                            .map_err(|_| bad("must be lock or warn".into()))?;
                        a.revocation_policy.get_or_insert(p);
                    }
                    other => return Err(usage(format!("-o {other}: not supported here"))),
                }
            }
        }
    }
    Ok(a)
}

/// `earfs mount`. `child_args` are the arguments a background daemon is started with
/// (this command line with --foreground).
pub fn run(a: MountArgs, child_args: Vec<OsString>) -> Result<(), Failure> {
    let a = fold_options(a)?;
    // Check everything here, so that the background launcher reports a bad flag or
    // config at once; the daemon parses the same arguments again.
    let req = request(&a)?;
    if a.foreground {
        let Some(log_file) = &a.log_file else {
            return daemon::serve(&req);
        };
        let path = daemon::absolute(log_file);
        daemon::logging::log_to_file(&path).map_err(|e| {
            Failure::new(
                exit::USAGE,
                format!(
                    "--log-file {}: {e}; give a file in a directory that exists and is writable",
                    path.display()
                ),
            )
        })?;
        // The error goes to stderr (main) and to the log file.
        daemon::serve(&req).inspect_err(|f| log::error!("{f}"))
    } else {
        daemon::spawn_background(child_args, a.log_file.as_deref())?;
        if a.json {
            print_mounted(&req.mountpoint)?;
        }
        Ok(())
    }
}

/// What `mount --json` prints: the new mount, as its daemon and the mount table give it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Mounted {
    mountpoint: PathBuf,
    backing: PathBuf,
    #[serde(default)]
    fstype: String,
    volume_id: String,
    pid: u32,
    format: u16,
    provider: String,
    key: String,
    aes_kernel: String,
    key_versions: Vec<u32>,
    current_key_version: Option<u32>,
    threads: usize,
    writeback_cache: bool,
}

fn print_mounted(mountpoint: &std::path::Path) -> Result<(), Failure> {
    let mp = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| daemon::absolute(mountpoint));
    let failed = |e: String| {
        Failure::new(
            exit::FAILURE,
            format!("mounted {}, but cannot report it: {e}", mp.display()),
        )
    };
    let reply = daemon::control::request_status(&daemon::control::socket_path(&mp))
        .map_err(|e| failed(e.to_string()))?;
    let mut m: Mounted = serde_json::from_value(reply).map_err(|e| failed(e.to_string()))?;
    m.fstype = daemon::find_mount(&mp)
        .map(|e| e.fstype)
        .unwrap_or_default();
    super::output::print("earfs.mount.v1", &m)
}
