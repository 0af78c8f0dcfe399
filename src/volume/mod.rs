//! The volume: `earfs.conf` and its keyring. Load, validate, authenticate and save
//! atomically (tmp → fsync → rename → fsync dir).

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::crypto::{
    Dek, Keyring, check_keyring_versions, derive_config_mac_key, hmac_sha256, verify_hmac_sha256,
};
use crate::kms::{KeyProvider, KmsError, ProviderSpec};

/// The names of the volume config and of its temporary at the backing root: `fs` states
/// the names reserved there (src/fs/reserved.rs).
pub use crate::fs::{CONFIG_NAME, CONFIG_TMP_NAME};
/// Cipher name stored in the config.
pub const CIPHER: &str = "aes-256-xts";
/// The file formats this build reads and writes; `format` in `earfs.conf` names the one
/// the volume writes new files in (docs/file-format.md).
pub const FORMATS: [u32; 2] = [1, 2];
/// The format of new volumes.
pub const NEW_VOLUME_FORMAT: u32 = 2;
/// Format of an exported keyring file.
const KEYRING_EXPORT_FORMAT: u32 = 1;
/// Sector size stored in the config.
pub const SECTOR_SIZE: u32 = 4096;

/// One wrapped data key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedKey {
    pub version: u32,
    /// Base64 of the provider's wrapped blob.
    pub wrapped: String,
}

/// The keyring as stored: wrapped DEKs by version, bound to `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredKeyring {
    pub id: String,
    pub current: u32,
    pub keys: Vec<WrappedKey>,
}

impl StoredKeyring {
    /// Check the keyring as stored: each version once, the current one among them. Both
    /// an `earfs.conf` and a keyring to join or import are refused without it.
    pub fn check(&self) -> Result<(), String> {
        check_keyring_versions(self.keys.iter().map(|k| k.version), self.current)
            .map_err(|e| e.to_string())
    }

    /// Whether key `version` is in the keyring.
    pub fn has(&self, version: u32) -> bool {
        self.keys.iter().any(|k| k.version == version)
    }
}

/// The contents of `earfs.conf`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub format: u32,
    pub volume_id: String,
    pub cipher: String,
    pub sector_size: u32,
    pub kms: ProviderSpec,
    pub keyring: StoredKeyring,
    /// HMAC-SHA256 (hex) over the canonical form of everything above, with a key
    /// derived from the current DEK.
    #[serde(default)]
    pub mac: String,
}

