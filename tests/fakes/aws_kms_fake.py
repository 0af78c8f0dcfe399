#!/usr/bin/env python3
"""AWS KMS fake for the earfs integration tests: moto 5.2.x plus a faithful-ish proxy.

Usage:  python3 tests/fakes/aws_kms_fake.py [--iam-enforce]

One process runs moto's server in-process (moto.server.ThreadedMotoServer on
127.0.0.1, free port) and, in front of it, a small HTTP proxy (stdlib
ThreadingHTTPServer, free loopback port). Once both are up it prints exactly one
line, `listening on http://127.0.0.1:PORT` (the proxy), to stdout. It serves until
SIGTERM/SIGINT and then exits 0. Each proxied request is logged to stderr in one
line (op, status, fault, key, elapsed) -- never bodies. Install deps with
scripts/deps-kms.sh.

The SDK talks only to the proxy. KMS requests (POST /, X-Amz-Target:
TrentService.<Op>, application/x-amz-json-1.1, SigV4) are forwarded to moto with
all headers (Host as received) and the body unchanged, so SigV4 signatures stay
valid when moto checks them. The proxy adds what moto lacks:

* Fault injection (POST /__fake/faults): throttling, 5xx, delays, raw 503s.
* Key states (POST /__fake/key-state): moto records KeyState but never enforces
  it. The proxy answers cryptographic operations on a key that is not Enabled
  the way KMS does:
      Disabled        400 DisabledException         "<key arn> is disabled."
      PendingDeletion 400 KMSInvalidStateException  "<key arn> is pending deletion."
      PendingImport   400 KMSInvalidStateException  "<key arn> is pending import."
      Unavailable     500 KeyUnavailableException   "<key arn> is unavailable."
  The state of record is moto's own Key.key_state/enabled/deletion_date, so
  DisableKey/EnableKey/ScheduleKeyDeletion/CancelKeyDeletion sent through the
  proxy update it too, and DescribeKey/ListKeys agree. Invalid transitions
  (e.g. EnableKey on a key pending deletion, CancelKeyDeletion on a key that is
  not pending deletion) get KMSInvalidStateException from the proxy.
  Crypto requests on a non-Enabled key are still forwarded first: if moto
  rejects them for authentication/authorization (IAM enforcement), that error
  wins, as in KMS; otherwise the key-state error replaces moto's answer (moto's
  crypto operations have no side effects).
* Response normalisation. moto 5.2.1 labels successful JSON replies
  `Content-Type: text/html; charset=utf-8` and its JSON errors
  `application/json`; the proxy relabels any JSON reply as
  `application/x-amz-json-1.1` like KMS. It drops moto's stray `status` header.
* Auth error rewrite (--iam-enforce). moto's IAM checks answer KMS (a JSON
  protocol service) with query-protocol XML. Observed on the wire from moto
  5.2.1 for a user whose policy lacks kms:ListAliases:
      HTTP/1.1 403 FORBIDDEN
      Content-Type: text/html; charset=utf-8
      status: 403
      x-amzn-requestid: <random>
      <?xml version="1.0" encoding="utf-8"?>
      <ErrorResponse><Errors><Error><Code>AccessDenied</Code><Message>User:
      arn:aws:iam::123456789012:user/node1 is not authorized to perform:
      kms:ListAliases</Message><Type>Sender</Type></Error></Errors></ErrorResponse>
  (no x-amzn-ErrorType header, no JSON body; the Rust SDK would surface an
  unmodelled error with code "403" or none). An unknown access key gives the same
  shape with Code InvalidClientTokenId ("The security token included in the
  request is invalid."), a wrong secret Code SignatureDoesNotMatch. KMS itself
  answers these as HTTP 400 JSON, so the proxy rewrites any XML 401/403 reply:
      AccessDenied          -> 400 AccessDeniedException, moto's message plus
                               " because no identity-based policy allows the
                               <action> action" (the KMS wording)
      InvalidClientTokenId  -> 400 UnrecognizedClientException
                               "The security token included in the request is invalid."
      SignatureDoesNotMatch -> 400 InvalidSignatureException (moto's message)
      anything else         -> 400 with the XML <Code> as __type
  with `Content-Type: application/x-amz-json-1.1`, `x-amzn-ErrorType: <type>`,
  the request id kept. Requests with no Authorization header under
  --iam-enforce (moto would crash with a KeyError/500) get 400
  MissingAuthenticationTokenException.
* moto workarounds patched in-process (nothing on the wire):
  - DisableKey/EnableKey/CancelKeyDeletion/ScheduleKeyDeletion with a key ARN
    KeyId raise KeyError (500) in moto 5.2.1. Rewriting the request body would
    break the SigV4 signature moto verifies under --iam-enforce, so instead the
    backend methods are wrapped to strip the ARN to the bare key id. The
    ScheduleKeyDeletion/CancelKeyDeletion replies get KeyId = key ARN and (for
    ScheduleKeyDeletion) KeyState/PendingWindowInDays, as in KMS.
  - moto packs the key id into a 36-byte ciphertext header, truncating the
    40-character ids of multi-Region (mrk-) keys, so it cannot Decrypt their
    ciphertexts. Decrypt is wrapped to resolve the truncated id by unique prefix.
* Other reply fixes on the wire: Decrypt whose KeyId is not the ciphertext's key
  (moto: 400 AccessDeniedException with no message) -> 400 IncorrectKeyException;
  ScheduleKeyDeletion with PendingWindowInDays outside 7..30 (moto: 200, no-op)
  -> 400 ValidationException.
* Not covered: moto 5.2.1 does not implement GenerateDataKeyPair* (moto answers an
  HTML 500; the key-state check still applies first). IAM policies only work
  with "Resource": "*" (moto authorizes KMS calls against "*"), so the users
  endpoint rejects any other resource. Key policies and grants are moto's
  (mostly unenforced). DescribeKey of a key created without keyUsage carries
  "KeyUsage": null (moto), where KMS would say "ENCRYPT_DECRYPT".

Everything in the control API (no auth, JSON in/out, on the proxy port) works on
moto's in-process backends directly (account 123456789012), never through
authenticated HTTP, so it keeps working under --iam-enforce:

  POST /__fake/keys       {"region"?: "us-east-1", "description"?: str,
                           "keySpec"?: "SYMMETRIC_DEFAULT", "keyUsage"?: str,
                           "multiRegion"?: bool, "aliases"?: ["alias/x"]}
                          -> {"keyId", "arn", "region", "aliasArns": [...]}
  POST /__fake/users      {"name": "node1", "actions": ["kms:Decrypt"], "resource"?: "*"}
                          -> {"userName", "arn", "accessKeyId", "secretAccessKey"}
                          (inline policy Allow <actions> on "*"; [] = no policy at all)
  POST /__fake/key-state  {"keyId": id|arn|alias|alias-arn, "state": "Enabled"|"Disabled"|
                           "PendingDeletion"|"PendingImport"|"Unavailable", "region"?: str}
                          -> {"keyId", "arn", "state"}
  POST /__fake/faults     {"op": "Decrypt"|"*", "count"?: 1 (-1 = until reset), "status"?: int,
                           "errorType"?: str|"raw", "message"?: str, "delayMs"?: 0}
                          -> {"index": n}
  GET  /__fake/faults     -> [rule with "remaining", ...]
  POST /__fake/reset      clears faults, the request log and key states (every key back to
                          Enabled); keeps keys, aliases and users -> {"ok": true}
  GET  /__fake/requests   -> [{"op", "status", "fault", "faultKind", "errorType", "keyId"}, ...]
  GET  /__fake/health     -> {"ok": true, "iamEnforce": bool, "motoPort": int}
Control API errors: 400 {"error": msg} for bad input, 404 for unknown paths,
500 {"__type": "FakeInternalError", "message": ...} for anything unexpected.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACCOUNT_ID = "123456789012"
DEFAULT_REGION = "us-east-1"
JSON_CT = "application/x-amz-json-1.1"
MOTO_TIMEOUT_S = 30.0

# Operations on which KMS enforces the key state (the key must be Enabled).
CRYPTO_OPS = {
    "Encrypt",
    "Decrypt",
    "ReEncrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "Sign",
    "Verify",
    "GenerateMac",
    "VerifyMac",
    "GetPublicKey",
    "DeriveSharedSecret",
}
STATE_CHANGE_OPS = {"DisableKey", "EnableKey", "ScheduleKeyDeletion", "CancelKeyDeletion"}
KEY_STATES = {"Enabled", "Disabled", "PendingDeletion", "PendingImport", "Unavailable"}
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
}
DROP_FROM_MOTO = HOP_BY_HOP | {"server", "date", "status"}

MOTO = None  # filled in by load_moto()


def log(msg: str) -> None:
    sys.stderr.write(f"[kms-fake] {msg}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- moto


def load_moto(iam_enforce: bool):
    """Import moto with the IAM setting in place and apply the in-process patches."""
    # moto.settings reads INITIAL_NO_AUTH_ACTION_COUNT from the environment at import
    # time (default inf = never authenticate); core.authorization reads the module
    # attribute on every request, so set both.
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0" if iam_enforce else "inf"
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0 if iam_enforce else float("inf")
    ActionAuthenticatorMixin.request_count = 0

    import moto.kms.models as kms_models
    from moto.iam.models import iam_backends
    from moto.kms.models import KmsBackend, kms_backends
    from moto.server import ThreadedMotoServer

    _patch_state_ops(KmsBackend)
    _patch_mrk_decrypt(kms_models)

    class M:
        pass

    m = M()
    m.settings = settings
    m.kms_backends = kms_backends
    m.iam_backends = iam_backends
    m.ThreadedMotoServer = ThreadedMotoServer
    return m


def _patch_state_ops(KmsBackend) -> None:
    if getattr(KmsBackend, "_earfs_fake_patched", False):
        return
    for name in ("disable_key", "enable_key", "cancel_key_deletion", "schedule_key_deletion"):
        orig = getattr(KmsBackend, name)

        def wrapper(self, key_id, *args, __orig=orig, **kwargs):
            return __orig(self, self.get_key_id(key_id), *args, **kwargs)

        wrapper.__name__ = name
        wrapper.__doc__ = orig.__doc__
        setattr(KmsBackend, name, wrapper)
    KmsBackend._earfs_fake_patched = True


def _patch_mrk_decrypt(kms_models) -> None:
    orig = kms_models.decrypt
    if getattr(orig, "_earfs_fake_patched", False):
        return

    def decrypt(master_keys, ciphertext_blob, encryption_context):
        head = bytes(ciphertext_blob[:36])
        try:
            kid = head.decode("ascii")
        except UnicodeDecodeError:
            kid = None
        if kid and kid.startswith("mrk-") and kid not in master_keys:
            full = [k for k in list(master_keys) if k.startswith(kid)]
            if len(full) == 1:
                plaintext, _ = orig(
                    master_keys={kid: master_keys[full[0]]},
                    ciphertext_blob=ciphertext_blob,
                    encryption_context=encryption_context,
                )
                return plaintext, full[0]
        return orig(
            master_keys=master_keys,
            ciphertext_blob=ciphertext_blob,
            encryption_context=encryption_context,
        )

    decrypt._earfs_fake_patched = True
    kms_models.decrypt = decrypt


def kms_backend(region: str):
    return MOTO.kms_backends[ACCOUNT_ID][region]


def loaded_kms_backends():
    acct = MOTO.kms_backends[ACCOUNT_ID]
    return list(dict.items(acct))  # only regions already created


def iam_backend():
    # "global" maps to the "aws" partition backend in moto 5.x.
    return MOTO.iam_backends[ACCOUNT_ID]["global"]


def resolve_key(backend, ident) -> str | None:
    """key id | key ARN | alias name | alias ARN -> moto key id (no side effects)."""
    if not isinstance(ident, str) or not ident:
        return None
    if ident.startswith("arn:") and ":alias/" in ident:
        ident = "alias/" + ident.split(":alias/", 1)[1]
    if ident.startswith("alias/"):
        for key in list(backend.keys.values()):
            if ident in key.aliases:
                return key.id
        return None
    if ident.startswith("arn:") and ":key/" in ident:
        ident = ident.split(":key/", 1)[1]
    return ident if ident in backend.keys else None


def key_from_blob(backend, blob_b64) -> str | None:
    """moto's ciphertext blob = 36-byte ASCII key id (truncated for mrk- ids) + IV + tag + data."""
    if not isinstance(blob_b64, str):
        return None
    try:
        head = base64.b64decode(blob_b64[:64] + "=" * (-len(blob_b64[:64]) % 4))[:36]
        kid = head.decode("ascii")
    except Exception:
        return None
    if kid in backend.keys:
        return kid
    if kid.startswith("mrk-"):
        full = [k for k in list(backend.keys) if k.startswith(kid)]
        if len(full) == 1:
            return full[0]
    return None


