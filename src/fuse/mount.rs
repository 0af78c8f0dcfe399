//! The FUSE mount itself. As root, earfs makes the mount(2) call (what libfuse does):
//! fuser 0.18's own direct mount passes the type "fuse" and drops the subtype, so the
//! mount would show as plain `fuse`, which `findmnt -t fuse.earfs`, `df -t` and
//! node_exporter's fstype label cannot tell from any other FUSE mount. Here the type
//! is "fuse.earfs" and the session is handed the /dev/fuse descriptor
//! (`Session::from_fd`). Without the privilege to mount (EPERM), fuser mounts through
//! fusermount3, which sets the subtype from `subtype=earfs` itself.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use fuser::{Config, MountOption, Session, SessionACL};
use rustix::mount::{MountFlags, UnmountFlags};

use super::EarFuse;

/// The filesystem type in /proc/self/mountinfo (`findmnt -t fuse.earfs`).
pub const FSTYPE: &str = "fuse.earfs";

/// What a mount needs beyond the filesystem.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub fsname: String,
    pub allow_other: bool,
    pub threads: usize,
    /// Mount flags and FUSE options for the kernel (`ro`, `noatime`, …), already
    /// checked (`daemon::mountopts`); an unknown one is an error here too.
    pub options: Vec<String>,
}

/// The mount(2) flags of the options (nodev and nosuid unless `dev`/`suid`, as fuser
/// and libfuse do); the last of two opposites wins, as with mount(8).
pub fn kernel_flags(options: &[String]) -> io::Result<MountFlags> {
    let mut f = MountFlags::NODEV | MountFlags::NOSUID;
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MountFlags::RDONLY, MountFlags::empty()),
            "rw" => (MountFlags::empty(), MountFlags::RDONLY),
            "noatime" => (
                MountFlags::NOATIME,
                MountFlags::RELATIME | MountFlags::STRICTATIME,
            ),
            "atime" => (MountFlags::empty(), MountFlags::NOATIME),
            "relatime" => (
                MountFlags::RELATIME,
                MountFlags::NOATIME | MountFlags::STRICTATIME,
            ),
            "strictatime" => (
                MountFlags::STRICTATIME,
                MountFlags::NOATIME | MountFlags::RELATIME,
            ),
            "nodiratime" => (MountFlags::NODIRATIME, MountFlags::empty()),
            "diratime" => (MountFlags::empty(), MountFlags::NODIRATIME),
            "lazytime" => (MountFlags::LAZYTIME, MountFlags::empty()),
            "nolazytime" => (MountFlags::empty(), MountFlags::LAZYTIME),
            "nosuid" => (MountFlags::NOSUID, MountFlags::empty()),
            "suid" => (MountFlags::empty(), MountFlags::NOSUID),
            "nodev" => (MountFlags::NODEV, MountFlags::empty()),
            "dev" => (MountFlags::empty(), MountFlags::NODEV),
            "noexec" => (MountFlags::NOEXEC, MountFlags::empty()),
            "exec" => (MountFlags::empty(), MountFlags::NOEXEC),
            "sync" => (MountFlags::SYNCHRONOUS, MountFlags::empty()),
            "async" => (MountFlags::empty(), MountFlags::SYNCHRONOUS),
            "dirsync" => (MountFlags::DIRSYNC, MountFlags::empty()),
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unknown mount option {other:?}"),
                ));
            }
        };
        f = (f - clear) | set;
    }
    Ok(f)
}

/// The data string of the FUSE mount(2) call.
fn kernel_data(fd: i32, root_mode: u32, allow_other: bool) -> String {
    let mut d = format!(
        "fd={fd},rootmode={:o},user_id={},group_id={},default_permissions",
        root_mode & libc::S_IFMT,
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw()
    );
    if allow_other {
        d.push_str(",allow_other");
    }
    d
}

