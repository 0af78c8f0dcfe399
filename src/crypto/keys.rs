//! Key types and derivations (format v1, see docs/file-format.md).
//!
//! Derived keys live on the heap in zeroize-on-drop types, so moving one copies a
//! pointer, never key bytes. The `hkdf`, `hmac` and `sha2` versions we use (0.12, 0.12,
//! 0.10) have no zeroize support: their keyed states (the HKDF PRK, the HMAC inner and
//! outer hash states, the padded key blocks) are plain values on the stack. So every
//! function here that derives or uses a key does the work in a callee frame and then
//! overwrites the stack below its own frame ([`wipe_stack`]) before it returns.

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
    /// Take 64 key bytes, refusing equal halves. The bytes are copied straight to the
    /// heap and `bytes` is wiped (also when the key is refused), so no copy of the key
    /// stays behind on the caller's stack.
    pub fn new(bytes: &mut [u8; 64]) -> Result<Self, CryptoError> {
        let mut key = XtsKey(Box::new([0u8; 64]));
        key.0.copy_from_slice(&bytes[..]);
        bytes.zeroize();
        if key.0[..32] == key.0[32..] {
            return Err(CryptoError::WeakXtsKey);
        }
        Ok(key)
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

/// A 32-byte HMAC-SHA256 key (on the heap: a move copies no key bytes).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MacKey(Box<[u8; 32]>);

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(<redacted>)")
    }
}

/// Bytes of stack that [`wipe_stack`] overwrites: well above what an HKDF-SHA512 or
/// HMAC-SHA256 computation (and the building of a file's cipher) uses below the frame
/// that calls it; `tests::derivations_leave_no_key_bytes_on_the_stack` checks it.
const WIPE_STACK_BYTES: usize = 16 * 1024;

/// Overwrite the `WIPE_STACK_BYTES` of stack below the caller's frame with zeros: the
/// frames of the functions the caller called before, and the key material they left.
/// Volatile writes (`zeroize`), so the compiler cannot drop them.
#[inline(never)]
pub fn wipe_stack() {
    let mut area = [0u8; WIPE_STACK_BYTES];
    area.zeroize();
    std::hint::black_box(&area);
}

/// Run `f` in its own frame, then wipe the stack it used.
#[inline(always)]
fn wiped<R>(f: impl FnOnce() -> R) -> R {
    let r = in_callee(f);
    wipe_stack();
    r
}

#[inline(never)]
fn in_callee<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// HKDF-SHA512 expand into `out` (the caller wipes the stack afterwards).
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
    wiped(|| {
        let mut out = [0u8; 64];
        hkdf_expand(dek, &[FILE_KEY_INFO, nonce], &mut out);
        XtsKey::new(&mut out)
    })
}

fn derive_mac_key(dek: &Dek, info: &[u8]) -> MacKey {
    wiped(|| {
        let mut key = MacKey(Box::new([0u8; 32]));
        hkdf_expand(dek, &[info], &mut key.0[..]);
        key
    })
}

/// The key that authenticates file headers made under `dek`.
pub fn derive_header_mac_key(dek: &Dek) -> MacKey {
    derive_mac_key(dek, HEADER_MAC_INFO)
}

/// The key that authenticates `earfs.conf`.
pub fn derive_config_mac_key(dek: &Dek) -> MacKey {
    derive_mac_key(dek, CONFIG_MAC_INFO)
}

fn hmac_of(key: &MacKey, parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so new_from_slice cannot fail for 32 bytes.
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&key.0[..]) {
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
    wiped(|| hmac_of(key, parts).finalize().into_bytes().into())
}

/// Constant-time check of an HMAC-SHA256 tag.
pub fn verify_hmac_sha256(key: &MacKey, parts: &[&[u8]], tag: &[u8]) -> bool {
    wiped(|| hmac_of(key, parts).verify_slice(tag).is_ok())
}

