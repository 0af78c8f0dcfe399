//! AES-256-XTS sector cipher (IEEE 1619-2007 / NIST SP 800-38E).
//!
//! * Data unit = one sector of up to [`SECTOR_SIZE`] bytes; the data-unit
//!   number is the sector number as a 16-byte little-endian integer,
//!   encrypted with the tweak key K2 to give the initial tweak `T`.
//! * Block `j` is `C_j = E_K1(P_j ^ T_j) ^ T_j` with `T_j = T * alpha^j` in
//!   GF(2^128) (little-endian convention, reduction polynomial 0x87).
//! * Lengths >= 16 that are not a multiple of 16 use standard XTS
//!   ciphertext stealing.
//! * Lengths 1..=15 (only possible for the last, short sector of a file;
//!   not covered by IEEE 1619): `C = P ^ KS[..n]` with
//!   `KS = E_K1(T) ^ T`, i.e. the XTS encryption of an all-zero block at
//!   block index 0. Encryption and decryption are the same operation.
//! * Length 0 is a no-op.
//!
//! The bulk work is done by the fastest kernel the CPU supports (see
//! [`Kernel`]); ciphertext stealing and the short-sector rule are done here
//! in safe code on top of the kernel's whole-block primitive.

use aes::Aes256;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use zeroize::Zeroize;

#[cfg(target_arch = "x86_64")]
use crate::sys::aes_x86;

/// Size of an earfs sector (one XTS data unit).
pub const SECTOR_SIZE: usize = 4096;

/// AES block size.
const BLOCK: usize = 16;

/// An implementation of the XTS block loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// VAES + AVX-512 + VPCLMULQDQ (x86-64), 32 blocks in flight.
    VaesAvx512,
    /// AES-NI (x86-64), 8 blocks in flight.
    AesNi,
    /// The RustCrypto `aes` crate's parallel-block API. That crate picks
    /// AES-NI itself when present, else a constant-time bitsliced software
    /// AES; this kernel is the fallback for any other CPU.
    Portable,
}

impl Kernel {
    /// Every kernel, fastest first.
    pub const ALL: [Kernel; 3] = [Kernel::VaesAvx512, Kernel::AesNi, Kernel::Portable];

    /// Short name, as reported by `earfs speed`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::VaesAvx512 => "vaes-avx512",
            Kernel::AesNi => "aes-ni",
            Kernel::Portable => "portable",
        }
    }

    /// Whether this kernel can run on this CPU.
    pub fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::VaesAvx512 => aes_x86::Backend::new(aes_x86::Kind::VaesAvx512).is_some(),
            #[cfg(target_arch = "x86_64")]
            Kernel::AesNi => aes_x86::Backend::new(aes_x86::Kind::AesNi).is_some(),
            Kernel::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The fastest kernel available on this CPU.
    pub fn best() -> Kernel {
        Kernel::ALL
            .into_iter()
            .find(|k| k.is_available())
            .unwrap_or(Kernel::Portable)
    }
}

/// Name of the kernel that [`SectorCipher::new`] uses on this CPU, e.g.
/// `"vaes-avx512"`, `"aes-ni"` or `"portable"`.
pub fn implementation() -> &'static str {
    Kernel::best().name()
}

/// Cipher direction.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Encrypt,
    Decrypt,
}

/// Key material plus the kernel that uses it. Round keys are zeroized on
/// drop (by `Aes256Keys`' and `Aes256`'s own `Drop`).
// One `SectorCipher` exists per open volume and is not moved on hot paths,
// so the variants' size difference does not matter. Note: zeroize-on-drop
// wipes the value's final location only; like any Rust value, moving it
// (e.g. out of `new`) can leave stale stack copies, so callers should
// create it once and keep it in place (e.g. in an `Arc`).
#[allow(clippy::large_enum_variant)]
enum Engine {
    #[cfg(target_arch = "x86_64")]
    X86 {
        backend: aes_x86::Backend,
        data_key: aes_x86::Aes256Keys,
        tweak_key: aes_x86::Aes256Keys,
    },
    Portable {
        data_key: Aes256,
        tweak_key: Aes256,
    },
}

/// Multiply a tweak by alpha in GF(2^128) (IEEE 1619 little-endian
/// convention). Branch-free.
#[inline]
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

impl Engine {
    /// Initial tweak `T = E_K2(sector_no as 16-byte LE)`, as a LE `u128`.
    fn tweak(&self, sector_no: u64) -> u128 {
        let input = u128::from(sector_no).to_le_bytes();
        match self {
            #[cfg(target_arch = "x86_64")]
            Engine::X86 {
                backend, tweak_key, ..
            } => u128::from_le_bytes(backend.encrypt_block(tweak_key, input)),
            Engine::Portable { tweak_key, .. } => {
                let mut block = GenericArray::from(input);
                tweak_key.encrypt_block(&mut block);
                u128::from_le_bytes(block.into())
            }
        }
    }

