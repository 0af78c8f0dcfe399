//! Mount options (`-o`, the config file's `options`, an fstab line): which ones earfs
//! knows and what each is. Anything else is refused before mounting, so that a typo
//! never reaches the kernel (EINVAL, exit 20, a restart loop under systemd).

/// What one option is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOpt {
    /// Meaningful only to mount(8), systemd or fstab (`nofail`, `_netdev`, `noauto`,
    /// `defaults`, `x-systemd.*`, `comment=…`): dropped, as mount.fuse3 drops them.
    Userspace,
    /// `allow_other`: other users may use the mount (also `--allow-other`).
    AllowOther,
    /// A mount flag or FUSE option passed to the kernel (`ro`, `noatime`, …).
    Kernel(String),
    /// Already what earfs always does (`default_permissions`, `subtype=earfs`).
    Implied,
    /// One of earfs's own settings, the `earfs mount` flag of the same name:
    /// (`threads`, `Some("4")`), (`writeback_cache`, `None`).
    Earfs(&'static str, Option<String>),
}

/// Mount flags and FUSE options handed to the kernel.
pub const KERNEL: &[&str] = &[
    "ro",
    "rw",
    "noatime",
    "atime",
    "relatime",
    "strictatime",
    "nodiratime",
    "diratime",
    "lazytime",
    "nolazytime",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "sync",
    "async",
    "dirsync",
];

/// Options of mount(8) and systemd that are not for the filesystem.
const USERSPACE: &[&str] = &[
    "defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users", "owner", "group",
];

/// earfs's own options that take a value (`name=VALUE`), as the `earfs mount` flags.
pub const EARFS_VALUED: &[&str] = &[
    "config",
    "threads",
    "log_file",
    "kms_deadline",
    "recheck_interval",
    "revocation_policy",
    "metrics_address",
    "stop_timeout",
    "credentials",
];

/// earfs's own switches.
pub const EARFS_SWITCHES: &[&str] = &["writeback_cache", "no_writeback_cache"];

/// Classify one option; `Err` is a one-line reason naming it.
pub fn classify(opt: &str) -> Result<MountOpt, String> {
    let (name, value) = match opt.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (opt, None),
    };
    if USERSPACE.contains(&opt) || opt.starts_with("x-") || name == "comment" {
        return Ok(MountOpt::Userspace);
    }
    if opt == "allow_other" {
        return Ok(MountOpt::AllowOther);
    }
    if opt == "default_permissions" || opt == "subtype=earfs" {
        return Ok(MountOpt::Implied);
    }
    if KERNEL.contains(&opt) {
        return Ok(MountOpt::Kernel(opt.to_string()));
    }
    if let Some(&n) = EARFS_VALUED.iter().find(|&&n| n == name) {
        return match value {
            Some(v) if !v.is_empty() => Ok(MountOpt::Earfs(n, Some(v.to_string()))),
            _ => Err(format!("mount option {name:?} needs a value: {name}=VALUE")),
        };
    }
    if let Some(&n) = EARFS_SWITCHES.iter().find(|&&n| n == name) {
        return match value {
            None => Ok(MountOpt::Earfs(n, None)),
            Some(_) => Err(format!("mount option {name:?} takes no value")),
        };
    }
    let hint = match name {
        "fsname" | "subtype" => {
            " (earfs sets fsname=earfs:BACKING and subtype=earfs itself)".to_string()
        }
        _ => {
            let dashed = name.replace('-', "_");
            if dashed != name && classify(&opt.replace('-', "_")).is_ok() {
                format!(" (did you mean {:?}?)", opt.replace('-', "_"))
            } else {
                String::new()
            }
        }
    };
    Err(format!(
        "unknown mount option {opt:?}{hint}; see `earfs mount --help` (docs/operations.md lists them)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_every_kind() {
        for o in [
            "nofail",
            "_netdev",
            "noauto",
            "auto",
            "defaults",
            "user",
            "users",
            "x-systemd.requires=earfs-kms.service",
            "x-systemd.automount",
            "x-initrd.mount",
            "comment=systemd.automount",
        ] {
            assert_eq!(classify(o), Ok(MountOpt::Userspace), "{o}");
        }
        assert_eq!(classify("allow_other"), Ok(MountOpt::AllowOther));
        assert_eq!(classify("default_permissions"), Ok(MountOpt::Implied));
        assert_eq!(classify("subtype=earfs"), Ok(MountOpt::Implied));
        for o in KERNEL {
            assert_eq!(classify(o), Ok(MountOpt::Kernel(o.to_string())), "{o}");
        }
        assert_eq!(
            classify("threads=4"),
            Ok(MountOpt::Earfs("threads", Some("4".into())))
        );
        assert_eq!(
            classify("config=/etc/earfs/pg.toml"),
            Ok(MountOpt::Earfs("config", Some("/etc/earfs/pg.toml".into())))
        );
        assert_eq!(
            classify("writeback_cache"),
            Ok(MountOpt::Earfs("writeback_cache", None))
        );
        assert_eq!(
            classify("no_writeback_cache"),
            Ok(MountOpt::Earfs("no_writeback_cache", None))
        );
    }

    #[test]
    fn the_kernel_takes_every_kernel_option() {
        for o in KERNEL {
            assert!(crate::fuse::kernel_flags(&[o.to_string()]).is_ok(), "{o}");
        }
    }

    #[test]
    fn refuses_unknown_and_malformed_options_by_name() {
        for (o, words) in [
            ("nofial", "unknown mount option \"nofial\""),
            ("noatim", "unknown mount option \"noatim\""),
            ("writeback-cache", "did you mean \"writeback_cache\"?"),
            ("threads", "needs a value"),
            ("threads=", "needs a value"),
            ("writeback_cache=1", "takes no value"),
            ("no_writeback_cache=1", "takes no value"),
            ("fsname=x", "earfs sets fsname"),
            ("subtype=sshfs", "earfs sets fsname"),
            ("max_read=4096", "unknown mount option"),
            ("", "unknown mount option \"\""),
        ] {
            let e = classify(o).unwrap_err();
            assert!(e.contains(words), "{o}: {e}");
        }
    }
}
