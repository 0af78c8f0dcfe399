//! Key types and derivations (format v1, see docs/file-format.md).

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Sha256, Sha512};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::CryptoError;

/// Length of a volume data key (DEK).
pub const DEK_LEN: usize = 64;
/// Length of a per-file nonce.
pub const NONCE_LEN: usize = 16;

/// HKDF info prefix for per-file XTS keys; the 16-byte file nonce follows it.
pub const FILE_KEY_INFO: &[u8] = b"earfs file key v1";
/// HKDF info for the key that authenticates file headers.
pub const HEADER_MAC_INFO: &[u8] = b"earfs header mac v1";
/// HKDF info for the key that authenticates `earfs.conf`.
pub const CONFIG_MAC_INFO: &[u8] = b"earfs config mac v1";

/// A per-file nonce (random, stored in the file header).
pub type Nonce = [u8; NONCE_LEN];

/// Fill `buf` from the operating system's random source.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::getrandom(buf).map_err(|e| CryptoError::Random(e.to_string()))
}

/// A volume data key: 64 random bytes, wrapped by the KMS on disk.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Dek(Box<[u8; DEK_LEN]>);

impl Dek {
    /// A fresh random DEK.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = Box::new([0u8; DEK_LEN]);
        random_bytes(&mut k[..])?;
        Ok(Dek(k))
    }

    /// A DEK from bytes that a key provider unwrapped.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != DEK_LEN {
            return Err(CryptoError::KeyLength {
                got: bytes.len(),
                want: DEK_LEN,
            });
        }
        let mut k = Box::new([0u8; DEK_LEN]);
        k.copy_from_slice(bytes);
        Ok(Dek(k))
    }

    /// The raw bytes, for wrapping by a key provider only.
    pub fn expose(&self) -> &[u8; DEK_LEN] {
        &self.0
    }
}

impl std::fmt::Debug for Dek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dek(<redacted>)")
    }
}

/// A per-file AES-256-XTS key: K1 (data) ‖ K2 (tweak), never equal halves.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct XtsKey(Box<[u8; 64]>);

impl XtsKey {
    /// Wrap 64 key bytes, refusing equal halves.
    pub fn new(bytes: [u8; 64]) -> Result<Self, CryptoError> {
        let mut b = bytes;
        let key = Box::new(b);
        b.zeroize();
        if key[..32] == key[32..] {
            return Err(CryptoError::WeakXtsKey);
        }
        Ok(XtsKey(key))
    }

    pub(crate) fn bytes(&self) -> &[u8; 64] {
        &self.0
    }
}

impl std::fmt::Debug for XtsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XtsKey(<redacted>)")
    }
}

/// A 32-byte HMAC-SHA256 key.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MacKey([u8; 32]);

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(<redacted>)")
    }
}

fn hkdf_expand(dek: &Dek, info: &[&[u8]], out: &mut [u8]) {
    // HKDF-SHA512, no salt (the DEK is uniformly random).
    let hk = Hkdf::<Sha512>::new(None, &dek.0[..]);
    // Output lengths here are 32 or 64 bytes, far below 255·64, so expand cannot fail.
    if hk.expand_multi_info(info, out).is_err() {
        out.fill(0);
    }
}

/// The per-file XTS key: HKDF-SHA512(DEK, info = "earfs file key v1" ‖ nonce), 64 bytes.
pub fn derive_file_key(dek: &Dek, nonce: &Nonce) -> Result<XtsKey, CryptoError> {
    let mut out = [0u8; 64];
    hkdf_expand(dek, &[FILE_KEY_INFO, nonce], &mut out);
    let key = XtsKey::new(out);
    out.zeroize();
    key
}

/// The key that authenticates file headers made under `dek`.
pub fn derive_header_mac_key(dek: &Dek) -> MacKey {
    let mut out = [0u8; 32];
    hkdf_expand(dek, &[HEADER_MAC_INFO], &mut out);
    MacKey(out)
}

/// The key that authenticates `earfs.conf`.
pub fn derive_config_mac_key(dek: &Dek) -> MacKey {
    let mut out = [0u8; 32];
    hkdf_expand(dek, &[CONFIG_MAC_INFO], &mut out);
    MacKey(out)
}

fn hmac_of(key: &MacKey, parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so new_from_slice cannot fail for 32 bytes.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&key.0) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    };
    for p in parts {
        mac.update(p);
    }
    mac
}

#[cold]
fn unreachable_hmac() -> Hmac<Sha256> {
    // HMAC-SHA256 takes keys of any length; keep a defined fallback rather than a panic.
    <Hmac<Sha256> as hmac::digest::KeyInit>::new(&Default::default())
}

/// HMAC-SHA256 over the concatenation of `parts`.
pub fn hmac_sha256(key: &MacKey, parts: &[&[u8]]) -> [u8; 32] {
    hmac_of(key, parts).finalize().into_bytes().into()
}

/// Constant-time check of an HMAC-SHA256 tag.
pub fn verify_hmac_sha256(key: &MacKey, parts: &[&[u8]], tag: &[u8]) -> bool {
    hmac_of(key, parts).verify_slice(tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_differ_per_nonce_and_are_deterministic() {
        let dek = Dek::from_slice(&[7u8; 64]).unwrap();
        let a = derive_file_key(&dek, &[1u8; 16]).unwrap();
        let b = derive_file_key(&dek, &[2u8; 16]).unwrap();
        let a2 = derive_file_key(&dek, &[1u8; 16]).unwrap();
        assert_ne!(a.bytes(), b.bytes());
        assert_eq!(a.bytes(), a2.bytes());
    }

    #[test]
    fn equal_halves_refused() {
        assert_eq!(XtsKey::new([5u8; 64]).unwrap_err(), CryptoError::WeakXtsKey);
    }

    #[test]
    fn hmac_verifies_and_rejects() {
        let dek = Dek::generate().unwrap();
        let k = derive_header_mac_key(&dek);
        let tag = hmac_sha256(&k, &[b"abc", b"def"]);
        assert!(verify_hmac_sha256(&k, &[b"abcdef"], &tag));
        assert!(!verify_hmac_sha256(&k, &[b"abcdeg"], &tag));
        assert!(!verify_hmac_sha256(
            &derive_config_mac_key(&dek),
            &[b"abcdef"],
            &tag
        ));
    }

    #[test]
    fn debug_is_redacted() {
        let dek = Dek::from_slice(&[0xab; 64]).unwrap();
        assert!(!format!("{dek:?}").contains("171"));
        assert!(!format!("{dek:?}").to_lowercase().contains("ab, "));
    }
}
