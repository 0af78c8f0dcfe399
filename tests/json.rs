//! Every `--json` output against its JSON Schema in docs/schemas/ (docs/json.md): each
//! command run for real on a local volume, mounted and not, its standard output one
//! JSON document that validates, the shared fields named alike, and a failure printed
//! as `earfs.error.v1` with the exit code it exits with.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn schema_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas")
}

/// Collects the documents and validates them all at once (one Python run).
struct Docs {
    dir: PathBuf,
    files: Vec<PathBuf>,
    seen: BTreeSet<String>,
}

impl Docs {
    fn new(dir: &Path) -> Docs {
        fs::create_dir_all(dir).unwrap();
        Docs {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            seen: BTreeSet::new(),
        }
    }

    /// Run `earfs ARGS`; its standard output must be exactly one JSON object whose
    /// exit code matches `code`. Returns the document.
    fn take(&mut self, args: &[&str], code: i32) -> Value {
        let o = run(args);
        self.take_output(args, &o, code)
    }

    fn take_output(&mut self, args: &[&str], o: &Output, code: i32) -> Value {
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(code),
            "earfs {args:?}\nstdout: {out}\nstderr: {err}"
        );
        // One document and nothing else: human lines go to stderr.
        let doc: Value = serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!("earfs {args:?}: stdout is not one JSON document ({e}):\n{out}")
        });
        let name = doc["schema"]
            .as_str()
            .unwrap_or_else(|| panic!("no schema: {doc:#}"));
        self.seen.insert(name.to_string());
        let file = self
            .dir
            .join(format!("{:02}-{name}.json", self.files.len()));
        fs::write(&file, out.as_bytes()).unwrap();
        self.files.push(file);
        no_old_names(&doc, args);
        doc
    }

    /// Validate every document taken; and every schema in docs/schemas was produced.
    fn validate(&self) {
        let o = Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/validate_json.py"))
            .arg(schema_dir())
            .args(&self.files)
            .output()
            .expect("python3");
        assert!(
            o.status.success(),
            "documents that do not follow their schema:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let all: BTreeSet<String> = fs::read_dir(schema_dir())
            .unwrap()
            .map(|e| {
                let n = e.unwrap().file_name().into_string().unwrap();
                format!("earfs.{}", n.strip_suffix(".json").unwrap())
            })
            .collect();
        assert_eq!(
            self.seen, all,
            "schemas without an output, or outputs without a schema"
        );
    }
}

/// The field names every output shares, and none of the names they replaced.
fn no_old_names(v: &Value, args: &[&str]) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                assert!(
                    ![
                        "kms",
                        "kms_provider",
                        "aes_implementation",
                        "implementation"
                    ]
                    .contains(&k.as_str()),
                    "earfs {args:?}: field {k:?} (see docs/json.md for the shared names)"
                );
                if k == "key"
                    && let Some(key) = v.as_str()
                {
                    assert!(!key.contains(' '), "earfs {args:?}: key is prose: {key:?}");
                }
                if k == "backing" {
                    let b = Path::new(v.as_str().unwrap());
                    assert_eq!(
                        fs::canonicalize(b).unwrap(),
                        b,
                        "earfs {args:?}: backing is not canonical"
                    );
                }
                no_old_names(v, args);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| no_old_names(v, args)),
        _ => {}
    }
}

