//! AES-256 / XTS kernels for x86-64 using AES-NI and VAES + AVX-512.
//!
//! Safe API: a [`Backend`] value can only be obtained through runtime CPU
//! feature detection ([`Backend::new`]), so holding one
//! proves that the instructions it uses are available. All methods on it
//! are safe and bounds-correct for any input length.
//!
//! Conventions: a 128-bit XTS tweak is carried as a `u128` holding the
//! little-endian interpretation of the 16 tweak bytes (IEEE 1619), so that
//! multiplication by alpha is a left shift by one with reduction by 0x87.

use core::arch::x86_64::*;
use zeroize::Zeroize;

/// Number of AES-256 round keys.
const ROUND_KEYS: usize = 15;

/// Multiply a tweak by alpha (x) in GF(2^128), IEEE 1619 little-endian
/// convention. Branch-free.
#[inline(always)]
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

/// Expanded AES-256 key: forward round keys and the round keys of the
/// "equivalent inverse cipher" (for `aesdec`). Zeroized on drop.
pub struct Aes256Keys {
    enc: [[u8; 16]; ROUND_KEYS],
    dec: [[u8; 16]; ROUND_KEYS],
}

impl Drop for Aes256Keys {
    fn drop(&mut self) {
        self.enc.zeroize();
        self.dec.zeroize();
    }
}

impl core::fmt::Debug for Aes256Keys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Aes256Keys { .. }")
    }
}

/// Which x86 kernel a [`Backend`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// 128-bit AES-NI, 8 blocks in flight.
    AesNi,
    /// VAES on 512-bit registers (4 blocks per register, 8 registers in
    /// flight), VPCLMULQDQ tweak generation.
    VaesAvx512,
}

/// Proof that the CPU supports a given [`Kind`]; only constructible after
/// runtime feature detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    kind: Kind,
}

fn has_aesni() -> bool {
    is_x86_feature_detected!("aes") && is_x86_feature_detected!("sse2")
}

fn has_vaes_avx512() -> bool {
    has_aesni()
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("vaes")
        && is_x86_feature_detected!("vpclmulqdq")
}

impl Backend {
    /// The backend of the given kind, if this CPU (and OS) supports it.
    pub fn new(kind: Kind) -> Option<Self> {
        let ok = match kind {
            Kind::AesNi => has_aesni(),
            Kind::VaesAvx512 => has_vaes_avx512(),
        };
        ok.then_some(Backend { kind })
    }

    /// Expand a 256-bit AES key.
    pub fn expand_key(self, key: &[u8; 32]) -> Aes256Keys {
        // SAFETY: every backend kind implies AES-NI (checked in `new`).
        unsafe { expand_key_aesni(key) }
    }

    /// Encrypt one block with AES-256 (used for the XTS tweak).
    pub fn encrypt_block(self, keys: &Aes256Keys, block: [u8; 16]) -> [u8; 16] {
        // SAFETY: every backend kind implies AES-NI.
        unsafe { encrypt_block_aesni(keys, block) }
    }

    /// XTS-encrypt the whole 16-byte blocks of `data` in place (a trailing
    /// partial block, if any, is left untouched), the first block with
    /// `tweak` (already encrypted with the tweak key). Returns the tweak
    /// for the block after the last one processed.
    pub fn xts_encrypt(self, keys: &Aes256Keys, tweak: u128, data: &mut [u8]) -> u128 {
        match self.kind {
            // SAFETY: `Backend` of this kind exists only if detection passed.
            Kind::VaesAvx512 => unsafe { xts_vaes::<false>(&keys.enc, tweak, data) },
            // SAFETY: as above.
            Kind::AesNi => unsafe { xts_aesni::<false>(&keys.enc, tweak, data) },
        }
    }

    /// XTS-decrypt the whole 16-byte blocks of `data` in place; see
    /// [`Backend::xts_encrypt`].
    pub fn xts_decrypt(self, keys: &Aes256Keys, tweak: u128, data: &mut [u8]) -> u128 {
        match self.kind {
            // SAFETY: `Backend` of this kind exists only if detection passed.
            Kind::VaesAvx512 => unsafe { xts_vaes::<true>(&keys.dec, tweak, data) },
            // SAFETY: as above.
            Kind::AesNi => unsafe { xts_aesni::<true>(&keys.dec, tweak, data) },
        }
    }
}

