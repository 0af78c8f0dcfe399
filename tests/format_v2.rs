//! Format v2 fixtures: a frozen volume under tests/fixtures/format-v2/ that this build
//! must decrypt forever, plus known-answer checks that derive the file key, decode the
//! size from the backing length and decrypt the blocks with independent code (hkdf +
//! the xts-mode crate), and a check that an append to a fixture file changes stored
//! bytes only as v2 allows.
//!
//! The fixtures were written once with `EARFS_WRITE_FIXTURES=1 cargo test --test
//! format_v2 -- --ignored write_fixtures` and are never regenerated.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use earfs::content::FileFormat;
use earfs::fs::ROOT_ID;
use earfs::kms::LocalProvider;
use earfs::volume::VolumeConfig;

#[path = "common/fixture.rs"]
mod fixture;
use fixture::{fixture_copy, open, pattern, read_all, write_fixture_volume};

const SIZES: [u64; 10] = [0, 1, 15, 16, 17, 31, 4095, 4096, 4097, 8191];
/// `sparse`: truncated up to 3 sectors + 100 bytes (sectors 0..3 stay all-zero, stored
/// as zeros), then "tail" written inside block 3 of sector 3 and "end" written as the
/// last 3 bytes (block 6 of sector 3, partial). Blocks 0, 1, 2, 4 and 5 of sector 3
/// are all-zero blocks in a sector that also holds data.
const SPARSE_SIZE: u64 = 3 * 4096 + 100;
const SPARSE_AT: u64 = 3 * 4096 + 50;
const SPARSE_END: &[u8] = b"end";

fn sparse_plain() -> Vec<u8> {
    let mut want = vec![0u8; SPARSE_SIZE as usize];
    want[SPARSE_AT as usize..SPARSE_AT as usize + 4].copy_from_slice(b"tail");
    want[(SPARSE_SIZE as usize - SPARSE_END.len())..].copy_from_slice(SPARSE_END);
    want
}

fn fixture_dir() -> PathBuf {
    fixture::fixture_dir("format-v2")
}

#[test]
#[ignore = "writes the frozen fixtures; run once by hand"]
fn write_fixtures() {
    if std::env::var_os("EARFS_WRITE_FIXTURES").is_none() {
        return;
    }
    let (fs, fh) = write_fixture_volume(
        &fixture_dir(),
        2,
        "/etc/earfs/fixture-v2.key",
        &SIZES,
        SPARSE_SIZE,
        SPARSE_AT,
    );
    fs.write(fh, SPARSE_SIZE - SPARSE_END.len() as u64, SPARSE_END)
        .unwrap();
    fs.fsync(fh, false).unwrap();
    fs.release(fh);
}

// ---- Independent code: the v2 rules written out again, without earfs. ----

/// v2 backing length of a file of plaintext size `s` (0: no header).
fn v2_backing_len(s: u64) -> u64 {
    if s == 0 {
        0
    } else {
        4096 + 16 * s.div_ceil(16) + s % 16
    }
}

/// v2 size decode: `k, j = divmod(L − 4096, 16)`; `s = 16k` if `j == 0`, else
/// `16(k − 1) + j`; `L − 4096` in 1..15 (and `L` in 1..4095) is damage.
fn v2_decode(l: u64) -> Option<u64> {
    if l == 0 {
        return Some(0);
    }
    if l < 4096 {
        return None;
    }
    let (k, j) = ((l - 4096) / 16, (l - 4096) % 16);
    match (k, j) {
        (k, 0) => Some(16 * k),
        (0, _) => None,
        (k, j) => Some(16 * (k - 1) + j),
    }
}

