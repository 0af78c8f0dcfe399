//! Mountpoint chores: checking a mountpoint, clearing a crashed daemon's dead mount,
//! unmounting, naming who holds a busy mount, and the volume's exclusive lock.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;
use rustix::io::Errno;

use super::{Failure, absolute, exit, find_mount, mounted_from};

/// Check the mountpoint: a directory, empty, not already a mount.
pub fn check_mountpoint(mp: &Path) -> Result<PathBuf, Failure> {
    let meta = match std::fs::metadata(mp) {
        Ok(m) => m,
        Err(e)
            if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED))
                && clear_stale_mount(mp) =>
        {
            std::fs::metadata(mp).map_err(|e| {
                Failure::new(
                    exit::BAD_MOUNTPOINT,
                    format!("mountpoint {}: {e}", mp.display()),
                )
            })?
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)) => {
            return Err(Failure::new(
                exit::ALREADY_MOUNTED,
                format!(
                    "{} holds a dead FUSE mount (its daemon is gone); clear it with `earfs umount {}`",
                    mp.display(),
                    mp.display()
                ),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Failure::new(
                exit::BAD_MOUNTPOINT,
                format!(
                    "mountpoint {} does not exist; create it with `mkdir -p {}`",
                    mp.display(),
                    mp.display()
                ),
            ));
        }
        Err(e) => {
            return Err(Failure::new(
                exit::BAD_MOUNTPOINT,
                format!("mountpoint {}: {e}", mp.display()),
            ));
        }
    };
    if !meta.is_dir() {
        return Err(Failure::new(
            exit::BAD_MOUNTPOINT,
            format!("mountpoint {} is not a directory", mp.display()),
        ));
    }
    let canon = std::fs::canonicalize(mp).unwrap_or_else(|_| absolute(mp));
    // A dead mount can still answer stat from the kernel's attribute cache; statfs
    // always asks the daemon.
    let dead = |p: &Path| {
        matches!(
            rustix::fs::statfs(p),
            Err(Errno::NOTCONN | Errno::CONNABORTED)
        )
    };
    if find_mount(&canon).is_some() && dead(&canon) {
        clear_stale_mount(&canon);
    }
    if let Some(m) = find_mount(&canon) {
        return Err(Failure::new(
            exit::ALREADY_MOUNTED,
            format!(
                "{} is already a mount point ({} from {}); unmount it first",
                canon.display(),
                m.fstype,
                m.source
            ),
        ));
    }
    let mut it = std::fs::read_dir(&canon).map_err(|e| {
        Failure::new(
            exit::BAD_MOUNTPOINT,
            format!("mountpoint {}: {e}", canon.display()),
        )
    })?;
    if it.next().is_some() {
        return Err(Failure::new(
            exit::MOUNTPOINT_NOT_EMPTY,
            format!(
                "mountpoint {} is not empty; earfs mounts only over an empty directory, so that nothing hides under the mount",
                canon.display()
            ),
        ));
    }
    Ok(canon)
}

/// A dead FUSE mount of a crashed earfs daemon at `mp`: unmount it (and say so).
/// Anything else at `mp` is left alone.
fn clear_stale_mount(mp: &Path) -> bool {
    let path = absolute(mp);
    let Some(m) = find_mount(&path) else {
        return false;
    };
    if !(m.fstype.starts_with("fuse") && m.source.starts_with("earfs:")) {
        return false;
    }
    match unmount(&path) {
        Ok(()) => {
            log::warn!(
                "cleared the dead mount of a crashed earfs daemon at {} ({})",
                path.display(),
                m.source
            );
            true
        }
        Err(f) => {
            log::warn!("cannot clear the dead mount at {}: {f}", path.display());
            false
        }
    }
}

/// Processes that hold something under `mp` (cwd, root, an open file, a mapping):
/// `pid (comm)` each, for the message of a busy unmount.
pub fn holders(mp: &Path) -> Vec<String> {
    let me = std::process::id();
    let under = |p: &Path| p.starts_with(mp);
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = e.path();
        let mut holds = ["cwd", "root"]
            .iter()
            .any(|l| std::fs::read_link(base.join(l)).is_ok_and(|p| under(&p)));
        if !holds && let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            holds = fds
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| under(&p)));
        }
        if !holds && let Ok(maps) = std::fs::read_to_string(base.join("maps")) {
            holds = maps
                .lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .any(|p| under(Path::new(p)));
        }
        if holds {
            let comm = std::fs::read_to_string(base.join("comm")).unwrap_or_default();
            out.push(format!("{pid} ({})", comm.trim()));
        }
    }
    out
}

