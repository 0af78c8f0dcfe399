//! Integration tests for the AES-256-XTS sector cipher.
//!
//! Every test runs against EVERY kernel this CPU can execute (not only the
//! one `SectorCipher::new` picks), via `SectorCipher::with_kernel`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aes::Aes256;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockEncrypt, KeyInit};
use earfs::crypto::xts::{Kernel, SECTOR_SIZE, SectorCipher, implementation};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xts_mode::{Xts128, get_tweak_default};

fn hex(s: &str) -> Vec<u8> {
    let s: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(s.len().is_multiple_of(2), "odd hex length");
    s.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

fn kernels() -> Vec<Kernel> {
    let ks: Vec<Kernel> = Kernel::ALL
        .into_iter()
        .filter(|k| k.is_available())
        .collect();
    assert!(ks.contains(&Kernel::Portable));
    ks
}

fn cipher(key: &[u8; 64], kernel: Kernel) -> SectorCipher {
    let c = SectorCipher::with_kernel(key, kernel).expect("kernel available");
    assert_eq!(c.kernel(), kernel);
    c
}

fn key64(bytes: &[u8]) -> [u8; 64] {
    bytes.try_into().expect("64-byte key")
}

// ---------------------------------------------------------------------------
// (1) Known-answer tests.

/// IEEE 1619-2007 Annex B keys of vectors 10..14 (Key1 || Key2).
const IEEE_K256: &str = "2718281828459045235360287471352662497757247093699959574966967627\
                         3141592653589793238462643383279502884197169399375105820974944592";

/// (data-unit sequence number, ciphertext) of IEEE 1619-2007 vectors 10..14
/// (XTS-AES-256, 512-byte data unit, plaintext 00 01 .. ff 00 01 .. ff).
/// Bytes as in BoringSSL's crypto/fipsmodule/cipher/xts_test.cc.
const IEEE_256_VECTORS: [(u64, &str); 5] = [
    (
        0xff,
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e2\
         76f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd5776926c49a3\
         095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0c5cd4d5fff9dac89ae\
         ba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b\
         9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de18\
         34f280d7667b327f6c8cd7557e12ac3a0f93ec05c52e0493ef31a12d3d9260f79a289d\
         6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6dc3966380a\
         d8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f6160\
         15e1327a02b140f1505eb309326d68378f8374595c849d84f4c333ec4423885143cb47\
         bd71c5edae9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f9\
         0c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac6e\
         333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e\
         9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed43851ad77f16f541df\
         d269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa773dad38014bd2092fa7\
         55c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
    ),
    (
        0xffff,
        "77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11e1d022\
         5438e093242d6db274fde801d4cae06f2092c728b2478559df58e837c2469ee4a4fa79\
         4e4bbc7f39bc026e3cb72c33b0888f25b4acf56a2a9804f1ce6d3d6e1dc6ca181d4b54\
         6179d55544aa7760c40d06741539c7e3cd9d2f6650b2013fd0eeb8c2b8e3d8d240ccae\
         2d4c98320a7442e1c8d75a42d6e6cfa4c2eca1798d158c7aecdf82490f24bb9b38e108\
         bcda12c3faf9a21141c3613b58367f922aaa26cd22f23d708dae699ad7cb40a8ad0b6e\
         2784973dcb605684c08b8d6998c69aac049921871ebb65301a4619ca80ecb485a31d74\
         4223ce8ddc2394828d6a80470c092f5ba413c3378fa6054255c6f9df4495862bbb3287\
         681f931b687c888abf844dfc8fc28331e579928cd12bd2390ae123cf03818d14dedde5\
         c0c24c8ab018bfca75ca096f2d531f3d1619e785f1ada437cab92e980558b3dce1474a\
         fb75bfedbf8ff54cb2618e0244c9ac0d3c66fb51598cd2db11f9be39791abe447c6309\
         4f7c453b7ff87cb5bb36b7c79efb0872d17058b83b15ab0866ad8a58656c5a7e20dbdf\
         308b2461d97c0ec0024a2715055249cf3b478ddd4740de654f75ca686e0d7345c69ed5\
         0cdc2a8b332b1f8824108ac937eb050585608ee734097fc09054fbff89eeaeea791f4a\
         7ab1f9868294a4f9e27b42af8100cb9d59cef9645803",
    ),
    (
        0xff_ffff,
        "e387aaa58ba483afa7e8eb469778317ecf4cf573aa9d4eac23f2cdf914e4e200a8b490\
         e42ee646802dc6ee2b471b278195d60918ececb44bf79966f83faba0499298ebc699c0\
         c8634715a320bb4f075d622e74c8c932004f25b41e361025b5a87815391f6108fc4afa\
         6a05d9303c6ba68a128a55705d415985832fdeaae6c8e19110e84d1b1f199a2692119e\
         dc96132658f09da7c623efcec712537a3d94c0bf5d7e352ec94ae5797fdb377dc15511\
         50721adf15bd26a8efc2fcaad56881fa9e62462c28f30ae1ceaca93c345cf243b73f54\
         2e2074a705bd2643bb9f7cc79bb6e7091ea6e232df0f9ad0d6cf502327876d82207abf\
         2115cdacf6d5a48f6c1879a65b115f0f8b3cb3c59d15dd8c769bc014795a1837f3901b\
         5845eb491adfefe097b1fa30a12fc1f65ba22905031539971a10f2f36c321bb51331cd\
         efb39e3964c7ef079994f5b69b2edd83a71ef549971ee93f44eac3938fcdd61d01fa71\
         799da3a8091c4c48aa9ed263ff0749df95d44fef6a0bb578ec69456aa5408ae32c7af0\
         8ad7ba8921287e3bbee31b767be06a0e705c864a769137df28292283ea81a2480241b4\
         4d9921cdbec1bc28dc1fda114bd8e5217ac9d8ebafa720e9da4f9ace231cc949e5b96f\
         e76ffc21063fddc83a6b8679c00d35e09576a875305bed5f36ed242c8900dd1fa965bc\
         950dfce09b132263a1eef52dd6888c309f5a7d712826",
    ),
    (
        0xffff_ffff,
        "bf53d2dade78e822a4d949a9bc6766b01b06a8ef70d26748c6a7fc36d80ae4c5520f7c\
         4ab0ac8544424fa405162fef5a6b7f229498063618d39f0003cb5fb8d1c86b643497da\
         1ff945c8d3bedeca4f479702a7a735f043ddb1d6aaade3c4a0ac7ca7f3fa5279bef56f\
         82cd7a2f38672e824814e10700300a055e1630b8f1cb0e919f5e942010a416e2bf48cb\
         46993d3cb6a51c19bacf864785a00bc2ecff15d350875b246ed53e68be6f55bd7e05cf\
         c2b2ed6432198a6444b6d8c247fab941f569768b5c429366f1d3f00f0345b96123d562\
         04c01c63b22ce78baf116e525ed90fdea39fa469494d3866c31e05f295ff21fea8d4e6\
         e13d67e47ce722e9698a1c1048d68ebcde76b86fcf976eab8aa9790268b7068e017a8b\
         9b749409514f1053027fd16c3786ea1bac5f15cb79711ee2abe82f5cf8b13ae73030ef\
         5b9e4457e75d1304f988d62dd6fc4b94ed38ba831da4b7634971b6cd8ec325d9c61c00\
         f1df73627ed3745a5e8489f3a95c69639c32cd6e1d537a85f75cc844726e8a72fc0077\
         ad22000f1d5078f6b866318c668f1ad03d5a5fced5219f2eabbd0aa5c0f460d183f044\
         04a0d6f469558e81fab24a167905ab4c7878502ad3e38fdbe62a41556cec3732575953\
         3ce8f25f367c87bb5578d667ae93f9e2fd99bcbc5f2fbba88cf6516139420fcff3b736\
         1d86322c4bd84c82f335abb152c4a93411373aaa8220",
    ),
    (
        0xff_ffff_ffff,
        "64497e5a831e4a932c09be3e5393376daa599548b816031d224bbf50a818ed2350eae7\
         e96087c8a0db51ad290bd00c1ac1620857635bf246c176ab463be30b808da548081ac8\
         47b158e1264be25bb0910bbc92647108089415d45fab1b3d2604e8a8eff1ae4020cfa3\
         9936b66827b23f371b92200be90251e6d73c5f86de5fd4a950781933d79a28272b782a\
         2ec313efdfcc0628f43d744c2dc2ff3dcb66999b50c7ca895b0c64791eeaa5f29499fb\
         1c026f84ce5b5c72ba1083cddb5ce45434631665c333b60b11593fb253c5179a2c8db8\
         13782a004856a1653011e93fb6d876c18366dd8683f53412c0c180f9c848592d593f86\
         09ca736317d356e13e2bff3a9f59cd9aeb19cd482593d8c46128bb32423b37a9adfb48\
         2b99453fbe25a41bf6feb4aa0bef5ed24bf73c762978025482c13115e4015aac992e56\
         13a3b5c2f685b84795cb6e9b2656d8c88157e52c42f978d8634c43d06fea928f2822e4\
         65aa6576e9bf419384506cc3ce3c54ac1a6f67dc66f3b30191e698380bc999b05abce1\
         9dc0c6dcc2dd001ec535ba18deb2df1a101023108318c75dc98611a09dc48a0acdec67\
         6fabdf222f07e026f059b672b56e5cbc8e1d21bbd867dd927212054681d70ea737134c\
         dfce93b6f82ae22423274e58a0821cc5502e2d0ab4585e94de6975be5e0b4efce51cd3\
         e70c25a1fbbbd609d273ad5b0d59631c531f6a0a57b9",
    ),
];

#[test]
fn ieee1619_vectors_10_to_14() {
    let key = key64(&hex(IEEE_K256));
    let pt: Vec<u8> = (0..512).map(|i| i as u8).collect();
    for kernel in kernels() {
        let c = cipher(&key, kernel);
        for (seq, ct_hex) in IEEE_256_VECTORS {
            let ct = hex(ct_hex);
            assert_eq!(ct.len(), 512);
            let mut buf = pt.clone();
            c.encrypt_sector(seq, &mut buf);
            assert_eq!(buf, ct, "{kernel:?} encrypt seq {seq:#x}");
            c.decrypt_sector(seq, &mut buf);
            assert_eq!(buf, pt, "{kernel:?} decrypt seq {seq:#x}");
        }
    }
}

/// XTS-AES-256 vectors with ciphertext stealing and short data units:
/// (key, data-unit number, plaintext, ciphertext). From Brian Gladman's
/// XTS test values (as carried in BoringSSL's xts_test.cc) and
/// CryptX's Crypt::Mode::XTS tests (both cross-checked against OpenSSL).
const GLADMAN_KEY: &str = "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0efeeedecebeae9e8e7e6e5e4e3e2e1e0\
                           bfbebdbcbbbab9b8b7b6b5b4b3b2b1b0afaeadacabaaa9a8a7a6a5a4a3a2a1a0";

fn counting(n: usize) -> Vec<u8> {
    (0..n).map(|i| i as u8).collect()
}

#[test]
fn xts_aes_256_ciphertext_stealing_vectors() {
    let cases: [(&str, u64, usize, &str); 10] = [
        (
            GLADMAN_KEY,
            0x12_3456_789a,
            16,
            "c30ca8f2ed57307edc87e544867ac888",
        ),
        (
            GLADMAN_KEY,
            0x12_3456_789a,
            17,
            "7f117752cc598a8b0d81d88af9f9bec8c3",
        ),
        (
            GLADMAN_KEY,
            0x12_3456_789a,
            22,
            "75e8188bcce59ada939f57de2cb9a489c30ca8f2ed57",
        ),
        (
            GLADMAN_KEY,
            0x12_3456_789a,
            31,
            "581ea1fee5516ad432ddebe75fd27c6fc30ca8f2ed57307edc87e544867ac8",
        ),
        (
            GLADMAN_KEY,
            0x12_3456_789a,
            51,
            "c30ca8f2ed57307edc87e544867ac888348c208928d7406269954551cb627b5b\
             bea47768aa25376e924cce6a102ca2e4e1c241",
        ),
        (
            GLADMAN_KEY,
            0x12_3456_789a,
            87,
            "c30ca8f2ed57307edc87e544867ac888348c208928d7406269954551cb627b5b\
             e1c241d0ff691de6b47ad81eac2b925b474e1fd14311edb95219ce64677f497b\
             a436b967e79bb8e8e4c29d1099fe1bbf8917567652e9b4",
        ),
        (
            GLADMAN_KEY,
            0x12_3456_789a,
            158,
            "c30ca8f2ed57307edc87e544867ac888348c208928d7406269954551cb627b5b\
             e1c241d0ff691de6b47ad81eac2b925b474e1fd14311edb95219ce64677f497b\
             8917567652e9b4ef3838baf35e400fe1ffe2f16cfa1900d7ae2b67f0e6f43b71\
             769d1b0e0c0b99ea11de58fcd3b72e1bce3d9a8750b87e945d77f4dc39d73b04\
             a5da920d96beb388ade417027054dbd0e11b6adce343e1f38c6a879463c0",
        ),
        (
            GLADMAN_KEY,
            0x12_3456_789a,
            165,
            "c30ca8f2ed57307edc87e544867ac888348c208928d7406269954551cb627b5b\
             e1c241d0ff691de6b47ad81eac2b925b474e1fd14311edb95219ce64677f497b\
             8917567652e9b4ef3838baf35e400fe1ffe2f16cfa1900d7ae2b67f0e6f43b71\
             769d1b0e0c0b99ea11de58fcd3b72e1bce3d9a8750b87e945d77f4dc39d73b04\
             e11b6adce343e1f38c6a879463c080d7254c4d65cf40e04934108bcde6bda824\
             4a72a90b1e",
        ),
        (IEEE_K256, 1, 16, "cdd765f24ea1d4ecfc5af7233967ef61"),
        (
            IEEE_K256,
            0xff_ffff_ffff,
            33,
            "64497e5a831e4a932c09be3e5393376def5e83dd76a0ea36c1b26e4b8dc944f2aa",
        ),
    ];
    for kernel in kernels() {
        for (key_hex, seq, len, ct_hex) in cases {
            let c = cipher(&key64(&hex(key_hex)), kernel);
            let pt = counting(len);
            let ct = hex(ct_hex);
            assert_eq!(ct.len(), len);
            let mut buf = pt.clone();
            c.encrypt_sector(seq, &mut buf);
            assert_eq!(buf, ct, "{kernel:?} encrypt len {len}");
            c.decrypt_sector(seq, &mut buf);
            assert_eq!(buf, pt, "{kernel:?} decrypt len {len}");
        }
    }
}

// ---------------------------------------------------------------------------
// (2) Against the xts-mode crate on every length 16..=4096.

fn oracle(key: &[u8; 64]) -> Xts128<Aes256> {
    let k1 = Aes256::new(GenericArray::from_slice(&key[..32]));
    let k2 = Aes256::new(GenericArray::from_slice(&key[32..]));
    Xts128::new(k1, k2)
}

#[test]
fn matches_xts_mode_crate_every_length() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    for kernel in kernels() {
        // A few keys per kernel; each length gets a fresh random sector.
        let mut key = [0u8; 64];
        rng.fill(&mut key[..]);
        let mut c = cipher(&key, kernel);
        let mut o = oracle(&key);
        for len in 16..=SECTOR_SIZE {
            if len % 1024 == 0 {
                rng.fill(&mut key[..]);
                c = cipher(&key, kernel);
                o = oracle(&key);
            }
            let sector: u64 = match len % 7 {
                0 => u64::MAX,
                1 => 0,
                _ => rng.r#gen(),
            };
            let tweak = get_tweak_default(u128::from(sector));
            let mut pt = vec![0u8; len];
            rng.fill(&mut pt[..]);

            // Encrypt both ways.
            let mut ours = pt.clone();
            c.encrypt_sector(sector, &mut ours);
            let mut theirs = pt.clone();
            o.encrypt_sector(&mut theirs, tweak);
            assert_eq!(ours, theirs, "{kernel:?} encrypt len {len} sector {sector}");

            // Decrypt our ciphertext with the oracle and vice versa.
            let mut back = ours.clone();
            o.decrypt_sector(&mut back, tweak);
            assert_eq!(back, pt, "{kernel:?} oracle-decrypt len {len}");
            let mut back = theirs;
            c.decrypt_sector(sector, &mut back);
            assert_eq!(back, pt, "{kernel:?} decrypt len {len}");

            // And decrypt of random "ciphertext" matches the oracle.
            let mut ours = pt.clone();
            c.decrypt_sector(sector, &mut ours);
            let mut theirs = pt.clone();
            o.decrypt_sector(&mut theirs, tweak);
            assert_eq!(ours, theirs, "{kernel:?} decrypt-random len {len}");
        }
    }
}

