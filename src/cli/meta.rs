//! The command line about itself: `--version` in full, usage errors on one line, shell
//! completions and man pages.

use std::io::Write;
use std::path::Path;

use clap::{CommandFactory, FromArgMatches, ValueEnum};

use super::Cli;
use crate::crypto::xts::Kernel;
use crate::daemon::{Failure, exit};

/// Version of this build (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Git revision earfs was built from (`unknown` from a tarball without it).
pub const GIT_REVISION: &str = env!("EARFS_GIT_REVISION");
/// Build date, UTC (`SOURCE_DATE_EPOCH` when set).
pub const BUILD_DATE: &str = env!("EARFS_BUILD_DATE");
/// The fuser crate earfs was built with (Cargo.lock).
pub const FUSER_VERSION: &str = env!("EARFS_FUSER_VERSION");
/// The compiler that built earfs.
pub const RUSTC_VERSION: &str = env!("EARFS_RUSTC_VERSION");

/// Shells `earfs completions` writes a script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// What `earfs --version` prints after `earfs `: the version, then one `field: value`
/// line per build fact. The AES kernels are this CPU's, asked at run time.
pub fn long_version() -> String {
    let (have, lack): (Vec<Kernel>, Vec<Kernel>) =
        Kernel::ALL.into_iter().partition(|k| k.is_available());
    let names = |ks: &[Kernel]| ks.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ");
    let mut aes = names(&have);
    if !lack.is_empty() {
        aes.push_str(&format!(" (not on this CPU: {})", names(&lack)));
    }
    format!(
        "{VERSION}\n\
         revision:    {GIT_REVISION}\n\
         build date:  {BUILD_DATE}\n\
         AES kernels: {aes}\n\
         XTS kernel:  {}\n\
         fuser:       {FUSER_VERSION}\n\
         rustc:       {RUSTC_VERSION}",
        Kernel::best().name()
    )
}

/// The clap command of earfs, `--version` in full included.
pub fn command() -> clap::Command {
    Cli::command().long_version(long_version())
}

/// Parse the process's command line. `--help` and `--version` print and exit 0; a
/// usage error prints one `earfs: …` line, then the usage, and exits 2.
pub fn parse() -> Cli {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match try_parse(&args) {
        Ok(cli) => cli,
        Err(Usage::Exit(e)) => e.exit(),
        Err(Usage::Error(text)) => {
            // `--json` asked for JSON: the error is JSON too (its command is the first
            // argument that names one).
            if args.iter().any(|a| a == "--json") {
                let name = subcommand_of(&args).map(|s| s.get_name().to_string());
                let line = text.lines().next().unwrap_or("");
                super::output::print_error(
                    name.as_deref().unwrap_or("earfs"),
                    &Failure::new(exit::USAGE, line.strip_prefix("earfs: ").unwrap_or(line)),
                );
            }
            eprint!("{text}");
            std::process::exit(i32::from(exit::USAGE))
        }
    }
}

/// What parsing a command line that is not a command gives.
pub enum Usage {
    /// `--help`, `--version`: clap prints them and exits 0.
    Exit(clap::Error),
    /// A usage error, as printed: one `earfs: …` line, then the usage.
    Error(String),
}

/// Parse ARGS (the program name first).
pub fn try_parse(args: &[std::ffi::OsString]) -> Result<Cli, Usage> {
    let e = match command()
        .try_get_matches_from(args)
        .and_then(|mut m| Cli::from_arg_matches_mut(&mut m).map_err(|e| e.format(&mut command())))
    {
        Ok(cli) => return Ok(cli),
        Err(e) => e,
    };
    if !e.use_stderr() {
        return Err(Usage::Exit(e));
    }
    let rendered = e.render().to_string();
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // Bare `earfs`: clap's answer is the whole help; keep it from its usage on.
        let help = rendered
            .find("Usage:")
            .map(|at| &rendered[at..])
            .unwrap_or(&rendered);
        return Err(Usage::Error(format!(
            "earfs: no command given\n{}\n",
            help.trim_end()
        )));
    }
    Err(Usage::Error(usage_error(&rendered, &usage_of(args))))
}

