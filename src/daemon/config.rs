//! The daemon config file (`/etc/earfs/NAME.toml`, `earfs mount --config FILE`).
//! Unknown keys and bad values are errors that name the key and the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::mountopts::{self, MountOpt};
use super::{Failure, exit};
use crate::kms::KmsOverrides;

/// What to do when a recheck finds the CMK revoked (disabled, pending deletion,
/// destroyed, access denied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RevocationPolicy {
    /// Wipe the data keys from memory; file I/O fails with EIO until a later check
    /// unwraps the keys again.
    Lock,
    /// Only report (log, status, metrics).
    Warn,
}

impl RevocationPolicy {
    pub fn name(self) -> &'static str {
        match self {
            RevocationPolicy::Lock => "lock",
            RevocationPolicy::Warn => "warn",
        }
    }
}

/// Log levels of the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// The file as written (durations and addresses are checked after parsing, so that the
/// error names the key).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    backing: Option<PathBuf>,
    mountpoint: Option<PathBuf>,
    allow_other: Option<bool>,
    threads: Option<i64>,
    writeback_cache: Option<bool>,
    options: Option<Vec<toml::Spanned<String>>>,
    log_level: Option<LogLevel>,
    metrics_address: Option<String>,
    stop_timeout: Option<String>,
    #[serde(default)]
    kms: RawKms,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKms {
    credentials_file: Option<PathBuf>,
    profile: Option<String>,
    region: Option<String>,
    endpoint_url: Option<String>,
    deadline: Option<String>,
    recheck_interval: Option<String>,
    revocation_policy: Option<RevocationPolicy>,
}

/// A checked config file; `None` where the file is silent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileConfig {
    pub path: PathBuf,
    pub backing: Option<PathBuf>,
    pub mountpoint: Option<PathBuf>,
    pub allow_other: Option<bool>,
    pub threads: Option<usize>,
    pub writeback_cache: Option<bool>,
    /// The kernel's options only (mount flags, FUSE options): `allow_other` is folded
    /// into `allow_other`, fstab-only options (`nofail`, `x-systemd.*`, …) dropped.
    pub options: Option<Vec<String>>,
    pub log_level: Option<LogLevel>,
    pub metrics_address: Option<SocketAddr>,
    pub stop_timeout: Option<Duration>,
    pub kms: KmsOverrides,
    pub kms_deadline: Option<Duration>,
    /// `Some(None)`: rechecks disabled ("0").
    pub recheck_interval: Option<Option<Duration>>,
    pub revocation_policy: Option<RevocationPolicy>,
}

/// "line L, column C" of a byte offset, counted as toml's own errors count them (from
/// 1; the column in characters).
fn position(text: &str, offset: usize) -> String {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit_once('\n')
        .map_or(before, |(_, l)| l)
        .chars()
        .count()
        + 1;
    format!("line {line}, column {column}")
}

fn config_error(path: &Path, msg: impl std::fmt::Display) -> Failure {
    Failure::new(exit::CONFIG_FILE, format!("{}: {msg}", path.display()))
}

/// Parse a duration such as "90s", "15m", "1h 30m".
/// A duration as flags and the config file take it: humantime ("90s", "15m", "1h 30m"),
/// or a bare number of seconds ("90").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.trim().parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!(
            "{s:?} is not a duration ({e}); write e.g. \"90s\", \"15m\", \"1h\" or a number of seconds"
        )
    })
}

/// A KMS deadline on the command line: a duration (a bare number is seconds), whole
/// seconds from 1 s to 1 h; returns the seconds.
pub fn parse_deadline_seconds(s: &str) -> Result<u64, String> {
    let d = parse_duration(s)?;
    if d.subsec_nanos() != 0 || !(1..=3600).contains(&d.as_secs()) {
        return Err(format!("{s:?} must be whole seconds between 1 s and 1 h"));
    }
    Ok(d.as_secs())
}

/// A recheck interval: a duration, or "0" to disable rechecks.
pub fn parse_interval(s: &str) -> Result<Option<Duration>, String> {
    if s.trim() == "0" {
        return Ok(None);
    }
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?} is shorter than 1 s (use \"0\" to disable)"));
    }
    Ok(Some(d))
}

/// A metrics address: an IP and port on a loopback interface.
pub fn parse_metrics_address(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an address and port such as \"127.0.0.1:9814\""))?;
    if !a.ip().is_loopback() {
        return Err(format!(
            "{s:?} is not a loopback address; the metrics endpoint has no authentication, so it listens on loopback only (put a proxy in front to expose it)"
        ));
    }
    Ok(a)
}