// ---------------------------------------------------------------------------
// (3) Lengths 1..=15: keystream rule, computed here with the `aes` crate.

fn aes_enc(key: &[u8], block: [u8; 16]) -> [u8; 16] {
    let c = Aes256::new(GenericArray::from_slice(key));
    let mut b = GenericArray::from(block);
    c.encrypt_block(&mut b);
    b.into()
}

#[test]
fn short_sectors_use_keystream_rule() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0003);
    for kernel in kernels() {
        for round in 0..20 {
            let mut key = [0u8; 64];
            rng.fill(&mut key[..]);
            let c = cipher(&key, kernel);
            let sector: u64 = if round == 0 { u64::MAX } else { rng.r#gen() };
            // T = AES-Enc_K2(sector LE); KS = AES-Enc_K1(T) ^ T.
            let t = aes_enc(&key[32..], u128::from(sector).to_le_bytes());
            let e = aes_enc(&key[..32], t);
            let ks: Vec<u8> = e.iter().zip(t.iter()).map(|(a, b)| a ^ b).collect();
            for len in 1..16 {
                let mut pt = vec![0u8; len];
                rng.fill(&mut pt[..]);
                let expect: Vec<u8> = pt.iter().zip(ks.iter()).map(|(p, k)| p ^ k).collect();
                let mut buf = pt.clone();
                c.encrypt_sector(sector, &mut buf);
                assert_eq!(buf, expect, "{kernel:?} len {len}");
                c.decrypt_sector(sector, &mut buf);
                assert_eq!(buf, pt, "{kernel:?} round trip len {len}");
            }
        }
    }
}

