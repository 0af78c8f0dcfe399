//! The command line (composition root): parse, call into the library, map errors to
//! exit codes (docs/exit-codes.md).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::daemon::{self, Failure, exit};
use crate::kms::{DEFAULT_DEADLINE, ProviderSpec, Retry};
use crate::volume::{self, VolumeConfig};

mod change;
mod data;
mod files;
pub mod helper;
mod import;
mod kms;
mod logflags;
mod meta;
mod mount;
mod nodeconf;
pub mod output;
mod status;

pub use meta::{command, parse};

/// earfs: encryption at rest for database nodes (AES-256-XTS over FUSE, keys wrapped by your KMS).
#[derive(Debug, Parser)]
#[command(name = "earfs", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: logflags::LogFlags,
}

/// Key providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kms {
    /// A root-only key file on this machine (development, tests, quick start).
    Local,
    /// A customer managed key in AWS KMS (--key-arn).
    Aws,
    /// A customer managed key in Google Cloud KMS (--key-resource).
    Gcp,
}

/// Which key wraps the data keys, and how to reach it.
#[derive(Debug, Clone, Args)]
pub struct KmsArgs {
    /// Key provider that wraps the volume's data keys.
    #[arg(long, value_enum)]
    pub kms: Option<Kms>,
    /// Local key file (--kms local); created with mode 0600 if absent.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// AWS KMS key ARN, or an alias ARN (resolved to its key at init) (--kms aws).
    #[arg(long, value_name = "ARN")]
    pub key_arn: Option<String>,
    /// AWS region of the KMS endpoint; defaults to the key ARN's region (--kms aws).
    #[arg(long)]
    pub region: Option<String>,
    /// Named profile of the AWS shared config and credentials files (--kms aws).
    #[arg(long)]
    pub profile: Option<String>,
    /// Google Cloud KMS key: projects/P/locations/L/keyRings/R/cryptoKeys/K, no version (--kms gcp).
    #[arg(long, value_name = "RESOURCE")]
    pub key_resource: Option<String>,
    /// Credentials file: an AWS shared credentials file (--kms aws) or a Google service-account JSON key (--kms gcp). Mode 0600; never a secret on the command line.
    #[arg(long, value_name = "FILE")]
    pub credentials: Option<PathBuf>,
    /// KMS endpoint other than the default (VPC or private endpoint, a test server).
    #[arg(long, visible_alias = "endpoint", value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// How long one KMS operation may take, retries of throttling, timeouts and 5xx included ("90s", "2m"; a bare number is seconds; 1 s to 1 h).
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DEADLINE.as_secs(),
              value_parser = crate::daemon::config::parse_deadline_seconds)]
    pub kms_deadline: u64,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a volume in BACKING (an empty or new directory).
    ///
    /// With --kms aws or gcp the key is validated, a data key is made and unwrapped
    /// through the KMS, and only then is earfs.conf written. With --join the new volume
    /// takes the keyring of another node's volume (its earfs.conf, or a file from
    /// `earfs export-keyring`) after proving that this node can unwrap it.
    Init {
        #[command(flatten)]
        kms: KmsArgs,
        /// Join a cluster: use the keyring in FILE (an earfs.conf or an exported keyring).
        #[arg(long, value_name = "FILE")]
        join: Option<PathBuf>,
        /// On-disk format of the new volume's files: 2 (power-cut safe, the default) or
        /// 1 (only to test compatibility: a crash can damage up to 31 durable bytes at
        /// the end of a file whose size is not a multiple of 16; see docs/file-format.md).
        #[arg(long, value_name = "N", default_value_t = volume::NEW_VOLUME_FORMAT,
              value_parser = clap::value_parser!(u32).range(1..=2))]
        format_version: u32,
        /// Print the new volume as JSON (docs/json.md).
        #[arg(long)]
        json: bool,
        /// Backing directory that will hold the encrypted files.
        backing: PathBuf,
    },
    /// Mount the volume in BACKING at MOUNTPOINT; returns once the mount serves.
    ///
    /// With --config FILE (e.g. /etc/earfs/NAME.toml, see systemd/earfs-example.toml)
    /// the settings come from the file and flags override them. Under systemd run it
    /// with --foreground: it reports READY, STATUS and STOPPING over $NOTIFY_SOCKET.
    Mount(mount::MountArgs),
    /// Unmount an earfs mount and wait for its daemon to let go of the volume.
    Umount {
        /// Print the result as JSON (docs/json.md).
        #[arg(long)]
        json: bool,
        /// The mountpoint (also clears the dead mount of a crashed daemon).
        mountpoint: PathBuf,
    },
    /// Preflight a KMS key: try every permission earfs needs, for real, and show each.
    ///
    /// Give either a key (--kms aws --key-arn …, --kms gcp --key-resource …) before
    /// creating a volume, or the BACKING directory of an existing volume (--credentials,
    /// --profile, --region and --endpoint-url then override what the volume recorded at
    /// init, as they do at mount). Exits 0 only if every check passes.
    ///
    /// With BACKING and --new-key, the --kms flags name the key a rewrap would move the
    /// volume to: the volume's key is checked for what a rewrap needs of it (unwrapping
    /// every data key, the earfs.conf MAC) and the new key for everything earfs needs.
    KmsCheck {
        #[command(flatten)]
        kms: KmsArgs,
        /// Print JSON (docs/json.md).
        #[arg(long)]
        json: bool,
        /// Check the volume's key and the key given with --kms for `earfs rewrap`.
        #[arg(long, requires = "backing")]
        new_key: bool,
        /// Backing directory of an existing volume.
        backing: Option<PathBuf>,
    },
    /// Write the volume's keyring (wrapped data keys only) for other nodes: a new node
    /// joins with `earfs init --join FILE`, an existing one takes a newer keyring (after
    /// `earfs rotate`) with `earfs import-keyring FILE`. Unwraps through the KMS first to
    /// prove the keyring is whole.
    ExportKeyring {
        /// Output file (mode 0600); standard output if absent.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Print JSON (docs/json.md): what was exported, with the keyring itself as the
        /// `keyring` string when there is no --output.
        #[arg(long)]
        json: bool,
        /// How long the KMS may take ("90s", "2m"; a bare number is seconds; see mount --kms-deadline).
        #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DEADLINE.as_secs(),
              value_parser = crate::daemon::config::parse_deadline_seconds)]
        kms_deadline: u64,
        /// Backing directory of the volume.
        backing: PathBuf,
    },
    /// Merge a newer export of the cluster's keyring into this node's existing volume,
    /// after another node ran `earfs rotate` (or retired a version, or moved the keys
    /// to another KMS key).
    ///
    /// FILE is a file from `earfs export-keyring` or another node's earfs.conf; it must
    /// hold this volume's keyring (same keyring id). Every key in it is unwrapped
    /// through its KMS key with this node's credentials, which proves this node may use
    /// them, and FILE is authenticated with its current key: an altered file is refused
    /// (exit 15) and nothing is written. A version both sides hold must be the same data
    /// key. Then earfs.conf takes the import's versions, current version, wrapped keys
    /// and KMS key; the volume id, format and this node's KMS settings stay (when the
    /// KMS key changed, the new key is recorded with this node's flags applied).
    ///
    /// --credentials, --profile, --region, --endpoint-url and (local) --key-file are this
    /// node's settings for the import's KMS key, as with `init --join`; --kms, --key-arn
    /// and --key-resource may only confirm that key. A mounted volume's daemon uses its
    /// own settings (its config file's `[kms]` table): leave them out then.
    ///
    /// Refused, with nothing written: another keyring (exit 11); an older export whose
    /// current version is behind this volume's; an export that lacks a version some
    /// file of this volume still uses (the files are counted from their headers, as
    /// `earfs keys` does). Importing the same keyring again does nothing (exit 0).
    ///
    /// Runs on an unmounted volume (under its lock; earfs.conf must authenticate first),
    /// or on a mounted one through its daemon (as root): the daemon reads FILE, switches
    /// at once (new files take the new current version) and, if the KMS key changed,
    /// uses the new key from then on, for the CMK recheck too. A new node joins with
    /// `earfs init --join` instead.
    ImportKeyring {
        #[command(flatten)]
        kms: KmsArgs,
        /// The exported keyring (or another node's earfs.conf).
        file: PathBuf,
        /// Backing directory of this node's volume.
        backing: PathBuf,
    },
    /// Show how running earfs daemons are doing (over their root-only control sockets):
    /// volume, key, key versions, uptime, operations, errors, the last CMK check and
    /// the revocation state.
    Status {
        /// Print JSON (docs/json.md).
        #[arg(long)]
        json: bool,
        /// Also count each volume's files by format and key version (as `info --files`).
        #[arg(long)]
        files: bool,
        /// The mountpoint of one daemon (exit 3 when none runs for it); all running daemons if absent.
        mountpoint: Option<PathBuf>,
    },
    /// Make an existing volume write format 2 (power-cut safe) from now on.
    ///
    /// Runs on an unmounted volume (earfs.conf is rewritten, signed with the data key
    /// unwrapped through the KMS) or on a mounted one (through its daemon's control
    /// socket, as root; new files are format 2 at once). Files keep their format: a v1
    /// file whose size is a multiple of 16 becomes v2 before a write leaves it unaligned, other v1 files
    /// stay v1 until truncated to zero or replaced (`earfs info --files` counts them).
    Upgrade {
        /// How long the KMS may take ("90s", "2m"; a bare number is seconds; see mount --kms-deadline).
        #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DEADLINE.as_secs(),
              value_parser = crate::daemon::config::parse_deadline_seconds)]
        kms_deadline: u64,
        /// Backing directory of the volume.
        backing: PathBuf,
    },
    /// Make a new data key version, current from now on (new files and files truncated
    /// to zero use it); files written under older versions keep theirs.
    ///
    /// The new key is made and wrapped by the volume's KMS key, bound to the keyring id,
    /// and earfs.conf is rewritten atomically under a MAC made with it. Runs on an
    /// unmounted volume, or on a mounted one through its daemon (as root), which
    /// switches at once. Other nodes of a cluster need the new keyring: `earfs
    /// export-keyring` here, then `earfs import-keyring` on each of them.
    Rotate {
        /// How long the KMS may take ("90s", "2m"; a bare number is seconds; see mount --kms-deadline).
        #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DEADLINE.as_secs(),
              value_parser = crate::daemon::config::parse_deadline_seconds)]
        kms_deadline: u64,
        /// Backing directory of the volume.
        backing: PathBuf,
    },
    /// Wrap every data key again: under the volume's own KMS key (after a rotation in
    /// the KMS, so that the old key material can be disabled), or under another key or
    /// provider given with --kms and its key (local, aws, gcp in any direction).
    ///
    /// The data keys, their versions and the keyring id stay, so no file changes. The
    /// new key is validated as at init; each key is wrapped, then unwrapped again through
    /// the new key and compared before earfs.conf is rewritten (atomically, under a new
    /// MAC): once this returns the old key is not needed by this volume. Without --kms,
    /// --credentials, --profile, --region and --endpoint-url override the recorded
    /// settings for this run. Runs on an unmounted volume, or on a mounted one through
    /// its daemon (as root), which uses the new key at once, its CMK checks included.
    Rewrap {
        #[command(flatten)]
        kms: KmsArgs,
        /// Backing directory of the volume.
        backing: PathBuf,
    },
    /// Drop a data key version from the keyring once no file uses it.
    ///
    /// Refused for the current version (rotate first) and for a version the keyring
    /// lacks. Counts the files by their headers (a file with several hard links is one
    /// file); on a mounted volume the daemon also counts the files it holds open,
    /// including those unlinked while open, which no longer have a name to count. While
    /// any file uses the version it is refused (exit 31) with the count: re-encrypt or
    /// remove them first. Runs on an unmounted volume (earfs.conf is rewritten, sealed
    /// with the current key unwrapped through the KMS), or on a mounted one through its
    /// daemon (as root), which checks its open files again and switches at once. Backups
    /// of the volume made before need the retired version: keep an export of the
    /// keyring (`earfs export-keyring`) as long as they do.
    RetireKey {
        /// The key version to retire (see `earfs keys`).
        #[arg(long, value_name = "N")]
        version: u32,
        /// How long the KMS may take ("90s", "2m"; a bare number is seconds; see mount --kms-deadline).
        #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DEADLINE.as_secs(),
              value_parser = crate::daemon::config::parse_deadline_seconds)]
        kms_deadline: u64,
        /// Backing directory of the volume.
        backing: PathBuf,
    },
    /// Show or change this node's KMS settings recorded in BACKING's earfs.conf.
    ///
    /// Without --set: the provider, the key and the per-node settings. With --set: a
    /// moved local key file, another endpoint, region, profile or credentials file is
    /// recorded. The volume must not be mounted. The data keys are unwrapped through the
    /// new settings first and the config's MAC checked with them, so settings that do not
    /// work, or reach another key, are refused and nothing is written; then earfs.conf
    /// is rewritten atomically under a new MAC. The key itself never changes this way
    /// (that is `earfs rewrap`).
    Config {
        /// NAME=VALUE, repeatable; an empty VALUE unsets. Local: kms.key_file. AWS:
        /// kms.region, kms.endpoint_url, kms.profile, kms.credentials_file. Google Cloud:
        /// kms.credentials, kms.endpoint.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        /// Print the settings as JSON (docs/json.md).
        #[arg(long)]
        json: bool,
        /// How long the KMS may take ("90s", "2m"; a bare number is seconds; see mount --kms-deadline).
        #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DEADLINE.as_secs(),
              value_parser = crate::daemon::config::parse_deadline_seconds)]
        kms_deadline: u64,
        /// Backing directory of the volume.
        backing: PathBuf,
    },
    /// Show the key versions, which is current, the KMS key that wraps them, and how
    /// many files use each (read from the file headers; no key needed).
    Keys {
        /// Print JSON (docs/json.md).
        #[arg(long)]
        json: bool,
        /// Backing directory of the volume.
        backing: PathBuf,
    },
    /// Show a volume: id, format, cipher, sector size, key provider, key versions, AES
    /// kernel; with --files, how many files it holds of each format and key version.
    Info {
        /// Print JSON (docs/json.md).
        #[arg(long)]
        json: bool,
        /// Count the files by format and key version (reads every file's header; no key
        /// needed, the volume may be mounted).
        #[arg(long)]
        files: bool,
        /// Backing directory of the volume.
        backing: PathBuf,
    },
    /// Turn the plaintext directory SRC into an earfs volume in BACKING, in place (the
    /// database stopped); SRC becomes the mountpoint: `earfs mount BACKING SRC`.
    ///
    /// BACKING must be on SRC's filesystem: files move one at a time (encrypted copy,
    /// fsync, rename into BACKING, then the plaintext unlinked), so it needs free space
    /// for the largest file, not for a second copy. Keeps modes, owners, times, user.*
    /// attributes, hard links, symlinks, FIFOs, empty directories and holes; refuses
    /// sockets, devices and nested mounts by name before changing anything. BACKING is
    /// created as `earfs init` does (--kms …); interrupted (Ctrl-C, kill -9, a crash),
    /// the same command finishes the job (the --kms flags are then not needed).
    Adopt(data::adopt::AdoptArgs),
    /// Rewrite every file whose key version is not the current one or whose format is
    /// not the volume's, so that old key versions can be retired.
    ///
    /// On an unmounted volume (BACKING) each file is written anew and renamed over the
    /// old one (files with several names are rewritten in place). On a mounted volume
    /// (its MOUNTPOINT or BACKING) the daemon rewrites each file in place under the
    /// file's lock: the database keeps running, and files it holds open are skipped and
    /// tried again on later passes (or rewritten too, with --include-open). Interrupt it
    /// at any time (Ctrl-C, or even kill -9) and run it again to finish.
    Reencrypt {
        /// Limit the data rewritten per second, so that the database keeps its latency ("100MiB/s", "50M", "20MB/s").
        #[arg(long, value_name = "RATE", value_parser = data::parse_rate)]
        rate: Option<u64>,
        /// Files rewritten in parallel (unmounted volume; default: four per CPU, 4 to 16).
        #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
        jobs: Option<u32>,
        /// Mounted volume: rewrite files that are open through the mount too (their I/O waits while each is rewritten).
        #[arg(long)]
        include_open: bool,
        /// Say how many files and bytes would be rewritten, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the result as JSON (docs/json.md).
        #[arg(long)]
        json: bool,
        /// How long the KMS may take ("90s", "2m"; a bare number is seconds).
        #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DEADLINE.as_secs(),
              value_parser = crate::daemon::config::parse_deadline_seconds)]
        kms_deadline: u64,
        /// The volume's backing directory, or the mountpoint of a mounted volume.
        target: PathBuf,
    },
    /// Write the plaintext tree of an unmounted volume into DEST (removing encryption,
    /// or a restore), verified.
    ///
    /// DEST must be new, empty, or an interrupted decrypt of the same BACKING (then the
    /// same command finishes it; refused otherwise with exit 2). Every file keeps its
    /// owner, mode, user.* attributes, times, hard links and holes; symlinks, special
    /// files and empty directories are made too. Each file is written to a temp in
    /// DEST/.earfs-decrypt-tmp, hashed as it is read from BACKING, synced, read back and
    /// compared, then renamed into place: a kill at any point leaves no partial file at
    /// a final path, and running the same command again finishes. A backing file that
    /// cannot be decrypted (damaged) does not stop the run: all of them are named at
    /// the end and the command exits 1. Takes the volume's lock (exit 18 while it is
    /// mounted). DEST needs the space of the whole plaintext.
    Decrypt {
        /// Files decrypted at once (default 16: the work waits on the disk more than on the CPU).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
        jobs: Option<u16>,
        /// How long the KMS may take ("90s", "2m"; a bare number is seconds; see mount --kms-deadline).
        #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DEADLINE.as_secs(),
              value_parser = crate::daemon::config::parse_deadline_seconds)]
        kms_deadline: u64,
        /// Backing directory of the volume (unmounted; may be a read-only snapshot).
        backing: PathBuf,
        /// Where the plaintext tree goes.
        dest: PathBuf,
    },
    /// Decrypt backing files to standard output: no mount, no FUSE, no volume lock.
    ///
    /// Works on a copy of a backing directory (a snapshot, a backup), on a live one
    /// (read-only), or on a file copied out alone with --conf. The volume's earfs.conf
    /// is found by walking up from each file's directory, or given with --conf FILE.
    /// The data keys are unwrapped through the provider the config records, with this
    /// machine's settings: --credentials, --profile, --region, --endpoint-url and
    /// (local) --key-file override the recorded ones, as for `earfs kms-check BACKING`.
    /// Holes come out as zeros. A file that cannot be decrypted stops it with exit 1,
    /// naming the file; a file in no volume without --conf exits 10.
    Cat {
        /// The volume's earfs.conf (or a copy of it), for files copied out of their
        /// backing directory.
        #[arg(long, value_name = "FILE")]
        conf: Option<PathBuf>,
        #[command(flatten)]
        kms: KmsArgs,
        /// Backing files, decrypted one after the other.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Check a volume without mounting it: earfs.conf's MAC (keys unwrapped through the
    /// KMS), every backing file's header (magic, format, flags, MAC, key version) and
    /// length, blocks reserved past files' ends, and what interrupted commands left.
    ///
    /// Read-only unless --repair, which finishes or removes the leftovers (interrupted
    /// rewrites, temporary files, a stale .earfs.conf.tmp) and frees blocks reserved past
    /// the end; it needs the volume unmounted. It never changes a damaged file (it names
    /// each one) and cannot finish an interrupted adopt or decrypt (it names the command
    /// that does). Data sectors are not verified: XTS has no MAC. Exit codes are e2fsck's
    /// bits: 0 clean, 1 repaired, 4 problems left, 8 operational error (or'ed: 5 = some
    /// repaired, some left); 130 interrupted. See docs/operations.md.
    Fsck(data::fsck::FsckArgs),
    /// Measure the sector cipher on this CPU (one core, 4 KiB sectors), like `cryptsetup benchmark`.
    Speed {
        /// Print JSON (bytes per second; docs/json.md).
        #[arg(long)]
        json: bool,
        /// Seconds per direction.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
    },
    /// Print a shell completion script: `earfs completions bash >
    /// /etc/bash_completion.d/earfs` (the Debian package installs all three).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: meta::Shell,
    },
    /// Write the man pages (earfs.1, earfs-mount.1, ...) into DIR (scripts/package.sh).
    #[command(hide = true)]
    Man {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
}

