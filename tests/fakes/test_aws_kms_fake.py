#!/usr/bin/env python3
"""Self-test for tests/fakes/aws_kms_fake.py.

Run:  python3 tests/fakes/test_aws_kms_fake.py   (needs scripts/deps-kms.sh)

Starts the fake as a subprocess, once without and once with --iam-enforce, and
drives it with boto3 (retries disabled so request counts are exact) plus the
JSON control API.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import signal
import subprocess
import sys
import time
import unittest
import urllib.error
import urllib.request

import boto3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(HERE, "aws_kms_fake.py")
REGION = "us-east-1"
ACCOUNT = "123456789012"
# NB: botocore's retries "max_attempts" counts *retries* (max_attempts=1 means up to
# two attempts); "total_max_attempts" counts the initial attempt, so 1 = no retry.
NO_RETRY = Config(
    retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=30
)


class Fake:
    def __init__(self, *args: str):
        env = dict(os.environ)
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        self.proc = subprocess.Popen(
            [sys.executable, FAKE, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        deadline = time.monotonic() + 20
        line = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                line = self.proc.stdout.readline()
                break
            if self.proc.poll() is not None:
                break
        if not line.startswith(b"listening on http://127.0.0.1:"):
            self.proc.kill()
            err = self.proc.stderr.read().decode(errors="replace")
            raise RuntimeError(f"fake did not start: {line!r}\n{err}")
        self.url = line.decode().split("listening on ", 1)[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        # Drain stderr so the child never blocks on a full pipe.
        import threading

        self.stderr_lines: list[str] = []

        def drain():
            for raw in self.proc.stderr:
                self.stderr_lines.append(raw.decode(errors="replace"))

        self._drain = threading.Thread(target=drain, daemon=True)
        self._drain.start()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._drain.join(timeout=2)
        # Exactly one stdout line in total.
        rest = self.proc.stdout.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        if rest:
            raise AssertionError(f"unexpected extra stdout: {rest!r}")
        return rc

    def control(self, method: str, path: str, body=None, expect=200):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, out = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, out = e.code, e.read()
        if status != expect:
            raise AssertionError(f"{method} {path} -> {status} {out!r}")
        return json.loads(out)

    def client(self, key_id="AKIDDUMMY", secret="dummy"):
        return boto3.client(
            "kms",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=NO_RETRY,
        )

    def raw(self, op: str, body: dict, creds: Credentials):
        """SigV4-signed request with http.client: returns (status, headers, body)."""
        req = AWSRequest(
            method="POST",
            url=self.url + "/",
            data=json.dumps(body).encode(),
            headers={
                "X-Amz-Target": f"TrentService.{op}",
                "Content-Type": "application/x-amz-json-1.1",
            },
        )
        SigV4Auth(creds, "kms", REGION).add_auth(req)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", "/", body=req.body, headers=dict(req.headers.items()))
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


def err(e: ClientError):
    return e.response["Error"]["Code"], e.response["Error"].get("Message", ""), e.response[
        "ResponseMetadata"
    ]["HTTPStatusCode"]


class NoAuthTest(unittest.TestCase):
    fake: Fake

    @classmethod
    def setUpClass(cls):
        cls.fake = Fake()
        cls.kms = cls.fake.client()

    @classmethod
    def tearDownClass(cls):
        rc = cls.fake.stop()
        assert rc == 0, f"fake exited {rc}"

    def setUp(self):
        self.fake.control("POST", "/__fake/reset", {})

    def new_key(self, **kw):
        return self.fake.control("POST", "/__fake/keys", {"region": REGION, **kw})

    def assertKmsError(self, fn, code, status=400, msg_contains=None):
        with self.assertRaises(ClientError) as cm:
            fn()
        c, m, s = err(cm.exception)
        self.assertEqual((c, s), (code, status), m)
        if msg_contains is not None:
            self.assertIn(msg_contains, m)
        return m

    def test_create_key_and_describe(self):
        k = self.new_key(description="earfs root", aliases=["alias/earfs-desc"])
        self.assertEqual(k["arn"], f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{k['keyId']}")
        self.assertEqual(k["aliasArns"], [f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/earfs-desc"])
        for ident in (k["keyId"], k["arn"], "alias/earfs-desc", k["aliasArns"][0]):
            md = self.kms.describe_key(KeyId=ident)["KeyMetadata"]
            self.assertEqual(md["KeyId"], k["keyId"])
            self.assertEqual(md["Arn"], k["arn"])
            self.assertEqual(md["KeyState"], "Enabled")
            self.assertTrue(md["Enabled"])
            self.assertEqual(md["Description"], "earfs root")
            self.assertEqual(md["KeySpec"], "SYMMETRIC_DEFAULT")
        rsa = self.new_key(keySpec="RSA_2048", keyUsage="ENCRYPT_DECRYPT")
        md = self.kms.describe_key(KeyId=rsa["keyId"])["KeyMetadata"]
        self.assertEqual((md["KeySpec"], md["KeyUsage"]), ("RSA_2048", "ENCRYPT_DECRYPT"))
        # Duplicate alias is rejected by the control API.
        self.fake.control("POST", "/__fake/keys", {"aliases": ["alias/earfs-desc"]}, expect=400)

    def test_success_content_type(self):
        k = self.new_key()
        st, hdrs, body = self.fake.raw("DescribeKey", {"KeyId": k["keyId"]}, Credentials("a", "b"))
        self.assertEqual(st, 200)
        self.assertEqual(hdrs["content-type"], "application/x-amz-json-1.1")
        self.assertIn("x-amzn-requestid", hdrs)
        self.assertNotIn("status", hdrs)
        self.assertEqual(json.loads(body)["KeyMetadata"]["KeyId"], k["keyId"])

    def test_generate_and_decrypt(self):
        k = self.new_key(aliases=["alias/earfs-gd"])
        ctx = {"earfs:volume": "vol-1", "earfs:purpose": "root"}
        r = self.kms.generate_data_key_without_plaintext(
            KeyId=k["arn"], NumberOfBytes=64, EncryptionContext=ctx
        )
        self.assertEqual(r["KeyId"], k["arn"])
        blob = r["CiphertextBlob"]
        # moto's blob starts with the key id in ASCII (the fake relies on it).
        self.assertEqual(blob[:36], k["keyId"].encode())
        d = self.kms.decrypt(CiphertextBlob=blob, KeyId=k["arn"], EncryptionContext=ctx)
        self.assertEqual(len(d["Plaintext"]), 64)
        self.assertEqual(d["KeyId"], k["arn"])
        d2 = self.kms.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)
        self.assertEqual(d2["Plaintext"], d["Plaintext"])
        self.assertKmsError(
            lambda: self.kms.decrypt(
                CiphertextBlob=blob, KeyId=k["arn"], EncryptionContext={"earfs:volume": "vol-2"}
            ),
            "InvalidCiphertextException",
        )
        self.assertKmsError(
            lambda: self.kms.decrypt(CiphertextBlob=blob, KeyId=k["arn"]),
            "InvalidCiphertextException",
        )
        other = self.new_key()
        self.assertKmsError(
            lambda: self.kms.decrypt(CiphertextBlob=blob, KeyId=other["arn"], EncryptionContext=ctx),
            "IncorrectKeyException",
        )
        # Aliases (name and ARN) resolve for crypto ops.
        for ident in ("alias/earfs-gd", k["aliasArns"][0]):
            r = self.kms.generate_data_key(KeyId=ident, NumberOfBytes=32, EncryptionContext=ctx)
            self.assertEqual(r["KeyId"], k["arn"])
            self.assertEqual(
                self.kms.decrypt(CiphertextBlob=r["CiphertextBlob"], EncryptionContext=ctx)[
                    "Plaintext"
                ],
                r["Plaintext"],
            )

    def test_multi_region_key_roundtrip(self):
        k = self.new_key(multiRegion=True)
        self.assertTrue(k["keyId"].startswith("mrk-"))
        c = self.kms.encrypt(KeyId=k["arn"], Plaintext=b"secret")["CiphertextBlob"]
        self.assertEqual(self.kms.decrypt(CiphertextBlob=c)["Plaintext"], b"secret")
        self.fake.control("POST", "/__fake/key-state", {"keyId": k["arn"], "state": "Disabled"})
        self.assertKmsError(lambda: self.kms.decrypt(CiphertextBlob=c), "DisabledException")

    def test_list_aliases_by_key(self):
        k = self.new_key(aliases=["alias/earfs-la1", "alias/earfs-la2"])
        other = self.new_key(aliases=["alias/earfs-other"])
        names = {a["AliasName"]: a for a in self.kms.list_aliases(KeyId=k["keyId"])["Aliases"]}
        self.assertEqual(set(names), {"alias/earfs-la1", "alias/earfs-la2"})
        self.assertEqual(names["alias/earfs-la1"]["TargetKeyId"], k["keyId"])
        self.assertEqual(
            names["alias/earfs-la1"]["AliasArn"], f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/earfs-la1"
        )
        names = {a["AliasName"] for a in self.kms.list_aliases(KeyId=k["arn"])["Aliases"]}
        self.assertEqual(names, {"alias/earfs-la1", "alias/earfs-la2"})
        self.assertNotIn("alias/earfs-other", names)
        self.assertTrue(other["keyId"])

    def test_key_state_disabled(self):
        k = self.new_key(aliases=["alias/earfs-dis"])
        blob = self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x")["CiphertextBlob"]
        out = self.fake.control(
            "POST", "/__fake/key-state", {"keyId": "alias/earfs-dis", "state": "Disabled"}
        )
        self.assertEqual(out["keyId"], k["keyId"])
        want = f"{k['arn']} is disabled."
        for fn in (
            lambda: self.kms.generate_data_key_without_plaintext(KeyId=k["arn"], NumberOfBytes=64),
            lambda: self.kms.generate_data_key(KeyId="alias/earfs-dis", NumberOfBytes=32),
            lambda: self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x"),
            lambda: self.kms.decrypt(CiphertextBlob=blob),
            lambda: self.kms.decrypt(CiphertextBlob=blob, KeyId=k["arn"]),
        ):
            self.assertEqual(self.assertKmsError(fn, "DisabledException"), want)
        md = self.kms.describe_key(KeyId=k["keyId"])["KeyMetadata"]
        self.assertEqual((md["KeyState"], md["Enabled"]), ("Disabled", False))
        # Non-crypto ops still work.
        self.kms.list_aliases(KeyId=k["keyId"])
        self.fake.control("POST", "/__fake/reset", {})
        self.assertEqual(self.kms.decrypt(CiphertextBlob=blob)["Plaintext"], b"x")
        md = self.kms.describe_key(KeyId=k["keyId"])["KeyMetadata"]
        self.assertEqual((md["KeyState"], md["Enabled"]), ("Enabled", True))

    def test_key_state_pending_deletion_and_others(self):
        k = self.new_key()
        self.fake.control("POST", "/__fake/key-state", {"keyId": k["arn"], "state": "PendingDeletion"})
        m = self.assertKmsError(
            lambda: self.kms.generate_data_key_without_plaintext(KeyId=k["keyId"], NumberOfBytes=64),
            "KMSInvalidStateException",
        )
        self.assertEqual(m, f"{k['arn']} is pending deletion.")
        md = self.kms.describe_key(KeyId=k["keyId"])["KeyMetadata"]
        self.assertEqual((md["KeyState"], md["Enabled"]), ("PendingDeletion", False))
        self.assertIn("DeletionDate", md)
        self.fake.control("POST", "/__fake/key-state", {"keyId": k["keyId"], "state": "PendingImport"})
        m = self.assertKmsError(
            lambda: self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x"), "KMSInvalidStateException"
        )
        self.assertEqual(m, f"{k['arn']} is pending import.")
        md = self.kms.describe_key(KeyId=k["keyId"])["KeyMetadata"]
        self.assertNotIn("DeletionDate", md)
        self.fake.control("POST", "/__fake/key-state", {"keyId": k["keyId"], "state": "Unavailable"})
        m = self.assertKmsError(
            lambda: self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x"), "KeyUnavailableException", 500
        )
        self.assertEqual(m, f"{k['arn']} is unavailable.")
        self.fake.control("POST", "/__fake/key-state", {"keyId": k["keyId"], "state": "Enabled"})
        self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x")
        # Control API validation.
        self.fake.control("POST", "/__fake/key-state", {"keyId": k["keyId"], "state": "Bogus"}, 400)
        self.fake.control(
            "POST", "/__fake/key-state", {"keyId": "alias/none", "state": "Disabled"}, 404
        )

    def test_state_changes_through_proxy(self):
        k = self.new_key()
        self.kms.disable_key(KeyId=k["arn"])  # moto alone answers 500 KeyError here
        md = self.kms.describe_key(KeyId=k["keyId"])["KeyMetadata"]
        self.assertEqual((md["KeyState"], md["Enabled"]), ("Disabled", False))
        self.assertKmsError(
            lambda: self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x"), "DisabledException"
        )
        self.kms.enable_key(KeyId=k["arn"])
        self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x")
        r = self.kms.schedule_key_deletion(KeyId=k["arn"], PendingWindowInDays=7)
        self.assertEqual((r["KeyId"], r["KeyState"]), (k["arn"], "PendingDeletion"))
        self.assertIn("DeletionDate", r)
        self.assertKmsError(
            lambda: self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x"), "KMSInvalidStateException"
        )
        self.assertKmsError(lambda: self.kms.enable_key(KeyId=k["keyId"]), "KMSInvalidStateException")
        self.assertEqual(self.kms.cancel_key_deletion(KeyId=k["arn"])["KeyId"], k["arn"])
        md = self.kms.describe_key(KeyId=k["keyId"])["KeyMetadata"]
        self.assertEqual(md["KeyState"], "Disabled")
        self.assertKmsError(
            lambda: self.kms.cancel_key_deletion(KeyId=k["keyId"]), "KMSInvalidStateException"
        )
        self.kms.enable_key(KeyId=k["keyId"])
        self.assertKmsError(
            lambda: self.kms.schedule_key_deletion(KeyId=k["keyId"], PendingWindowInDays=3),
            "ValidationException",
        )
        self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x")
        # The control API and the proxy share the state.
        self.kms.disable_key(KeyId=k["keyId"])
        self.fake.control("POST", "/__fake/reset", {})
        self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x")

    def test_fault_throttle_count(self):
        k = self.new_key()
        blob = self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x")["CiphertextBlob"]
        self.fake.control(
            "POST",
            "/__fake/faults",
            {"op": "Decrypt", "count": 2, "status": 400, "errorType": "ThrottlingException",
             "message": "Rate exceeded"},
        )
        for _ in range(2):
            m = self.assertKmsError(
                lambda: self.kms.decrypt(CiphertextBlob=blob), "ThrottlingException"
            )
            self.assertEqual(m, "Rate exceeded")
        self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"y")  # other ops unaffected
        self.assertEqual(self.kms.decrypt(CiphertextBlob=blob)["Plaintext"], b"x")
        rules = self.fake.control("GET", "/__fake/faults")
        self.assertEqual(rules[0]["remaining"], 0)
        log = [r for r in self.fake.control("GET", "/__fake/requests") if r["op"] == "Decrypt"]
        self.assertEqual([(r["status"], r["fault"]) for r in log], [(400, True), (400, True), (200, False)])
        self.assertEqual([r["keyId"] for r in log], [k["keyId"]] * 3)

    def test_fault_5xx_raw_and_wildcard(self):
        k = self.new_key()
        self.fake.control(
            "POST", "/__fake/faults",
            {"op": "Encrypt", "count": 1, "status": 500, "errorType": "KMSInternalException",
             "message": "boom"},
        )
        self.fake.control(
            "POST", "/__fake/faults",
            {"op": "Encrypt", "count": 1, "status": 503, "errorType": "DependencyTimeoutException"},
        )
        self.fake.control("POST", "/__fake/faults", {"op": "Encrypt", "count": 1, "errorType": "raw"})
        self.assertKmsError(lambda: self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x"),
                            "KMSInternalException", 500, "boom")
        self.assertKmsError(lambda: self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x"),
                            "DependencyTimeoutException", 503)
        with self.assertRaises(ClientError) as cm:
            self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x")
        self.assertEqual(err(cm.exception)[2], 503)
        self.kms.encrypt(KeyId=k["keyId"], Plaintext=b"x")  # rules used up
        self.fake.control("POST", "/__fake/faults", {"op": "*", "count": -1, "errorType": "raw",
                                                     "status": 503, "message": "upstream down"})
        for op in ("DescribeKey", "Encrypt"):
            st, hdrs, body = self.fake.raw(op, {"KeyId": k["keyId"]}, Credentials("a", "b"))
            self.assertEqual((st, body), (503, b"upstream down"))
            self.assertNotIn("x-amzn-errortype", hdrs)
        self.fake.control("POST", "/__fake/reset", {})
        self.kms.describe_key(KeyId=k["keyId"])
        # Bad rules are rejected.
        self.fake.control("POST", "/__fake/faults", {"op": "Decrypt"}, expect=400)
        self.fake.control("POST", "/__fake/faults", {"op": "Decrypt", "errorType": "X", "count": -2}, 400)

    def test_fault_delay(self):
        k = self.new_key()
        self.fake.control("POST", "/__fake/faults", {"op": "DescribeKey", "count": 1, "delayMs": 400})
        t0 = time.monotonic()
        self.kms.describe_key(KeyId=k["keyId"])
        self.assertGreaterEqual(time.monotonic() - t0, 0.4)
        t0 = time.monotonic()
        self.kms.describe_key(KeyId=k["keyId"])
        self.assertLess(time.monotonic() - t0, 0.4)
        log = self.fake.control("GET", "/__fake/requests")
        self.assertEqual([(r["op"], r["faultKind"], r["status"]) for r in log],
                         [("DescribeKey", "delay", 200), ("DescribeKey", None, 200)])

    def test_request_log(self):
        k = self.new_key(aliases=["alias/earfs-log"])
        self.kms.describe_key(KeyId="alias/earfs-log")
        r = self.kms.generate_data_key_without_plaintext(KeyId=k["arn"], NumberOfBytes=64)
        self.kms.decrypt(CiphertextBlob=r["CiphertextBlob"])
        self.kms.list_aliases()
        with self.assertRaises(ClientError):
            self.kms.describe_key(KeyId="alias/does-not-exist")
        log = self.fake.control("GET", "/__fake/requests")
        self.assertEqual(
            [(e["op"], e["status"], e["fault"], e["keyId"]) for e in log],
            [
                ("DescribeKey", 200, False, k["keyId"]),
                ("GenerateDataKeyWithoutPlaintext", 200, False, k["keyId"]),
                ("Decrypt", 200, False, k["keyId"]),
                ("ListAliases", 200, False, None),
                ("DescribeKey", 400, False, None),
            ],
        )
        self.assertEqual(log[-1]["errorType"], "NotFoundException")
        self.fake.control("POST", "/__fake/reset", {})
        self.assertEqual(self.fake.control("GET", "/__fake/requests"), [])

    def test_control_api_errors(self):
        self.fake.control("GET", "/__fake/nope", expect=404)
        self.fake.control("POST", "/__fake/users", {"name": "bad name!"}, expect=400)
        self.fake.control(
            "POST", "/__fake/users",
            {"name": "scoped", "actions": ["kms:Decrypt"], "resource": "arn:aws:kms:*"}, expect=400,
        )
        h = self.fake.control("GET", "/__fake/health")
        self.assertEqual(h["iamEnforce"], False)


class IamEnforceTest(unittest.TestCase):
    fake: Fake

    @classmethod
    def setUpClass(cls):
        cls.fake = Fake("--iam-enforce")
        cls.key = cls.fake.control("POST", "/__fake/keys", {"aliases": ["alias/earfs-iam"]})
        node = cls.fake.control(
            "POST", "/__fake/users",
            {"name": "node1", "actions": ["kms:DescribeKey", "kms:GenerateDataKeyWithoutPlaintext",
                                          "kms:Decrypt"]},
        )
        cls.node_creds = Credentials(node["accessKeyId"], node["secretAccessKey"])
        cls.node = cls.fake.client(node["accessKeyId"], node["secretAccessKey"])
        admin = cls.fake.control(
            "POST", "/__fake/users", {"name": "admin", "actions": ["kms:*"], "resource": "*"}
        )
        cls.admin = cls.fake.client(admin["accessKeyId"], admin["secretAccessKey"])

    @classmethod
    def tearDownClass(cls):
        rc = cls.fake.stop()
        assert rc == 0, f"fake exited {rc}"

    def setUp(self):
        self.fake.control("POST", "/__fake/reset", {})

    def test_allowed_actions(self):
        k = self.key
        md = self.node.describe_key(KeyId="alias/earfs-iam")["KeyMetadata"]
        self.assertEqual(md["KeyId"], k["keyId"])
        ctx = {"earfs:volume": "v"}
        r = self.node.generate_data_key_without_plaintext(KeyId=k["arn"], NumberOfBytes=64,
                                                         EncryptionContext=ctx)
        d = self.node.decrypt(CiphertextBlob=r["CiphertextBlob"], KeyId=k["arn"], EncryptionContext=ctx)
        self.assertEqual(len(d["Plaintext"]), 64)

    def test_access_denied_names_action(self):
        with self.assertRaises(ClientError) as cm:
            self.node.list_aliases()
        code, msg, status = err(cm.exception)
        self.assertEqual((code, status), ("AccessDeniedException", 400))
        self.assertEqual(
            msg,
            f"User: arn:aws:iam::{ACCOUNT}:user/node1 is not authorized to perform: kms:ListAliases"
            " because no identity-based policy allows the kms:ListAliases action",
        )
        with self.assertRaises(ClientError) as cm:
            self.node.encrypt(KeyId=self.key["keyId"], Plaintext=b"x")
        self.assertIn("kms:Encrypt", err(cm.exception)[1])
        # Wire shape after the rewrite.
        st, hdrs, body = self.fake.raw("ListAliases", {}, self.node_creds)
        self.assertEqual(st, 400)
        self.assertEqual(hdrs["content-type"], "application/x-amz-json-1.1")
        self.assertEqual(hdrs["x-amzn-errortype"], "AccessDeniedException")
        self.assertIn("x-amzn-requestid", hdrs)
        self.assertEqual(json.loads(body)["__type"], "AccessDeniedException")
        log = self.fake.control("GET", "/__fake/requests")
        self.assertEqual([(e["op"], e["status"], e["errorType"]) for e in log][0],
                         ("ListAliases", 400, "AccessDeniedException"))

    def test_unknown_and_bad_credentials(self):
        bogus = self.fake.client("AKIAUNKNOWNUNKNOWN00", "nope")
        with self.assertRaises(ClientError) as cm:
            bogus.describe_key(KeyId=self.key["keyId"])
        self.assertEqual(err(cm.exception),
                         ("UnrecognizedClientException",
                          "The security token included in the request is invalid.", 400))
        wrong = self.fake.client(self.node_creds.access_key, "wrong-secret")
        with self.assertRaises(ClientError) as cm:
            wrong.describe_key(KeyId=self.key["keyId"])
        self.assertEqual(err(cm.exception)[0::2], ("InvalidSignatureException", 400))
        conn = http.client.HTTPConnection("127.0.0.1", self.fake.port, timeout=10)
        conn.request("POST", "/", body=b"{}", headers={"X-Amz-Target": "TrentService.ListKeys",
                                                      "Content-Type": "application/x-amz-json-1.1"})
        resp = conn.getresponse()
        self.assertEqual((resp.status, resp.getheader("x-amzn-ErrorType")),
                         (400, "MissingAuthenticationTokenException"))
        resp.read()
        conn.close()

    def test_key_state_with_auth(self):
        k = self.fake.control("POST", "/__fake/keys", {})
        blob = self.admin.encrypt(KeyId=k["keyId"], Plaintext=b"x")["CiphertextBlob"]
        # Signed DisableKey by ARN passes moto's signature check (body not rewritten).
        self.admin.disable_key(KeyId=k["arn"])
        with self.assertRaises(ClientError) as cm:
            self.node.decrypt(CiphertextBlob=blob)
        self.assertEqual(err(cm.exception)[0], "DisabledException")
        # Authorization is checked before the key state, as in KMS.
        with self.assertRaises(ClientError) as cm:
            self.node.encrypt(KeyId=k["keyId"], Plaintext=b"x")
        self.assertEqual(err(cm.exception)[0], "AccessDeniedException")
        md = self.node.describe_key(KeyId=k["arn"])["KeyMetadata"]
        self.assertEqual(md["KeyState"], "Disabled")
        self.admin.enable_key(KeyId=k["arn"])
        self.assertEqual(self.node.decrypt(CiphertextBlob=blob)["Plaintext"], b"x")

    def test_control_api_needs_no_auth(self):
        k = self.fake.control("POST", "/__fake/keys", {"description": "x"})
        self.fake.control("POST", "/__fake/key-state", {"keyId": k["keyId"], "state": "Disabled"})
        self.fake.control("POST", "/__fake/faults", {"op": "Decrypt", "errorType": "ThrottlingException"})
        self.assertEqual(self.fake.control("GET", "/__fake/health")["iamEnforce"], True)


if __name__ == "__main__":
    unittest.main(verbosity=2)