#[test]
fn empty_sector_is_noop_and_no_length_panics() {
    let key = [7u8; 64];
    for kernel in kernels() {
        let c = cipher(&key, kernel);
        let mut empty: [u8; 0] = [];
        c.encrypt_sector(1, &mut empty);
        c.decrypt_sector(1, &mut empty);
        c.encrypt_sectors(1, &mut empty);
        c.decrypt_sectors(1, &mut empty);
        // Every length 0..=4096 round-trips (and longer inputs do not panic).
        let data: Vec<u8> = (0..SECTOR_SIZE + 100).map(|i| (i * 31) as u8).collect();
        for len in (0..=SECTOR_SIZE).chain([SECTOR_SIZE + 1, SECTOR_SIZE + 16]) {
            let mut buf = data[..len].to_vec();
            c.encrypt_sector(u64::MAX, &mut buf);
            if len >= 16 {
                assert_ne!(buf, data[..len], "{kernel:?} len {len} unchanged");
            }
            c.decrypt_sector(u64::MAX, &mut buf);
            assert_eq!(buf, data[..len], "{kernel:?} len {len}");
        }
    }
}

// ---------------------------------------------------------------------------
// (4) encrypt_sectors == per-sector encrypt_sector.

#[test]
fn multi_sector_equals_per_sector() {
    let mut rng = StdRng::seed_from_u64(0x5eed_0004);
    let lengths = [
        0,
        100,
        SECTOR_SIZE,
        2 * SECTOR_SIZE,
        2 * SECTOR_SIZE + 7,
        3 * SECTOR_SIZE + 1000,
        5 * SECTOR_SIZE + 4095,
        4 * SECTOR_SIZE + 16,
        3 * SECTOR_SIZE + 17,
    ];
    for kernel in kernels() {
        let mut key = [0u8; 64];
        rng.fill(&mut key[..]);
        let c = cipher(&key, kernel);
        for &len in &lengths {
            for first in [0u64, 12345, rng.r#gen(), u64::MAX - 1] {
                let mut pt = vec![0u8; len];
                rng.fill(&mut pt[..]);
                let mut bulk = pt.clone();
                c.encrypt_sectors(first, &mut bulk);
                let mut single = pt.clone();
                for (i, chunk) in single.chunks_mut(SECTOR_SIZE).enumerate() {
                    c.encrypt_sector(first.wrapping_add(i as u64), chunk);
                }
                assert_eq!(bulk, single, "{kernel:?} len {len} first {first}");
                c.decrypt_sectors(first, &mut bulk);
                assert_eq!(bulk, pt, "{kernel:?} decrypt_sectors len {len}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Misc.

#[test]
fn kernels_agree_and_default_is_best() {
    let key: [u8; 64] = core::array::from_fn(|i| (i * 7 + 3) as u8);
    let default = SectorCipher::new(&key);
    assert_eq!(default.kernel().name(), implementation());
    let pt: Vec<u8> = (0..SECTOR_SIZE).map(|i| (i % 251) as u8).collect();
    let mut reference = pt.clone();
    default.encrypt_sector(42, &mut reference);
    for kernel in kernels() {
        let mut buf = pt.clone();
        cipher(&key, kernel).encrypt_sector(42, &mut buf);
        assert_eq!(buf, reference, "{kernel:?}");
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("vaes") && std::is_x86_feature_detected!("avx512f") {
        assert_eq!(implementation(), "vaes-avx512");
    }
}

#[test]
fn debug_does_not_leak_key() {
    let key = [0xabu8; 64];
    for kernel in kernels() {
        let s = format!("{:?}", cipher(&key, kernel));
        assert!(s.contains(kernel.name()), "{s}");
        assert!(
            !s.to_lowercase().contains("ab, ab") && !s.contains("171"),
            "{s}"
        );
    }
}
