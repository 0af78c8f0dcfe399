//! Plaintext ↔ backing geometry. Plaintext offsets and backing offsets are never mixed
//! as bare integers across a boundary: sectors are `SectorNo`, and conversions are named.

/// Sector (data unit) size in bytes.
pub const SECTOR: u64 = 4096;
/// The header fills exactly one sector at the start of every non-empty backing file.
pub const HEADER_LEN: u64 = SECTOR;

/// Index of a 4 KiB data sector within a file (sector 0 is plaintext bytes 0..4096).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SectorNo(pub u64);

impl SectorNo {
    /// Offset of this sector in the backing file: (i + 1) · 4096.
    pub fn backing_offset(self) -> u64 {
        (self.0 + 1) * SECTOR
    }
    /// First plaintext byte of this sector.
    pub fn plain_start(self) -> u64 {
        self.0 * SECTOR
    }
    pub fn next(self) -> SectorNo {
        SectorNo(self.0 + 1)
    }
}

/// The sector holding plaintext offset `off`.
pub fn plain_off_to_sector(off: u64) -> SectorNo {
    SectorNo(off / SECTOR)
}

/// Plaintext size of a backing file of `backing` bytes; `None` if the file is shorter
/// than a header (damaged).
pub fn backing_size_to_plain_size(backing: u64) -> Option<u64> {
    match backing {
        0 => Some(0),
        b if b < HEADER_LEN => None,
        b => Some(b - HEADER_LEN),
    }
}

/// Backing size of a file with a header and `plain` bytes of content.
pub fn plain_size_to_backing_size(plain: u64) -> u64 {
    plain + HEADER_LEN
}

/// How many bytes of sector `s` exist in a file of plaintext size `size` (0..=4096).
pub fn sector_len(s: SectorNo, size: u64) -> usize {
    let start = s.plain_start();
    if size <= start {
        0
    } else {
        (size - start).min(SECTOR) as usize
    }
}

/// The whole sectors that cover the plaintext range `[off, off + len)`, `len > 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorSpan {
    pub first: SectorNo,
    /// One past the last sector.
    pub end: SectorNo,
}

impl SectorSpan {
    /// Sectors covering `[off, off + len)`; `None` for an empty range or on overflow.
    pub fn covering(off: u64, len: u64) -> Option<SectorSpan> {
        if len == 0 {
            return None;
        }
        let last = off.checked_add(len - 1)?;
        Some(SectorSpan {
            first: plain_off_to_sector(off),
            end: SectorNo(last / SECTOR + 1),
        })
    }
    pub fn count(self) -> u64 {
        self.end.0 - self.first.0
    }
    /// Plaintext offset of the span start.
    pub fn plain_start(self) -> u64 {
        self.first.plain_start()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(backing_size_to_plain_size(0), Some(0));
        assert_eq!(backing_size_to_plain_size(1), None);
        assert_eq!(backing_size_to_plain_size(4095), None);
        assert_eq!(backing_size_to_plain_size(4096), Some(0));
        assert_eq!(backing_size_to_plain_size(4097), Some(1));
        assert_eq!(plain_size_to_backing_size(8191), 12287);
    }

    #[test]
    fn sector_lengths() {
        for (size, s, want) in [
            (0u64, 0u64, 0usize),
            (1, 0, 1),
            (15, 0, 15),
            (16, 0, 16),
            (17, 0, 17),
            (4095, 0, 4095),
            (4096, 0, 4096),
            (4096, 1, 0),
            (4097, 1, 1),
            (8191, 1, 4095),
            (8191, 2, 0),
        ] {
            assert_eq!(
                sector_len(SectorNo(s), size),
                want,
                "size {size} sector {s}"
            );
        }
    }

    #[test]
    fn spans() {
        assert_eq!(SectorSpan::covering(0, 0), None);
        let s = SectorSpan::covering(4095, 2).unwrap();
        assert_eq!((s.first, s.end), (SectorNo(0), SectorNo(2)));
        let s = SectorSpan::covering(4096, 4096).unwrap();
        assert_eq!((s.first, s.end, s.count()), (SectorNo(1), SectorNo(2), 1));
        assert_eq!(SectorSpan::covering(u64::MAX, 2), None);
        assert_eq!(SectorNo(0).backing_offset(), 4096);
        assert_eq!(SectorNo(2).backing_offset(), 12288);
    }
}