def find_key_any_region(ident: str, region: str | None):
    """For the control API: returns (backend, key) or (None, None)."""
    if isinstance(ident, str) and ident.startswith("arn:"):
        parts = ident.split(":")
        if len(parts) > 3 and parts[3]:
            region = parts[3]
    candidates = []
    if region:
        candidates.append(kms_backend(region))
    else:
        candidates.append(kms_backend(DEFAULT_REGION))
        candidates += [b for r, b in loaded_kms_backends() if r != DEFAULT_REGION]
    for b in candidates:
        kid = resolve_key(b, ident)
        if kid:
            return b, b.keys[kid]
    return None, None


def set_key_state(key, state: str, pending_days: int = 30) -> None:
    key.key_state = state
    key.enabled = state == "Enabled"
    if state == "PendingDeletion":
        if getattr(key, "deletion_date", None) is None:
            key.deletion_date = datetime.datetime.now(datetime.timezone.utc).replace(
                tzinfo=None
            ) + datetime.timedelta(days=pending_days)
    else:
        key.deletion_date = None


def state_error(state: str, arn: str):
    """(status, errorType, message) for a key in `state`, or None if usable."""
    if state == "Enabled":
        return None
    if state == "Disabled":
        return 400, "DisabledException", f"{arn} is disabled."
    if state == "PendingDeletion":
        return 400, "KMSInvalidStateException", f"{arn} is pending deletion."
    if state == "PendingImport":
        return 400, "KMSInvalidStateException", f"{arn} is pending import."
    if state == "Unavailable":
        return 500, "KeyUnavailableException", f"{arn} is unavailable."
    return 400, "KMSInvalidStateException", f"{arn} is {state}."