// ---------------------------------------------------------------------------
// 128-bit helpers (SSE2 is part of the x86-64 baseline).

#[inline(always)]
fn load128(b: &[u8; 16]) -> __m128i {
    // SAFETY: reads exactly 16 bytes from a 16-byte array; unaligned load.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

#[inline(always)]
fn store128(v: __m128i) -> [u8; 16] {
    let mut out = [0u8; 16];
    // SAFETY: writes exactly 16 bytes into a 16-byte array; unaligned store.
    unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), v) };
    out
}

#[inline(always)]
fn u128_to_m128(t: u128) -> __m128i {
    load128(&t.to_le_bytes())
}

#[inline(always)]
fn m128_to_u128(v: __m128i) -> u128 {
    u128::from_le_bytes(store128(v))
}

// ---------------------------------------------------------------------------
// Key schedule (FIPS-197, AES-256) with AESKEYGENASSIST.

/// `k ^ (k << 32) ^ (k << 64) ^ (k << 96)` on a 128-bit lane.
macro_rules! prefix_xor {
    ($k:expr) => {{
        let k = $k;
        let k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
        _mm_xor_si128(k, _mm_slli_si128::<8>(k))
    }};
}

/// Even round key: from the previous even key and `RotWord(SubWord(w)) ^ rcon`
/// of the previous odd key.
macro_rules! even_key {
    ($k0:expr, $k1:expr, $rcon:literal) => {{
        let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>($k1));
        _mm_xor_si128(prefix_xor!($k0), t)
    }};
}

/// Odd round key: from the previous odd key and `SubWord(w)` of the
/// previous even key.
macro_rules! odd_key {
    ($k1:expr, $k0:expr) => {{
        let t = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0x00>($k0));
        _mm_xor_si128(prefix_xor!($k1), t)
    }};
}

#[target_feature(enable = "aes,sse2")]
fn expand_key_aesni(key: &[u8; 32]) -> Aes256Keys {
    let mut lo = [0u8; 16];
    let mut hi = [0u8; 16];
    lo.copy_from_slice(&key[..16]);
    hi.copy_from_slice(&key[16..]);
    let mut rk = [_mm_setzero_si128(); ROUND_KEYS];
    rk[0] = load128(&lo);
    rk[1] = load128(&hi);
    lo.zeroize();
    hi.zeroize();
    rk[2] = even_key!(rk[0], rk[1], 0x01);
    rk[3] = odd_key!(rk[1], rk[2]);
    rk[4] = even_key!(rk[2], rk[3], 0x02);
    rk[5] = odd_key!(rk[3], rk[4]);
    rk[6] = even_key!(rk[4], rk[5], 0x04);
    rk[7] = odd_key!(rk[5], rk[6]);
    rk[8] = even_key!(rk[6], rk[7], 0x08);
    rk[9] = odd_key!(rk[7], rk[8]);
    rk[10] = even_key!(rk[8], rk[9], 0x10);
    rk[11] = odd_key!(rk[9], rk[10]);
    rk[12] = even_key!(rk[10], rk[11], 0x20);
    rk[13] = odd_key!(rk[11], rk[12]);
    rk[14] = even_key!(rk[12], rk[13], 0x40);

    let mut keys = Aes256Keys {
        enc: [[0u8; 16]; ROUND_KEYS],
        dec: [[0u8; 16]; ROUND_KEYS],
    };
    for (dst, src) in keys.enc.iter_mut().zip(rk.iter()) {
        *dst = store128(*src);
    }
    // Equivalent inverse cipher: reversed order, InvMixColumns on the
    // inner round keys.
    keys.dec[0] = store128(rk[14]);
    for i in 1..ROUND_KEYS - 1 {
        keys.dec[i] = store128(_mm_aesimc_si128(rk[ROUND_KEYS - 1 - i]));
    }
    keys.dec[ROUND_KEYS - 1] = store128(rk[0]);
    // Wipe the register copies that were spilled to the stack.
    for r in rk.iter_mut() {
        *r = _mm_setzero_si128();
    }
    // Keep the wipe from being optimised away.
    core::hint::black_box(&rk);
    keys
}