/// FUSE request threads: 4 per core, 16 to 64. A thread waits in the backing read or
/// fsync of its request (I/O, not CPU), so the count bounds the I/O in flight: with 2
/// threads, 8 jobs of O_DIRECT 4 KiB random reads ran at 0.23-0.26x of the raw disk,
/// with 8 at 0.46-0.58x, with 16 at 0.57-0.70x (docs/performance.md).
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .saturating_mul(4)
        .clamp(16, 64)
}

impl Cli {
    /// The subcommand's name when it was given `--json`: its output, and its error if
    /// it fails, are then JSON (docs/json.md).
    pub fn json_command(&self) -> Option<&'static str> {
        let (name, json) = match &self.command {
            Command::Init { json, .. } => ("init", *json),
            Command::Mount(a) => ("mount", a.json),
            Command::Umount { json, .. } => ("umount", *json),
            Command::KmsCheck { json, .. } => ("kms-check", *json),
            Command::ExportKeyring { json, .. } => ("export-keyring", *json),
            Command::Status { json, .. } => ("status", *json),
            Command::Config { json, .. } => ("config", *json),
            Command::Keys { json, .. } => ("keys", *json),
            Command::Info { json, .. } => ("info", *json),
            Command::Reencrypt { json, .. } => ("reencrypt", *json),
            Command::Fsck(a) => ("fsck", a.json),
            Command::Speed { json, .. } => ("speed", *json),
            Command::ImportKeyring { .. }
            | Command::Upgrade { .. }
            | Command::Rotate { .. }
            | Command::Rewrap { .. }
            | Command::RetireKey { .. }
            | Command::Adopt(_)
            | Command::Decrypt { .. }
            | Command::Cat { .. }
            | Command::Completions { .. }
            | Command::Man { .. } => return None,
        };
        json.then_some(name)
    }
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<(), Failure> {
    cli.log.apply();
    output::set_json(cli.json_command().is_some());
    // Commands that print behave as filters (`earfs status | head`); the daemon keeps
    // Rust's ignored SIGPIPE, so that a scraper hanging up is just an error.
    if !matches!(cli.command, Command::Mount(_)) {
        crate::sys::default_sigpipe();
    }
    match cli.command {
        Command::Init {
            kms,
            join,
            format_version,
            json,
            backing,
        } => {
            let cfg = match join {
                Some(file) => kms::join(&kms, &file, &backing)?,
                None => init(&kms, &backing, format_version)?,
            };
            if json {
                output::print("earfs.init.v1", &VolumeSummary::of(&cfg, &backing))?;
            }
            Ok(())
        }
        Command::KmsCheck {
            kms,
            json,
            new_key,
            backing,
        } => kms::check(&kms, json, new_key, backing.as_deref()),
        Command::ExportKeyring {
            output,
            json,
            kms_deadline,
            backing,
        } => kms::export_keyring(&backing, output.as_deref(), json, kms_deadline),
        Command::ImportKeyring { kms, file, backing } => {
            import::import_keyring(&kms, &file, &backing)
        }
        Command::Mount(args) => {
            // The daemon prints nothing: this process reports for it.
            let mut child: Vec<std::ffi::OsString> = std::env::args_os()
                .skip(1)
                .filter(|a| a != "--json")
                .collect();
            child.push("--foreground".into());
            mount::run(args, child)
        }
        Command::Umount { json, mountpoint } => umount(mountpoint, json),
        Command::Status {
            json,
            files,
            mountpoint,
        } => status::run(json, files, mountpoint.as_deref()),
        Command::Upgrade {
            kms_deadline,
            backing,
        } => change::upgrade(&backing, kms_deadline),
        Command::Rotate {
            kms_deadline,
            backing,
        } => change::rotate(&backing, kms_deadline),
        Command::Rewrap { kms, backing } => change::rewrap(&kms, &backing),
        Command::RetireKey {
            version,
            kms_deadline,
            backing,
        } => change::retire_key(&backing, version, kms_deadline),
        Command::Config {
            set,
            json,
            kms_deadline,
            backing,
        } => nodeconf::run(&backing, &set, json, kms_deadline),
        Command::Keys { json, backing } => files::keys(&backing, json),
        Command::Info {
            json,
            files,
            backing,
        } => info(json, files, backing),
        Command::Reencrypt {
            rate,
            jobs,
            include_open,
            dry_run,
            json,
            kms_deadline,
            target,
        } => data::reencrypt::run(
            &target,
            &data::reencrypt::Options {
                rate,
                jobs: jobs.map(|j| j as usize),
                include_open,
                dry_run,
                json,
                kms_deadline,
            },
        ),
        Command::Fsck(args) => data::fsck::run(args),
        Command::Speed { json, seconds } => speed(json, seconds),
        Command::Adopt(args) => data::adopt::run(args),
        Command::Decrypt {
            jobs,
            kms_deadline,
            backing,
            dest,
        } => data::decrypt::decrypt(&backing, &dest, jobs.map(usize::from), kms_deadline),
        Command::Cat { conf, kms, files } => data::cat::cat(&files, conf.as_deref(), &kms),
        Command::Completions { shell } => meta::completions(shell),
        Command::Man { dir } => meta::man_pages(&dir),
    }
}