/// The file's XTS key (K1 ‖ K2) after checking its header: magic, version 2, flags 0,
/// key version `kv`, HMAC-SHA256 under HKDF-SHA512(DEK, "earfs header mac v1").
fn check_header_and_derive_key(raw: &[u8], dek: &[u8], kv: u32) -> [u8; 64] {
    use hkdf::Hkdf;
    use hmac::{Hmac, Mac};
    use sha2::Sha512;
    assert!(raw.len() >= 4096);
    assert_eq!(&raw[0..8], b"EARFSHDR");
    assert_eq!(u16::from_le_bytes([raw[8], raw[9]]), 2, "format version");
    assert_eq!(u16::from_le_bytes([raw[10], raw[11]]), 0, "flags");
    assert_eq!(
        u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]),
        kv,
        "key version"
    );
    assert!(raw[64..4096].iter().all(|&b| b == 0), "header padding");
    let mut mk = [0u8; 32];
    Hkdf::<Sha512>::new(None, dek)
        .expand(b"earfs header mac v1", &mut mk)
        .unwrap();
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&mk).unwrap();
    mac.update(&raw[..32]);
    assert_eq!(mac.finalize().into_bytes().as_slice(), &raw[32..64]);
    let mut info = b"earfs file key v1".to_vec();
    info.extend_from_slice(&raw[16..32]);
    let mut key = [0u8; 64];
    Hkdf::<Sha512>::new(None, dek)
        .expand(&info, &mut key)
        .unwrap();
    assert_ne!(key[..32], key[32..]);
    key
}

fn xts(key: &[u8; 64]) -> xts_mode::Xts128<aes::Aes256> {
    use aes::cipher::KeyInit;
    xts_mode::Xts128::new(
        aes::Aes256::new_from_slice(&key[..32]).unwrap(),
        aes::Aes256::new_from_slice(&key[32..]).unwrap(),
    )
}

/// Decode a v2 backing file with independent code: header, size from the length, then
/// each sector's padded blocks with XTS (data unit = sector number, no stealing); a
/// stored all-zero block reads as zeros. Checks that the padding decrypts to zeros and
/// that the marker bytes are zeros. Returns the plaintext.
fn independent_decode(raw: &[u8], dek: &[u8], kv: u32) -> Vec<u8> {
    use xts_mode::get_tweak_default;
    let l = raw.len() as u64;
    let s = v2_decode(l).unwrap_or_else(|| panic!("length {l} is damage"));
    if s == 0 {
        assert_eq!(l, 0, "an empty file has no header");
        return Vec::new();
    }
    let key = check_header_and_derive_key(raw, dek, kv);
    let x = xts(&key);
    let padded = 16 * s.div_ceil(16);
    assert_eq!(l, 4096 + padded + s % 16);
    let markers = &raw[(4096 + padded) as usize..];
    assert_eq!(markers.len() as u64, s % 16);
    assert!(markers.iter().all(|&b| b == 0), "marker bytes are zeros");
    let mut plain = raw[4096..(4096 + padded) as usize].to_vec();
    for (i, part) in plain.chunks_mut(4096).enumerate() {
        let zero: Vec<bool> = part.chunks(16).map(|b| b.iter().all(|&x| x == 0)).collect();
        // A prefix of a sector (a multiple of 16 bytes): XTS over it with the sector's
        // tweak is the decryption of those blocks at positions 0.. of the sector.
        x.decrypt_sector(part, get_tweak_default(i as u128));
        for (b, z) in part.chunks_mut(16).zip(zero) {
            if z {
                b.fill(0);
            }
        }
    }
    assert!(
        plain[s as usize..].iter().all(|&b| b == 0),
        "padding decrypts to zeros"
    );
    plain.truncate(s as usize);
    plain
}

fn dek_of(backing: &Path, cfg: &VolumeConfig, prov: &LocalProvider) -> Vec<u8> {
    let deks = cfg.unlock(backing, prov).unwrap();
    assert_eq!(deks.len(), 1);
    deks.current().1.expose().to_vec()
}

