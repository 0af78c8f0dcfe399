//! earfs: encryption at rest for database nodes. See DESIGN in docs/architecture.md.
//!
//! # Layering
//!
//! The one list of the modules' allowed dependencies: `scripts/check-layering.sh` reads
//! this table (a module may use itself and what its row names, nothing else), and
//! `docs/architecture.md` points here.
//!
//! | module | may use |
//! |---|---|
//! | cli | daemon, fuse, fs, volume, kms, content, crypto, sys |
//! | daemon | fuse, fs, volume, kms, content, crypto, sys |
//! | fuse | fs |
//! | fs | content, crypto, sys |
//! | volume | kms, crypto, fs (CONFIG_NAME, CONFIG_TMP_NAME only) |
//! | kms | crypto |
//! | content | crypto |
//! | crypto | sys |
//! | sys | |
//!
//! Also checked: nothing imports `cli` or `daemon` (the table gives no row either);
//! only `fuse` imports fuser; `unsafe` appears only in `sys`; `crypto` and `content`
//! do no I/O (no files, sockets, processes or system calls outside their tests).

#![deny(unsafe_code)]

pub mod cli;
pub mod content;
pub mod crypto;
pub mod daemon;
pub mod fs;
pub mod fuse;
pub mod kms;
pub mod sys;
pub mod volume;
