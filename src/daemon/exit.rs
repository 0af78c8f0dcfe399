//! Exit codes of the `earfs` command (docs/exit-codes.md).

/// Any other failure.
pub const FAILURE: u8 = 1;
/// Bad command line (clap's own code).
pub const USAGE: u8 = 2;
/// `earfs status MOUNTPOINT`: no earfs daemon runs for it (LSB's "program is not
/// running", as `systemctl status` exits).
pub const NOT_RUNNING: u8 = 3;
/// The backing directory is missing or is not an earfs volume.
pub const NOT_A_VOLUME: u8 = 10;
/// `earfs.conf` cannot be parsed or names something this build does not support.
pub const BAD_CONFIG: u8 = 11;
/// The key file does not exist.
pub const KEY_MISSING: u8 = 12;
/// The key file is readable or writable by group or others.
pub const KEY_INSECURE: u8 = 13;
/// The data key does not unwrap: wrong key (or the keyring in earfs.conf was altered).
pub const WRONG_KEY: u8 = 14;
/// `earfs.conf` does not authenticate: it was changed.
pub const CONFIG_TAMPERED: u8 = 15;
/// The mountpoint is not empty.
pub const MOUNTPOINT_NOT_EMPTY: u8 = 16;
/// The mountpoint already is a mount (live or dead).
pub const ALREADY_MOUNTED: u8 = 17;
/// The volume is mounted elsewhere (another daemon holds its lock).
pub const VOLUME_IN_USE: u8 = 18;
/// The mountpoint does not exist or is not a directory.
pub const BAD_MOUNTPOINT: u8 = 19;
/// The FUSE mount itself failed (no /dev/fuse, no permission, …).
pub const FUSE_FAILED: u8 = 20;
/// `earfs init` refused: already a volume, or a non-empty directory.
pub const INIT_REFUSED: u8 = 21;
/// `earfs umount`: the path is not an earfs mount.
pub const NOT_MOUNTED: u8 = 22;
/// `earfs umount`: the mount is busy.
pub const BUSY: u8 = 23;
/// The KMS denied a call for lack of a permission.
pub const KMS_DENIED: u8 = 24;
/// The KMS key cannot be used: disabled, pending deletion, destroyed, not found, or of
/// the wrong kind.
pub const KMS_KEY_UNUSABLE: u8 = 25;
/// The KMS could not be reached, or kept failing (throttling, timeouts, 5xx) until the
/// KMS deadline passed.
pub const KMS_UNAVAILABLE: u8 = 26;
/// A CRC32C check of a KMS request or reply failed.
pub const KMS_CHECKSUM: u8 = 27;
/// No usable KMS credentials, or a credentials file that others can read.
pub const KMS_CREDENTIALS: u8 = 28;
/// `earfs kms-check`: at least one permission check failed.
pub const KMS_CHECK_FAILED: u8 = 29;
/// The daemon config file (`--config`) is invalid: an unknown key or a bad value.
pub const CONFIG_FILE: u8 = 30;
/// `earfs retire-key` refused: files still use the key version (in the backing
/// directory, or open in the running daemon).
pub const KEY_IN_USE: u8 = 31;
