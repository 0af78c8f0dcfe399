//! `earfs fsck BACKING [--json] [--repair]`: check a volume without mounting it.
//!
//! 1. `earfs.conf` is loaded and authenticated: every data key unwrapped through the
//!    configured provider (this node's overrides applied), the MAC checked. A config
//!    that does not authenticate or does not parse is a problem found; the header MACs
//!    and key versions then cannot be checked (the rest still is). A KMS that cannot
//!    be reached, or that refuses, stops the check (an operational error).
//! 2. The work directory (`.earfs-work`) and the root are searched for what
//!    interrupted commands left: in-place rewrites (committed or not), temporary files,
//!    records of an interrupted `adopt` or `decrypt`, interrupted trims of an earlier
//!    `fsck --repair`, a stale `.earfs.conf.tmp`. `--repair` finishes or removes each,
//!    except the records of `adopt` and `decrypt` (their other side is outside the
//!    volume: the record names the command that finishes them).
//! 3. Every backing file is judged as the mount would open it ([`check::check_file`]):
//!    magic, format, flags, header MAC, key version, length. Damaged files are named,
//!    all of them, and never changed. Blocks reserved past a file's end are reported,
//!    and freed by `--repair` ([`check::free_past_end`]).
//!
//! Exit codes follow e2fsck's bits: 0 clean, 1 repaired (nothing left), 4 problems
//! left, 8 operational error, or'ed together; 130 interrupted.

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::cli::kms::{node_spec, retry};
use crate::cli::{KmsArgs, output};
use crate::content::Keyring;
use crate::daemon::{self, Failure};
use crate::fs::check::{self, Verdict};
use crate::fs::rewrite::{self, DIR_TIMES, WORK_DIR};
use crate::kms::DEFAULT_DEADLINE;
use crate::volume::{CONFIG_NAME, CONFIG_TMP_NAME, VolumeConfig, VolumeError};

use super::{INTERRUPTED, OpRecord, PLAIN_EVERY, Stop, human_bytes, sync_dir};

/// Exit bit: problems were repaired.
pub const REPAIRED: u8 = 1;
/// Exit bit: problems are left (damaged files, an unrepaired leftover, a config that
/// does not authenticate).
pub const PROBLEMS_LEFT: u8 = 4;
/// Exit bit (and code): an operational error (the tree or the KMS could not be
/// read, the volume is mounted for `--repair`, a bad flag).
pub const OPERATIONAL: u8 = 8;

/// The flags of `earfs fsck`.
#[derive(Debug, Args)]
pub struct FsckArgs {
    /// Print one JSON object (fields in docs/operations.md) instead of the report.
    #[arg(long)]
    pub json: bool,
    /// Finish or remove what interrupted operations left, and free blocks reserved
    /// past the end of files. Needs the volume unmounted. Never changes a damaged file.
    #[arg(long)]
    pub repair: bool,
    /// This node's credentials file for the volume's KMS key (as at mount).
    #[arg(long, value_name = "FILE")]
    pub credentials: Option<PathBuf>,
    /// The local key file, if not where the volume recorded it (--kms local volumes).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// AWS profile (AWS volumes).
    #[arg(long)]
    pub profile: Option<String>,
    /// AWS region of the KMS endpoint (AWS volumes).
    #[arg(long)]
    pub region: Option<String>,
    /// KMS endpoint other than the recorded one.
    #[arg(long, visible_alias = "endpoint", value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// How long one KMS operation may take ("90s", "2m"; a bare number is seconds).
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DEADLINE.as_secs(),
          value_parser = crate::daemon::config::parse_deadline_seconds)]
    pub kms_deadline: u64,
    /// Backing directory of the volume.
    pub backing: PathBuf,
}

impl FsckArgs {
    fn kms_args(&self) -> KmsArgs {
        KmsArgs {
            kms: None,
            key_file: self.key_file.clone(),
            key_arn: None,
            region: self.region.clone(),
            profile: self.profile.clone(),
            key_resource: None,
            credentials: self.credentials.clone(),
            endpoint_url: self.endpoint_url.clone(),
            kms_deadline: self.kms_deadline,
        }
    }
}