/// Errors of volume handling.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{0} is not an earfs volume (no {CONFIG_NAME}); create one with `earfs init`")]
    NotAVolume(PathBuf),
    #[error("{0} does not exist or is not a directory")]
    NoBackingDir(PathBuf),
    #[error("{0} is already an earfs volume")]
    AlreadyAVolume(PathBuf),
    #[error("{0} is not empty; `earfs init` needs an empty or new directory")]
    NotEmpty(PathBuf),
    #[error("{path}: invalid volume config: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("{0}: the volume config does not authenticate (it was changed, or the key is wrong)")]
    ConfigMac(PathBuf),
    #[error("{path}: not imported: {reason}")]
    ImportRefused { path: PathBuf, reason: String },
    #[error("{0}")]
    Kms(#[from] KmsError),
    /// A key version that cannot be retired: the current one, or one the keyring lacks.
    #[error("{path}: {reason}")]
    NotRetirable { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The path of the config in a backing directory.
pub fn config_path(backing: &Path) -> PathBuf {
    backing.join(CONFIG_NAME)
}

impl VolumeConfig {
    fn canonical_bytes(&self) -> Vec<u8> {
        let mut body = self.clone();
        body.mac.clear();
        // Serialising a struct of strings and integers cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }

    fn seal(&mut self, current: &Dek) {
        let tag = hmac_sha256(&derive_config_mac_key(current), &[&self.canonical_bytes()]);
        self.mac = hex::encode(tag);
    }

    fn verify(&self, current: &Dek) -> bool {
        let Ok(tag) = hex::decode(&self.mac) else {
            return false;
        };
        verify_hmac_sha256(
            &derive_config_mac_key(current),
            &[&self.canonical_bytes()],
            &tag,
        )
    }

    /// Read and validate the config of `backing` (no key needed).
    pub fn load(backing: &Path) -> Result<VolumeConfig, VolumeError> {
        if !backing.is_dir() {
            return Err(VolumeError::NoBackingDir(backing.to_path_buf()));
        }
        let path = config_path(backing);
        match fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(VolumeError::NotAVolume(backing.to_path_buf()))
            }
            _ => Self::load_file(&path),
        }
    }

    /// Read and validate a config file at any path (a volume's `earfs.conf`, or a copy
    /// of it elsewhere, as `earfs cat --conf FILE` takes); no key needed.
    pub fn load_file(path: &Path) -> Result<VolumeConfig, VolumeError> {
        let path = path.to_path_buf();
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        let bad = |reason: String| VolumeError::BadConfig {
            path: path.clone(),
            reason,
        };
        let cfg: VolumeConfig = toml::from_str(&text).map_err(|e| bad(e.message().to_string()))?;
        if !FORMATS.contains(&cfg.format) {
            return Err(bad(format!(
                "the volume is in format {}, which this earfs {} does not know (it knows formats {:?}); install the earfs that created the volume, or a newer one",
                cfg.format,
                env!("CARGO_PKG_VERSION"),
                FORMATS
            )));
        }
        if cfg.cipher != CIPHER {
            return Err(bad(format!("unsupported cipher {:?}", cfg.cipher)));
        }
        if cfg.sector_size != SECTOR_SIZE {
            return Err(bad(format!("unsupported sector size {}", cfg.sector_size)));
        }
        cfg.keyring.check().map_err(bad)?;
        Ok(cfg)
    }

    /// Unwrap every data key through `provider` and check the config's MAC: the
    /// volume's keyring, checked (the current version present, each version once).
    pub fn unlock(
        &self,
        backing: &Path,
        provider: &dyn KeyProvider,
    ) -> Result<Keyring, VolumeError> {
        self.unlock_file(&config_path(backing), provider)
    }

    /// [`Self::unlock`] for a config read with [`Self::load_file`] from `path` (which
    /// only names it in errors).
    pub fn unlock_file(
        &self,
        path: &Path,
        provider: &dyn KeyProvider,
    ) -> Result<Keyring, VolumeError> {
        let keys = unwrap_all(&self.keyring, provider, path)?;
        if !self.verify(keys.current().1) {
            return Err(VolumeError::ConfigMac(path.to_path_buf()));
        }
        Ok(keys)
    }

    /// The key this config is sealed with, from `keys` (this volume's, from
    /// [`Self::unlock`]): their current version must be this config's.
    fn sealing_key<'k>(&self, keys: &'k Keyring, path: PathBuf) -> Result<&'k Dek, VolumeError> {
        match keys.current() {
            (v, dek) if v == self.keyring.current => Ok(dek),
            _ => Err(VolumeError::ConfigMac(path)),
        }
    }

    /// Make the volume write `format` from now on (`earfs upgrade`): earfs.conf is
    /// rewritten atomically under a new MAC. Files keep the format their header names
    /// (docs/file-format.md). `keys` are the volume's keys from [`Self::unlock`].
    /// Returns whether anything changed; a volume is never moved to an older format.
    pub fn upgrade(
        &mut self,
        backing: &Path,
        keys: &Keyring,
        format: u32,
    ) -> Result<bool, VolumeError> {
        let path = config_path(backing);
        if !FORMATS.contains(&format) {
            return Err(VolumeError::BadConfig {
                path,
                reason: format!("unknown format {format} (known: {FORMATS:?})"),
            });
        }
        if format < self.format {
            return Err(VolumeError::BadConfig {
                path,
                reason: format!(
                    "the volume writes format {}; it is not moved back to format {format}",
                    self.format
                ),
            });
        }
        if format == self.format {
            return Ok(false);
        }
        let current = self.sealing_key(keys, path)?;
        let mut next = self.clone();
        next.format = format;
        next.seal(current);
        next.save(backing)?;
        *self = next;
        Ok(true)
    }

    /// Add a data key version made by `provider` and make it current (`earfs rotate`):
    /// earfs.conf is rewritten atomically, sealed with the new key. Older versions stay,
    /// so files written under them keep reading. `keys` are the volume's keys from
    /// [`Self::unlock`]; the new one is added to them, current. Returns the new version.
    pub fn rotate(
        &mut self,
        backing: &Path,
        provider: &dyn KeyProvider,
        keys: &mut Keyring,
    ) -> Result<u32, VolumeError> {
        let path = config_path(backing);
        self.sealing_key(keys, path.clone())?;
        let version = self
            .keyring
            .keys
            .iter()
            .map(|k| k.version)
            .max()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| VolumeError::BadConfig {
                path: path.clone(),
                reason: "no key version is left after u32::MAX".into(),
            })?;
        let (dek, wrapped) = generate_checked(provider, &self.keyring.id, &self.kms)?;
        let mut next_keys = keys.clone();
        next_keys
            .add_current(version, dek)
            .map_err(|e| VolumeError::BadConfig {
                path,
                reason: e.to_string(),
            })?;
        let mut next = self.clone();
        next.keyring.keys.push(WrappedKey {
            version,
            wrapped: B64.encode(&wrapped),
        });
        next.keyring.current = version;
        next.seal(next_keys.current().1);
        next.save(backing)?;
        *self = next;
        *keys = next_keys;
        Ok(version)
    }

    /// Wrap every data key again under `provider` (`earfs rewrap`): the volume's own
    /// key after a KMS-side rotation, or another key or provider, which `spec` records
    /// from now on. The keyring id, the data keys, their versions and the current
    /// version stay. Each new wrapping is unwrapped again through `provider` and must
    /// give back the same key before earfs.conf is rewritten (atomically, under a new
    /// MAC), so that the old key is not needed once this returns. `keys` are the
    /// volume's keys from [`Self::unlock`]. Returns how many keys were wrapped.
    pub fn rewrap(
        &mut self,
        backing: &Path,
        deks: &Keyring,
        spec: ProviderSpec,
        provider: &dyn KeyProvider,
        progress: &mut dyn FnMut(u32),
    ) -> Result<usize, VolumeError> {
        let path = config_path(backing);
        let id = &self.keyring.id;
        let mut keys = Vec::with_capacity(self.keyring.keys.len());
        for k in &self.keyring.keys {
            let dek = deks.dek(k.version).ok_or_else(|| VolumeError::BadConfig {
                path: path.clone(),
                reason: format!("key version {} was not unwrapped", k.version),
            })?;
            let wrapped = provider.wrap(dek, id)?;
            let back = provider.unwrap(&wrapped, id)?;
            if back.expose() != dek.expose() {
                return Err(VolumeError::Kms(KmsError::WrongKey(spec.key_reference())));
            }
            keys.push(WrappedKey {
                version: k.version,
                wrapped: B64.encode(&wrapped),
            });
            progress(k.version);
        }
        let current = self.sealing_key(deks, path)?;
        let mut next = self.clone();
        next.kms = spec;
        next.keyring.keys = keys;
        next.seal(current);
        next.save(backing)?;
        *self = next;
        Ok(self.keyring.keys.len())
    }

    /// Record other per-node settings of the same KMS key (`earfs config --set`): a
    /// moved key file, another endpoint, region, profile or credentials file.
    /// earfs.conf is rewritten atomically under a new MAC. `keys` are the volume's keys
    /// from [`Self::unlock`], unwrapped through `spec` (which proves that the settings
    /// work and that they reach the same key). The key itself cannot change this way.
    pub fn set_node_settings(
        &mut self,
        backing: &Path,
        keys: &Keyring,
        spec: ProviderSpec,
    ) -> Result<(), VolumeError> {
        let path = config_path(backing);
        if self.kms.name() != spec.name()
            || (!matches!(spec, ProviderSpec::Local { .. }) && !same_key(&self.kms, &spec))
        {
            return Err(VolumeError::BadConfig {
                path,
                reason: format!(
                    "{} is not {}: the key changes only with `earfs rewrap`",
                    spec.key_reference(),
                    self.kms.key_reference()
                ),
            });
        }
        let current = self.sealing_key(keys, path)?;
        let mut next = self.clone();
        next.kms = spec;
        next.seal(current);
        next.save(backing)?;
        *self = next;
        Ok(())
    }

    /// Whether key `version` may be retired as far as the keyring goes: not the current
    /// one, and one the keyring has (no key needed; [`Self::retire`] checks it again).
    pub fn check_retirable(&self, backing: &Path, version: u32) -> Result<(), VolumeError> {
        let refuse = |reason: String| VolumeError::NotRetirable {
            path: config_path(backing),
            reason,
        };
        if version == self.keyring.current {
            return Err(refuse(format!(
                "key version {version} is the current one; make a new one current first (`earfs rotate`), then retire {version} once no file uses it"
            )));
        }
        if !self.keyring.has(version) {
            let mut have: Vec<u32> = self.keyring.keys.iter().map(|k| k.version).collect();
            have.sort_unstable();
            return Err(refuse(format!(
                "the keyring has no key version {version} (it has {have:?})"
            )));
        }
        Ok(())
    }

    /// Drop data key `version` from the keyring (`earfs retire-key`): earfs.conf is
    /// rewritten atomically, sealed again with the current key, and `version` is removed
    /// from `keys` (the volume's keys from [`Self::unlock`]). Refused for the current
    /// version (rotate first) and for a version the keyring lacks; the file is then left
    /// as it was. Whether files still use `version` is the caller's to check (by their
    /// headers, and the open files of a running daemon) before it calls this: a file
    /// under a retired version can no longer be read.
    pub fn retire(
        &mut self,
        backing: &Path,
        keys: &mut Keyring,
        version: u32,
    ) -> Result<(), VolumeError> {
        let path = config_path(backing);
        self.check_retirable(backing, version)?;
        let current = self.sealing_key(keys, path.clone())?;
        let mut next_keys = keys.clone();
        next_keys
            .remove(version)
            .map_err(|e| VolumeError::NotRetirable {
                path,
                reason: e.to_string(),
            })?;
        let mut next = self.clone();
        next.keyring.keys.retain(|k| k.version != version);
        next.seal(current);
        next.save(backing)?;
        *self = next;
        *keys = next_keys;
        Ok(())
    }

    /// Merge a newer export of this volume's keyring (`earfs import-keyring`): another
    /// node rotated, retired a version or rewrapped the keys under another KMS key.
    ///
    /// Every key of `source` is unwrapped through `provider` (this node's access to the
    /// source's KMS key) and the source is authenticated with its current key; a version
    /// present on both sides must hold the same data key. `keys` are this volume's keys
    /// from [`Self::unlock`]. `files_per_version` counts this volume's files by the key
    /// version their header names: a version the source lacks may go only if no file
    /// uses it. The current version never goes backwards. `spec` is what to record when
    /// the source's KMS key differs from this volume's (when it is the same key this
    /// volume's recorded settings stay). The volume id, format and the rest stay.
    ///
    /// On success earfs.conf is rewritten atomically, sealed with the source's current
    /// key, and `keys` become the source's keys. Returns `None` when there was nothing
    /// to import (nothing is written).
    #[allow(clippy::too_many_arguments)]
    pub fn import(
        &mut self,
        backing: &Path,
        source_file: &Path,
        source: &JoinSource,
        spec: ProviderSpec,
        provider: &dyn KeyProvider,
        keys: &mut Keyring,
        files_per_version: &std::collections::BTreeMap<u32, u64>,
    ) -> Result<Option<Imported>, VolumeError> {
        let refuse = |reason: String| VolumeError::ImportRefused {
            path: source_file.to_path_buf(),
            reason,
        };
        self.check_import_id(source_file, source)?;
        let ring = source.keyring();
        let theirs = unwrap_all(ring, provider, source_file)?;
        let (_, current) = theirs.current();
        if !source.verify(current) {
            return Err(VolumeError::ConfigMac(source_file.to_path_buf()));
        }
        for (v, ours) in keys.iter() {
            if let Some(t) = theirs.dek(v)
                && t.expose() != ours.expose()
            {
                return Err(refuse(format!(
                    "its key version {v} is another data key than this volume's version {v}: it is not the same keyring"
                )));
            }
        }
        let dropped = self.check_import_versions(source_file, source, files_per_version)?;
        let spec = if same_key(source.kms(), &self.kms) {
            self.kms.clone()
        } else {
            spec
        };
        let sorted = |r: &StoredKeyring| {
            let mut r = r.clone();
            r.keys.sort_by_key(|k| k.version);
            r
        };
        if sorted(ring) == sorted(&self.keyring) && spec == self.kms {
            return Ok(None);
        }
        let added: Vec<u32> = ring
            .keys
            .iter()
            .map(|k| k.version)
            .filter(|v| !self.keyring.has(*v))
            .collect();
        let summary = Imported {
            from: self.keyring.current,
            to: ring.current,
            added,
            dropped,
            kms_changed: !same_key(&spec, &self.kms),
        };
        let mut next = self.clone();
        next.kms = spec;
        next.keyring = ring.clone();
        next.seal(current);
        next.save(backing)?;
        *self = next;
        *keys = theirs;
        Ok(Some(summary))
    }

    /// Refuse a keyring to import whose id is not this volume's (part of
    /// [`Self::import`]; callers may run it early, before asking the KMS anything).
    pub fn check_import_id(
        &self,
        source_file: &Path,
        source: &JoinSource,
    ) -> Result<(), VolumeError> {
        let ring = source.keyring();
        if ring.id != self.keyring.id {
            return Err(VolumeError::ImportRefused {
                path: source_file.to_path_buf(),
                reason: format!(
                    "it holds keyring {}, but this volume's keyring is {}; a volume imports only exports of its own keyring (a new node joins with `earfs init --join`)",
                    ring.id, self.keyring.id
                ),
            });
        }
        Ok(())
    }

    /// The versions of this volume that a keyring to import lacks; refused if the
    /// current version would go backwards or if `files_per_version` counts a file under
    /// a version it lacks (part of [`Self::import`]; callers may run it early).
    pub fn check_import_versions(
        &self,
        source_file: &Path,
        source: &JoinSource,
        files_per_version: &std::collections::BTreeMap<u32, u64>,
    ) -> Result<Vec<u32>, VolumeError> {
        let refuse = |reason: String| VolumeError::ImportRefused {
            path: source_file.to_path_buf(),
            reason,
        };
        let ring = source.keyring();
        let mut dropped: Vec<u32> = self
            .keyring
            .keys
            .iter()
            .map(|k| k.version)
            .filter(|v| !ring.has(*v))
            .collect();
        dropped.sort_unstable();
        if ring.current < self.keyring.current && !ring.has(self.keyring.current) {
            return Err(refuse(format!(
                "its current key version is {}, older than this volume's current version {}, which it lacks: it is an older export; export the keyring again from the node that rotated last",
                ring.current, self.keyring.current
            )));
        }
        let used: Vec<String> = dropped
            .iter()
            .filter_map(|v| {
                files_per_version
                    .get(v)
                    .filter(|n| **n > 0)
                    .map(|n| format!("{n} file(s) still use key version {v}"))
            })
            .collect();
        if !used.is_empty() {
            return Err(refuse(format!(
                "it lacks key version(s) {dropped:?} of this volume, and {}; those files would no longer read. Rewrite them under the current version first (`earfs keys` counts them), or import a keyring that keeps the version",
                used.join(", ")
            )));
        }
        Ok(dropped)
    }

    /// The current wrapped key, decoded.
    pub fn current_wrapped(&self, backing: &Path) -> Result<Vec<u8>, VolumeError> {
        let bad = |reason: String| VolumeError::BadConfig {
            path: config_path(backing),
            reason,
        };
        let k = self
            .keyring
            .keys
            .iter()
            .find(|k| k.version == self.keyring.current)
            .ok_or_else(|| {
                bad(format!(
                    "current key version {} is not in the keyring",
                    self.keyring.current
                ))
            })?;
        B64.decode(&k.wrapped)
            .map_err(|e| bad(format!("key version {}: {e}", k.version)))
    }

    /// Write the config atomically: tmp → fsync → rename → fsync(dir).
    pub fn save(&self, backing: &Path) -> Result<(), VolumeError> {
        let path = config_path(backing);
        let tmp = backing.join(CONFIG_TMP_NAME);
        let text = format!(
            "# earfs volume config. Authenticated: do not edit. See docs/file-format.md.\n{}",
            toml::to_string(self).map_err(|e| VolumeError::BadConfig {
                path: path.clone(),
                reason: e.to_string(),
            })?
        );
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        fs::File::open(backing)
            .and_then(|d| d.sync_all())
            .map_err(io(backing))?;
        Ok(())
    }
}

