//! The KMS test peers: moto behind a fault-injecting proxy (`tests/fakes/aws_kms_fake.py`)
//! and the Cloud KMS REST fake (`tests/fakes/gcp_kms_fake.py`), started on a free
//! loopback port and stopped on drop (or when this test process ends: they exit when
//! their standard input closes).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;

use serde_json::{Value, json};

/// A running fake KMS.
pub struct Fake {
    child: Child,
    _stdin: ChildStdin,
    pub url: String,
    addr: String,
}

fn fakes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fakes")
}

impl Fake {
    fn start(script: &str, args: &[&str]) -> Fake {
        let mut child = Command::new("python3")
            .arg(fakes_dir().join(script))
            .arg("--exit-on-stdin-eof")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the KMS fake (python3)");
        let stdin = child.stdin.take().expect("stdin");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the fake's address");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{script} did not start: {line:?}"))
            .to_string();
        let addr = url.trim_start_matches("http://").to_string();
        Fake {
            child,
            _stdin: stdin,
            url,
            addr,
        }
    }

    /// moto behind the fault proxy; `iam` makes moto enforce IAM identity policies.
    pub fn aws(iam: bool) -> Fake {
        Fake::start(
            "aws_kms_fake.py",
            if iam { &["--iam-enforce"] } else { &[] },
        )
    }

    /// The Cloud KMS REST fake.
    pub fn gcp() -> Fake {
        Fake::start("gcp_kms_fake.py", &[])
    }

    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut s = TcpStream::connect(&self.addr).expect("connect to the fake");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status: u16 = resp
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status");
        let text = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        (status, serde_json::from_str(text).unwrap_or(Value::Null))
    }

    /// POST to the control API; must succeed.
    pub fn post(&self, path: &str, body: Value) -> Value {
        let (status, v) = self.request("POST", path, Some(&body));
        assert!(status < 300, "POST {path} {body}: {status} {v}");
        v
    }

    /// GET from the control API.
    pub fn get(&self, path: &str) -> Value {
        self.request("GET", path, None).1
    }

    /// Requests the fake served whose op (AWS) or path (GCP) contains `what`.
    pub fn count_requests(&self, what: &str) -> usize {
        self.get("/__fake/requests")
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                r.get("op")
                    .or_else(|| r.get("path"))
                    .and_then(|v| v.as_str())
                    .is_some_and(|s| s.contains(what))
            })
            .count()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Write a file readable only by its owner.
pub fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// An AWS shared credentials file with one default profile.
pub fn aws_credentials_file(path: &Path, access_key: &str, secret: &str) {
    write_private(
        path,
        &format!("[default]\naws_access_key_id = {access_key}\naws_secret_access_key = {secret}\n"),
    );
}

/// The `earfs init`/`kms-check` flags for a key of `provider` ("aws" or "gcp") held by
/// `fake`, with a credentials file.
pub fn provider_flags(provider: &str, fake: &Fake, key: &str, creds: &Path) -> Vec<String> {
    let key_flag = match provider {
        "aws" => "--key-arn",
        "gcp" => "--key-resource",
        other => panic!("no provider {other}"),
    };
    [
        "--kms",
        provider,
        key_flag,
        key,
        "--endpoint-url",
        &fake.url,
        "--credentials",
        creds.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

/// An AWS key made through the fake's control API: `(key ARN, alias ARN)`.
pub fn aws_key(fake: &Fake, alias: &str) -> (String, String) {
    let v = fake.post("/__fake/keys", json!({ "aliases": [alias] }));
    (
        v["arn"].as_str().unwrap().to_string(),
        v["aliasArns"][0].as_str().unwrap().to_string(),
    )
}

/// A Cloud KMS key ring and key made through the fake's control API; returns the key name.
pub fn gcp_key(fake: &Fake, ring: &str, key: &str) -> String {
    let ring_name = format!("projects/p/locations/global/keyRings/{ring}");
    let (status, _) = fake.request(
        "POST",
        "/__fake/key-rings",
        Some(&json!({ "name": ring_name })),
    );
    assert!(status < 300 || status == 409, "key ring: {status}");
    let name = format!("{ring_name}/cryptoKeys/{key}");
    fake.post("/__fake/crypto-keys", json!({ "name": name }));
    name
}

/// A service account with `permissions`; its JSON key is written (mode 0600) to `path`.
pub fn gcp_service_account(fake: &Fake, email: &str, permissions: &[&str], path: &Path) {
    let v = fake.post(
        "/__fake/service-accounts",
        json!({ "email": email, "permissions": permissions }),
    );
    write_private(path, &v.to_string());
}

/// The provider the real-mount suite runs on: `EARFS_TEST_KMS` = local (default), aws
/// or gcp.
pub fn provider_under_test() -> String {
    std::env::var("EARFS_TEST_KMS").unwrap_or_else(|_| "local".into())
}

/// One fake and one key per test process, for the real-mount suite on a KMS provider.
struct SharedKms {
    _fake: Fake,
    _dir: tempfile::TempDir,
    init_args: Vec<String>,
}

static SHARED: OnceLock<SharedKms> = OnceLock::new();

fn shared(provider: &str) -> &'static SharedKms {
    SHARED.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("earfs-kms-")
            .tempdir()
            .unwrap();
        let creds = dir.path().join("credentials");
        let (fake, init_args) = match provider {
            "aws" => {
                let fake = Fake::aws(false);
                let (arn, _) = aws_key(&fake, "alias/earfs-suite");
                aws_credentials_file(&creds, "AKIDSUITE", "suite-secret");
                let args = provider_flags("aws", &fake, &arn, &creds);
                (fake, args)
            }
            "gcp" => {
                let fake = Fake::gcp();
                let name = gcp_key(&fake, "suite", "k");
                gcp_service_account(&fake, "suite@p.iam.gserviceaccount.com", &["*"], &creds);
                let args = provider_flags("gcp", &fake, &name, &creds);
                (fake, args)
            }
            other => panic!("EARFS_TEST_KMS={other}: expected local, aws or gcp"),
        };
        SharedKms {
            _fake: fake,
            _dir: dir,
            init_args,
        }
    })
}

/// `earfs init` arguments (before BACKING) for the provider under test, or None for local.
pub fn suite_init_args() -> Option<Vec<String>> {
    match provider_under_test().as_str() {
        "local" => None,
        p => Some(shared(p).init_args.clone()),
    }
}