/// What `earfs fsck --json` prints (`earfs.fsck.v1`: docs/schemas/fsck.v1.json).
#[derive(Debug, Default, Serialize)]
struct Report {
    backing: PathBuf,
    repair: bool,
    /// A daemon held the volume's lock (a check without `--repair` only).
    mounted: bool,
    config: ConfigReport,
    /// Whether the headers' MACs and key versions were checked (the config
    /// authenticated, so the keys are known).
    headers_authenticated: bool,
    counts: Counts,
    damaged: Vec<DamagedFile>,
    reserved_past_end: Vec<PastEnd>,
    leftovers: Vec<Leftover>,
    errors: Vec<String>,
    repaired: u64,
    problems_left: u64,
    exit_code: u8,
    result: &'static str,
}

#[derive(Debug, Default, Serialize)]
struct ConfigReport {
    /// "authenticated", "tampered" (does not authenticate), "invalid" (does not parse
    /// or names what this earfs does not know), "unchecked" (not reached).
    status: &'static str,
    detail: String,
    format: Option<u32>,
    key_versions: Vec<u32>,
    current_key_version: Option<u32>,
}

#[derive(Debug, Default, Serialize)]
struct Counts {
    /// Regular files (a file with several names counted once).
    files: u64,
    /// Further names of files counted already.
    more_links: u64,
    directories: u64,
    symlinks: u64,
    /// FIFOs, sockets, devices.
    special: u64,
    /// Files with a header that checks, by the format it names.
    formats: BTreeMap<String, u64>,
    /// Files with a header that checks, by key version.
    key_versions: BTreeMap<String, u64>,
    empty: u64,
    /// A header and no data (size 0).
    header_only: u64,
    /// An all-zero header block (never reached the disk): reads as zeros.
    no_header: u64,
    damaged: u64,
    /// Targets of a committed rewrite not finished yet (see the leftovers).
    being_rewritten: u64,
    reserved_past_end: u64,
    reserved_past_end_bytes: u64,
}

#[derive(Debug, Serialize)]
struct DamagedFile {
    path: PathBuf,
    problem: &'static str,
    reason: String,
}

#[derive(Debug, Serialize)]
struct PastEnd {
    path: PathBuf,
    bytes: u64,
    freed: bool,
}

#[derive(Debug, Serialize)]
struct Leftover {
    /// "rewrite-committed", "rewrite-uncommitted", "temp-file", "interrupted-op",
    /// "interrupted-trim", "reencrypt-dir-times", "config-tmp",
    /// "unknown".
    kind: &'static str,
    /// Relative to the backing directory.
    path: PathBuf,
    detail: String,
    /// The command that finishes it (interrupted-op).
    command: Option<String>,
    /// What `--repair` does with it ("completes it", "removes it", ...), or null
    /// when it leaves it.
    fix: Option<&'static str>,
    /// What `--repair` did: "completed", "removed", or null.
    repair: Option<&'static str>,
    /// Whether it is still a problem after this run.
    problem: bool,
}

/// `earfs fsck`.
pub(in crate::cli) fn run(args: FsckArgs) -> Result<(), Failure> {
    let stop = Stop::on_signals();
    let mut r = Report {
        backing: output::canonical(&args.backing),
        repair: args.repair,
        result: "error",
        ..Report::default()
    };
    r.config.status = "unchecked";
    match fsck(&args, &mut r, &stop) {
        Ok(()) => {}
        Err(f) => {
            r.exit_code = f.code;
            r.result = if f.code == INTERRUPTED {
                "interrupted"
            } else {
                "error"
            };
            if f.code != INTERRUPTED {
                r.errors.push(f.message.clone());
            }
            if args.json {
                print_json(&r);
            }
            return Err(f);
        }
    }
    let code = exit_code(&r);
    r.exit_code = code;
    r.result = match code {
        0 => "clean",
        REPAIRED => "repaired",
        c if c & OPERATIONAL != 0 => "error",
        _ => "problems left",
    };
    if args.json {
        print_json(&r);
    } else {
        print_report(&r);
    }
    if code == 0 {
        return Ok(());
    }
    Err(Failure::new(code, summary(&r)))
}