/// What [`VolumeConfig::import`] changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Imported {
    /// The current key version before and after.
    pub from: u32,
    pub to: u32,
    /// Versions this volume did not have.
    pub added: Vec<u32>,
    /// Versions this volume had and the import lacks (no file used them).
    pub dropped: Vec<u32>,
    /// Whether the keys are now wrapped by another KMS key.
    pub kms_changed: bool,
}

/// Whether two specs name the same KMS key (provider and key reference; the per-node
/// settings aside).
pub fn same_key(a: &ProviderSpec, b: &ProviderSpec) -> bool {
    a.name() == b.name() && a.key_reference() == b.key_reference()
}

/// Check that `backing` may become a new volume (missing, or an empty directory), before
/// anything is asked of the KMS.
pub fn check_new(backing: &Path) -> Result<(), VolumeError> {
    if config_path(backing).exists() {
        return Err(VolumeError::AlreadyAVolume(backing.to_path_buf()));
    }
    match fs::read_dir(backing) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Err(VolumeError::NotEmpty(backing.to_path_buf()));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(backing)(e)),
    }
}

/// Check again and create the directory if it is missing.
fn prepare_dir(backing: &Path) -> Result<(), VolumeError> {
    check_new(backing)?;
    fs::DirBuilder::new()
        .recursive(true)
        .create(backing)
        .map_err(io(backing))
}

