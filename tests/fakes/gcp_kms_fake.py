#!/usr/bin/env python3
"""Local fake of the Google Cloud KMS REST API (v1) for earfs tests.

Models what the Rust crates `google-cloud-kms-v1` + `google-cloud-auth` send:
HTTP/1.1 JSON requests such as `POST /v1/{cryptoKey}:encrypt?%24alt=json%3Benum-encoding%3Dint`
authenticated by a self-signed service-account JWT (AIP-4111) in `Authorization: Bearer`.

Usage:  python3 gcp_kms_fake.py [--host 127.0.0.1] [--port 0]
Prints exactly one line `listening on http://HOST:PORT` on stdout, serves until SIGTERM/SIGINT
(exit 0), logs one line per request on stderr (`[gcp-kms-fake] METHOD PATH STATUS EMAIL`) - never key
material.

Control API (no auth, JSON in/out, prefix /__fake/) - see the handlers `_ctl_*` below:
  POST /__fake/service-accounts       {"email", "permissions": [...], "project_id"?} -> key file JSON
  POST /__fake/permissions            {"email", "permissions": [...]}
  POST /__fake/key-rings              {"name"}
  POST /__fake/crypto-keys            {"name", "purpose"?, "protectionLevel"?, "rotationPeriod"?, "algorithm"?}
  POST /__fake/crypto-keys/rotate     {"name"}
  POST /__fake/crypto-keys/version-state {"name", "version"?, "state"}
  POST /__fake/faults                 {"match", "status"?, "grpcStatus"?, "message"?, "count"?, "delayMs"?,
                                       "corruptCrc"?, "dropConnection"?}
  POST /__fake/reset-faults, GET /__fake/faults, GET /__fake/requests, POST /__fake/reset-requests
Permission entries: "cloudkms.x.y" (any resource), "cloudkms.x.y@<resource name prefix>" (scoped), "*" (all).
"""

import argparse
import base64
import binascii
import datetime
import ipaddress
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# ----------------------------------------------------------------------------- CRC32C
# Castagnoli CRC (reflected polynomial 0x82F63B78), table driven. crc32c(b"123456789") == 0xE3069283.
_CRC_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ----------------------------------------------------------------------------- constants
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
KMS_AUDIENCE = "https://cloudkms.googleapis.com/"
MAX_DATA = 64 * 1024  # plaintext / AAD limit of the real service
PROTECTION_LEVELS = {0: "PROTECTION_LEVEL_UNSPECIFIED", 1: "SOFTWARE", 2: "HSM", 3: "EXTERNAL", 4: "EXTERNAL_VPC"}
VERSION_STATES = {"ENABLED", "DISABLED", "DESTROY_SCHEDULED", "DESTROYED"}
DEFAULT_ALGORITHM = {"ENCRYPT_DECRYPT": "GOOGLE_SYMMETRIC_ENCRYPTION", "ASYMMETRIC_SIGN": "EC_SIGN_P256_SHA256",
                     "ASYMMETRIC_DECRYPT": "RSA_DECRYPT_OAEP_2048_SHA256", "MAC": "HMAC_SHA256",
                     "RAW_ENCRYPT_DECRYPT": "AES_256_GCM"}
HTTP_TO_GRPC = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
UNAUTH_PREFIX = ("Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
                 "or other valid authentication credential. See "
                 "https://developers.google.com/identity/sign-in/web/devconsole-project.")
# Ciphertext layout (opaque to clients): key-instance id (16) | version (4, big endian) | nonce (12) | AES-GCM ct+tag
CT_HEADER = 16 + 4 + 12

_ID = r"[a-zA-Z0-9_-]{1,63}"
LOCATION_RE = rf"projects/[^/:]+/locations/[^/:]+"
KEYRING_RE = rf"{LOCATION_RE}/keyRings/{_ID}"
KEY_RE = rf"{KEYRING_RE}/cryptoKeys/{_ID}"
VERSION_RE = rf"{KEY_RE}/cryptoKeyVersions/[0-9]+"


class ApiError(Exception):
    """Rendered as a google.rpc.Status JSON error body."""

    def __init__(self, code, status, message, headers=None):
        super().__init__(message)
        self.code, self.status, self.message, self.headers = code, status, message, headers or {}


def rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def b64d(value, field):
    """Decodes a proto3-JSON bytes field (standard or URL-safe alphabet, padding optional)."""
    if value is None:
        return b""
    if not isinstance(value, str):
        raise ApiError(400, "INVALID_ARGUMENT", f"Invalid value at '{field}' (TYPE_BYTES), expected a string")
    try:
        s = value.replace("-", "+").replace("_", "/")
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "INVALID_ARGUMENT",
                       f"Invalid value at '{field}' (TYPE_BYTES), Base64 decoding failed for \"{value[:32]}\"")


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode()


def parse_int64(value, field):
    """int64 fields arrive as JSON strings (proto3 mapping); tolerate numbers. None means absent."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ApiError(400, "INVALID_ARGUMENT", f"Invalid value at '{field}' (TYPE_INT64), \"{value}\"")


def parse_protection_level(value):
    if value is None:
        return "PROTECTION_LEVEL_UNSPECIFIED"
    if isinstance(value, int) and not isinstance(value, bool):
        return PROTECTION_LEVELS.get(value, "PROTECTION_LEVEL_UNSPECIFIED")
    if isinstance(value, str) and value in PROTECTION_LEVELS.values():
        return value
    raise ApiError(400, "INVALID_ARGUMENT",
                   f"Invalid value at 'protection_level' (type.googleapis.com/google.cloud.kms.v1.ProtectionLevel), \"{value}\"")


def check_crc(data, supplied, data_field, crc_field):
    if supplied is not None and supplied != crc32c(data):
        raise ApiError(400, "INVALID_ARGUMENT",
                       f"The checksum in field {crc_field} did not match the data in field {data_field}.")


# ----------------------------------------------------------------------------- state
class State:
    """All mutable fake state; every access goes through `self.lock`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.accounts = {}   # email -> {"permissions": set[str]}
        self.keys = {}       # kid -> (email, RSAPublicKey); every key ever issued stays valid
        self.key_rings = {}  # name -> {"createTime": float}
        self.crypto_keys = {}  # name -> dict, see _ctl_crypto_keys
        self.faults = []     # fault rules, consumed in order
        self.requests = []   # API request log

    # ---- permissions
    def has_permission(self, email, perm, resource):
        acct = self.accounts.get(email)
        if acct is None:
            return False
        for p in acct["permissions"]:
            if p == "*" or p == perm:
                return True
            name, _, prefix = p.partition("@")
            if name == perm and prefix and (resource == prefix or resource.startswith(prefix.rstrip("/") + "/")):
                return True
        return False

    # ---- JSON views
    def version_json(self, key_name, n):
        key, v = self.crypto_keys[key_name], self.crypto_keys[key_name]["versions"][n]
        out = {"name": f"{key_name}/cryptoKeyVersions/{n}", "state": v["state"],
               "protectionLevel": key["protectionLevel"], "algorithm": key["algorithm"],
               "createTime": rfc3339(v["createTime"]), "generateTime": rfc3339(v["createTime"])}
        if v.get("destroyTime"):
            out["destroyTime"] = rfc3339(v["destroyTime"])
        if v.get("destroyEventTime"):
            out["destroyEventTime"] = rfc3339(v["destroyEventTime"])
        return out

    def key_json(self, name):
        key = self.crypto_keys[name]
        out = {"name": name, "purpose": key["purpose"], "createTime": rfc3339(key["createTime"]),
               "versionTemplate": {"protectionLevel": key["protectionLevel"], "algorithm": key["algorithm"]},
               "destroyScheduledDuration": "2592000s"}
        if key["purpose"] == "ENCRYPT_DECRYPT":  # only symmetric keys have a primary version
            out["primary"] = self.version_json(name, key["primary"])
        if key["rotationPeriod"] is not None:
            out["rotationPeriod"] = f"{key['rotationPeriod']}s"
            out["nextRotationTime"] = rfc3339(key["nextRotationTime"])
        return out


