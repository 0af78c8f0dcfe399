//! Key providers: wrap and unwrap volume data keys. Knows nothing of FUSE or files
//! other than a provider's own key material (the `local` key file) and credentials.
//!
//! - `local`: a root-only key file (development, tests, the quick start).
//! - `aws`: a customer managed key in AWS KMS, by key ARN (`aws.rs`).
//! - `gcp`: a customer managed key in Google Cloud KMS, by key resource id (`gcp.rs`).
//!
//! Every adapter classifies its vendor's errors into [`KmsError`], whose
//! [`KmsError::is_retryable`] drives the one retry loop (`retry.rs`), and bounds every
//! call with a timeout. See docs/kms.md.

mod aws;
mod creds;
mod gcp;
mod local;
mod retry;
pub mod stats;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::crypto::{CryptoError, DEK_LEN, Dek};

pub use aws::{AwsKeyArn, AwsProvider};
pub use gcp::{GcpKeyResource, GcpProvider};
pub use local::{LocalProvider, create_key_file};
pub use retry::{DEFAULT_DEADLINE, Retry};

/// Where a volume's data keys are wrapped; stored in `earfs.conf`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
pub enum ProviderSpec {
    /// A root-only key file that wraps with AES-256-GCM. For development, tests and the
    /// quick start: the key sits on the same machine as the data.
    Local { key_file: PathBuf },
    /// AWS KMS: a single-region symmetric key, by key ARN (aliases are resolved at init).
    Aws {
        key_arn: String,
        /// Region of the KMS endpoint; defaults to the key ARN's region.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        /// A KMS endpoint other than the region's default (VPC endpoint, FIPS, a test server).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint_url: Option<String>,
        /// A named profile of the shared config and credentials files.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        profile: Option<String>,
        /// A shared credentials file (INI) to use instead of `~/.aws/credentials`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credentials_file: Option<PathBuf>,
    },
    /// Google Cloud KMS: a symmetric ENCRYPT_DECRYPT key, by resource id without a version.
    Gcp {
        key_resource: String,
        /// A service-account JSON key file; otherwise GOOGLE_APPLICATION_CREDENTIALS or
        /// the metadata server.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credentials: Option<PathBuf>,
        /// A Cloud KMS endpoint other than the default (private service connect, a test server).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
    },
}

/// Per-node KMS settings that override those stored in `earfs.conf` (the daemon config
/// file, `/etc/earfs/NAME.toml`). The key itself cannot be overridden.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KmsOverrides {
    /// A local volume's key file (`earfs mount --key-file`); refused for a cloud KMS.
    pub key_file: Option<PathBuf>,
    pub credentials_file: Option<PathBuf>,
    pub profile: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

