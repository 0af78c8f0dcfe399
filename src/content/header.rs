//! The per-file header: one 4096-byte sector at backing offset 0.
//!
//! ```text
//! 0..8    magic "EARFSHDR"
//! 8..10   format version, u16 LE (1 or 2)
//! 10..12  flags, u16 LE (0; any other value is refused)
//! 12..16  key version, u32 LE
//! 16..32  file nonce (16 random bytes)
//! 32..64  HMAC-SHA256(header MAC key of that key version, bytes 0..32)
//! 64..4096 zero (ignored on read)
//! ```

use std::sync::Arc;

use crate::crypto::{self, Keyring, Nonce, derive_file_key, hmac_sha256, verify_hmac_sha256};

use super::codec::FileCipher;
use super::layout::{FileFormat, HEADER_LEN};

/// Header magic.
pub const MAGIC: [u8; 8] = *b"EARFSHDR";
const MAC_OFF: usize = 32;
const MAC_END: usize = 64;

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("backing file is shorter than a header")]
    Short,
    #[error("not an earfs file header (bad magic)")]
    BadMagic,
    #[error("unsupported file format version {0}")]
    UnsupportedVersion(u16),
    #[error("unknown header flags {0:#x}")]
    UnknownFlags(u16),
    #[error(
        "header names key version {0}, which this node's keyring does not hold (another node rotated: import the cluster's keyring with `earfs import-keyring`)"
    )]
    UnknownKeyVersion(u32),
    #[error("header MAC does not verify (damaged header or foreign volume)")]
    BadMac,
    #[error("key derivation failed: {0}")]
    Crypto(#[from] crypto::CryptoError),
}

/// Encode a header of `format` for `key_version` and `nonce` under `keys`.
pub fn encode_header(
    keys: &Keyring,
    format: FileFormat,
    key_version: u32,
    nonce: &Nonce,
) -> Result<Box<[u8; HEADER_LEN as usize]>, HeaderError> {
    let (_, mac_key) = keys
        .get(key_version)
        .ok_or(HeaderError::UnknownKeyVersion(key_version))?;
    let mut h = Box::new([0u8; HEADER_LEN as usize]);
    h[0..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&format.number().to_le_bytes());
    h[10..12].copy_from_slice(&0u16.to_le_bytes());
    h[12..16].copy_from_slice(&key_version.to_le_bytes());
    h[16..32].copy_from_slice(nonce);
    let tag = hmac_sha256(mac_key, &[&h[..MAC_OFF]]);
    h[MAC_OFF..MAC_END].copy_from_slice(&tag);
    Ok(h)
}

/// A fresh header of `format` under the current key with a random nonce, and its cipher.
pub fn new_header(
    keys: &Keyring,
    format: FileFormat,
) -> Result<(Box<[u8; HEADER_LEN as usize]>, Arc<FileCipher>), HeaderError> {
    let mut nonce = [0u8; 16];
    crypto::random_bytes(&mut nonce)?;
    let v = keys.current_version();
    let h = encode_header(keys, format, v, &nonce)?;
    let c = cipher_for(keys, format, v, &nonce)?;
    Ok((h, c))
}

/// The header of an existing file (same key version and nonce) re-encoded in `format`,
/// and its cipher: the upgrade of a v1 file whose ciphertext is already valid v2.
pub fn reformat_header(
    keys: &Keyring,
    old: &FileCipher,
    format: FileFormat,
) -> Result<(Box<[u8; HEADER_LEN as usize]>, Arc<FileCipher>), HeaderError> {
    let h = encode_header(keys, format, old.key_version(), old.nonce())?;
    let c = cipher_for(keys, format, old.key_version(), old.nonce())?;
    Ok((h, c))
}

/// A file's cipher, built in the heap. Its expanded round keys are built on the stack
/// and moved (copied) on their way into the `Arc`; the stack those copies used is
/// wiped before this returns, so only the `Arc`'s copy remains (wiped when dropped).
fn cipher_for(
    keys: &Keyring,
    format: FileFormat,
    v: u32,
    nonce: &Nonce,
) -> Result<Arc<FileCipher>, HeaderError> {
    let c = build_cipher(keys, format, v, nonce);
    crypto::wipe_stack();
    c
}

#[inline(never)]
fn build_cipher(
    keys: &Keyring,
    format: FileFormat,
    v: u32,
    nonce: &Nonce,
) -> Result<Arc<FileCipher>, HeaderError> {
    let (dek, _) = keys.get(v).ok_or(HeaderError::UnknownKeyVersion(v))?;
    let key = derive_file_key(dek, nonce)?;
    Ok(Arc::new(FileCipher::new(v, format, *nonce, &key)))
}

