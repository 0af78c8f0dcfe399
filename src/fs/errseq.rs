//! Writeback errors of one file, kept as the kernel keeps them for a page-cache mapping
//! (`errseq_t`). Under the FUSE writeback cache the kernel writes dirty pages back in
//! WRITE requests no caller waits for; a failure there is recorded here and reported at
//! the next `fsync` or `close` (FLUSH) of each open file description, once:
//!
//! - each handle samples the sequence when it is opened and is told of every error
//!   recorded after that, once (its cursor then advances);
//! - a handle opened after an error is not told of it, unless no handle has been told
//!   yet: then the next one opened is (as `errseq_sample`), so an error is never lost
//!   while the daemon knows the inode;
//! - the errno is kept as the backing call returned it (the latest if several).

use parking_lot::Mutex;
use rustix::io::Errno;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
struct State {
    /// Errors recorded so far (0: none).
    seq: u64,
    /// The errno of the latest.
    errno: Option<Errno>,
    /// Whether a handle has been told of the latest.
    seen: bool,
}

/// The writeback errors of one inode.
#[derive(Debug, Default)]
pub struct ErrSeq(Mutex<State>);

/// A handle's position in its inode's [`ErrSeq`].
#[derive(Debug, Default)]
pub struct Cursor(AtomicU64);

impl ErrSeq {
    /// Record a failed writeback.
    pub fn set(&self, errno: Errno) {
        let mut s = self.0.lock();
        s.seq += 1;
        s.errno = Some(errno);
        s.seen = false;
    }

    /// The cursor of a handle opened now.
    pub fn sample(&self) -> Cursor {
        let s = self.0.lock();
        let at = if s.seq > 0 && !s.seen {
            s.seq - 1
        } else {
            s.seq
        };
        Cursor(AtomicU64::new(at))
    }

    /// The error recorded since `cursor` last looked, if any; advances the cursor.
    pub fn check_and_advance(&self, cursor: &Cursor) -> Option<Errno> {
        let mut s = self.0.lock();
        if cursor.0.load(Ordering::Relaxed) == s.seq {
            return None;
        }
        cursor.0.store(s.seq, Ordering::Relaxed);
        s.seen = true;
        s.errno
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cursor_is_told_once_and_late_openers_only_of_unseen_errors() {
        let e = ErrSeq::default();
        let a = e.sample();
        assert_eq!(e.check_and_advance(&a), None);
        e.set(Errno::NOSPC);
        let b = e.sample(); // opened after the error, nobody told yet: b is told
        assert_eq!(e.check_and_advance(&a), Some(Errno::NOSPC));
        assert_eq!(e.check_and_advance(&a), None);
        let c = e.sample(); // opened after a was told: c is not
        assert_eq!(e.check_and_advance(&b), Some(Errno::NOSPC));
        assert_eq!(e.check_and_advance(&c), None);
        e.set(Errno::NOSPC);
        e.set(Errno::IO); // the latest errno is reported, once
        assert_eq!(e.check_and_advance(&a), Some(Errno::IO));
        assert_eq!(e.check_and_advance(&a), None);
        assert_eq!(e.check_and_advance(&c), Some(Errno::IO));
        assert_eq!(e.check_and_advance(&b), Some(Errno::IO));
    }
}