def transition_error(op: str, state: str, arn: str):
    """KMS's checks for the state-changing operations (None = allowed)."""
    if op in ("DisableKey", "EnableKey"):
        if state in ("Enabled", "Disabled"):
            return None
        return state_error(state, arn)
    if op == "ScheduleKeyDeletion":
        if state in ("Enabled", "Disabled", "PendingImport", "Unavailable"):
            return None
        return state_error(state, arn)
    if op == "CancelKeyDeletion":
        if state == "PendingDeletion":
            return None
        return 400, "KMSInvalidStateException", f"{arn} is not pending deletion."
    return None


# ------------------------------------------------------------------ shared state


class FakeState:
    def __init__(self, iam_enforce: bool):
        self.lock = threading.Lock()
        self.iam_enforce = iam_enforce
        self.faults: list[dict] = []
        self.requests: list[dict] = []
        self.moto_port = 0

    def take_fault(self, op: str | None):
        with self.lock:
            for rule in self.faults:
                if rule["remaining"] == 0:
                    continue
                if rule["op"] != "*" and rule["op"] != op:
                    continue
                if rule["remaining"] > 0:
                    rule["remaining"] -= 1
                return dict(rule)
        return None


STATE: FakeState | None = None


def parse_fault(body: dict) -> dict:
    if not isinstance(body, dict):
        raise ValueError("fault rule must be a JSON object")
    op = body.get("op", "*")
    if not isinstance(op, str) or not op:
        raise ValueError("op must be an operation name or '*'")
    count = body.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < -1:
        raise ValueError("count must be an integer >= -1")
    delay = body.get("delayMs", 0)
    if not isinstance(delay, (int, float)) or delay < 0:
        raise ValueError("delayMs must be a number >= 0")
    error_type = body.get("errorType")
    if error_type is not None and (not isinstance(error_type, str) or not error_type):
        raise ValueError("errorType must be a non-empty string")
    if error_type is None and delay == 0:
        raise ValueError("a fault rule needs errorType and/or delayMs")
    default_status = 503 if error_type == "raw" else 400
    status = body.get("status", default_status)
    if not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError("status must be an HTTP status code")
    message = body.get("message", "")
    if not isinstance(message, str):
        raise ValueError("message must be a string")
    return {
        "op": op,
        "count": count,
        "remaining": count,
        "status": status,
        "errorType": error_type,
        "message": message,
        "delayMs": delay,
    }