fn print_json(r: &Report) {
    // The report is what the exit code sums up: print it even if a field cannot be.
    if let Err(f) = output::print("earfs.fsck.v1", r) {
        eprintln!("earfs: {f}");
    }
}

fn exit_code(r: &Report) -> u8 {
    let mut code = 0;
    if r.repaired > 0 {
        code |= REPAIRED;
    }
    if r.problems_left > 0 {
        code |= PROBLEMS_LEFT;
    }
    if !r.errors.is_empty() {
        code |= OPERATIONAL;
    }
    code
}

fn operational(msg: impl Into<String>) -> Failure {
    Failure::new(OPERATIONAL, msg)
}

fn fsck(args: &FsckArgs, r: &mut Report, stop: &Stop) -> Result<(), Failure> {
    let backing = std::fs::canonicalize(&args.backing).map_err(|e| {
        operational(format!(
            "{}: {e}: give the backing directory of a volume",
            args.backing.display()
        ))
    })?;
    r.backing = backing.clone();
    let lock = daemon::try_lock_volume(&backing).map_err(|f| operational(f.message))?;
    if lock.is_none() {
        if args.repair {
            return Err(operational(format!(
                "{} is mounted: unmount it before `earfs fsck --repair` (a check without --repair may run while it is mounted)",
                backing.display()
            )));
        }
        r.mounted = true;
        eprintln!(
            "earfs: warning: {} is mounted: the daemon may change files while they are checked, so what is being written or rewritten right now may be reported; check it unmounted for a definitive answer",
            backing.display()
        );
    }
    let keys = authenticate(args, &backing, r)?;
    r.headers_authenticated = keys.is_some();
    let mut left = find_leftovers(&backing, r);
    if args.repair {
        repair_leftovers(&backing, &mut left, r);
    }
    let rewriting: HashSet<u64> = left
        .records
        .iter()
        .filter(|(_, still)| *still)
        .map(|(rec, _)| rec.ino)
        .collect();
    walk(&backing, keys.as_ref(), &rewriting, args.repair, r, stop)?;
    r.problems_left += r.counts.damaged;
    r.problems_left += r.leftovers.iter().filter(|l| l.problem).count() as u64;
    r.damaged.sort_by(|a, b| a.path.cmp(&b.path));
    r.reserved_past_end.sort_by(|a, b| a.path.cmp(&b.path));
    drop(lock);
    Ok(())
}

/// Load `earfs.conf` and unwrap its keys: the keyring, or `None` when the config does
/// not authenticate or parse (a problem, recorded in `r`). A KMS failure is returned.
fn authenticate(
    args: &FsckArgs,
    backing: &Path,
    r: &mut Report,
) -> Result<Option<Keyring>, Failure> {
    let cfg = match VolumeConfig::load(backing) {
        Ok(c) => c,
        Err(e @ VolumeError::BadConfig { .. }) => {
            r.config.status = "invalid";
            r.config.detail = e.to_string();
            r.problems_left += 1;
            return Ok(None);
        }
        Err(e) => return Err(operational(e.to_string())),
    };
    r.config.format = Some(cfg.format);
    let mut versions: Vec<u32> = cfg.keyring.keys.iter().map(|k| k.version).collect();
    versions.sort_unstable();
    r.config.key_versions = versions;
    r.config.current_key_version = Some(cfg.keyring.current);
    let spec = node_spec(&args.kms_args(), &cfg.kms).map_err(|f| operational(f.message))?;
    daemon::protect_key_material();
    let provider = spec
        .open(retry(args.kms_deadline).map_err(|f| operational(f.message))?)
        .map_err(|e| operational(format!("{}: {e}", spec.key_reference())))?;
    match cfg.unlock(backing, provider.as_ref()) {
        Ok(keys) => {
            r.config.status = "authenticated";
            r.config.detail = format!(
                "authenticates ({} key version(s) unwrapped through {} {})",
                keys.len(),
                spec.name(),
                spec.key_reference()
            );
            Ok(Some(keys))
        }
        Err(e @ VolumeError::ConfigMac(_)) => {
            r.config.status = "tampered";
            r.config.detail = format!(
                "{e}: restore earfs.conf from a backup, or export the keyring again from another node; header MACs and key versions cannot be checked"
            );
            r.problems_left += 1;
            Ok(None)
        }
        Err(e) => Err(operational(e.to_string())),
    }
}

