//! `earfs config`: the per-node settings recorded in earfs.conf shown and changed in
//! place (here for a local volume whose key file moved), and `earfs mount --key-file`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::path::Path;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn out(args: &[&str]) -> (i32, String, String) {
    let o = run(args);
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_moved_key_file_is_given_at_mount_then_recorded_and_nothing_else_is_changed() {
    let d = TestDir::new("nodeconf");
    let (k1, b, m) = (d.path().join("k1"), d.path().join("b"), d.path().join("m"));
    init_local(&k1, &b);
    fs::create_dir(&m).unwrap();
    {
        let _g = mount_at(&b, &m);
        fs::write(m.join("f"), b"before the move").unwrap();
    }
    let conf = b.join("earfs.conf");
    let k2 = d.path().join("moved-key");
    fs::rename(&k1, &k2).unwrap();

    // The recorded file is gone: exit 12, and the message says what to do.
    let (code, _, err) = out(&["mount", s(&b), s(&m)]);
    assert_eq!(code, 12, "{err}");
    assert!(
        err.contains("--key-file") && err.contains("earfs config"),
        "{err}"
    );

    // --key-file serves it without changing anything.
    let before = fs::read(&conf).unwrap();
    let (code, _, err) = out(&["mount", "--key-file", s(&k2), s(&b), s(&m)]);
    assert_eq!(code, 0, "{err}");
    let g = MountGuard(m.clone());
    assert_eq!(fs::read(m.join("f")).unwrap(), b"before the move");
    // Mounted: the recorded settings are not changed under the daemon.
    let set_k2 = format!("kms.key_file={}", k2.display());
    let (code, _, err) = out(&["config", s(&b), "--set", &set_k2]);
    assert_eq!(code, 18, "{err}");
    drop(g);
    assert_eq!(fs::read(&conf).unwrap(), before);
    // --key-file is for local volumes, and not with --credentials.
    let (code, _, err) = out(&[
        "mount",
        "--key-file",
        s(&k2),
        "--credentials",
        s(&k2),
        s(&b),
        s(&m),
    ]);
    assert_eq!(code, 2, "{err}");

    // Shown as recorded.
    let (code, text, err) = out(&["config", s(&b)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains(&format!("kms.key_file = {}", k1.display())),
        "{text}"
    );
    let (code, json, _) = out(&["config", "--json", s(&b)]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["provider"], "local");
    assert_eq!(v["settings"]["kms.key_file"], s(&k1));
    assert_eq!(v["schema"], "earfs.config.v1");

    // Refused, with earfs.conf byte for byte as it was: the key itself, a name that is
    // not a setting, a malformed --set, and another key file (another key: it does not
    // unwrap this volume's keys).
    let other = d.path().join("other-key");
    init_local(&other, &d.path().join("other-volume"));
    let set_other = format!("kms.key_file={}", other.display());
    for (args, want) in [
        (
            vec![
                "--set",
                "kms.key_arn=arn:aws:kms:us-east-1:111122223333:key/x",
            ],
            2,
        ),
        (vec!["--set", "kms.provider=aws"], 2),
        (vec!["--set", "kms.region=us-east-1"], 2),
        (vec!["--set", "kms.key_file"], 2),
        (vec!["--set", "kms.key_file="], 2),
        (vec!["--set", &set_other], 14),
    ] {
        let mut a = vec!["config"];
        a.extend(args.iter().copied());
        a.push(s(&b));
        let (code, _, err) = out(&a);
        assert_eq!(code, want, "{a:?}: {err}");
        assert!(err.lines().count() == 1, "{a:?}: one line: {err}");
        assert_eq!(fs::read(&conf).unwrap(), before, "{a:?} changed earfs.conf");
    }

    // Recorded (by its other name too): the volume mounts without the flag, its
    // config still authenticates, and the data reads.
    let (code, text, err) = out(&[
        "config",
        s(&b),
        "--set",
        &format!("local.key_file={}", k2.display()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.contains(&format!("{} -> {}", k1.display(), k2.display())),
        "{text}"
    );
    assert_ne!(fs::read(&conf).unwrap(), before);
    assert!(!b.join(".earfs.conf.tmp").exists());
    let (code, text, _) = out(&["config", s(&b), "--set", &set_k2]);
    assert_eq!(code, 0);
    assert!(text.contains("nothing to change"), "{text}");
    let _g = mount_at(&b, &m);
    assert_eq!(fs::read(m.join("f")).unwrap(), b"before the move");
    fs::write(m.join("g"), b"after").unwrap();
    assert_eq!(fs::read(m.join("g")).unwrap(), b"after");
}
