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

/// AES block size: the unit of format v2's padding and of its all-zero rule.
pub const BLOCK: u64 = 16;

/// The format a file is written in (its header's version field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FileFormat {
    /// Length-preserving tail (ciphertext stealing, a keystream under 16 bytes), size =
    /// backing length − 4096, all-zero sectors are holes. Read and written forever.
    V1,
    /// Zero-padded 16-byte blocks, the size coded in the backing length, all-zero
    /// blocks read as zeros: no write changes how durable bytes decrypt.
    V2,
}

impl FileFormat {
    /// Every format this build reads and writes, oldest first.
    pub const ALL: [FileFormat; 2] = [FileFormat::V1, FileFormat::V2];
    /// The number stored in file headers and in `earfs.conf`.
    pub fn number(self) -> u16 {
        match self {
            FileFormat::V1 => 1,
            FileFormat::V2 => 2,
        }
    }
    /// The format with that number, if this build knows it.
    pub fn from_number(n: u64) -> Option<FileFormat> {
        match n {
            1 => Some(FileFormat::V1),
            2 => Some(FileFormat::V2),
            _ => None,
        }
    }
}

/// `n` rounded up to a multiple of 16.
pub fn pad16(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

/// Plaintext size of a backing file of `backing` bytes in `format`; `None` if the
/// length is impossible in that format (damage): shorter than a header, or in v2 a
/// length 1..15 bytes past the header.
pub fn backing_size_to_plain_size(format: FileFormat, backing: u64) -> Option<u64> {
    match backing {
        0 => Some(0),
        b if b < HEADER_LEN => None,
        b => match format {
            FileFormat::V1 => Some(b - HEADER_LEN),
            FileFormat::V2 => {
                let (k, j) = ((b - HEADER_LEN) / BLOCK, (b - HEADER_LEN) % BLOCK);
                match (k, j) {
                    (k, 0) => Some(k * BLOCK),
                    (0, _) => None,
                    (k, j) => Some((k - 1) * BLOCK + j),
                }
            }
        },
    }
}

/// Backing size of a file with a header and `plain` bytes of content in `format`:
/// v1 `plain + 4096`; v2 `4096 + 16·⌈plain/16⌉ + plain mod 16` (the padded blocks, then
/// `plain mod 16` marker bytes that are always zero on disk).
pub fn plain_size_to_backing_size(format: FileFormat, plain: u64) -> u64 {
    match format {
        FileFormat::V1 => plain + HEADER_LEN,
        FileFormat::V2 => HEADER_LEN + pad16(plain) + plain % BLOCK,
    }
}

/// Whether a backing length means the same plaintext size in every format (true for
/// sizes that are a multiple of 16): only other lengths need the file's header.
pub fn size_is_format_independent(backing: u64) -> bool {
    backing < HEADER_LEN || (backing - HEADER_LEN).is_multiple_of(BLOCK)
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
        use FileFormat::{V1, V2};
        for f in FileFormat::ALL {
            assert_eq!(backing_size_to_plain_size(f, 0), Some(0));
            assert_eq!(backing_size_to_plain_size(f, 1), None);
            assert_eq!(backing_size_to_plain_size(f, 4095), None);
            assert_eq!(backing_size_to_plain_size(f, 4096), Some(0));
        }
        assert_eq!(backing_size_to_plain_size(V1, 4097), Some(1));
        assert_eq!(plain_size_to_backing_size(V1, 8191), 12287);
        // v2: the worked sizes of docs/file-format.md.
        for (s, l) in [
            (1u64, 4096 + 16 + 1),
            (15, 4096 + 16 + 15),
            (16, 4112),
            (17, 4096 + 32 + 1),
            (31, 4096 + 32 + 15),
            (4095, 4096 + 4096 + 15),
            (4096, 8192),
            (4097, 8192 + 16 + 1),
            (8191, 8192 + 4096 + 15),
        ] {
            assert_eq!(plain_size_to_backing_size(V2, s), l, "size {s}");
            assert_eq!(backing_size_to_plain_size(V2, l), Some(s), "length {l}");
        }
        for l in 4097..4112 {
            assert_eq!(backing_size_to_plain_size(V2, l), None, "length {l}");
        }
        // Every v2 length decodes back to the size that made it.
        for s in 0..70_000u64 {
            let l = plain_size_to_backing_size(V2, s);
            assert_eq!(backing_size_to_plain_size(V2, l), Some(s));
            assert_eq!(
                size_is_format_independent(l),
                s.is_multiple_of(16),
                "size {s}"
            );
        }
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
