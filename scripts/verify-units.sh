#!/usr/bin/env bash
# Checks the systemd files in systemd/ with `systemd-analyze verify`, without systemd
# running as PID 1 (a container, CI):
#   - systemd/*.service (templates are verified as instance "example"),
#   - every drop-in directory systemd/examples/UNIT.d/ against its unit: ours (an
#     instance of a template in systemd/) or a stub standing in for the database's unit
#     (postgresql.service, yb-tserver.service, ...);
#   - that systemd/earfs-example.toml is valid TOML and spells every config key.
# Fails on any warning or error that systemd-analyze prints (it exits 0 on warnings
# such as "Unknown key" or "Invalid syntax, ignoring", so its output is read too),
# except the documented noise below.
#
# Usage: scripts/verify-units.sh [EARFS_BINARY]
#   EARFS_BINARY replaces /usr/local/bin/earfs in ExecStart= (systemd-analyze checks
#   that the command exists and is executable); default: `earfs` on PATH.
# Installs systemd-analyze if missing (Debian: it is in the `systemd` package,
# /usr/bin/systemd-analyze; installing the package needs no running systemd).
# Idempotent; takes about a second.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
units="$repo/systemd"

bin=${1:-$(command -v earfs || true)}
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  echo "verify-units: give the earfs binary: scripts/verify-units.sh target/release/earfs" >&2
  exit 2
fi
bin=$(realpath "$bin")

if ! command -v systemd-analyze >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# One flat directory, as a unit directory: systemd-analyze verify adds the directories
# of the files it is given to the unit search path, and finds NAME.d/ drop-ins next to
# NAME there (a drop-in in another directory is silently not read).
for f in "$units"/*.service; do
  sed "s#/usr/local/bin/earfs#$bin#g" "$f" >"$work/$(basename "$f")"
  if grep -q '/usr/local/bin/earfs' "$work/$(basename "$f")"; then
    echo "verify-units: ExecStart path not substituted in $f" >&2
    exit 1
  fi
done

targets=()
for f in "$units"/*.service; do
  name=$(basename "$f")
  case "$name" in
    *@.service) targets+=("$work/${name%@.service}@example.service") ;;
    *) targets+=("$work/$name") ;;
  esac
done
for d in "$units"/examples/*.d; do
  [ -d "$d" ] || continue
  unit=$(basename "$d" .d)
  mkdir -p "$work/$unit.d"
  cp "$d"/*.conf "$work/$unit.d/"
  template="${unit%%@*}@.service"
  if [[ "$unit" == *@*.service && -e "$work/$template" ]]; then
    :   # an instance of one of our templates: verified with its drop-in
  elif [ ! -e "$work/$unit" ]; then
    # the database's unit is not ours: a minimal stand-in to hang the drop-in on
    printf '[Unit]\nDescription=stand-in for %s\n\n[Service]\nExecStart=/bin/true\n' \
      "$unit" >"$work/$unit"
  fi
  targets+=("$work/$unit")
done

# Known noise, ignored (each line shown as "ignored: ..."):
#  - lines about system units outside our directory (/lib, /usr/lib, /etc/systemd):
#    they are loaded through default dependencies (sysinit.target, basic.target, ...),
#    are not ours, and differ between distributions and versions.
noise='^(/usr)?/lib/systemd/|^/etc/systemd/'

status=0
for t in "${targets[@]}"; do
  set +e
  out=$(cd "$work" && systemd-analyze verify --man=no "$t" 2>&1)
  rc=$?
  set -e
  bad=$(printf '%s\n' "$out" | grep -v -E "$noise" | grep -v '^$' || true)
  ignored=$(printf '%s\n' "$out" | grep -E "$noise" || true)
  [ -z "$ignored" ] || printf '%s\n' "$ignored" | sed "s/^/verify-units: ignored: /"
  if [ "$rc" -ne 0 ] || [ -n "$bad" ]; then
    echo "FAIL $(basename "$t") (systemd-analyze exit $rc):"
    printf '%s\n' "$bad" | sed "s#$work/##g; s/^/    /"
    status=1
  else
    drop=""
    if [ -d "$t.d" ]; then
      for c in "$t.d"/*.conf; do drop+=" + $(basename "$t").d/$(basename "$c")"; done
    fi
    echo "ok   $(basename "$t")$drop"
  fi
done

# The example config: valid TOML, and every key of the daemon's config (docs/
# operations.md) spelled right and in the right table, commented-out ones included.
if python3 -c 'import tomllib' 2>/dev/null; then
  if python3 - "$units/earfs-example.toml" <<'EOF'
import re, sys, tomllib
path = sys.argv[1]
text = open(path, encoding="utf-8").read()
tomllib.loads(text)
# uncomment "# key = value" lines to check the optional keys too
full = tomllib.loads(re.sub(r"(?m)^# ([a-z_]+ = )", r"\1", text))
want_top = {"backing", "mountpoint", "allow_other", "threads", "writeback_cache",
            "options", "log_level", "metrics_address", "stop_timeout", "kms"}
want_kms = {"credentials_file", "profile", "region", "endpoint_url", "deadline",
            "recheck_interval", "revocation_policy"}
errors = []
if set(full) != want_top:
    errors.append(f"top-level keys {sorted(set(full) ^ want_top)} missing or unknown")
if set(full.get("kms", {})) != want_kms:
    errors.append(f"[kms] keys {sorted(set(full.get('kms', {})) ^ want_kms)} missing or unknown")
for e in errors:
    print(f"FAIL earfs-example.toml: {e}")
sys.exit(1 if errors else 0)
EOF
  then
    echo "ok   earfs-example.toml (TOML, every config key)"
  else
    status=1
  fi
else
  echo "verify-units: python3 with tomllib (3.11+) not found; earfs-example.toml not checked"
fi

if [ "$status" -ne 0 ]; then
  echo "verify-units: FAILED" >&2
  exit 1
fi
echo "verify-units: all systemd files verified"