/// The format a header names, from its magic and version field alone (no key needed).
pub fn header_format(h: &[u8]) -> Result<FileFormat, HeaderError> {
    if h.len() < 10 {
        return Err(HeaderError::Short);
    }
    if h[0..8] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    FileFormat::from_number(u64::from(version)).ok_or(HeaderError::UnsupportedVersion(version))
}

/// The format and key version a header names, read without a key (and so not
/// authenticated: for counting files, never for deciding how to decrypt).
pub fn header_names(h: &[u8]) -> Result<(FileFormat, u32), HeaderError> {
    if h.len() < 16 {
        return Err(HeaderError::Short);
    }
    let format = header_format(h)?;
    Ok((format, u32::from_le_bytes([h[12], h[13], h[14], h[15]])))
}

/// Check a header read from disk and derive the file's cipher.
pub fn decode_header(keys: &Keyring, h: &[u8]) -> Result<Arc<FileCipher>, HeaderError> {
    if h.len() < MAC_END {
        return Err(HeaderError::Short);
    }
    let format = header_format(h)?;
    let flags = u16::from_le_bytes([h[10], h[11]]);
    if flags != 0 {
        return Err(HeaderError::UnknownFlags(flags));
    }
    let kv = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    let (_, mac_key) = keys.get(kv).ok_or(HeaderError::UnknownKeyVersion(kv))?;
    if !verify_hmac_sha256(mac_key, &[&h[..MAC_OFF]], &h[MAC_OFF..MAC_END]) {
        return Err(HeaderError::BadMac);
    }
    let mut nonce = [0u8; 16];
    nonce.copy_from_slice(&h[16..32]);
    cipher_for(keys, format, kv, &nonce)
}

/// Whether header bytes read from disk are all zero: the header block never reached
/// the disk (a crash before the file's first sync), so no byte of the file is durable.
pub fn header_never_written(h: &[u8]) -> bool {
    h.len() >= MAC_END && h.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Dek;

    fn ring() -> Keyring {
        Keyring::new(
            [(1, Dek::generate().unwrap()), (2, Dek::generate().unwrap())],
            2,
        )
        .unwrap()
    }

    #[test]
    fn a_files_cipher_leaves_no_key_bytes_on_the_stack() {
        use crate::crypto::stack_scan::leftovers_after;
        let dek = Dek::generate().unwrap();
        let k = Keyring::new([(1, dek.clone())], 1).unwrap();
        let (h, c) = new_header(&k, FileFormat::V2).unwrap();
        drop(c);
        // The file key (whose halves are the first two round keys of K1 and K2),
        // computed on another thread.
        let nonce: Nonce = h[16..32].try_into().unwrap();
        let secrets = std::thread::spawn(move || {
            vec![derive_file_key(&dek, &nonce).unwrap().bytes().to_vec()]
        })
        .join()
        .unwrap();
        let found = std::thread::spawn(move || {
            leftovers_after(&secrets, || {
                let c = decode_header(&k, &h[..]).unwrap();
                let (_, c2) = reformat_header(&k, &c, FileFormat::V1).unwrap();
                std::hint::black_box((c, c2));
            })
        })
        .join()
        .unwrap();
        assert!(found.is_empty(), "file key bytes left on the stack");
    }

    #[test]
    fn round_trip_and_tamper() {
        let k = ring();
        let (h, c) = new_header(&k, FileFormat::V2).unwrap();
        assert_eq!(c.key_version(), 2);
        assert_eq!(c.format(), FileFormat::V2);
        assert_eq!(u16::from_le_bytes([h[8], h[9]]), 2);
        let (h1, c1) = reformat_header(&k, &c, FileFormat::V1).unwrap();
        assert_eq!(decode_header(&k, &h1[..]).unwrap().format(), FileFormat::V1);
        assert_eq!(c1.nonce(), c.nonce());
        let mut three = h1.clone();
        three[8] = 3;
        assert_eq!(
            decode_header(&k, &three[..]).unwrap_err(),
            HeaderError::UnsupportedVersion(3)
        );
        let c2 = decode_header(&k, &h[..]).unwrap();
        let mut a = vec![9u8; 4096];
        let mut b = a.clone();
        c.encrypt(crate::content::SectorNo(3), &mut a);
        c2.encrypt(crate::content::SectorNo(3), &mut b);
        assert_eq!(a, b);
        for byte in 0..64 {
            let mut bad = h.clone();
            bad[byte] ^= 1;
            assert!(
                decode_header(&k, &bad[..]).is_err(),
                "flip of byte {byte} accepted"
            );
        }
        // Bytes past the MAC are ignored.
        let mut ok = h.clone();
        ok[100] = 1;
        assert!(decode_header(&k, &ok[..]).is_ok());
        assert_eq!(decode_header(&k, &h[..10]).unwrap_err(), HeaderError::Short);
        assert_eq!(
            decode_header(&ring(), &h[..]).unwrap_err(),
            HeaderError::BadMac
        );
    }
}
