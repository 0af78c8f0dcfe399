//! Kill a keyring command (`earfs rotate`, `upgrade`, `rewrap`, `import-keyring`,
//! `retire-key`) with SIGKILL at each of its steps, without test hooks in the binary:
//! strace's fault injection delivers SIGKILL on entering the Nth call of one system
//! call (`-e inject=SYSCALL:signal=KILL:when=N`), for every system call that
//! `earfs.conf`'s atomic save makes (open, write, fsync, rename) and every N until the
//! command completes. After each kill the volume's `earfs.conf` must load and authenticate (with the key file it records) and hold
//! exactly the old state or exactly the new one; the command run again must finish and
//! leave the new state (from the new state it may also refuse, as the case says, and
//! leave it as it is); the volume must mount and a file written before must read back.
//!
//! A command is plugged in with a [`KillCase`]: its arguments and a check of "the state
//! the command leaves", see `tests/keyring_kill.rs`. For example:
//! ```text
//! #[test]
//! fn retire_key_killed_at_each_step_leaves_the_old_keyring_or_the_new_one() {
//!     kill_at_every_step(&KillCase {
//!         name: "retire-key",
//!         format: FileFormat::V2,
//!         args: &["retire-key", "--version", "1", "{backing}"],
//!         // Make version 2 current first and write the file written before again
//!         // as a new file (under version 2), so that version 1 can go.
//!         prepare: &|dir, backing, _| { /* earfs rotate; mount, rewrite the file */ },
//!         // Exactly one complete run's change: version 1 gone, the rest unchanged.
//!         is_new: &|before, after| { /* … */ },
//!         // Run again, it finds no version 1 and refuses (exit 2), changing nothing.
//!         again_exit: 2,
//!     });
//! }
//! ```

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};

use earfs::kms::{LocalProvider, ProviderSpec};
use earfs::volume::VolumeConfig;

use super::{TestDir, earfs, init_local_in, mount_at};

/// The system calls a kill is injected into: those of the atomic save (tmp opened,
/// written, fsynced, renamed, directory opened and fsynced) under every name the C
/// library may use for them.
pub const SYSCALLS: [&str; 7] = [
    "openat",
    "write",
    "fsync",
    "fdatasync",
    "rename",
    "renameat",
    "renameat2",
];

/// One command to kill at every step.
pub struct KillCase<'a> {
    /// For messages.
    pub name: &'a str,
    /// The format the volume is created in (`earfs init --format-version`).
    pub format: earfs::content::FileFormat,
    /// The command's arguments after `earfs`; `{backing}` is replaced by the volume's
    /// backing directory and `{dir}` by a directory that stays for the whole test
    /// (beside the key file; put files the command reads there in `prepare`).
    pub args: &'a [&'a str],
    /// Run once on the freshly created template volume (unmounted, with the file
    /// written), before the states are recorded: `(dir, backing, key file)`.
    pub prepare: &'a dyn Fn(&Path, &Path, &Path),
    /// Whether `after` is the state the command leaves when run on `before`. It must
    /// be false for `after == before` and true for exactly what one complete run makes.
    pub is_new: &'a dyn Fn(&VolumeConfig, &VolumeConfig) -> bool,
    /// The exit code of the command run again on the state it left: 0 when it then has
    /// nothing to do or makes its change once more (`is_new(new, again)`), or the code
    /// of its refusal, which must leave `earfs.conf` byte for byte as it was. From the
    /// old state a run must always succeed.
    pub again_exit: i32,
}

/// What one kill point left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Old,
    New,
}

