//! AES-256-XTS sector cipher (IEEE 1619) with the earfs short-tail rule.
//! Interim portable kernel on the `aes` crate's parallel-block API.

use aes::Aes256;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit, generic_array::GenericArray};

use super::XtsKey;

/// Size of one data unit (sector).
pub const SECTOR_SIZE: usize = 4096;
const BLOCK: usize = 16;
const BLOCKS_PER_SECTOR: usize = SECTOR_SIZE / BLOCK;

/// The XTS cipher of one file: expanded K1 (both directions) and K2.
pub struct SectorCipher {
    k1: Aes256,
    k2: Aes256,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SectorCipher(<redacted>)")
    }
}

/// Which kernel runs on this CPU.
pub fn implementation() -> &'static str {
    "aes-crate"
}

#[inline]
fn mul_alpha(t: &mut [u8; 16]) {
    let lo = u64::from_le_bytes([t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]]);
    let hi = u64::from_le_bytes([t[8], t[9], t[10], t[11], t[12], t[13], t[14], t[15]]);
    let carry = hi >> 63;
    let nhi = (hi << 1) | (lo >> 63);
    let nlo = (lo << 1) ^ (carry * 0x87);
    t[..8].copy_from_slice(&nlo.to_le_bytes());
    t[8..].copy_from_slice(&nhi.to_le_bytes());
}

fn xor16(a: &mut [u8], b: &[u8; 16]) {
    for (x, y) in a.iter_mut().zip(b.iter()) {
        *x ^= y;
    }
}

impl SectorCipher {
    /// Expand a file key.
    pub fn new(key: &XtsKey) -> Self {
        let k = key.bytes();
        SectorCipher {
            k1: Aes256::new(GenericArray::from_slice(&k[..32])),
            k2: Aes256::new(GenericArray::from_slice(&k[32..])),
        }
    }

    fn tweak0(&self, sector_no: u64) -> [u8; 16] {
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(&sector_no.to_le_bytes());
        let mut b = GenericArray::clone_from_slice(&t);
        self.k2.encrypt_block(&mut b);
        t.copy_from_slice(&b);
        t
    }

    fn tail_keystream(&self, t: &[u8; 16]) -> [u8; 16] {
        let mut b = GenericArray::clone_from_slice(t);
        self.k1.encrypt_block(&mut b);
        let mut ks = [0u8; 16];
        ks.copy_from_slice(&b);
        xor16(&mut ks, t);
        ks
    }

    fn full_blocks(&self, data: &mut [u8], t: &mut [u8; 16], encrypt: bool) {
        let n = data.len() / BLOCK;
        let mut tweaks = [[0u8; 16]; BLOCKS_PER_SECTOR];
        let mut blocks =
            [GenericArray::<u8, aes::cipher::consts::U16>::default(); BLOCKS_PER_SECTOR];
        for (i, chunk) in data
            .chunks_exact_mut(BLOCK)
            .enumerate()
            .take(BLOCKS_PER_SECTOR)
        {
            tweaks[i] = *t;
            xor16(chunk, t);
            blocks[i].copy_from_slice(chunk);
            mul_alpha(t);
        }
        if encrypt {
            self.k1.encrypt_blocks(&mut blocks[..n]);
        } else {
            self.k1.decrypt_blocks(&mut blocks[..n]);
        }
        for (i, chunk) in data
            .chunks_exact_mut(BLOCK)
            .enumerate()
            .take(BLOCKS_PER_SECTOR)
        {
            chunk.copy_from_slice(&blocks[i]);
            xor16(chunk, &tweaks[i]);
        }
    }

    fn one_block(&self, block: &mut [u8], t: &[u8; 16], encrypt: bool) {
        xor16(block, t);
        let mut b = GenericArray::clone_from_slice(block);
        if encrypt {
            self.k1.encrypt_block(&mut b);
        } else {
            self.k1.decrypt_block(&mut b);
        }
        block.copy_from_slice(&b);
        xor16(block, t);
    }

    /// Encrypt one sector of 0..=4096 bytes in place.
    pub fn encrypt_sector(&self, sector_no: u64, data: &mut [u8]) {
        self.crypt(sector_no, data, true)
    }

    /// Decrypt one sector of 0..=4096 bytes in place.
    pub fn decrypt_sector(&self, sector_no: u64, data: &mut [u8]) {
        self.crypt(sector_no, data, false)
    }

    fn crypt(&self, sector_no: u64, data: &mut [u8], encrypt: bool) {
        let len = data.len().min(SECTOR_SIZE);
        let data = &mut data[..len];
        if len == 0 {
            return;
        }
        let mut t = self.tweak0(sector_no);
        if len < BLOCK {
            let ks = self.tail_keystream(&t);
            for (x, k) in data.iter_mut().zip(ks.iter()) {
                *x ^= k;
            }
            return;
        }
        let rem = len % BLOCK;
        if rem == 0 {
            self.full_blocks(data, &mut t, encrypt);
            return;
        }
        // Ciphertext stealing: all blocks before the last full one go the normal way.
        let full = len / BLOCK; // >= 1
        let head = (full - 1) * BLOCK;
        self.full_blocks(&mut data[..head], &mut t, encrypt);
        let t_m1 = t; // tweak of block m-1 (last full block)
        let mut t_m = t;
        mul_alpha(&mut t_m);
        let (a, b) = data[head..].split_at_mut(BLOCK);
        if encrypt {
            self.one_block(a, &t_m1, true); // CC = E(P_{m-1})
            let mut pp = [0u8; 16];
            pp[..rem].copy_from_slice(&b[..rem]);
            pp[rem..].copy_from_slice(&a[rem..]);
            b[..rem].copy_from_slice(&a[..rem]); // C_m = head of CC
            self.one_block(&mut pp, &t_m, true);
            a.copy_from_slice(&pp);
        } else {
            self.one_block(a, &t_m, false); // PP = D_{t_m}(C_{m-1})
            let mut cc = [0u8; 16];
            cc[..rem].copy_from_slice(&b[..rem]);
            cc[rem..].copy_from_slice(&a[rem..]);
            b[..rem].copy_from_slice(&a[..rem]);
            self.one_block(&mut cc, &t_m1, false);
            a.copy_from_slice(&cc);
        }
    }

    /// Encrypt consecutive sectors starting at `first_sector`; the last may be short.
    pub fn encrypt_sectors(&self, first_sector: u64, data: &mut [u8]) {
        for (i, s) in data.chunks_mut(SECTOR_SIZE).enumerate() {
            self.encrypt_sector(first_sector.wrapping_add(i as u64), s);
        }
    }

    /// Decrypt consecutive sectors starting at `first_sector`; the last may be short.
    pub fn decrypt_sectors(&self, first_sector: u64, data: &mut [u8]) {
        for (i, s) in data.chunks_mut(SECTOR_SIZE).enumerate() {
            self.decrypt_sector(first_sector.wrapping_add(i as u64), s);
        }
    }
}