    /// XTS over the whole blocks of `data` (its length is a multiple of 16
    /// at every call site), first block with `tweak`; returns the next tweak.
    fn blocks(&self, dir: Dir, tweak: u128, data: &mut [u8]) -> u128 {
        match self {
            #[cfg(target_arch = "x86_64")]
            Engine::X86 {
                backend, data_key, ..
            } => match dir {
                Dir::Encrypt => backend.xts_encrypt(data_key, tweak, data),
                Dir::Decrypt => backend.xts_decrypt(data_key, tweak, data),
            },
            Engine::Portable { data_key, .. } => portable_blocks(data_key, dir, tweak, data),
        }
    }

    /// XTS over a single block.
    fn block(&self, dir: Dir, tweak: u128, block: &mut [u8; BLOCK]) {
        self.blocks(dir, tweak, block);
    }
}

/// The `aes` crate kernel: per chunk of up to 32 blocks, compute the
/// tweaks, XOR, `encrypt_blocks`/`decrypt_blocks` (which runs the blocks in
/// parallel), XOR.
fn portable_blocks(cipher: &Aes256, dir: Dir, mut tweak: u128, data: &mut [u8]) -> u128 {
    const CHUNK: usize = 32;
    let mut buf = [GenericArray::<u8, _>::default(); CHUNK];
    let mut tweaks = [0u128; CHUNK];
    for chunk in data.chunks_mut(BLOCK * CHUNK) {
        let mut n = 0;
        for ((blk, b), t) in chunk
            .chunks_exact(BLOCK)
            .zip(buf.iter_mut())
            .zip(tweaks.iter_mut())
        {
            *t = tweak;
            tweak = mul_alpha(tweak);
            for ((o, i), k) in b.iter_mut().zip(blk).zip(t.to_le_bytes()) {
                *o = i ^ k;
            }
            n += 1;
        }
        let blocks = &mut buf[..n];
        match dir {
            Dir::Encrypt => cipher.encrypt_blocks(blocks),
            Dir::Decrypt => cipher.decrypt_blocks(blocks),
        }
        for ((blk, b), t) in chunk
            .chunks_exact_mut(BLOCK)
            .zip(buf.iter())
            .zip(tweaks.iter())
        {
            for ((o, i), k) in blk.iter_mut().zip(b.iter()).zip(t.to_le_bytes()) {
                *o = i ^ k;
            }
        }
    }
    buf.iter_mut().for_each(|b| b.as_mut_slice().zeroize());
    tweak
}

/// AES-256-XTS cipher for earfs sectors. Holds the expanded data key (K1)
/// and tweak key (K2); they are wiped when the value is dropped.
pub struct SectorCipher {
    engine: Engine,
    kernel: Kernel,
}