/// Seal and save a new volume with a fresh volume id.
fn write_new(
    backing: &Path,
    spec: ProviderSpec,
    keyring: StoredKeyring,
    current: &Dek,
    format: u32,
) -> Result<VolumeConfig, VolumeError> {
    prepare_dir(backing)?;
    let mut cfg = VolumeConfig {
        format,
        volume_id: uuid::Uuid::new_v4().to_string(),
        cipher: CIPHER.to_string(),
        sector_size: SECTOR_SIZE,
        kms: spec,
        keyring,
        mac: String::new(),
    };
    cfg.seal(current);
    cfg.save(backing)?;
    Ok(cfg)
}

/// Create a new volume in `backing` (created if missing; must be empty otherwise)
/// with one data key made by `provider`, writing files in `format` (one of
/// [`FORMATS`]). Returns the saved config.
pub fn create(
    backing: &Path,
    spec: ProviderSpec,
    provider: &dyn KeyProvider,
    format: u32,
) -> Result<VolumeConfig, VolumeError> {
    check_new(backing)?;
    if !FORMATS.contains(&format) {
        return Err(VolumeError::BadConfig {
            path: config_path(backing),
            reason: format!("unknown format {format} (known: {FORMATS:?})"),
        });
    }
    let keyring_id = uuid::Uuid::new_v4().to_string();
    let (dek, wrapped) = generate_checked(provider, &keyring_id, &spec)?;
    let keyring = StoredKeyring {
        id: keyring_id,
        current: 1,
        keys: vec![WrappedKey {
            version: 1,
            wrapped: B64.encode(&wrapped),
        }],
    };
    write_new(backing, spec, keyring, &dek, format)
}

/// Kind marker of an exported keyring file.
pub const KEYRING_EXPORT_KIND: &str = "earfs-keyring";

/// A cluster's keyring as `earfs export-keyring` writes it: the provider, the wrapped
/// keys and a MAC keyed by the current data key. Holds no plaintext key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyringExport {
    pub kind: String,
    pub format: u32,
    /// The volume it was exported from (for the record; a joining node gets its own).
    pub exported_from: String,
    pub kms: ProviderSpec,
    pub keyring: StoredKeyring,
    #[serde(default)]
    pub mac: String,
}

impl KeyringExport {
    fn canonical_bytes(&self) -> Vec<u8> {
        let mut body = self.clone();
        body.mac.clear();
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// The export of an unlocked volume.
    pub fn of(cfg: &VolumeConfig, current: &Dek) -> KeyringExport {
        let mut e = KeyringExport {
            kind: KEYRING_EXPORT_KIND.to_string(),
            format: KEYRING_EXPORT_FORMAT,
            exported_from: cfg.volume_id.clone(),
            kms: cfg.kms.clone(),
            keyring: cfg.keyring.clone(),
            mac: String::new(),
        };
        let tag = hmac_sha256(&derive_config_mac_key(current), &[&e.canonical_bytes()]);
        e.mac = hex::encode(tag);
        e
    }

    /// The file text.
    pub fn to_text(&self) -> String {
        format!(
            "# earfs keyring export: wrapped data keys only, no plaintext key. Authenticated: do not edit.\n# Existing nodes of the cluster: earfs import-keyring THIS-FILE BACKING\n# A new node: earfs init --join THIS-FILE BACKING\n{}",
            toml::to_string(self).unwrap_or_default()
        )
    }
}

/// What `earfs init --join` reads: another volume's `earfs.conf`, or an exported keyring.
#[derive(Debug, Clone)]
pub enum JoinSource {
    Volume(VolumeConfig),
    Export(KeyringExport),
}

impl JoinSource {
    /// Read and parse a join file (no key needed yet).
    pub fn read(path: &Path) -> Result<JoinSource, VolumeError> {
        let text = fs::read_to_string(path).map_err(io(path))?;
        let bad = |reason: String| VolumeError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        let value: toml::Table = toml::from_str(&text).map_err(|e| bad(e.message().to_string()))?;
        let src = if value.get("kind").and_then(|k| k.as_str()) == Some(KEYRING_EXPORT_KIND) {
            let e: KeyringExport =
                toml::from_str(&text).map_err(|e| bad(e.message().to_string()))?;
            if e.format != KEYRING_EXPORT_FORMAT {
                return Err(bad(format!("unsupported format {}", e.format)));
            }
            JoinSource::Export(e)
        } else {
            let c: VolumeConfig = toml::from_str(&text).map_err(|e| {
                bad(format!(
                    "neither an earfs.conf nor an exported keyring: {}",
                    e.message()
                ))
            })?;
            JoinSource::Volume(c)
        };
        src.keyring().check().map_err(bad)?;
        Ok(src)
    }

    pub fn kms(&self) -> &ProviderSpec {
        match self {
            JoinSource::Volume(c) => &c.kms,
            JoinSource::Export(e) => &e.kms,
        }
    }

