//! Credential files: refuse ones that group or others can read, as ssh does.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::KmsError;

/// Check that `path` exists and only its owner may read or write it.
pub(super) fn check_private_file(path: &Path) -> Result<(), KmsError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        KmsError::Credentials(format!(
            "cannot read credentials file {}: {e}",
            path.display()
        ))
    })?;
    match loose_mode(&meta) {
        Some(mode) => Err(KmsError::CredentialsInsecure {
            path: path.to_path_buf(),
            mode,
        }),
        None => Ok(()),
    }
}

/// The file's mode if group or others may read, write or run it (a secret's file
/// must be its owner's alone, as ssh requires of private keys).
pub(super) fn loose_mode(meta: &std::fs::Metadata) -> Option<u32> {
    let mode = meta.mode() & 0o7777;
    (mode & 0o077 != 0).then_some(mode)
}

/// Like [`check_private_file`], but a missing file is fine (it is only one of several
/// places credentials may come from).
pub(super) fn check_private_file_if_present(path: &Path) -> Result<(), KmsError> {
    if path.exists() {
        check_private_file(path)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn group_readable_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("creds");
        std::fs::write(&p, b"x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_private_file(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            check_private_file(&p),
            Err(KmsError::CredentialsInsecure { mode: 0o644, .. })
        ));
        assert!(check_private_file_if_present(&d.path().join("absent")).is_ok());
        assert!(matches!(
            check_private_file(&d.path().join("absent")),
            Err(KmsError::Credentials(_))
        ));
    }
}