/// How long a mount waits for the lock of a volume that no earfs mount serves.
const DYING_HOLDER_GRACE: Duration = Duration::from_secs(5);

/// Take the volume's exclusive lock (flock on the backing directory). While no earfs
/// mount of the volume is in the mount table, the holder is a daemon on its way out (a
/// killed daemon's mount errors as soon as its FUSE descriptors close, before the
/// kernel releases its lock) or a data command: wait a few seconds for it first.
pub(super) fn lock_volume(backing: &Path) -> Result<File, Failure> {
    let start = Instant::now();
    loop {
        if let Some(f) = try_lock_volume(backing)? {
            return Ok(f);
        }
        if start.elapsed() > DYING_HOLDER_GRACE || mounted_from(backing) {
            return Err(Failure::new(
                exit::VOLUME_IN_USE,
                format!(
                    "volume {} is already mounted by another earfs daemon; a volume can be mounted only once",
                    backing.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Take the volume's exclusive lock if no daemon holds it (`None`: one does). Held
/// while the returned file is open.
pub fn try_lock_volume(backing: &Path) -> Result<Option<File>, Failure> {
    let dir = File::open(backing)
        .map_err(|e| Failure::new(exit::NOT_A_VOLUME, format!("{}: {e}", backing.display())))?;
    match rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(dir)),
        Err(Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(Failure::new(
            exit::FAILURE,
            format!("cannot lock {}: {e}", backing.display()),
        )),
    }
}

/// Unmount `mp`: umount(2) as root, else fusermount3 -u.
pub fn unmount(mp: &Path) -> Result<(), Failure> {
    match rustix::mount::unmount(mp, rustix::mount::UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::BUSY) => Err(Failure::new(
            exit::BUSY,
            format!(
                "{} is busy: a process has a file or its working directory under it (see `fuser -vm {}`)",
                mp.display(),
                mp.display()
            ),
        )),
        Err(Errno::PERM) => {
            let out = Command::new("fusermount3").arg("-u").arg(mp).output();
            match out {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => Err(Failure::new(
                    exit::FAILURE,
                    String::from_utf8_lossy(&o.stderr).trim().to_string(),
                )),
                Err(e) => Err(Failure::new(exit::FAILURE, format!("fusermount3: {e}"))),
            }
        }
        Err(e) => Err(Failure::new(
            exit::FAILURE,
            format!("cannot unmount {}: {e}", mp.display()),
        )),
    }
}

/// Wait until no daemon holds the volume's lock (after an unmount).
pub fn wait_unlocked(backing: &Path, deadline: Duration) -> bool {
    let start = Instant::now();
    loop {
        if let Ok(dir) = File::open(backing) {
            if rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive).is_ok() {
                return true;
            }
        } else {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hold `dir`'s volume lock (a separate open file description, as another process
    /// would) for `hold`, in a thread.
    fn hold_lock(dir: &Path, hold: Duration) -> std::thread::JoinHandle<()> {
        let held = try_lock_volume(dir).unwrap().expect("the lock is free");
        std::thread::spawn(move || {
            std::thread::sleep(hold);
            drop(held);
        })
    }

    #[test]
    fn the_lock_of_a_holder_without_a_mount_is_waited_for() {
        let d = tempfile::tempdir().unwrap();
        let holder = hold_lock(d.path(), Duration::from_millis(400));
        let t = Instant::now();
        // No earfs mount of this directory exists: the holder is on its way out.
        let lock = lock_volume(d.path()).expect("the lock, once the holder let go");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        holder.join().unwrap();
        assert!(
            try_lock_volume(d.path()).unwrap().is_none(),
            "held by `lock`"
        );
        drop(lock);
    }

    #[test]
    fn a_holder_that_stays_makes_the_lock_fail_after_the_grace() {
        let d = tempfile::tempdir().unwrap();
        let holder = hold_lock(d.path(), DYING_HOLDER_GRACE + Duration::from_secs(2));
        let t = Instant::now();
        let e = lock_volume(d.path()).expect_err("still held");
        assert_eq!(e.code, exit::VOLUME_IN_USE);
        assert!(e.message.contains("already mounted"), "{}", e.message);
        assert!(t.elapsed() >= DYING_HOLDER_GRACE, "{:?}", t.elapsed());
        holder.join().unwrap();
    }
}
