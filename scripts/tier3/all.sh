#!/usr/bin/env bash
# Tier 3: run every tier-3 suite for BACKEND=${EARFS_FS:-earfs}.
#
#   all.sh [--no-deps] [SUITE...]   SUITE: fsx pjdfstest postgres rocksdb sqlite powercut adopt
#
# Runs scripts/deps-tier3.sh first (idempotent; skip with --no-deps), then
# each suite in turn (a failing suite does not stop the others), then prints
# a table and one PASS/FAIL line.  For a backend other than gocryptfs,
# pjdfstest runs with --compare (gocryptfs baseline on the same machine).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
BACKEND="${EARFS_FS:-earfs}"
export EARFS_FS="$BACKEND"

deps=1
suites=()
for a in "$@"; do
    case "$a" in
        --no-deps) deps=0 ;;
        fsx | pjdfstest | postgres | rocksdb | sqlite | powercut | adopt) suites+=("$a") ;;
        *) echo "usage: $0 [--no-deps] [fsx|pjdfstest|postgres|rocksdb|sqlite|powercut|adopt]..." >&2; exit 2 ;;
    esac
done
if ((${#suites[@]} == 0)); then
    suites=(fsx pjdfstest postgres rocksdb sqlite)
    # powercut records earfs's own backing calls, adopt is earfs's own command: they
    # have no other backend.
    [[ "$BACKEND" == earfs ]] && suites+=(powercut adopt)
fi

[[ "$(id -u)" == 0 ]] || { echo "FAIL: tier3 $BACKEND: must run as root (FUSE allow_other, postgres user, pjdfstest)"; exit 1; }

start=$SECONDS
if [[ "$deps" == 1 ]]; then
    bash "$repo/scripts/deps-tier3.sh"
fi

declare -A result duration
failed=0
for s in "${suites[@]}"; do
    args=()
    if [[ "$s" == pjdfstest && "$BACKEND" != gocryptfs ]]; then
        args=(--compare)
    fi
    echo "=== tier3 $s ($BACKEND) ==="
    t0=$SECONDS
    if bash "$here/$s.sh" "${args[@]}"; then
        result[$s]=PASS
    else
        result[$s]=FAIL
        failed=$((failed + 1))
    fi
    duration[$s]=$((SECONDS - t0))
done

echo
echo "=== tier3 summary ($BACKEND) ==="
for s in "${suites[@]}"; do
    printf '  %-10s %s  %4ss\n' "$s" "${result[$s]}" "${duration[$s]}"
done
if ((failed)); then
    echo "FAIL: tier3 $BACKEND: $failed of ${#suites[@]} suites failed ($((SECONDS - start)) s)"
    exit 1
fi
echo "PASS: tier3 $BACKEND: all ${#suites[@]} suites passed ($((SECONDS - start)) s)"