RAW_503_BODY = (
    b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n"
    b"<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n"
    b"</body>\r\n</html>\r\n"
)


def json_error_response(status: int, error_type: str, message: str, request_id=None):
    body = json.dumps({"__type": error_type, "message": message}).encode()
    headers = [
        ("Content-Type", JSON_CT),
        ("x-amzn-RequestId", request_id or str(uuid.uuid4())),
        ("x-amzn-ErrorType", error_type),
    ]
    return status, headers, body


# --------------------------------------------------------------- auth rewrite


def rewrite_auth_error(status: int, headers: list, body: bytes):
    """moto's XML 401/403 auth errors -> the JSON shape KMS uses. None if not one."""
    if status not in (401, 403):
        return None
    text = body.lstrip()
    if not text.startswith(b"<"):
        return None
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    code = root.findtext(".//Error/Code") or root.findtext(".//Code")
    message = root.findtext(".//Error/Message") or root.findtext(".//Message") or ""
    if not code:
        return None
    request_id = next((v for k, v in headers if k.lower() == "x-amzn-requestid"), None)
    if code == "AccessDenied":
        m = re.search(r"perform: (\S+)", message)
        if m and "because" not in message:
            message = f"{message} because no identity-based policy allows the {m.group(1)} action"
        return json_error_response(400, "AccessDeniedException", message, request_id)
    if code in ("InvalidClientTokenId", "UnrecognizedClientException"):
        return json_error_response(
            400,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
            request_id,
        )
    if code == "SignatureDoesNotMatch":
        return json_error_response(400, "InvalidSignatureException", message, request_id)
    return json_error_response(400, code, message, request_id)