impl core::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SectorCipher")
            .field("kernel", &self.kernel.name())
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// Create a cipher from a 512-bit XTS key: `key[..32]` is the data key
    /// K1, `key[32..]` the tweak key K2 (IEEE 1619 order). Uses the fastest
    /// kernel this CPU supports.
    pub fn new(key: &[u8; 64]) -> Self {
        Self::with_kernel(key, Kernel::best()).unwrap_or_else(|| Self::portable(key))
    }

    /// Create a cipher that uses a specific kernel, or `None` if this CPU
    /// cannot run it. Mainly for tests and benchmarks.
    pub fn with_kernel(key: &[u8; 64], kernel: Kernel) -> Option<Self> {
        let mut k1 = [0u8; 32];
        let mut k2 = [0u8; 32];
        k1.copy_from_slice(&key[..32]);
        k2.copy_from_slice(&key[32..]);
        let out = Self::build(&k1, &k2, kernel);
        k1.zeroize();
        k2.zeroize();
        out
    }

    fn build(k1: &[u8; 32], k2: &[u8; 32], kernel: Kernel) -> Option<Self> {
        let engine = match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::VaesAvx512 | Kernel::AesNi => {
                let kind = if kernel == Kernel::VaesAvx512 {
                    aes_x86::Kind::VaesAvx512
                } else {
                    aes_x86::Kind::AesNi
                };
                let backend = aes_x86::Backend::new(kind)?;
                Engine::X86 {
                    backend,
                    data_key: backend.expand_key(k1),
                    tweak_key: backend.expand_key(k2),
                }
            }
            Kernel::Portable => Engine::Portable {
                data_key: Aes256::new(&GenericArray::from(*k1)),
                tweak_key: Aes256::new(&GenericArray::from(*k2)),
            },
            #[allow(unreachable_patterns)]
            _ => return None,
        };
        Some(SectorCipher { engine, kernel })
    }

    fn portable(key: &[u8; 64]) -> Self {
        let mut k1 = [0u8; 32];
        let mut k2 = [0u8; 32];
        k1.copy_from_slice(&key[..32]);
        k2.copy_from_slice(&key[32..]);
        let engine = Engine::Portable {
            data_key: Aes256::new(&GenericArray::from(k1)),
            tweak_key: Aes256::new(&GenericArray::from(k2)),
        };
        k1.zeroize();
        k2.zeroize();
        SectorCipher {
            engine,
            kernel: Kernel::Portable,
        }
    }

    /// The kernel this cipher runs.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Encrypt one sector in place. `data` is the whole sector, normally
    /// 1..=4096 bytes (longer inputs are treated as one data unit too).
    pub fn encrypt_sector(&self, sector_no: u64, data: &mut [u8]) {
        self.sector(Dir::Encrypt, sector_no, data);
    }

    /// Decrypt one sector in place; inverse of [`Self::encrypt_sector`].
    pub fn decrypt_sector(&self, sector_no: u64, data: &mut [u8]) {
        self.sector(Dir::Decrypt, sector_no, data);
    }

    /// Encrypt consecutive sectors in place: `data` is split into
    /// [`SECTOR_SIZE`] chunks (the last may be shorter), chunk `i` being
    /// sector `first_sector + i` (wrapping at `u64::MAX`).
    pub fn encrypt_sectors(&self, first_sector: u64, data: &mut [u8]) {
        for (i, chunk) in data.chunks_mut(SECTOR_SIZE).enumerate() {
            self.sector(Dir::Encrypt, first_sector.wrapping_add(i as u64), chunk);
        }
    }

    /// Decrypt consecutive sectors in place; inverse of
    /// [`Self::encrypt_sectors`].
    pub fn decrypt_sectors(&self, first_sector: u64, data: &mut [u8]) {
        for (i, chunk) in data.chunks_mut(SECTOR_SIZE).enumerate() {
            self.sector(Dir::Decrypt, first_sector.wrapping_add(i as u64), chunk);
        }
    }

    /// Encrypt whole 16-byte blocks of one sector in place: `data` starts at block
    /// `first_block` of sector `sector_no` (block *j* uses the tweak `T·αʲ`), and its
    /// length is a multiple of 16 that ends within the sector. Format v2 stores every
    /// block this way: no ciphertext stealing, so a block decrypts the same whatever
    /// the file's length. A trailing partial block, if any, is left untouched.
    pub fn encrypt_blocks(&self, sector_no: u64, first_block: usize, data: &mut [u8]) {
        self.blocks_at(Dir::Encrypt, sector_no, first_block, data);
    }

    /// Decrypt whole 16-byte blocks of one sector in place; inverse of
    /// [`Self::encrypt_blocks`].
    pub fn decrypt_blocks(&self, sector_no: u64, first_block: usize, data: &mut [u8]) {
        self.blocks_at(Dir::Decrypt, sector_no, first_block, data);
    }

    fn blocks_at(&self, dir: Dir, sector_no: u64, first_block: usize, data: &mut [u8]) {
        let whole = data.len() - data.len() % BLOCK;
        if whole == 0 {
            return;
        }
        let mut tweak = self.engine.tweak(sector_no);
        for _ in 0..first_block {
            tweak = mul_alpha(tweak);
        }
        self.engine.blocks(dir, tweak, &mut data[..whole]);
    }

    fn sector(&self, dir: Dir, sector_no: u64, data: &mut [u8]) {
        let len = data.len();
        if len == 0 {
            return;
        }
        let tweak = self.engine.tweak(sector_no);
        if len < BLOCK {
            // Short last sector: XOR with KS = E_K1(T) ^ T (the XTS
            // encryption of a zero block at index 0). Self-inverse.
            let mut ks = [0u8; BLOCK];
            self.engine.block(Dir::Encrypt, tweak, &mut ks);
            for (d, k) in data.iter_mut().zip(ks.iter()) {
                *d ^= k;
            }
            ks.zeroize();
            return;
        }
        let rem = len % BLOCK;
        if rem == 0 {
            self.engine.blocks(dir, tweak, data);
            return;
        }
        // Ciphertext stealing. `head` = the first m-1 whole blocks, `tail`
        // = the last whole block (16 bytes) followed by the `rem`-byte
        // partial block. len >= 16 + rem, so the split cannot fail.
        let (head, tail) = data.split_at_mut(len - rem - BLOCK);
        let (last_full, partial) = tail.split_at_mut(BLOCK);
        let t_prev = self.engine.blocks(dir, tweak, head); // T_{m-1}
        let t_last = mul_alpha(t_prev); // T_m
        let mut a = [0u8; BLOCK];
        a.copy_from_slice(last_full);
        // Encrypt: CC = XTS(P_{m-1}, T_{m-1}); C_m = CC[..rem];
        //          C_{m-1} = XTS(P_m || CC[rem..], T_m).
        // Decrypt: PP = XTS^-1(C_{m-1}, T_m); P_m = PP[..rem];
        //          P_{m-1} = XTS^-1(C_m || PP[rem..], T_{m-1}).
        // The steps are the same; only the order of the two tweaks differs.
        let (t_first, t_second) = match dir {
            Dir::Encrypt => (t_prev, t_last),
            Dir::Decrypt => (t_last, t_prev),
        };
        self.engine.block(dir, t_first, &mut a);
        let mut b = a;
        b[..rem].copy_from_slice(partial);
        partial.copy_from_slice(&a[..rem]);
        self.engine.block(dir, t_second, &mut b);
        last_full.copy_from_slice(&b);
        b.zeroize();
        a.zeroize();
    }
}
