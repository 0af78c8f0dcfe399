//! The only module allowed `unsafe`: thin wrappers over what safe crates lack.

#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
pub mod aes_x86;

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// Alignment of I/O buffers: a page, enough for O_DIRECT on any backing device.
pub const IO_ALIGN: usize = 4096;

/// A zero-initialised, page-aligned byte buffer for positional and O_DIRECT I/O. It may
/// hold plaintext, so its memory is wiped before it goes back to the allocator.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of initialised bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer (no allocation).
    pub const fn new() -> Self {
        AlignedBuf {
            ptr: NonNull::dangling(),
            cap: 0,
            len: 0,
        }
    }

    /// Resize to `len` bytes, growing the allocation if needed. Contents are unspecified
    /// (old bytes or zeros), never uninitialised. Returns false if allocation failed.
    pub fn resize(&mut self, len: usize) -> bool {
        if len > self.cap {
            let cap = len.next_multiple_of(IO_ALIGN);
            let Ok(layout) = Layout::from_size_align(cap, IO_ALIGN) else {
                return false;
            };
            // SAFETY: layout has non-zero size (len > cap >= 0 so cap >= 4096).
            let p = unsafe { alloc_zeroed(layout) };
            let Some(p) = NonNull::new(p) else {
                return false;
            };
            self.free();
            self.ptr = p;
            self.cap = cap;
        }
        self.len = len;
        true
    }

    /// Overwrite the whole allocation (not only the current length) with zeros.
    pub fn wipe(&mut self) {
        if self.cap > 0 {
            // SAFETY: ptr is valid for cap initialised bytes, and &mut self is exclusive.
            let all = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) };
            zeroize::Zeroize::zeroize(all);
        }
    }

    fn free(&mut self) {
        if self.cap > 0 {
            self.wipe();
            if let Ok(layout) = Layout::from_size_align(self.cap, IO_ALIGN) {
                // SAFETY: ptr was allocated with exactly this layout.
                unsafe { dealloc(self.ptr.as_ptr(), layout) };
            }
            self.cap = 0;
            self.len = 0;
            self.ptr = NonNull::dangling();
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes (alloc_zeroed), or dangling with len 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

/// CPU time used so far by the calling thread (for throughput measurements that
/// should not count time the thread was preempted), or `None` if unavailable.
pub fn thread_cpu_time() -> Option<std::time::Duration> {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Some(std::time::Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// Take ownership of a descriptor inherited from the parent process (the readiness
/// pipe of `earfs mount`), if `raw` is an open descriptor.
pub fn inherited_fd(raw: i32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
    if raw < 3 {
        return None;
    }
    // SAFETY: the fd is only borrowed for the duration of the fcntl check.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    rustix::io::fcntl_getfd(borrowed).ok()?;
    // SAFETY: the parent passed this descriptor to us for our exclusive use; nothing
    // else in this process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Programs we start (fusermount3) must not keep the parent waiting on it.
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC).ok()?;
    Some(fd)
}

/// Restore the default action of SIGPIPE (terminate quietly), as command-line tools
/// want: `earfs status | head` then ends like any Unix filter instead of failing on
/// EPIPE. Not for the daemon, whose sockets must see EPIPE as an error.
pub fn default_sigpipe() {
    // SAFETY: signal(2) with SIG_DFL installs no handler; called before any thread is
    // started by the command.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The local time zone's offset from UTC, in seconds east, at unix time `secs`
/// (`localtime_r`'s `tm_gmtoff`; 0 if the time cannot be converted). For the RFC 3339
/// stamps of log files.
pub fn utc_offset_seconds(secs: i64) -> i32 {
    let t: libc::time_t = secs;
    // SAFETY: an all-zero `tm` is a valid value (integers and a null zone pointer),
    // and localtime_r only writes into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is thread-safe (it
    // reads TZ, which this program never changes).
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    if r.is_null() {
        return 0;
    }
    i32::try_from(tm.tm_gmtoff).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_resizable() {
        let mut b = AlignedBuf::new();
        assert!(b.as_slice().is_empty());
        assert!(b.resize(10));
        assert_eq!(b.as_slice(), &[0u8; 10]);
        assert_eq!(b.as_slice().as_ptr() as usize % IO_ALIGN, 0);
        b.as_mut_slice()[3] = 7;
        assert!(b.resize(3 * 4096 + 1));
        assert_eq!(b.as_slice().len(), 3 * 4096 + 1);
        assert_eq!(b.as_slice().as_ptr() as usize % IO_ALIGN, 0);
    }
}