def response_error_type(status: int, headers: list, body: bytes) -> str | None:
    if status < 400:
        return None
    for k, v in headers:
        if k.lower() == "x-amzn-errortype":
            return v.split(":", 1)[0]
    try:
        t = json.loads(body).get("__type")
        return t.split("#")[-1] if isinstance(t, str) else None
    except Exception:
        return "raw"


# --------------------------------------------------------------------- handler


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def version_string(self) -> str:
        return "kms-fake"

    def log_message(self, format, *args):  # noqa: A002 - silence default access log
        pass

    # -- plumbing
    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, headers: list, body: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _send_json(self, status: int, obj) -> None:
        self._send(status, [("Content-Type", "application/json")], json.dumps(obj).encode())

    def _dispatch(self) -> None:
        body = b""
        try:
            body = self._read_body()
            path = self.path.split("?", 1)[0]
            if path.startswith("/__fake/"):
                self._control(path, body)
            else:
                self._proxy(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # anything -> 500 JSON
            log(f"internal error: {type(e).__name__}: {e}")
            try:
                status, headers, out = json_error_response(
                    500, "FakeInternalError", f"{type(e).__name__}: {e}"
                )
                self._send(status, headers, out)
            except Exception:
                self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _dispatch

    # -- control API
    def _control(self, path: str, body: bytes) -> None:
        method = self.command
        try:
            req = json.loads(body) if body.strip() else {}
        except ValueError:
            self._send_json(400, {"error": "body is not valid JSON"})
            return
        routes = {
            ("POST", "/__fake/keys"): self._c_keys,
            ("POST", "/__fake/users"): self._c_users,
            ("POST", "/__fake/key-state"): self._c_key_state,
            ("POST", "/__fake/faults"): self._c_faults,
            ("GET", "/__fake/faults"): self._c_list_faults,
            ("POST", "/__fake/reset"): self._c_reset,
            ("GET", "/__fake/requests"): self._c_requests,
            ("GET", "/__fake/health"): self._c_health,
        }
        fn = routes.get((method, path.rstrip("/")))
        if fn is None:
            self._send_json(404, {"error": f"no control route {method} {path}"})
            return
        try:
            status, out = fn(req)
        except ValueError as e:
            status, out = 400, {"error": str(e)}
        self._send_json(status, out)

    def _c_keys(self, req):
        if not isinstance(req, dict):
            raise ValueError("expected a JSON object")
        region = req.get("region") or DEFAULT_REGION
        aliases = req.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ValueError("aliases must be a list of strings")
        backend = kms_backend(region)
        for a in aliases:
            if not a.startswith("alias/") or a.startswith("alias/aws/"):
                raise ValueError(f"invalid alias name {a!r}")
            if backend.alias_exists(a):
                raise ValueError(f"alias {a} already exists in {region}")
        key = backend.create_key(
            None,  # policy: moto generates the default key policy
            req.get("keyUsage"),  # None like moto's CreateKey without KeyUsage
            req.get("keySpec") or "SYMMETRIC_DEFAULT",
            req.get("description") or "",
            None,
            bool(req.get("multiRegion", False)),
        )
        alias_arns = []
        for a in aliases:
            backend.create_alias(key.id, a)
            alias_arns.append(f"arn:aws:kms:{region}:{ACCOUNT_ID}:{a}")
        return 200, {"keyId": key.id, "arn": key.arn, "region": region, "aliasArns": alias_arns}

    def _c_users(self, req):
        if not isinstance(req, dict):
            raise ValueError("expected a JSON object")
        name = req.get("name")
        actions = req.get("actions", [])
        resource = req.get("resource", "*")
        if not isinstance(name, str) or not re.fullmatch(r"[\w+=,.@-]{1,64}", name):
            raise ValueError("name must be a valid IAM user name")
        if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
            raise ValueError("actions must be a list of strings")
        if resource != "*":
            # moto 5.2 authorizes every KMS call against resource "*" (KmsResponse has no
            # _determine_resource), so a key-scoped Resource would silently deny everything.
            raise ValueError('moto only supports "resource": "*" for KMS identity policies')
        iam = iam_backend()
        if name in iam.users:
            raise ValueError(f"user {name} already exists")
        user = iam.create_user(DEFAULT_REGION, name)
        if actions:
            policy = {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": list(actions), "Resource": resource}
                ],
            }
            iam.put_user_policy(name, "earfs-fake-policy", json.dumps(policy))
        ak = iam.create_access_key(name)
        return 200, {
            "userName": name,
            "arn": user.arn,
            "accessKeyId": ak.access_key_id,
            "secretAccessKey": ak.secret_access_key,
        }

    def _c_key_state(self, req):
        if not isinstance(req, dict):
            raise ValueError("expected a JSON object")
        state = req.get("state")
        if state not in KEY_STATES:
            raise ValueError(f"state must be one of {sorted(KEY_STATES)}")
        _, key = find_key_any_region(req.get("keyId"), req.get("region"))
        if key is None:
            return 404, {"error": f"key {req.get('keyId')!r} not found"}
        with STATE.lock:
            set_key_state(key, state)
        return 200, {"keyId": key.id, "arn": key.arn, "state": state}

    def _c_faults(self, req):
        rule = parse_fault(req)
        with STATE.lock:
            STATE.faults.append(rule)
            return 200, {"index": len(STATE.faults) - 1}

    def _c_list_faults(self, _req):
        with STATE.lock:
            return 200, [dict(r) for r in STATE.faults]

    def _c_reset(self, _req):
        with STATE.lock:
            STATE.faults.clear()
            STATE.requests.clear()
            for _, backend in loaded_kms_backends():
                for key in list(backend.keys.values()):
                    if key.key_state != "Enabled" or not key.enabled:
                        set_key_state(key, "Enabled")
        return 200, {"ok": True}

    def _c_requests(self, _req):
        with STATE.lock:
            return 200, [dict(r) for r in STATE.requests]

    def _c_health(self, _req):
        return 200, {"ok": True, "iamEnforce": STATE.iam_enforce, "motoPort": STATE.moto_port}

    # -- proxy
    def _request_region(self) -> str:
        auth = self.headers.get("Authorization") or ""
        m = re.search(r"Credential=[^/,\s]+/\d{8}/([^/,\s]+)/", auth)
        return m.group(1) if m else DEFAULT_REGION

    def _forward(self, body: bytes):
        conn = http.client.HTTPConnection("127.0.0.1", STATE.moto_port, timeout=MOTO_TIMEOUT_S)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() in HOP_BY_HOP:
                    continue
                conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            out = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in DROP_FROM_MOTO]
            return resp.status, headers, out
        finally:
            conn.close()

    def _proxy(self, body: bytes) -> None:
        t0 = time.monotonic()
        target = self.headers.get("X-Amz-Target") or ""
        op = target.split(".", 1)[1] if target.startswith("TrentService.") else None
        try:
            params = json.loads(body) if body.strip() else {}
            if not isinstance(params, dict):
                params = {}
        except ValueError:
            params = {}
        region = self._request_region()
        backend = kms_backend(region) if op else None

        # Keys the request targets.
        targets: list[str] = []
        if backend is not None:
            if op == "Decrypt":
                kid = resolve_key(backend, params.get("KeyId")) if params.get("KeyId") else None
                kid = kid or key_from_blob(backend, params.get("CiphertextBlob"))
                targets.append(kid)
            elif op == "ReEncrypt":
                src = resolve_key(backend, params.get("SourceKeyId")) if params.get(
                    "SourceKeyId"
                ) else None
                targets.append(src or key_from_blob(backend, params.get("CiphertextBlob")))
                targets.append(resolve_key(backend, params.get("DestinationKeyId")))
            elif op in ("CreateAlias", "UpdateAlias"):
                targets.append(resolve_key(backend, params.get("TargetKeyId")))
            elif "KeyId" in params:
                targets.append(resolve_key(backend, params.get("KeyId")))
        targets = [t for t in targets if t]
        log_key = targets[0] if targets else None

        fault_kind = None
        delay_ms = 0
        rule = STATE.take_fault(op) if op else None
        if rule:
            delay_ms = rule["delayMs"]
            if delay_ms:
                time.sleep(delay_ms / 1000.0)
            fault_kind = "error" if rule["errorType"] else "delay"

        if rule and rule["errorType"] == "raw":
            body_out = rule["message"].encode() if rule["message"] else RAW_503_BODY
            result = (rule["status"], [("Content-Type", "text/html")], body_out)
        elif rule and rule["errorType"]:
            result = json_error_response(rule["status"], rule["errorType"], rule["message"])
        elif STATE.iam_enforce and op and not self.headers.get("Authorization"):
            result = json_error_response(
                400,
                "MissingAuthenticationTokenException",
                "Missing Authentication Token",
            )
        else:
            result = self._proxy_to_moto(op, params, body, backend, targets)

        status, headers, out = result
        err = response_error_type(status, headers, out)
        entry = {
            "op": op,
            "status": status,
            "fault": fault_kind is not None,
            "faultKind": fault_kind,
            "errorType": err,
            "keyId": log_key,
        }
        # Recorded before the reply goes out: a client that has its reply must find
        # its request in /__fake/requests.
        with STATE.lock:
            STATE.requests.append(entry)
        self._send(status, headers, out)
        ms = (time.monotonic() - t0) * 1000
        log(
            f"op={op or self.command + ' ' + self.path} status={status} "
            f"fault={fault_kind or 'none'}{f'({delay_ms}ms)' if delay_ms else ''} "
            f"error={err or '-'} key={log_key or '-'} {ms:.0f}ms"
        )

    def _proxy_to_moto(self, op, params, body, backend, targets):
        # Checks that must happen before moto mutates anything.
        if op == "ScheduleKeyDeletion" and "PendingWindowInDays" in params:
            days = params["PendingWindowInDays"]
            if not isinstance(days, int) or not 7 <= days <= 30:
                # moto answers 200 and does nothing.
                bound = "greater than or equal to 7" if isinstance(days, int) and days < 7 else (
                    "less than or equal to 30"
                )
                return json_error_response(
                    400,
                    "ValidationException",
                    f"1 validation error detected: Value '{days}' at 'pendingWindowInDays' "
                    f"failed to satisfy constraint: Member must have value {bound}",
                )
        if op in STATE_CHANGE_OPS and targets:
            key = backend.keys.get(targets[0])
            if key is not None:
                e = transition_error(op, key.key_state, key.arn)
                if e:
                    return json_error_response(*e)

        status, headers, out = self._forward(body)

        rewritten = rewrite_auth_error(status, headers, out)
        if rewritten is not None:
            return rewritten

        if (
            op == "Decrypt"
            and status == 400
            and params.get("KeyId")
            and response_error_type(status, headers, out) == "AccessDeniedException"
        ):
            # moto: empty AccessDeniedException when KeyId is not the ciphertext's key.
            blob_key = key_from_blob(backend, params.get("CiphertextBlob"))
            if blob_key and blob_key not in targets:
                rid = next((v for k, v in headers if k.lower() == "x-amzn-requestid"), None)
                return json_error_response(
                    400,
                    "IncorrectKeyException",
                    "The key ID in the request does not identify a KMS key that can perform "
                    "this operation.",
                    rid,
                )

        if op in CRYPTO_OPS:
            # Authentication/authorization errors were returned above; any other
            # answer from moto is replaced when a target key is not Enabled.
            for kid in targets:
                key = backend.keys.get(kid)
                if key is None:
                    continue
                e = state_error(key.key_state, key.arn)
                if e:
                    return json_error_response(*e)

        if 200 <= status < 300 and op and out.strip().startswith(b"{"):
            out = self._patch_success(op, params, backend, targets, out)

        if out.strip().startswith(b"{"):
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
            headers.append(("Content-Type", JSON_CT))
        return status, headers, out

    def _patch_success(self, op, params, backend, targets, out: bytes) -> bytes:
        key = backend.keys.get(targets[0]) if targets else None
        if key is None or op not in ("DescribeKey", "ScheduleKeyDeletion", "CancelKeyDeletion"):
            return out
        try:
            doc = json.loads(out)
        except ValueError:
            return out
        if op == "DescribeKey" and isinstance(doc.get("KeyMetadata"), dict):
            md = doc["KeyMetadata"]
            md["KeyState"] = key.key_state
            md["Enabled"] = key.key_state == "Enabled"
            if key.key_state == "PendingDeletion":
                if key.deletion_date is not None:
                    md["DeletionDate"] = _unix(key.deletion_date)
            else:
                md.pop("DeletionDate", None)
        elif op == "ScheduleKeyDeletion":
            doc["KeyId"] = key.arn
            doc["KeyState"] = key.key_state
            doc["PendingWindowInDays"] = params.get("PendingWindowInDays", 30)
        elif op == "CancelKeyDeletion":
            doc["KeyId"] = key.arn
        return json.dumps(doc).encode()


