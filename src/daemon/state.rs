//! The running daemon's shared state: the volume, the KMS provider, the CMK recheck
//! and its revocation policy, SIGHUP reloads, and the status snapshot that
//! `earfs status` and the metrics endpoint show.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::config::{FileConfig, RevocationPolicy};
use super::notify;
use crate::content::{FileFormat, Keyring};
use crate::fs::stats::{OpSnapshot, errno_name, stats};
use crate::fs::{EarFs, OpenKeyUse};
use crate::fuse::CacheInvalidator;
use crate::kms::{KeyProvider, KmsError, KmsOverrides, ProviderSpec, Retry};
use crate::volume::{NEW_VOLUME_FORMAT, VolumeConfig};

/// Settings that a SIGHUP may change.
#[derive(Debug, Clone)]
pub struct Reloadable {
    pub recheck_interval: Option<Duration>,
    pub policy: RevocationPolicy,
    pub log_level: log::LevelFilter,
    pub kms_overrides: KmsOverrides,
    pub kms_retry: Retry,
}

/// The outcome of the last CMK check.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRecord {
    /// Unix time of the check.
    pub at: u64,
    pub ok: bool,
    /// "ok", or the KMS's reason.
    pub result: String,
    /// Whether a failure was definitive (revocation) rather than transient.
    pub definitive: bool,
}

/// The revocation state.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Revocation {
    /// "ok", "locked" (keys wiped, I/O fails with EIO) or "warning" (policy warn).
    pub state: &'static str,
    /// Why, while not ok.
    pub reason: Option<String>,
    /// Unix time since when.
    pub since: Option<u64>,
}

/// The KMS side of the running volume: its config and an open provider.
struct Kms {
    cfg: VolumeConfig,
    provider: Box<dyn KeyProvider>,
}