/// A volume as `init --json` and `info --json` give it.
#[derive(serde::Serialize)]
struct VolumeSummary {
    backing: PathBuf,
    volume_id: String,
    format: u32,
    cipher: String,
    sector_size: u32,
    #[serde(flatten)]
    key: output::KeyRef,
    keyring_id: String,
    key_versions: Vec<u32>,
    current_key_version: u32,
}

impl VolumeSummary {
    fn of(cfg: &VolumeConfig, backing: &std::path::Path) -> Self {
        VolumeSummary {
            backing: output::canonical(backing),
            volume_id: cfg.volume_id.clone(),
            format: cfg.format,
            cipher: cfg.cipher.clone(),
            sector_size: cfg.sector_size,
            key: output::KeyRef::of(&cfg.kms),
            keyring_id: cfg.keyring.id.clone(),
            key_versions: cfg.keyring.keys.iter().map(|k| k.version).collect(),
            current_key_version: cfg.keyring.current,
        }
    }
}

fn init(args: &KmsArgs, backing: &std::path::Path, format: u32) -> Result<VolumeConfig, Failure> {
    let Some(kms) = args.kms else {
        return Err(Failure::new(
            exit::USAGE,
            "earfs init needs --kms local|aws|gcp (or --join FILE)",
        ));
    };
    volume::check_new(backing)?;
    let cfg = if kms == Kms::Local {
        let spec = kms::spec(args, kms)?;
        kms::create_missing_key_file(&spec)?;
        let provider = spec.open(Retry::default())?;
        volume::create(backing, spec, provider.as_ref(), format)?
    } else {
        daemon::protect_key_material();
        let (spec, provider) = kms::open_validated(args, kms)?;
        volume::create(backing, spec, provider.as_ref(), format)?
    };
    output::say(format_args!(
        "created earfs volume {} in {}",
        cfg.volume_id,
        backing.display()
    ));
    output::say(format_args!(
        "key provider: {} ({})",
        cfg.kms.name(),
        cfg.kms.key_reference()
    ));
    output::say(format_args!("keyring:      {}", cfg.keyring.id));
    if matches!(cfg.kms, ProviderSpec::Local { .. }) {
        output::say(
            "note: the local key provider keeps the key on this machine; use a KMS for production data",
        );
    }
    Ok(cfg)
}

