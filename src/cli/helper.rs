//! The mount(8) helper: `mount -t fuse.earfs SOURCE DIR -o OPTS` and fstab lines of type
//! `fuse.earfs` run `/sbin/mount.fuse.earfs SOURCE DIR [-sfnv] [-o OPTS]` (mount(8),
//! "External helpers"), which is this binary under that name. fuse3's `mount.fuse3
//! 'earfs#SOURCE' DIR -o OPTS` (or type `fuse` with source `earfs#SOURCE`) runs
//! `earfs SOURCE DIR -o OPTS`: the same helper, recognised by a SOURCE with a `/`
//! where a command name would be. Both become `earfs mount -o OPTS SOURCE DIR` and
//! return once the mount serves, the daemon in the background.

use std::ffi::{OsStr, OsString};
use std::path::Path;

use clap::Parser;

use super::{Cli, Command, mount};
use crate::daemon::mountopts;
use crate::daemon::{Failure, exit};

/// Names this binary answers to as a mount helper.
pub const NAMES: &[&str] = &["mount.fuse.earfs", "mount.earfs"];

/// mount(8)'s exit codes, which a helper's caller reads (mount(8) "RETURN CODES").
pub mod mount_exit {
    /// Incorrect invocation or permissions (a bad option, a bad config file).
    pub const USAGE: u8 = 1;
    /// Mount failure (anything else: no volume, a wrong key, the KMS, the mountpoint).
    pub const FAILED: u8 = 32;
}

const USAGE_LINE: &str = "usage: mount.fuse.earfs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]  (or mount -t fuse.earfs SOURCE MOUNTPOINT -o OPTIONS; see `earfs mount --help` for the options)";

/// Is this command line a mount helper call? By the program's name, or (mount.fuse3)
/// by a first argument that is a path.
pub fn is_helper(argv: &[OsString]) -> bool {
    let name = argv
        .first()
        .map(|a| Path::new(a).file_name().unwrap_or(a.as_os_str()))
        .and_then(OsStr::to_str)
        .unwrap_or("");
    if NAMES.contains(&name) {
        return true;
    }
    argv.get(1)
        .and_then(|a| a.to_str())
        .is_some_and(|a| !a.starts_with('-') && (a.contains('/') || a.starts_with("earfs#")))
}

/// mount(8)'s code for an earfs failure.
pub fn mount_code(code: u8) -> u8 {
    match code {
        exit::USAGE | exit::CONFIG_FILE => mount_exit::USAGE,
        _ => mount_exit::FAILED,
    }
}

/// What mount(8) asked for.
#[derive(Debug, PartialEq, Eq)]
struct Call {
    source: OsString,
    mountpoint: OsString,
    options: Vec<String>,
    fake: bool,
    help: bool,
}

fn parse(args: &[OsString]) -> Result<Call, Failure> {
    let usage = |m: String| Failure::new(exit::USAGE, format!("{m}\n{USAGE_LINE}"));
    let mut pos: Vec<OsString> = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let (mut fake, mut sloppy, mut help) = (false, false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(s) = a.to_str() else {
            pos.push(a.clone());
            continue;
        };
        let opts_of = |v: Option<&OsString>| -> Result<String, Failure> {
            v.and_then(|v| v.to_str())
                .map(str::to_string)
                .ok_or_else(|| usage("-o needs a list of options".into()))
        };
        match s {
            "-h" | "--help" => help = true,
            "-o" => options.extend(opts_of(it.next())?.split(',').map(str::to_string)),
            "-t" => {
                it.next();
            }
            _ if s.starts_with("-o") => options.extend(s[2..].split(',').map(str::to_string)),
            _ if s.starts_with("-t") => {}
            "-N" => {
                return Err(usage(
                    "-N (another mount namespace) is not supported".into(),
                ));
            }
            _ if s.starts_with('-') && s.len() > 1 => {
                for c in s[1..].chars() {
                    match c {
                        's' => sloppy = true,
                        'f' => fake = true,
                        'n' | 'v' => {}
                        'r' => options.push("ro".into()),
                        'w' => options.push("rw".into()),
                        _ => return Err(usage(format!("unknown flag -{c}"))),
                    }
                }
            }
            _ => pos.push(a.clone()),
        }
    }
    if help {
        return Ok(Call {
            source: OsString::new(),
            mountpoint: OsString::new(),
            options,
            fake,
            help,
        });
    }
    let [source, mountpoint]: [OsString; 2] = pos.try_into().map_err(|p: Vec<OsString>| {
        usage(format!(
            "needs SOURCE and MOUNTPOINT, got {} arguments",
            p.len()
        ))
    })?;
    // mount.fuse3 strips "earfs#" from "earfs#/data/enc"; a helper may see it whole.
    let source = match source.to_str().and_then(|s| s.strip_prefix("earfs#")) {
        Some(rest) => OsString::from(rest),
        None => source,
    };
    options.retain(|o| !o.is_empty());
    if sloppy {
        // -s: ignore what earfs does not know, as mount(8) documents for helpers.
        options.retain(|o| match mountopts::classify(o) {
            Ok(_) => true,
            Err(m) => {
                eprintln!("earfs: ignoring (-s): {m}");
                false
            }
        });
    }
    Ok(Call {
        source,
        mountpoint,
        options,
        fake,
        help,
    })
}