/// For tests: look for key bytes left on the calling thread's stack.
#[cfg(test)]
pub(crate) mod stack_scan {
    use std::collections::HashSet;
    use std::os::unix::fs::FileExt;

    /// Bytes of stack searched below the frame that calls [`leftovers_after`].
    const SCAN: usize = 128 * 1024;

    /// Run `f` with its frames at least 8 KiB below the caller's, so that the stack
    /// the scan itself uses cannot overwrite what `f` left; then read the stack below
    /// the caller (through /proc/self/mem: no unsafe code) and return the indices of
    /// `secrets` of which some 16 bytes in a row are found there.
    #[inline(never)]
    pub fn leftovers_after(secrets: &[Vec<u8>], f: impl FnOnce()) -> Vec<usize> {
        let top = 0u8;
        let top = std::hint::black_box(std::ptr::addr_of!(top)) as usize;
        deep(f);
        let mut stack = vec![0u8; SCAN];
        let mem = std::fs::File::open("/proc/self/mem").unwrap();
        mem.read_exact_at(&mut stack, (top - SCAN) as u64).unwrap();
        secrets
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                let windows: HashSet<&[u8]> = s.windows(16).collect();
                stack.windows(16).any(|w| windows.contains(w))
            })
            .map(|(i, _)| i)
            .collect()
    }

    #[inline(never)]
    fn deep(f: impl FnOnce()) {
        let pad = [1u8; 8192];
        std::hint::black_box(&pad);
        f();
        std::hint::black_box(&pad);
    }

    /// `k` XORed with the HMAC inner pad, as the padded key block holds it.
    pub fn ipad(k: &[u8]) -> Vec<u8> {
        k.iter().map(|b| b ^ 0x36).collect()
    }
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
        let mut b = [5u8; 64];
        assert_eq!(XtsKey::new(&mut b).unwrap_err(), CryptoError::WeakXtsKey);
        assert_eq!(b, [0u8; 64], "the refused key bytes are wiped too");
    }

    #[test]
    fn xts_key_new_wipes_its_input() {
        let mut b: [u8; 64] = std::array::from_fn(|i| i as u8 + 1);
        let want = b;
        let k = XtsKey::new(&mut b).unwrap();
        assert_eq!(b, [0u8; 64]);
        assert_eq!(k.bytes(), &want);
    }

    #[test]
    fn derivations_leave_no_key_bytes_on_the_stack() {
        use stack_scan::{ipad, leftovers_after};
        let nonce = [3u8; 16];
        // The DEK and what is derived from it, computed on another thread, whose stack
        // is not searched.
        let (dek, secrets) = std::thread::spawn(move || {
            let dek = Dek::generate().unwrap();
            let file_key = derive_file_key(&dek, &nonce).unwrap().bytes().to_vec();
            let mac_key = derive_header_mac_key(&dek).0.to_vec();
            let (prk, _) = Hkdf::<Sha512>::extract(None, &dek.expose()[..]);
            let secrets = vec![
                dek.expose().to_vec(),
                file_key,
                prk.to_vec(),
                ipad(&prk),
                mac_key.clone(),
                ipad(&mac_key),
            ];
            (dek, secrets)
        })
        .join()
        .unwrap();
        let found = std::thread::spawn(move || {
            leftovers_after(&secrets, || {
                let k = derive_file_key(&dek, &nonce).unwrap();
                std::hint::black_box(&k);
                let m = derive_header_mac_key(&dek);
                let tag = hmac_sha256(&m, &[b"header bytes"]);
                assert!(verify_hmac_sha256(&m, &[b"header bytes"], &tag));
                std::hint::black_box(derive_config_mac_key(&dek));
            })
        })
        .join()
        .unwrap();
        // 0: DEK, 1: file key, 2: PRK, 3: PRK ^ ipad, 4: MAC key, 5: MAC key ^ ipad.
        assert_eq!(found, Vec::<usize>::new(), "key bytes left on the stack");
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
