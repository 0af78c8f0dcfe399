//! The unwrapped keyring the data path uses: DEKs by version, one current.

use std::collections::BTreeMap;

use crate::crypto::{Dek, MacKey, derive_header_mac_key};

/// Unwrapped data keys by version, with their derived header MAC keys.
#[derive(Debug)]
pub struct Keyring {
    keys: BTreeMap<u32, (Dek, MacKey)>,
    current: u32,
}

impl Keyring {
    /// A keyring from unwrapped DEKs; `current` must be among them.
    pub fn new(deks: impl IntoIterator<Item = (u32, Dek)>, current: u32) -> Option<Keyring> {
        let keys: BTreeMap<u32, (Dek, MacKey)> = deks
            .into_iter()
            .map(|(v, d)| {
                let m = derive_header_mac_key(&d);
                (v, (d, m))
            })
            .collect();
        keys.contains_key(&current)
            .then_some(Keyring { keys, current })
    }

    /// Every version held.
    pub fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// The version new files are created under.
    pub fn current_version(&self) -> u32 {
        self.current
    }

    pub(crate) fn get(&self, version: u32) -> Option<&(Dek, MacKey)> {
        self.keys.get(&version)
    }
}