/// Run a helper call (`argv` as the process got it).
pub fn run(argv: &[OsString]) -> Result<(), Failure> {
    let call = parse(argv.get(1..).unwrap_or_default())?;
    if call.help {
        println!("{USAGE_LINE}");
        return Ok(());
    }
    if call.source.to_str().is_some_and(|s| s.starts_with('-')) {
        return Err(Failure::new(
            exit::USAGE,
            format!("source {:?} starts with '-'", call.source),
        ));
    }
    let mut args: Vec<OsString> = vec!["mount".into()];
    if !call.options.is_empty() {
        args.push("-o".into());
        args.push(call.options.join(",").into());
    }
    args.push(call.source);
    args.push(call.mountpoint);
    let cli = Cli::try_parse_from(std::iter::once(OsString::from("earfs")).chain(args.clone()))
        .map_err(|e| Failure::new(exit::USAGE, e.to_string().trim().to_string()))?;
    let Command::Mount(margs) = cli.command else {
        return Err(Failure::new(exit::FAILURE, "not a mount command"));
    };
    if call.fake {
        // mount -f: check everything, mount nothing.
        let a = mount::fold_options(margs)?;
        return mount::request(&a).map(|_| ());
    }
    if already_mounted(&args[args.len() - 2], &args[args.len() - 1]) {
        // `mount -a` again: libmount compares the fstab SOURCE with the mount's source
        // (earfs:SOURCE), finds no match and calls the helper again; the mount is there.
        return Ok(());
    }
    args.insert(1, "--foreground".into());
    mount::run(margs, args)
}

/// Is `mountpoint` already a live earfs mount of `source`?
fn already_mounted(source: &OsStr, mountpoint: &OsStr) -> bool {
    let (Ok(b), Ok(m)) = (
        std::fs::canonicalize(source),
        std::fs::canonicalize(mountpoint),
    ) else {
        return false;
    };
    crate::daemon::find_mount(&m).is_some_and(|e| e.serves(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn recognised_by_name_or_by_a_path_first() {
        assert!(is_helper(&os(&["/sbin/mount.fuse.earfs", "/a", "/b"])));
        assert!(is_helper(&os(&["mount.earfs", "/a", "/b"])));
        assert!(is_helper(&os(&["earfs", "/data/enc", "/mnt", "-o", "ro"])));
        assert!(is_helper(&os(&["earfs", "earfs#/data/enc", "/mnt"])));
        assert!(!is_helper(&os(&["earfs", "mount", "/data/enc", "/mnt"])));
        assert!(!is_helper(&os(&["earfs", "--version"])));
        assert!(!is_helper(&os(&["earfs"])));
    }

    #[test]
    fn parses_mount8s_helper_convention() {
        let c = parse(&os(&[
            "/data/enc",
            "/mnt",
            "-sv",
            "-o",
            "rw,nofail,,allow_other,bogus",
            "-t",
            "fuse.earfs",
        ]))
        .unwrap();
        assert_eq!(c.source, "/data/enc");
        assert_eq!(c.mountpoint, "/mnt");
        assert_eq!(c.options, vec!["rw", "nofail", "allow_other"]);
        let c = parse(&os(&["earfs#/data/enc", "/mnt", "-f", "-oro", "-r"])).unwrap();
        assert_eq!(c.source, "/data/enc");
        assert!(c.fake);
        assert_eq!(c.options, vec!["ro", "ro"]);
        // Without -s an unknown option stays, for `earfs mount` to refuse by name.
        let c = parse(&os(&["/a", "/b", "-o", "bogus"])).unwrap();
        assert_eq!(c.options, vec!["bogus"]);
        for bad in [
            &["/a"][..],
            &["/a", "/b", "/c"],
            &["/a", "/b", "-o"],
            &["/a", "/b", "-x"],
            &["/a", "/b", "-N", "1"],
        ] {
            let e = parse(&os(bad)).unwrap_err();
            assert_eq!(e.code, exit::USAGE, "{bad:?}");
            assert!(
                e.message.contains("usage: mount.fuse.earfs"),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn maps_to_mount8s_codes() {
        assert_eq!(mount_code(exit::USAGE), 1);
        assert_eq!(mount_code(exit::CONFIG_FILE), 1);
        assert_eq!(mount_code(exit::WRONG_KEY), 32);
        assert_eq!(mount_code(exit::KMS_UNAVAILABLE), 32);
    }
}