impl FileConfig {
    /// Read and check a config file.
    pub fn load(path: &Path) -> Result<FileConfig, Failure> {
        let text = std::fs::read_to_string(path).map_err(|e| config_error(path, e))?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| {
            let at = e
                .span()
                .map(|s| format!("{}: ", position(&text, s.start)))
                .unwrap_or_default();
            config_error(
                path,
                format!("{at}{}", e.message().trim_end().replace('\n', "; ")),
            )
        })?;
        let key = |k: &str, m: String| config_error(path, format!("{k}: {m}"));
        let threads = match raw.threads {
            None => None,
            Some(t) if (1..=256).contains(&t) => Some(t as usize),
            Some(t) => return Err(key("threads", format!("{t} is not between 1 and 256"))),
        };
        let mut allow_other = raw.allow_other;
        let options = match &raw.options {
            None => None,
            Some(list) => {
                let mut kernel = Vec::new();
                for o in list {
                    let bad = |m: String| {
                        config_error(
                            path,
                            format!("{}: options: {m}", position(&text, o.span().start)),
                        )
                    };
                    match mountopts::classify(o.get_ref()).map_err(bad)? {
                        MountOpt::Userspace | MountOpt::Implied => {}
                        MountOpt::Kernel(k) => kernel.push(k),
                        MountOpt::AllowOther if allow_other == Some(false) => {
                            return Err(bad(
                                "\"allow_other\" contradicts allow_other = false".into()
                            ));
                        }
                        MountOpt::AllowOther => allow_other = Some(true),
                        MountOpt::Earfs(name, value) => {
                            let instead = match (name, value) {
                                ("config", _) => "it has no meaning inside a config file".into(),
                                ("log_file", _) => {
                                    "give --log-file on the command line instead".into()
                                }
                                ("credentials", Some(v)) => {
                                    format!("write credentials_file = {v:?} under [kms] instead")
                                }
                                (n, Some(v)) => format!("write {n} = {v:?} instead"),
                                (n, None) => format!("write {n} = true instead"),
                            };
                            return Err(bad(format!(
                                "{:?} is an earfs setting, not a mount option: {instead}",
                                o.get_ref()
                            )));
                        }
                    }
                }
                Some(kernel)
            }
        };
        for (k, p) in [("backing", &raw.backing), ("mountpoint", &raw.mountpoint)] {
            if let Some(p) = p
                && !p.is_absolute()
            {
                return Err(key(k, format!("{} is not an absolute path", p.display())));
            }
        }
        if let Some(p) = &raw.kms.credentials_file
            && !p.is_absolute()
        {
            return Err(key(
                "kms.credentials_file",
                format!("{} is not an absolute path", p.display()),
            ));
        }
        let dur = |k: &str, v: &Option<String>| -> Result<Option<Duration>, Failure> {
            v.as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|m| key(k, m))
        };
        let kms_deadline = dur("kms.deadline", &raw.kms.deadline)?;
        if let Some(d) = kms_deadline
            && !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&d)
        {
            return Err(key("kms.deadline", "must be between 1 s and 1 h".into()));
        }
        let stop_timeout = dur("stop_timeout", &raw.stop_timeout)?;
        let recheck_interval = raw
            .kms
            .recheck_interval
            .as_deref()
            .map(parse_interval)
            .transpose()
            .map_err(|m| key("kms.recheck_interval", m))?;
        let metrics_address = raw
            .metrics_address
            .as_deref()
            .map(parse_metrics_address)
            .transpose()
            .map_err(|m| key("metrics_address", m))?;
        Ok(FileConfig {
            path: path.to_path_buf(),
            backing: raw.backing,
            mountpoint: raw.mountpoint,
            allow_other,
            threads,
            writeback_cache: raw.writeback_cache,
            options,
            log_level: raw.log_level,
            metrics_address,
            stop_timeout,
            kms: KmsOverrides {
                key_file: None,
                credentials_file: raw.kms.credentials_file,
                profile: raw.kms.profile,
                region: raw.kms.region,
                endpoint_url: raw.kms.endpoint_url,
            },
            kms_deadline,
            recheck_interval,
            revocation_policy: raw.kms.revocation_policy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_humantime_or_bare_seconds_everywhere() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration(" 2m "), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-5").is_err());
        assert_eq!(parse_deadline_seconds("60"), Ok(60));
        assert_eq!(parse_deadline_seconds("2m"), Ok(120));
        for bad in ["0", "0s", "1500ms", "2h", "x"] {
            assert!(parse_deadline_seconds(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_interval("0"), Ok(None));
        assert_eq!(parse_interval("900"), Ok(Some(Duration::from_secs(900))));
    }

    fn load(text: &str) -> Result<FileConfig, Failure> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("db.toml");
        std::fs::write(&p, text).unwrap();
        FileConfig::load(&p)
    }

    #[test]
    fn full_config_parses() {
        let c = load(
            r#"
backing = "/data/enc"
mountpoint = "/var/lib/db"
allow_other = true
threads = 4
writeback_cache = false
options = ["noatime"]
log_level = "debug"
metrics_address = "127.0.0.1:9814"
stop_timeout = "30s"
[kms]
credentials_file = "/etc/earfs/db.kms"
profile = "earfs"
region = "us-east-1"
endpoint_url = "https://kms.example.test"
deadline = "2m"
recheck_interval = "15m"
revocation_policy = "warn"
"#,
        )
        .unwrap();
        assert_eq!(c.threads, Some(4));
        assert_eq!(c.kms_deadline, Some(Duration::from_secs(120)));
        assert_eq!(c.recheck_interval, Some(Some(Duration::from_secs(900))));
        assert_eq!(c.revocation_policy, Some(RevocationPolicy::Warn));
        assert_eq!(c.stop_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.kms.profile.as_deref(), Some("earfs"));
        assert_eq!(
            load("[kms]\nrecheck_interval = \"0\"\n")
                .unwrap()
                .recheck_interval,
            Some(None)
        );
    }

    #[test]
    fn options_keep_the_kernels_and_drop_fstabs() {
        let c = load(
            "options = [\"noatime\", \"nofail\", \"_netdev\", \"x-systemd.requires=k.service\", \"allow_other\", \"ro\", \"default_permissions\"]\n",
        )
        .unwrap();
        assert_eq!(c.options, Some(vec!["noatime".into(), "ro".into()]));
        assert_eq!(c.allow_other, Some(true));
    }

    #[test]
    fn syntax_errors_give_the_line_and_column_toml_gives() {
        for text in [
            "threads = \"four\"\n",
            "# settings\n\nthreads = \"four\"\n",
            "backing = \"/a\"\n[kms]\nregion = 5\n",
            "backing = \"/a\"\nthreads = \n",
            "\n\nunknown_key = 1\n",
        ] {
            let toml_text = toml::from_str::<RawConfig>(text).unwrap_err().to_string();
            let first = toml_text.lines().next().unwrap();
            let at = first.strip_prefix("TOML parse error at ").unwrap();
            let e = load(text).unwrap_err();
            assert!(
                e.message.contains(&format!("db.toml: {at}: ")),
                "{text:?}: {} vs {first}",
                e.message
            );
            assert!(!e.message.contains('\n'), "{}", e.message);
        }
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        for (text, words) in [
            ("thread = 4\n", "unknown field `thread`"),
            ("threads = 0\n", "threads: 0 is not between 1 and 256"),
            ("threads = \"four\"\n", "line 1"),
            (
                "[kms]\nrecheck_interval = \"15 parsecs\"\n",
                "kms.recheck_interval",
            ),
            (
                "[kms]\nrevocation_policy = \"lok\"\n",
                "unknown variant `lok`",
            ),
            (
                "metrics_address = \"0.0.0.0:9814\"\n",
                "not a loopback address",
            ),
            (
                "backing = \"data\"\n",
                "backing: data is not an absolute path",
            ),
            (
                "backing = \"/data/enc\"\noptions = [\"noatime\", \"nofial\"]\n",
                "line 2, column 23: options: unknown mount option \"nofial\"",
            ),
            (
                "options = [\"threads=4\"]\n",
                "line 1, column 12: options: \"threads=4\" is an earfs setting, not a mount option: write threads = \"4\" instead",
            ),
            (
                "allow_other = false\noptions = [\"allow_other\"]\n",
                "line 2, column 12: options: \"allow_other\" contradicts allow_other = false",
            ),
            ("options = \"noatime\"\n", "line 1, column 11"),
            ("# settings\n\nthreads = \"four\"\n", "line 3, column 11"),
            ("threads = 4\nthreads = 5\n", "line 2"),
            ("threads = \n", "line 1, column 11"),
            ("[kms]\ndeadline = \"0s\"\n", "kms.deadline"),
            ("[kms]\nkey_arn = \"x\"\n", "unknown field `key_arn`"),
        ] {
            let e = load(text).unwrap_err();
            assert_eq!(e.code, exit::CONFIG_FILE, "{text}");
            assert!(e.message.contains("db.toml"), "{}", e.message);
            assert!(e.message.contains(words), "{text}: {}", e.message);
        }
    }
}