    pub fn keyring(&self) -> &StoredKeyring {
        match self {
            JoinSource::Volume(c) => &c.keyring,
            JoinSource::Export(e) => &e.keyring,
        }
    }

    fn verify(&self, current: &Dek) -> bool {
        match self {
            JoinSource::Volume(c) => c.verify(current),
            JoinSource::Export(e) => {
                let Ok(tag) = hex::decode(&e.mac) else {
                    return false;
                };
                verify_hmac_sha256(
                    &derive_config_mac_key(current),
                    &[&e.canonical_bytes()],
                    &tag,
                )
            }
        }
    }
}

/// A new data key bound to `keyring_id` and its wrapping, unwrapped once again to prove
/// the round trip before anything is written.
fn generate_checked(
    provider: &dyn KeyProvider,
    keyring_id: &str,
    spec: &ProviderSpec,
) -> Result<(Dek, Vec<u8>), VolumeError> {
    let (dek, wrapped) = provider.generate(keyring_id)?;
    let back = provider.unwrap(&wrapped, keyring_id)?;
    if back.expose() != dek.expose() {
        return Err(VolumeError::Kms(KmsError::WrongKey(spec.key_reference())));
    }
    Ok((dek, wrapped))
}

/// Unwrap every key of `keyring` through `provider` into the checked keyring (each
/// version once, the current one among them; refused as a bad config otherwise).
fn unwrap_all(
    keyring: &StoredKeyring,
    provider: &dyn KeyProvider,
    path: &Path,
) -> Result<Keyring, VolumeError> {
    let bad = |reason: String| VolumeError::BadConfig {
        path: path.to_path_buf(),
        reason,
    };
    keyring.check().map_err(bad)?;
    let mut deks = Vec::with_capacity(keyring.keys.len());
    for k in &keyring.keys {
        let blob = B64
            .decode(&k.wrapped)
            .map_err(|e| bad(format!("key version {}: {e}", k.version)))?;
        deks.push((k.version, provider.unwrap(&blob, &keyring.id)?));
    }
    Keyring::new(deks, keyring.current).map_err(|e| bad(e.to_string()))
}

/// Create a node's volume in `backing` with the keyring of `source` (`join_file`),
/// after unwrapping every key through `provider` and authenticating the source with
/// the current key. `spec` is this node's provider settings for the same key.
pub fn join(
    backing: &Path,
    join_file: &Path,
    source: &JoinSource,
    spec: ProviderSpec,
    provider: &dyn KeyProvider,
) -> Result<VolumeConfig, VolumeError> {
    check_new(backing)?;
    let ring = source.keyring();
    let keys = unwrap_all(ring, provider, join_file)?;
    let (_, current) = keys.current();
    if !source.verify(current) {
        return Err(VolumeError::ConfigMac(join_file.to_path_buf()));
    }
    write_new(backing, spec, ring.clone(), current, NEW_VOLUME_FORMAT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::{LocalProvider, create_key_file};

    /// A local key file in `dir`, its provider and spec.
    fn local_key(dir: &Path) -> (LocalProvider, ProviderSpec) {
        let key = dir.join("key");
        create_key_file(&key).unwrap();
        let prov = LocalProvider::open(&key).unwrap();
        (prov, ProviderSpec::Local { key_file: key })
    }

    #[test]
    fn create_load_unlock_and_tamper() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("key");
        create_key_file(&key).unwrap();
        let prov = LocalProvider::open(&key).unwrap();
        let spec = ProviderSpec::Local {
            key_file: key.clone(),
        };
        let backing = d.path().join("vol");
        let cfg = create(&backing, spec.clone(), &prov, NEW_VOLUME_FORMAT).unwrap();
        assert!(matches!(
            create(&backing, spec.clone(), &prov, NEW_VOLUME_FORMAT),
            Err(VolumeError::AlreadyAVolume(_))
        ));
        let loaded = VolumeConfig::load(&backing).unwrap();
        assert_eq!(loaded, cfg);
        assert_eq!(loaded.unlock(&backing, &prov).unwrap().len(), 1);
        // A changed field fails the MAC.
        let text = fs::read_to_string(config_path(&backing)).unwrap();
        let changed = text.replace(&cfg.volume_id, "00000000-0000-0000-0000-000000000000");
        fs::write(config_path(&backing), changed).unwrap();
        let loaded = VolumeConfig::load(&backing).unwrap();
        assert!(matches!(
            loaded.unlock(&backing, &prov),
            Err(VolumeError::ConfigMac(_))
        ));
        // A wrong key does not unwrap.
        let key2 = d.path().join("key2");
        create_key_file(&key2).unwrap();
        let prov2 = LocalProvider::open(&key2).unwrap();
        assert!(matches!(
            loaded.unlock(&backing, &prov2),
            Err(VolumeError::Kms(KmsError::WrongKey(_)))
        ));
        // Not a volume / not empty.
        let other = d.path().join("other");
        fs::create_dir(&other).unwrap();
        assert!(matches!(
            VolumeConfig::load(&other),
            Err(VolumeError::NotAVolume(_))
        ));
        fs::write(other.join("x"), b"x").unwrap();
        assert!(matches!(
            create(&other, spec, &prov, NEW_VOLUME_FORMAT),
            Err(VolumeError::NotEmpty(_))
        ));
    }

    #[test]
    fn a_stored_keyring_with_a_version_twice_or_without_its_current_one_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let (prov, spec) = local_key(d.path());
        let b = d.path().join("v");
        create(&b, spec, &prov, NEW_VOLUME_FORMAT).unwrap();
        let text = fs::read_to_string(config_path(&b)).unwrap();
        let good: VolumeConfig = toml::from_str(&text).unwrap();
        let mut twice = good.clone();
        twice.keyring.keys.push(twice.keyring.keys[0].clone());
        let mut absent = good.clone();
        absent.keyring.current = 2;
        for (cfg, want) in [
            (
                &twice,
                "key version 1 appears more than once in the keyring",
            ),
            (&absent, "current key version 2 is not in the keyring"),
        ] {
            cfg.save(&b).unwrap();
            let e = VolumeConfig::load(&b).unwrap_err();
            assert!(matches!(e, VolumeError::BadConfig { .. }), "{e}");
            assert!(e.to_string().contains(want), "{e}");
            // The same as a file to join or import.
            let e = JoinSource::read(&config_path(&b)).unwrap_err();
            assert!(matches!(e, VolumeError::BadConfig { .. }), "{e}");
            assert!(e.to_string().contains(want), "{e}");
            // And unlocked as it is, before the KMS is asked.
            let e = cfg.unlock(&b, &prov).unwrap_err();
            assert!(matches!(e, VolumeError::BadConfig { .. }), "{e}");
        }
    }

