//! The KMS providers end to end, through the real binary: AWS KMS against moto behind
//! a fault-injecting proxy, Google Cloud KMS against a REST fake that verifies the
//! RS256 JWT and CRC32C. Each test starts its own fake on a free loopback port.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::kms::*;
use common::*;
use serde_json::{Value, json};

/// Exit code, stdout, stderr.
fn earfs_out(args: &[&str]) -> (i32, String, String) {
    let out = run(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `earfs mount` with a KMS deadline, the background daemon logging to `log`.
fn mount_logged(backing: &Path, mnt: &Path, log: &Path, deadline: &str) -> (i32, String, String) {
    earfs_out(&[
        "mount",
        "--kms-deadline",
        deadline,
        "--log-file",
        s(log),
        s(backing),
        s(mnt),
    ])
}

fn ok(args: &[&str]) -> String {
    let (c, o, e) = earfs_out(args);
    assert_eq!(c, 0, "earfs {args:?}: {e}\n{o}");
    o
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The test's scratch directory; whatever is mounted under it is unmounted when the
/// test ends, pass or fail.
struct Dir(TestDir);

impl Dir {
    fn new() -> Dir {
        Dir(TestDir::new("earfs-kms-test-"))
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.0.path().join(rel)
    }
    fn mnt(&self, rel: &str) -> PathBuf {
        let p = self.p(rel);
        fs::create_dir_all(&p).unwrap();
        p
    }
}

fn conf_value(backing: &Path) -> toml::Table {
    toml::from_str(&fs::read_to_string(backing.join("earfs.conf")).unwrap()).unwrap()
}

fn keyring_id(backing: &Path) -> String {
    conf_value(backing)["keyring"]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Put `from`'s wrapped data key into `into`'s earfs.conf (same CMK, other keyring
/// id); returns `into`'s original config text.
fn move_wrapped_key(from: &Path, into: &Path) -> String {
    let wrapped = |p: &Path| {
        conf_value(p)["keyring"]["keys"][0]["wrapped"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let conf = into.join("earfs.conf");
    let text = fs::read_to_string(&conf).unwrap();
    fs::write(&conf, text.replace(&wrapped(into), &wrapped(from))).unwrap();
    text
}

fn check_json(args: &[&str]) -> (i32, Value) {
    let mut a = vec!["kms-check", "--json"];
    a.extend_from_slice(args);
    let (c, o, e) = earfs_out(&a);
    (
        c,
        serde_json::from_str(&o).unwrap_or_else(|_| panic!("{o}\n{e}")),
    )
}

/// The permissions a kms-check JSON report marks failed.
fn failed_checks(v: &Value) -> Vec<String> {
    check_results(v)
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(p, _)| p)
        .collect()
}

/// The (permission → ok) pairs of a kms-check JSON report.
fn check_results(v: &Value) -> Vec<(String, bool)> {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["permission"].as_str().unwrap().to_string(),
                c["ok"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Write `data` through a fresh mount of `backing`, then read it back through another.
fn write_and_read_back(backing: &Path, mnt: &Path, name: &str, data: &[u8]) {
    {
        let _m = mount_at(backing, mnt);
        fs::write(mnt.join(name), data).unwrap();
    }
    assert!(!is_mounted(mnt));
    let _m = mount_at(backing, mnt);
    assert_eq!(fs::read(mnt.join(name)).unwrap(), data);
}

// ---------------------------------------------------------------- AWS KMS

struct Aws {
    fake: Fake,
    dir: Dir,
    creds: PathBuf,
}

impl Aws {
    fn new(iam: bool) -> Aws {
        let dir = Dir::new();
        let creds = dir.p("aws-credentials");
        aws_credentials_file(&creds, "AKIDTEST", "test-secret");
        Aws {
            fake: Fake::aws(iam),
            dir,
            creds,
        }
    }
    /// Provider flags for `key` with the default credentials file.
    fn flags(&self, key: &str) -> Vec<String> {
        self.flags_with(key, &self.creds)
    }
    fn flags_with(&self, key: &str, creds: &Path) -> Vec<String> {
        provider_flags("aws", &self.fake, key, creds)
    }
    fn init(&self, key: &str, backing: &Path) -> (i32, String, String) {
        let mut a: Vec<String> = vec!["init".into()];
        a.extend(self.flags(key));
        a.push(s(backing).into());
        earfs_out(&a.iter().map(String::as_str).collect::<Vec<_>>())
    }
    fn state(&self, key: &str, state: &str) {
        self.fake
            .post("/__fake/key-state", json!({ "keyId": key, "state": state }));
    }
    fn fault(&self, rule: Value) {
        self.fake.post("/__fake/faults", rule);
    }
    fn reset(&self) {
        self.fake.post("/__fake/reset", json!({}));
    }
    /// An IAM user allowed `actions`; returns its credentials file.
    fn user(&self, name: &str, actions: &[&str]) -> PathBuf {
        let v = self
            .fake
            .post("/__fake/users", json!({ "name": name, "actions": actions }));
        let p = self.dir.p(&format!("{name}-credentials"));
        aws_credentials_file(
            &p,
            v["accessKeyId"].as_str().unwrap(),
            v["secretAccessKey"].as_str().unwrap(),
        );
        p
    }
}

/// Every AWS KMS permission earfs needs, in kms-check's order.
const ALL_AWS: [&str; 5] = [
    "kms:DescribeKey",
    "kms:ListAliases",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:Decrypt",
    "kms:Encrypt",
];

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn aws_check_init_mount_remount_and_join() {
    let aws = Aws::new(false);
    let (arn, alias) = aws_key(&aws.fake, "alias/earfs-db");
    // Preflight before anything exists: every permission ok.
    let flags = aws.flags(&alias);
    let (c, v) = check_json(&strs(&flags));
    assert_eq!(c, 0, "{v}");
    let results = check_results(&v);
    assert_eq!(
        results.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        ALL_AWS
    );
    assert!(results.iter().all(|(_, ok)| *ok), "{v}");
    // init with the alias ARN: the volume stores the key ARN it resolves to.
    let node1 = aws.dir.p("node1");
    let (c, out, err) = aws.init(&alias, &node1);
    assert_eq!(c, 0, "{err}");
    assert!(out.contains("aliases: alias/earfs-db"), "{out}");
    assert_eq!(
        conf_value(&node1)["kms"]["key_arn"].as_str(),
        Some(arn.as_str())
    );
    assert_eq!(conf_value(&node1)["kms"]["provider"].as_str(), Some("aws"));
    // The wrapped key was made by GenerateDataKeyWithoutPlaintext, and Encrypt was tried.
    assert_eq!(
        aws.fake.count_requests("GenerateDataKeyWithoutPlaintext"),
        2
    );
    assert!(aws.fake.count_requests("Encrypt") >= 2);
    // Mount, write, unmount, remount: the data key unwraps through KMS Decrypt.
    let decrypts = aws.fake.count_requests("Decrypt");
    let mnt1 = aws.dir.mnt("mnt1");
    write_and_read_back(&node1, &mnt1, "table.sst", b"rows of the database");
    assert_eq!(aws.fake.count_requests("Decrypt"), decrypts + 2);
    // The plaintext never reaches the backing directory.
    for (p, bytes) in all_backing_bytes(&node1) {
        assert!(
            !contains(&bytes, b"rows of the database"),
            "{}",
            p.display()
        );
    }
    // The same preflight for the existing volume decrypts its own wrapped key.
    let (c, v) = check_json(&[s(&node1)]);
    assert_eq!(c, 0, "{v}");
    assert!(
        v.to_string().contains("the volume's current data key"),
        "{v}"
    );
    // A second node joins with node 1's earfs.conf, a third with an exported keyring.
    let node2 = aws.dir.p("node2");
    ok(&["init", "--join", s(&node1.join("earfs.conf")), s(&node2)]);
    let export = aws.dir.p("keyring.toml");
    ok(&["export-keyring", "-o", s(&export), s(&node1)]);
    assert_eq!(
        fs::metadata(&export).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let node3 = aws.dir.p("node3");
    let creds3 = aws.dir.p("node3-credentials");
    aws_credentials_file(&creds3, "AKIDNODE3", "node3-secret");
    ok(&[
        "init",
        "--join",
        s(&export),
        "--credentials",
        s(&creds3),
        s(&node3),
    ]);
    // One keyring id across the cluster, one volume id per node.
    assert_eq!(keyring_id(&node2), keyring_id(&node1));
    assert_eq!(keyring_id(&node3), keyring_id(&node1));
    let vid = |b: &Path| conf_value(b)["volume_id"].as_str().unwrap().to_string();
    assert_ne!(vid(&node1), vid(&node2));
    assert_ne!(vid(&node2), vid(&node3));
    assert_eq!(
        conf_value(&node3)["kms"]["credentials_file"].as_str(),
        Some(s(&creds3))
    );
    // The same data key: a file copied from node 1's backing reads on node 3.
    fs::copy(node1.join("table.sst"), node3.join("table.sst")).unwrap();
    let mnt3 = aws.dir.mnt("mnt3");
    let _m = mount_at(&node3, &mnt3);
    assert_eq!(
        fs::read(mnt3.join("table.sst")).unwrap(),
        b"rows of the database"
    );
    // A join file that was altered is refused (its MAC is keyed by the data key).
    let text = fs::read_to_string(&export).unwrap();
    let bad = aws.dir.p("bad-keyring.toml");
    fs::write(
        &bad,
        text.replace("exported_from = \"", "exported_from = \"x"),
    )
    .unwrap();
    let (c, _, err) = earfs_out(&["init", "--join", s(&bad), s(&aws.dir.p("node4"))]);
    assert_eq!(c, 15, "{err}");
    assert!(!aws.dir.p("node4").join("earfs.conf").exists());
}

#[test]
fn aws_bad_keys_are_refused_with_reasons() {
    let aws = Aws::new(false);
    let (arn, _) = aws_key(&aws.fake, "alias/good");
    let init_code = |key: &str, name: &str| {
        let b = aws.dir.p(name);
        let (c, _, err) = aws.init(key, &b);
        assert!(!b.join("earfs.conf").exists(), "{name}: {err}");
        (c, err)
    };
    // Not an ARN, wrong region, unknown key.
    let key_id = arn.rsplit('/').next().unwrap().to_string();
    let (c, err) = init_code(&key_id, "bare");
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("not an AWS KMS key ARN"), "{err}");
    let mut flags = aws.flags(&arn);
    flags.extend(["--region".to_string(), "eu-west-1".to_string()]);
    let mut a = vec!["init".to_string()];
    a.extend(flags);
    a.push(s(&aws.dir.p("region")).into());
    let (c, _, err) = earfs_out(&strs(&a));
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("is in region us-east-1"), "{err}");
    let missing = arn.replace(&key_id, "00000000-0000-0000-0000-000000000000");
    let (c, err) = init_code(&missing, "missing");
    assert_eq!(c, 25, "{err}");
    assert!(err.contains("NotFoundException"), "{err}");
    // A multi-region key and an asymmetric key are refused by DescribeKey.
    let mrk = aws
        .fake
        .post("/__fake/keys", json!({ "multiRegion": true }))["arn"]
        .as_str()
        .unwrap()
        .to_string();
    let (c, err) = init_code(&mrk, "mrk");
    assert_eq!(c, 25, "{err}");
    assert!(err.contains("multi-region"), "{err}");
    let rsa = aws.fake.post(
        "/__fake/keys",
        json!({ "keySpec": "RSA_2048", "keyUsage": "ENCRYPT_DECRYPT" }),
    )["arn"]
        .as_str()
        .unwrap()
        .to_string();
    let (c, err) = init_code(&rsa, "rsa");
    assert_eq!(c, 25, "{err}");
    assert!(err.contains("RSA_2048"), "{err}");
    // Disabled and pending deletion: init writes nothing, mount fails fast.
    let node = aws.dir.p("node");
    assert_eq!(aws.init(&arn, &node).0, 0);
    let mnt = aws.dir.mnt("mnt");
    for (state, words) in [
        ("Disabled", "DisabledException"),
        ("PendingDeletion", "pending deletion"),
    ] {
        aws.state(&arn, state);
        let (c, err) = init_code(&arn, &format!("init-{state}"));
        assert_eq!(c, 25, "{state}: {err}");
        let before = aws.fake.count_requests("Decrypt");
        let (c, _, err) = earfs_out(&["mount", s(&node), s(&mnt)]);
        assert_eq!(c, 25, "{state}: {err}");
        assert!(err.contains(words) && err.contains(&arn), "{err}");
        assert!(err.contains("Decrypt"), "{err}");
        assert!(!is_mounted(&mnt));
        // Not retried: a definitive failure.
        assert_eq!(aws.fake.count_requests("Decrypt"), before + 1);
        let (c, v) = check_json(&[s(&node)]);
        assert_eq!(c, 29, "{v}");
        assert!(!check_results(&v)[0].1, "DescribeKey shows the state: {v}");
    }
    aws.reset();
    drop(mount_at(&node, &mnt));
}

#[test]
fn aws_wrapped_keys_are_bound_to_their_key_and_keyring() {
    let aws = Aws::new(false);
    let (arn1, _) = aws_key(&aws.fake, "alias/one");
    let (arn2, _) = aws_key(&aws.fake, "alias/two");
    let a = aws.dir.p("a");
    let b = aws.dir.p("b");
    assert_eq!(aws.init(&arn1, &a).0, 0);
    assert_eq!(aws.init(&arn1, &b).0, 0);
    let mnt = aws.dir.mnt("mnt");
    // B's wrapped key moved into A's config: same CMK, other keyring id → the
    // encryption context does not match and KMS refuses.
    let text = move_wrapped_key(&b, &a);
    let conf = a.join("earfs.conf");
    let (c, _, err) = earfs_out(&["mount", s(&a), s(&mnt)]);
    assert_eq!(c, 14, "{err}");
    assert!(err.contains("bound to another keyring"), "{err}");
    fs::write(&conf, &text).unwrap();
    // The config pointed at another key: KMS refuses to decrypt with it.
    fs::write(&conf, text.replace(&arn1, &arn2)).unwrap();
    let (c, _, err) = earfs_out(&["mount", s(&a), s(&mnt)]);
    assert_eq!(c, 14, "{err}");
    assert!(err.contains(&arn2), "{err}");
    fs::write(&conf, &text).unwrap();
    drop(mount_at(&a, &mnt));
}

#[test]
fn aws_throttling_5xx_and_slow_replies_are_retried_within_the_deadline() {
    let aws = Aws::new(false);
    let (arn, _) = aws_key(&aws.fake, "alias/busy");
    let node = aws.dir.p("node");
    assert_eq!(aws.init(&arn, &node).0, 0);
    let mnt = aws.dir.mnt("mnt");
    let log = aws.dir.p("daemon.log");
    let mount = |deadline: &str| mount_logged(&node, &mnt, &log, deadline);
    // Two throttles, a KMS 500 and a load balancer's 503, then success.
    aws.fault(json!({"op": "Decrypt", "count": 2, "errorType": "ThrottlingException", "message": "Rate exceeded"}));
    aws.fault(
        json!({"op": "Decrypt", "count": 1, "status": 500, "errorType": "KMSInternalException"}),
    );
    aws.fault(json!({"op": "Decrypt", "count": 1, "errorType": "raw"}));
    let before = aws.fake.count_requests("Decrypt");
    let (c, _, err) = mount("30");
    assert_eq!(c, 0, "{err}");
    assert_eq!(aws.fake.count_requests("Decrypt"), before + 5);
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("attempt 1 failed (ThrottlingException: Rate exceeded)"),
        "{text}"
    );
    assert!(text.contains("attempt 4 failed"), "{text}");
    force_unmount(&mnt);
    // Throttled without end: gives up at the deadline with the last reason.
    aws.fault(json!({"op": "Decrypt", "count": -1, "errorType": "ThrottlingException", "message": "Rate exceeded"}));
    let start = std::time::Instant::now();
    let (c, _, err) = mount("2");
    assert_eq!(c, 26, "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    assert!(
        err.contains("attempt(s)") && err.contains("Rate exceeded"),
        "{err}"
    );
    assert!(!is_mounted(&mnt));
    aws.reset();
    // A reply slower than the deadline: the attempt times out.
    aws.fault(json!({"op": "Decrypt", "count": -1, "delayMs": 4000}));
    let (c, _, err) = mount("2");
    assert_eq!(c, 26, "{err}");
    assert!(err.contains("no reply within"), "{err}");
    aws.reset();
    // One slow reply within the deadline is just slow.
    aws.fault(json!({"op": "Decrypt", "count": 1, "delayMs": 1500}));
    let (c, _, err) = mount("20");
    assert_eq!(c, 0, "{err}");
    force_unmount(&mnt);
    // Unreachable KMS (nothing listens): retried, then exit 26 naming the cause.
    let conf = node.join("earfs.conf");
    let text = fs::read_to_string(&conf).unwrap();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    // The endpoint is part of the authenticated config: make a volume that points there.
    let lost = aws.dir.p("lost");
    let mut a = vec!["init".to_string()];
    a.extend(aws.flags(&arn));
    a.push(s(&lost).into());
    ok(&strs(&a));
    let lost_text = fs::read_to_string(lost.join("earfs.conf")).unwrap();
    fs::write(
        lost.join("earfs.conf"),
        lost_text.replace(&aws.fake.url, &dead),
    )
    .unwrap();
    let (c, _, err) = earfs_out(&["mount", "--kms-deadline", "2", s(&lost), s(&mnt)]);
    // The changed endpoint breaks the MAC only after unwrapping, so the KMS error wins.
    assert_eq!(c, 26, "{err}");
    assert!(err.contains("cannot reach the KMS endpoint"), "{err}");
    assert_eq!(fs::read_to_string(&conf).unwrap(), text);
}

#[test]
fn aws_missing_permissions_and_bad_credentials_are_named() {
    let aws = Aws::new(true);
    let (arn, _) = aws_key(&aws.fake, "alias/iam");
    let user = |name: &str, actions: &[&str]| aws.user(name, actions);
    let all = ALL_AWS;
    let admin = user("admin", &all);
    let no_aliases = user(
        "no-aliases",
        &all[..1]
            .iter()
            .chain(&all[2..])
            .copied()
            .collect::<Vec<_>>(),
    );
    let no_decrypt = user(
        "no-decrypt",
        &[
            "kms:DescribeKey",
            "kms:ListAliases",
            "kms:GenerateDataKeyWithoutPlaintext",
            "kms:Encrypt",
        ],
    );
    // kms-check names exactly the missing action, with the KMS's own reason.
    let (c, v) = check_json(&strs(&aws.flags_with(&arn, &no_aliases)));
    assert_eq!(c, 29, "{v}");
    let failed = failed_checks(&v);
    assert_eq!(failed, ["kms:ListAliases"], "{v}");
    assert!(
        v.to_string()
            .contains("not authorized to perform: kms:ListAliases"),
        "{v}"
    );
    let (c, out, _) = earfs_out(
        &{
            let mut a = vec!["kms-check".to_string()];
            a.extend(aws.flags_with(&arn, &no_aliases));
            a
        }
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert_eq!(c, 29);
    assert!(
        out.contains("kms:ListAliases") && out.contains("FAILED"),
        "{out}"
    );
    // init with a node that may not ListAliases is refused before writing anything.
    let b = aws.dir.p("b");
    let mut a = vec!["init".to_string()];
    a.extend(aws.flags_with(&arn, &no_aliases));
    a.push(s(&b).into());
    let (c, _, err) = earfs_out(&strs(&a));
    assert_eq!(c, 24, "{err}");
    assert!(err.contains("grant kms:ListAliases"), "{err}");
    assert!(!b.join("earfs.conf").exists());
    // A volume made by an admin, then mounted by a node without kms:Decrypt.
    let mut a = vec!["init".to_string()];
    a.extend(aws.flags_with(&arn, &admin));
    a.push(s(&b).into());
    ok(&strs(&a));
    // kms-check of that volume passes with the credentials recorded at init, and with
    // this node's (--credentials over them) names the missing kms:Decrypt.
    let (c, v) = check_json(&[s(&b)]);
    assert_eq!(c, 0, "{v}");
    let (c, v) = check_json(&["--credentials", s(&no_decrypt), s(&b)]);
    assert_eq!(c, 29, "{v}");
    let failed = failed_checks(&v);
    assert_eq!(failed, ["kms:Decrypt"], "{v}");
    let node = aws.dir.p("node");
    ok(&["init", "--join", s(&b.join("earfs.conf")), s(&node)]);
    let conf = node.join("earfs.conf");
    // Joining with another node's credentials proves that node may decrypt: refused.
    let c2 = aws.dir.p("node-nd");
    let (c, _, err) = earfs_out(&[
        "init",
        "--join",
        s(&b.join("earfs.conf")),
        "--credentials",
        s(&no_decrypt),
        s(&c2),
    ]);
    assert_eq!(c, 24, "{err}");
    assert!(err.contains("kms:Decrypt"), "{err}");
    assert!(
        fs::read_to_string(&conf)
            .unwrap()
            .contains("admin-credentials")
    );
    let mnt = aws.dir.mnt("mnt");
    drop(mount_at(&node, &mnt));
    // Unknown access key: a credentials error, not a permission one.
    let stranger = aws.dir.p("stranger");
    aws_credentials_file(&stranger, "AKIDUNKNOWN", "nope");
    let (c, v) = check_json(&strs(&aws.flags_with(&arn, &stranger)));
    assert_eq!(c, 29, "{v}");
    assert!(
        v.to_string()
            .contains("security token included in the request is invalid"),
        "{v}"
    );
    let mut a = vec!["init".to_string()];
    a.extend(aws.flags_with(&arn, &stranger));
    a.push(s(&aws.dir.p("c")).into());
    let (c, _, err) = earfs_out(&strs(&a));
    assert_eq!(c, 28, "{err}");
    // A credentials file that others can read is refused, with the fix.
    fs::set_permissions(&admin, fs::Permissions::from_mode(0o644)).unwrap();
    let (c, _, err) = earfs_out(&["mount", s(&b), s(&mnt)]);
    assert_eq!(c, 28, "{err}");
    assert!(
        err.contains("chmod 600") && err.contains("admin-credentials"),
        "{err}"
    );
    assert!(!is_mounted(&mnt));
}

#[test]
fn aws_default_shared_credentials_file_is_used_and_must_be_private() {
    let aws = Aws::new(true);
    let (arn, _) = aws_key(&aws.fake, "alias/home");
    let v = aws.fake.post(
        "/__fake/users",
        json!({ "name": "home", "actions": [
            "kms:DescribeKey", "kms:ListAliases", "kms:GenerateDataKeyWithoutPlaintext",
            "kms:Decrypt", "kms:Encrypt"] }),
    );
    // No --credentials: the SDK's own search finds $HOME/.aws/credentials.
    let home = aws.dir.p("home");
    fs::create_dir_all(home.join(".aws")).unwrap();
    let file = home.join(".aws/credentials");
    aws_credentials_file(
        &file,
        v["accessKeyId"].as_str().unwrap(),
        v["secretAccessKey"].as_str().unwrap(),
    );
    let check = || {
        let out = std::process::Command::new(earfs())
            .args([
                "kms-check",
                "--kms",
                "aws",
                "--key-arn",
                &arn,
                "--endpoint-url",
                &aws.fake.url,
            ])
            .env("HOME", &home)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SHARED_CREDENTIALS_FILE")
            .env_remove("AWS_CONFIG_FILE")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (c, out) = check();
    assert_eq!(c, 0, "{out}");
    // The same file, readable by others: refused before any call, with the fix.
    fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
    let (c, out) = check();
    assert_eq!(c, 28, "{out}");
    assert!(
        out.contains("chmod 600") && out.contains(".aws/credentials"),
        "{out}"
    );
}

// ---------------------------------------------------------------- Google Cloud KMS

struct Gcp {
    fake: Fake,
    dir: Dir,
    sa: PathBuf,
    key: String,
}

const ALL_GCP: [&str; 5] = [
    "cloudkms.keyRings.get",
    "cloudkms.cryptoKeys.get",
    "cloudkms.locations.generateRandomBytes",
    "cloudkms.cryptoKeyVersions.useToEncrypt",
    "cloudkms.cryptoKeyVersions.useToDecrypt",
];

impl Gcp {
    fn new() -> Gcp {
        let fake = Fake::gcp();
        let dir = Dir::new();
        let sa = dir.p("sa.json");
        gcp_service_account(&fake, "node@p.iam.gserviceaccount.com", &ALL_GCP, &sa);
        let key = gcp_key(&fake, "earfs", "data");
        Gcp { fake, dir, sa, key }
    }
    fn flags_with(&self, key: &str, sa: &Path) -> Vec<String> {
        provider_flags("gcp", &self.fake, key, sa)
    }
    fn init(&self, key: &str, backing: &Path) -> (i32, String, String) {
        let mut a = vec!["init".to_string()];
        a.extend(self.flags_with(key, &self.sa));
        a.push(s(backing).into());
        earfs_out(&strs(&a))
    }
    fn fault(&self, rule: Value) {
        self.fake.post("/__fake/faults", rule);
    }
    fn version_state(&self, state: &str) {
        self.fake.post(
            "/__fake/crypto-keys/version-state",
            json!({ "name": self.key, "state": state }),
        );
    }
    fn permissions(&self, perms: &[&str]) {
        self.fake.post(
            "/__fake/permissions",
            json!({ "email": "node@p.iam.gserviceaccount.com", "permissions": perms }),
        );
    }
}

#[test]
fn gcp_check_init_mount_remount_rotate_and_join() {
    let g = Gcp::new();
    let (c, v) = check_json(&strs(&g.flags_with(&g.key, &g.sa)));
    assert_eq!(c, 0, "{v}");
    assert_eq!(
        check_results(&v),
        ALL_GCP
            .iter()
            .map(|p| (p.to_string(), true))
            .collect::<Vec<_>>()
    );
    let node1 = g.dir.p("node1");
    let (c, out, err) = g.init(&g.key, &node1);
    assert_eq!(c, 0, "{err}");
    assert!(out.contains("primary version: 1 (ENABLED, HSM)"), "{out}");
    assert_eq!(
        conf_value(&node1)["kms"]["key_resource"].as_str(),
        Some(g.key.as_str())
    );
    // Every API call was authenticated with the service account's JWT.
    let reqs = g.fake.get("/__fake/requests");
    for r in reqs.as_array().unwrap() {
        assert_eq!(r["email"], "node@p.iam.gserviceaccount.com", "{r}");
        assert_eq!(r["status"], 200, "{r}");
    }
    // One by kms-check, one by init.
    assert_eq!(g.fake.count_requests(":generateRandomBytes"), 2);
    let mnt1 = g.dir.mnt("mnt1");
    write_and_read_back(&node1, &mnt1, "wal.log", b"write-ahead log record");
    // After rotation the old version still unwraps; new volumes wrap with the new one.
    g.fake
        .post("/__fake/crypto-keys/rotate", json!({ "name": g.key }));
    {
        let _m = mount_at(&node1, &mnt1);
        assert_eq!(
            fs::read(mnt1.join("wal.log")).unwrap(),
            b"write-ahead log record"
        );
    }
    let (c, v) = check_json(&[s(&node1)]);
    assert_eq!(c, 0, "{v}");
    assert!(v.to_string().contains("primary version: 2"), "{v}");
    // A second node joins with an exported keyring and reads node 1's file.
    let export = g.dir.p("keyring.toml");
    ok(&["export-keyring", "-o", s(&export), s(&node1)]);
    let node2 = g.dir.p("node2");
    ok(&["init", "--join", s(&export), s(&node2)]);
    assert_eq!(keyring_id(&node2), keyring_id(&node1));
    fs::copy(node1.join("wal.log"), node2.join("wal.log")).unwrap();
    let mnt2 = g.dir.mnt("mnt2");
    let _m = mount_at(&node2, &mnt2);
    assert_eq!(
        fs::read(mnt2.join("wal.log")).unwrap(),
        b"write-ahead log record"
    );
}

#[test]
fn gcp_bad_keys_versions_and_states_are_refused() {
    let g = Gcp::new();
    let versioned = format!("{}/cryptoKeyVersions/1", g.key);
    let (c, _, err) = g.init(&versioned, &g.dir.p("v"));
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("without /cryptoKeyVersions/N"), "{err}");
    // Wrong purpose.
    let sign = "projects/p/locations/global/keyRings/earfs/cryptoKeys/sign";
    g.fake.post(
        "/__fake/crypto-keys",
        json!({ "name": sign, "purpose": "ASYMMETRIC_SIGN" }),
    );
    let (c, _, err) = g.init(sign, &g.dir.p("sign"));
    assert_eq!(c, 25, "{err}");
    assert!(err.contains("ENCRYPT_DECRYPT"), "{err}");
    // Unknown key.
    let missing = "projects/p/locations/global/keyRings/earfs/cryptoKeys/nope";
    let (c, _, err) = g.init(missing, &g.dir.p("missing"));
    assert_eq!(c, 25, "{err}");
    assert!(
        err.contains("NOT_FOUND") || err.contains("not found"),
        "{err}"
    );
    // Disabled or destroyed primary: init refuses, mount fails fast.
    let node = g.dir.p("node");
    assert_eq!(g.init(&g.key, &node).0, 0);
    let mnt = g.dir.mnt("mnt");
    g.version_state("DISABLED");
    let (c, _, err) = g.init(&g.key, &g.dir.p("disabled"));
    assert_eq!(c, 25, "{err}");
    assert!(err.contains("DISABLED"), "{err}");
    assert!(!g.dir.p("disabled").join("earfs.conf").exists());
    let before = g.fake.count_requests(":decrypt");
    let (c, _, err) = earfs_out(&["mount", s(&node), s(&mnt)]);
    assert_eq!(c, 25, "{err}");
    assert!(
        err.contains("cryptoKeys.decrypt") && err.contains("not enabled"),
        "{err}"
    );
    assert_eq!(g.fake.count_requests(":decrypt"), before + 1);
    g.version_state("ENABLED");
    drop(mount_at(&node, &mnt));
    // A wrapped key moved to another keyring id: the AAD does not match.
    let other = g.dir.p("other");
    assert_eq!(g.init(&g.key, &other).0, 0);
    let text = move_wrapped_key(&other, &node);
    let conf = node.join("earfs.conf");
    let (c, _, err) = earfs_out(&["mount", s(&node), s(&mnt)]);
    assert_eq!(c, 14, "{err}");
    fs::write(&conf, &text).unwrap();
    // Destroyed: the data key is gone for good.
    g.version_state("DESTROYED");
    let (c, _, err) = earfs_out(&["mount", s(&node), s(&mnt)]);
    assert_eq!(c, 25, "{err}");
    assert!(err.contains("DESTROYED"), "{err}");
}

#[test]
fn gcp_permissions_credentials_faults_and_crc() {
    let g = Gcp::new();
    let node = g.dir.p("node");
    assert_eq!(g.init(&g.key, &node).0, 0);
    let mnt = g.dir.mnt("mnt");
    let log = g.dir.p("daemon.log");
    let mount = |deadline: &str| mount_logged(&node, &mnt, &log, deadline);
    // Permission revoked: kms-check names it; mount fails with exit 24 naming it.
    g.permissions(&ALL_GCP[..4]);
    let (c, v) = check_json(&[s(&node)]);
    assert_eq!(c, 29, "{v}");
    let failed = failed_checks(&v);
    assert_eq!(failed, ["cloudkms.cryptoKeyVersions.useToDecrypt"], "{v}");
    assert!(v.to_string().contains("PERMISSION_DENIED"), "{v}");
    let (c, _, err) = mount("10");
    assert_eq!(c, 24, "{err}");
    assert!(
        err.contains("grant cloudkms.cryptoKeyVersions.useToDecrypt"),
        "{err}"
    );
    g.permissions(&ALL_GCP);
    // 429 and 503 are retried; the mount comes up.
    g.fault(json!({"match": ":decrypt", "status": 429, "count": 1}));
    g.fault(json!({"match": ":decrypt", "status": 503, "count": 1}));
    let before = g.fake.count_requests(":decrypt");
    let (c, _, err) = mount("30");
    assert_eq!(c, 0, "{err}");
    assert_eq!(g.fake.count_requests(":decrypt"), before + 3);
    assert!(
        fs::read_to_string(&log)
            .unwrap()
            .contains("RESOURCE_EXHAUSTED")
    );
    force_unmount(&mnt);
    // 503 without end: exit 26 at the deadline.
    g.fault(json!({"match": ":decrypt", "status": 503, "count": -1}));
    let (c, _, err) = mount("2");
    assert_eq!(c, 26, "{err}");
    assert!(err.contains("UNAVAILABLE"), "{err}");
    g.fake.post("/__fake/reset-faults", json!({}));
    // A slow reply beyond the deadline times out; within it, it is just slow.
    g.fault(json!({"match": ":decrypt", "delayMs": 4000, "count": 1}));
    let (c, _, err) = mount("2");
    assert_eq!(c, 26, "{err}");
    assert!(err.contains("no reply within"), "{err}");
    g.fake.post("/__fake/reset-faults", json!({}));
    g.fault(json!({"match": ":decrypt", "delayMs": 1000, "count": 1}));
    let (c, _, err) = mount("20");
    assert_eq!(c, 0, "{err}");
    force_unmount(&mnt);
    // A damaged reply (CRC32C mismatch) is not trusted and not retried.
    g.fault(json!({"match": ":decrypt", "corruptCrc": true, "count": -1}));
    let before = g.fake.count_requests(":decrypt");
    let (c, _, err) = mount("10");
    assert_eq!(c, 27, "{err}");
    assert!(err.contains("CRC32C"), "{err}");
    assert_eq!(g.fake.count_requests(":decrypt"), before + 1);
    g.fake.post("/__fake/reset-faults", json!({}));
    // A service-account key the KMS does not know (JWT signature fails): exit 28.
    let other = Fake::gcp();
    let stranger = g.dir.p("stranger.json");
    gcp_service_account(
        &other,
        "node@p.iam.gserviceaccount.com",
        &ALL_GCP,
        &stranger,
    );
    let mut a = vec!["init".to_string()];
    a.extend(g.flags_with(&g.key, &stranger));
    a.push(s(&g.dir.p("stranger-vol")).into());
    let (c, _, err) = earfs_out(&strs(&a));
    assert_eq!(c, 28, "{err}");
    assert!(err.contains("UNAUTHENTICATED"), "{err}");
    // A service-account key file that others can read is refused.
    fs::set_permissions(&g.sa, fs::Permissions::from_mode(0o640)).unwrap();
    let (c, _, err) = mount("10");
    assert_eq!(c, 28, "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    fs::set_permissions(&g.sa, fs::Permissions::from_mode(0o600)).unwrap();
    drop(mount_at(&node, &mnt));
}

#[test]
fn kms_check_needs_a_volume_or_a_key() {
    let (c, _, err) = earfs_out(&["kms-check"]);
    assert_eq!(c, 2, "{err}");
    let (c, _, err) = earfs_out(&[
        "init",
        "--kms",
        "aws",
        "--key-resource",
        "projects/p/locations/l/keyRings/r/cryptoKeys/k",
        "/nonexistent/earfs-x",
    ]);
    assert_eq!(c, 2, "{err}");
    assert!(
        err.contains("--key-resource cannot be used with --kms aws"),
        "{err}"
    );
}

#[test]
fn kms_check_of_a_volume_verifies_its_config_mac_and_info_says_it_did_not() {
    let d = Dir::new();
    let b = d.p("backing");
    init_local(&d.p("key"), &b);
    let (c, v) = check_json(&[s(&b)]);
    assert_eq!(c, 0, "{v}");
    let rows = check_results(&v);
    assert_eq!(rows.last(), Some(&("earfs.conf".to_string(), true)), "{v}");
    // info reads earfs.conf without the key, and says so.
    let out = ok(&["info", s(&b)]);
    assert!(out.contains("authenticated: no"), "{out}");
    let v: Value = serde_json::from_str(&ok(&["info", "--json", s(&b)])).unwrap();
    assert_eq!(v["authenticated"], false, "{v}");
    // An edit that keeps the file valid but breaks its MAC: exit 15, as a mount would.
    let conf = b.join("earfs.conf");
    let text = fs::read_to_string(&conf).unwrap();
    let id = conf_value(&b)["volume_id"].as_str().unwrap().to_string();
    fs::write(
        &conf,
        text.replace(&id, "00000000-0000-4000-8000-000000000000"),
    )
    .unwrap();
    let (c, v) = check_json(&[s(&b)]);
    assert_eq!(c, 15, "{v}");
    assert_eq!(failed_checks(&v), ["earfs.conf"], "{v}");
    let (c, out, err) = earfs_out(&["kms-check", s(&b)]);
    assert_eq!(c, 15, "{out}{err}");
    assert!(out.contains("does not authenticate"), "{out}");
}

// ---------------------------------------------------------------- keyring import

/// `earfs mount --log-file LOG BACKING MNT`, which must succeed; unmounted on drop.
fn mount_logging(backing: &Path, mnt: &Path, log: &Path) -> MountGuard {
    let (c, _, e) = earfs_out(&["mount", "--log-file", s(log), s(backing), s(mnt)]);
    assert_eq!(c, 0, "mount failed: {e}");
    MountGuard(mnt.to_path_buf())
}

fn current_version(backing: &Path) -> i64 {
    conf_value(backing)["keyring"]["current"]
        .as_integer()
        .unwrap()
}

fn header_key_version(path: &Path) -> u32 {
    let h = fs::read(path).unwrap();
    u32::from_le_bytes([h[12], h[13], h[14], h[15]])
}

#[test]
fn import_keyring_brings_a_rotation_to_the_other_nodes_mounted_or_not() {
    let d = Dir::new();
    let key = d.p("key");
    let n1 = d.p("node1");
    init_local(&key, &n1);
    // Node 2 joins by node 1's earfs.conf, nodes 3 and 4 by an export.
    let first = d.p("first.toml");
    ok(&["export-keyring", "-o", s(&first), s(&n1)]);
    let n2 = d.p("node2");
    ok(&["init", "--join", s(&n1.join("earfs.conf")), s(&n2)]);
    let (n3, n4) = (d.p("node3"), d.p("node4"));
    for n in [&n3, &n4] {
        ok(&["init", "--join", s(&first), s(n)]);
    }
    let ids: Vec<toml::Value> = [&n2, &n3]
        .iter()
        .map(|n| conf_value(n)["volume_id"].clone())
        .collect();
    ok(&["rotate", s(&n1)]);
    let export = d.p("ring.toml");
    let (c, _, err) = earfs_out(&["export-keyring", "-o", s(&export), s(&n1)]);
    assert_eq!(c, 0, "{err}");
    assert!(err.contains("earfs import-keyring"), "{err}");
    assert!(err.contains("earfs init --join"), "{err}");
    assert!(
        fs::read_to_string(&export)
            .unwrap()
            .contains("earfs import-keyring THIS-FILE BACKING")
    );
    // Node 1 writes a file under version 2; its backing file goes to the others.
    let data = b"written on node 1 under key version 2";
    let mnt1 = d.mnt("mnt1");
    {
        let _m = mount_at(&n1, &mnt1);
        fs::write(mnt1.join("wal.log"), data).unwrap();
    }
    assert_eq!(header_key_version(&n1.join("wal.log")), 2);
    for n in [&n2, &n3, &n4] {
        fs::copy(n1.join("wal.log"), n.join("wal.log")).unwrap();
    }
    // Node 2 is mounted: the import goes through its daemon, which switches at once.
    let mnt2 = d.mnt("mnt2");
    {
        let _m = mount_logging(&n2, &mnt2, &d.p("node2.log"));
        let out = ok(&["import-keyring", s(&export), s(&n2)]);
        assert!(out.contains("through the running daemon"), "{out}");
        assert!(out.contains("current 2 (was 1); added [2]"), "{out}");
        let st: Value = serde_json::from_str(&ok(&["status", "--json", s(&mnt2)])).unwrap();
        assert_eq!(st["current_key_version"], 2, "{st}");
        assert_eq!(st["key_versions"], json!([1, 2]), "{st}");
        assert_eq!(fs::read(mnt2.join("wal.log")).unwrap(), data);
        fs::write(mnt2.join("new"), b"node 2").unwrap();
        assert_eq!(header_key_version(&n2.join("new")), 2);
        // Again: nothing to do.
        let out = ok(&["import-keyring", s(&export), s(&n2)]);
        assert!(out.contains("nothing to do"), "{out}");
        // The daemon uses its own per-node settings: flags for them are refused.
        let (c, _, err) = earfs_out(&["import-keyring", "--key-file", s(&key), s(&export), s(&n2)]);
        assert_eq!(c, 2, "{err}");
        assert!(err.contains("is mounted"), "{err}");
    }
    // Node 3 is not mounted: earfs.conf is rewritten under its lock.
    let out = ok(&["import-keyring", s(&export), s(&n3)]);
    assert!(out.contains("not mounted: earfs.conf rewritten"), "{out}");
    let out = ok(&["import-keyring", s(&export), s(&n3)]);
    assert!(out.contains("nothing to do"), "{out}");
    for (n, id) in [&n2, &n3].iter().zip(&ids) {
        assert_eq!(current_version(n), 2);
        assert_eq!(conf_value(n)["volume_id"], *id);
        assert_eq!(conf_value(n)["keyring"], conf_value(&n1)["keyring"]);
        let mnt = d.mnt("mnt-again");
        let _m = mount_at(n, &mnt);
        assert_eq!(fs::read(mnt.join("wal.log")).unwrap(), data);
    }
    // Node 4 did not import: the file does not read (EIO, never garbage), and the log
    // names the missing version.
    let log = d.p("node4.log");
    let mnt4 = d.mnt("mnt4");
    {
        let _m = mount_logging(&n4, &mnt4, &log);
        let e = fs::read(mnt4.join("wal.log")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    }
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("key version 2"), "{text}");
    assert!(text.contains("earfs import-keyring"), "{text}");
}

/// An export of `backing`'s keyring without key version `drop` (as node 1 writes once
/// it has retired that version), made with the library.
fn export_without(backing: &Path, drop: u32, key: &Path, out: &Path) {
    use earfs::volume::{KeyringExport, VolumeConfig};
    let mut cfg = VolumeConfig::load(backing).unwrap();
    let prov = earfs::kms::LocalProvider::open(key).unwrap();
    let deks = cfg.unlock(backing, &prov).unwrap();
    cfg.keyring.keys.retain(|k| k.version != drop);
    let (_, current) = deks.current();
    fs::write(out, KeyringExport::of(&cfg, current).to_text()).unwrap();
}

#[test]
fn import_keyring_refuses_another_keyring_an_altered_file_and_a_version_still_in_use() {
    let d = Dir::new();
    let key = d.p("key");
    let n1 = d.p("node1");
    init_local(&key, &n1);
    let n2 = d.p("node2");
    ok(&["init", "--join", s(&n1.join("earfs.conf")), s(&n2)]);
    let conf2 = n2.join("earfs.conf");
    let before = fs::read(&conf2).unwrap();
    // Another keyring: exit 11, nothing written.
    let other = d.p("other");
    init_local(&key, &other);
    let (c, _, err) = earfs_out(&["import-keyring", s(&other.join("earfs.conf")), s(&n2)]);
    assert_eq!(c, 11, "{err}");
    assert!(
        err.contains("not imported") && err.contains("keyring"),
        "{err}"
    );
    // An altered export: exit 15, nothing written.
    let old_export = d.p("before-rotation.toml");
    ok(&["export-keyring", "-o", s(&old_export), s(&n1)]);
    ok(&["rotate", s(&n1)]);
    let export = d.p("ring.toml");
    ok(&["export-keyring", "-o", s(&export), s(&n1)]);
    let good = fs::read_to_string(&export).unwrap();
    let from = conf_value(&n1)["volume_id"].as_str().unwrap().to_string();
    let altered = d.p("altered.toml");
    fs::write(&altered, good.replace(&from, "someone-else")).unwrap();
    let (c, _, err) = earfs_out(&["import-keyring", s(&altered), s(&n2)]);
    assert_eq!(c, 15, "{err}");
    assert_eq!(fs::read(&conf2).unwrap(), before);
    // Node 2 holds a file under version 1; node 1 retires version 1.
    let mnt2 = d.mnt("mnt2");
    {
        let _m = mount_at(&n2, &mnt2);
        fs::write(mnt2.join("old"), b"under version 1").unwrap();
    }
    ok(&["import-keyring", s(&export), s(&n2)]);
    let retired = d.p("retired.toml");
    export_without(&n1, 1, &key, &retired);
    let conf = fs::read(&conf2).unwrap();
    for mounted in [false, true] {
        let _m = mounted.then(|| mount_at(&n2, &mnt2));
        let (c, _, err) = earfs_out(&["import-keyring", s(&retired), s(&n2)]);
        assert_eq!(c, 11, "mounted {mounted}: {err}");
        assert!(
            err.contains("1 file(s) still use key version 1"),
            "mounted {mounted}: {err}"
        );
        assert_eq!(fs::read(&conf2).unwrap(), conf);
    }
    // Once no file uses it, version 1 goes.
    fs::remove_file(n2.join("old")).unwrap();
    let out = ok(&["import-keyring", s(&retired), s(&n2)]);
    assert!(out.contains("dropped [1]"), "{out}");
    let versions: Vec<i64> = conf_value(&n2)["keyring"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["version"].as_integer().unwrap())
        .collect();
    assert_eq!(versions, [2]);
    // An export from before the rotation (current 1, without 2) would move the current
    // version back: refused, nothing written.
    let conf = fs::read(&conf2).unwrap();
    let (c, _, err) = earfs_out(&["import-keyring", s(&old_export), s(&n2)]);
    assert_eq!(c, 11, "{err}");
    assert!(err.contains("older export"), "{err}");
    assert_eq!(fs::read(&conf2).unwrap(), conf);
}

#[test]
fn import_keyring_moves_a_mounted_node_to_another_key_and_its_daemon_uses_it() {
    let d = Dir::new();
    let key = d.p("key");
    let n1 = d.p("node1");
    init_local(&key, &n1);
    let n2 = d.p("node2");
    ok(&["init", "--join", s(&n1.join("earfs.conf")), s(&n2)]);
    // The keyring recorded under another key reference (a copy of the key file stands
    // in for another KMS key: the daemon must open it and keep using it).
    let moved = d.p("moved-key");
    fs::copy(&key, &moved).unwrap();
    fs::set_permissions(&moved, fs::Permissions::from_mode(0o600)).unwrap();
    let export = d.p("moved.toml");
    {
        use earfs::volume::{KeyringExport, VolumeConfig};
        let mut cfg = VolumeConfig::load(&n1).unwrap();
        let prov = earfs::kms::LocalProvider::open(&key).unwrap();
        let deks = cfg.unlock(&n1, &prov).unwrap();
        cfg.kms = earfs::kms::ProviderSpec::Local {
            key_file: moved.clone(),
        };
        let current = deks.dek(1).unwrap();
        fs::write(&export, KeyringExport::of(&cfg, current).to_text()).unwrap();
    }
    // Unmounted, with this node's own key file for the new key: recorded with it.
    let n3 = d.p("node3");
    ok(&["init", "--join", s(&n1.join("earfs.conf")), s(&n3)]);
    let own = d.p("node3-key");
    fs::copy(&key, &own).unwrap();
    fs::set_permissions(&own, fs::Permissions::from_mode(0o600)).unwrap();
    let out = ok(&["import-keyring", "--key-file", s(&own), s(&export), s(&n3)]);
    assert!(out.contains("moved to this KMS key"), "{out}");
    assert_eq!(conf_value(&n3)["kms"]["key_file"].as_str(), Some(s(&own)));
    let out = ok(&["import-keyring", "--key-file", s(&own), s(&export), s(&n3)]);
    assert!(out.contains("nothing to do"), "{out}");
    let mnt2 = d.mnt("mnt2");
    let _m = mount_at(&n2, &mnt2);
    let out = ok(&["import-keyring", s(&export), s(&n2)]);
    assert!(out.contains("moved to this KMS key"), "{out}");
    assert_eq!(conf_value(&n2)["kms"]["key_file"].as_str(), Some(s(&moved)));
    let st: Value = serde_json::from_str(&ok(&["status", "--json", s(&mnt2)])).unwrap();
    assert_eq!(st["key"], s(&moved), "{st}");
    // The old key is gone: the daemon rotates with the new one.
    fs::remove_file(&key).unwrap();
    let out = ok(&["rotate", s(&n2)]);
    assert!(out.contains("version 2 is current"), "{out}");
    fs::write(mnt2.join("f"), b"under the moved key").unwrap();
    assert_eq!(header_key_version(&n2.join("f")), 2);
}

#[test]
fn gcp_import_keyring_after_a_rotation_on_another_node() {
    let g = Gcp::new();
    let node1 = g.dir.p("node1");
    let (c, _, err) = g.init(&g.key, &node1);
    assert_eq!(c, 0, "{err}");
    let export = g.dir.p("keyring.toml");
    ok(&["export-keyring", "-o", s(&export), s(&node1)]);
    let node2 = g.dir.p("node2");
    ok(&[
        "init",
        "--join",
        s(&export),
        "--credentials",
        s(&g.sa),
        s(&node2),
    ]);
    ok(&["rotate", s(&node1)]);
    ok(&["export-keyring", "-o", s(&export), s(&node1)]);
    let decrypts = g.fake.count_requests(":decrypt");
    let out = ok(&[
        "import-keyring",
        "--credentials",
        s(&g.sa),
        s(&export),
        s(&node2),
    ]);
    assert!(out.contains("current 2 (was 1); added [2]"), "{out}");
    // Node 2's own keyring (1 version) and the import (2) were unwrapped through the KMS.
    assert_eq!(g.fake.count_requests(":decrypt") - decrypts, 3);
    assert_eq!(conf_value(&node2)["keyring"], conf_value(&node1)["keyring"]);
    let (c, v) = check_json(&[s(&node2)]);
    assert_eq!(c, 0, "{v}");
    // Node 1's file, written under version 2, reads on node 2.
    let mnt1 = g.dir.mnt("mnt1");
    {
        let _m = mount_at(&node1, &mnt1);
        fs::write(mnt1.join("wal.log"), b"version 2 record").unwrap();
    }
    fs::copy(node1.join("wal.log"), node2.join("wal.log")).unwrap();
    let mnt2 = g.dir.mnt("mnt2");
    let _m = mount_at(&node2, &mnt2);
    assert_eq!(fs::read(mnt2.join("wal.log")).unwrap(), b"version 2 record");
}

// ---------------------------------------------------------------- rewrap

/// `earfs rewrap BACKING` with `flags` (a new key's, or none).
fn rewrap(backing: &Path, flags: &[String]) -> (i32, String, String) {
    let mut a = vec!["rewrap".to_string()];
    a.extend(flags.iter().cloned());
    a.push(s(backing).into());
    earfs_out(&strs(&a))
}

/// Mount `backing` and check that every `(name, data)` reads back; the mount is gone
/// when this returns.
fn reads_back(backing: &Path, mnt: &Path, files: &[(&str, &[u8])]) {
    let _m = mount_at(backing, mnt);
    for (name, data) in files {
        assert_eq!(&fs::read(mnt.join(name)).unwrap(), data, "{name}");
    }
}

/// The keyring of a volume's earfs.conf: id, current version and versions.
fn keyring_shape(backing: &Path) -> (String, i64, Vec<i64>) {
    let c = conf_value(backing);
    let r = &c["keyring"];
    (
        r["id"].as_str().unwrap().to_string(),
        r["current"].as_integer().unwrap(),
        r["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["version"].as_integer().unwrap())
            .collect(),
    )
}

#[test]
fn rewrap_moves_a_volume_local_to_aws_to_gcp_to_local_and_files_keep_reading() {
    let aws = Aws::new(false);
    let (arn, _) = aws_key(&aws.fake, "alias/rewrap");
    let g = Gcp::new();
    let b = aws.dir.p("vol");
    let mnt = aws.dir.mnt("mnt");
    let key1 = aws.dir.p("key1");
    ok(&["init", "--kms", "local", "--key-file", s(&key1), s(&b)]);
    {
        let _m = mount_at(&b, &mnt);
        fs::write(mnt.join("v1"), b"under version 1").unwrap();
    }
    ok(&["rotate", s(&b)]);
    {
        let _m = mount_at(&b, &mnt);
        fs::write(mnt.join("v2"), b"under version 2").unwrap();
    }
    let files: [(&str, &[u8]); 2] = [("v1", b"under version 1"), ("v2", b"under version 2")];
    let shape = keyring_shape(&b);
    assert_eq!((shape.1, shape.2.clone()), (2, vec![1, 2]));
    // local -> aws
    let (c, out, err) = rewrap(&b, &aws.flags(&arn));
    assert_eq!(c, 0, "{err}");
    assert!(
        out.contains("2 data key version(s) wrapped again under"),
        "{out}"
    );
    assert!(err.contains("rewrapped key version 2 (2 of 2)"), "{err}");
    assert_eq!(conf_value(&b)["kms"]["provider"].as_str(), Some("aws"));
    assert_eq!(
        conf_value(&b)["kms"]["key_arn"].as_str(),
        Some(arn.as_str())
    );
    assert_eq!(keyring_shape(&b), shape);
    // The local key is no longer needed.
    fs::rename(&key1, aws.dir.p("key1.gone")).unwrap();
    reads_back(&b, &mnt, &files);
    // aws -> gcp, then the AWS key is disabled.
    let (c, _, err) = rewrap(&b, &g.flags_with(&g.key, &g.sa));
    assert_eq!(c, 0, "{err}");
    assert_eq!(
        conf_value(&b)["kms"]["key_resource"].as_str(),
        Some(g.key.as_str())
    );
    aws.state(&arn, "Disabled");
    reads_back(&b, &mnt, &files);
    let (c, v) = check_json(&[s(&b)]);
    assert_eq!(c, 0, "{v}");
    // gcp -> local (a new key file, created), then the service account loses all.
    let key2 = aws.dir.p("key2");
    let (c, _, err) = rewrap(
        &b,
        &["--kms", "local", "--key-file", s(&key2)].map(String::from),
    );
    assert_eq!(c, 0, "{err}");
    assert!(err.contains("created key file"), "{err}");
    g.permissions(&[]);
    reads_back(&b, &mnt, &files);
    assert_eq!(keyring_shape(&b), shape);
    // Rewrapping under the same key again changes the wrappings, not the keys.
    let before = conf_value(&b)["keyring"].clone();
    let (c, out, err) = rewrap(&b, &[]);
    assert_eq!(c, 0, "{err}");
    assert!(!out.contains("no longer needs"), "{out}");
    assert_ne!(conf_value(&b)["keyring"], before);
    reads_back(&b, &mnt, &files);
}

#[test]
fn gcp_rewrap_after_a_new_primary_version_lets_the_old_version_be_disabled() {
    let g = Gcp::new();
    let b = g.dir.p("vol");
    let (c, _, err) = g.init(&g.key, &b);
    assert_eq!(c, 0, "{err}");
    let mnt = g.dir.mnt("mnt");
    write_and_read_back(&b, &mnt, "wal", b"a log record");
    let disable_v1 = |state: &str| {
        g.fake.post(
            "/__fake/crypto-keys/version-state",
            json!({ "name": g.key, "version": 1, "state": state }),
        );
    };
    g.fake
        .post("/__fake/crypto-keys/rotate", json!({ "name": g.key }));
    // Before a rewrap, the data keys are wrapped by version 1: disabling it stops a mount.
    disable_v1("DISABLED");
    let (c, _, err) = earfs_out(&["mount", s(&b), s(&mnt)]);
    assert_ne!(c, 0, "{err}");
    assert!(!is_mounted(&mnt));
    disable_v1("ENABLED");
    let (c, _, err) = rewrap(&b, &[]);
    assert_eq!(c, 0, "{err}");
    // Now they are wrapped by version 2, the primary: version 1 can go.
    disable_v1("DISABLED");
    reads_back(&b, &mnt, &[("wal", b"a log record")]);
    let (c, v) = check_json(&[s(&b)]);
    assert_eq!(c, 0, "{v}");
}

#[test]
fn aws_rewrap_within_a_key_and_to_another_key() {
    let aws = Aws::new(false);
    let (arn, _) = aws_key(&aws.fake, "alias/first");
    let (arn2, alias2) = aws_key(&aws.fake, "alias/second");
    let b = aws.dir.p("vol");
    let (c, _, err) = aws.init(&arn, &b);
    assert_eq!(c, 0, "{err}");
    let mnt = aws.dir.mnt("mnt");
    write_and_read_back(&b, &mnt, "f", b"data");
    let wrapped = conf_value(&b)["keyring"]["keys"][0]["wrapped"].clone();
    // After a rotation of the key material in KMS: the same key, wrapped again.
    let (c, _, err) = rewrap(&b, &[]);
    assert_eq!(c, 0, "{err}");
    assert_ne!(conf_value(&b)["keyring"]["keys"][0]["wrapped"], wrapped);
    assert_eq!(
        conf_value(&b)["kms"]["key_arn"].as_str(),
        Some(arn.as_str())
    );
    // To another key, named by its alias: the key ARN is what is recorded.
    let (c, out, err) = rewrap(&b, &aws.flags(&alias2));
    assert_eq!(c, 0, "{err}");
    assert!(out.contains(&format!("resolved to {arn2}")), "{out}");
    assert_eq!(
        conf_value(&b)["kms"]["key_arn"].as_str(),
        Some(arn2.as_str())
    );
    aws.state(&arn, "PendingDeletion");
    reads_back(&b, &mnt, &[("f", b"data")]);
    // A disabled key is refused by the validation, before anything changes.
    aws.state(&arn, "Enabled");
    aws.state(&arn2, "Enabled");
    let text = fs::read_to_string(b.join("earfs.conf")).unwrap();
    aws.state(&arn, "Disabled");
    let (c, _, err) = rewrap(&b, &aws.flags(&arn));
    assert_eq!(c, 25, "{err}");
    assert_eq!(fs::read_to_string(b.join("earfs.conf")).unwrap(), text);
}

#[test]
fn rewrap_names_each_missing_permission_of_either_key() {
    let aws = Aws::new(true);
    let (arn, _) = aws_key(&aws.fake, "alias/perm");
    let user = |name: &str, actions: &[&str]| aws.user(name, actions);
    let all = ALL_AWS;
    let without = |name: &str, missing: &str| {
        let actions: Vec<&str> = all.iter().copied().filter(|a| *a != missing).collect();
        user(name, &actions)
    };
    let admin = user("admin", &all);
    let g = Gcp::new();
    let b = g.dir.p("vol");
    let (c, _, err) = g.init(&g.key, &b);
    assert_eq!(c, 0, "{err}");
    let text = fs::read_to_string(b.join("earfs.conf")).unwrap();
    let unchanged = || assert_eq!(fs::read_to_string(b.join("earfs.conf")).unwrap(), text);
    // The old key (GCP): decrypt is what a rewrap needs of it.
    let gcp_without = |missing: &str| {
        let p: Vec<&str> = ALL_GCP.iter().copied().filter(|p| *p != missing).collect();
        g.permissions(&p);
    };
    gcp_without("cloudkms.cryptoKeyVersions.useToDecrypt");
    let (c, _, err) = rewrap(&b, &aws.flags_with(&arn, &admin));
    assert_eq!(c, 24, "{err}");
    assert!(
        err.contains("cloudkms.cryptoKeyVersions.useToDecrypt") && err.contains(&g.key),
        "{err}"
    );
    unchanged();
    let mut a = vec!["--new-key".to_string()];
    a.extend(aws.flags_with(&arn, &admin));
    a.push(s(&b).into());
    let (c, v) = check_json(&strs(&a));
    assert_eq!(c, 29, "{v}");
    assert_eq!(
        failed_checks(&v),
        ["cloudkms.cryptoKeyVersions.useToDecrypt"],
        "{v}"
    );
    g.permissions(&ALL_GCP);
    // The new key (AWS): each action it needs, named with the key.
    for missing in ["kms:DescribeKey", "kms:Encrypt", "kms:Decrypt"] {
        let creds = without(&format!("no-{}", &missing[4..]), missing);
        let (c, _, err) = rewrap(&b, &aws.flags_with(&arn, &creds));
        assert_eq!(c, 24, "{missing}: {err}");
        assert!(
            err.contains(&format!("grant {missing}")) && err.contains(&arn),
            "{missing}: {err}"
        );
        unchanged();
        let mut a = vec!["--new-key".to_string()];
        a.extend(aws.flags_with(&arn, &creds));
        a.push(s(&b).into());
        let (c, v) = check_json(&strs(&a));
        assert_eq!(c, 29, "{v}");
        let failed: Vec<String> = v["new_key"]["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["ok"] == false)
            .map(|c| c["permission"].as_str().unwrap().to_string())
            .collect();
        assert!(failed.contains(&missing.to_string()), "{v}");
    }
    // With every permission: both sides pass, and the rewrap goes through.
    let mut a = vec!["--new-key".to_string()];
    a.extend(aws.flags_with(&arn, &admin));
    a.push(s(&b).into());
    let (c, v) = check_json(&strs(&a));
    assert_eq!(c, 0, "{v}");
    let (c, _, err) = rewrap(&b, &aws.flags_with(&arn, &admin));
    assert_eq!(c, 0, "{err}");
    // And back to GCP: encrypt and cryptoKeys.get on the new key are named.
    let text = fs::read_to_string(b.join("earfs.conf")).unwrap();
    for missing in [
        "cloudkms.cryptoKeys.get",
        "cloudkms.cryptoKeyVersions.useToEncrypt",
    ] {
        gcp_without(missing);
        let (c, _, err) = rewrap(&b, &g.flags_with(&g.key, &g.sa));
        assert_eq!(c, 24, "{missing}: {err}");
        assert!(err.contains(missing) && err.contains(&g.key), "{err}");
        assert_eq!(fs::read_to_string(b.join("earfs.conf")).unwrap(), text);
    }
}

#[test]
fn rewrap_from_aws_to_gcp_under_a_database_workload_then_the_old_key_goes() {
    let aws = Aws::new(false);
    let (arn, _) = aws_key(&aws.fake, "alias/load");
    let g = Gcp::new();
    let b = aws.dir.p("vol");
    let (c, _, err) = aws.init(&arn, &b);
    assert_eq!(c, 0, "{err}");
    let mnt = aws.dir.mnt("mnt");
    let log = aws.dir.p("daemon.log");
    let (c, _, err) = earfs_out(&[
        "mount",
        "--recheck-interval",
        "1s",
        "--log-file",
        s(&log),
        s(&b),
        s(&mnt),
    ]);
    assert_eq!(c, 0, "{err}");
    let _m = MountGuard(mnt.clone());
    // Data written before, verified after the restart.
    let before = ["--name=before", "--rw=write", "--size=4m", "--fsync=16"];
    fio_ok(fio(&mnt, &before));
    // The workload: random writes, each verified a little later, fsync every 8.
    let load = fio(
        &mnt,
        &[
            "--name=load",
            "--rw=randwrite",
            "--direct=1",
            "--size=8m",
            "--numjobs=2",
            "--fsync=8",
            "--verify_backlog=32",
            "--time_based",
            "--runtime=8",
        ],
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (c, out, err) = rewrap(&b, &g.flags_with(&g.key, &g.sa));
    assert_eq!(c, 0, "{err}");
    assert!(out.contains("through the running daemon"), "{out}");
    // The old key goes at once; the daemon's periodic check uses the new one.
    aws.state(&arn, "Disabled");
    let disabled_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(wait_until(10, || {
        let st: Value = serde_json::from_str(&ok(&["status", "--json", s(&mnt)])).unwrap();
        st["last_cmk_check"]["at"].as_u64().unwrap_or(0) > disabled_at
    }));
    let st: Value = serde_json::from_str(&ok(&["status", "--json", s(&mnt)])).unwrap();
    assert_eq!(st["key"].as_str(), Some(g.key.as_str()), "{st}");
    assert_eq!(st["provider"], "gcp", "{st}");
    assert_eq!(st["last_cmk_check"]["ok"], true, "{st}");
    assert_eq!(st["revocation"]["state"], "ok", "{st}");
    fio_ok(load);
    // No request failed (lookups of names fio creates and xattr probes aside).
    let st: Value = serde_json::from_str(&ok(&["status", "--json", s(&mnt)])).unwrap();
    for op in st["ops"].as_array().unwrap() {
        if !["lookup", "getxattr"].contains(&op["op"].as_str().unwrap()) {
            assert_eq!(op["errors"], 0, "{op}");
        }
    }
    assert!(st["errors_by_errno"].get("EIO").is_none(), "{st}");
    // A restart unwraps through Cloud KMS alone; what was written verifies.
    drop(_m);
    assert!(!is_mounted(&mnt));
    let _m = mount_at(&b, &mnt);
    let mut verify = before.to_vec();
    verify.push("--verify_only");
    fio_ok(fio(&mnt, &verify));
    let (c, v) = check_json(&[s(&b)]);
    assert_eq!(c, 0, "{v}");
}

#[test]
fn aws_config_records_another_endpoint_only_once_it_answers_for_the_same_key() {
    let aws = Aws::new(false);
    let (arn, _) = aws_key(&aws.fake, "alias/nodeconf");
    let b = aws.dir.p("b");
    let (code, _, err) = aws.init(&arn, &b);
    assert_eq!(code, 0, "{err}");
    let conf = b.join("earfs.conf");
    let before = fs::read(&conf).unwrap();
    // An endpoint where nothing answers: refused (KMS unavailable), nothing written.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (code, _, err) = earfs_out(&[
        "config",
        "--kms-deadline",
        "2",
        "--set",
        &format!("kms.endpoint_url=http://127.0.0.1:{dead}"),
        s(&b),
    ]);
    assert_eq!(code, 26, "{err}");
    assert_eq!(fs::read(&conf).unwrap(), before);
    // The same server by another name answers for the same key: recorded.
    let by_name = aws.fake.url.replace("127.0.0.1", "localhost");
    let (code, text, err) = earfs_out(&[
        "config",
        "--set",
        &format!("kms.endpoint_url={by_name}"),
        "--set",
        "kms.profile=",
        s(&b),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains(&format!("-> {by_name}")), "{text}");
    let (code, json, _) = earfs_out(&["config", "--json", s(&b)]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["provider"], "aws");
    assert_eq!(v["key"], arn.as_str());
    assert_eq!(v["settings"]["kms.endpoint_url"], by_name.as_str());
    // It still unwraps and authenticates through the recorded settings.
    let (code, _, err) = earfs_out(&["kms-check", s(&b)]);
    assert_eq!(code, 0, "{err}");
}