/// What `umount --json` prints.
#[derive(serde::Serialize)]
struct Unmounted {
    mountpoint: PathBuf,
    backing: PathBuf,
    /// Whether the daemon let go of the volume (its lock) in time.
    released: bool,
}

fn umount(mountpoint: PathBuf, json: bool) -> Result<(), Failure> {
    // A dead mount cannot be canonicalized (ENOTCONN): then take the path as given.
    let mp = std::fs::canonicalize(&mountpoint).unwrap_or_else(|_| daemon::absolute(&mountpoint));
    let Some(m) = daemon::find_mount(&mp)
        .filter(|m| m.fstype.starts_with("fuse") && m.source.starts_with("earfs:"))
    else {
        return Err(Failure::new(
            exit::NOT_MOUNTED,
            format!("{} is not an earfs mount", mp.display()),
        ));
    };
    daemon::unmount(&mp)?;
    let backing = m.source.strip_prefix("earfs:").unwrap_or(&m.source);
    if !daemon::wait_unlocked(std::path::Path::new(backing), Duration::from_secs(30)) {
        return Err(Failure::new(
            exit::FAILURE,
            format!(
                "unmounted {}, but its daemon still holds {} after 30 s",
                mp.display(),
                backing
            ),
        ));
    }
    if json {
        output::print(
            "earfs.umount.v1",
            &Unmounted {
                mountpoint: mp,
                backing: output::canonical(std::path::Path::new(backing)),
                released: true,
            },
        )?;
    }
    Ok(())
}

