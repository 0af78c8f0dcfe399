//! The sector codec: XTS per sector, with the all-zero-ciphertext rule for holes.
//!
//! v1: a sector is encrypted at its own length (ciphertext stealing, a keystream under
//! 16 bytes), and an all-zero stored sector of 16 bytes or more is a hole.
//! v2: every 16-byte block is encrypted on its own position (block *j* of sector *i*,
//! no stealing), and an all-zero stored block reads as 16 zero bytes.

use crate::crypto::{Nonce, SectorCipher, XtsKey};

use super::layout::{BLOCK, FileFormat, SECTOR, SectorNo};

/// The cipher of one file (derived from its header).
#[derive(Debug)]
pub struct FileCipher {
    key_version: u32,
    format: FileFormat,
    /// The file nonce (not secret: it is in the header), kept to re-encode the header.
    nonce: Nonce,
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
    pub(crate) fn new(key_version: u32, format: FileFormat, nonce: Nonce, key: &XtsKey) -> Self {
        FileCipher {
            key_version,
            format,
            nonce,
            cipher: SectorCipher::new(key.bytes()),
        }
    }

    /// The key version named in the file's header.
    pub fn key_version(&self) -> u32 {
        self.key_version
    }

    /// The format named in the file's header.
    pub fn format(&self) -> FileFormat {
        self.format
    }

    /// The file nonce.
    pub fn nonce(&self) -> &Nonce {
        &self.nonce
    }

    /// v2: encrypt the whole 16-byte blocks of `buf` in place; `buf` holds plaintext from
    /// offset `plain_off` (a multiple of 16) and may span sectors.
    pub fn encrypt_blocks(&self, plain_off: u64, buf: &mut [u8]) {
        self.each_sector_part(plain_off, buf, |s, j, part| {
            self.cipher.encrypt_blocks(s, j, part)
        });
    }

    /// v2: decrypt the whole 16-byte blocks of `buf` in place (see
    /// [`Self::encrypt_blocks`]); a block whose stored bytes are all zero reads as zeros.
    pub fn decrypt_blocks(&self, plain_off: u64, buf: &mut [u8]) {
        self.each_sector_part(plain_off, buf, |s, j, part| {
            // Which blocks are stored as zeros (at most 256 in a sector).
            let mut zero = [0u64; 4];
            let mut any = false;
            for (k, b) in part.chunks_exact(BLOCK as usize).enumerate() {
                if all_zero(b) {
                    zero[k / 64] |= 1 << (k % 64);
                    any = true;
                }
            }
            self.cipher.decrypt_blocks(s, j, part);
            if any {
                for (k, b) in part.chunks_exact_mut(BLOCK as usize).enumerate() {
                    if zero[k / 64] & (1 << (k % 64)) != 0 {
                        b.fill(0);
                    }
                }
            }
        });
    }

    /// Split `buf` (plaintext from `plain_off`, 16-aligned) at sector boundaries and call
    /// `f(sector, first block in the sector, part)`.
    fn each_sector_part(&self, plain_off: u64, buf: &mut [u8], f: impl Fn(u64, usize, &mut [u8])) {
        let mut at = plain_off;
        let mut rest = buf;
        while !rest.is_empty() {
            let in_sector = (at % SECTOR) as usize;
            let n = rest.len().min(SECTOR as usize - in_sector);
            let (part, tail) = rest.split_at_mut(n);
            f(at / SECTOR, in_sector / BLOCK as usize, part);
            at += n as u64;
            rest = tail;
        }
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
        let c = FileCipher::new(1, FileFormat::V1, [0; 16], &XtsKey::new(&mut k).unwrap());
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

    #[test]
    fn v2_blocks_decrypt_alike_at_any_split_and_zero_blocks_are_zeros() {
        let mut k = [0u8; 64];
        k[0] = 1;
        k[40] = 2;
        let c = FileCipher::new(1, FileFormat::V2, [0; 16], &XtsKey::new(&mut k).unwrap());
        let plain: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8 + 1).collect();
        let mut whole = plain.clone();
        c.encrypt_blocks(0, &mut whole);
        // Whole sectors are plain XTS sectors: the same as the sector API.
        let mut v1 = plain.clone();
        c.encrypt(SectorNo(0), &mut v1);
        assert_eq!(whole, v1);
        // Any 16-aligned piece encrypts to the same bytes as in the whole.
        for (a, b) in [
            (16usize, 32usize),
            (4080, 4112),
            (4096 + 48, 2 * 4096 + 16),
            (0, 16),
        ] {
            let mut part = plain[a..b].to_vec();
            c.encrypt_blocks(a as u64, &mut part);
            assert_eq!(part, whole[a..b], "{a}..{b}");
            c.decrypt_blocks(a as u64, &mut part);
            assert_eq!(part, plain[a..b]);
        }
        // A stored all-zero block reads as zeros; its neighbours are untouched.
        let mut stored = whole.clone();
        stored[4096 + 32..4096 + 48].fill(0);
        c.decrypt_blocks(0, &mut stored);
        assert!(stored[4096 + 32..4096 + 48].iter().all(|&b| b == 0));
        assert_eq!(stored[..4096 + 32], plain[..4096 + 32]);
        assert_eq!(stored[4096 + 48..], plain[4096 + 48..]);
    }
}
