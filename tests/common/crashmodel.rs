//! The persistence model of a backing file after a power cut (docs/architecture.md,
//! "Crash consistency"), shared by the crash-state explorer (`tests/crash.rs`) and the
//! power-cut tests under real databases (`tests/powercut.rs`):
//!
//! - each write since the file's last fsync/fdatasync persisted or not, in 512-byte
//!   pieces: a piece holds its content as of some moment since the sync (the page
//!   cache writes back whole, current pieces);
//! - the length persisted independently of the data: it is the length as of some
//!   moment since the sync;
//! - two models: `Worst` (all of the above independent) and `Ordered` (ext4
//!   `data=ordered`: a length that persisted brings with it the pieces written beyond
//!   the durable length before it).
//!
//! Only the pieces that changed since the sync are kept, each version once, so that it
//! scales to the files of a real database.

use std::collections::BTreeMap;

pub const PIECE: u64 = 512;

/// The persistence model of the backing filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    Worst,
    Ordered,
}

/// A change to a file's bytes or length.
#[derive(Debug, Clone)]
pub enum FileOp {
    Write {
        off: u64,
        data: Vec<u8>,
    },
    SetLen(u64),
    /// A punched hole: the range reads as zeros (the length does not change).
    Punch {
        off: u64,
        len: u64,
    },
}

fn apply(bytes: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write { off, data } => {
            let end = *off as usize + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[*off as usize..end].copy_from_slice(data);
        }
        FileOp::SetLen(len) => bytes.resize(*len as usize, 0),
        FileOp::Punch { off, len } => {
            let a = (*off as usize).min(bytes.len());
            let b = ((off + len) as usize).min(bytes.len());
            bytes[a..b].fill(0);
        }
    }
}

/// The pieces an operation may change on a file of length `before`.
fn touched(op: &FileOp, before: u64) -> std::ops::Range<u64> {
    let (a, b) = match op {
        FileOp::Write { off, data } => (*off, off + data.len() as u64),
        FileOp::SetLen(len) => (before.min(*len), before.max(*len)),
        FileOp::Punch { off, len } => (*off, off + len),
    };
    if a >= b {
        return 0..0;
    }
    a / PIECE..b.div_ceil(PIECE)
}

fn piece_of(bytes: &[u8], q: u64) -> Vec<u8> {
    let a = ((q * PIECE) as usize).min(bytes.len());
    let b = (a + PIECE as usize).min(bytes.len());
    let mut p = bytes[a..b].to_vec();
    p.resize(PIECE as usize, 0);
    p
}

/// A file: the bytes its last sync made durable and the changes since.
#[derive(Debug, Clone, Default)]
pub struct FileHistory {
    durable: Vec<u8>,
    pending: Vec<FileOp>,
}

impl FileHistory {
    /// A file whose bytes are all durable.
    pub fn durable(bytes: Vec<u8>) -> FileHistory {
        FileHistory {
            durable: bytes,
            pending: Vec::new(),
        }
    }

    pub fn change(&mut self, op: FileOp) {
        self.pending.push(op);
    }

    /// fsync or fdatasync returned: every change so far is durable.
    pub fn sync(&mut self) {
        for op in self.pending.drain(..) {
            apply(&mut self.durable, &op);
        }
    }

    /// What a power cut now may leave of this file.
    pub fn choices(&self) -> Choices<'_> {
        let mut cur = self.durable.clone();
        let mut lens = vec![(0usize, cur.len() as u64)];
        // Per changed piece: (step, content) for each step at which it changed.
        let mut pieces: BTreeMap<u64, Vec<(usize, Vec<u8>)>> = BTreeMap::new();
        for (i, op) in self.pending.iter().enumerate() {
            let step = i + 1;
            let before = cur.len() as u64;
            let range = touched(op, before);
            let old: Vec<(u64, Vec<u8>)> = range.clone().map(|q| (q, piece_of(&cur, q))).collect();
            apply(&mut cur, op);
            if cur.len() as u64 != before {
                lens.push((step, cur.len() as u64));
            }
            for (q, was) in old {
                let now = piece_of(&cur, q);
                let versions = pieces.entry(q).or_insert_with(|| vec![(0, was)]);
                if versions.last().map(|(_, p)| p) != Some(&now) {
                    versions.push((step, now));
                }
            }
        }
        pieces.retain(|_, v| v.len() > 1);
        Choices {
            durable: &self.durable,
            lens,
            pieces,
        }
    }
}

/// The states a power cut may leave of one file.
pub struct Choices<'a> {
    durable: &'a [u8],
    /// (step, length) for each step at which the length changed; step 0 is durable.
    lens: Vec<(usize, u64)>,
    pieces: BTreeMap<u64, Vec<(usize, Vec<u8>)>>,
}

impl Choices<'_> {
    /// How many states there are (saturating).
    pub fn count(&self) -> u64 {
        self.pieces.values().fold(self.lens.len() as u64, |n, v| {
            n.saturating_mul(v.len() as u64)
        })
    }

    /// The bytes of one state; `pick(n)` chooses among `n` possibilities.
    pub fn build(&self, model: Model, pick: &mut dyn FnMut(usize) -> usize) -> Vec<u8> {
        let (l, len) = self.lens[pick(self.lens.len())];
        let durable_len = self.durable.len() as u64;
        let mut out = self.durable.to_vec();
        out.resize(len as usize, 0);
        for (q, versions) in &self.pieces {
            let allowed: Vec<&(usize, Vec<u8>)> =
                if model == Model::Ordered && q * PIECE >= durable_len {
                    // Newly allocated: what was written before the length persisted
                    // persisted with it.
                    let floor = versions
                        .iter()
                        .map(|(s, _)| *s)
                        .filter(|&s| s <= l)
                        .max()
                        .unwrap_or(0);
                    versions.iter().filter(|(s, _)| *s >= floor).collect()
                } else {
                    versions.iter().collect()
                };
            let (_, piece) = allowed[pick(allowed.len())];
            let a = (q * PIECE) as usize;
            if a < out.len() {
                let b = (a + PIECE as usize).min(out.len());
                out[a..b].copy_from_slice(&piece[..b - a]);
            }
        }
        out
    }
}