#[target_feature(enable = "aes,sse2")]
fn encrypt_block_aesni(keys: &Aes256Keys, block: [u8; 16]) -> [u8; 16] {
    let mut b = _mm_xor_si128(load128(&block), load128(&keys.enc[0]));
    for k in &keys.enc[1..ROUND_KEYS - 1] {
        b = _mm_aesenc_si128(b, load128(k));
    }
    store128(_mm_aesenclast_si128(b, load128(&keys.enc[ROUND_KEYS - 1])))
}

// ---------------------------------------------------------------------------
// AES-NI XTS kernel: 8 independent blocks per iteration.

/// One AES round on 128 bits; `DEC` selects the inverse cipher.
#[target_feature(enable = "aes,sse2")]
#[inline]
fn round128<const DEC: bool>(b: __m128i, k: __m128i) -> __m128i {
    if DEC {
        _mm_aesdec_si128(b, k)
    } else {
        _mm_aesenc_si128(b, k)
    }
}

#[target_feature(enable = "aes,sse2")]
#[inline]
fn last128<const DEC: bool>(b: __m128i, k: __m128i) -> __m128i {
    if DEC {
        _mm_aesdeclast_si128(b, k)
    } else {
        _mm_aesenclast_si128(b, k)
    }
}

/// XTS over one block with 128-bit instructions: `E(P ^ T) ^ T`.
#[target_feature(enable = "aes,sse2")]
#[inline]
fn xts_block128<const DEC: bool>(rk: &[__m128i; ROUND_KEYS], tw: __m128i, p: __m128i) -> __m128i {
    let mut b = _mm_xor_si128(_mm_xor_si128(p, tw), rk[0]);
    for k in &rk[1..ROUND_KEYS - 1] {
        b = round128::<DEC>(b, *k);
    }
    // aesenclast(b, k ^ T) == aesenclast(b, k) ^ T: folds the output whitening.
    last128::<DEC>(b, _mm_xor_si128(rk[ROUND_KEYS - 1], tw))
}

/// XTS over the whole blocks of `data`, one block at a time (tails).
#[target_feature(enable = "aes,sse2")]
#[inline]
fn xts_tail128<const DEC: bool>(
    rk: &[__m128i; ROUND_KEYS],
    mut tweak: u128,
    data: &mut [u8],
) -> u128 {
    for blk in data.chunks_exact_mut(16) {
        let mut buf = [0u8; 16];
        buf.copy_from_slice(blk);
        let out = xts_block128::<DEC>(rk, u128_to_m128(tweak), load128(&buf));
        blk.copy_from_slice(&store128(out));
        tweak = mul_alpha(tweak);
    }
    tweak
}

/// # Safety
/// The CPU must support AES-NI.
#[target_feature(enable = "aes,sse2")]
unsafe fn xts_aesni<const DEC: bool>(
    keys: &[[u8; 16]; ROUND_KEYS],
    mut tweak: u128,
    data: &mut [u8],
) -> u128 {
    const LANES: usize = 8;
    let mut rk = [_mm_setzero_si128(); ROUND_KEYS];
    for (r, k) in rk.iter_mut().zip(keys.iter()) {
        *r = load128(k);
    }
    let mut chunks = data.chunks_exact_mut(16 * LANES);
    for chunk in &mut chunks {
        let p = chunk.as_mut_ptr();
        let mut tw = [_mm_setzero_si128(); LANES];
        let mut b = [_mm_setzero_si128(); LANES];
        for i in 0..LANES {
            tw[i] = u128_to_m128(tweak);
            tweak = mul_alpha(tweak);
            // SAFETY: `chunk` is 16 * LANES bytes long, so block i is in bounds.
            let x = unsafe { _mm_loadu_si128(p.add(16 * i).cast()) };
            b[i] = _mm_xor_si128(_mm_xor_si128(x, tw[i]), rk[0]);
        }
        for k in &rk[1..ROUND_KEYS - 1] {
            for x in b.iter_mut() {
                *x = round128::<DEC>(*x, *k);
            }
        }
        for i in 0..LANES {
            let y = last128::<DEC>(b[i], _mm_xor_si128(rk[ROUND_KEYS - 1], tw[i]));
            // SAFETY: as for the load above.
            unsafe { _mm_storeu_si128(p.add(16 * i).cast(), y) };
        }
    }
    xts_tail128::<DEC>(&rk, tweak, chunks.into_remainder())
}

