//! `--log-level`, `-v`, `-q`: global flags, over the config file's `log_level` and
//! `EARFS_LOG` (src/daemon/logging.rs).

use clap::Args;
use log::LevelFilter;

use crate::daemon::logging;

/// The log level flags of every command.
#[derive(Debug, Clone, Default, Args)]
pub struct LogFlags {
    /// Log level: error, warn, info, debug, trace or off (over the config file's log_level and EARFS_LOG) [default: info].
    #[arg(long, global = true, value_name = "LEVEL", value_parser = parse,
          conflicts_with_all = ["verbose", "quiet"])]
    pub log_level: Option<LevelFilter>,
    /// More log lines: -v debug, -vv trace.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Fewer log lines: -q warnings and errors only, -qq errors only.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,
}

fn parse(s: &str) -> Result<LevelFilter, String> {
    logging::parse_level(s).ok_or_else(|| {
        format!("{s:?} is not a log level; use error, warn, info, debug, trace or off")
    })
}

impl LogFlags {
    /// The level asked for, if any.
    pub fn level(&self) -> Option<LevelFilter> {
        if let Some(l) = self.log_level {
            return Some(l);
        }
        match (self.verbose, self.quiet) {
            (0, 0) => None,
            (1, _) => Some(LevelFilter::Debug),
            (v, _) if v >= 2 => Some(LevelFilter::Trace),
            (_, 1) => Some(LevelFilter::Warn),
            _ => Some(LevelFilter::Error),
        }
    }

    /// Apply the level asked for (kept over the config file's).
    pub fn apply(&self) {
        if let Some(l) = self.level() {
            logging::set_flag_level(l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(log_level: Option<LevelFilter>, verbose: u8, quiet: u8) -> LogFlags {
        LogFlags {
            log_level,
            verbose,
            quiet,
        }
    }

    #[test]
    fn counted_flags_and_the_named_level() {
        assert_eq!(flags(None, 0, 0).level(), None);
        assert_eq!(flags(None, 1, 0).level(), Some(LevelFilter::Debug));
        assert_eq!(flags(None, 2, 0).level(), Some(LevelFilter::Trace));
        assert_eq!(flags(None, 5, 0).level(), Some(LevelFilter::Trace));
        assert_eq!(flags(None, 0, 1).level(), Some(LevelFilter::Warn));
        assert_eq!(flags(None, 0, 2).level(), Some(LevelFilter::Error));
        assert_eq!(
            flags(Some(LevelFilter::Off), 0, 0).level(),
            Some(LevelFilter::Off)
        );
        assert!(parse("loud").unwrap_err().contains("not a log level"));
    }
}
