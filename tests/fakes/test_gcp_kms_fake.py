#!/usr/bin/env python3
"""Self-test for gcp_kms_fake.py: `python3 tests/fakes/test_gcp_kms_fake.py` (exit status != 0 on failure).

Starts the fake as a subprocess on a free port and drives it over HTTP with urllib, signing
self-signed JWTs the way google-cloud-auth does (RS256, kid = private_key_id, iss = sub = email,
scope = cloud-platform and an explicit `"aud": null`, iat = now - 10, exp = now + 3610).
"""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(HERE, "gcp_kms_fake.py")
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # leave no __pycache__ behind
import gcp_kms_fake  # noqa: E402  (only for the CRC32C unit check)

QUERY = "?%24alt=json%3Benum-encoding%3Dint"  # what google-cloud-kms-v1 appends
LOC = "projects/p/locations/global"
RING = f"{LOC}/keyRings/ring"
ALL_PERMS = ["cloudkms.keyRings.get", "cloudkms.cryptoKeys.get", "cloudkms.cryptoKeyVersions.useToEncrypt",
             "cloudkms.cryptoKeyVersions.useToDecrypt", "cloudkms.locations.generateRandomBytes"]


def crc32c_bitwise(data: bytes) -> int:
    """Independent (table-less) CRC32C, to cross-check the fake's table implementation."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(key_file, private_key=None, **overrides):
    """Builds the JWT exactly like google-cloud-auth's ServiceAccountTokenGenerator; overrides tweak it."""
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "kid": key_file["private_key_id"]}
    claims = {"iss": key_file["client_email"], "scope": "https://www.googleapis.com/auth/cloud-platform",
              "aud": None, "exp": now + 3610, "iat": now - 10, "sub": key_file["client_email"]}
    for k, v in overrides.items():
        target = header if k in ("alg", "kid") else claims
        if v is ...:
            target.pop(k, None)
        else:
            target[k] = v
    if private_key is None:
        private_key = serialization.load_pem_private_key(key_file["private_key"].encode(), None)
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    sig = private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(sig)}"


class FakeKmsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.stderr = tempfile.TemporaryFile()
        cls.proc = subprocess.Popen([sys.executable, FAKE, "--port", "0"], stdout=subprocess.PIPE,
                                    stderr=cls.stderr, text=True)
        line = cls.proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:"), line
        cls.base = line[len("listening on "):]
        cls.sa = cls.ctl("/__fake/service-accounts", {"email": "node@p.iam.gserviceaccount.com",
                                                      "permissions": ALL_PERMS})
        cls.token = make_jwt(cls.sa)
        cls.ctl("/__fake/key-rings", {"name": RING})

    @classmethod
    def tearDownClass(cls):
        cls.proc.send_signal(signal.SIGTERM)
        rc = cls.proc.wait(timeout=5)
        cls.proc.stdout.close()
        cls.stderr.seek(0)
        log = cls.stderr.read().decode()
        cls.stderr.close()
        assert rc == 0, f"fake exited with {rc}; stderr:\n{log}"
        assert "PRIVATE KEY" not in log and "Bearer" not in log, "key material logged"

    def setUp(self):
        self.ctl("/__fake/reset-faults", {})

    # ---- helpers
    @classmethod
    def http(cls, method, path, body=None, token=None, query=QUERY):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(cls.base + path + query, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        req.add_header("x-goog-api-client", "gl-rust/1.85 gax/1.0 gccl/1.16")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read()), r.headers
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), e.headers

    @classmethod
    def ctl(cls, path, body=None, method="POST"):
        status, obj, _ = cls.http(method, path, body, query="")
        assert status == 200, (path, status, obj)
        return obj

    def api(self, method, path, body=None, token=None):
        return self.http(method, path, body, token or self.token)

    def assertError(self, resp, code, grpc, contains=""):
        status, obj, _ = resp
        self.assertEqual(status, code, obj)
        self.assertEqual(set(obj), {"error"})
        self.assertEqual(obj["error"]["code"], code)
        self.assertEqual(obj["error"]["status"], grpc)
        self.assertIn(contains, obj["error"]["message"])

    def new_key(self, kid, **extra):
        name = f"{RING}/cryptoKeys/{kid}"
        self.ctl("/__fake/crypto-keys", {"name": name, **extra})
        return name

    def encrypt(self, key, pt, aad=None, **extra):
        body = {"plaintext": base64.b64encode(pt).decode(), **extra}
        if aad is not None:
            body["additionalAuthenticatedData"] = base64.b64encode(aad).decode()
        return self.api("POST", f"/v1/{key}:encrypt", body)

    def decrypt(self, key, ct_b64, aad=None, **extra):
        body = {"ciphertext": ct_b64, **extra}
        if aad is not None:
            body["additionalAuthenticatedData"] = base64.b64encode(aad).decode()
        return self.api("POST", f"/v1/{key}:decrypt", body)

    # ---- tests
    def test_crc32c(self):
        self.assertEqual(gcp_kms_fake.crc32c(b"123456789"), 0xE3069283)
        self.assertEqual(crc32c_bitwise(b"123456789"), 0xE3069283)
        blob = os.urandom(1000)
        self.assertEqual(gcp_kms_fake.crc32c(blob), crc32c_bitwise(blob))

    def test_service_account_key_file(self):
        sa = self.sa
        for field in ("type", "project_id", "private_key_id", "private_key", "client_email", "client_id",
                      "auth_uri", "token_uri", "auth_provider_x509_cert_url", "client_x509_cert_url"):
            self.assertTrue(sa[field], field)
        self.assertEqual(sa["type"], "service_account")
        self.assertEqual(sa["project_id"], "p")
        self.assertEqual(sa["universe_domain"], "googleapis.com")
        self.assertRegex(sa["private_key_id"], r"^[0-9a-f]{40}$")
        self.assertTrue(sa["private_key"].startswith("-----BEGIN PRIVATE KEY-----"))  # PKCS#8
        key = serialization.load_pem_private_key(sa["private_key"].encode(), None)
        self.assertEqual(key.key_size, 2048)
        self.assertEqual(sa["token_uri"], self.base + "/token")

    def test_auth_failures(self):
        url = f"/v1/{RING}"
        self.assertError(self.http("GET", url), 401, "UNAUTHENTICATED", "missing required authentication")
        self.assertError(self.api("GET", url, token="not-a-jwt"), 401, "UNAUTHENTICATED", "not a JWT")
        rogue = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cases = [(make_jwt(self.sa, private_key=rogue), "JWT signature does not verify"),
                 (make_jwt(self.sa, kid="0" * 40), "kid"),
                 (make_jwt(self.sa, alg="HS256"), "algorithm"),
                 (make_jwt(self.sa, exp=int(time.time()) - 1), "expired"),
                 (make_jwt(self.sa, iat=int(time.time()) + 120), "future"),
                 (make_jwt(self.sa, sub="other@p.iam.gserviceaccount.com"), "iss and sub"),
                 (make_jwt(self.sa, iss=...), "iss and sub"),
                 (make_jwt(self.sa, scope="https://www.googleapis.com/auth/devstorage.read_only"), "scope"),
                 (make_jwt(self.sa, aud="https://pubsub.googleapis.com/", scope=...), "audience")]
        for token, why in cases:
            status, obj, headers = self.api("GET", url, token=token)
            self.assertError((status, obj, headers), 401, "UNAUTHENTICATED", why)
            self.assertIn("invalid authentication credentials", obj["error"]["message"])
            self.assertIn("WWW-Authenticate", headers)
        # accepted forms: default scope with aud null (as the Rust client sends), audience-only, multi-scope
        for token in (self.token, make_jwt(self.sa, aud="https://cloudkms.googleapis.com/", scope=...),
                      make_jwt(self.sa, scope="openid https://www.googleapis.com/auth/cloud-platform")):
            self.assertEqual(self.api("GET", url, token=token)[0], 200)

    def test_get_key_ring(self):
        status, obj, headers = self.api("GET", f"/v1/{RING}")
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("application/json"))
        self.assertEqual(obj["name"], RING)
        self.assertRegex(obj["createTime"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
        self.assertError(self.api("GET", f"/v1/{LOC}/keyRings/nope"), 404, "NOT_FOUND",
                         f"KeyRing {LOC}/keyRings/nope not found.")
        self.assertError(self.api("GET", "/v1/projects/p/nonsense"), 404, "NOT_FOUND")
        self.assertError(self.api("POST", f"/v1/{RING}:frobnicate", {}), 404, "NOT_FOUND")

    def test_get_crypto_key(self):
        key = self.new_key("getme", rotationPeriod="7776000s")
        status, obj, _ = self.api("GET", f"/v1/{key}")
        self.assertEqual(status, 200, obj)
        self.assertEqual(obj["name"], key)
        self.assertEqual(obj["purpose"], "ENCRYPT_DECRYPT")
        self.assertEqual(obj["versionTemplate"], {"protectionLevel": "HSM", "algorithm": "GOOGLE_SYMMETRIC_ENCRYPTION"})
        self.assertEqual(obj["rotationPeriod"], "7776000s")
        self.assertIn("nextRotationTime", obj)
        p = obj["primary"]
        self.assertEqual((p["name"], p["state"], p["protectionLevel"], p["algorithm"]),
                         (key + "/cryptoKeyVersions/1", "ENABLED", "HSM", "GOOGLE_SYMMETRIC_ENCRYPTION"))
        self.assertIn("createTime", p)
        # disabled primary is still reported, with its state
        self.ctl("/__fake/crypto-keys/version-state", {"name": key, "state": "DISABLED"})
        self.assertEqual(self.api("GET", f"/v1/{key}")[1]["primary"]["state"], "DISABLED")
        # software key without rotation; signing key has no primary
        soft = self.new_key("soft", protectionLevel="SOFTWARE")
        obj = self.api("GET", f"/v1/{soft}")[1]
        self.assertEqual(obj["primary"]["protectionLevel"], "SOFTWARE")
        self.assertNotIn("rotationPeriod", obj)
        sign = self.new_key("signer", purpose="ASYMMETRIC_SIGN")
        obj = self.api("GET", f"/v1/{sign}")[1]
        self.assertEqual(obj["purpose"], "ASYMMETRIC_SIGN")
        self.assertNotIn("primary", obj)
        self.assertError(self.api("GET", f"/v1/{RING}/cryptoKeys/nope"), 404, "NOT_FOUND",
                         f"CryptoKey {RING}/cryptoKeys/nope not found.")

    def test_encrypt_decrypt_roundtrip(self):
        key = self.new_key("rt")
        pt, aad = os.urandom(64), b"node-7/volume"
        status, enc, _ = self.encrypt(key, pt, aad, plaintextCrc32c=str(crc32c_bitwise(pt)),
                                      additionalAuthenticatedDataCrc32c=crc32c_bitwise(aad))  # number also accepted
        self.assertEqual(status, 200, enc)
        self.assertEqual(enc["name"], key + "/cryptoKeyVersions/1")
        self.assertTrue(enc["verifiedPlaintextCrc32c"])
        self.assertTrue(enc["verifiedAdditionalAuthenticatedDataCrc32c"])
        self.assertEqual(enc["protectionLevel"], "HSM")
        ct = base64.b64decode(enc["ciphertext"])
        self.assertIsInstance(enc["ciphertextCrc32c"], str)
        self.assertEqual(int(enc["ciphertextCrc32c"]), crc32c_bitwise(ct))
        status, dec, _ = self.decrypt(key, enc["ciphertext"], aad, ciphertextCrc32c=enc["ciphertextCrc32c"])
        self.assertEqual(status, 200, dec)
        self.assertEqual(base64.b64decode(dec["plaintext"]), pt)
        self.assertEqual(dec["plaintextCrc32c"], str(crc32c_bitwise(pt)))
        self.assertTrue(dec["usedPrimary"])
        self.assertEqual(dec["protectionLevel"], "HSM")
        # without checksums the verified flags are false
        status, enc2, _ = self.encrypt(key, pt)
        self.assertFalse(enc2["verifiedPlaintextCrc32c"])
        self.assertFalse(enc2["verifiedAdditionalAuthenticatedDataCrc32c"])
        self.assertNotEqual(enc2["ciphertext"], enc["ciphertext"])  # fresh nonce
        # explicit version path
        status, enc3, _ = self.api("POST", f"/v1/{key}/cryptoKeyVersions/1:encrypt",
                                   {"plaintext": base64.b64encode(pt).decode()})
        self.assertEqual((status, enc3["name"]), (200, key + "/cryptoKeyVersions/1"))
        self.assertEqual(base64.b64decode(self.decrypt(key, enc3["ciphertext"])[1]["plaintext"]), pt)

    def test_encrypt_decrypt_errors(self):
        key, other = self.new_key("errs"), self.new_key("errs-other")
        pt, aad = b"secret", b"aad"
        self.assertError(self.encrypt(key, pt, plaintextCrc32c="1"), 400, "INVALID_ARGUMENT",
                         "The checksum in field plaintext_crc32c did not match the data in field plaintext.")
        self.assertError(self.encrypt(key, pt, aad, additionalAuthenticatedDataCrc32c="1"), 400, "INVALID_ARGUMENT",
                         "additional_authenticated_data_crc32c did not match")
        self.assertError(self.encrypt(key, os.urandom(64 * 1024 + 1)), 400, "INVALID_ARGUMENT")
        self.assertEqual(self.encrypt(key, os.urandom(64 * 1024))[0], 200)
        enc = self.encrypt(key, pt, aad)[1]
        self.assertError(self.decrypt(key, enc["ciphertext"], ciphertextCrc32c="12"), 400, "INVALID_ARGUMENT",
                         "ciphertext_crc32c did not match")
        invalid = "Decryption failed: the ciphertext is invalid."
        self.assertError(self.decrypt(key, enc["ciphertext"], b"wrong"), 400, "INVALID_ARGUMENT", invalid)
        self.assertError(self.decrypt(key, enc["ciphertext"]), 400, "INVALID_ARGUMENT", invalid)
        self.assertError(self.decrypt(other, enc["ciphertext"], aad), 400, "INVALID_ARGUMENT", invalid)
        self.assertError(self.decrypt(key, base64.b64encode(os.urandom(80)).decode()), 400, "INVALID_ARGUMENT", invalid)
        self.assertError(self.decrypt(key, "!!!not base64!!!"), 400, "INVALID_ARGUMENT", "Base64")
        sign = self.new_key("errs-sign", purpose="ASYMMETRIC_SIGN")
        self.assertError(self.encrypt(sign, pt), 400, "FAILED_PRECONDITION")
        self.assertError(self.encrypt(f"{RING}/cryptoKeys/missing", pt), 404, "NOT_FOUND", "CryptoKey")
        status, obj, _ = self.http("POST", f"/v1/{key}:encrypt", None, self.token)  # empty body
        self.assertError((status, obj, None), 400, "INVALID_ARGUMENT")

    def test_rotation_and_version_states(self):
        key = self.new_key("rot")
        old = self.encrypt(key, b"v1 data")[1]
        rotated = self.ctl("/__fake/crypto-keys/rotate", {"name": key})
        self.assertEqual(rotated["primary"]["name"], key + "/cryptoKeyVersions/2")
        new = self.encrypt(key, b"v2 data")[1]
        self.assertEqual(new["name"], key + "/cryptoKeyVersions/2")
        dec = self.decrypt(key, old["ciphertext"])[1]
        self.assertEqual((base64.b64decode(dec["plaintext"]), dec["usedPrimary"]), (b"v1 data", False))
        self.assertTrue(self.decrypt(key, new["ciphertext"])[1]["usedPrimary"])
        for state in ("DISABLED", "DESTROY_SCHEDULED", "DESTROYED"):
            self.ctl("/__fake/crypto-keys/version-state", {"name": key, "version": 1, "state": state})
            self.assertError(self.decrypt(key, old["ciphertext"]), 400, "FAILED_PRECONDITION",
                             f"{key}/cryptoKeyVersions/1 is not enabled, current state is: {state}.")
        self.assertEqual(self.decrypt(key, new["ciphertext"])[0], 200)
        # primary disabled -> encrypt fails, then re-enable
        self.ctl("/__fake/crypto-keys/version-state", {"name": key, "state": "DISABLED"})
        self.assertError(self.encrypt(key, b"x"), 400, "FAILED_PRECONDITION",
                         f"{key}/cryptoKeyVersions/2 is not enabled, current state is: DISABLED.")
        self.ctl("/__fake/crypto-keys/version-state", {"name": key, "version": 2, "state": "ENABLED"})
        self.assertEqual(self.encrypt(key, b"x")[0], 200)

    def test_generate_random_bytes(self):
        url = f"/v1/{LOC}:generateRandomBytes"
        for body in ({"lengthBytes": 32, "protectionLevel": "HSM"}, {"lengthBytes": "1024", "protectionLevel": 2},
                     {"lengthBytes": 8, "protectionLevel": 1}):
            status, obj, _ = self.api("POST", url, body)
            self.assertEqual(status, 200, obj)
            data = base64.b64decode(obj["data"])
            self.assertEqual(len(data), int(body["lengthBytes"]))
            self.assertEqual(obj["dataCrc32c"], str(crc32c_bitwise(data)))
        self.assertError(self.api("POST", url, {"lengthBytes": 7, "protectionLevel": "HSM"}), 400, "INVALID_ARGUMENT")
        self.assertError(self.api("POST", url, {"lengthBytes": 1025, "protectionLevel": 2}), 400, "INVALID_ARGUMENT")
        self.assertError(self.api("POST", url, {"lengthBytes": 32, "protectionLevel": 0}), 400, "INVALID_ARGUMENT")
        self.assertError(self.api("POST", url, {"lengthBytes": 32}), 400, "INVALID_ARGUMENT")

    def test_permissions(self):
        key = self.new_key("perm")
        sa = self.ctl("/__fake/service-accounts", {"email": "weak@p.iam.gserviceaccount.com",
                                                   "permissions": ["cloudkms.cryptoKeyVersions.useToEncrypt"]})
        tok = make_jwt(sa)
        self.assertEqual(self.api("POST", f"/v1/{key}:encrypt", {"plaintext": "AAAA"}, tok)[0], 200)
        denied = [("GET", f"/v1/{RING}", "cloudkms.keyRings.get", RING),
                  ("GET", f"/v1/{key}", "cloudkms.cryptoKeys.get", key),
                  ("POST", f"/v1/{key}:decrypt", "cloudkms.cryptoKeyVersions.useToDecrypt", key),
                  ("POST", f"/v1/{LOC}:generateRandomBytes", "cloudkms.locations.generateRandomBytes", LOC),
                  # permission is checked before existence
                  ("GET", f"/v1/{LOC}/keyRings/ghost", "cloudkms.keyRings.get", f"{LOC}/keyRings/ghost")]
        for method, path, perm, res in denied:
            self.assertError(self.api(method, path, {"ciphertext": "AAAA", "lengthBytes": 8} if method == "POST"
                                      else None, tok), 403, "PERMISSION_DENIED",
                             f"Permission '{perm}' denied on resource '{res}' (or it may not exist).")
        # revoke at runtime
        self.ctl("/__fake/permissions", {"email": sa["client_email"], "permissions": []})
        self.assertError(self.api("POST", f"/v1/{key}:encrypt", {"plaintext": "AAAA"}, tok), 403, "PERMISSION_DENIED")
        # resource-scoped grants
        self.ctl("/__fake/permissions", {"email": sa["client_email"],
                                         "permissions": [f"cloudkms.cryptoKeys.get@{RING}"]})
        self.assertEqual(self.api("GET", f"/v1/{key}", token=tok)[0], 200)
        self.assertEqual(self.api("GET", f"/v1/{LOC}/keyRings/elsewhere/cryptoKeys/k", token=tok)[0], 403)
        # re-issuing the account: new key, old key still accepted, permissions replaced
        sa2 = self.ctl("/__fake/service-accounts", {"email": sa["client_email"], "permissions": ["*"]})
        self.assertNotEqual(sa2["private_key_id"], sa["private_key_id"])
        self.assertEqual(self.api("GET", f"/v1/{RING}", token=tok)[0], 200)
        self.assertEqual(self.api("GET", f"/v1/{RING}", token=make_jwt(sa2))[0], 200)

    def test_faults(self):
        key = self.new_key("faulty")
        enc = self.encrypt(key, b"hello")[1]
        self.ctl("/__fake/faults", {"match": ":decrypt", "status": 503, "grpcStatus": "UNAVAILABLE",
                                    "message": "The service is currently unavailable.", "count": 2})
        for _ in range(2):
            self.assertError(self.decrypt(key, enc["ciphertext"]), 503, "UNAVAILABLE", "currently unavailable")
        self.assertEqual(self.decrypt(key, enc["ciphertext"])[0], 200)
        # 429 carries Retry-After
        self.ctl("/__fake/faults", {"match": ":encrypt", "status": 429, "count": 1})
        status, obj, headers = self.encrypt(key, b"x")
        self.assertError((status, obj, headers), 429, "RESOURCE_EXHAUSTED")
        self.assertEqual(headers["Retry-After"], "1")
        # rules are consumed in order; -1 persists until reset
        self.ctl("/__fake/faults", {"match": f"/v1/{RING}", "status": 500, "count": 1})
        self.ctl("/__fake/faults", {"match": f"/v1/{RING}", "status": 504, "count": -1})
        self.assertEqual(self.api("GET", f"/v1/{RING}")[0], 500)
        for _ in range(3):
            self.assertError(self.api("GET", f"/v1/{RING}"), 504, "DEADLINE_EXCEEDED")
        # 401 takes precedence; faults apply before permission checks
        self.assertEqual(self.http("GET", f"/v1/{RING}")[0], 401)
        weak = self.ctl("/__fake/service-accounts", {"email": "nothing@p.iam.gserviceaccount.com", "permissions": []})
        self.assertEqual(self.api("GET", f"/v1/{RING}", token=make_jwt(weak))[0], 504)
        self.ctl("/__fake/reset-faults", {})
        self.assertEqual(self.api("GET", f"/v1/{RING}")[0], 200)
        # delay, then normal answer
        self.ctl("/__fake/faults", {"match": f"/v1/{RING}", "delayMs": 300})
        t0 = time.monotonic()
        self.assertEqual(self.api("GET", f"/v1/{RING}")[0], 200)
        self.assertGreaterEqual(time.monotonic() - t0, 0.3)
        # corrupted checksums
        self.ctl("/__fake/faults", {"match": ":", "corruptCrc": True, "count": 3})
        e = self.encrypt(key, b"data")[1]
        self.assertNotEqual(int(e["ciphertextCrc32c"]), crc32c_bitwise(base64.b64decode(e["ciphertext"])))
        d = self.decrypt(key, e["ciphertext"])[1]
        self.assertNotEqual(int(d["plaintextCrc32c"]), crc32c_bitwise(b"data"))
        r = self.api("POST", f"/v1/{LOC}:generateRandomBytes", {"lengthBytes": 16, "protectionLevel": "HSM"})[1]
        self.assertNotEqual(int(r["dataCrc32c"]), crc32c_bitwise(base64.b64decode(r["data"])))
        d = self.decrypt(key, e["ciphertext"])[1]  # rule used up
        self.assertEqual(int(d["plaintextCrc32c"]), crc32c_bitwise(b"data"))
        # dropped connection
        self.ctl("/__fake/faults", {"match": ":encrypt", "dropConnection": True})
        with self.assertRaises((urllib.error.URLError, ConnectionError, OSError)):
            self.encrypt(key, b"x")
        self.assertEqual(self.encrypt(key, b"x")[0], 200)

    def test_request_log(self):
        self.ctl("/__fake/reset-requests", {})
        self.api("GET", f"/v1/{RING}")
        self.http("GET", f"/v1/{RING}")
        self.ctl("/__fake/faults", {"match": "zzz", "status": 500})
        log = self.ctl("/__fake/requests", method="GET")
        self.assertEqual(log, [
            {"method": "GET", "path": f"/v1/{RING}", "email": self.sa["client_email"], "status": 200},
            {"method": "GET", "path": f"/v1/{RING}", "email": None, "status": 401}])

    def test_malformed_http(self):
        # raw socket: bogus Content-Length must produce a JSON error, not a dropped connection
        host, port = self.base[len("http://"):].split(":")
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"POST /__fake/key-rings HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
            chunks = []
            while True:  # the fake closes the connection after an internal error
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            resp = b"".join(chunks).decode()
        self.assertIn("Connection: close", resp)
        self.assertTrue(resp.startswith("HTTP/1.1 500"), resp)
        self.assertIn('"status": "INTERNAL"', resp)


if __name__ == "__main__":
    unittest.main(verbosity=2)