impl ProviderSpec {
    /// This spec with the per-node overrides applied.
    pub fn with_overrides(&self, o: &KmsOverrides) -> Result<ProviderSpec, KmsError> {
        let refuse = |what: &str| {
            KmsError::InvalidReference(format!(
                "{what} does not apply to the {} key provider",
                self.name()
            ))
        };
        let spec = match self.clone() {
            ProviderSpec::Local { key_file } => {
                if o.profile.is_some() {
                    return Err(refuse("kms.profile"));
                }
                if o.region.is_some() {
                    return Err(refuse("kms.region"));
                }
                if o.endpoint_url.is_some() {
                    return Err(refuse("kms.endpoint_url"));
                }
                ProviderSpec::Local {
                    key_file: o
                        .key_file
                        .clone()
                        .or_else(|| o.credentials_file.clone())
                        .unwrap_or(key_file),
                }
            }
            ProviderSpec::Aws {
                key_arn,
                region,
                endpoint_url,
                profile,
                credentials_file,
            } if o.key_file.is_none() => ProviderSpec::Aws {
                key_arn,
                region: o.region.clone().or(region),
                endpoint_url: o.endpoint_url.clone().or(endpoint_url),
                profile: o.profile.clone().or(profile),
                credentials_file: o.credentials_file.clone().or(credentials_file),
            },
            ProviderSpec::Gcp {
                key_resource,
                credentials,
                endpoint,
            } if o.key_file.is_none() => {
                if o.profile.is_some() {
                    return Err(refuse("kms.profile"));
                }
                if o.region.is_some() {
                    return Err(refuse("kms.region"));
                }
                ProviderSpec::Gcp {
                    key_resource,
                    credentials: o.credentials_file.clone().or(credentials),
                    endpoint: o.endpoint_url.clone().or(endpoint),
                }
            }
            ProviderSpec::Aws { .. } | ProviderSpec::Gcp { .. } => {
                return Err(refuse("a key file (--key-file)"));
            }
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Provider name as on the command line (`--kms`).
    pub fn name(&self) -> &'static str {
        match self {
            ProviderSpec::Local { .. } => "local",
            ProviderSpec::Aws { .. } => "aws",
            ProviderSpec::Gcp { .. } => "gcp",
        }
    }

    /// The key itself, as the JSON outputs give it: the local key file's path, the key
    /// ARN, or the key resource.
    pub fn key_id(&self) -> String {
        match self {
            ProviderSpec::Local { key_file } => key_file.display().to_string(),
            ProviderSpec::Aws { key_arn, .. } => key_arn.clone(),
            ProviderSpec::Gcp { key_resource, .. } => key_resource.clone(),
        }
    }

    /// Human-readable key reference.
    pub fn key_reference(&self) -> String {
        match self {
            ProviderSpec::Local { key_file } => format!("key file {}", key_file.display()),
            ProviderSpec::Aws { key_arn, .. } => key_arn.clone(),
            ProviderSpec::Gcp { key_resource, .. } => key_resource.clone(),
        }
    }

    /// Check the key reference and settings without contacting anything.
    pub fn validate(&self) -> Result<(), KmsError> {
        match self {
            ProviderSpec::Local { .. } => Ok(()),
            ProviderSpec::Aws {
                key_arn, region, ..
            } => AwsKeyArn::parse(key_arn)?
                .region_for(region.as_deref())
                .map(|_| ()),
            ProviderSpec::Gcp { key_resource, .. } => {
                GcpKeyResource::parse(key_resource).map(|_| ())
            }
        }
    }

    /// Open the provider this spec names. Contacts nothing yet: the first call
    /// resolves credentials.
    pub fn open(&self, retry: Retry) -> Result<Box<dyn KeyProvider>, KmsError> {
        match self {
            ProviderSpec::Local { key_file } => Ok(Box::new(LocalProvider::open(key_file)?)),
            ProviderSpec::Aws {
                key_arn,
                region,
                endpoint_url,
                profile,
                credentials_file,
            } => Ok(Box::new(AwsProvider::open(
                aws::AwsSettings {
                    key: AwsKeyArn::parse(key_arn)?,
                    region: region.clone(),
                    endpoint_url: endpoint_url.clone(),
                    profile: profile.clone(),
                    credentials_file: credentials_file.clone(),
                },
                retry,
            )?)),
            ProviderSpec::Gcp {
                key_resource,
                credentials,
                endpoint,
            } => Ok(Box::new(GcpProvider::open(
                gcp::GcpSettings {
                    key: GcpKeyResource::parse(key_resource)?,
                    credentials: credentials.clone(),
                    endpoint: endpoint.clone(),
                },
                retry,
            )?)),
        }
    }
}

/// What `validate` learned about the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDescription {
    /// The key's canonical reference (an alias ARN resolves to the key ARN).
    pub key: String,
    /// Facts worth showing the user, one per line (state, spec, aliases, version).
    pub details: Vec<String>,
}

/// One line of `earfs kms-check`: a permission, tried for real.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PermissionCheck {
    /// The permission as operators grant it (`kms:Decrypt`, `cloudkms.keyRings.get`).
    pub permission: &'static str,
    /// The call that exercised it.
    pub operation: &'static str,
    pub ok: bool,
    /// What came back: a short fact on success, the KMS's own reason on failure.
    pub detail: String,
}

/// A key provider: validates its key, makes, wraps and unwraps data keys, each bound
/// to a keyring id.
pub trait KeyProvider: Send + Sync {
    /// Check that the key exists and is usable for wrapping (state, type, usage).
    fn validate(&self) -> Result<KeyDescription, KmsError>;
    /// Make a fresh data key and its wrapped form, bound to `keyring_id`, proving that
    /// it unwraps again.
    fn generate(&self, keyring_id: &str) -> Result<(Dek, Vec<u8>), KmsError>;
    /// Wrap an existing data key, bound to `keyring_id` (a rewrap under this key).
    fn wrap(&self, dek: &Dek, keyring_id: &str) -> Result<Vec<u8>, KmsError>;
    /// Unwrap a data key that was bound to `keyring_id`.
    fn unwrap(&self, wrapped: &[u8], keyring_id: &str) -> Result<Dek, KmsError>;
    /// The key's own state, as the periodic recheck asks for it (AWS DescribeKey, GCP
    /// cryptoKeys.get): an error if it is disabled, scheduled for deletion, destroyed
    /// or no longer accessible.
    fn check_key(&self) -> Result<(), KmsError>;
    /// Try every permission the provider needs, for real. `wrapped` (a volume's current
    /// wrapped key) is what the decrypt check unwraps when given.
    fn check(&self, keyring_id: &str, wrapped: Option<&[u8]>) -> Vec<PermissionCheck>;
}

/// The call a KMS error came from: provider, operation, key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsCall {
    pub provider: &'static str,
    pub operation: &'static str,
    pub key: String,
}

impl std::fmt::Display for KmsCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} on {}", self.provider, self.operation, self.key)
    }
}

