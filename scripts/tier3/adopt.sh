#!/usr/bin/env bash
# Tier 3: `earfs adopt` of real, stopped databases, then the database started on the
# mount at its old path.
#
# PostgreSQL: initdb --data-checksums and pgbench -i in a plain directory, the server
# stopped, `earfs adopt` (--kms local) of the data directory, the volume mounted at
# the old path (its root keeps 0700 postgres:postgres), the server started on it:
# amcheck (bt_index_check heapallindexed + verify_heapam) clean, the pgbench rows
# and their content the same, a short pgbench run, a clean stop, pg_checksums --check.
#
# RocksDB: a database (db_bench fillseq) and a checkpoint of it (`ldb checkpoint`:
# hard links to the SST files) in one directory, adopted and mounted at the old
# path: ldb checkconsistency on both, the same key count in both, and every file the
# checkpoint shares with the database still one inode on the mount.
#
# earfs only (adopt is earfs's own).
#
#   PG_SCALE       pgbench scale   (default 5)
#   ROCKSDB_NUM    keys            (default 200000)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=../lib/mountfs.sh
# shellcheck source=../lib/mountfs.sh
source "$here/../lib/mountfs.sh"

BACKEND="${EARFS_FS:-earfs}"
SCALE="${PG_SCALE:-5}"
NUM="${ROCKSDB_NUM:-200000}"
start=$SECONDS

if [[ "$BACKEND" != earfs ]]; then
    echo "SKIP: adopt: earfs only (EARFS_FS=$BACKEND)"
    exit 0
fi
[[ -x "$EARFS_BIN" ]] || die "earfs binary not found at $EARFS_BIN (set EARFS_BIN)"
PGBIN="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)"
[[ -n "$PGBIN" && -x "$PGBIN/initdb" ]] || die "PostgreSQL server binaries not found; run scripts/deps-tier3.sh"
getent passwd postgres >/dev/null || die "no 'postgres' user; run scripts/deps-tier3.sh"
for t in db_bench ldb; do
    command -v "$t" >/dev/null || die "$t not found; run scripts/deps-tier3.sh (rocksdb-tools)"
done

fail() {
    echo "FAIL: adopt: $*"
    exit 1
}

work="$(fs_mktemp adopt)"
# mountfs.sh's exit trap: our cleanups, then fs_teardown (nothing left mounted under
# $work, which is removed on success).
FS_BACKEND=earfs
FS_WORKDIR="$work"
FS_LOG="$work/fs-daemon.log"
FS_BACKING="$work/pg/data.earfs"
key="$work/earfs.key"

PGDATA="$work/pg/data"
MNT="$PGDATA"
sockdir="$work/sock"
pglog="$work/postgres.log"
port="$(fs_free_port)"

