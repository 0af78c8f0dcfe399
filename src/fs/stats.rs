//! Counters of the data path: operations, their latency, errors by errno, bytes
//! encrypted and decrypted. Lock-free (relaxed atomics), fixed-size, process-wide: one
//! daemon serves one volume. Read by `earfs status` and the metrics endpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The filesystem operations, as the kernel names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lookup,
    Forget,
    Getattr,
    Setattr,
    Readlink,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    Open,
    Read,
    Write,
    Flush,
    Release,
    Fsync,
    Opendir,
    Readdir,
    Readdirplus,
    Releasedir,
    Fsyncdir,
    Statfs,
    Setxattr,
    Getxattr,
    Listxattr,
    Removexattr,
    Create,
    Fallocate,
    Lseek,
}

/// Every operation, in `Op` order.
pub const OPS: [Op; 31] = [
    Op::Lookup,
    Op::Forget,
    Op::Getattr,
    Op::Setattr,
    Op::Readlink,
    Op::Mknod,
    Op::Mkdir,
    Op::Unlink,
    Op::Rmdir,
    Op::Symlink,
    Op::Rename,
    Op::Link,
    Op::Open,
    Op::Read,
    Op::Write,
    Op::Flush,
    Op::Release,
    Op::Fsync,
    Op::Opendir,
    Op::Readdir,
    Op::Readdirplus,
    Op::Releasedir,
    Op::Fsyncdir,
    Op::Statfs,
    Op::Setxattr,
    Op::Getxattr,
    Op::Listxattr,
    Op::Removexattr,
    Op::Create,
    Op::Fallocate,
    Op::Lseek,
];

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Forget => "forget",
            Op::Getattr => "getattr",
            Op::Setattr => "setattr",
            Op::Readlink => "readlink",
            Op::Mknod => "mknod",
            Op::Mkdir => "mkdir",
            Op::Unlink => "unlink",
            Op::Rmdir => "rmdir",
            Op::Symlink => "symlink",
            Op::Rename => "rename",
            Op::Link => "link",
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Release => "release",
            Op::Fsync => "fsync",
            Op::Opendir => "opendir",
            Op::Readdir => "readdir",
            Op::Readdirplus => "readdirplus",
            Op::Releasedir => "releasedir",
            Op::Fsyncdir => "fsyncdir",
            Op::Statfs => "statfs",
            Op::Setxattr => "setxattr",
            Op::Getxattr => "getxattr",
            Op::Listxattr => "listxattr",
            Op::Removexattr => "removexattr",
            Op::Create => "create",
            Op::Fallocate => "fallocate",
            Op::Lseek => "lseek",
        }
    }
}

/// Upper bounds of the latency histogram buckets, in microseconds (then +Inf).
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000,
];

const NBUCKETS: usize = LATENCY_BUCKETS_US.len() + 1;
const NERRNO: usize = 256;

/// Counters of one operation.
pub struct OpStats {
    count: AtomicU64,
    errors: AtomicU64,
    total_ns: AtomicU64,
    /// Non-cumulative: `buckets[i]` counts latencies in (bound[i-1], bound[i]].
    buckets: [AtomicU64; NBUCKETS],
}

impl OpStats {
    const fn new() -> Self {
        OpStats {
            count: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            total_ns: AtomicU64::new(0),
            buckets: [const { AtomicU64::new(0) }; NBUCKETS],
        }
    }
}

/// All data-path counters.
pub struct Stats {
    ops: [OpStats; OPS.len()],
    errno: [AtomicU64; NERRNO],
    bytes_encrypted: AtomicU64,
    bytes_decrypted: AtomicU64,
}

static STATS: Stats = Stats {
    ops: [const { OpStats::new() }; OPS.len()],
    errno: [const { AtomicU64::new(0) }; NERRNO],
    bytes_encrypted: AtomicU64::new(0),
    bytes_decrypted: AtomicU64::new(0),
};

/// The process's counters.
pub fn stats() -> &'static Stats {
    &STATS
}

/// Times one operation from creation to drop.
pub struct OpTimer {
    op: Op,
    start: Instant,
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        STATS.record(self.op, self.start.elapsed());
    }
}

