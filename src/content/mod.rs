//! The earfs file format v1 (docs/file-format.md): the header, sector ranges, size
//! translation and the sector codec. Pure: no file descriptors.

mod codec;
mod header;
mod keyring;
mod layout;

pub use codec::{FileCipher, MIN_HOLE_LEN, is_hole};
pub use header::{FORMAT_VERSION, HeaderError, MAGIC, decode_header, encode_header, new_header};
pub use keyring::Keyring;
pub use layout::{
    HEADER_LEN, SECTOR, SectorNo, SectorSpan, backing_size_to_plain_size, plain_off_to_sector,
    plain_size_to_backing_size, sector_len,
};
