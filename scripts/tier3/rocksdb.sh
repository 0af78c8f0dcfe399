#!/usr/bin/env bash
# Tier 3: RocksDB (Debian rocksdb-tools) on the mounted file system.
#
# db_bench fillrandom,readrandom,readseq with --verify_checksum=1; unmount,
# remount; readrandom,readseq again on the existing DB (same key count); then
# sst_dump --command=verify on every SST and ldb checkconsistency.
#
#   EARFS_FS         backend: earfs (default) | gocryptfs | raw
#   ROCKSDB_NUM      keys       (default 300000)
#   ROCKSDB_VALUE    value size (default 400)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=../lib/mountfs.sh
# shellcheck source=../lib/mountfs.sh
source "$here/../lib/mountfs.sh"

BACKEND="${EARFS_FS:-earfs}"
NUM="${ROCKSDB_NUM:-300000}"
VALUE="${ROCKSDB_VALUE:-400}"
start=$SECONDS

for t in db_bench sst_dump ldb; do
    command -v "$t" >/dev/null || die "$t not found; run scripts/deps-tier3.sh (rocksdb-tools)"
done

work="$(fs_mktemp rocksdb)"
fs_setup "$BACKEND" "$work"
DB="$MNT/rocksdb"

fail() {
    echo "FAIL: rocksdb $BACKEND: $*"
    exit 1
}

# Small memtables/SSTs so that the run flushes and compacts many times
# (several levels, many SST files), not just one big memtable.
common=(
    --db="$DB" --num="$NUM" --value_size="$VALUE" --threads=1
    --verify_checksum=1 --paranoid_checks=1 --statistics=0
    --write_buffer_size=8388608 --target_file_size_base=8388608
    --max_bytes_for_level_base=33554432 --seed=42
)

# bench NAME ARGS... : run db_bench, log to $work/NAME.log, fail on error.
bench() {
    local name="$1"
    shift
    if ! db_bench "${common[@]}" "$@" >"$work/$name.log" 2>&1; then
        grep -v '^\.\.\. finished' "$work/$name.log" | tr '\r' '\n' | grep -v '^\.\.\. finished' | tail -n 30
        fail "db_bench $name failed"
    fi
    if grep -Eiq 'corrupt|checksum mismatch|get error|iterator error' "$work/$name.log"; then
        grep -Ei 'corrupt|checksum mismatch|get error|iterator error' "$work/$name.log" | head -n 20
        fail "db_bench $name reported corruption"
    fi
}
# line BENCH LOG -> the db_bench result line for BENCH
line() { tr '\r' '\n' <"$2" | grep -E "^$1 +:" | tail -n 1 | sed 's/^ *//'; }
opsec() { line "$1" "$2" | sed -E 's/.* ([0-9]+) ops\/sec.*/\1/'; }
nops() { line "$1" "$2" | sed -E 's/.* ([0-9]+) operations.*/\1/'; }
found() { line "$1" "$2" | sed -nE 's/.*\(([0-9]+) of ([0-9]+) found\).*/\1/p'; }

log "db_bench fillrandom,readrandom,readseq on $BACKEND: num=$NUM value_size=$VALUE"
t0=$SECONDS
bench phase1 --benchmarks=fillrandom,readrandom,readseq --use_existing_db=0
t_phase1=$((SECONDS - t0))
fill_ops="$(opsec fillrandom "$work/phase1.log")"
rr1_ops="$(opsec readrandom "$work/phase1.log")"
rr1_found="$(found readrandom "$work/phase1.log")"
keys1="$(nops readseq "$work/phase1.log")"
[[ -n "$keys1" && "$keys1" -gt 0 ]] || fail "readseq saw no keys"
nsst_before="$(find "$DB" -name '*.sst' | wc -l)"

log "unmount + remount"
fs_unmount || fail "unmount failed"
fs_mount

t0=$SECONDS
bench phase2 --benchmarks=readrandom,readseq --use_existing_db=1
t_phase2=$((SECONDS - t0))
rr2_ops="$(opsec readrandom "$work/phase2.log")"
rr2_found="$(found readrandom "$work/phase2.log")"
keys2="$(nops readseq "$work/phase2.log")"
[[ "$keys2" == "$keys1" ]] || fail "key count changed across remount: $keys1 -> $keys2"
# (readrandom's "found" counts are not comparable between the two runs: the
# key sequence depends on the benchmark's position in --benchmarks.)
[[ -n "$rr2_found" && "$rr2_found" -gt 0 ]] || fail "readrandom after remount found no keys"

# Verify every SST file's block checksums, then the DB's consistency.
t0=$SECONDS
nsst="$(find "$DB" -name '*.sst' | wc -l)"
[[ "$nsst" -gt 0 ]] || fail "no SST files in $DB"
if ! sst_dump --file="$DB" --command=verify >"$work/sst_dump.log" 2>&1 ||
    grep -Eiq 'corrupt|mismatch|error' "$work/sst_dump.log"; then
    tail -n 30 "$work/sst_dump.log"
    fail "sst_dump --command=verify reported a problem"
fi
# sst_dump prints "Process FILE" and then "The file is ok" for every SST it
# verified; require one success line per SST.
verified="$(grep -c '^The file is ok' "$work/sst_dump.log" || true)"
[[ "$verified" == "$nsst" ]] || {
    tail -n 30 "$work/sst_dump.log"
    fail "sst_dump verified $verified of $nsst SST files"
}
if ! ldb --db="$DB" checkconsistency >"$work/ldb.log" 2>&1; then
    cat "$work/ldb.log"
    fail "ldb checkconsistency failed"
fi
t_verify=$((SECONDS - t0))

echo "rocksdb summary ($BACKEND, num=$NUM value_size=$VALUE):"
echo "  fillrandom: $fill_ops ops/sec"
echo "  readrandom: $rr1_ops ops/sec ($rr1_found of $NUM found)   [phase 1: ${t_phase1}s]"
echo "  after remount: readrandom $rr2_ops ops/sec ($rr2_found found), readseq $keys2 keys (= $keys1)   [${t_phase2}s]"
echo "  SST files: $nsst_before before remount, $nsst verified by sst_dump; ldb checkconsistency: $(tr -d '\n' <"$work/ldb.log")   [${t_verify}s]"
echo "PASS: rocksdb $BACKEND ($((SECONDS - start)) s)"