    #[test]
    fn join_by_config_or_export_keeps_the_keyring_and_checks_the_mac() {
        let d = tempfile::tempdir().unwrap();
        let (prov, spec) = local_key(d.path());
        let first = d.path().join("first");
        let cfg = create(&first, spec.clone(), &prov, NEW_VOLUME_FORMAT).unwrap();
        let deks = cfg.unlock(&first, &prov).unwrap();
        let export = d.path().join("ring.toml");
        let text = KeyringExport::of(&cfg, deks.dek(1).unwrap()).to_text();
        fs::write(&export, &text).unwrap();
        for (n, file) in [(2, config_path(&first)), (3, export.clone())] {
            let src = JoinSource::read(&file).unwrap();
            let b = d.path().join(format!("node{n}"));
            let joined = join(&b, &file, &src, spec.clone(), &prov).unwrap();
            assert_eq!(joined.keyring, cfg.keyring);
            assert_ne!(joined.volume_id, cfg.volume_id);
            assert_eq!(
                VolumeConfig::load(&b)
                    .unwrap()
                    .unlock(&b, &prov)
                    .unwrap()
                    .len(),
                1
            );
        }
        // An altered export does not authenticate and writes nothing.
        fs::write(&export, text.replace(&cfg.volume_id, "someone-else")).unwrap();
        let src = JoinSource::read(&export).unwrap();
        let b = d.path().join("node4");
        assert!(matches!(
            join(&b, &export, &src, spec, &prov),
            Err(VolumeError::ConfigMac(_))
        ));
        assert!(!b.exists());
        // Neither a config nor an export.
        fs::write(&export, "kind = \"something\"\n").unwrap();
        assert!(matches!(
            JoinSource::read(&export),
            Err(VolumeError::BadConfig { .. })
        ));
    }

    #[test]
    fn upgrade_rewrites_the_format_under_a_new_mac_and_never_goes_back() {
        let d = tempfile::tempdir().unwrap();
        let (prov, spec) = local_key(d.path());
        let b = d.path().join("v");
        let mut cfg = create(&b, spec, &prov, 1).unwrap();
        let deks = cfg.unlock(&b, &prov).unwrap();
        let before = fs::read_to_string(config_path(&b)).unwrap();
        assert!(cfg.upgrade(&b, &deks, 2).unwrap());
        let after = VolumeConfig::load(&b).unwrap();
        assert_eq!(after.format, 2);
        assert_eq!(after, cfg);
        assert_ne!(fs::read_to_string(config_path(&b)).unwrap(), before);
        // The new config authenticates; the old MAC would not.
        after.unlock(&b, &prov).unwrap();
        let mut forged = after.clone();
        forged.format = 1;
        forged.save(&b).unwrap();
        assert!(matches!(
            VolumeConfig::load(&b).unwrap().unlock(&b, &prov),
            Err(VolumeError::ConfigMac(_))
        ));
        cfg.save(&b).unwrap();
        // Again: nothing to do. Back, or to an unknown format: refused, file unchanged.
        assert!(!cfg.upgrade(&b, &deks, 2).unwrap());
        let text = fs::read_to_string(config_path(&b)).unwrap();
        for to in [1, 3] {
            let e = cfg.upgrade(&b, &deks, to).unwrap_err();
            assert!(matches!(e, VolumeError::BadConfig { .. }), "{e}");
        }
        assert_eq!(fs::read_to_string(config_path(&b)).unwrap(), text);
        assert!(!b.join(CONFIG_TMP_NAME).exists());
    }

    #[test]
    fn rewrap_moves_every_version_to_the_new_key_and_keeps_the_data_keys() {
        let d = tempfile::tempdir().unwrap();
        let (old, old_spec) = local_key(d.path());
        let b = d.path().join("v");
        let mut cfg = create(&b, old_spec.clone(), &old, NEW_VOLUME_FORMAT).unwrap();
        let mut deks = cfg.unlock(&b, &old).unwrap();
        cfg.rotate(&b, &old, &mut deks).unwrap();
        let before = cfg.clone();
        let newdir = d.path().join("new");
        fs::create_dir(&newdir).unwrap();
        let (new, new_spec) = local_key(&newdir);
        let mut seen = Vec::new();
        let n = cfg
            .rewrap(&b, &deks, new_spec.clone(), &new, &mut |v| seen.push(v))
            .unwrap();
        assert_eq!((n, seen), (2, vec![1, 2]));
        let back = VolumeConfig::load(&b).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(back.kms, new_spec);
        assert_eq!(back.keyring.id, before.keyring.id);
        assert_eq!(back.keyring.current, 2);
        assert_eq!(back.volume_id, before.volume_id);
        assert_ne!(back.keyring.keys, before.keyring.keys);
        // The same data keys, now only under the new key.
        let again = back.unlock(&b, &new).unwrap();
        for ((v, a), (w, k)) in again.iter().zip(deks.iter()) {
            assert_eq!((v, a.expose()), (w, k.expose()));
        }
        assert!(matches!(
            back.unlock(&b, &old),
            Err(VolumeError::Kms(KmsError::WrongKey(_)))
        ));
        // A key that does not give back what it wrapped changes nothing.
        let text = fs::read_to_string(config_path(&b)).unwrap();
        let liar = Liar(new);
        let e = cfg
            .clone()
            .rewrap(&b, &deks, old_spec, &liar, &mut |_| {})
            .unwrap_err();
        assert!(matches!(e, VolumeError::Kms(KmsError::WrongKey(_))), "{e}");
        assert_eq!(fs::read_to_string(config_path(&b)).unwrap(), text);
    }

    /// A provider whose unwrap returns another key than the one wrapped.
    struct Liar(LocalProvider);

    impl KeyProvider for Liar {
        fn validate(&self) -> Result<crate::kms::KeyDescription, KmsError> {
            self.0.validate()
        }
        fn generate(&self, id: &str) -> Result<(Dek, Vec<u8>), KmsError> {
            self.0.generate(id)
        }
        fn wrap(&self, dek: &Dek, id: &str) -> Result<Vec<u8>, KmsError> {
            self.0.wrap(dek, id)
        }
        fn unwrap(&self, _: &[u8], _: &str) -> Result<Dek, KmsError> {
            Ok(Dek::generate()?)
        }
        fn check_key(&self) -> Result<(), KmsError> {
            Ok(())
        }
        fn check(&self, id: &str, w: Option<&[u8]>) -> Vec<crate::kms::PermissionCheck> {
            self.0.check(id, w)
        }
    }

