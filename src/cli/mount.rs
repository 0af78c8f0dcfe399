//! `earfs mount`: flags, the config file, and how they combine (flags win).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::default_threads;
use crate::daemon::config::{FileConfig, parse_duration, parse_interval, parse_metrics_address};
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
    /// Let other users (e.g. the database user) use the mount; the kernel checks permissions.
    #[arg(long)]
    pub allow_other: bool,
    /// FUSE request threads [default: cores, 2 to 8].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Let the kernel cache writes (FUSE writeback cache); off by default.
    #[arg(long)]
    pub writeback_cache: bool,
    /// Mount options, comma-separated (ro, noatime, nosuid, noexec, …), like mount -o.
    #[arg(short = 'o', value_delimiter = ',')]
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
    options.extend(a.options.iter().filter(|o| !o.is_empty()).cloned());
    if options.iter().any(|o| o == "allow_other") {
        return Err(usage("use --allow-other instead of -o allow_other"));
    }
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
        writeback_cache: a.writeback_cache || file.writeback_cache.unwrap_or(false),
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

/// `earfs mount`.
pub fn run(a: MountArgs) -> Result<(), Failure> {
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
        daemon::spawn_background(a.log_file.as_deref())
    }
}
