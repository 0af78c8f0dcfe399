//! Logs to stderr, one line per event: `LEVEL message` with `key=value` fields.
//! Under systemd (JOURNAL_STREAM set) lines carry `<N>` priority prefixes for journald.
//! Level from `EARFS_LOG` (error, warn, info, debug, trace; default info).

use log::{Level, LevelFilter, Metadata, Record};

struct StderrLogger {
    journald: bool,
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // fuser is chatty at info about its own internals: keep it at debug.
        if r.target().starts_with("fuser")
            && r.level() > Level::Warn
            && log::max_level() < LevelFilter::Debug
        {
            return;
        }
        let line = if self.journald {
            let prio = match r.level() {
                Level::Error => 3,
                Level::Warn => 4,
                Level::Info => 6,
                Level::Debug | Level::Trace => 7,
            };
            format!("<{prio}>{}\n", r.args())
        } else {
            format!("earfs[{}] {} {}\n", std::process::id(), r.level(), r.args())
        };
        use std::io::Write;
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Install the logger (once).
pub fn init() {
    let level = match std::env::var("EARFS_LOG")
        .unwrap_or_default()
        .to_lowercase()
        .as_str()
    {
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        "off" => LevelFilter::Off,
        _ => LevelFilter::Info,
    };
    let logger = StderrLogger {
        journald: std::env::var_os("JOURNAL_STREAM").is_some(),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
