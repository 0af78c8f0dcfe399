//! A bad option or value never causes a restart loop: every config-file error and
//! every bad `-o` option is refused before mounting, names what is wrong and where,
//! and exits with a code that systemd/earfs@.service's RestartPreventExitStatus=
//! lists (30 for the config file, 2 for the command line).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{MountGuard, Volume, is_mounted, run};

/// The exit codes the unit does not restart on.
fn no_restart_codes() -> BTreeSet<i32> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/earfs@.service");
    let text = std::fs::read_to_string(unit).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RestartPreventExitStatus="))
        .expect("RestartPreventExitStatus= in earfs@.service");
    let codes: BTreeSet<i32> = line
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .collect();
    assert!(codes.contains(&2) && codes.contains(&30), "{codes:?}");
    codes
}

/// Every kind of config-file error (syntax, unknown key, type, value, option), with
/// what the message must say.
const CONFIG_ERRORS: &[(&str, &str)] = &[
    ("threads = \n", "line 1, column 11"),
    ("\n# db\nthreads = \"four\"\n", "line 3, column 11"),
    ("thread = 4\n", "unknown field `thread`"),
    ("threads = 0\n", "threads: 0 is not between 1 and 256"),
    ("threads = 4\nthreads = 5\n", "line 2"),
    ("allow_other = \"yes\"\n", "line 1, column 15"),
    ("log_level = \"loud\"\n", "unknown variant `loud`"),
    ("options = \"noatime\"\n", "line 1, column 11"),
    (
        "options = [\"noatime\", \"nofial\"]\n",
        "line 1, column 23: options: unknown mount option \"nofial\"",
    ),
    (
        "options = [\"writeback_cache\"]\n",
        "write writeback_cache = true instead",
    ),
    ("options = [\"fsname=x\"]\n", "earfs sets fsname"),
    (
        "allow_other = false\noptions = [\"allow_other\"]\n",
        "contradicts allow_other = false",
    ),
    (
        "metrics_address = \"0.0.0.0:9814\"\n",
        "not a loopback address",
    ),
    ("metrics_address = \"here\"\n", "metrics_address"),
    ("stop_timeout = \"soon\"\n", "stop_timeout"),
    (
        "backing = \"data\"\n",
        "backing: data is not an absolute path",
    ),
    (
        "mountpoint = \"mnt\"\n",
        "mountpoint: mnt is not an absolute path",
    ),
    (
        "[kms]\nrecheck_interval = \"15 parsecs\"\n",
        "kms.recheck_interval",
    ),
    (
        "[kms]\nrevocation_policy = \"lok\"\n",
        "unknown variant `lok`",
    ),
    ("[kms]\ndeadline = \"0s\"\n", "kms.deadline"),
    (
        "[kms]\ncredentials_file = \"kms.ini\"\n",
        "kms.credentials_file",
    ),
    ("[kms]\nkey_arn = \"x\"\n", "unknown field `key_arn`"),
];

/// Bad `-o` options of `earfs mount`, with what the message must say.
const FLAG_ERRORS: &[(&str, &str)] = &[
    ("nofial", "-o: unknown mount option \"nofial\""),
    ("noatime,allow-other", "did you mean \"allow_other\"?"),
    ("threads=0", "--threads must be between 1 and 256"),
    ("threads=x", "-o threads=x"),
    ("kms_deadline=2h", "-o kms_deadline=2h"),
    ("recheck_interval=soon", "-o recheck_interval=soon"),
    ("revocation_policy=maybe", "-o revocation_policy=maybe"),
    (
        "metrics_address=0.0.0.0:9814",
        "-o metrics_address=0.0.0.0:9814",
    ),
    ("stop_timeout=x", "-o stop_timeout=x"),
    ("config", "needs a value"),
    ("writeback_cache=yes", "takes no value"),
];

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn every_config_error_exits_with_a_code_the_unit_does_not_restart_on() {
    let codes = no_restart_codes();
    let vol = Volume::new();
    let _guard = MountGuard(vol.mnt.clone());
    let cfg = vol.dir.path().join("db.toml");
    for (text, words) in CONFIG_ERRORS {
        std::fs::write(&cfg, text).unwrap();
        // As the unit runs it, but in the background, so that a case that wrongly
        // mounts returns (and fails) instead of serving.
        let o = run(&[
            "mount",
            "--config",
            cfg.to_str().unwrap(),
            vol.backing.to_str().unwrap(),
            vol.mnt.to_str().unwrap(),
        ]);
        let code = o.status.code().unwrap_or(-1);
        assert!(!is_mounted(&vol.mnt), "{text:?} mounted");
        assert_eq!(code, 30, "{text:?}: {}", stderr(&o));
        assert!(
            codes.contains(&code),
            "{text:?}: exit {code} restarts the unit"
        );
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{text:?}: not one line: {e}");
        assert!(e.contains("db.toml: "), "{text:?}: {e}");
        assert!(e.contains(words), "{text:?}: {e}");
    }
    // A missing or unreadable file is the config's fault too.
    let o = run(&[
        "mount",
        "--config",
        "/nonexistent/earfs.toml",
        vol.backing.to_str().unwrap(),
        vol.mnt.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(30), "{}", stderr(&o));
}

#[test]
fn every_bad_mount_option_exits_2_which_the_unit_does_not_restart_on() {
    let codes = no_restart_codes();
    let vol = Volume::new();
    let _guard = MountGuard(vol.mnt.clone());
    for (opts, words) in FLAG_ERRORS {
        let o = run(&[
            "mount",
            "-o",
            opts,
            vol.backing.to_str().unwrap(),
            vol.mnt.to_str().unwrap(),
        ]);
        let code = o.status.code().unwrap_or(-1);
        assert!(!is_mounted(&vol.mnt), "-o {opts} mounted");
        assert_eq!(code, 2, "-o {opts}: {}", stderr(&o));
        assert!(codes.contains(&code));
        assert!(stderr(&o).contains(words), "-o {opts}: {}", stderr(&o));
    }
}

/// The case: `options = ["noatime","nofail"]` reached the kernel (EINVAL, exit
/// 20, restarted every 10 s). Now nofail is dropped as mount.fuse3 drops it, and
/// allow_other is accepted in `options` and `-o` alike.
#[test]
fn fstab_options_in_the_config_and_allow_other_on_the_command_line_mount() {
    let vol = Volume::new();
    let cfg = vol.dir.path().join("db.toml");
    std::fs::write(
        &cfg,
        "options = [\"noatime\", \"nofail\", \"_netdev\", \"x-systemd.requires=a.service\"]\n",
    )
    .unwrap();
    let m = vol.mount(&[
        "--config",
        cfg.to_str().unwrap(),
        "-o",
        "allow_other,defaults",
    ]);
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == vol.mnt.to_str())
        .unwrap()
        .to_string();
    assert!(line.contains(" - fuse.earfs earfs:"), "{line}");
    assert!(line.contains("noatime"), "{line}");
    assert!(line.contains("allow_other"), "{line}");
    assert!(
        !line.contains("nofail") && !line.contains("_netdev"),
        "{line}"
    );
    std::fs::write(m.path("f"), b"ok").unwrap();
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"ok");
}
