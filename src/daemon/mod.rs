//! The daemon: startup order (volume → key → checks → mount → ready). The background
//! launcher (`background`), mountpoint chores (`mountpoint`), process hardening
//! (`hardening`) and the signal, recheck and watchdog threads (`signals`) are beside it.

mod background;
pub mod config;
pub mod control;
pub mod exit;
mod failure;
mod hardening;
pub mod logging;
mod metrics;
mod mountinfo;
pub mod mountopts;
mod mountpoint;
pub mod notify;
mod signals;
mod state;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::content::FileFormat;
use crate::fs::EarFs;
use crate::fuse::{AdapterOptions, EarFuse, MountConfig};
use crate::kms::{KmsOverrides, Retry};

use crate::volume::{VolumeConfig, VolumeError};
pub use config::RevocationPolicy;

use background::Ready;
pub use background::{READY_FD_ENV, spawn_background};
pub use failure::Failure;
use hardening::prepare_process;
pub use hardening::protect_key_material;
pub use mountinfo::{MountEntry, find_mount, mounted_from, source_of};
use mountpoint::lock_volume;
pub use mountpoint::{check_mountpoint, holders, try_lock_volume, unmount, wait_unlocked};
use signals::{spawn_recheck, spawn_watchdog, take_signals, watch_signals};

/// What `earfs mount` was asked for.
#[derive(Debug, Clone)]
pub struct MountRequest {
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    pub threads: usize,
    pub writeback_cache: bool,
    pub options: Vec<String>,
    /// Bounds of the KMS unwrap at start (retries of transient failures included).
    pub kms_retry: Retry,
    /// Per-node KMS settings over those in `earfs.conf`.
    pub kms_overrides: KmsOverrides,
    /// How often the CMK is checked again while mounted; `None`: never.
    pub recheck_interval: Option<Duration>,
    pub revocation_policy: RevocationPolicy,
    /// The Prometheus endpoint (loopback), if any.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// How long SIGTERM waits for a busy mount before giving up.
    pub stop_timeout: Duration,
    pub log_level: log::LevelFilter,
    /// The config file, read again on SIGHUP.
    pub config_file: Option<PathBuf>,
}

/// systemd's credential for the KMS (`LoadCredential=kms:FILE`), if present.
pub fn systemd_kms_credential() -> Option<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    let p = PathBuf::from(dir).join("kms");
    p.exists().then_some(p)
}

/// `p` made absolute against the current directory (without resolving links).
pub fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Run the daemon in this process until the volume is unmounted.
pub fn serve(req: &MountRequest) -> Result<(), Failure> {
    let mut ready = Ready::from_env();
    if ready.detached() {
        let _ = rustix::process::setsid();
    }
    match serve_inner(req, &mut ready) {
        Ok(()) => Ok(()),
        Err(f) => {
            ready.fail(&f);
            Err(f)
        }
    }
}

/// Complete the in-place rewrites an interrupted `earfs reencrypt` left (a byte copy;
/// see `fs::rewrite`), before anything reads the files they touched.
fn finish_rewrites(backing: &Path) -> Result<(), Failure> {
    let done = crate::fs::rewrite::finish_pending(backing).map_err(|e| {
        Failure::new(
            exit::FAILURE,
            format!(
                "{}: cannot finish the file rewrites an interrupted reencrypt left: {e}",
                backing.display()
            ),
        )
    })?;
    for p in &done.completed {
        log::warn!("finished the interrupted rewrite of {}", p.display());
    }
    if done.dir_times_restored {
        log::info!("gave the directories back the times an interrupted reencrypt had changed");
    }
    if done.rolled_back > 0 {
        log::info!(
            "removed {} unfinished rewrite(s) of an interrupted reencrypt",
            done.rolled_back
        );
    }
    Ok(())
}

