//! The control socket: `earfs status` asks a running daemon how it is doing.
//!
//! One socket per mount in the runtime directory (`/run/earfs`, mode 0700; the socket
//! 0600), named after a hash of the mountpoint. Only root may use it: the peer's
//! credentials are checked on every connection. The protocol is one request line
//! (`status`; `upgrade`: make the volume write the newest format; `rotate`: a new
//! current data key version; `rewrap [SPEC-JSON]`: wrap the data keys again, under
//! the volume's key or the one SPEC names; `import-keyring /ABSOLUTE/PATH`: merge a
//! newer export of the volume's keyring, which the daemon reads; `open-files`: the key
//! versions of the files the daemon holds open; `retire N [MOVES]`: drop key version N
//! once no file uses it; `rewrite JSON`: rewrite one file in place under the current
//! key and format, for `earfs reencrypt`) and one JSON reply.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::state::{RetireError, Shared};
use crate::kms::ProviderSpec;

/// Environment variable overriding the runtime directory (tests).
pub const RUNTIME_DIR_ENV: &str = "EARFS_RUNTIME_DIR";

/// The directory of the control sockets.
pub fn runtime_dir() -> PathBuf {
    std::env::var_os(RUNTIME_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/earfs"))
}

/// The control socket of the mount at `mountpoint` (canonical path).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    let h = Sha256::digest(mountpoint.as_os_str().as_encoded_bytes());
    runtime_dir().join(format!("mnt-{}.sock", hex::encode(&h[..8])))
}

/// Listen on the control socket of `shared`'s mountpoint and answer in a thread.
/// Returns the socket's path (removed by the caller at exit).
pub fn serve(shared: Arc<Shared>) -> std::io::Result<PathBuf> {
    let dir = runtime_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let path = socket_path(&shared.mountpoint);
    // A socket left by a daemon that died: nobody answers it, so it can go.
    if path.exists() && UnixStream::connect(&path).is_err() {
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("earfs-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                // Out of descriptors, the pending connection stays queued: wait
                // rather than spin on it.
                let Ok(conn) = conn else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                answer(&shared, conn);
            }
        })?;
    Ok(path)
}

fn answer(shared: &Arc<Shared>, conn: UnixStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let peer = rustix::net::sockopt::socket_peercred(&conn);
    let mut w = &conn;
    // Read the request before answering, even a refusal: closing with the request
    // unread would reset the connection, and the caller would see a reset instead of
    // the reason.
    let mut line = String::new();
    if BufReader::new((&conn).take(1024))
        .read_line(&mut line)
        .is_err()
    {
        return;
    }
    if !matches!(&peer, Ok(c) if c.uid.is_root()) {
        let _ = writeln!(
            w,
            "{}",
            serde_json::json!({ "error": "only root may use the control socket", "refused": true })
        );
        return;
    }
    let (verb, arg) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
    let reply = match verb {
        "status" => serde_json::to_string(&shared.status()).unwrap_or_default(),
        "upgrade" => match shared.upgrade() {
            Ok((from, to)) => serde_json::json!({ "from": from, "to": to }).to_string(),
            Err(e) => serde_json::json!({ "error": e }).to_string(),
        },
        "rotate" => match shared.rotate() {
            Ok((from, to)) => serde_json::json!({ "from": from, "to": to }).to_string(),
            Err(e) => serde_json::json!({ "error": e }).to_string(),
        },
        "rewrap" => {
            let spec = match arg {
                "" => Ok(None),
                json => serde_json::from_str::<ProviderSpec>(json)
                    .map(Some)
                    .map_err(|e| format!("rewrap: bad key spec: {e}")),
            };
            match spec.and_then(|s| shared.rewrap(s)) {
                Ok(r) => serde_json::to_string(&r).unwrap_or_default(),
                Err(e) => serde_json::json!({ "error": e }).to_string(),
            }
        }
        "import-keyring" => import_keyring(shared, arg),
        "open-files" => serde_json::to_string(&shared.open_key_use()).unwrap_or_default(),
        "retire" => retire(shared, line.trim()),
        "rewrite" => {
            // A rewrite may take long: it gets a thread, so that status stays answered.
            let shared = shared.clone();
            let arg = arg.to_string();
            let spawned = std::thread::Builder::new()
                .name("earfs-rewrite".into())
                .spawn(move || {
                    let reply = rewrite(&shared, &arg);
                    let _ = writeln!(&conn, "{reply}");
                });
            if let Err(e) = spawned {
                log::error!("op=rewrite cannot start a thread: {e}");
            }
            return;
        }
        other => serde_json::json!({ "error": format!("unknown request {other:?}") }).to_string(),
    };
    let _ = writeln!(w, "{reply}");
}

