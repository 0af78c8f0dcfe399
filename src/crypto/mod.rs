//! Cryptographic primitives: the XTS sector cipher, key types and key derivation.
//!
//! Pure code: no I/O, no file descriptors. Key bytes live only in zeroize-on-drop
//! types whose `Debug` output is redacted.

mod keyring;
mod keys;
pub mod speed;
pub mod xts;

pub use keyring::{Keyring, KeyringError, check_keyring_versions};
pub use keys::{
    DEK_LEN, Dek, MacKey, Nonce, XtsKey, derive_config_mac_key, derive_file_key,
    derive_header_mac_key, hmac_sha256, random_bytes, verify_hmac_sha256, wipe_stack,
};
pub use xts::{SECTOR_SIZE, SectorCipher, implementation};

#[cfg(test)]
pub(crate) use keys::stack_scan;

/// Errors of the crypto layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// HKDF produced an XTS key whose two halves are equal (IEEE 1619 forbids it).
    #[error("derived XTS key halves are equal")]
    WeakXtsKey,
    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(String),
    /// A key had the wrong length.
    #[error("key has {got} bytes, expected {want}")]
    KeyLength { got: usize, want: usize },
}
