//! Single-thread throughput measurement of the sector cipher, backing
//! `earfs speed [--json]` (in the spirit of `cryptsetup benchmark`).

use std::hint::black_box;
use std::time::{Duration, Instant};

use zeroize::Zeroize;

use super::xts::{Kernel, SECTOR_SIZE, SectorCipher};
use crate::sys::thread_cpu_time;

/// Sectors per buffer pass (1 MiB with 4 KiB sectors).
const BUFFER_SECTORS: usize = 256;

/// Result of [`measure`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SpeedReport {
    /// Kernel that ran (see [`super::xts::implementation`]); `aes_kernel` in JSON, as
    /// in every earfs output.
    #[serde(rename = "aes_kernel")]
    pub implementation: &'static str,
    /// Bytes per sector (one XTS data unit).
    pub sector_size: usize,
    /// Encryption throughput, bytes per second (one thread).
    pub encrypt_bytes_per_sec: f64,
    /// Decryption throughput, bytes per second (one thread).
    pub decrypt_bytes_per_sec: f64,
}

impl std::fmt::Display for SpeedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "aes-256-xts {} B sectors ({}): encrypt {:.1} MiB/s, decrypt {:.1} MiB/s",
            self.sector_size,
            self.implementation,
            self.encrypt_bytes_per_sec / (1024.0 * 1024.0),
            self.decrypt_bytes_per_sec / (1024.0 * 1024.0)
        )
    }
}

/// Measure encryption and decryption throughput of the default kernel on
/// one thread, 4 KiB sectors, a 256-sector buffer and a random key; each
/// direction runs for about `duration_per_direction`. Throughput is bytes
/// per second of the thread's CPU time, as `openssl speed` reports it.
pub fn measure(duration_per_direction: Duration) -> SpeedReport {
    let kernel = Kernel::best();
    measure_kernel(kernel, duration_per_direction).unwrap_or(SpeedReport {
        implementation: kernel.name(),
        sector_size: SECTOR_SIZE,
        encrypt_bytes_per_sec: 0.0,
        decrypt_bytes_per_sec: 0.0,
    })
}

/// Like [`measure`] but with a given kernel; `None` if this CPU cannot
/// run it.
pub fn measure_kernel(kernel: Kernel, duration_per_direction: Duration) -> Option<SpeedReport> {
    let mut key = [0u8; 64];
    if super::random_bytes(&mut key).is_err() {
        // The key only needs to be arbitrary here, not secret.
        for (i, b) in key.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(151).wrapping_add(7);
        }
    }
    let cipher = SectorCipher::with_kernel(&key, kernel)?;
    key.zeroize();

    let mut buf = vec![0u8; BUFFER_SECTORS * SECTOR_SIZE];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in buf.iter_mut() {
        // xorshift64: arbitrary plaintext.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }

    let enc = run(duration_per_direction, &mut buf, |b| {
        cipher.encrypt_sectors(0, b)
    });
    let dec = run(duration_per_direction, &mut buf, |b| {
        cipher.decrypt_sectors(0, b)
    });
    Some(SpeedReport {
        implementation: kernel.name(),
        sector_size: SECTOR_SIZE,
        encrypt_bytes_per_sec: enc,
        decrypt_bytes_per_sec: dec,
    })
}

/// Run `op` over `buf` repeatedly for about `duration` of wall-clock time
/// (after one warm-up pass) and return bytes per second.
///
/// Like `openssl speed` (without `-elapsed`), the divisor is the CPU time
/// the measuring thread actually ran, so time during which other processes
/// preempted it does not count; on an idle machine this equals wall-clock
/// time. Falls back to wall-clock time where no thread CPU clock exists.
fn run(duration: Duration, buf: &mut [u8], op: impl Fn(&mut [u8])) -> f64 {
    op(black_box(&mut *buf));
    let start = Instant::now();
    let cpu_start = thread_cpu_time();
    let mut bytes: u64 = 0;
    loop {
        op(black_box(&mut *buf));
        bytes += buf.len() as u64;
        let elapsed = start.elapsed();
        if elapsed >= duration {
            let cpu = match (cpu_start, thread_cpu_time()) {
                (Some(a), Some(b)) if b > a => b - a,
                _ => elapsed,
            };
            return bytes as f64 / cpu.as_secs_f64();
        }
    }
}
