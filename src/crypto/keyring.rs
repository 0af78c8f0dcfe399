//! The unwrapped keyring: data keys by version, one current. The one type that holds a
//! volume's unwrapped keys, from the unlock of `earfs.conf` to the data path; built only
//! checked (the current version present, each version once).

use std::collections::BTreeMap;

use super::keys::{Dek, MacKey, derive_header_mac_key};

/// Why a set of key versions is not a keyring.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    /// A version appears more than once.
    #[error("key version {0} appears more than once in the keyring")]
    Duplicate(u32),
    /// The current version is not among the keys.
    #[error("current key version {0} is not in the keyring")]
    NoCurrent(u32),
    /// The current version cannot be removed.
    #[error("key version {0} is the current one and cannot be removed")]
    RemoveCurrent(u32),
}

/// Check that `versions` hold each version once and include `current`: the rule of a
/// keyring, for the wrapped keyring as stored as for the unwrapped one.
pub fn check_keyring_versions(
    versions: impl IntoIterator<Item = u32>,
    current: u32,
) -> Result<(), KeyringError> {
    let mut seen = std::collections::BTreeSet::new();
    for v in versions {
        if !seen.insert(v) {
            return Err(KeyringError::Duplicate(v));
        }
    }
    if !seen.contains(&current) {
        return Err(KeyringError::NoCurrent(current));
    }
    Ok(())
}

/// Unwrapped data keys by version, with their derived header MAC keys.
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: BTreeMap<u32, (Dek, MacKey)>,
    current: u32,
}

impl Keyring {
    /// A keyring from unwrapped DEKs: each version once, `current` among them.
    pub fn new(
        deks: impl IntoIterator<Item = (u32, Dek)>,
        current: u32,
    ) -> Result<Keyring, KeyringError> {
        let mut keys = BTreeMap::new();
        for (v, d) in deks {
            if keys.contains_key(&v) {
                return Err(KeyringError::Duplicate(v));
            }
            let m = derive_header_mac_key(&d);
            keys.insert(v, (d, m));
        }
        check_keyring_versions(keys.keys().copied(), current)?;
        Ok(Keyring { keys, current })
    }

    /// Every version held, in order.
    pub fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// How many versions are held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no version is held (never, for a checked keyring).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The version new files are created under.
    pub fn current_version(&self) -> u32 {
        self.current
    }

    /// The current version and its data key.
    pub fn current(&self) -> (u32, &Dek) {
        // A checked keyring holds its current version; `dek` cannot miss.
        let (d, _) = &self.keys[&self.current];
        (self.current, d)
    }

    /// The data key of `version`.
    pub fn dek(&self, version: u32) -> Option<&Dek> {
        self.keys.get(&version).map(|(d, _)| d)
    }

    /// Every version with its data key, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Dek)> {
        self.keys.iter().map(|(v, (d, _))| (*v, d))
    }

    /// The data key and header MAC key of `version`.
    pub fn get(&self, version: u32) -> Option<&(Dek, MacKey)> {
        self.keys.get(&version)
    }

    /// Add `dek` as `version` and make it current (a rotation); refused if the version
    /// is held already.
    pub fn add_current(&mut self, version: u32, dek: Dek) -> Result<(), KeyringError> {
        if self.keys.contains_key(&version) {
            return Err(KeyringError::Duplicate(version));
        }
        let m = derive_header_mac_key(&dek);
        self.keys.insert(version, (dek, m));
        self.current = version;
        Ok(())
    }

    /// Drop `version` (a retirement); refused for the current one. Whether it was held.
    pub fn remove(&mut self, version: u32) -> Result<bool, KeyringError> {
        if version == self.current {
            return Err(KeyringError::RemoveCurrent(version));
        }
        Ok(self.keys.remove(&version).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dek() -> Dek {
        Dek::generate().unwrap()
    }

    #[test]
    fn a_keyring_holds_its_current_version_and_each_version_once() {
        assert_eq!(
            Keyring::new([(1, dek()), (1, dek())], 1).unwrap_err(),
            KeyringError::Duplicate(1)
        );
        assert_eq!(
            Keyring::new([(1, dek()), (2, dek())], 3).unwrap_err(),
            KeyringError::NoCurrent(3)
        );
        assert_eq!(
            check_keyring_versions([1, 2, 1], 2),
            Err(KeyringError::Duplicate(1))
        );
        assert_eq!(
            check_keyring_versions([], 1),
            Err(KeyringError::NoCurrent(1))
        );
        let mut k = Keyring::new([(2, dek()), (1, dek())], 2).unwrap();
        assert_eq!((k.versions(), k.current_version()), (vec![1, 2], 2));
        assert_eq!(k.current().0, 2);
        let d3 = dek();
        let bytes = d3.expose().to_vec();
        assert_eq!(k.add_current(2, dek()), Err(KeyringError::Duplicate(2)));
        k.add_current(3, d3).unwrap();
        assert_eq!(k.current().1.expose().as_slice(), bytes.as_slice());
        assert_eq!(k.remove(3), Err(KeyringError::RemoveCurrent(3)));
        assert_eq!(k.remove(1), Ok(true));
        assert_eq!(k.remove(1), Ok(false));
        assert_eq!(k.iter().map(|(v, _)| v).collect::<Vec<_>>(), [2, 3]);
    }
}