fn info(json: bool, files: bool, backing: PathBuf) -> Result<(), Failure> {
    let cfg = VolumeConfig::load(&backing)?;
    let census = if files {
        Some(files::count_files(&backing)?)
    } else {
        None
    };
    let versions: Vec<u32> = cfg.keyring.keys.iter().map(|k| k.version).collect();
    let aes = output::aes_kernel();
    if json {
        /// What `info --json` prints.
        #[derive(serde::Serialize)]
        struct Info<'a> {
            #[serde(flatten)]
            volume: VolumeSummary,
            aes_kernel: &'static str,
            /// Always false: info reads earfs.conf without the key.
            authenticated: bool,
            files: Option<&'a crate::fs::census::Census>,
        }
        return output::print(
            "earfs.info.v1",
            &Info {
                volume: VolumeSummary::of(&cfg, &backing),
                aes_kernel: aes,
                authenticated: false,
                files: census.as_ref(),
            },
        );
    } else {
        println!("volume:        {}", cfg.volume_id);
        println!("backing:       {}", backing.display());
        println!("format:        {}", cfg.format);
        println!(
            "cipher:        {} ({}-byte sectors)",
            cfg.cipher, cfg.sector_size
        );
        println!(
            "key provider:  {} ({})",
            cfg.kms.name(),
            cfg.kms.key_reference()
        );
        println!("keyring:       {}", cfg.keyring.id);
        println!(
            "key versions:  {:?} (current {})",
            versions, cfg.keyring.current
        );
        println!("AES kernel:    {aes}");
        println!(
            "authenticated: no (read without the key; `earfs kms-check {}` verifies earfs.conf)",
            backing.display()
        );
        if let Some(c) = &census {
            files::print_census(c, "");
        }
    }
    Ok(())
}

fn speed(json: bool, seconds: f64) -> Result<(), Failure> {
    if !(seconds > 0.0 && seconds <= 60.0) {
        return Err(Failure::new(exit::USAGE, "--seconds must be in (0, 60]"));
    }
    let r = crate::crypto::speed::measure(Duration::from_secs_f64(seconds));
    if json {
        output::print("earfs.speed.v1", &r)?;
    } else {
        println!(
            "# Tests are approximate, one core, {}-byte sectors ({}).",
            r.sector_size, r.implementation
        );
        println!("#     Algorithm |       Key |      Encryption |      Decryption");
        println!(
            "        aes-xts        512b  {:>9.1} MiB/s  {:>9.1} MiB/s",
            r.encrypt_bytes_per_sec / 1048576.0,
            r.decrypt_bytes_per_sec / 1048576.0
        );
    }
    Ok(())
}