#[test]
fn frozen_fixtures_decrypt() {
    let (_tmp, backing, prov, cfg) = fixture_copy(&fixture_dir());
    assert_eq!(
        (cfg.format, cfg.cipher.as_str(), cfg.sector_size),
        (2, "aes-256-xts", 4096)
    );
    let fs = open(&backing, &cfg, &prov);
    assert_eq!(fs.write_format(), FileFormat::V2);
    for n in SIZES {
        let name = format!("size-{n}");
        assert_eq!(read_all(&fs, &name), pattern(n), "{name}");
        let b = std::fs::metadata(backing.join(&name)).unwrap().len();
        assert_eq!(b, v2_backing_len(n), "backing size of {name}");
    }
    assert_eq!(read_all(&fs, "sparse"), sparse_plain());
    let raw = std::fs::read(backing.join("sparse")).unwrap();
    assert_eq!(raw.len() as u64, v2_backing_len(SPARSE_SIZE));
    assert_eq!(raw.len(), 4096 + 12400 + 4);
}

#[test]
fn known_answer_with_independent_code() {
    use xts_mode::get_tweak_default;
    let (_tmp, backing, prov, cfg) = fixture_copy(&fixture_dir());
    let dek = dek_of(&backing, &cfg, &prov);
    let kv = cfg.keyring.current;

    // The size code, by hand.
    for (s, l) in [
        (0u64, 0u64),
        (1, 4113),
        (15, 4127),
        (16, 4112),
        (17, 4129),
        (31, 4143),
        (4095, 8207),
        (4096, 8192),
        (4097, 8209),
        (8191, 12303),
    ] {
        assert_eq!(v2_backing_len(s), l, "size {s}");
        assert_eq!(v2_decode(l), Some(s), "length {l}");
    }
    for l in (1..4096).chain(4097..4112) {
        assert_eq!(v2_decode(l), None, "length {l} is damage");
    }
    for s in 0..20_000u64 {
        assert_eq!(v2_decode(v2_backing_len(s)), Some(s));
    }

    // Every fixture file decodes with independent code.
    for n in SIZES {
        let raw = std::fs::read(backing.join(format!("size-{n}"))).unwrap();
        assert_eq!(raw.len() as u64, v2_backing_len(n), "size-{n}");
        assert_eq!(independent_decode(&raw, &dek, kv), pattern(n), "size-{n}");
        // Data written by a program is encrypted: no stored block is all zero.
        if n > 0 {
            let padded = 16 * n.div_ceil(16) as usize;
            assert!(
                raw[4096..4096 + padded]
                    .chunks(16)
                    .all(|b| b.iter().any(|&x| x != 0)),
                "size-{n}"
            );
        }
    }

    // size-8191 by hand: sector 0 is a plain XTS sector, sector 1 is 4095 bytes padded
    // to 4096 (255 data blocks + 1 block of 15 data bytes and a zero), 15 markers.
    let raw = std::fs::read(backing.join("size-8191")).unwrap();
    let key = check_header_and_derive_key(&raw, &dek, kv);
    let x = xts(&key);
    let want = pattern(8191);
    let mut s0 = raw[4096..8192].to_vec();
    x.decrypt_sector(&mut s0, get_tweak_default(0));
    assert_eq!(s0, want[..4096]);
    let mut s1 = raw[8192..12288].to_vec();
    x.decrypt_sector(&mut s1, get_tweak_default(1));
    assert_eq!(s1[..4095], want[4096..]);
    assert_eq!(s1[4095], 0);
    assert_eq!(&raw[12288..], &[0u8; 15]);

    // size-17: block 0 full, block 1 holds one byte and 15 zeros, then 1 marker byte.
    // Each block decrypts on its own with the tweak of its position (T·α^j).
    let raw = std::fs::read(backing.join("size-17")).unwrap();
    let key = check_header_and_derive_key(&raw, &dek, kv);
    let x = xts(&key);
    let mut both = raw[4096..4128].to_vec();
    x.decrypt_sector(&mut both, get_tweak_default(0));
    let mut b0 = raw[4096..4112].to_vec();
    x.decrypt_sector(&mut b0, get_tweak_default(0));
    assert_eq!(b0, both[..16]);
    assert_eq!(both[..17], pattern(17)[..]);
    assert!(both[17..].iter().all(|&b| b == 0));
    assert_eq!(raw[4128], 0);

    // size-16 has the v1 length (s + 4096) and no marker; size-1 is one padded block.
    assert_eq!(
        std::fs::metadata(backing.join("size-16")).unwrap().len(),
        4112
    );
    let raw = std::fs::read(backing.join("size-1")).unwrap();
    let key = check_header_and_derive_key(&raw, &dek, kv);
    let mut blk = raw[4096..4112].to_vec();
    xts(&key).decrypt_sector(&mut blk, get_tweak_default(0));
    assert_eq!(blk[0], pattern(1)[0]);
    assert!(blk[1..].iter().all(|&b| b == 0));
    assert_eq!(raw[4112], 0);

    // sparse: whole all-zero sectors, and all-zero blocks inside sector 3 next to data,
    // are stored as zeros and read as zeros; XTS of a zero block is not zero, so this
    // is the all-zero rule at work, not a coincidence.
    let raw = std::fs::read(backing.join("sparse")).unwrap();
    assert!(raw[4096..4 * 4096].iter().all(|&b| b == 0), "sectors 0..3");
    let s3 = &raw[4 * 4096..4 * 4096 + 112];
    let zero_blocks: Vec<usize> = s3
        .chunks(16)
        .enumerate()
        .filter(|(_, b)| b.iter().all(|&x| x == 0))
        .map(|(j, _)| j)
        .collect();
    assert_eq!(
        zero_blocks,
        [0, 1, 2, 4, 5],
        "stored zero blocks of sector 3"
    );
    assert_eq!(&raw[4 * 4096 + 112..], &[0u8; 4], "markers");
    assert_eq!(independent_decode(&raw, &dek, kv), sparse_plain());
    let key = check_header_and_derive_key(&raw, &dek, kv);
    let mut z = [0u8; 16];
    xts(&key).decrypt_sector(&mut z, get_tweak_default(3));
    assert_ne!(z, [0u8; 16]);
}