fn serve_inner(req: &MountRequest, ready: &mut Ready) -> Result<(), Failure> {
    prepare_process();
    // Take the signals before anything is mounted: a SIGTERM that arrives while we
    // start is then handled (unmount) as soon as the mount is up, instead of killing
    // the daemon and leaving a dead mount.
    let signals = take_signals();
    log::set_max_level(req.log_level);
    let backing = std::fs::canonicalize(&req.backing)
        .map_err(|_| Failure::from(VolumeError::NoBackingDir(req.backing.clone())))?;
    let cfg = VolumeConfig::load(&backing)?;
    let mountpoint = check_mountpoint(&req.mountpoint)?;
    logging::set_context(&cfg.volume_id, &mountpoint);
    if ready.detached() {
        // A background daemon keeps no directory of the caller busy.
        let _ = std::env::set_current_dir("/");
    }
    let _lock = lock_volume(&backing)?;
    finish_rewrites(&backing)?;
    let metrics_listener = match req.metrics_address {
        Some(addr) => Some(metrics::bind(addr).map_err(|e| {
            Failure::new(
                exit::CONFIG_FILE,
                format!("cannot listen for metrics on {addr}: {e}"),
            )
        })?),
        None => None,
    };
    let spec = cfg.kms.with_overrides(&req.kms_overrides)?;
    let what = format!(
        "unwrapping the data keys of volume {} through {} ({}); KMS deadline {:?}",
        cfg.volume_id,
        spec.name(),
        spec.key_reference(),
        req.kms_retry.deadline
    );
    log::info!("{what}");
    notify::status(&what);
    let provider = spec.open(req.kms_retry)?;
    let keys = cfg.unlock(&backing, provider.as_ref())?;
    let format = FileFormat::from_number(u64::from(cfg.format)).ok_or_else(|| {
        Failure::new(
            exit::BAD_CONFIG,
            format!("unknown volume format {}", cfg.format),
        )
    })?;
    let fs =
        Arc::new(EarFs::new(&backing, keys, format).map_err(|e| {
            Failure::new(exit::NOT_A_VOLUME, format!("{}: {e}", backing.display()))
        })?);
    let mcfg = MountConfig {
        fsname: source_of(&backing),
        allow_other: req.allow_other,
        threads: req.threads,
        options: req.options.clone(),
    };
    let adapter = EarFuse::new(
        fs.clone(),
        AdapterOptions {
            writeback_cache: req.writeback_cache,
        },
    );
    let session = crate::fuse::mount(adapter, &mountpoint, &mcfg).map_err(|e| {
        Failure::new(
            exit::FUSE_FAILED,
            format!("cannot mount FUSE at {}: {e} (is the fuse module loaded and /dev/fuse usable? --allow-other as non-root needs user_allow_other in /etc/fuse.conf)", mountpoint.display()),
        )
    })?;
    let cache = crate::fuse::CacheInvalidator::of(&session);
    let running = Arc::new(AtomicBool::new(true));
    let worker = {
        let running = running.clone();
        std::thread::Builder::new()
            .name("earfs-session".into())
            .spawn(move || {
                let r = session.run();
                running.store(false, Ordering::SeqCst);
                r
            })
            .map_err(|e| Failure::new(exit::FAILURE, format!("cannot start threads: {e}")))?
    };
    // Ready only once a request has been served through the mount.
    std::fs::metadata(&mountpoint).map_err(|e| {
        Failure::new(
            exit::FUSE_FAILED,
            format!("mount at {} does not answer: {e}", mountpoint.display()),
        )
    })?;
    let shared = state::Shared::new(state::Started {
        fs,
        cache: Some(cache),
        backing: backing.clone(),
        mountpoint: mountpoint.clone(),
        threads: req.threads,
        writeback_cache: req.writeback_cache,
        config_file: req.config_file.clone(),
        cfg: cfg.clone(),
        provider,
        settings: state::Reloadable {
            recheck_interval: req.recheck_interval,
            policy: req.revocation_policy,
            log_level: req.log_level,
            kms_overrides: req.kms_overrides.clone(),
            kms_retry: req.kms_retry,
        },
    });
    let socket = match control::serve(shared.clone()) {
        Ok(p) => Some(p),
        Err(e) => {
            log::warn!(
                "no control socket in {} ({e}): `earfs status` will not reach this daemon",
                control::runtime_dir().display()
            );
            None
        }
    };
    if let Some(l) = metrics_listener {
        match metrics::serve(shared.clone(), l) {
            Ok(a) => log::info!("metrics at http://{a}/metrics"),
            Err(e) => log::warn!("no metrics endpoint: {e}"),
        }
    }
    spawn_recheck(shared.clone(), running.clone());
    spawn_watchdog(mountpoint.clone(), running.clone());
    let serving = format!(
        "serving volume {} from {} at {} ({} threads, cipher {}, writeback cache {}, CMK recheck {})",
        cfg.volume_id,
        backing.display(),
        mountpoint.display(),
        req.threads,
        crate::crypto::implementation(),
        if req.writeback_cache { "on" } else { "off" },
        match req.recheck_interval {
            Some(d) => format!("every {}", humantime::format_duration(d)),
            None => "off".into(),
        }
    );
    log::info!("mounted: {serving}");
    ready.ok();
    notify::notify(&format!("READY=1\nSTATUS={serving}"));
    watch_signals(signals, shared.clone(), req.stop_timeout);
    let result = match worker.join() {
        Ok(Ok(())) => {
            log::info!("unmounted {}", mountpoint.display());
            Ok(())
        }
        Ok(Err(e)) => Err(Failure::new(
            exit::FAILURE,
            format!("FUSE session ended with an error: {e}"),
        )),
        Err(_) => Err(Failure::new(exit::FAILURE, "FUSE session thread panicked")),
    };
    shared.wake();
    if let Some(p) = socket {
        let _ = std::fs::remove_file(p);
    }
    result
}