/// Mount(2) /dev/fuse at `mountpoint` as "fuse.earfs"; `None` without the privilege
/// (EPERM), so that the caller goes through fusermount3.
fn mount_direct(mountpoint: &Path, cfg: &MountConfig) -> io::Result<Option<OwnedFd>> {
    let flags = kernel_flags(&cfg.options)?;
    let root_mode = rustix::fs::stat(mountpoint)?.st_mode;
    let dev = rustix::fs::open(
        "/dev/fuse",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("/dev/fuse: {e}")))?;
    let data = kernel_data(dev.as_raw_fd(), root_mode, cfg.allow_other);
    let data =
        std::ffi::CString::new(data).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    match rustix::mount::mount(
        cfg.fsname.as_str(),
        mountpoint,
        FSTYPE,
        flags,
        data.as_c_str(),
    ) {
        Ok(()) => Ok(Some(dev)),
        Err(rustix::io::Errno::PERM) => Ok(None),
        Err(e) => Err(io::Error::new(
            io::Error::from(e).kind(),
            format!("mount(2) of {FSTYPE} at {}: {e}", mountpoint.display()),
        )),
    }
}

/// Mount `fs` at `mountpoint`: returns once the kernel handshake is done.
pub fn mount(fs: EarFuse, mountpoint: &Path, cfg: &MountConfig) -> io::Result<Session<EarFuse>> {
    let acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let mut config = Config::default();
    config.acl = acl;
    config.n_threads = Some(cfg.threads.max(1));
    config.clone_fd = true;
    if let Some(dev) = mount_direct(mountpoint, cfg)? {
        return Session::from_fd(fs, dev, acl, config).inspect_err(|_| {
            let _ = rustix::mount::unmount(mountpoint, UnmountFlags::DETACH);
        });
    }
    let mut opts = vec![
        MountOption::FSName(cfg.fsname.clone()),
        MountOption::Subtype("earfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
    ];
    for o in &cfg.options {
        opts.push(match o.as_str() {
            "ro" => MountOption::RO,
            "rw" => MountOption::RW,
            "noatime" => MountOption::NoAtime,
            "atime" => MountOption::Atime,
            "nosuid" => MountOption::NoSuid,
            "suid" => MountOption::Suid,
            "noexec" => MountOption::NoExec,
            "exec" => MountOption::Exec,
            "dirsync" => MountOption::DirSync,
            "sync" => MountOption::Sync,
            "async" => MountOption::Async,
            "dev" => MountOption::Dev,
            "nodev" => MountOption::NoDev,
            other => MountOption::CUSTOM(other.to_string()),
        });
    }
    if opts.contains(&MountOption::Dev) {
        opts.retain(|o| *o != MountOption::NoDev);
    }
    config.mount_options = opts;
    Session::new(fs, mountpoint, &config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(o: &[&str]) -> MountFlags {
        kernel_flags(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn flags_default_to_nodev_nosuid_and_the_last_opposite_wins() {
        assert_eq!(flags(&[]), MountFlags::NODEV | MountFlags::NOSUID);
        assert_eq!(
            flags(&["ro", "noatime", "noexec"]),
            MountFlags::NODEV
                | MountFlags::NOSUID
                | MountFlags::RDONLY
                | MountFlags::NOATIME
                | MountFlags::NOEXEC
        );
        assert_eq!(flags(&["ro", "rw", "dev", "suid"]), MountFlags::empty());
        assert_eq!(flags(&["noatime", "relatime"]), flags(&["relatime"]));
        assert!(kernel_flags(&["nofail".to_string()]).is_err());
    }

    #[test]
    fn data_names_the_descriptor_root_type_and_permissions() {
        let d = kernel_data(7, 0o40755, true);
        assert!(d.starts_with("fd=7,rootmode=40000,user_id="), "{d}");
        assert!(d.ends_with(",default_permissions,allow_other"), "{d}");
        assert!(!kernel_data(7, 0o40755, false).contains("allow_other"));
    }
}
