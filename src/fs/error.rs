//! Errors of the filesystem layer. `fuse::errno` maps each to one errno.

use std::path::PathBuf;

use rustix::io::Errno;

/// An error of a filesystem operation.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The backing filesystem returned this error; it reaches the caller unchanged.
    #[error("{0}")]
    Os(Errno),
    /// The backing file is damaged or foreign: a bad header, or shorter than a header.
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The name is reserved for the volume (`earfs.conf` at the root).
    #[error("reserved name")]
    Reserved,
    /// No such inode or handle (a kernel/daemon mismatch).
    #[error("stale inode or handle")]
    Stale,
    /// The data keys are locked (the CMK was revoked and the policy is `lock`): file
    /// contents cannot be read or written until a recheck unwraps the keys again.
    #[error("the data keys are locked: the KMS key was revoked (see `earfs status`)")]
    KeysLocked,
    /// The operation or mode is not supported.
    #[error("not supported")]
    NotSupported,
    /// The range or argument is invalid.
    #[error("invalid argument")]
    Invalid,
    /// No data past this offset (SEEK_DATA/SEEK_HOLE at or past end of file).
    #[error("no data past offset")]
    NoData,
    /// The attribute does not exist.
    #[error("no such attribute")]
    NoAttr,
    /// The buffer the caller gave is too small.
    #[error("result too large")]
    Range,
    /// The backing directory crosses into another filesystem (inode numbers collide).
    #[error("backing directory spans filesystems")]
    CrossDevice,
    /// Memory for an I/O buffer could not be had.
    #[error("out of memory")]
    NoMemory,
}

impl From<Errno> for FsError {
    fn from(e: Errno) -> Self {
        FsError::Os(e)
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(code) => FsError::Os(Errno::from_raw_os_error(code)),
            None => FsError::Os(Errno::IO),
        }
    }
}

/// Result of a filesystem operation.
pub type FsResult<T> = Result<T, FsError>;