def _unix(dt: datetime.datetime) -> float:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp()


class ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


# ------------------------------------------------------------------------ main


def main(argv=None) -> int:
    global MOTO, STATE
    ap = argparse.ArgumentParser(description="AWS KMS fake (moto + proxy) for earfs tests")
    ap.add_argument(
        "--iam-enforce",
        action="store_true",
        help="make moto authenticate requests and enforce IAM identity policies",
    )
    ap.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="exit when standard input closes (the test process that started us ended)",
    )
    args = ap.parse_args(argv)

    # Keep werkzeug's per-request access log quiet; tracebacks (ERROR) still show.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    MOTO = load_moto(args.iam_enforce)
    STATE = FakeState(args.iam_enforce)

    moto_server = MOTO.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto_server.start()
    STATE.moto_port = moto_server.get_host_and_port()[1]

    httpd = ProxyServer(("127.0.0.1", 0), Handler)
    port = httpd.server_address[1]
    proxy_thread = threading.Thread(target=httpd.serve_forever, name="kms-proxy", daemon=True)
    proxy_thread.start()

    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.exit_on_stdin_eof:
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    log(
        f"moto on 127.0.0.1:{STATE.moto_port}, proxy on 127.0.0.1:{port}, "
        f"iam_enforce={args.iam_enforce}"
    )
    sys.stdout.write(f"listening on http://127.0.0.1:{port}\n")
    sys.stdout.flush()

    while not stop.is_set():
        stop.wait(0.5)

    log("shutting down")
    httpd.shutdown()
    httpd.server_close()
    try:
        moto_server.stop()
    except Exception as e:  # pragma: no cover - best effort
        log(f"moto shutdown: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