// ---------------------------------------------------------------------------
// VAES / AVX-512 XTS kernel: 8 zmm registers (32 blocks) per iteration.

#[target_feature(enable = "aes,sse2,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
#[inline]
fn round512<const DEC: bool>(b: __m512i, k: __m512i) -> __m512i {
    if DEC {
        _mm512_aesdec_epi128(b, k)
    } else {
        _mm512_aesenc_epi128(b, k)
    }
}

#[target_feature(enable = "aes,sse2,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
#[inline]
fn last512<const DEC: bool>(b: __m512i, k: __m512i) -> __m512i {
    if DEC {
        _mm512_aesdeclast_epi128(b, k)
    } else {
        _mm512_aesenclast_epi128(b, k)
    }
}

/// Multiply every 128-bit lane by x^(8*N) in GF(2^128): shift left N bytes
/// and fold the N bytes that fall off the top back in with a carry-less
/// multiply by 0x87 (`R` must be `16 - N`; N <= 8 keeps the product below
/// degree 72, so no second reduction is needed). `poly` holds 0x87 in the
/// low qword of each lane.
#[target_feature(enable = "aes,sse2,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
#[inline]
fn mul_x_bytes<const R: i32, const N: i32>(t: __m512i, poly: __m512i) -> __m512i {
    let carry = _mm512_bsrli_epi128::<R>(t);
    let fold = _mm512_clmulepi64_epi128::<0x00>(carry, poly);
    _mm512_xor_si512(_mm512_bslli_epi128::<N>(t), fold)
}

/// Multiply every 128-bit lane by x^4 in GF(2^128).
#[target_feature(enable = "aes,sse2,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
#[inline]
fn mul_x4(t: __m512i, poly: __m512i) -> __m512i {
    // Top 4 bits of each qword.
    let carry = _mm512_srli_epi64::<60>(t);
    // Shift each qword left by 4, carrying the low qword's top bits into
    // the high qword; the lane's top 4 bits are folded back times 0x87.
    let shifted = _mm512_xor_si512(_mm512_slli_epi64::<4>(t), _mm512_bslli_epi128::<8>(carry));
    let fold = _mm512_clmulepi64_epi128::<0x00>(_mm512_bsrli_epi128::<8>(carry), poly);
    _mm512_xor_si512(shifted, fold)
}