/// What the search for leftovers found, for the repair and the walk.
#[derive(Default)]
struct Found {
    /// Committed rewrites, and whether each is still there.
    records: Vec<(rewrite::Record, bool)>,
    /// Indices into the report's leftovers of each kind.
    rewrites: Vec<usize>,
    trims: Vec<(usize, Option<rewrite::Record>)>,
    temps: Vec<usize>,
    conf_tmp: Option<usize>,
}

fn rel(p: &Path, backing: &Path) -> PathBuf {
    p.strip_prefix(backing).unwrap_or(p).to_path_buf()
}

fn find_leftovers(backing: &Path, r: &mut Report) -> Found {
    let mut found = Found::default();
    let work = backing.join(WORK_DIR);
    let push = |r: &mut Report, l: Leftover| {
        r.leftovers.push(l);
        r.leftovers.len() - 1
    };
    match rewrite::pending(backing) {
        Ok((records, loose)) => {
            for rec in records {
                let json = work.join(format!("rewrite-{}.json", rec.ino));
                let i = push(
                    r,
                    Leftover {
                        kind: "rewrite-committed",
                        path: rel(&json, backing),
                        detail: format!(
                            "an in-place rewrite of {} (inode {}) that committed and was interrupted: the file may be half copied",
                            rec.path.display(),
                            rec.ino,
                        ),
                        command: None,
                        fix: Some("completes it from its rewrite-INO.new"),
                        repair: None,
                        problem: true,
                    },
                );
                found.rewrites.push(i);
                found.records.push((rec, true));
            }
            for l in loose {
                let i = push(
                    r,
                    Leftover {
                        kind: "rewrite-uncommitted",
                        path: rel(&l, backing),
                        detail: "an in-place rewrite interrupted before it committed: its file was not changed".into(),
                        command: None,
                        fix: Some("removes it"),
                        repair: None,
                        problem: true,
                    },
                );
                found.rewrites.push(i);
            }
        }
        Err(e) => r.errors.push(format!(
            "{}: cannot read the pending rewrites: {e}",
            work.display()
        )),
    }
    match check::pending_trims(backing) {
        Ok(trims) => {
            for (p, rec) in trims {
                let what = match &rec {
                    Some(t) => format!(
                        "an interrupted `earfs fsck --repair` freeing the blocks past the end of {}: its times may be wrong",
                        t.path.display()
                    ),
                    None => "an unreadable record of an interrupted `earfs fsck --repair`".into(),
                };
                let i = push(
                    r,
                    Leftover {
                        kind: "interrupted-trim",
                        path: rel(&p, backing),
                        detail: what,
                        command: None,
                        fix: Some("puts the times back"),
                        repair: None,
                        problem: true,
                    },
                );
                found.trims.push((i, rec));
            }
        }
        Err(e) => r.errors.push(format!("{}: {e}", work.display())),
    }
    match OpRecord::list(backing) {
        Ok(ops) => {
            for op in ops {
                let mut detail = format!(
                    "an interrupted `earfs {}` (started {}): fsck cannot finish it (its other side is outside the volume)",
                    op.op,
                    started(op.started)
                );
                if let Some(tmp) = op.detail.get("tmp").and_then(|t| t.as_str()) {
                    detail.push_str(&format!("; its temporary directory is {tmp}"));
                }
                push(
                    r,
                    Leftover {
                        kind: "interrupted-op",
                        path: PathBuf::from(WORK_DIR).join(format!("op-{}.json", op.op)),
                        detail,
                        command: Some(op.command.clone()),
                        fix: None,
                        repair: None,
                        problem: true,
                    },
                );
            }
        }
        Err(e) => r.errors.push(format!(
            "{}: cannot read the records of interrupted operations: {e}",
            work.display()
        )),
    }
    if let Ok(entries) = std::fs::read_dir(&work) {
        let mut names: Vec<_> = entries.filter_map(Result::ok).collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == DIR_TIMES {
                let i = push(
                    r,
                    Leftover {
                        kind: "reencrypt-dir-times",
                        path: rel(&e.path(), backing),
                        detail: "the directories' times from before an interrupted offline reencrypt renamed files into them: some may show the time of a rename".into(),
                        command: None,
                        fix: Some("puts the directories' times back"),
                        repair: None,
                        problem: true,
                    },
                );
                found.rewrites.push(i);
                continue;
            }
            let known = name.starts_with("rewrite-")
                || (name.starts_with("trim-") && name.ends_with(".json"))
                || (name.starts_with("op-") && name.ends_with(".json"));
            if known {
                continue;
            }
            let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
            if is_file && (name.ends_with(".new") || name.ends_with(".tmp")) {
                let i = push(
                    r,
                    Leftover {
                        kind: "temp-file",
                        path: rel(&e.path(), backing),
                        detail: "a temporary file of an interrupted command (its source is untouched until it is renamed into place)".into(),
                        command: None,
                        fix: Some("removes it"),
                        repair: None,
                        problem: true,
                    },
                );
                found.temps.push(i);
            } else {
                push(
                    r,
                    Leftover {
                        kind: "unknown",
                        path: rel(&e.path(), backing),
                        detail: "not made by this earfs: left alone (hidden from the mount)".into(),
                        command: None,
                        fix: None,
                        repair: None,
                        problem: false,
                    },
                );
            }
        }
    }
    if std::fs::symlink_metadata(backing.join(CONFIG_TMP_NAME)).is_ok() {
        let i = push(
            r,
            Leftover {
                kind: "config-tmp",
                path: PathBuf::from(CONFIG_TMP_NAME),
                detail: format!(
                    "a rewrite of {CONFIG_NAME} interrupted before its rename ({CONFIG_NAME} is whole)"
                ),
                command: None,
                fix: Some("removes it"),
                repair: None,
                problem: true,
            },
        );
        found.conf_tmp = Some(i);
    }
    found
}

