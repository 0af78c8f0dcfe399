//! The sector codec: XTS per sector, with the all-zero-ciphertext rule for holes.

use crate::crypto::{SectorCipher, XtsKey};

use super::layout::{SECTOR, SectorNo};

/// The cipher of one file (derived from its header).
#[derive(Debug)]
pub struct FileCipher {
    key_version: u32,
    cipher: SectorCipher,
}

/// Sectors shorter than this are never holes: a short tail is always stored encrypted,
/// because n all-zero bytes would be a real ciphertext with probability 2^-8n.
pub const MIN_HOLE_LEN: usize = 16;

/// Whether stored sector bytes are a hole (read as zeros without decryption).
pub fn is_hole(stored: &[u8]) -> bool {
    stored.len() >= MIN_HOLE_LEN && all_zero(stored)
}

fn all_zero(s: &[u8]) -> bool {
    let mut chunks = s.chunks_exact(16);
    let body = chunks.by_ref().all(|c| {
        let mut w = [0u8; 16];
        w.copy_from_slice(c);
        u128::from_ne_bytes(w) == 0
    });
    body && chunks.remainder().iter().all(|&b| b == 0)
}

impl FileCipher {
    pub(crate) fn new(key_version: u32, key: &XtsKey) -> Self {
        FileCipher {
            key_version,
            cipher: SectorCipher::new(key.bytes()),
        }
    }

    /// The key version named in the file's header.
    pub fn key_version(&self) -> u32 {
        self.key_version
    }

    /// Encrypt consecutive sectors from `first` in place; the last may be short.
    pub fn encrypt(&self, first: SectorNo, buf: &mut [u8]) {
        self.cipher.encrypt_sectors(first.0, buf);
    }

    /// Decrypt consecutive sectors from `first` in place; the last may be short. A
    /// sector of 16 bytes or more whose ciphertext is all zeros is a hole and reads as zeros.
    pub fn decrypt(&self, first: SectorNo, buf: &mut [u8]) {
        for (i, s) in buf.chunks_mut(SECTOR as usize).enumerate() {
            if !is_hole(s) {
                self.cipher.decrypt_sector(first.0 + i as u64, s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_ciphertext_is_a_hole_but_zero_plaintext_is_encrypted() {
        let mut k = [0u8; 64];
        k[0] = 1;
        let c = FileCipher::new(1, &XtsKey::new(k).unwrap());
        let mut buf = vec![0u8; 4096 * 2 + 5];
        c.encrypt(SectorNo(0), &mut buf);
        assert!(buf.chunks(4096).all(|s| !all_zero(s)));
        c.decrypt(SectorNo(0), &mut buf);
        assert!(all_zero(&buf));
        let mut hole = vec![0u8; 4096 + 17];
        c.decrypt(SectorNo(7), &mut hole);
        assert!(all_zero(&hole));
        // A stored short tail of zeros is real ciphertext, never a hole.
        let mut tail = vec![0u8; 15];
        c.decrypt(SectorNo(0), &mut tail);
        assert!(!all_zero(&tail));
    }
}