/// Errors of the key providers, classified for the CLI and for retries.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error(
        "key file {0} does not exist; if it moved, give it with `earfs mount --key-file FILE` or record its new path with `earfs config BACKING --set kms.key_file=FILE`; `earfs init` creates a new volume and its key"
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
    /// A key reference or provider setting that cannot be right (checked offline).
    #[error("{0}")]
    InvalidReference(String),
    /// No usable credentials, or the KMS does not accept them.
    #[error("{0}")]
    Credentials(String),
    /// A credentials file that others can read.
    #[error(
        "credentials file {path} is readable or writable by group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    CredentialsInsecure { path: PathBuf, mode: u32 },
    /// The KMS refused for lack of a permission.
    #[error(
        "{call} was denied: {reason} (grant {permission} to this node's identity; see docs/kms.md)"
    )]
    AccessDenied {
        call: KmsCall,
        permission: &'static str,
        reason: String,
    },
    /// The key cannot be used: disabled, pending deletion, destroyed, not found, or of
    /// the wrong kind.
    #[error("{call} failed: the key cannot be used: {reason}")]
    KeyUnusable { call: KmsCall, reason: String },
    /// The KMS says the wrapped key was not made by this key or is bound to another
    /// keyring id.
    #[error(
        "{call} failed: the wrapped data key was not made by this key, or is bound to another keyring ({reason})"
    )]
    InvalidCiphertext { call: KmsCall, reason: String },
    /// A CRC32C check failed: the request or the reply was damaged in transit.
    #[error(
        "{call} failed: CRC32C mismatch in the {what}; the request or reply was damaged in transit"
    )]
    Checksum { call: KmsCall, what: String },
    /// Throttling, a timeout, a connection failure or a 5xx: worth retrying.
    #[error("{call} failed: {reason}")]
    Transient { call: KmsCall, reason: String },
    /// Retries of transient failures ran out of time.
    #[error(
        "{call} failed after {attempts} attempt(s) in {elapsed:.1?} (KMS deadline {deadline:?}): {last}; check that the KMS is reachable from this node (docs/kms.md)"
    )]
    DeadlineExceeded {
        call: KmsCall,
        attempts: u32,
        elapsed: Duration,
        deadline: Duration,
        last: String,
    },
    /// Any other definitive refusal or malformed reply.
    #[error("{call} failed: {reason}")]
    Rejected { call: KmsCall, reason: String },
    #[error("{0}")]
    Crypto(#[from] CryptoError),
}

impl KmsError {
    /// Whether retrying the same call could succeed (throttling, timeouts, 5xx).
    pub fn is_retryable(&self) -> bool {
        match self {
            KmsError::KeyFileIo { source, .. } => source.kind() == std::io::ErrorKind::Interrupted,
            KmsError::Transient { .. } => true,
            KmsError::KeyFileMissing(_)
            | KmsError::KeyFileInsecure { .. }
            | KmsError::KeyFileInvalid { .. }
            | KmsError::WrongKey(_)
            | KmsError::InvalidReference(_)
            | KmsError::Credentials(_)
            | KmsError::CredentialsInsecure { .. }
            | KmsError::AccessDenied { .. }
            | KmsError::KeyUnusable { .. }
            | KmsError::InvalidCiphertext { .. }
            | KmsError::Checksum { .. }
            | KmsError::DeadlineExceeded { .. }
            | KmsError::Rejected { .. }
            | KmsError::Crypto(_) => false,
        }
    }

    /// The reason alone, as `kms-check` shows it next to a permission.
    pub fn reason(&self) -> String {
        match self {
            KmsError::AccessDenied { reason, .. }
            | KmsError::KeyUnusable { reason, .. }
            | KmsError::InvalidCiphertext { reason, .. }
            | KmsError::Transient { reason, .. }
            | KmsError::Rejected { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }
}

/// A provider's permissions, each with the call that exercises it: the one place a
/// permission's name is written, for kms-check rows and for denial messages alike.
pub(crate) struct Permissions(pub &'static [(&'static str, &'static str)]);

impl Permissions {
    /// The permission `operation` needs.
    fn of(&self, operation: &str) -> &'static str {
        self.0
            .iter()
            .find(|(_, op)| *op == operation)
            .map(|(p, _)| *p)
            .unwrap_or("the permission for this call")
    }

    /// The check of `operation`'s permission, from the outcome of the call itself.
    fn check<T>(
        &self,
        operation: &'static str,
        outcome: &Result<T, KmsError>,
        ok_detail: impl FnOnce(&T) -> String,
    ) -> PermissionCheck {
        let (ok, detail) = match outcome {
            Ok(v) => (true, ok_detail(v)),
            Err(e) => (false, e.reason()),
        };
        PermissionCheck {
            permission: self.of(operation),
            operation,
            ok,
            detail,
        }
    }

    /// `operation`'s permission could not be tried because an earlier call failed.
    fn not_tried(&self, operation: &'static str, why: &str) -> PermissionCheck {
        PermissionCheck {
            permission: self.of(operation),
            operation,
            ok: false,
            detail: format!("not tried: {why}"),
        }
    }
}

/// The data key a KMS unwrapped, which must be exactly [`DEK_LEN`] bytes.
fn unwrapped_dek(call: KmsCall, plaintext: &[u8]) -> Result<Dek, KmsError> {
    Dek::from_slice(plaintext).map_err(|_| KmsError::Rejected {
        call,
        reason: format!(
            "the key unwrapped to {} bytes, not a {DEK_LEN}-byte earfs data key",
            plaintext.len()
        ),
    })
}
