//! Key providers: wrap and unwrap volume data keys. Knows nothing of FUSE or files
//! other than a provider's own key material (the `local` key file).
//!
//! `aws` and `gcp` plug in behind [`KeyProvider`] (issue: KMS key providers).

mod local;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::crypto::{CryptoError, Dek};

pub use local::{LocalProvider, create_key_file};

/// Where a volume's data keys are wrapped; stored in `earfs.conf`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
pub enum ProviderSpec {
    /// A root-only key file that wraps with AES-256-GCM. For development, tests and the
    /// quick start: the key sits on the same machine as the data.
    Local { key_file: PathBuf },
}

impl ProviderSpec {
    /// Provider name as on the command line (`--kms`).
    pub fn name(&self) -> &'static str {
        match self {
            ProviderSpec::Local { .. } => "local",
        }
    }

    /// Human-readable key reference.
    pub fn key_reference(&self) -> String {
        match self {
            ProviderSpec::Local { key_file } => format!("key file {}", key_file.display()),
        }
    }

    /// Open the provider this spec names.
    pub fn open(&self) -> Result<Box<dyn KeyProvider>, KmsError> {
        match self {
            ProviderSpec::Local { key_file } => Ok(Box::new(LocalProvider::open(key_file)?)),
        }
    }
}

/// A key provider: makes, wraps and unwraps data keys, each bound to a keyring id.
pub trait KeyProvider: Send + Sync {
    /// Make a fresh data key and its wrapped form, bound to `keyring_id`.
    fn generate(&self, keyring_id: &str) -> Result<(Dek, Vec<u8>), KmsError>;
    /// Unwrap a data key that was bound to `keyring_id`.
    fn unwrap(&self, wrapped: &[u8], keyring_id: &str) -> Result<Dek, KmsError>;
}

/// Errors of the key providers, classified for the CLI and for retries.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error(
        "key file {0} does not exist; give the right --key-file, or run `earfs init` to create a volume and its key"
    )]
    KeyFileMissing(PathBuf),
    #[error(
        "key file {path} is readable or writable by group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    KeyFileInsecure { path: PathBuf, mode: u32 },
    #[error("key file {path} is not a valid earfs key: {reason}")]
    KeyFileInvalid { path: PathBuf, reason: String },
    #[error("cannot read key file {path}: {source}")]
    KeyFileIo {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The wrapped key does not open under this key (wrong key, or altered keyring).
    #[error("the data key does not unwrap with {0}: wrong key, or earfs.conf was altered")]
    WrongKey(String),
    #[error("{0}")]
    Crypto(#[from] CryptoError),
}

impl KmsError {
    /// Whether retrying the same call could succeed (throttling, timeouts, 5xx).
    pub fn is_retryable(&self) -> bool {
        match self {
            KmsError::KeyFileIo { source, .. } => source.kind() == std::io::ErrorKind::Interrupted,
            KmsError::KeyFileMissing(_)
            | KmsError::KeyFileInsecure { .. }
            | KmsError::KeyFileInvalid { .. }
            | KmsError::WrongKey(_)
            | KmsError::Crypto(_) => false,
        }
    }
}