/// State shared by the daemon's threads.
pub struct Shared {
    pub fs: Arc<EarFs>,
    /// Drops the kernel's cached plaintext when the keys are locked.
    cache: Option<CacheInvalidator>,
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub volume_id: String,
    pub threads: usize,
    pub writeback_cache: bool,
    pub config_file: Option<PathBuf>,
    started: SystemTime,
    started_mono: Instant,
    /// Held across KMS calls (rechecks, reloads): status never takes it.
    kms: Mutex<Kms>,
    /// Provider name and key reference, for status without waiting on `kms`.
    key_info: Mutex<(&'static str, String)>,
    settings: Mutex<Reloadable>,
    last_check: Mutex<Option<CheckRecord>>,
    last_success: Mutex<Option<u64>>,
    revocation: Mutex<Revocation>,
    /// Wakes the recheck thread early (reload, stop).
    wake: (Mutex<u64>, Condvar),
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a recheck failure means the customer revoked the key (apply the policy)
/// rather than a passing fault (keep serving, warn).
pub fn is_revocation(e: &KmsError) -> bool {
    matches!(
        e,
        KmsError::AccessDenied { .. }
            | KmsError::KeyUnusable { .. }
            | KmsError::InvalidCiphertext { .. }
            | KmsError::WrongKey(_)
    )
}

/// What the daemon was started with, for [`Shared::new`].
pub struct Started {
    pub fs: Arc<EarFs>,
    pub cache: Option<CacheInvalidator>,
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub threads: usize,
    pub writeback_cache: bool,
    pub config_file: Option<PathBuf>,
    pub cfg: VolumeConfig,
    pub provider: Box<dyn KeyProvider>,
    pub settings: Reloadable,
}

impl Shared {
    pub fn new(s: Started) -> Arc<Shared> {
        let started = SystemTime::now();
        Arc::new(Shared {
            fs: s.fs,
            cache: s.cache,
            backing: s.backing,
            mountpoint: s.mountpoint,
            volume_id: s.cfg.volume_id.clone(),
            threads: s.threads,
            writeback_cache: s.writeback_cache,
            config_file: s.config_file,
            started,
            started_mono: Instant::now(),
            key_info: Mutex::new((s.cfg.kms.name(), s.cfg.kms.key_id())),
            kms: Mutex::new(Kms {
                cfg: s.cfg,
                provider: s.provider,
            }),
            settings: Mutex::new(s.settings),
            last_check: Mutex::new(Some(CheckRecord {
                at: now_unix(),
                ok: true,
                result: "ok (unwrapped at start)".into(),
                definitive: false,
            })),
            last_success: Mutex::new(Some(now_unix())),
            revocation: Mutex::new(Revocation {
                state: "ok",
                ..Revocation::default()
            }),
            wake: (Mutex::new(0), Condvar::new()),
        })
    }

    pub fn settings(&self) -> Reloadable {
        lock(&self.settings).clone()
    }

    /// Wake the recheck thread (its interval may have changed, or we stop).
    pub fn wake(&self) {
        let (m, c) = &self.wake;
        *lock(m) += 1;
        c.notify_all();
    }

    /// Sleep up to `d`, or until woken; whether woken.
    fn sleep(&self, d: Duration) -> bool {
        let (m, c) = &self.wake;
        let g = lock(m);
        let seen = *g;
        let (g, _) = c
            .wait_timeout_while(g, d, |n| *n == seen)
            .unwrap_or_else(|p| p.into_inner());
        *g != seen
    }

    /// One CMK check: the key's state, then an unwrap of every data key. On success
    /// the keys are (re)installed if they were locked; on a revocation the policy
    /// applies; a transient failure only warns.
    pub fn recheck(&self) {
        let settings = self.settings();
        // The key's state first, then an unwrap of every data key (which also proves
        // earfs.conf is unchanged).
        let outcome: Result<Keyring, Option<KmsError>> = {
            let k = lock(&self.kms);
            match k.provider.check_key() {
                Err(e) => Err(Some(e)),
                Ok(()) => match k.cfg.unlock(&self.backing, k.provider.as_ref()) {
                    Ok(deks) => Ok(deks),
                    Err(crate::volume::VolumeError::Kms(e)) => Err(Some(e)),
                    Err(other) => {
                        log::error!("CMK check: {other}");
                        Err(None)
                    }
                },
            }
        };
        match outcome {
            Ok(keys) => {
                let was = lock(&self.revocation).state;
                if was == "locked" {
                    self.fs.set_keys(keys);
                    log::warn!(
                        "CMK check: the key unwraps again; data keys restored, file I/O resumes"
                    );
                } else if was == "warning" {
                    log::warn!("CMK check: the key is usable again");
                }
                *lock(&self.revocation) = Revocation {
                    state: "ok",
                    ..Revocation::default()
                };
                self.record(true, "ok".into(), false);
                *lock(&self.last_success) = Some(now_unix());
            }
            Err(None) => self.record(false, "the volume config cannot be read".into(), false),
            Err(Some(e)) if !is_revocation(&e) => {
                log::warn!("CMK check failed, still serving: {e}");
                self.record(false, e.to_string(), false);
            }
            Err(Some(e)) => {
                let reason = e.to_string();
                self.record(false, reason.clone(), true);
                let mut r = lock(&self.revocation);
                let state = match settings.policy {
                    RevocationPolicy::Lock => "locked",
                    RevocationPolicy::Warn => "warning",
                };
                if r.state != state {
                    match settings.policy {
                        RevocationPolicy::Lock => {
                            let files = self.fs.lock_keys();
                            if let Some(c) = &self.cache {
                                c.invalidate(&files);
                            }
                            log::error!(
                                "CMK revoked: {reason}; the data keys are wiped from memory and file I/O fails with EIO until a check unwraps the key again (policy lock)"
                            );
                            notify::status(&format!("LOCKED: CMK revoked: {reason}"));
                        }
                        RevocationPolicy::Warn => {
                            log::error!("CMK revoked: {reason}; still serving (policy warn)");
                            notify::status(&format!("WARNING: CMK revoked: {reason}"));
                        }
                    }
                    *r = Revocation {
                        state,
                        reason: Some(reason),
                        since: Some(now_unix()),
                    };
                }
            }
        }
    }

    fn record(&self, ok: bool, result: String, definitive: bool) {
        *lock(&self.last_check) = Some(CheckRecord {
            at: now_unix(),
            ok,
            result,
            definitive,
        });
    }

    /// The recheck loop; returns when `stop` says so.
    pub fn recheck_loop(&self, stop: &dyn Fn() -> bool) {
        loop {
            let interval = self.settings().recheck_interval;
            let woken = match interval {
                Some(d) => self.sleep(d),
                None => self.sleep(Duration::from_secs(3600)),
            };
            if stop() {
                return;
            }
            if woken || interval.is_none() {
                continue;
            }
            self.recheck();
        }
    }

    /// `earfs upgrade` through the control socket: make the volume write the newest
    /// format; every file created or truncated to zero from now on is in that format.
    /// Returns the formats before and after.
    pub fn upgrade(&self) -> Result<(u32, u32), String> {
        self.change("upgrade", None, |cfg, _, deks, backing| {
            let from = cfg.format;
            cfg.upgrade(backing, deks, NEW_VOLUME_FORMAT)?;
            Ok((from, cfg.format))
        })
    }

    /// `earfs rotate` through the control socket: a new data key version, current at
    /// once (new files and files truncated to zero use it); older versions keep
    /// reading. Returns the current version before and after.
    pub fn rotate(&self) -> Result<(u32, u32), String> {
        self.change("rotate", None, |cfg, provider, deks, backing| {
            let from = cfg.keyring.current;
            let to = cfg.rotate(backing, provider, deks)?;
            Ok((from, to))
        })
    }

    /// `earfs rewrap` through the control socket: wrap every data key again under
    /// `spec` (another key or provider) or, without one, under the volume's own key.
    /// The daemon uses the new key from then on (its periodic CMK check included).
    /// Returns the key references before and after and how many keys were wrapped.
    pub fn rewrap(&self, spec: Option<ProviderSpec>) -> Result<Rewrapped, String> {
        let replace = match &spec {
            Some(s) => {
                s.validate().map_err(|e| e.to_string())?;
                let p = s
                    .open(self.settings().kms_retry)
                    .map_err(|e| e.to_string())?;
                p.validate().map_err(|e| e.to_string())?;
                Some(p)
            }
            None => None,
        };
        self.change("rewrap", replace, |cfg, provider, deks, backing| {
            let from = cfg.kms.key_reference();
            let to = spec.unwrap_or_else(|| cfg.kms.clone());
            let keys = cfg.rewrap(backing, deks, to, provider, &mut |_| {})?;
            Ok(Rewrapped {
                from,
                to: cfg.kms.key_reference(),
                keys,
            })
        })
    }

    /// The key versions of the files this daemon holds open (`open-files` on the
    /// control socket), with those unlinked while open apart: `earfs retire-key` adds
    /// these to its census of the backing directory, which cannot see them.
    pub fn open_key_use(&self) -> OpenKeyUse {
        self.fs.open_key_use()
    }

    /// `earfs retire-key` through the control socket: drop key `version` from the
    /// keyring once no file uses it. The caller counted the backing directory first
    /// (by headers) and found none, starting when the rename count was `moves`; here,
    /// under the KMS lock that serialises every change of earfs.conf, the daemon checks
    /// its own open files, then rewrites earfs.conf and installs the keyring without
    /// `version`. Returns (the retired version, the current one).
    ///
    /// Why no file of `version` can appear between those checks and the switch: new
    /// files, and files truncated to zero, only ever get the current version, which is
    /// never `version`; no write gives a file an older version. So the number of files
    /// under `version` can only go down once the census has started. Two things could
    /// still hide one from the census, and both are checked here: a file unlinked while
    /// open has no name (counted from the open files, which include inodes the kernel
    /// still holds after their last name went), and a rename or link during the census
    /// can move a file from a directory not read yet into one already read (the mount
    /// counts renames and links, and the request is refused if `moves` changed; the
    /// command counts again). Backing files copied in from outside the mount (a restore
    /// into the backing directory) are not seen by any of this: retire a version only
    /// once no backup of the volume needs it either.
    pub fn retire(&self, version: u32, moves: Option<u64>) -> Result<(u32, u32), RetireError> {
        let mut refused = None;
        let r = self.change("retire", None, |cfg, _, deks, backing| {
            let refuse = |reason: String| crate::volume::VolumeError::NotRetirable {
                path: crate::volume::config_path(backing),
                reason,
            };
            if let Some(m) = moves
                && m != self.fs.moves()
            {
                refused = Some(RetireError::Moved);
                return Err(refuse(
                    "files were renamed or linked in the mount while they were counted; count again".into(),
                ));
            }
            let open = self.fs.open_key_use();
            let (named, unlinked) = open.of(version);
            if named + unlinked > 0 || open.unreadable > 0 {
                let msg = format!(
                    "{} files open in the running daemon still use key version {version} ({named} with a name, {unlinked} open and unlinked){}",
                    named + unlinked,
                    if open.unreadable > 0 {
                        format!(
                            ", and {} open files have a header that cannot be read",
                            open.unreadable
                        )
                    } else {
                        String::new()
                    }
                );
                refused = Some(RetireError::InUse {
                    named,
                    unlinked,
                    unreadable: open.unreadable,
                    message: msg.clone(),
                });
                return Err(refuse(msg));
            }
            cfg.retire(backing, deks, version)?;
            Ok((version, cfg.keyring.current))
        });
        r.map_err(|e| refused.take().unwrap_or(RetireError::Failed(e)))
    }

    /// `earfs import-keyring FILE` through the control socket: merge a newer export of
    /// the volume's keyring (read from `file`, an absolute path) and switch to it at once.
    /// The caller (the CLI) has counted the files per key version from their headers
    /// and refused an import that drops a version some file uses; the daemon refuses
    /// to drop the version it writes new files under (a file may have been created
    /// under it since that count). When the keys are now wrapped by another KMS key,
    /// the daemon opens it (with its per-node `[kms]` overrides when the provider is
    /// the same aws or gcp and they apply, else with the settings the import recorded) and uses
    /// it from then on, for the CMK recheck too. Returns `None` if nothing changed.
    pub fn import_keyring(
        &self,
        file: &std::path::Path,
    ) -> Result<Option<crate::volume::Imported>, super::Failure> {
        let source = crate::volume::JoinSource::read(file)?;
        let mut k = lock(&self.kms);
        let mut cfg = VolumeConfig::load(&self.backing)?;
        let mut deks = cfg.unlock(&self.backing, k.provider.as_ref())?;
        let ring = source.keyring();
        let running = cfg.keyring.current;
        if ring.id == cfg.keyring.id && !ring.has(running) {
            return Err(super::Failure::new(
                super::exit::BAD_CONFIG,
                format!(
                    "{}: not imported: it lacks key version {running}, which this mount writes new files under; unmount the volume and import it then (the file count is exact only while nothing writes)",
                    file.display()
                ),
            ));
        }
        let settings = self.settings();
        let new_provider = if crate::volume::same_key(source.kms(), &cfg.kms) {
            None
        } else {
            let spec = source.kms();
            // The per-node overrides are for this provider's credentials; a local key
            // file override names the old key, so it does not carry over.
            let node = if spec.name() == cfg.kms.name()
                && !matches!(spec, crate::kms::ProviderSpec::Local { .. })
            {
                spec.with_overrides(&settings.kms_overrides)
                    .unwrap_or_else(|_| spec.clone())
            } else {
                spec.clone()
            };
            Some(node.open(settings.kms_retry)?)
        };
        let provider = new_provider.as_deref().unwrap_or(k.provider.as_ref());
        let out = cfg.import(
            &self.backing,
            file,
            &source,
            source.kms().clone(),
            provider,
            &mut deks,
            &std::collections::BTreeMap::new(),
        )?;
        let Some(imported) = out else {
            return Ok(None);
        };
        self.install(&cfg, deks)
            .map_err(|e| super::Failure::new(super::exit::FAILURE, e))?;
        log::info!(
            "import-keyring: volume {} imported keyring {} from {}: key versions {:?} (current {}, was {}), wrapped by {} ({})",
            cfg.volume_id,
            cfg.keyring.id,
            file.display(),
            cfg.keyring
                .keys
                .iter()
                .map(|k| k.version)
                .collect::<Vec<_>>(),
            imported.to,
            imported.from,
            cfg.kms.name(),
            cfg.kms.key_reference()
        );
        k.cfg = cfg;
        if let Some(p) = new_provider {
            k.provider = p;
        }
        drop(k);
        self.record(true, "ok (import-keyring)".into(), false);
        Ok(Some(imported))
    }

    /// Change `earfs.conf` with `f` (which saves it) under the KMS lock, with the keys
    /// unwrapped through the KMS and the MAC checked first, then install the result:
    /// keys, current version and write format switch at once, as at a reload. `f` is
    /// given `replace` when there is one (a rewrap to another key), which then becomes
    /// the daemon's provider; otherwise the daemon's own.
    fn change<T>(
        &self,
        what: &str,
        replace: Option<Box<dyn KeyProvider>>,
        f: impl FnOnce(
            &mut VolumeConfig,
            &dyn KeyProvider,
            &mut Keyring,
            &std::path::Path,
        ) -> Result<T, crate::volume::VolumeError>,
    ) -> Result<T, String> {
        let mut k = lock(&self.kms);
        let mut cfg = VolumeConfig::load(&self.backing).map_err(|e| e.to_string())?;
        let mut deks = cfg
            .unlock(&self.backing, k.provider.as_ref())
            .map_err(|e| e.to_string())?;
        let provider = replace.as_deref().unwrap_or(k.provider.as_ref());
        let out = f(&mut cfg, provider, &mut deks, &self.backing).map_err(|e| e.to_string())?;
        self.install(&cfg, deks)?;
        if let Some(p) = replace {
            k.provider = p;
        }
        log::info!(
            "{what}: volume {} writes format {}, key versions {:?} (current {})",
            cfg.volume_id,
            cfg.format,
            cfg.keyring
                .keys
                .iter()
                .map(|k| k.version)
                .collect::<Vec<_>>(),
            cfg.keyring.current
        );
        k.cfg = cfg;
        drop(k);
        self.record(true, format!("ok ({what})"), false);
        Ok(out)
    }

    /// Install keys unwrapped from `cfg` and its write format, and clear a revocation
    /// (the KMS just unwrapped every key).
    fn install(&self, cfg: &VolumeConfig, keys: Keyring) -> Result<(), String> {
        let format = FileFormat::from_number(u64::from(cfg.format))
            .ok_or_else(|| format!("unknown volume format {}", cfg.format))?;
        self.fs.set_write_format(format);
        self.fs.set_keys(keys);
        *lock(&self.key_info) = (cfg.kms.name(), cfg.kms.key_id());
        *lock(&self.revocation) = Revocation {
            state: "ok",
            ..Revocation::default()
        };
        *lock(&self.last_success) = Some(now_unix());
        Ok(())
    }

    /// SIGHUP: read the config file again (reloadable keys), then `earfs.conf`, unwrap
    /// its keyring through the KMS and install it.
    pub fn reload(&self) -> Result<(), String> {
        if let Some(path) = &self.config_file {
            let f = FileConfig::load(path).map_err(|f| f.message)?;
            let mut s = lock(&self.settings);
            if let Some(i) = f.recheck_interval {
                s.recheck_interval = i;
            }
            if let Some(p) = f.revocation_policy {
                s.policy = p;
            }
            if let Some(l) = f.log_level {
                // --log-level, -v and -q stay over the file's level.
                s.log_level = super::logging::effective_level(Some(l.filter()));
                log::set_max_level(s.log_level);
            }
            // A key file given on the command line (`--key-file`) stays: the config file
            // has no such setting.
            s.kms_overrides = crate::kms::KmsOverrides {
                key_file: s.kms_overrides.key_file.take(),
                ..f.kms.clone()
            };
            if let Some(d) = f.kms_deadline {
                s.kms_retry = Retry::with_deadline(d);
            }
            for (key, changed) in [
                (
                    "backing",
                    f.backing.as_ref().is_some_and(|b| *b != self.backing),
                ),
                (
                    "mountpoint",
                    f.mountpoint.as_ref().is_some_and(|m| *m != self.mountpoint),
                ),
                ("threads", f.threads.is_some_and(|t| t != self.threads)),
            ] {
                if changed {
                    log::warn!(
                        "reload: {key} changed in {}; it takes effect at the next start",
                        path.display()
                    );
                }
            }
        }
        let settings = self.settings();
        let cfg = VolumeConfig::load(&self.backing).map_err(|e| e.to_string())?;
        let spec = cfg
            .kms
            .with_overrides(&settings.kms_overrides)
            .map_err(|e| e.to_string())?;
        let provider = spec.open(settings.kms_retry).map_err(|e| e.to_string())?;
        let keys = cfg
            .unlock(&self.backing, provider.as_ref())
            .map_err(|e| e.to_string())?;
        let versions = keys.versions();
        self.install(&cfg, keys)?;
        *lock(&self.kms) = Kms { cfg, provider };
        self.record(true, "ok (reloaded)".into(), false);
        self.wake();
        log::info!("reloaded: key versions {versions:?}");
        Ok(())
    }

    /// What `earfs status` shows.
    pub fn status(&self) -> Status {
        let (provider, key) = lock(&self.key_info).clone();
        let settings = self.settings();
        let (versions, current) = match self.fs.key_versions() {
            Some((v, c)) => (v, Some(c)),
            None => (Vec::new(), None),
        };
        let st = stats();
        Status {
            mountpoint: self.mountpoint.clone(),
            backing: self.backing.clone(),
            volume_id: self.volume_id.clone(),
            format: self.fs.write_format().number(),
            pid: std::process::id(),
            provider,
            aes_kernel: crate::crypto::implementation(),
            key,
            key_versions: versions,
            current_key_version: current,
            current_key_version_since: current.map(|_| {
                let since = self.fs.current_key_changed().unwrap_or(self.started);
                since
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            }),
            keys_locked: self.fs.keys_locked(),
            started: self
                .started
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            uptime_seconds: self.started_mono.elapsed().as_secs(),
            threads: self.threads,
            writeback_cache: self.writeback_cache,
            recheck_interval_seconds: settings.recheck_interval.map(|d| d.as_secs()),
            revocation_policy: settings.policy.name(),
            revocation: lock(&self.revocation).clone(),
            last_cmk_check: lock(&self.last_check).clone(),
            last_cmk_success: *lock(&self.last_success),
            ops: st.ops().into_iter().filter(|o| o.count > 0).collect(),
            errors_by_errno: st
                .errors_by_errno()
                .into_iter()
                .map(|(e, n)| (errno_name(e), n))
                .collect(),
            bytes_encrypted: st.bytes_encrypted(),
            bytes_decrypted: st.bytes_decrypted(),
        }
    }
}

/// What a rewrap did.
#[derive(Debug, Clone, Serialize)]
pub struct Rewrapped {
    /// The key that wrapped the data keys before.
    pub from: String,
    /// The key that wraps them now.
    pub to: String,
    /// How many data key versions were wrapped again.
    pub keys: usize,
}

/// Why a running daemon did not retire a key version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetireError {
    /// Files it holds open use the version.
    InUse {
        named: u64,
        unlinked: u64,
        unreadable: u64,
        message: String,
    },
    /// Files were renamed or linked while the caller counted them.
    Moved,
    /// Anything else (the KMS, earfs.conf, the current or an absent version).
    Failed(String),
}

/// The status of a running daemon.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub mountpoint: PathBuf,
    pub backing: PathBuf,
    pub volume_id: String,
    /// The format new files are written in.
    pub format: u16,
    pub pid: u32,
    /// `local`, `aws` or `gcp`.
    pub provider: &'static str,
    /// The local key file's path, the key ARN or the key resource.
    /// (`key` and `provider` are named as in every JSON output: docs/json.md.)
    pub key: String,
    /// The AES kernel the daemon encrypts with.
    pub aes_kernel: &'static str,
    pub key_versions: Vec<u32>,
    pub current_key_version: Option<u32>,
    /// Unix time since when the current key version is current: the daemon's start, or
    /// the rotate or reload that changed it (None while locked).
    pub current_key_version_since: Option<u64>,
    pub keys_locked: bool,
    pub started: u64,
    pub uptime_seconds: u64,
    pub threads: usize,
    pub writeback_cache: bool,
    pub recheck_interval_seconds: Option<u64>,
    pub revocation_policy: &'static str,
    pub revocation: Revocation,
    pub last_cmk_check: Option<CheckRecord>,
    pub last_cmk_success: Option<u64>,
    pub ops: Vec<OpSnapshot>,
    pub errors_by_errno: std::collections::BTreeMap<String, u64>,
    pub bytes_encrypted: u64,
    pub bytes_decrypted: u64,
}
