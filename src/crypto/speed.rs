//! Sector cipher throughput on this CPU (`earfs speed`), like `cryptsetup benchmark`.

use std::time::{Duration, Instant};

use super::{SECTOR_SIZE, SectorCipher, XtsKey, implementation, random_bytes};

/// One measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpeedReport {
    pub implementation: &'static str,
    pub sector_size: usize,
    pub encrypt_bytes_per_sec: f64,
    pub decrypt_bytes_per_sec: f64,
}

/// Measure one thread encrypting and decrypting 4 KiB sectors for about `per_direction` each.
pub fn measure(per_direction: Duration) -> Result<SpeedReport, super::CryptoError> {
    let mut k = [0u8; 64];
    random_bytes(&mut k)?;
    let cipher = SectorCipher::new(&XtsKey::new(k)?);
    let mut buf = vec![0u8; 256 * SECTOR_SIZE];
    random_bytes(&mut buf)?;
    let enc = run(per_direction, &mut buf, |no, s| {
        cipher.encrypt_sector(no, s)
    });
    let dec = run(per_direction, &mut buf, |no, s| {
        cipher.decrypt_sector(no, s)
    });
    Ok(SpeedReport {
        implementation: implementation(),
        sector_size: SECTOR_SIZE,
        encrypt_bytes_per_sec: enc,
        decrypt_bytes_per_sec: dec,
    })
}

fn run(d: Duration, buf: &mut [u8], f: impl Fn(u64, &mut [u8])) -> f64 {
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut no = 0u64;
    while start.elapsed() < d {
        for s in buf.chunks_exact_mut(SECTOR_SIZE) {
            f(no, s);
            no += 1;
        }
        bytes += buf.len() as u64;
    }
    bytes as f64 / start.elapsed().as_secs_f64()
}