#[test]
fn append_to_fixture_copy_keeps_earlier_blocks() {
    let (_tmp, backing, prov, cfg) = fixture_copy(&fixture_dir());
    let dek = dek_of(&backing, &cfg, &prov);
    let kv = cfg.keyring.current;
    let path = backing.join("size-17");
    let before = std::fs::read(&path).unwrap();
    assert_eq!(before.len(), 4129);

    // Append 4100 bytes: the file grows from 17 to 4117 bytes, into sector 1.
    let more: Vec<u8> = (0..4100u64).map(|i| ((i * 13 + 5) % 251) as u8).collect();
    let fs = open(&backing, &cfg, &prov);
    let a = fs.lookup(ROOT_ID, OsStr::new("size-17")).unwrap();
    let fh = fs.open(a.ino, libc::O_RDWR).unwrap();
    assert_eq!(fs.write(fh, 17, &more).unwrap(), more.len());
    fs.fsync(fh, false).unwrap();
    fs.release(fh);

    let mut want = pattern(17);
    want.extend_from_slice(&more);
    assert_eq!(read_all(&fs, "size-17"), want);

    let after = std::fs::read(&path).unwrap();
    assert_eq!(after.len() as u64, v2_backing_len(4117));
    assert_eq!(after.len(), 4096 + 4128 + 5);
    // The header (nonce, key version, format) is the same, and block 0 (the only
    // earlier whole block) is unchanged byte for byte.
    assert_eq!(after[..4096], before[..4096]);
    assert_eq!(after[4096..4112], before[4096..4112], "block 0 unchanged");
    // Block 1 (byte 16 and padding) was rewritten: its new contents decrypt to byte 16
    // followed by the appended bytes.
    assert_ne!(after[4112..4128], before[4112..4128]);
    assert_eq!(independent_decode(&after, &dek, kv), want);
    // And the old block 1 still decrypts on its own to byte 16 and zeros: it was valid
    // under every length, so a crash before the rewrite reached disk would keep it.
    use xts_mode::get_tweak_default;
    let key = check_header_and_derive_key(&before, &dek, kv);
    let mut old = before[4096..4128].to_vec();
    xts(&key).decrypt_sector(&mut old, get_tweak_default(0));
    assert_eq!(old[16], pattern(17)[16]);
    assert!(old[17..].iter().all(|&b| b == 0));
}