fn started(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn mark(r: &mut Report, i: usize, what: &'static str) {
    if let Some(l) = r.leftovers.get_mut(i) {
        l.repair = Some(what);
        l.problem = false;
        r.repaired += 1;
    }
}

/// `--repair`: finish or remove the leftovers found (never the records of `adopt`
/// and `decrypt`).
fn repair_leftovers(backing: &Path, found: &mut Found, r: &mut Report) {
    if !found.rewrites.is_empty() {
        let before: Vec<PathBuf> = found
            .rewrites
            .iter()
            .filter_map(|&i| r.leftovers.get(i).map(|l| backing.join(&l.path)))
            .collect();
        let mut gone = Vec::new();
        match rewrite::finish_pending(backing) {
            Ok(done) => gone = done.target_gone,
            Err(e) => {
                let targets: Vec<String> = found
                    .records
                    .iter()
                    .map(|(rec, _)| rec.path.display().to_string())
                    .collect();
                r.errors.push(format!(
                "{}: cannot finish the interrupted rewrites (of {}): {e}; nothing is lost: run `earfs fsck --repair` again once this is fixed",
                backing.join(WORK_DIR).display(),
                targets.join(", ")
            ));
            }
        }
        // What is gone now was finished (or removed), whatever failed after.
        let (still_records, _) = rewrite::pending(backing).unwrap_or_default();
        for (rec, still) in found.records.iter_mut() {
            *still = still_records.iter().any(|s| s.ino == rec.ino);
        }
        // The committed ones come first, in the order of `records`.
        for (n, (&i, path)) in found.rewrites.clone().iter().zip(before).enumerate() {
            if !path.exists() {
                let target_gone = found
                    .records
                    .get(n)
                    .is_some_and(|(rec, _)| gone.contains(&rec.path));
                let what = match r.leftovers.get(i).map(|l| l.kind) {
                    Some("rewrite-committed") if !target_gone => "completed",
                    Some("reencrypt-dir-times") => "completed",
                    _ => "removed",
                };
                mark(r, i, what);
            }
        }
    }
    for (i, rec) in std::mem::take(&mut found.trims) {
        let Some(path) = r.leftovers.get(i).map(|l| backing.join(&l.path)) else {
            continue;
        };
        match check::finish_trim(backing, &path, rec.as_ref()) {
            Ok(_) => mark(r, i, "completed"),
            Err(e) => r.errors.push(format!("{}: {e}", path.display())),
        }
    }
    let mut removed_in_work = false;
    for i in std::mem::take(&mut found.temps) {
        let Some(path) = r.leftovers.get(i).map(|l| backing.join(&l.path)) else {
            continue;
        };
        match std::fs::remove_file(&path) {
            Ok(()) => {
                removed_in_work = true;
                mark(r, i, "removed");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => mark(r, i, "removed"),
            Err(e) => r
                .errors
                .push(format!("{}: cannot remove it: {e}", path.display())),
        }
    }
    if removed_in_work && let Err(e) = sync_dir(&backing.join(WORK_DIR)) {
        r.errors
            .push(format!("{}: {e}", backing.join(WORK_DIR).display()));
    }
    if let Some(i) = found.conf_tmp.take() {
        let path = backing.join(CONFIG_TMP_NAME);
        match std::fs::remove_file(&path).and_then(|()| sync_dir(backing)) {
            Ok(()) => mark(r, i, "removed"),
            Err(e) => r
                .errors
                .push(format!("{}: cannot remove it: {e}", path.display())),
        }
    }
}

/// Progress of the walk: a spinner on a terminal, a plain line every few seconds
/// otherwise (and a last line if one was printed).
struct Spinner {
    bar: Option<ProgressBar>,
    started: Instant,
    last: Instant,
    printed: bool,
    what: String,
}

impl Spinner {
    fn new(backing: &Path) -> Spinner {
        let what = format!("checking {}", backing.display());
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
                bar.set_style(style);
            }
            bar.set_message(what.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Spinner {
            bar,
            started: Instant::now(),
            last: Instant::now(),
            printed: false,
            what,
        }
    }

    fn tick(&mut self, c: &Counts) {
        let line = || {
            format!(
                "{}: {} files, {} directories, {} damaged so far",
                self.what, c.files, c.directories, c.damaged
            )
        };
        match &self.bar {
            Some(bar) if c.files.is_multiple_of(64) => bar.set_message(line()),
            Some(_) => {}
            None if self.last.elapsed() >= PLAIN_EVERY => {
                eprintln!("{}", line());
                self.last = Instant::now();
                self.printed = true;
            }
            None => {}
        }
    }

    fn finish(&self, c: &Counts, interrupted: bool) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.printed && !interrupted {
            eprintln!(
                "{}: {} files in {:.1} s",
                self.what,
                c.files,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

/// Check every file of the tree (the volume's own names at the root skipped, hard
/// links checked once). `rewriting` holds the inodes of committed rewrites not
/// finished: they are counted, not judged.
fn walk(
    backing: &Path,
    keys: Option<&Keyring>,
    rewriting: &HashSet<u64>,
    repair: bool,
    r: &mut Report,
    stop: &Stop,
) -> Result<(), Failure> {
    let mut spinner = Spinner::new(backing);
    let mut linked: HashSet<(u64, u64)> = HashSet::new();
    let mut stack = vec![backing.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let top = dir == backing;
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !top => continue,
            Err(e) => {
                r.errors
                    .push(format!("{}: cannot read the directory: {e}", dir.display()));
                continue;
            }
        };
        for entry in entries {
            if stop.requested() {
                spinner.finish(&r.counts, true);
                return Err(stop.failure(
                    "earfs fsck",
                    &format!("{} files checked, nothing reported", r.counts.files),
                ));
            }
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    r.errors.push(format!("{}: {e}", dir.display()));
                    continue;
                }
            };
            let name = entry.file_name();
            if top && (name == CONFIG_NAME || name == CONFIG_TMP_NAME || name == WORK_DIR) {
                continue;
            }
            let path = entry.path();
            let kind = match entry.file_type() {
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    r.errors.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            if kind.is_dir() {
                r.counts.directories += 1;
                stack.push(path);
            } else if kind.is_symlink() {
                r.counts.symlinks += 1;
            } else if kind.is_file() {
                check_one(backing, &path, keys, rewriting, repair, &mut linked, r);
                spinner.tick(&r.counts);
            } else {
                r.counts.special += 1;
            }
        }
    }
    spinner.finish(&r.counts, false);
    Ok(())
}

fn check_one(
    backing: &Path,
    path: &Path,
    keys: Option<&Keyring>,
    rewriting: &HashSet<u64>,
    repair: bool,
    linked: &mut HashSet<(u64, u64)>,
    r: &mut Report,
) {
    let checked = match check::check_file(path, keys) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            r.errors
                .push(format!("{}: cannot read it: {e}", path.display()));
            return;
        }
    };
    let m = &checked.meta;
    if m.nlink() > 1 && !linked.insert((m.dev(), m.ino())) {
        r.counts.more_links += 1;
        return;
    }
    let c = &mut r.counts;
    c.files += 1;
    let rel_path = rel(path, backing);
    if rewriting.contains(&m.ino()) {
        c.being_rewritten += 1;
        return;
    }
    match checked.verdict {
        Verdict::Empty => c.empty += 1,
        Verdict::NoHeader => c.no_header += 1,
        Verdict::Header {
            format,
            key_version,
            size,
        } => {
            *c.formats.entry(format.number().to_string()).or_default() += 1;
            *c.key_versions.entry(key_version.to_string()).or_default() += 1;
            if size == 0 {
                c.header_only += 1;
            }
        }
        Verdict::Damaged(d) => {
            c.damaged += 1;
            r.damaged.push(DamagedFile {
                path: rel_path,
                problem: d.problem,
                reason: d.reason,
            });
            return;
        }
    }
    let past = check::reserved_past_end(m);
    if past == 0 {
        return;
    }
    drop(checked);
    c.reserved_past_end += 1;
    c.reserved_past_end_bytes += past;
    let mut freed = false;
    if repair {
        match check::free_past_end(backing, &rel_path) {
            Ok(()) => {
                freed = true;
                r.repaired += 1;
            }
            Err(e) => r.errors.push(format!(
                "{}: cannot free the blocks past its end: {e}",
                path.display()
            )),
        }
    }
    r.reserved_past_end.push(PastEnd {
        path: rel_path,
        bytes: past,
        freed,
    });
}

/// "1 file", "2 files".
fn count(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

fn print_report(r: &Report) {
    println!(
        "earfs fsck {}{}",
        r.backing.display(),
        if r.repair { " --repair" } else { "" }
    );
    if r.mounted {
        println!("mounted:      yes (results may race with the running daemon)");
    }
    let cfg = &r.config;
    match cfg.status {
        "authenticated" => println!(
            "{CONFIG_NAME}:   {}; key versions {:?}, current {}; writes format {}",
            cfg.detail,
            cfg.key_versions,
            cfg.current_key_version.unwrap_or(0),
            cfg.format.unwrap_or(0)
        ),
        _ => println!("{CONFIG_NAME}:   PROBLEM: {}", cfg.detail),
    }
    if !r.headers_authenticated {
        println!("              (header MACs and key versions not checked: no trusted keys)");
    }
    let c = &r.counts;
    let mut more = Vec::new();
    if c.more_links > 0 {
        more.push(format!(
            "{} of hard-linked files",
            count(c.more_links, "more name", "more names")
        ));
    }
    more.push(count(c.symlinks, "symlink", "symlinks"));
    if c.special > 0 {
        more.push(count(c.special, "special file", "special files"));
    }
    println!(
        "files:        {} in {} ({})",
        c.files,
        count(c.directories, "directory", "directories"),
        more.join(", ")
    );
    for (f, n) in c.formats.iter().rev() {
        println!("  format {f}:      {n}");
    }
    for (v, n) in &c.key_versions {
        println!("  key version {v}: {n}");
    }
    if c.empty > 0 {
        println!("  empty:         {} (no header yet)", c.empty);
    }
    if c.header_only > 0 {
        println!("  header only:   {} (size 0)", c.header_only);
    }
    if c.no_header > 0 {
        println!(
            "  no header:     {} (the header block never reached the disk: they read as zeros; not damage)",
            c.no_header
        );
    }
    if c.being_rewritten > 0 {
        println!(
            "  being rewritten: {} (an interrupted rewrite: see the leftovers)",
            c.being_rewritten
        );
    }
    if c.reserved_past_end > 0 {
        println!(
            "reserved past the end: {}, {} (space a crash or a preallocation left; not damage{})",
            count(c.reserved_past_end, "file", "files"),
            human_bytes(c.reserved_past_end_bytes),
            if r.repair { "" } else { "; --repair frees it" }
        );
        for p in &r.reserved_past_end {
            println!(
                "  {}: {}{}",
                p.path.display(),
                human_bytes(p.bytes),
                if p.freed { ": freed" } else { "" }
            );
        }
    }
    if c.damaged > 0 {
        println!(
            "damaged:      {} (the mount fails them with EIO; fsck never changes them: restore them from a backup)",
            count(c.damaged, "file", "files")
        );
        for d in &r.damaged {
            println!("  {}: {}: {}", d.path.display(), d.problem, d.reason);
        }
    } else {
        println!("damaged:      none");
    }
    if r.leftovers.is_empty() {
        println!("leftovers:    none");
    } else {
        println!("leftovers:    {}", r.leftovers.len());
        for l in &r.leftovers {
            let done = match (l.repair, &l.command, l.fix) {
                (Some(what), _, _) => format!(": {what}"),
                (None, Some(cmd), _) => format!("; finish it with: {cmd}"),
                (None, None, Some(fix)) if l.problem => format!("; --repair {fix}"),
                (None, None, _) => String::new(),
            };
            println!("  {}: {}{done}", l.path.display(), l.detail);
        }
    }
    for e in &r.errors {
        println!("error:        {e}");
    }
    println!("result:       {}", summary(r));
}

/// One line: what was found and what is left.
fn summary(r: &Report) -> String {
    let code = exit_code(r);
    let mut parts = Vec::new();
    if r.repaired > 0 {
        parts.push(format!("{} repaired", r.repaired));
    }
    if r.problems_left > 0 {
        let mut what = Vec::new();
        if r.counts.damaged > 0 {
            what.push(count(r.counts.damaged, "damaged file", "damaged files"));
        }
        let left = r.leftovers.iter().filter(|l| l.problem).count();
        if left > 0 {
            what.push(count(left as u64, "leftover", "leftovers"));
        }
        if matches!(r.config.status, "tampered" | "invalid") {
            what.push(format!("{CONFIG_NAME} {}", r.config.status));
        }
        parts.push(format!(
            "{} left ({})",
            count(r.problems_left, "problem", "problems"),
            what.join(", ")
        ));
    }
    if !r.errors.is_empty() {
        parts.push(count(r.errors.len() as u64, "error", "errors"));
    }
    if parts.is_empty() {
        return format!(
            "clean ({} files checked in {})",
            r.counts.files,
            r.backing.display()
        );
    }
    format!(
        "{} in {} (exit {code})",
        parts.join(", "),
        r.backing.display()
    )
}
