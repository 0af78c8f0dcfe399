//! The calls that change backing files and directories. Every such call of the `fs`
//! layer goes through here, so that a test can record them: the crash-state explorer
//! (`tests/crash.rs`) rebuilds from a recording the states a power cut can leave.
//!
//! Reads go through here too (recorded as [`Op::Read`]), so that a test can see which
//! descriptor and offsets a read used.
//!
//! A recorder is set only by tests, per thread (the fs core driven without a mount) or
//! for the whole process (`tests/powercut.rs`: a mount served by this process while
//! real databases commit on it); an injected write failure is set per thread
//! ([`fail_thread_write`]) or for the whole process ([`fail_process_writes`]), by tests.
//! The daemon never sets any of them, and then each call costs one thread-local flag
//! check and one or two relaxed atomic loads.

use std::cell::{Cell, RefCell};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use rustix::fs::FallocateFlags;
use rustix::io::Errno;

use super::error::{FsError, FsResult};

/// One backing call that succeeded (a pwrite may be recorded in several parts).
#[derive(Debug)]
pub enum Op<'a> {
    /// `pread(fd, len, off)` that returned `got` bytes (changes nothing).
    Read {
        fd: BorrowedFd<'a>,
        off: u64,
        len: usize,
        got: usize,
    },
    /// `pwrite(fd, data, off)`.
    Write {
        fd: BorrowedFd<'a>,
        off: u64,
        data: &'a [u8],
    },
    /// `ftruncate(fd, len)`.
    SetLen { fd: BorrowedFd<'a>, len: u64 },
    /// `fallocate(fd, mode, off, len)`; with `PUNCH_HOLE` the range reads as zeros.
    Fallocate {
        fd: BorrowedFd<'a>,
        mode: FallocateFlags,
        off: u64,
        len: u64,
    },
    /// `fsync` (`data_only == false`) or `fdatasync` of a file.
    Sync { fd: BorrowedFd<'a>, data_only: bool },
    /// A name was created in a directory (a new file, directory, node or link).
    Create {
        dir: BorrowedFd<'a>,
        name: &'a OsStr,
    },
    /// `renameat2(from_dir, from, to_dir, to, flags)`.
    Rename {
        from_dir: BorrowedFd<'a>,
        from: &'a OsStr,
        to_dir: BorrowedFd<'a>,
        to: &'a OsStr,
        flags: u32,
    },
    /// A name was removed from a directory.
    Unlink {
        dir: BorrowedFd<'a>,
        name: &'a OsStr,
    },
    /// `fsync` of a directory.
    SyncDir { dir: BorrowedFd<'a> },
}

/// Receives every backing call of this thread (or process) after it succeeded.
pub trait Recorder {
    fn record(&self, op: &Op<'_>);
}

/// An injected failure of one `pwrite_all` (see [`fail_thread_write`]).
#[derive(Clone, Copy)]
struct WriteFault {
    /// `pwrite_all` calls to let through before the failing one.
    skip: u32,
    /// Bytes the failing call really writes before it fails.
    partial: usize,
}

/// Bits of `HOOKS`.
const RECORDING: u8 = 1;
const FAULT: u8 = 2;

thread_local! {
    /// Which test hooks this thread has on (0 in the daemon): one check per call.
    static HOOKS: Cell<u8> = const { Cell::new(0) };
    static RECORDER: RefCell<Option<Rc<dyn Recorder>>> = const { RefCell::new(None) };
    static WRITE_FAULT: Cell<Option<WriteFault>> = const { Cell::new(None) };
}

fn set_hook(bit: u8, on: bool) {
    HOOKS.with(|h| h.set(if on { h.get() | bit } else { h.get() & !bit }));
}

#[inline]
fn hooked(bit: u8) -> bool {
    HOOKS.with(|h| h.get() & bit != 0)
}

/// Record this thread's backing calls with `r` (`None`: stop recording). For tests.
pub fn set_thread_recorder(r: Option<Rc<dyn Recorder>>) {
    set_hook(RECORDING, r.is_some());
    RECORDER.with(|cell| *cell.borrow_mut() = r);
}

/// A recorder of every thread's backing calls.
pub type ProcessRecorder = Arc<dyn Recorder + Send + Sync>;

static PROCESS_ON: AtomicBool = AtomicBool::new(false);
static PROCESS_RECORDER: RwLock<Option<ProcessRecorder>> = RwLock::new(None);

/// Record the backing calls of every thread of the process with `r` (`None`: stop
/// recording). For tests. A call is recorded after it returned, from the thread that
/// made it: calls made concurrently by several threads are recorded in the order their
/// records reach `r`, so a test that needs the exact order serves with one thread.
pub fn set_process_recorder(r: Option<ProcessRecorder>) {
    let on = r.is_some();
    *PROCESS_RECORDER
        .write()
        .unwrap_or_else(PoisonError::into_inner) = r;
    PROCESS_ON.store(on, Ordering::Relaxed);
}

/// Make the `nth` (from 1) `pwrite_all` of this thread from now on write only its
/// first `partial` bytes (fewer if it has fewer) and then fail with ENOSPC, as a
/// copy-on-write backing filesystem can after `fallocate` reserved the space. Later
/// calls succeed again. `nth == 0` cancels a pending failure. For tests.
pub fn fail_thread_write(nth: u32, partial: usize) {
    let fault = nth.checked_sub(1).map(|skip| WriteFault { skip, partial });
    WRITE_FAULT.with(|f| f.set(fault));
    set_hook(FAULT, fault.is_some());
}

/// The errno every `pwrite_all` of the process fails with (0: none).
static PROCESS_WRITE_FAULT: AtomicI32 = AtomicI32::new(0);

/// Make every `pwrite_all` of every thread fail with `errno`, before it writes
/// anything, until called with `None`: a backing store that returns EIO, for the
/// writeback-error tests of a mount served by the test process (`tests/writeback.rs`).
/// For tests.
pub fn fail_process_writes(errno: Option<Errno>) {
    PROCESS_WRITE_FAULT.store(errno.map_or(0, Errno::raw_os_error), Ordering::Relaxed);
}

/// Whether this `pwrite_all` is the one to fail; if so, how many bytes it writes first.
fn injected_failure() -> Option<usize> {
    let fault = WRITE_FAULT.with(|f| f.get())?;
    if fault.skip > 0 {
        WRITE_FAULT.with(|f| {
            f.set(Some(WriteFault {
                skip: fault.skip - 1,
                ..fault
            }))
        });
        return None;
    }
    fail_thread_write(0, 0);
    Some(fault.partial)
}

#[inline]
pub(super) fn note(make: impl FnOnce(&dyn Recorder)) {
    if hooked(RECORDING) {
        RECORDER.with(|cell| {
            if let Some(r) = cell.borrow().as_ref() {
                make(r.as_ref());
            }
        });
    } else if PROCESS_ON.load(Ordering::Relaxed) {
        note_process(make);
    }
}

#[cold]
fn note_process(make: impl FnOnce(&dyn Recorder)) {
    let guard = PROCESS_RECORDER
        .read()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(r) = guard.as_ref() {
        make(r.as_ref());
    }
}

/// pwrite all of `buf` or fail with the errno of the failing call.
pub(super) fn pwrite_all(f: &File, buf: &[u8], off: u64) -> FsResult<()> {
    let errno = PROCESS_WRITE_FAULT.load(Ordering::Relaxed);
    if errno != 0 {
        return Err(FsError::Os(Errno::from_raw_os_error(errno)));
    }
    if hooked(FAULT)
        && let Some(partial) = injected_failure()
    {
        pwrite_all(f, &buf[..partial.min(buf.len())], off)?;
        return Err(FsError::Os(Errno::NOSPC));
    }
    let mut done = 0;
    while done < buf.len() {
        match f.write_at(&buf[done..], off + done as u64) {
            Ok(0) => return Err(FsError::Os(Errno::NOSPC)),
            Ok(n) => {
                note(|r| {
                    r.record(&Op::Write {
                        fd: f.as_fd(),
                        off: off + done as u64,
                        data: &buf[done..done + n],
                    })
                });
                done += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// One pread; records what it returned.
fn pread_once(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let n = f.read_at(buf, off)?;
    note(|r| {
        r.record(&Op::Read {
            fd: f.as_fd(),
            off,
            len: buf.len(),
            got: n,
        })
    });
    Ok(n)
}

/// pread until `buf` is full or end of file; returns the bytes read.
pub(super) fn pread_full(f: &File, buf: &mut [u8], off: u64) -> FsResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        match pread_once(f, &mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

/// One O_DIRECT pread of an aligned range: a short read is the end of the file (a
/// second read would start at an unaligned offset and fail with EINVAL).
pub(super) fn pread_direct(f: &File, buf: &mut [u8], off: u64) -> FsResult<usize> {
    loop {
        match pread_once(f, buf, off) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

pub(super) fn ftruncate(f: &File, len: u64) -> Result<(), Errno> {
    rustix::fs::ftruncate(f, len)?;
    note(|r| r.record(&Op::SetLen { fd: f.as_fd(), len }));
    Ok(())
}

pub(super) fn fallocate(f: &File, mode: FallocateFlags, off: u64, len: u64) -> Result<(), Errno> {
    rustix::fs::fallocate(f, mode, off, len)?;
    note(|r| {
        r.record(&Op::Fallocate {
            fd: f.as_fd(),
            mode,
            off,
            len,
        })
    });
    Ok(())
}

/// `fdatasync` (`data_only`) or `fsync` of a file.
pub(super) fn sync(f: &File, data_only: bool) -> Result<(), Errno> {
    if data_only {
        rustix::fs::fdatasync(f)?;
    } else {
        rustix::fs::fsync(f)?;
    }
    note(|r| {
        r.record(&Op::Sync {
            fd: f.as_fd(),
            data_only,
        })
    });
    Ok(())
}

/// Record that `name` was created in `dir` (the call itself was made by the caller).
pub(super) fn created(dir: &impl AsFd, name: &OsStr) {
    note(|r| {
        r.record(&Op::Create {
            dir: dir.as_fd(),
            name,
        })
    });
}

/// Record that `name` was removed from `dir`.
pub(super) fn unlinked(dir: &impl AsFd, name: &OsStr) {
    note(|r| {
        r.record(&Op::Unlink {
            dir: dir.as_fd(),
            name,
        })
    });
}

/// Record a rename.
pub(super) fn renamed(
    from_dir: &impl AsFd,
    from: &OsStr,
    to_dir: &impl AsFd,
    to: &OsStr,
    flags: u32,
) {
    note(|r| {
        r.record(&Op::Rename {
            from_dir: from_dir.as_fd(),
            from,
            to_dir: to_dir.as_fd(),
            to,
            flags,
        })
    });
}

/// Record an fsync of a directory.
pub(super) fn synced_dir(dir: &impl AsFd) {
    note(|r| r.record(&Op::SyncDir { dir: dir.as_fd() }));
}
