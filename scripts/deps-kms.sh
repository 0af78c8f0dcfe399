#!/usr/bin/env bash
# Installs what the KMS fakes (tests/fakes/) need: moto's server extra (moto[server]
# 5.2.x, which brings flask, flask-cors, boto3 and cryptography) for python3; the
# Cloud KMS fake uses only the standard library and cryptography.
# Idempotent and quick when all is there: pip only runs when the import check fails
# or the installed moto version is outside [5.2.1, 5.3).
set -euo pipefail
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null; then
  echo "deps-kms: $PY is required" >&2
  exit 1
fi
check() {
  "$PY" - <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
import moto.server, flask, flask_cors, boto3, botocore, cryptography  # noqa: F401
v = tuple(int(p) for p in version("moto").split(".")[:3] if p.isdigit())
sys.exit(0 if (5, 2, 1) <= v < (5, 3) else 1)
PYEOF
}
if ! check; then
  "$PY" -m pip install -q 'moto[server]>=5.2.1,<5.3'
  if ! check; then
    echo "deps-kms: moto[server] 5.2.x is still not importable after pip install" >&2
    exit 1
  fi
fi
