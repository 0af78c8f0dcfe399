//! What the frozen-fixture tests (tests/format_v1.rs, tests/format_v2.rs) share: the
//! data pattern, a scratch copy of a fixture volume, and reading it through the fs core.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use earfs::content::FileFormat;
use earfs::fs::{Caller, EarFs, ROOT_ID, SetAttr};
use earfs::kms::{LocalProvider, ProviderSpec, create_key_file};
use earfs::volume::{self, VolumeConfig};

pub const ME: Caller = Caller { uid: 0, gid: 0 };

/// The bytes of the fixture file `size-N`.
pub fn pattern(n: u64) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + 7) % 256) as u8).collect()
}

/// `tests/fixtures/NAME`.
pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The fs core over a fixture volume, in the format its config records.
pub fn open(backing: &Path, cfg: &VolumeConfig, prov: &LocalProvider) -> EarFs {
    let keys = cfg.unlock(backing, prov).unwrap();
    let format = FileFormat::from_number(u64::from(cfg.format)).unwrap();
    EarFs::new(backing, keys, format).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

/// The whole plaintext of `name` in the root, checked against its size.
pub fn read_all(fs: &EarFs, name: &str) -> Vec<u8> {
    let a = fs.lookup(ROOT_ID, OsStr::new(name)).unwrap();
    let fh = fs.open(a.ino, libc::O_RDONLY).unwrap();
    let mut out = Vec::new();
    fs.read(fh, 0, (a.size + 10) as u32, |d| out.extend_from_slice(d))
        .unwrap();
    fs.release(fh);
    assert_eq!(out.len() as u64, a.size);
    out
}

/// A scratch copy of the fixture volume in `fixture` (never the frozen files
/// themselves): its directory, backing path, key provider and config.
pub fn fixture_copy(fixture: &Path) -> (tempfile::TempDir, PathBuf, LocalProvider, VolumeConfig) {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(fixture, tmp.path());
    let key = tmp.path().join("master.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let prov = LocalProvider::open(&key).unwrap();
    let backing = tmp.path().join("backing");
    let cfg = VolumeConfig::load(&backing).unwrap();
    (tmp, backing, prov, cfg)
}

/// Write a fixture volume into `dir` (which must not hold one: fixtures are frozen):
/// format `format`, its config naming `recorded_key` as the key file, a file `size-N`
/// holding `pattern(N)` for each of `sizes`, and a file `sparse` truncated up to
/// `sparse_size` with `tail` written at `tail_at`. Returns the fs and the open handle of
/// `sparse`, for the caller's further writes (it releases it).
pub fn write_fixture_volume(
    dir: &Path,
    format: u32,
    recorded_key: &str,
    sizes: &[u64],
    sparse_size: u64,
    tail_at: u64,
) -> (EarFs, u64) {
    assert!(
        !dir.join("backing/earfs.conf").exists(),
        "fixtures are frozen"
    );
    std::fs::create_dir_all(dir).unwrap();
    let key = dir.join("master.key");
    create_key_file(&key).unwrap();
    let prov = LocalProvider::open(&key).unwrap();
    let backing = dir.join("backing");
    let spec = ProviderSpec::Local {
        key_file: recorded_key.into(),
    };
    let cfg = volume::create(&backing, spec, &prov, format).unwrap();
    let fs = open(&backing, &cfg, &prov);
    for &n in sizes {
        let name = format!("size-{n}");
        let (_, fh) = fs
            .create(ROOT_ID, OsStr::new(&name), 0o644, libc::O_RDWR, ME)
            .unwrap();
        fs.write(fh, 0, &pattern(n)).unwrap();
        fs.fsync(fh, false).unwrap();
        fs.release(fh);
    }
    let (a, fh) = fs
        .create(ROOT_ID, OsStr::new("sparse"), 0o644, libc::O_RDWR, ME)
        .unwrap();
    let grow = SetAttr {
        size: Some(sparse_size),
        ..Default::default()
    };
    fs.setattr(a.ino, Some(fh), grow).unwrap();
    fs.write(fh, tail_at, b"tail").unwrap();
    (fs, fh)
}
