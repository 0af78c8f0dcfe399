//! The data-command test harness checks itself: a copy keeps the manifest, a change
//! is found, and strace counts and kills.
mod common;

use common::tree::*;

#[test]
fn a_copy_keeps_the_manifest_and_a_change_is_found() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_tree(&src, 7, 40, 300_000);
    let want = manifest(&src, &[]);
    assert!(
        want.values().any(|e| e.sparse),
        "the tree has a sparse file"
    );
    assert!(want.values().any(|e| e.links.len() == 3));
    assert!(want.values().any(|e| !e.xattrs.is_empty()));
    let dst = d.path().join("dst");
    copy_tree(&src, &dst);
    assert_same(&want, &manifest(&dst, &[]), "cp -a");
    std::fs::write(dst.join("base/f3"), b"changed").ok();
    let r = std::panic::catch_unwind(|| assert_same(&want, &manifest(&dst, &[]), "changed"));
    assert!(r.is_err(), "a changed file is found");
}

#[test]
fn strace_counts_calls_and_kills_at_one() {
    let (out, counts) = syscall_counts(&["--version"]);
    assert!(out.status.success());
    assert!(counts.get("openat").copied().unwrap_or(0) > 0, "{counts:?}");
    let out = run_killed(&["--version"], "openat", 1);
    assert!(was_killed(&out), "{out:?}");
}