    #[test]
    fn rotate_adds_a_current_version_sealed_with_it_and_keeps_the_old_ones() {
        let d = tempfile::tempdir().unwrap();
        let (prov, spec) = local_key(d.path());
        let b = d.path().join("v");
        let mut cfg = create(&b, spec, &prov, NEW_VOLUME_FORMAT).unwrap();
        let mut deks = cfg.unlock(&b, &prov).unwrap();
        let first = deks.dek(1).unwrap().expose().to_vec();
        assert_eq!(cfg.rotate(&b, &prov, &mut deks).unwrap(), 2);
        assert_eq!(cfg.rotate(&b, &prov, &mut deks).unwrap(), 3);
        let back = VolumeConfig::load(&b).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(back.keyring.current, 3);
        let again = back.unlock(&b, &prov).unwrap();
        assert_eq!(again.versions(), [1, 2, 3]);
        assert_eq!(again.dek(1).unwrap().expose().as_slice(), first.as_slice());
        assert_ne!(
            again.dek(3).unwrap().expose(),
            again.dek(2).unwrap().expose()
        );
        for ((v, a), (w, b)) in again.iter().zip(deks.iter()) {
            assert_eq!((v, a.expose()), (w, b.expose()));
        }
        // Sealed with version 3: with version 3's wrapping swapped for version 1's, it no
        // longer authenticates.
        let mut forged = back.clone();
        forged.keyring.keys[2].wrapped = forged.keyring.keys[0].wrapped.clone();
        assert!(matches!(
            forged.unlock(&b, &prov),
            Err(VolumeError::ConfigMac(_))
        ));
    }

    #[test]
    fn retire_drops_a_version_reseals_and_refuses_the_current_or_an_absent_one() {
        let d = tempfile::tempdir().unwrap();
        let (prov, spec) = local_key(d.path());
        let b = d.path().join("v");
        let mut cfg = create(&b, spec, &prov, NEW_VOLUME_FORMAT).unwrap();
        let mut deks = cfg.unlock(&b, &prov).unwrap();
        cfg.rotate(&b, &prov, &mut deks).unwrap();
        cfg.rotate(&b, &prov, &mut deks).unwrap();
        let v3 = deks.dek(3).unwrap().expose().to_vec();

        // The current version and an absent one: refused, earfs.conf unchanged.
        let text = fs::read_to_string(config_path(&b)).unwrap();
        for v in [3, 4, 0] {
            let e = cfg.retire(&b, &mut deks, v).unwrap_err();
            assert!(matches!(e, VolumeError::NotRetirable { .. }), "{e}");
            if v == 3 {
                assert!(e.to_string().contains("earfs rotate"), "{e}");
            }
        }
        assert_eq!(fs::read_to_string(config_path(&b)).unwrap(), text);
        assert_eq!(deks.len(), 3);

        cfg.retire(&b, &mut deks, 1).unwrap();
        let back = VolumeConfig::load(&b).unwrap();
        assert_eq!(back, cfg);
        let versions: Vec<u32> = back.keyring.keys.iter().map(|k| k.version).collect();
        assert_eq!(versions, [2, 3]);
        assert_eq!(back.keyring.current, 3);
        assert_eq!(deks.versions(), [2, 3]);
        let again = back.unlock(&b, &prov).unwrap();
        assert_eq!(again.versions(), [2, 3]);
        assert_eq!(again.dek(3).unwrap().expose().as_slice(), v3.as_slice());
        assert!(!b.join(CONFIG_TMP_NAME).exists());
        // Retired: a second time it is absent.
        assert!(matches!(
            cfg.retire(&b, &mut deks, 1),
            Err(VolumeError::NotRetirable { .. })
        ));
        // Resealed: the old text no longer matches the MAC once version 1 is put back
        // by hand (and the old file, with its old MAC, still names version 1).
        let mut forged = back.clone();
        forged.keyring.keys.insert(
            0,
            WrappedKey {
                version: 1,
                wrapped: forged.keyring.keys[0].wrapped.clone(),
            },
        );
        forged.save(&b).unwrap();
        assert!(matches!(
            VolumeConfig::load(&b).unwrap().unlock(&b, &prov),
            Err(VolumeError::ConfigMac(_))
        ));
        // The config from before the retirement still authenticates on its own (it is
        // a whole older config), which is why retire-key is only for keys no file uses.
        fs::write(config_path(&b), &text).unwrap();
        assert_eq!(
            VolumeConfig::load(&b)
                .unwrap()
                .unlock(&b, &prov)
                .unwrap()
                .len(),
            3
        );
    }

    /// Node 1 (`first`) and node 2 joined to its keyring, and a writer of exports of a
    /// volume.
    struct Cluster {
        d: tempfile::TempDir,
        prov: LocalProvider,
        spec: ProviderSpec,
        first: PathBuf,
        second: PathBuf,
    }

    impl Cluster {
        fn new(first_format: u32) -> Cluster {
            let d = tempfile::tempdir().unwrap();
            let (prov, spec) = local_key(d.path());
            let first = d.path().join("first");
            create(&first, spec.clone(), &prov, first_format).unwrap();
            let second = d.path().join("second");
            let src = JoinSource::read(&config_path(&first)).unwrap();
            join(&second, &config_path(&first), &src, spec.clone(), &prov).unwrap();
            Cluster {
                d,
                prov,
                spec,
                first,
                second,
            }
        }
        /// Rotate `b` `n` times.
        fn rotate(&self, b: &Path, n: usize) {
            let mut cfg = VolumeConfig::load(b).unwrap();
            let mut deks = cfg.unlock(b, &self.prov).unwrap();
            for _ in 0..n {
                cfg.rotate(b, &self.prov, &mut deks).unwrap();
            }
        }
        /// Export `cfg` (whose keys `prov` unwraps) to a file named `name`.
        fn export_of(&self, cfg: &VolumeConfig, name: &str) -> PathBuf {
            let deks = unwrap_all(&cfg.keyring, &self.prov, Path::new(name)).unwrap();
            let (_, current) = deks.current();
            let p = self.d.path().join(name);
            fs::write(&p, KeyringExport::of(cfg, current).to_text()).unwrap();
            p
        }
        fn export(&self, b: &Path, name: &str) -> PathBuf {
            self.export_of(&VolumeConfig::load(b).unwrap(), name)
        }
        /// Import `file` into `b` with this cluster's key and `files` per version.
        fn import(
            &self,
            b: &Path,
            file: &Path,
            files: &[(u32, u64)],
        ) -> Result<Option<Imported>, VolumeError> {
            let mut cfg = VolumeConfig::load(b).unwrap();
            let mut deks = cfg.unlock(b, &self.prov).unwrap();
            let src = JoinSource::read(file)?;
            let files = files.iter().copied().collect();
            let spec = src.kms().clone();
            let out = cfg.import(b, file, &src, spec, &self.prov, &mut deks, &files)?;
            if out.is_some() {
                let back = VolumeConfig::load(b).unwrap();
                assert_eq!(back, cfg);
                let again = back.unlock(b, &self.prov).unwrap();
                for ((v, a), (w, x)) in again.iter().zip(deks.iter()) {
                    assert_eq!((v, a.expose()), (w, x.expose()));
                }
            }
            Ok(out)
        }
    }

