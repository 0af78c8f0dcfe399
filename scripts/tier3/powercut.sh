#!/usr/bin/env bash
# Tier 3: power cuts under real databases (tests/powercut.rs).
#
# RocksDB (Put with sync=true), SQLite (WAL, synchronous=FULL) and PostgreSQL
# (synchronous_commit=on, data checksums) commit on an earfs mount served by
# the test process, which records every backing call of the fs core; crash
# states at many cut points are rebuilt under the persistence model of
# docs/architecture.md ("Crash consistency"), mounted, recovered and checked
# by the database (every acknowledged commit present, ldb checkconsistency,
# integrity_check, amcheck, pg_checksums). The same RocksDB run on a format-v1
# volume must lose a synced Put (v1's tail window); on v2 nothing may fail.
#
#   EARFS_POWERCUT_CUTS     cut points per RocksDB/SQLite run (default 30)
#   EARFS_POWERCUT_PG_CUTS  cut points of the PostgreSQL run   (default 10)
#   EARFS_POWERCUT_STATES   crash states per cut point          (default 2)
#   EARFS_POWERCUT_COMMITS  commits per RocksDB/SQLite run      (default 300)
#   EARFS_POWERCUT_SEED     seed of the cut points and states   (default 1)
#   EARFS_MOUNT_ARGS        --no-writeback-cache: record without the writeback cache
#                           (on by default, as in the daemon)
#
# scripts/powercut-soak.sh runs it with large counts over many seeds.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
BACKEND="${EARFS_FS:-earfs}"
start=$SECONDS

fail() {
    echo "FAIL: powercut $BACKEND: $*"
    exit 1
}

# The test drives earfs's own fs core: there is no other backend to record.
[[ "$BACKEND" == earfs ]] || fail "records earfs's own backing calls: EARFS_FS must be earfs"
[[ "$(id -u)" == 0 ]] || fail "must run as root (FUSE allow_other, the postgres user)"
for t in g++ python3 ldb timeout runuser; do
    command -v "$t" >/dev/null || fail "$t not found; run scripts/deps-tier3.sh"
done
[[ -f /usr/include/rocksdb/db.h ]] || fail "librocksdb-dev not installed; run scripts/deps-tier3.sh"

if [[ " ${EARFS_MOUNT_ARGS:-} " == *" --no-writeback-cache "* ]]; then
    export EARFS_POWERCUT_WRITEBACK=0
fi

log="$(mktemp "${TMPDIR:-/tmp}/earfs-powercut.XXXXXX.log")"
cd "$repo"
if ! cargo test --release --test powercut -- --ignored --nocapture --test-threads=1 >"$log" 2>&1; then
    grep -E 'powercut|^(rocksdb|sqlite|postgres)|panicked|FAILED|failed' "$log" | tail -n 60
    fail "see $log"
fi
echo "powercut summary (writeback cache: ${EARFS_POWERCUT_WRITEBACK:-1}):"
grep -oE '(powercut [a-z]+ V[12]: |(rocksdb|sqlite|postgres) v[12]: ).*' "$log" | sed 's/^/  /'
rm -f "$log"
echo "PASS: powercut $BACKEND ($((SECONDS - start)) s)"