/// Start timing `op`; the latency is recorded when the timer is dropped.
pub fn timed(op: Op) -> OpTimer {
    OpTimer {
        op,
        start: Instant::now(),
    }
}

/// A snapshot of one operation's counters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpSnapshot {
    pub op: &'static str,
    pub count: u64,
    pub errors: u64,
    pub total_seconds: f64,
    /// Cumulative counts per bucket bound (µs), the last one +Inf (= count).
    #[serde(skip)]
    pub cumulative: [u64; NBUCKETS],
}

impl Stats {
    fn record(&self, op: Op, took: Duration) {
        let s = &self.ops[op as usize];
        s.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        s.total_ns.fetch_add(ns, Ordering::Relaxed);
        let us = ns / 1000;
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        s.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Count an error reply of `op` with `errno`.
    pub fn error(&self, op: Op, errno: i32) {
        self.ops[op as usize].errors.fetch_add(1, Ordering::Relaxed);
        let i = usize::try_from(errno).unwrap_or(0).min(NERRNO - 1);
        self.errno[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn encrypted(&self, n: usize) {
        self.bytes_encrypted.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn decrypted(&self, n: usize) {
        self.bytes_decrypted.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn bytes_encrypted(&self) -> u64 {
        self.bytes_encrypted.load(Ordering::Relaxed)
    }

    pub fn bytes_decrypted(&self) -> u64 {
        self.bytes_decrypted.load(Ordering::Relaxed)
    }

    /// Every operation's counters.
    pub fn ops(&self) -> Vec<OpSnapshot> {
        OPS.iter()
            .map(|&op| {
                let s = &self.ops[op as usize];
                let mut cumulative = [0u64; NBUCKETS];
                let mut acc = 0;
                for (i, b) in s.buckets.iter().enumerate() {
                    acc += b.load(Ordering::Relaxed);
                    cumulative[i] = acc;
                }
                OpSnapshot {
                    op: op.name(),
                    count: s.count.load(Ordering::Relaxed),
                    errors: s.errors.load(Ordering::Relaxed),
                    total_seconds: s.total_ns.load(Ordering::Relaxed) as f64 / 1e9,
                    cumulative,
                }
            })
            .collect()
    }

    /// Error replies by errno (non-zero only), as (errno, count).
    pub fn errors_by_errno(&self) -> Vec<(i32, u64)> {
        self.errno
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let n = c.load(Ordering::Relaxed);
                (n > 0).then_some((i as i32, n))
            })
            .collect()
    }
}

/// The symbolic name of an errno (`EIO`), or `E<n>` for rare ones.
pub fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESTALE => "ESTALE",
        libc::EDQUOT => "EDQUOT",
        libc::ENOSYS => "ENOSYS",
        libc::EINTR => "EINTR",
        _ => return format!("E{e}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_order_matches_the_table_and_buckets_accumulate() {
        for (i, op) in OPS.iter().enumerate() {
            assert_eq!(*op as usize, i, "{}", op.name());
        }
        // The global counters are shared with other tests: compare deltas.
        let before = stats().ops()[Op::Rename as usize].clone();
        STATS.record(Op::Rename, Duration::from_micros(30));
        STATS.record(Op::Rename, Duration::from_secs(5));
        stats().error(Op::Rename, libc::EXDEV);
        let after = stats().ops()[Op::Rename as usize].clone();
        assert_eq!(after.count - before.count, 2);
        assert_eq!(after.errors - before.errors, 1);
        // 30 µs lands in the 50 µs bucket; 5 s only in +Inf.
        assert_eq!(after.cumulative[2] - before.cumulative[2], 1);
        assert_eq!(
            after.cumulative[NBUCKETS - 2] - before.cumulative[NBUCKETS - 2],
            1
        );
        assert_eq!(
            after.cumulative[NBUCKETS - 1] - before.cumulative[NBUCKETS - 1],
            2
        );
        assert!(
            stats()
                .errors_by_errno()
                .iter()
                .any(|(e, _)| *e == libc::EXDEV)
        );
        assert_eq!(errno_name(libc::EIO), "EIO");
        assert_eq!(errno_name(200), "E200");
    }
}
