//! The CLI's error type: an exit code (src/daemon/exit.rs) and one line for the user,
//! with the codes of the key provider's and the volume's errors.

use super::exit;
use crate::kms::KmsError;
use crate::volume::VolumeError;

/// A failure with the exit code it maps to and one line for the user.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The exit code of a key provider error.
fn kms_code(k: &KmsError) -> u8 {
    match k {
        KmsError::KeyFileMissing(_) => exit::KEY_MISSING,
        KmsError::KeyFileInsecure { .. } => exit::KEY_INSECURE,
        KmsError::WrongKey(_) | KmsError::InvalidCiphertext { .. } => exit::WRONG_KEY,
        KmsError::InvalidReference(_) => exit::USAGE,
        KmsError::Credentials(_) | KmsError::CredentialsInsecure { .. } => exit::KMS_CREDENTIALS,
        KmsError::AccessDenied { .. } => exit::KMS_DENIED,
        KmsError::KeyUnusable { .. } => exit::KMS_KEY_UNUSABLE,
        KmsError::Checksum { .. } => exit::KMS_CHECKSUM,
        KmsError::Transient { .. } | KmsError::DeadlineExceeded { .. } => exit::KMS_UNAVAILABLE,
        KmsError::KeyFileInvalid { .. }
        | KmsError::KeyFileIo { .. }
        | KmsError::Rejected { .. }
        | KmsError::Crypto(_) => exit::FAILURE,
    }
}

impl From<KmsError> for Failure {
    fn from(e: KmsError) -> Self {
        Failure::new(kms_code(&e), e.to_string())
    }
}

impl From<VolumeError> for Failure {
    fn from(e: VolumeError) -> Self {
        let code = match &e {
            VolumeError::NotAVolume(_) | VolumeError::NoBackingDir(_) => exit::NOT_A_VOLUME,
            VolumeError::AlreadyAVolume(_) | VolumeError::NotEmpty(_) => exit::INIT_REFUSED,
            VolumeError::BadConfig { .. } | VolumeError::ImportRefused { .. } => exit::BAD_CONFIG,
            VolumeError::NotRetirable { .. } => exit::USAGE,
            VolumeError::ConfigMac(_) => exit::CONFIG_TAMPERED,
            VolumeError::Kms(k) => kms_code(k),
            VolumeError::Io { .. } => exit::FAILURE,
        };
        Failure::new(code, e.to_string())
    }
}