as_pg() { runuser -u postgres -- "$@"; }
psql_q() { as_pg "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -d postgres "$@"; }
pg_start() {
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$pglog" -w -t 300 \
        -o "-p $port -k $sockdir -c listen_addresses=127.0.0.1" start >/dev/null
}
pg_stop() { as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 120 stop >/dev/null; }
pg_running() { [[ -f "$PGDATA/postmaster.pid" ]] && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }

# mount_at BACKING MOUNTPOINT: the volume, for other users too (postgres).
mount_at() {
    FS_BACKING="$1"
    local -a opts=(--allow-other --log-file "$FS_LOG")
    # Daemon output to a file: an inherited stdout would keep pipes open.
    "$EARFS_BIN" mount "${opts[@]}" "$1" "$2" >>"$FS_LOG" 2>&1 {__FS_OUT}>&- {__FS_ERR}>&- ||
        { cat "$FS_LOG" >&2; fail "earfs mount $1 $2 failed"; }
    MNT="$2"
}
unmount() {
    fs_unmount || fail "unmount of $MNT failed"
}

adopt_cleanup() {
    if pg_running 2>/dev/null; then
        log "stopping leftover PostgreSQL server"
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w -t 60 stop >/dev/null 2>&1 || true
    fi
    if [[ "${pg_failed:-0}" == 1 && -s "$pglog" ]]; then
        log "last lines of the server log ($pglog):"
        tail -n 40 "$pglog" >&2 || true
    fi
    # Every mount under $work (fs_teardown then checks that none is left).
    local mp
    while read -r mp; do
        "$EARFS_BIN" umount "$mp" 2>/dev/null || fusermount3 -u "$mp" 2>/dev/null || true
    done < <(awk -v w="$work" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r)
}
fs_on_exit adopt_cleanup

# adopt SRC BACKING LOG: `earfs adopt` (a new volume, --kms local), output shown.
adopt() {
    log "earfs adopt $1 $2"
    if ! "$EARFS_BIN" adopt --kms local --key-file "$key" "$1" "$2" >"$3" 2>&1; then
        cat "$3"
        fail "earfs adopt $1 failed"
    fi
    sed 's/^/  adopt: /' "$3" >&2
    [[ -z "$(ls -A "$1")" ]] || fail "$1 is not empty after the adopt"
}

# --- PostgreSQL ---------------------------------------------------------------------
pg_failed=1
mkdir -p "$work/pg" "$sockdir"
chown postgres:postgres "$work/pg" "$sockdir"
touch "$pglog"
chown postgres:postgres "$pglog"
log "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'): initdb + pgbench -i -s $SCALE in $PGDATA (plain)"
as_pg "$PGBIN/initdb" -D "$PGDATA" --data-checksums -U postgres --auth=trust \
    -E UTF8 --locale=C >"$work/initdb.log" 2>&1 || { cat "$work/initdb.log"; fail "initdb failed"; }
pg_start || fail "server did not start (plain)"
as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -i -s "$SCALE" -q postgres >"$work/pgbench-init.log" 2>&1 ||
    { cat "$work/pgbench-init.log"; fail "pgbench -i failed"; }
content_q="SELECT count(*) || ' ' || md5(string_agg(aid || ':' || bid || ':' || abalance, ',' ORDER BY aid)) FROM pgbench_accounts"
before="$(psql_q -c "$content_q")"
pg_stop || fail "stop (plain) failed"
root_before="$(stat -c '%a %U:%G' "$PGDATA")"
files_before="$(find "$PGDATA" -type f | wc -l)"
bytes_before="$(du -sb "$PGDATA" | awk '{print $1}')"

t0=$SECONDS
adopt "$PGDATA" "$work/pg/data.earfs" "$work/adopt-pg.log"
t_pg_adopt=$((SECONDS - t0))
mount_at "$work/pg/data.earfs" "$PGDATA"
root_after="$(stat -c '%a %U:%G' "$PGDATA")"
[[ "$root_after" == "$root_before" ]] || fail "the mount's root is $root_after, the data directory was $root_before"
files_after="$(find "$PGDATA" -type f | wc -l)"
[[ "$files_after" == "$files_before" ]] || fail "$files_after files on the mount, $files_before before"

pg_start || fail "server did not start on the adopted volume"
after="$(psql_q -c "$content_q")"
[[ "$after" == "$before" ]] || fail "pgbench_accounts: '$after' after the adopt, '$before' before"
psql_q -c "CREATE EXTENSION IF NOT EXISTS amcheck" || fail "CREATE EXTENSION amcheck failed"
nidx="$(psql_q -c "
    SELECT count(bt_index_check(index => c.oid, heapallindexed => true))
    FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_am am ON am.oid = c.relam
    WHERE am.amname = 'btree'")" || fail "amcheck bt_index_check reported corruption"
[[ "$nidx" -ge 3 ]] || fail "amcheck checked only $nidx btree indexes"
heap_bad="$(psql_q -c "
    SELECT count(*) FROM pg_class c, LATERAL verify_heapam(c.oid, check_toast => true)
    WHERE c.relkind IN ('r', 'm') AND c.relpersistence = 'p'")" || fail "verify_heapam failed"
[[ "$heap_bad" == 0 ]] || fail "verify_heapam reported $heap_bad corrupt tuples"
as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -c 4 -j 2 -T 5 postgres >"$work/pgbench-run.log" 2>&1 ||
    { cat "$work/pgbench-run.log"; fail "pgbench run on the adopted volume failed"; }
ntx="$(awk -F': ' '/number of transactions actually processed/{split($2, a, "/"); print a[1]; exit}' "$work/pgbench-run.log")"
[[ -n "$ntx" && "$ntx" -gt 0 ]] || fail "pgbench processed no transactions"
pg_stop || fail "clean stop on the adopted volume failed"
checksum_out="$(as_pg "$PGBIN/pg_checksums" --check -D "$PGDATA" 2>&1)" ||
    { printf '%s\n' "$checksum_out"; fail "pg_checksums --check failed"; }
bad_checksums="$(awk -F': *' '/Bad checksums/{print $2}' <<<"$checksum_out")"
unmount
pg_failed=0

# --- RocksDB ------------------------------------------------------------------------
rdir="$work/rocks"
DB="$rdir/db"
CK="$rdir/checkpoint"
mkdir -p "$rdir"
log "RocksDB: db_bench fillseq num=$NUM + ldb checkpoint in $rdir (plain)"
db_bench --db="$DB" --benchmarks=fillseq --num="$NUM" --value_size=200 --threads=1 \
    --write_buffer_size=4194304 --target_file_size_base=4194304 --seed=7 \
    >"$work/db_bench.log" 2>&1 || { tail -n 20 "$work/db_bench.log"; fail "db_bench fillseq failed"; }
ldb --db="$DB" checkpoint --checkpoint_dir="$CK" >"$work/checkpoint.log" 2>&1 ||
    { cat "$work/checkpoint.log"; fail "ldb checkpoint failed"; }
count() { ldb --db="$1" dump --count_only 2>&1 | awk -F': *' '/^Keys in range/{print $2}'; }
db_keys="$(count "$DB")"
ck_keys="$(count "$CK")"
[[ -n "$db_keys" && "$db_keys" -gt 0 && "$ck_keys" == "$db_keys" ]] || fail "key counts before the adopt: db '$db_keys', checkpoint '$ck_keys'"
# Files the checkpoint shares with the database (hard links).
shared="$(find "$CK" -type f -links +1 -name '*.sst' -printf '%f\n' | sort)"
nshared="$(grep -c . <<<"$shared" || true)"
[[ "$nshared" -gt 0 ]] || fail "the checkpoint shares no file with the database (no hard links)"

t0=$SECONDS
adopt "$rdir" "$work/rocks.earfs" "$work/adopt-rocks.log"
t_rocks_adopt=$((SECONDS - t0))
mount_at "$work/rocks.earfs" "$rdir"
# Before RocksDB opens anything (opening a database may replace its OPTIONS files).
while read -r f; do
    a="$(stat -c '%i %h' "$DB/$f")"
    b="$(stat -c '%i %h' "$CK/$f")"
    [[ "$a" == "$b" && "${a#* }" -ge 2 ]] || fail "$f: db '$a' and checkpoint '$b' are not one inode on the mount"
done <<<"$shared"
for d in "$DB" "$CK"; do
    ldb --db="$d" checkconsistency >"$work/ldb.log" 2>&1 || { cat "$work/ldb.log"; fail "ldb checkconsistency $d failed"; }
    grep -q OK "$work/ldb.log" || { cat "$work/ldb.log"; fail "ldb checkconsistency $d: no OK"; }
done
db_keys2="$(count "$DB")"
ck_keys2="$(count "$CK")"
[[ "$db_keys2" == "$db_keys" && "$ck_keys2" == "$ck_keys" ]] ||
    fail "key counts after the adopt: db $db_keys2 (was $db_keys), checkpoint $ck_keys2 (was $ck_keys)"
unmount

echo "adopt summary (PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'), RocksDB):"
echo "  PostgreSQL: $files_before files, $bytes_before bytes adopted in ${t_pg_adopt}s; root $root_after kept;"
echo "    pgbench_accounts '$after' equal; amcheck: $nidx btree indexes (heapallindexed) ok, verify_heapam clean;"
echo "    pgbench -T 5: $ntx transactions; pg_checksums --check: bad checksums $bad_checksums"
echo "  RocksDB: db + checkpoint adopted in ${t_rocks_adopt}s; checkconsistency OK on both; keys $db_keys2 = $db_keys;"
echo "    $nshared files shared by hard links, still one inode each on the mount"
echo "PASS: adopt $BACKEND ($((SECONDS - start)) s)"
