//! The `local` provider: a 32-byte key in a root-only file wraps DEKs with AES-256-GCM.
//!
//! Key file: 64 hex digits and a newline (a raw 32-byte file is accepted too), mode
//! 0600 or stricter. Wrapped DEK: 12-byte nonce ‖ ciphertext ‖ 16-byte tag, with the
//! keyring id as additional authenticated data.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

use super::{KeyDescription, KeyProvider, KmsError, PermissionCheck, Permissions, creds};
use crate::crypto::{Dek, random_bytes};

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;

/// An opened local key file.
pub struct LocalProvider {
    path: PathBuf,
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalProvider({})", self.path.display())
    }
}

fn io_err(path: &Path, source: std::io::Error) -> KmsError {
    if source.kind() == std::io::ErrorKind::NotFound {
        KmsError::KeyFileMissing(path.to_path_buf())
    } else {
        KmsError::KeyFileIo {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn parse_key(path: &Path, raw: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, KmsError> {
    let invalid = |reason: &str| KmsError::KeyFileInvalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if raw.len() == KEY_LEN {
        key.copy_from_slice(raw);
        return Ok(key);
    }
    let text = std::str::from_utf8(raw).map_err(|_| invalid("expected 64 hex digits"))?;
    hex::decode_to_slice(text.trim_end(), &mut key[..])
        .map_err(|_| invalid("expected 64 hex digits (32 bytes)"))?;
    Ok(key)
}

impl LocalProvider {
    /// Open a key file, refusing one that group or others can access.
    pub fn open(path: &Path) -> Result<Self, KmsError> {
        let meta = fs::metadata(path).map_err(|e| io_err(path, e))?;
        if let Some(mode) = creds::loose_mode(&meta) {
            return Err(KmsError::KeyFileInsecure {
                path: path.to_path_buf(),
                mode,
            });
        }
        if !meta.is_file() {
            return Err(KmsError::KeyFileInvalid {
                path: path.to_path_buf(),
                reason: "not a regular file".into(),
            });
        }
        let raw = Zeroizing::new(fs::read(path).map_err(|e| io_err(path, e))?);
        let key = parse_key(path, &raw)?;
        Ok(LocalProvider {
            path: path.to_path_buf(),
            cipher: Aes256Gcm::new((&*key).into()),
        })
    }

    fn wrong_key(&self) -> KmsError {
        KmsError::WrongKey(format!("key file {}", self.path.display()))
    }
}

/// What kms-check tries: the key file itself is the permission.
const PERMISSIONS: Permissions = Permissions(&[("key file", "wrap"), ("key file", "unwrap")]);

impl KeyProvider for LocalProvider {
    fn validate(&self) -> Result<KeyDescription, KmsError> {
        Ok(KeyDescription {
            key: format!("key file {}", self.path.display()),
            details: vec!["mode 0600 or stricter, 32-byte AES-256-GCM key".into()],
        })
    }

    fn generate(&self, keyring_id: &str) -> Result<(Dek, Vec<u8>), KmsError> {
        let dek = Dek::generate()?;
        let wrapped = self.wrap(&dek, keyring_id)?;
        Ok((dek, wrapped))
    }

    fn wrap(&self, dek: &Dek, keyring_id: &str) -> Result<Vec<u8>, KmsError> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: dek.expose(),
                    aad: keyring_id.as_bytes(),
                },
            )
            .map_err(|_| self.wrong_key())?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&ct);
        Ok(wrapped)
    }

    fn unwrap(&self, wrapped: &[u8], keyring_id: &str) -> Result<Dek, KmsError> {
        if wrapped.len() <= NONCE_LEN {
            return Err(self.wrong_key());
        }
        let (nonce, ct) = wrapped.split_at(NONCE_LEN);
        let pt = Zeroizing::new(
            self.cipher
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: ct,
                        aad: keyring_id.as_bytes(),
                    },
                )
                .map_err(|_| self.wrong_key())?,
        );
        Ok(Dek::from_slice(&pt)?)
    }

    fn check_key(&self) -> Result<(), KmsError> {
        // The key file is read again: a removed or loosened file counts.
        LocalProvider::open(&self.path).map(|_| ())
    }

    fn check(&self, keyring_id: &str, wrapped: Option<&[u8]>) -> Vec<PermissionCheck> {
        let generated = self.generate(keyring_id);
        let mut out = vec![PERMISSIONS.check("wrap", &generated, |_| {
            format!("{} is private and wraps", self.path.display())
        })];
        let unwrapped = match (wrapped, &generated) {
            (Some(w), _) => self
                .unwrap(w, keyring_id)
                .map(|_| "the volume's current data key"),
            (None, Ok((_, w))) => self.unwrap(w, keyring_id).map(|_| "a fresh data key"),
            (None, Err(e)) => Err(KmsError::WrongKey(e.to_string())),
        };
        out.push(PERMISSIONS.check("unwrap", &unwrapped, |what| format!("unwrapped {what}")));
        out
    }
}

/// Create a new random key file (mode 0600, parent directories 0700 if missing).
/// Fails if the file exists.
pub fn create_key_file(path: &Path) -> Result<(), KmsError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_err(dir, e))?;
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    random_bytes(&mut key[..])?;
    let text = Zeroizing::new(format!("{}\n", hex::encode(&key[..])));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| io_err(path, e))?;
    f.sync_all().map_err(|e| io_err(path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err(dir, e))?;
    }
    Ok(())
}

use std::os::unix::fs::DirBuilderExt;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn wrap_unwrap_and_binding() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/key");
        create_key_file(&p).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let prov = LocalProvider::open(&p).unwrap();
        let (dek, w) = prov.generate("ring-a").unwrap();
        assert_eq!(prov.unwrap(&w, "ring-a").unwrap().expose(), dek.expose());
        assert!(matches!(
            prov.unwrap(&w, "ring-b"),
            Err(KmsError::WrongKey(_))
        ));
        let p2 = d.path().join("key2");
        create_key_file(&p2).unwrap();
        let other = LocalProvider::open(&p2).unwrap();
        assert!(matches!(
            other.unwrap(&w, "ring-a"),
            Err(KmsError::WrongKey(_))
        ));
        assert!(create_key_file(&p).is_err());
    }

    #[test]
    fn check_reports_wrap_and_unwrap_of_the_key_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key");
        create_key_file(&p).unwrap();
        let prov = LocalProvider::open(&p).unwrap();
        let rows = |wrapped: Option<&[u8]>| {
            prov.check("ring", wrapped)
                .into_iter()
                .map(|c| (c.permission, c.operation, c.ok))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            rows(None),
            [("key file", "wrap", true), ("key file", "unwrap", true)]
        );
        let (_, w) = prov.generate("ring").unwrap();
        assert_eq!(rows(Some(&w))[1], ("key file", "unwrap", true));
        // A wrapped key of another keyring does not unwrap: that row fails.
        let (_, other) = prov.generate("other ring").unwrap();
        assert_eq!(rows(Some(&other))[1], ("key file", "unwrap", false));
    }

    #[test]
    fn insecure_and_missing_and_invalid() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key");
        assert!(matches!(
            LocalProvider::open(&p),
            Err(KmsError::KeyFileMissing(_))
        ));
        create_key_file(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            LocalProvider::open(&p),
            Err(KmsError::KeyFileInsecure { mode: 0o640, .. })
        ));
        fs::write(d.path().join("bad"), b"nothex\n").unwrap();
        fs::set_permissions(d.path().join("bad"), fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            LocalProvider::open(&d.path().join("bad")),
            Err(KmsError::KeyFileInvalid { .. })
        ));
    }
}
