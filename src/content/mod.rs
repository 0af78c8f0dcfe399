//! The earfs file formats v1 and v2 (docs/file-format.md): the header, sector ranges, size
//! translation and the sector codec. Pure: no file descriptors.

mod codec;
mod header;
mod layout;

pub use crate::crypto::Keyring;
pub use codec::{FileCipher, MIN_HOLE_LEN, is_hole};
pub use header::{
    HeaderError, MAGIC, decode_header, encode_header, header_format, header_names,
    header_never_written, new_header, reformat_header,
};
pub use layout::{
    BLOCK, FileFormat, HEADER_LEN, SECTOR, SectorNo, SectorSpan, backing_size_to_plain_size, pad16,
    plain_off_to_sector, plain_size_to_backing_size, sector_len, size_is_format_independent,
};