#[test]
fn every_json_output_follows_its_schema() {
    let d = TestDir::new("json");
    let mut docs = Docs::new(&d.path().join("docs"));
    let key = d.path().join("key");
    // A backing directory named through a symlink and a relative-looking path: the
    // outputs give it canonical.
    let real = d.path().join("real");
    fs::create_dir(&real).unwrap();
    let link = d.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let b = link.join("b");
    let m = d.path().join("m");
    fs::create_dir(&m).unwrap();

    let init = docs.take(
        &[
            "init",
            "--kms",
            "local",
            "--key-file",
            s(&key),
            "--json",
            s(&b),
        ],
        0,
    );
    assert_eq!(init["provider"], "local");
    assert_eq!(init["key"], s(&key));
    assert_eq!(init["backing"], s(&real.join("b")));
    let id = init["volume_id"].as_str().unwrap().to_string();

    let info = docs.take(&["info", "--json", s(&b)], 0);
    assert_eq!(info["volume_id"], id.as_str());
    assert!(info["files"].is_null());
    docs.take(&["config", "--json", s(&b)], 0);
    docs.take(&["speed", "--json", "--seconds", "0.05"], 0);
    let kc = docs.take(&["kms-check", "--json", s(&b)], 0);
    assert_eq!(kc["ok"], true);
    let kc = docs.take(
        &[
            "kms-check",
            "--json",
            "--new-key",
            "--kms",
            "local",
            "--key-file",
            s(&key),
            s(&b),
        ],
        0,
    );
    assert_eq!(kc["new_key"]["provider"], "local");
    let exported = d.path().join("keyring");
    let ex = docs.take(&["export-keyring", "--json", "-o", s(&exported), s(&b)], 0);
    assert_eq!(ex["output"], s(&exported));
    assert!(ex.get("keyring").is_none());
    let ex = docs.take(&["export-keyring", "--json", s(&b)], 0);
    assert_eq!(
        ex["keyring"].as_str().unwrap(),
        fs::read_to_string(&exported).unwrap(),
        "the keyring in the document is the file's"
    );
    let joined = d.path().join("joined");
    let j = docs.take(
        &[
            "init",
            "--join",
            s(&exported),
            "--key-file",
            s(&key),
            "--json",
            s(&joined),
        ],
        0,
    );
    assert_eq!(j["keyring_id"], init["keyring_id"]);
    assert_ne!(j["volume_id"], init["volume_id"]);

    // Mounted: mount, status (one and all), an online reencrypt, umount.
    let o = run(&["mount", "--json", s(&b), s(&m)]);
    let _guard = MountGuard(m.clone());
    let mounted = docs.take_output(&["mount", "--json"], &o, 0);
    assert_eq!(mounted["fstype"], "fuse.earfs");
    assert_eq!(mounted["mountpoint"], s(&m));
    assert_eq!(mounted["volume_id"], id.as_str());
    fs::write(m.join("f"), vec![7u8; 100_000]).unwrap();
    fs::create_dir(m.join("dir")).unwrap();
    fs::write(m.join("dir/g"), b"g").unwrap();
    let st = docs.take(&["status", "--json", "--files", s(&m)], 0);
    assert_eq!(st["pid"], mounted["pid"]);
    assert_eq!(st["files"]["files"], 2);
    let all = docs.take(&["status", "--json"], 0);
    assert!(
        all["daemons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["mountpoint"] == s(&m)),
        "{all:#}"
    );
    let re = docs.take(&["reencrypt", "--json", "--dry-run", s(&m)], 0);
    assert_eq!(
        (re["mounted"].clone(), re["dry_run"].clone()),
        (true.into(), true.into())
    );
    let u = docs.take(&["umount", "--json", s(&m)], 0);
    assert_eq!(u["backing"], s(&real.join("b")));

    // Offline data commands and the census.
    let o = run(&["rotate", s(&b)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let re = docs.take(&["reencrypt", "--json", s(&b)], 0);
    assert_eq!(re["rewritten"], 2, "{re:#}");
    let keys = docs.take(&["keys", "--json", s(&b)], 0);
    assert_eq!(keys["current_key_version"], 2);
    let info = docs.take(&["info", "--json", "--files", s(&b)], 0);
    assert_eq!(info["files"]["key_versions"]["2"], 2);
    let fsck = docs.take(&["fsck", "--json", s(&b)], 0);
    assert_eq!(fsck["result"], "clean");

    // A damaged file: fsck's own report is the one document (no error object after it).
    fs::write(real.join("b/dir/g"), b"not an earfs file at all").unwrap();
    let fsck = docs.take(&["fsck", "--json", s(&b)], 4);
    assert_eq!(fsck["exit_code"], 4);

    // Failures are earfs.error.v1, with the exit code the process exits with.
    let e = docs.take(&["info", "--json", s(&d.path().join("nothing"))], 10);
    assert_eq!(
        (e["command"].clone(), e["exit_code"].clone()),
        ("info".into(), 10.into())
    );
    let e = docs.take(&["info", "--json", "--no-such-flag", s(&b)], 2);
    assert!(
        e["error"].as_str().unwrap().contains("--no-such-flag"),
        "{e:#}"
    );
    let e = docs.take(&["mount", "--json", "--foreground", s(&b), s(&m)], 2);
    assert_eq!(e["command"], "mount");
    let e = docs.take(&["umount", "--json", s(&m)], 22);
    assert_eq!(e["command"], "umount");
    let e = docs.take(
        &[
            "init",
            "--kms",
            "local",
            "--key-file",
            s(&key),
            "--json",
            s(&b),
        ],
        21,
    );
    assert_eq!(e["command"], "init");
    let e = docs.take(&["kms-check", "--json", s(&d.path().join("nothing"))], 10);
    assert_eq!(e["ok"], false);

    docs.validate();
}