/// The usage line of the subcommand ARGS name (the first argument that is one), or of
/// earfs itself.
fn usage_of(args: &[std::ffi::OsString]) -> String {
    match subcommand_of(args) {
        Some(mut s) => s.render_usage().to_string(),
        None => Cli::command().render_usage().to_string(),
    }
}

/// The subcommand ARGS name: the first argument that is one.
fn subcommand_of(args: &[std::ffi::OsString]) -> Option<clap::Command> {
    let mut cmd = Cli::command();
    cmd.build();
    args.iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .find_map(|a| cmd.find_subcommand(a).cloned())
}

/// Reshape clap's rendered error (`error: …`, indented context and tips, a blank line,
/// `Usage: …`, `For more information, try '--help'.`) into one `earfs: …` line that
/// carries the context and tips, then the usage (USAGE when clap's text has none) and
/// the pointer to `--help`.
pub fn usage_error(rendered: &str, usage: &str) -> String {
    let mut first = String::new();
    let mut extra = Vec::new();
    let mut usage_lines = String::new();
    let mut more = String::new();
    let mut in_usage = false;
    for line in rendered.lines() {
        if line.starts_with("For more information") {
            more = line.to_string();
            in_usage = false;
        } else if in_usage {
            if !line.trim().is_empty() {
                usage_lines.push_str(line);
                usage_lines.push('\n');
            }
        } else if line.starts_with("Usage:") {
            in_usage = true;
            usage_lines.push_str(line);
            usage_lines.push('\n');
        } else if first.is_empty() {
            first = line
                .strip_prefix("error: ")
                .unwrap_or(line)
                .trim()
                .to_string();
        } else if !line.trim().is_empty() {
            let t = line.trim();
            let t = t
                .strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .unwrap_or(t);
            extra.push(t.to_string());
        }
    }
    if !extra.is_empty() {
        first = if first.ends_with(':') {
            // "the following required arguments were not provided:" and its list
            format!("{first} {}", extra.join(", "))
        } else {
            format!("{first} ({})", extra.join("; "))
        };
    }
    if usage_lines.is_empty() {
        usage_lines = format!("{}\n", usage.trim_end());
    }
    let mut out = format!("earfs: {first}\n{usage_lines}");
    if !more.is_empty() {
        out.push_str(&more);
        out.push('\n');
    }
    out
}

/// `earfs completions SHELL`: the completion script on standard output.
pub fn completions(shell: Shell) -> Result<(), Failure> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    match shell {
        Shell::Bash => {
            clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "earfs", &mut out)
        }
        Shell::Zsh => {
            clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, "earfs", &mut out)
        }
        Shell::Fish => {
            clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, "earfs", &mut out)
        }
    }
    std::io::stdout()
        .write_all(&out)
        .map_err(|e| Failure::new(exit::FAILURE, format!("standard output: {e}")))
}

/// `earfs man DIR`: one man page per command into DIR (earfs.1, earfs-mount.1, …),
/// dated with the build date. Prints the files it wrote.
pub fn man_pages(dir: &Path) -> Result<(), Failure> {
    let io = |what: &Path, e: std::io::Error| {
        Failure::new(exit::FAILURE, format!("{}: {e}", what.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = vec![cmd.clone()];
    pages.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    for page in pages {
        let man = clap_mangen::Man::new(page)
            .date(BUILD_DATE)
            .source(format!("earfs {VERSION}"))
            .manual("earfs manual");
        let path = dir.join(man.get_filename());
        let mut buf = Vec::new();
        man.render(&mut buf).map_err(|e| io(&path, e))?;
        let text = ascii_roff(&String::from_utf8_lossy(&buf));
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// Non-ASCII characters as groff's `\[uXXXX]` escapes: a page then renders without
/// warnings whether or not the formatter runs preconv first (man-db does, plain
/// `groff -man` and some lint tools do not).
fn ascii_roff(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            out.push_str(&format!("\\[u{:04X}]", u32::from(c)));
        }
    }
    out
}
