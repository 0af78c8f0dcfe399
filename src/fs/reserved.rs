//! The names the volume keeps for itself at the backing root: hidden from the mount and
//! passed over by the data commands. `fs` owns the backing directory, so it states them;
//! `volume` stores its config under [`CONFIG_NAME`] (the one edge `volume → fs`, for
//! these names only; see the table in src/lib.rs).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

/// Name of the volume config at the backing root; hidden from the mount.
pub const CONFIG_NAME: &str = "earfs.conf";
/// Name of the config while it is being rewritten; hidden from the mount too.
pub const CONFIG_TMP_NAME: &str = ".earfs.conf.tmp";
/// The data commands' work directory at the backing root (hidden from the mount).
pub const WORK_DIR: &str = ".earfs-work";

/// Whether `name` in the backing root is the volume's own (its config, the data
/// commands' work directory), not a file of the mount.
pub fn is_reserved_root_name(name: &OsStr) -> bool {
    [CONFIG_NAME, CONFIG_TMP_NAME, WORK_DIR]
        .iter()
        .any(|r| name.as_bytes() == r.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_its_temporary_and_the_work_directory_are_reserved() {
        for n in ["earfs.conf", ".earfs.conf.tmp", ".earfs-work"] {
            assert!(is_reserved_root_name(OsStr::new(n)), "{n}");
        }
        for n in ["earfs.conf.tmp", "earfs.con", "", "base", ".earfs-work2"] {
            assert!(!is_reserved_root_name(OsStr::new(n)), "{n}");
        }
    }
}
