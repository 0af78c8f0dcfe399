//! The `--json` outputs, one convention for all of them (docs/json.md):
//!
//! - standard output holds one JSON object and nothing else: the human lines a command
//!   prints on the way go to standard error instead ([`say`]);
//! - its first field, `"schema"`, names the JSON Schema in `docs/schemas/` that the
//!   object follows: `earfs.info.v1` is `docs/schemas/info.v1.json`;
//! - the fields the outputs share have one name each: `provider` (local, aws, gcp), `key`
//!   (the key file's path, the key ARN or the key resource), `aes_kernel`, and `backing`
//!   (canonical);
//! - a failure is an `earfs.error.v1` object ([`print_error`]) unless the command already
//!   printed its own document (a failed `fsck`, `kms-check` or `reencrypt` report).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::daemon::{self, Failure, exit};
use crate::kms::ProviderSpec;

/// Whether this run prints JSON (standard output is for the document only).
static JSON: AtomicBool = AtomicBool::new(false);
/// Whether the document was printed already.
static PRINTED: AtomicBool = AtomicBool::new(false);

/// Schema of the error object.
pub const ERROR_SCHEMA: &str = "earfs.error.v1";

/// From now on, human lines go to standard error ([`say`]).
pub fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

/// Print a line for a person: to standard output, or to standard error when standard
/// output carries a JSON document.
pub fn say(line: impl std::fmt::Display) {
    if JSON.load(Ordering::Relaxed) {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

#[derive(Serialize)]
struct Doc<'a, T: Serialize> {
    schema: &'a str,
    #[serde(flatten)]
    body: &'a T,
}

/// Print `body` (a struct, or a JSON object) as the run's JSON document, `"schema"` first.
pub fn print<T: Serialize>(schema: &str, body: &T) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(&Doc { schema, body }).map_err(|e| {
        Failure::new(
            exit::FAILURE,
            format!("cannot write the output as JSON: {e}"),
        )
    })?;
    println!("{text}");
    PRINTED.store(true, Ordering::Relaxed);
    Ok(())
}

/// The object a failed `--json` run prints (`earfs.error.v1`).
#[derive(Serialize)]
struct ErrorDoc<'a> {
    /// The subcommand (`info`, `mount`, ...).
    command: &'a str,
    ok: bool,
    /// The same line that standard error carries, without `earfs: `.
    error: &'a str,
    exit_code: u8,
}

/// After a failure: print it as JSON, unless the command printed its own document.
pub fn print_error(command: &str, f: &Failure) {
    if PRINTED.load(Ordering::Relaxed) {
        return;
    }
    let _ = print(
        ERROR_SCHEMA,
        &ErrorDoc {
            command,
            ok: false,
            error: &f.message,
            exit_code: f.code,
        },
    );
}

/// The key a volume's data keys are wrapped by, as every output names it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyRef {
    /// `local`, `aws` or `gcp`.
    pub provider: &'static str,
    /// The local key file's path, the key ARN, or the key resource.
    pub key: String,
}

impl KeyRef {
    pub fn of(spec: &ProviderSpec) -> Self {
        KeyRef {
            provider: spec.name(),
            key: spec.key_id(),
        }
    }
}

/// A backing directory as the outputs give it: canonical (absolute, no symlinks), or
/// absolute when it cannot be resolved (gone, or a dead mount).
pub fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| daemon::absolute(p))
}

/// The AES kernel this process encrypts with.
pub fn aes_kernel() -> &'static str {
    crate::crypto::implementation()
}
