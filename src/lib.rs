//! earfs: encryption at rest for database nodes. See DESIGN in docs/architecture.md.
//!
//! Layering (checked by scripts/check-layering.sh):
//! `cli → daemon → fuse → fs → content → crypto`; `daemon → kms → crypto`;
//! `daemon → volume → kms`; `fs → sys`. Nothing imports `cli` or `daemon`.

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
