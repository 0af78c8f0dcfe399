//! `earfs cat BACKING_FILE...`: the plaintext of backing files on standard output,
//! without a mount, FUSE or the volume's lock, so that it works on a copy of a backing
//! directory (a snapshot, a backup), on a file copied out alone (`--conf`), or on a
//! live backing directory (read-only). The keys are unwrapped through the provider the
//! volume's `earfs.conf` records, with this machine's settings (`--credentials`,
//! `--profile`, `--region`, `--endpoint-url`, `--key-file`) applied.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use super::super::KmsArgs;
use super::super::kms::{node_spec, retry};
use crate::content::FileFormat;
use crate::daemon::{self, Failure, exit};
use crate::fs::copy::{CHUNK, Keys};
use crate::volume::{CONFIG_NAME, VolumeConfig};

/// `earfs cat [--conf FILE] BACKING_FILE...`: stops at the first file that fails.
pub(in crate::cli) fn cat(
    files: &[PathBuf],
    conf: Option<&Path>,
    args: &KmsArgs,
) -> Result<(), Failure> {
    daemon::protect_key_material();
    let conf = match conf {
        None => None,
        Some(c) => Some(std::fs::canonicalize(c).map_err(|e| {
            Failure::new(
                exit::NOT_A_VOLUME,
                format!(
                    "--conf {}: {e}: give the volume's earfs.conf (or a copy of it)",
                    c.display()
                ),
            )
        })?),
    };
    let mut volumes: HashMap<PathBuf, Keys> = HashMap::new();
    let mut out = std::io::stdout().lock();
    for file in files {
        let path = std::fs::canonicalize(file)
            .map_err(|e| Failure::new(exit::FAILURE, format!("{}: {e}", file.display())))?;
        let meta = std::fs::metadata(&path).map_err(|e| super::failed_at(&path, e))?;
        if !meta.is_file() {
            return Err(Failure::new(
                exit::FAILURE,
                format!(
                    "{}: not a regular file (earfs cat decrypts one backing file)",
                    path.display()
                ),
            ));
        }
        let conf_path = match &conf {
            Some(c) => c.clone(),
            None => find_conf(&path)?,
        };
        if conf_path == path {
            return Err(Failure::new(
                exit::USAGE,
                format!(
                    "{}: the volume's config, not one of its files",
                    path.display()
                ),
            ));
        }
        let keys = match volumes.entry(conf_path.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(unlock(&conf_path, args)?),
        };
        let done = write_plain(keys, &path, &mut out)?;
        if !done {
            // The reader went away (`earfs cat f | head -c 10`): nothing more to do.
            return Ok(());
        }
    }
    match out.flush() {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        r => r.map_err(|e| Failure::new(exit::FAILURE, format!("standard output: {e}"))),
    }
}

/// The `earfs.conf` of the volume that holds `file`: the nearest one in the
/// directories above it.
fn find_conf(file: &Path) -> Result<PathBuf, Failure> {
    let mut dir = file.parent();
    while let Some(d) = dir {
        let c = d.join(CONFIG_NAME);
        if c.is_file() {
            return Ok(c);
        }
        dir = d.parent();
    }
    Err(Failure::new(
        exit::NOT_A_VOLUME,
        format!(
            "{} is not inside an earfs volume (no {CONFIG_NAME} in any directory above it): give the volume's config with --conf FILE",
            file.display()
        ),
    ))
}

/// The keys of the volume whose config is `conf`, unwrapped through its provider with
/// this machine's settings, the config authenticated.
fn unlock(conf: &Path, args: &KmsArgs) -> Result<Keys, Failure> {
    let cfg = VolumeConfig::load_file(conf)?;
    let spec = node_spec(args, &cfg.kms)?;
    let provider = spec.open(retry(args.kms_deadline)?)?;
    let keyring = cfg.unlock_file(conf, provider.as_ref())?;
    let format = FileFormat::from_number(u64::from(cfg.format)).ok_or_else(|| {
        Failure::new(
            exit::BAD_CONFIG,
            format!("{}: unknown volume format {}", conf.display(), cfg.format),
        )
    })?;
    Ok(Keys::new(keyring, format))
}

/// Write the plaintext of the backing file at `path` to `out` (holes as zeros).
/// Returns false when `out` was closed by its reader.
fn write_plain(keys: &Keys, path: &Path, out: &mut impl Write) -> Result<bool, Failure> {
    let file = std::fs::File::open(path).map_err(|e| super::failed_at(path, e))?;
    let plain = keys.open(file, path).map_err(|e| cannot(path, e))?;
    let size = plain.size();
    let mut buf = vec![0u8; CHUNK.min(size as usize).max(1)];
    let mut off = 0u64;
    while off < size {
        let want = ((size - off) as usize).min(buf.len());
        let n = plain
            .read_at(off, &mut buf[..want])
            .map_err(|e| cannot(path, e))?;
        if n == 0 {
            return Err(Failure::new(
                exit::FAILURE,
                format!(
                    "{}: cannot decrypt: the data ends at {off}, before its size of {size} bytes",
                    path.display()
                ),
            ));
        }
        match out.write_all(&buf[..n]) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::BrokenPipe => return Ok(false),
            Err(e) => {
                return Err(Failure::new(exit::FAILURE, format!("standard output: {e}")));
            }
        }
        off += n as u64;
    }
    buf.fill(0);
    Ok(true)
}

/// A backing file that cannot be read or decrypted.
fn cannot(path: &Path, e: crate::fs::FsError) -> Failure {
    match e {
        crate::fs::FsError::Corrupt { reason, .. } => Failure::new(
            exit::FAILURE,
            format!("{}: cannot decrypt: {reason}", path.display()),
        ),
        e => Failure::new(
            exit::FAILURE,
            format!("{}: cannot decrypt: {e}", path.display()),
        ),
    }
}
