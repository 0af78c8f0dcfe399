//! Format v1 fixtures: frozen volumes under tests/fixtures/format-v1/ that this build
//! must decrypt forever, plus a known-answer check that derives the file key and
//! decrypts a sector with independent code (hkdf + the xts-mode crate).
//!
//! The fixtures were written once with `EARFS_WRITE_FIXTURES=1 cargo test --test
//! format_v1 -- --ignored write_fixtures` and are never regenerated.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

#[path = "common/fixture.rs"]
mod fixture;
use fixture::{fixture_copy, open, pattern, read_all, write_fixture_volume};

const SIZES: [u64; 10] = [0, 1, 15, 16, 17, 4095, 4096, 4097, 8191, 12288];
const SPARSE_SIZE: u64 = 3 * 4096 + 100;
const SPARSE_AT: u64 = 3 * 4096 + 50;

fn fixture_dir() -> PathBuf {
    fixture::fixture_dir("format-v1")
}

#[test]
#[ignore = "writes the frozen fixtures; run once by hand"]
fn write_fixtures() {
    if std::env::var_os("EARFS_WRITE_FIXTURES").is_none() {
        return;
    }
    let (fs, fh) = write_fixture_volume(
        &fixture_dir(),
        1,
        "/etc/earfs/fixture-v1.key",
        &SIZES,
        SPARSE_SIZE,
        SPARSE_AT,
    );
    fs.release(fh);
}

#[test]
fn frozen_fixtures_decrypt() {
    let (_tmp, backing, prov, cfg) = fixture_copy(&fixture_dir());
    assert_eq!(
        (cfg.format, cfg.cipher.as_str(), cfg.sector_size),
        (1, "aes-256-xts", 4096)
    );
    let fs = open(&backing, &cfg, &prov);
    for n in SIZES {
        let name = format!("size-{n}");
        assert_eq!(read_all(&fs, &name), pattern(n), "{name}");
        let b = std::fs::metadata(backing.join(&name)).unwrap().len();
        assert_eq!(
            b,
            if n == 0 { 0 } else { n + 4096 },
            "backing size of {name}"
        );
    }
    let mut want = vec![0u8; SPARSE_SIZE as usize];
    want[SPARSE_AT as usize..SPARSE_AT as usize + 4].copy_from_slice(b"tail");
    assert_eq!(read_all(&fs, "sparse"), want);
    // Holes: the first three data sectors are stored as zeros.
    let raw = std::fs::read(backing.join("sparse")).unwrap();
    assert!(raw[4096..4 * 4096].iter().all(|&b| b == 0));
}

#[test]
fn known_answer_with_independent_code() {
    use hkdf::Hkdf;
    use sha2::Sha512;
    use xts_mode::{Xts128, get_tweak_default};
    let (_tmp, backing, prov, cfg) = fixture_copy(&fixture_dir());
    let deks = cfg.unlock(&backing, &prov).unwrap();
    let dek = deks.dek(1).unwrap().expose().to_vec();
    let raw = std::fs::read(backing.join("size-8191")).unwrap();
    assert_eq!(&raw[0..8], b"EARFSHDR");
    assert_eq!(u16::from_le_bytes([raw[8], raw[9]]), 1);
    assert_eq!(u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]), 1);
    let nonce = &raw[16..32];
    let mut info = b"earfs file key v1".to_vec();
    info.extend_from_slice(nonce);
    let mut key = [0u8; 64];
    Hkdf::<Sha512>::new(None, &dek)
        .expand(&info, &mut key)
        .unwrap();
    // Header MAC: HMAC-SHA256 under HKDF(DEK, "earfs header mac v1") over bytes 0..32.
    use hmac::{Hmac, Mac};
    let mut mk = [0u8; 32];
    Hkdf::<Sha512>::new(None, &dek)
        .expand(b"earfs header mac v1", &mut mk)
        .unwrap();
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&mk).unwrap();
    mac.update(&raw[..32]);
    assert_eq!(mac.finalize().into_bytes().as_slice(), &raw[32..64]);
    // Sector 0 (full) and sector 1 (4095 bytes: ciphertext stealing).
    use aes::cipher::KeyInit;
    let xts = Xts128::new(
        aes::Aes256::new_from_slice(&key[..32]).unwrap(),
        aes::Aes256::new_from_slice(&key[32..]).unwrap(),
    );
    let want = pattern(8191);
    let mut s0 = raw[4096..8192].to_vec();
    xts.decrypt_sector(&mut s0, get_tweak_default(0));
    assert_eq!(s0, want[..4096]);
    let mut s1 = raw[8192..].to_vec();
    xts.decrypt_sector(&mut s1, get_tweak_default(1));
    assert_eq!(s1, want[4096..]);
}