/// The counts of one command's run through every kill point.
#[derive(Debug, Default)]
pub struct KillReport {
    /// Runs killed, in all.
    pub kills: usize,
    pub old: usize,
    pub new: usize,
    /// Per system call: (name, runs killed, outcomes in invocation order).
    pub per_syscall: Vec<(&'static str, Vec<Outcome>)>,
}

impl KillReport {
    /// The outcomes of kills injected into `syscall`, in invocation order.
    pub fn outcomes(&self, syscall: &str) -> &[Outcome] {
        self.per_syscall
            .iter()
            .find(|(s, _)| *s == syscall)
            .map(|(_, o)| o.as_slice())
            .unwrap_or(&[])
    }
}

const FILE: &str = "rows.db";
const ROWS: &[u8] = b"rows written before the keyring changed\n";

/// The volume's config, loaded and authenticated with the local key file it records
/// (panics if either fails, or if its provider is not the local one).
pub fn authenticated(backing: &Path) -> VolumeConfig {
    let cfg =
        VolumeConfig::load(backing).unwrap_or_else(|e| panic!("earfs.conf does not load: {e}"));
    let ProviderSpec::Local { key_file } = &cfg.kms else {
        panic!("earfs.conf records {}, not a local key", cfg.kms.name());
    };
    let prov = LocalProvider::open(key_file).expect("open the local key");
    cfg.unlock(backing, &prov)
        .unwrap_or_else(|e| panic!("earfs.conf does not authenticate: {e}"));
    cfg
}

fn args(case: &KillCase<'_>, dir: &Path, backing: &Path) -> Vec<String> {
    case.args
        .iter()
        .map(|a| {
            a.replace("{backing}", backing.to_str().unwrap())
                .replace("{dir}", dir.to_str().unwrap())
        })
        .collect()
}

fn show(out: &Output) -> String {
    format!(
        "{:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn copy_volume(from: &Path, to: &Path) {
    if to.exists() {
        std::fs::remove_dir_all(to).unwrap();
    }
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

/// Mount `backing` and check the file written before reads back; unmounted on return,
/// also when the check fails.
fn mounts_and_reads(backing: &Path, mnt: &Path, what: &str) {
    let m = mount_at(backing, mnt);
    let got = std::fs::read(mnt.join(FILE));
    drop(m);
    assert_eq!(
        got.as_deref().ok(),
        Some(ROWS),
        "{what}: the file written before does not read back"
    );
}

/// Kill `case`'s command at every step; see the module comment. Panics on any
/// violation; returns the counts (already printed).
pub fn kill_at_every_step(case: &KillCase<'_>) -> KillReport {
    let t = TestDir::new("earfs-kill-");
    let dir = t.path().to_path_buf();
    let key = dir.join("key");
    let template = dir.join("template");
    let work = dir.join("backing");
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();

    // The template volume, with a file written through a mount.
    init_local_in(&key, &template, case.format);
    {
        let _m = mount_at(&template, &mnt);
        std::fs::write(mnt.join(FILE), ROWS).unwrap();
    }
    (case.prepare)(&dir, &template, &key);
    let before = authenticated(&template);
    let before_bytes = std::fs::read(template.join("earfs.conf")).unwrap();

    // One complete run leaves the new state.
    copy_volume(&template, &work);
    let out = Command::new(earfs())
        .args(args(case, &dir, &work))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}: {}", case.name, show(&out));
    let after = authenticated(&work);
    assert!(
        (case.is_new)(&before, &after),
        "{}: a complete run does not leave the new state",
        case.name
    );
    assert!(
        !(case.is_new)(&before, &before),
        "{}: is_new accepts the old state",
        case.name
    );
    run_again_on_new(
        case,
        &dir,
        &work,
        &after,
        &format!("{}, complete", case.name),
    );

    let mut report = KillReport::default();
    for syscall in SYSCALLS {
        let mut outcomes = Vec::new();
        for n in 1u32.. {
            assert!(
                n < 5000,
                "{}: {syscall} never stops being killed",
                case.name
            );
            copy_volume(&template, &work);
            let out = Command::new("strace")
                .args(["-f", "-qq", "-o", "/dev/null", "-e"])
                .arg(format!("trace={}", SYSCALLS.join(",")))
                .arg("-e")
                .arg(format!("inject={syscall}:signal=KILL:when={n}"))
                .arg(earfs())
                .args(args(case, &dir, &work))
                .output()
                .expect("run strace (is it installed? scripts/deps.sh)");
            let killed =
                out.status.signal() == Some(libc::SIGKILL) || out.status.code() == Some(137);
            if !killed {
                // Fewer than n calls: the command ran to its end untouched.
                assert!(
                    out.status.success(),
                    "{}: under strace, not killed at {syscall} #{n}, yet failed: {}",
                    case.name,
                    show(&out)
                );
                break;
            }
            let at = format!("{} killed at {syscall} #{n}", case.name);
            // The config loads, authenticates, and is the old or the new one, whole.
            let mid = authenticated(&work);
            let mid_bytes = std::fs::read(work.join("earfs.conf")).unwrap();
            let outcome = if mid_bytes == before_bytes {
                assert_eq!(mid, before, "{at}");
                Outcome::Old
            } else {
                assert!(
                    (case.is_new)(&before, &mid),
                    "{at}: earfs.conf is neither the old state nor the new one:\n{mid:#?}"
                );
                Outcome::New
            };
            outcomes.push(outcome);
            // Run again: it finishes (or has nothing to do, or refuses as the case
            // says) and leaves the new state.
            match outcome {
                Outcome::Old => {
                    let out = Command::new(earfs())
                        .args(args(case, &dir, &work))
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{at}, then run again: {}", show(&out));
                    let fin = authenticated(&work);
                    assert!(
                        !work.join(earfs::volume::CONFIG_TMP_NAME).exists(),
                        "{at}, then run again: the temporary config is left behind"
                    );
                    assert!(
                        (case.is_new)(&before, &fin),
                        "{at} (old state), run again: not the new state"
                    );
                }
                Outcome::New => run_again_on_new(case, &dir, &work, &mid, &at),
            }
            mounts_and_reads(&work, &mnt, &at);
        }
        report.kills += outcomes.len();
        report.old += outcomes.iter().filter(|o| **o == Outcome::Old).count();
        report.new += outcomes.iter().filter(|o| **o == Outcome::New).count();
        report.per_syscall.push((syscall, outcomes));
    }
    eprintln!(
        "{}: {} kill points ({} left the old keyring, {} the new one); per system call: {}",
        case.name,
        report.kills,
        report.old,
        report.new,
        report
            .per_syscall
            .iter()
            .map(|(s, o)| format!("{s} {}", o.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    check_report(case.name, &report);
    report
}

/// Run `case`'s command again on `work`, whose config `new` is the state the command
/// leaves: it exits with `case.again_exit` and keeps `new` (byte for byte when it
/// refuses) or changes it as one more run would.
fn run_again_on_new(case: &KillCase<'_>, dir: &Path, work: &Path, new: &VolumeConfig, at: &str) {
    let new_bytes = std::fs::read(work.join("earfs.conf")).unwrap();
    let out = Command::new(earfs())
        .args(args(case, dir, work))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(case.again_exit),
        "{at} (new state), then run again: {}",
        show(&out)
    );
    let fin = authenticated(work);
    assert!(
        !work.join(earfs::volume::CONFIG_TMP_NAME).exists(),
        "{at} (new state), then run again: the temporary config is left behind"
    );
    if case.again_exit == 0 {
        assert!(
            fin == *new || (case.is_new)(new, &fin),
            "{at} (new state), run again: neither kept nor changed as a run would"
        );
    } else {
        assert_eq!(
            std::fs::read(work.join("earfs.conf")).unwrap(),
            new_bytes,
            "{at} (new state), run again and refused: earfs.conf changed"
        );
    }
}

/// The injection did its work: kills before the rename left the old state, and after
/// it the new one.
fn check_report(name: &str, r: &KillReport) {
    // The save alone makes 7 of these calls (open, write, fsync, rename, open, fsync,
    // and the close-free path has no more); a command that loads its libraries and
    // config makes many more.
    assert!(r.kills > 7, "{name}: only {} kill points", r.kills);
    assert!(r.old > 0 && r.new > 0, "{name}: {r:?}");
    // The last rename is the commit point: killed on entering it, the old state stays;
    // an fsync comes after it (the directory's), and killed there the new state is in.
    let renames: Vec<Outcome> = ["rename", "renameat", "renameat2"]
        .iter()
        .flat_map(|s| r.outcomes(s).iter().copied())
        .collect();
    assert_eq!(
        renames.last(),
        Some(&Outcome::Old),
        "{name}: no kill at the rename of earfs.conf"
    );
    assert_eq!(
        r.outcomes("fsync").last(),
        Some(&Outcome::New),
        "{name}: no kill at the fsync of the directory after the rename"
    );
}