/// # Safety
/// The CPU must support AES-NI, AVX2, AVX-512F/BW, VAES and VPCLMULQDQ.
#[target_feature(enable = "aes,sse2,avx2,avx512f,avx512bw,vaes,vpclmulqdq")]
unsafe fn xts_vaes<const DEC: bool>(
    keys: &[[u8; 16]; ROUND_KEYS],
    mut tweak: u128,
    data: &mut [u8],
) -> u128 {
    /// zmm registers in flight (4 blocks each).
    const REGS: usize = 8;
    const BLOCKS: usize = 4 * REGS;

    let mut rk128 = [_mm_setzero_si128(); ROUND_KEYS];
    for (r, k) in rk128.iter_mut().zip(keys.iter()) {
        *r = load128(k);
    }

    let mut chunks = data.chunks_exact_mut(16 * BLOCKS);
    if chunks.len() > 0 {
        let mut rk = [_mm512_setzero_si512(); ROUND_KEYS];
        for (r, k) in rk.iter_mut().zip(rk128.iter()) {
            *r = _mm512_broadcast_i32x4(*k);
        }
        // The reduction constant x^128 = x^7 + x^2 + x + 1 in the low
        // qword of every 128-bit lane.
        let poly = _mm512_set_epi64(0, 0x87, 0, 0x87, 0, 0x87, 0, 0x87);

        // Tweaks T_0..T_31 of the first chunk: T_0..T_3 in scalar code,
        // the other registers by multiplying that one by x^4k in SIMD
        // (no long scalar dependency chain, no store-forwarding stalls).
        let mut lanes = [0u8; 64];
        for lane in lanes.chunks_exact_mut(16) {
            lane.copy_from_slice(&tweak.to_le_bytes());
            tweak = mul_alpha(tweak);
        }
        // SAFETY: reads exactly the 64 bytes of `lanes`.
        let t0 = unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) };
        let t8 = mul_x_bytes::<15, 1>(t0, poly);
        let t16 = mul_x_bytes::<14, 2>(t0, poly);
        let t24 = mul_x_bytes::<13, 3>(t0, poly);
        let mut tw = [
            t0,
            mul_x4(t0, poly),
            t8,
            mul_x4(t8, poly),
            t16,
            mul_x4(t16, poly),
            t24,
            mul_x4(t24, poly),
        ];

        for chunk in &mut chunks {
            let p = chunk.as_mut_ptr();
            let mut b = [_mm512_setzero_si512(); REGS];
            for i in 0..REGS {
                // SAFETY: `chunk` is 64 * REGS bytes long.
                let x = unsafe { _mm512_loadu_si512(p.add(64 * i).cast()) };
                // x ^ tweak ^ round key 0 in one instruction.
                b[i] = _mm512_ternarylogic_epi64::<0x96>(x, tw[i], rk[0]);
            }
            for k in &rk[1..ROUND_KEYS - 1] {
                for x in b.iter_mut() {
                    *x = round512::<DEC>(*x, *k);
                }
            }
            for i in 0..REGS {
                let y = last512::<DEC>(b[i], _mm512_xor_si512(rk[ROUND_KEYS - 1], tw[i]));
                // SAFETY: as for the load above.
                unsafe { _mm512_storeu_si512(p.add(64 * i).cast(), y) };
                // Advance each lane by BLOCKS = 32 positions: times x^32.
                tw[i] = mul_x_bytes::<12, 4>(tw[i], poly);
            }
        }
        // Lane 0 of the first register now holds the next tweak.
        tweak = m128_to_u128(_mm512_castsi512_si128(tw[0]));
    }

    // Remaining (< 32) blocks: one zmm (4 blocks) at a time, then singles.
    let rest = chunks.into_remainder();
    let mut quads = rest.chunks_exact_mut(64);
    if quads.len() > 0 {
        let mut rk = [_mm512_setzero_si512(); ROUND_KEYS];
        for (r, k) in rk.iter_mut().zip(rk128.iter()) {
            *r = _mm512_broadcast_i32x4(*k);
        }
        for quad in &mut quads {
            let mut lanes = [0u8; 64];
            for lane in lanes.chunks_exact_mut(16) {
                lane.copy_from_slice(&tweak.to_le_bytes());
                tweak = mul_alpha(tweak);
            }
            // SAFETY: reads exactly the 64 bytes of `lanes`.
            let tw = unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) };
            let p = quad.as_mut_ptr();
            // SAFETY: `quad` is exactly 64 bytes long.
            let x = unsafe { _mm512_loadu_si512(p.cast()) };
            let mut b = _mm512_ternarylogic_epi64::<0x96>(x, tw, rk[0]);
            for k in &rk[1..ROUND_KEYS - 1] {
                b = round512::<DEC>(b, *k);
            }
            let y = last512::<DEC>(b, _mm512_xor_si512(rk[ROUND_KEYS - 1], tw));
            // SAFETY: as for the load above.
            unsafe { _mm512_storeu_si512(p.cast(), y) };
        }
    }
    xts_tail128::<DEC>(&rk128, tweak, quads.into_remainder())
}