# ----------------------------------------------------------------------------- JWT auth
def _b64url(part):
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def authenticate(state, header_value):
    """Returns the caller's email or raises a 401 ApiError (self-signed JWT, AIP-4111)."""
    if not header_value:
        raise ApiError(401, "UNAUTHENTICATED", "Request is missing required authentication credential. "
                       + UNAUTH_PREFIX[len("Request had invalid authentication credentials. "):],
                       {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'})

    def fail(why):
        raise ApiError(401, "UNAUTHENTICATED", f"{UNAUTH_PREFIX} : {why}",
                       {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", error="invalid_token"'})

    scheme, _, token = header_value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        fail("Authorization header is not a Bearer token")
    parts = token.strip().split(".")
    if len(parts) != 3:
        fail("token is not a JWT (expected header.claims.signature)")
    try:
        header, claims, sig = json.loads(_b64url(parts[0])), json.loads(_b64url(parts[1])), _b64url(parts[2])
    except (ValueError, binascii.Error):
        fail("JWT is malformed")
    if not isinstance(header, dict) or not isinstance(claims, dict):
        fail("JWT is malformed")
    if header.get("alg") != "RS256":
        fail(f"unsupported JWT algorithm {header.get('alg')!r} (expected RS256)")
    with state.lock:
        entry = state.keys.get(header.get("kid"))
    if entry is None:
        fail("JWT kid does not name a known service account key")
    email, public_key = entry
    try:
        public_key.verify(sig, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        fail("JWT signature does not verify")
    if claims.get("iss") != email or claims.get("sub") != email:
        fail("JWT iss and sub must both be the service account email of the signing key")
    scopes = claims.get("scope")
    scope_ok = isinstance(scopes, str) and CLOUD_PLATFORM_SCOPE in scopes.split()
    if not scope_ok and claims.get("aud") != KMS_AUDIENCE:
        fail(f"JWT must carry scope {CLOUD_PLATFORM_SCOPE} or audience {KMS_AUDIENCE}")
    now = time.time()
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, (int, float)) or not isinstance(iat, (int, float)):
        fail("JWT exp and iat claims are required numbers")
    if exp <= now:
        fail("JWT has expired")
    if iat > now + 60:
        fail("JWT iat is in the future")
    return email


# ----------------------------------------------------------------------------- HTTP handler
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as reqwest's connection pool expects

    def version_string(self):
        return "ESF"

    state: State = None  # set on the subclass by main()
    base_url = ""

    def log_message(self, fmt, *args):  # silence the default access log
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_HEAD(self):
        self._dispatch("HEAD")

    # ---- plumbing
    def _read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _json_body(self, raw):
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {e}")
        if not isinstance(body, dict):
            raise ApiError(400, "INVALID_ARGUMENT", "Invalid JSON payload received. Expected an object.")
        return body

    def _send(self, code, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _dispatch(self, method):
        path = urllib.parse.unquote(self.path.split("?", 1)[0])
        control = path.startswith("/__fake/")
        email, status, headers = None, 500, {}
        try:
            raw = self._read_body()
            if control:
                status, obj = 200, self._control(method, path, self._json_body(raw))
            else:
                email = authenticate(self.state, self.headers.get("Authorization"))
                corrupt = self._apply_fault(path)
                status, obj = 200, self._api(method, path, email, raw, corrupt)
        except ApiError as e:
            status, headers = e.code, e.headers
            obj = {"error": {"code": e.code, "message": e.message, "status": e.status}}
        except _Drop:
            status = 0
            self.close_connection = True
            self._record(method, path, email, status, control)
            return
        except Exception as e:  # never drop the connection on a bug: answer 500 INTERNAL
            status, headers = 500, {"Connection": "close"}  # the request body may be unread: don't reuse
            self.close_connection = True
            obj = {"error": {"code": 500, "message": f"Internal error in fake: {type(e).__name__}: {e}",
                             "status": "INTERNAL"}}
        # Recorded before the reply goes out: a client that has its reply must find
        # its request in the log.
        self._record(method, path, email, status, control)
        self._send(status, obj, headers)

    def _record(self, method, path, email, status, control):
        if not control:
            with self.state.lock:
                self.state.requests.append({"method": method, "path": path, "email": email, "status": status})
        sys.stderr.write(f"[gcp-kms-fake] {method} {path} {status if status else 'DROPPED'} {email or '-'}\n")
        sys.stderr.flush()

    def _apply_fault(self, path):
        """Consumes the first matching fault rule; returns True if the response CRC must be corrupted."""
        with self.state.lock:
            rule = next((r for r in self.state.faults if r["match"] in path and r["count"] != 0), None)
            if rule is None:
                return False
            if rule["count"] > 0:
                rule["count"] -= 1
            rule = dict(rule)
        if rule["delayMs"] > 0:
            time.sleep(rule["delayMs"] / 1000.0)
        if rule["dropConnection"]:
            raise _Drop()
        if rule["status"]:
            code = rule["status"]
            grpc = rule["grpcStatus"] or HTTP_TO_GRPC.get(code, "UNKNOWN")
            msg = rule["message"] or f"Injected fault: {grpc}"
            raise ApiError(code, grpc, msg, {"Retry-After": "1"} if code == 429 else None)
        return rule["corruptCrc"]

    # ---- control API
    def _control(self, method, path, body):
        routes = {("POST", "/__fake/service-accounts"): self._ctl_service_accounts,
                  ("POST", "/__fake/permissions"): self._ctl_permissions,
                  ("POST", "/__fake/key-rings"): self._ctl_key_rings,
                  ("POST", "/__fake/crypto-keys"): self._ctl_crypto_keys,
                  ("POST", "/__fake/crypto-keys/rotate"): self._ctl_rotate,
                  ("POST", "/__fake/crypto-keys/version-state"): self._ctl_version_state,
                  ("POST", "/__fake/faults"): self._ctl_faults,
                  ("GET", "/__fake/faults"): lambda b: {"faults": list(self.state.faults)},
                  ("POST", "/__fake/reset-faults"): self._ctl_reset_faults,
                  ("GET", "/__fake/requests"): lambda b: list(self.state.requests),
                  ("POST", "/__fake/reset-requests"): self._ctl_reset_requests}
        fn = routes.get((method, path.rstrip("/")))
        if fn is None:
            raise ApiError(404, "NOT_FOUND", f"Unknown control endpoint {method} {path}")
        if fn in (self._ctl_service_accounts,):
            return fn(body)  # generates an RSA key: done outside the lock
        with self.state.lock:
            return json.loads(json.dumps(fn(body)))  # deep copy while locked

    @staticmethod
    def _need(body, field, kind=str):
        v = body.get(field)
        if not isinstance(v, kind) or (kind is str and not v):
            raise ApiError(400, "INVALID_ARGUMENT", f"control: field '{field}' is required ({kind.__name__})")
        return v

    def _perm_list(self, body):
        perms = body.get("permissions", [])
        if not isinstance(perms, list) or not all(isinstance(p, str) for p in perms):
            raise ApiError(400, "INVALID_ARGUMENT", "control: 'permissions' must be a list of strings")
        return set(perms)

    def _ctl_service_accounts(self, body):
        """Issues a NEW key for `email` on every call; all keys ever issued for it stay valid."""
        email = self._need(body, "email")
        perms = self._perm_list(body)
        m = re.match(r"^[^@]+@([^.]+)\.iam\.gserviceaccount\.com$", email)
        project = body.get("project_id") or (m.group(1) if m else "fake-project")
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        kid = secrets.token_hex(20)
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        with self.state.lock:
            self.state.accounts[email] = {"permissions": perms}
            self.state.keys[kid] = (email, private.public_key())
        return {"type": "service_account", "project_id": project, "private_key_id": kid, "private_key": pem,
                "client_email": email, "client_id": str(secrets.randbelow(9 * 10**20) + 10**20),
                "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": f"{self.base_url}/token",
                "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
                "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
                                        + urllib.parse.quote(email, safe=""),
                "universe_domain": "googleapis.com"}

    def _ctl_permissions(self, body):
        email = self._need(body, "email")
        if email not in self.state.accounts:
            raise ApiError(404, "NOT_FOUND", f"control: unknown service account {email}")
        self.state.accounts[email]["permissions"] = self._perm_list(body)
        return {"email": email, "permissions": sorted(self.state.accounts[email]["permissions"])}

    def _ctl_key_rings(self, body):
        name = self._need(body, "name")
        if not re.fullmatch(KEYRING_RE, name):
            raise ApiError(400, "INVALID_ARGUMENT", f"control: bad key ring name {name}")
        if name in self.state.key_rings:
            raise ApiError(409, "ALREADY_EXISTS", f"KeyRing {name} already exists.")
        self.state.key_rings[name] = {"createTime": time.time()}
        return {"name": name, "createTime": rfc3339(self.state.key_rings[name]["createTime"])}

    def _ctl_crypto_keys(self, body):
        name = self._need(body, "name")
        if not re.fullmatch(KEY_RE, name):
            raise ApiError(400, "INVALID_ARGUMENT", f"control: bad crypto key name {name}")
        ring = name.rsplit("/cryptoKeys/", 1)[0]
        if ring not in self.state.key_rings:
            raise ApiError(404, "NOT_FOUND", f"KeyRing {ring} not found.")
        if name in self.state.crypto_keys:
            raise ApiError(409, "ALREADY_EXISTS", f"CryptoKey {name} already exists.")
        purpose = body.get("purpose") or "ENCRYPT_DECRYPT"
        level = parse_protection_level(body.get("protectionLevel", "HSM"))
        period = body.get("rotationPeriod")
        if period is not None:
            pm = re.fullmatch(r"([0-9]+)(?:\.[0-9]+)?s", str(period))
            if not pm:
                raise ApiError(400, "INVALID_ARGUMENT", f"control: bad rotationPeriod {period!r}")
            period = int(pm.group(1))
        now = time.time()
        self.state.crypto_keys[name] = {
            "purpose": purpose, "protectionLevel": level, "createTime": now, "rotationPeriod": period,
            "nextRotationTime": now + period if period else None,
            "algorithm": body.get("algorithm") or DEFAULT_ALGORITHM.get(purpose, "GOOGLE_SYMMETRIC_ENCRYPTION"),
            "instance": secrets.token_bytes(16),  # makes ciphertexts of a re-created key undecryptable
            "primary": 1, "versions": {1: {"state": "ENABLED", "createTime": now, "aes": AESGCM.generate_key(256)}}}
        return self.state.key_json(name)

    def _key_or_404(self, name):
        if name not in self.state.crypto_keys:
            raise ApiError(404, "NOT_FOUND", f"control: CryptoKey {name} not found.")
        return self.state.crypto_keys[name]

    def _ctl_rotate(self, body):
        name = self._need(body, "name")
        key = self._key_or_404(name)
        n, now = max(key["versions"]) + 1, time.time()
        key["versions"][n] = {"state": "ENABLED", "createTime": now, "aes": AESGCM.generate_key(256)}
        key["primary"] = n
        if key["rotationPeriod"]:
            key["nextRotationTime"] = now + key["rotationPeriod"]
        return self.state.key_json(name)

    def _ctl_version_state(self, body):
        name = self._need(body, "name")
        key = self._key_or_404(name)
        try:
            n = int(body.get("version") or key["primary"])
        except (TypeError, ValueError):
            raise ApiError(400, "INVALID_ARGUMENT", f"control: bad version {body.get('version')!r}")
        state = self._need(body, "state")
        if n not in key["versions"] or state not in VERSION_STATES:
            raise ApiError(400, "INVALID_ARGUMENT", f"control: bad version {n!r} or state {state!r}")
        v = key["versions"][n]
        if v["state"] == "DESTROYED" and state != "DESTROYED":
            raise ApiError(400, "FAILED_PRECONDITION", "control: a DESTROYED version cannot change state")
        v["state"] = state
        v["destroyTime"] = time.time() + 30 * 86400 if state == "DESTROY_SCHEDULED" else None
        if state == "DESTROYED":
            v["destroyEventTime"], v["aes"] = time.time(), None  # key material is gone for good
        return self.state.version_json(name, n)

    def _ctl_faults(self, body):
        rule = {"match": self._need(body, "match"), "status": int(body.get("status") or 0),
                "grpcStatus": body.get("grpcStatus"), "message": body.get("message"),
                "count": int(body.get("count", 1)), "delayMs": int(body.get("delayMs") or 0),
                "corruptCrc": bool(body.get("corruptCrc")), "dropConnection": bool(body.get("dropConnection"))}
        self.state.faults.append(rule)
        return {"index": len(self.state.faults) - 1, "rule": rule}

    def _ctl_reset_faults(self, body):
        self.state.faults.clear()
        return {}

    def _ctl_reset_requests(self, body):
        self.state.requests.clear()
        return {}

    # ---- KMS API
    def _api(self, method, path, email, raw, corrupt):
        routes = [("GET", rf"/v1/({KEYRING_RE})", self._get_key_ring),
                  ("GET", rf"/v1/({KEY_RE})", self._get_crypto_key),
                  ("POST", rf"/v1/({KEY_RE}|{VERSION_RE}):encrypt", self._encrypt),
                  ("POST", rf"/v1/({KEY_RE}|{VERSION_RE}):decrypt", self._decrypt),
                  ("POST", rf"/v1/({LOCATION_RE}):generateRandomBytes", self._generate_random_bytes)]
        for m, pattern, fn in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                body = self._json_body(raw) if method == "POST" else {}
                with self.state.lock:
                    return fn(match.group(1), email, body, corrupt)
        raise ApiError(404, "NOT_FOUND", f"The requested URL {path} was not found on this server.")

    def _require(self, email, perm, resource):
        if not self.state.has_permission(email, perm, resource):
            raise ApiError(403, "PERMISSION_DENIED",
                           f"Permission '{perm}' denied on resource '{resource}' (or it may not exist).")

    def _get_key_ring(self, name, email, body, corrupt):
        self._require(email, "cloudkms.keyRings.get", name)
        if name not in self.state.key_rings:
            raise ApiError(404, "NOT_FOUND", f"KeyRing {name} not found.")
        return {"name": name, "createTime": rfc3339(self.state.key_rings[name]["createTime"])}

    def _get_crypto_key(self, name, email, body, corrupt):
        self._require(email, "cloudkms.cryptoKeys.get", name)
        if name not in self.state.crypto_keys:
            raise ApiError(404, "NOT_FOUND", f"CryptoKey {name} not found.")
        return self.state.key_json(name)

    def _usable_key(self, name):
        """Existence + purpose checks shared by encrypt/decrypt; returns (key_name, key, version or None)."""
        key_name, _, ver = name.partition("/cryptoKeyVersions/")
        key = self.state.crypto_keys.get(key_name)
        if key is None:
            raise ApiError(404, "NOT_FOUND", f"CryptoKey {key_name} not found.")
        n = int(ver) if ver else None
        if n is not None and n not in key["versions"]:
            raise ApiError(404, "NOT_FOUND", f"CryptoKeyVersion {name} not found.")
        if key["purpose"] != "ENCRYPT_DECRYPT":
            raise ApiError(400, "FAILED_PRECONDITION",
                           f"{key_name} has purpose {key['purpose']}; the operation requires ENCRYPT_DECRYPT.")
        return key_name, key, n

    @staticmethod
    def _require_enabled(key_name, key, n):
        state = key["versions"][n]["state"]
        if state != "ENABLED":
            raise ApiError(400, "FAILED_PRECONDITION",
                           f"{key_name}/cryptoKeyVersions/{n} is not enabled, current state is: {state}.")

    def _encrypt(self, name, email, body, corrupt):
        self._require(email, "cloudkms.cryptoKeyVersions.useToEncrypt", name)
        key_name, key, n = self._usable_key(name)
        plaintext = b64d(body.get("plaintext"), "plaintext")
        aad = b64d(body.get("additionalAuthenticatedData"), "additional_authenticated_data")
        pt_crc = parse_int64(body.get("plaintextCrc32c"), "plaintext_crc32c")
        aad_crc = parse_int64(body.get("additionalAuthenticatedDataCrc32c"), "additional_authenticated_data_crc32c")
        check_crc(plaintext, pt_crc, "plaintext", "plaintext_crc32c")
        check_crc(aad, aad_crc, "additional_authenticated_data", "additional_authenticated_data_crc32c")
        if not plaintext:
            raise ApiError(400, "INVALID_ARGUMENT", "The request must specify a non-empty plaintext.")
        if len(plaintext) > MAX_DATA or len(aad) > MAX_DATA:
            raise ApiError(400, "INVALID_ARGUMENT",
                           f"The plaintext and additional_authenticated_data must each be at most {MAX_DATA} bytes.")
        n = n or key["primary"]
        self._require_enabled(key_name, key, n)
        nonce = os.urandom(12)
        ct = key["instance"] + n.to_bytes(4, "big") + nonce + AESGCM(key["versions"][n]["aes"]).encrypt(nonce, plaintext, aad)
        crc = crc32c(ct) ^ (1 if corrupt else 0)
        return {"name": f"{key_name}/cryptoKeyVersions/{n}", "ciphertext": b64e(ct), "ciphertextCrc32c": str(crc),
                "verifiedPlaintextCrc32c": pt_crc is not None,
                "verifiedAdditionalAuthenticatedDataCrc32c": aad_crc is not None,
                "protectionLevel": key["protectionLevel"]}

    def _decrypt(self, name, email, body, corrupt):
        self._require(email, "cloudkms.cryptoKeyVersions.useToDecrypt", name)
        key_name, key, n = self._usable_key(name)
        if n is not None:
            raise ApiError(400, "INVALID_ARGUMENT", "Decrypt requires a CryptoKey name, not a CryptoKeyVersion name.")
        ct = b64d(body.get("ciphertext"), "ciphertext")
        aad = b64d(body.get("additionalAuthenticatedData"), "additional_authenticated_data")
        check_crc(ct, parse_int64(body.get("ciphertextCrc32c"), "ciphertext_crc32c"), "ciphertext", "ciphertext_crc32c")
        check_crc(aad, parse_int64(body.get("additionalAuthenticatedDataCrc32c"), "additional_authenticated_data_crc32c"),
                  "additional_authenticated_data", "additional_authenticated_data_crc32c")
        invalid = ApiError(400, "INVALID_ARGUMENT", "Decryption failed: the ciphertext is invalid.")
        if len(ct) < CT_HEADER + 16 or ct[:16] != key["instance"]:
            raise invalid
        n = int.from_bytes(ct[16:20], "big")
        if n not in key["versions"]:
            raise invalid
        self._require_enabled(key_name, key, n)
        try:
            plaintext = AESGCM(key["versions"][n]["aes"]).decrypt(ct[20:CT_HEADER], ct[CT_HEADER:], aad)
        except InvalidTag:
            raise invalid
        crc = crc32c(plaintext) ^ (1 if corrupt else 0)
        return {"plaintext": b64e(plaintext), "plaintextCrc32c": str(crc), "usedPrimary": n == key["primary"],
                "protectionLevel": key["protectionLevel"]}

    def _generate_random_bytes(self, location, email, body, corrupt):
        self._require(email, "cloudkms.locations.generateRandomBytes", location)
        length = parse_int64(body.get("lengthBytes"), "length_bytes") or 0
        level = parse_protection_level(body.get("protectionLevel"))
        if not 8 <= length <= 1024:
            raise ApiError(400, "INVALID_ARGUMENT", f"length_bytes must be between 8 and 1024, got {length}.")
        if level not in ("HSM", "SOFTWARE"):
            raise ApiError(400, "INVALID_ARGUMENT", f"Unsupported protection_level {level}; use HSM.")
        data = os.urandom(length)
        return {"data": b64e(data), "dataCrc32c": str(crc32c(data) ^ (1 if corrupt else 0))}


class _Drop(Exception):
    """Raised by a `dropConnection` fault: close the socket without answering."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="exit when standard input closes (the test process that started us ended)",
    )
    args = ap.parse_args(argv)
    host = "127.0.0.1" if args.host == "localhost" else args.host
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        ap.error("--host must be a loopback IP address")
    if not addr.is_loopback:
        ap.error("--host must be a loopback address (this fake never listens on other interfaces)")
    server_cls = _Server
    if addr.version == 6:
        server_cls = type("_Server6", (_Server,), {"address_family": __import__("socket").AF_INET6})
    handler = type("BoundHandler", (Handler,), {"state": State()})
    server = server_cls((host, args.port), handler)
    port = server.server_address[1]
    handler.base_url = f"http://{host if addr.version == 4 else '[' + host + ']'}:{port}"

    def stop(signum, frame):  # shutdown() blocks until serve_forever returns, so call it off-thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.exit_on_stdin_eof:
        threading.Thread(target=lambda: (sys.stdin.read(), stop(None, None)), daemon=True).start()
    print(f"listening on {handler.base_url}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
