//! The threads beside the FUSE session: the CMK recheck, systemd's watchdog, and the
//! signals (SIGTERM/SIGINT unmount, SIGHUP reloads).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::mountpoint::{holders, unmount};
use super::{exit, logging, notify, state};

/// Check the CMK again every recheck interval (docs/kms.md, docs/operations.md).
pub(super) fn spawn_recheck(shared: Arc<state::Shared>, running: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("earfs-recheck".into())
        .spawn(move || shared.recheck_loop(&|| !running.load(Ordering::SeqCst)));
    if spawned.is_err() {
        log::warn!("cannot start the CMK recheck thread");
    }
}

/// Ping systemd's watchdog at half its interval, while a request through the mount is
/// answered: a hung daemon stops pinging and systemd restarts it.
pub(super) fn spawn_watchdog(mountpoint: PathBuf, running: Arc<AtomicBool>) {
    let Some(interval) = notify::watchdog_interval() else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("earfs-watchdog".into())
        .spawn(move || {
            while running.load(Ordering::SeqCst) {
                if rustix::fs::statfs(&mountpoint).is_ok() && running.load(Ordering::SeqCst) {
                    notify::notify("WATCHDOG=1");
                }
                std::thread::sleep(interval / 2);
            }
        });
    if spawned.is_err() {
        log::warn!("cannot start the watchdog thread");
    }
}

/// SIGTERM / SIGINT unmount (retried while busy, naming who holds the mount, until the
/// stop timeout; then the daemon exits with code 23 and leaves the mount erroring).
/// SIGHUP reloads the config file and the keyring.
pub(super) fn take_signals() -> Option<signal_hook::iterator::Signals> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("cannot install signal handlers ({e}); stop the daemon with `earfs umount`");
            None
        }
    }
}

pub(super) fn watch_signals(
    signals: Option<signal_hook::iterator::Signals>,
    shared: Arc<state::Shared>,
    stop_timeout: Duration,
) {
    use signal_hook::consts::SIGHUP;
    let Some(mut signals) = signals else {
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("earfs-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    logging::reopen_on_hup();
                    notify::notify(&format!(
                        "RELOADING=1\nMONOTONIC_USEC={}",
                        notify::monotonic_usec()
                    ));
                    match shared.reload() {
                        Ok(()) => notify::notify("READY=1\nSTATUS=reloaded"),
                        Err(e) => {
                            log::error!("reload failed, still serving with the old keys: {e}");
                            notify::notify(&format!("READY=1\nSTATUS=reload failed: {e}"));
                        }
                    }
                    continue;
                }
                let mp = shared.mountpoint.clone();
                notify::notify("STOPPING=1");
                log::info!("signal {sig}: unmounting {}", mp.display());
                stop(&mp, stop_timeout);
            }
        });
    if spawned.is_err() {
        log::warn!("cannot start the signal thread");
    }
}

/// Unmount, retrying while busy until `timeout`.
fn stop(mp: &Path, timeout: Duration) {
    let start = Instant::now();
    let mut last_report: Option<Instant> = None;
    loop {
        match unmount(mp) {
            Ok(()) => return,
            Err(f) if f.code == exit::BUSY => {
                if last_report.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                    let who = holders(mp);
                    let msg = if who.is_empty() {
                        format!("{} is busy; retrying", mp.display())
                    } else {
                        format!(
                            "{} is busy, held by {}; retrying",
                            mp.display(),
                            who.join(", ")
                        )
                    };
                    log::warn!("{msg}");
                    notify::status(&format!("stopping: {msg}"));
                    last_report = Some(Instant::now());
                }
                if start.elapsed() >= timeout {
                    log::error!(
                        "{} is still busy after {}; exiting without unmounting: the mount now fails with ENOTCONN until `earfs umount {}`",
                        mp.display(),
                        humantime::format_duration(timeout),
                        mp.display()
                    );
                    std::process::exit(i32::from(exit::BUSY));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(f) => {
                log::error!("{f}");
                return;
            }
        }
    }
}