    #[test]
    fn import_adds_versions_keeps_volume_id_and_format_and_a_second_import_does_nothing() {
        let c = Cluster::new(1);
        c.rotate(&c.first, 2);
        let before = VolumeConfig::load(&c.second).unwrap();
        assert_eq!(before.format, NEW_VOLUME_FORMAT);
        let export = c.export(&c.first, "ring.toml");
        let out = c.import(&c.second, &export, &[(1, 5)]).unwrap().unwrap();
        assert_eq!(
            out,
            Imported {
                from: 1,
                to: 3,
                added: vec![2, 3],
                dropped: vec![],
                kms_changed: false
            }
        );
        let after = VolumeConfig::load(&c.second).unwrap();
        let first = VolumeConfig::load(&c.first).unwrap();
        assert_eq!(after.keyring, first.keyring);
        assert_eq!(after.volume_id, before.volume_id);
        assert_ne!(after.volume_id, first.volume_id);
        assert_eq!((after.format, first.format), (NEW_VOLUME_FORMAT, 1));
        assert_eq!(after.kms, before.kms);
        // Both nodes hold the same data keys under each version now.
        let (a, b) = (
            after.unlock(&c.second, &c.prov).unwrap(),
            first.unlock(&c.first, &c.prov).unwrap(),
        );
        assert_eq!(a.len(), 3);
        for ((v, x), (w, y)) in a.iter().zip(b.iter()) {
            assert_eq!((v, x.expose()), (w, y.expose()));
        }
        // Again, by export or by node 1's earfs.conf: nothing to do, nothing written.
        let text = fs::read(config_path(&c.second)).unwrap();
        assert_eq!(c.import(&c.second, &export, &[]).unwrap(), None);
        assert_eq!(
            c.import(&c.second, &config_path(&c.first), &[]).unwrap(),
            None
        );
        assert_eq!(fs::read(config_path(&c.second)).unwrap(), text);
    }

    #[test]
    fn import_refuses_another_keyring_an_altered_file_and_other_data_keys() {
        let c = Cluster::new(NEW_VOLUME_FORMAT);
        let conf = config_path(&c.second);
        let text = fs::read(&conf).unwrap();
        // Another keyring.
        let other = c.d.path().join("other");
        create(&other, c.spec.clone(), &c.prov, NEW_VOLUME_FORMAT).unwrap();
        let e = c
            .import(&c.second, &c.export(&other, "other.toml"), &[])
            .unwrap_err();
        assert!(matches!(e, VolumeError::ImportRefused { .. }), "{e}");
        assert!(e.to_string().contains("keyring"), "{e}");
        // An altered export does not authenticate.
        c.rotate(&c.first, 1);
        let export = c.export(&c.first, "ring.toml");
        let good = fs::read_to_string(&export).unwrap();
        let from = VolumeConfig::load(&c.first).unwrap().volume_id;
        fs::write(&export, good.replace(&from, "someone-else")).unwrap();
        let e = c.import(&c.second, &export, &[]).unwrap_err();
        assert!(matches!(e, VolumeError::ConfigMac(_)), "{e}");
        assert_eq!(fs::read(&conf).unwrap(), text);
        // Node 2 rotated on its own: its version 2 is another data key than node 1's.
        c.rotate(&c.second, 1);
        let text = fs::read(&conf).unwrap();
        fs::write(&export, &good).unwrap();
        let e = c.import(&c.second, &export, &[]).unwrap_err();
        assert!(matches!(e, VolumeError::ImportRefused { .. }), "{e}");
        assert!(e.to_string().contains("another data key"), "{e}");
        assert_eq!(fs::read(&conf).unwrap(), text);
        assert!(!c.second.join(CONFIG_TMP_NAME).exists());
    }

    #[test]
    fn import_drops_a_version_only_if_no_file_uses_it_and_never_goes_back() {
        let c = Cluster::new(NEW_VOLUME_FORMAT);
        c.rotate(&c.first, 1);
        let old = c.export(&c.first, "old.toml");
        c.import(&c.second, &old, &[]).unwrap().unwrap();
        c.rotate(&c.first, 1);
        // Node 1 retires version 1 (as `earfs retire-key` will): an export without it.
        let mut retired = VolumeConfig::load(&c.first).unwrap();
        retired.keyring.keys.retain(|k| k.version != 1);
        let retired = c.export_of(&retired, "retired.toml");
        let conf = config_path(&c.second);
        let text = fs::read(&conf).unwrap();
        let e = c
            .import(&c.second, &retired, &[(1, 3), (2, 1)])
            .unwrap_err();
        assert!(matches!(e, VolumeError::ImportRefused { .. }), "{e}");
        assert!(
            e.to_string().contains("3 file(s) still use key version 1"),
            "{e}"
        );
        assert_eq!(fs::read(&conf).unwrap(), text);
        let out = c
            .import(&c.second, &retired, &[(1, 0), (2, 4)])
            .unwrap()
            .unwrap();
        assert_eq!((out.from, out.to), (2, 3));
        assert_eq!((out.added, out.dropped), (vec![3], vec![1]));
        // The older export (current 2, without 3) would move the current version back.
        let text = fs::read(&conf).unwrap();
        let e = c.import(&c.second, &old, &[]).unwrap_err();
        assert!(matches!(e, VolumeError::ImportRefused { .. }), "{e}");
        assert!(e.to_string().contains("older export"), "{e}");
        assert_eq!(fs::read(&conf).unwrap(), text);
    }

    #[test]
    fn import_takes_the_spec_of_another_kms_key() {
        let c = Cluster::new(NEW_VOLUME_FORMAT);
        // The same key under another name: as after a rewrap to another key, the
        // import's key reference differs, so its spec is taken.
        let moved = c.d.path().join("moved-key");
        let ProviderSpec::Local { key_file } = &c.spec else {
            unreachable!()
        };
        fs::copy(key_file, &moved).unwrap();
        let mut cfg = VolumeConfig::load(&c.first).unwrap();
        let deks = cfg.unlock(&c.first, &c.prov).unwrap();
        cfg.kms = ProviderSpec::Local {
            key_file: moved.clone(),
        };
        cfg.seal(deks.dek(1).unwrap());
        cfg.save(&c.first).unwrap();
        let export = c.export(&c.first, "moved.toml");
        let out = c.import(&c.second, &export, &[]).unwrap().unwrap();
        assert!(out.kms_changed);
        assert_eq!((out.from, out.to), (1, 1));
        assert_eq!(
            VolumeConfig::load(&c.second).unwrap().kms,
            ProviderSpec::Local { key_file: moved }
        );
        assert_eq!(c.import(&c.second, &export, &[]).unwrap(), None);
    }
}
