//! Criterion benchmark: encrypt_sector / decrypt_sector on one 4 KiB sector,
//! for the default kernel and every other kernel this CPU supports.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use earfs::crypto::xts::{Kernel, SECTOR_SIZE, SectorCipher};

fn bench(c: &mut Criterion) {
    let key: [u8; 64] = core::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
    let mut group = c.benchmark_group("xts-4096");
    group.throughput(Throughput::Bytes(SECTOR_SIZE as u64));
    for kernel in Kernel::ALL {
        let Some(cipher) = SectorCipher::with_kernel(&key, kernel) else {
            continue;
        };
        let mut buf = vec![0x5au8; SECTOR_SIZE];
        group.bench_function(format!("encrypt_sector/{}", kernel.name()), |b| {
            b.iter(|| cipher.encrypt_sector(black_box(7), black_box(&mut buf[..])))
        });
        group.bench_function(format!("decrypt_sector/{}", kernel.name()), |b| {
            b.iter(|| cipher.decrypt_sector(black_box(7), black_box(&mut buf[..])))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