/// `retire N [MOVES]`: the reply names why a refusal was made (`in_use` with the
/// daemon's counts, or `moved`), so that the command can say it and pick its exit code.
fn retire(shared: &Shared, line: &str) -> String {
    let mut words = line.split_whitespace().skip(1);
    let version = words.next().and_then(|w| w.parse::<u32>().ok());
    let moves = words.next().map(|w| w.parse::<u64>());
    let (Some(version), None | Some(Ok(_)), None) = (version, &moves, words.next()) else {
        return serde_json::json!({ "error": format!("bad request {line:?}: retire VERSION [MOVES]") })
            .to_string();
    };
    match shared.retire(version, moves.and_then(Result::ok)) {
        Ok((retired, current)) => {
            serde_json::json!({ "retired": retired, "current": current }).to_string()
        }
        Err(RetireError::InUse {
            named,
            unlinked,
            unreadable,
            message,
        }) => serde_json::json!({
            "error": message,
            "in_use": { "named": named, "unlinked": unlinked, "unreadable": unreadable },
        })
        .to_string(),
        Err(RetireError::Moved) => serde_json::json!({
            "error": "files were renamed or linked while they were counted",
            "moved": true,
        })
        .to_string(),
        Err(RetireError::Failed(e)) => serde_json::json!({ "error": e }).to_string(),
    }
}

/// What a `rewrite` request asks (see `earfs reencrypt`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct RewriteRequest {
    /// The file's path under the backing root.
    pub path: PathBuf,
    /// Bytes per second at most (none: as fast as it goes).
    pub rate: Option<u64>,
    /// Rewrite it even while it is open through the mount.
    pub include_open: bool,
}

/// `rewrite JSON`: rewrite one file in place in the volume's format under the current
/// key (see `EarFs::rewrite`); the reply names what was done and the bytes moved.
fn rewrite(shared: &Shared, arg: &str) -> String {
    let req: RewriteRequest = match serde_json::from_str(arg) {
        Ok(r) => r,
        Err(e) => {
            return serde_json::json!({ "error": format!("rewrite: bad request: {e}") })
                .to_string();
        }
    };
    let started = std::time::Instant::now();
    let mut moved = 0u64;
    let each = |n: u64| {
        moved += n;
        if let Some(rate) = req.rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(moved as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    };
    match shared.fs.rewrite(&req.path, req.include_open, each) {
        Ok(done) => serde_json::json!({ "result": done, "bytes": moved }).to_string(),
        Err(e) => {
            log::error!("op=rewrite path={} {e}", req.path.display());
            serde_json::json!({ "error": e.to_string() }).to_string()
        }
    }
}

/// `import-keyring FILE`: merge the keyring in FILE (an absolute path) and switch to it.
fn import_keyring(shared: &Shared, file: &str) -> String {
    if !Path::new(file).is_absolute() {
        return serde_json::json!({ "error": "import-keyring needs an absolute path" }).to_string();
    }
    match shared.import_keyring(Path::new(file)) {
        Ok(Some(i)) => serde_json::json!({
            "changed": true,
            "from": i.from,
            "to": i.to,
            "added": i.added,
            "dropped": i.dropped,
            "kms_changed": i.kms_changed,
        })
        .to_string(),
        Ok(None) => serde_json::json!({ "changed": false }).to_string(),
        Err(f) => serde_json::json!({ "error": f.message, "exit_code": f.code }).to_string(),
    }
}

/// Ask the daemon behind `socket` for its status (JSON).
pub fn request_status(socket: &Path) -> std::io::Result<serde_json::Value> {
    request(socket, "status", Duration::from_secs(10))
}

/// Send `what` (`status`, `upgrade`, `rotate`) to the daemon behind `socket` and return its JSON
/// reply; a reply that names an error is an error (`PermissionDenied` for a refusal,
/// `Other` for a failed request).
pub fn request(socket: &Path, what: &str, timeout: Duration) -> std::io::Result<serde_json::Value> {
    let v = request_reply(socket, what, timeout)?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        let kind = if v.get("refused").and_then(|r| r.as_bool()) == Some(true) {
            std::io::ErrorKind::PermissionDenied
        } else {
            std::io::ErrorKind::Other
        };
        return Err(std::io::Error::new(kind, e.to_string()));
    }
    Ok(v)
}

/// Send `what` to the daemon behind `socket` and return its JSON reply as it is, an
/// error reply included (its `error` names what went wrong).
pub fn request_reply(
    socket: &Path,
    what: &str,
    timeout: Duration,
) -> std::io::Result<serde_json::Value> {
    let conn = UnixStream::connect(socket)?;
    conn.set_read_timeout(Some(timeout))?;
    let mut w = &conn;
    writeln!(w, "{what}")?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Every control socket in the runtime directory (none if it does not exist).
pub fn sockets() -> std::io::Result<Vec<PathBuf>> {
    let it = match std::fs::read_dir(runtime_dir()) {
        Ok(it) => it,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut v: Vec<PathBuf> = it
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    v.sort();
    Ok(v)
}
