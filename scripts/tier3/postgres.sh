#!/usr/bin/env bash
# Tier 3: Debian PostgreSQL on the mounted file system.
#
# initdb --data-checksums on the mount, pgbench -i + a timed pgbench run, (earfs)
# a key rotation and `earfs reencrypt` of every file under pgbench load, a
# crash (pg_ctl stop -m immediate) under load, WAL recovery on restart,
# amcheck (bt_index_check heapallindexed + verify_heapam) and pgbench
# invariants, clean stop, unmount/remount, pg_checksums --check.
#
#   EARFS_FS         backend: earfs (default) | gocryptfs | raw
#   PG_SCALE         pgbench scale          (default 10)
#   PG_SECONDS       pgbench run length     (default 30)
#   PG_CLIENTS       pgbench clients        (default 4)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=../lib/mountfs.sh
# shellcheck source=../lib/mountfs.sh
source "$here/../lib/mountfs.sh"

BACKEND="${EARFS_FS:-earfs}"
SCALE="${PG_SCALE:-10}"
SECS="${PG_SECONDS:-30}"
CLIENTS="${PG_CLIENTS:-4}"
start=$SECONDS

PGBIN="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)"
[[ -n "$PGBIN" && -x "$PGBIN/initdb" ]] || die "PostgreSQL server binaries not found; run scripts/deps-tier3.sh"
getent passwd postgres >/dev/null || die "no 'postgres' user; run scripts/deps-tier3.sh"

work="$(fs_mktemp pg)"
fs_setup "$BACKEND" "$work" --allow-other

PGDATA="$MNT/pgdata"
sockdir="$work/sock"   # unix socket outside the mount
pglog="$work/postgres.log"
port="$(fs_free_port)"
mkdir -p "$PGDATA" "$sockdir"
chown postgres:postgres "$PGDATA" "$sockdir"
chmod 0700 "$PGDATA"
touch "$pglog"
chown postgres:postgres "$pglog"

as_pg() { runuser -u postgres -- "$@"; }
psql_q() { as_pg "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -d postgres "$@"; }

pg_start() {
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$pglog" -w -t 300 \
        -o "-p $port -k $sockdir -c listen_addresses=127.0.0.1 -c checkpoint_timeout=30min -c max_wal_size=4GB -c log_checkpoints=on" \
        start >/dev/null
}
pg_running() { [[ -f "$PGDATA/postmaster.pid" ]] && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }
# Exit cleanup: never leave a server holding the mount.
pg_cleanup() {
    if fs_is_mounted "$MNT" 2>/dev/null || [[ "$BACKEND" == raw ]]; then
        if pg_running; then
            log "stopping leftover PostgreSQL server"
            as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w -t 60 stop >/dev/null 2>&1 || true
        fi
    fi
    if [[ "${pg_failed:-1}" == 1 && -s "$pglog" ]]; then
        log "last lines of the server log ($pglog):"
        tail -n 40 "$pglog" >&2 || true
    fi
}
fs_on_exit pg_cleanup
pg_failed=1

fail() {
    echo "FAIL: postgres $BACKEND: $*"
    exit 1
}

log "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on $BACKEND, port $port, data $PGDATA"
t0=$SECONDS
as_pg "$PGBIN/initdb" -D "$PGDATA" --data-checksums -U postgres --auth=trust \
    -E UTF8 --locale=C >"$work/initdb.log" 2>&1 || { cat "$work/initdb.log"; fail "initdb failed"; }
t_initdb=$((SECONDS - t0))
pg_start || fail "server did not start"

# --- load ---------------------------------------------------------------------
t0=$SECONDS
as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -i -s "$SCALE" -q postgres >"$work/pgbench-init.log" 2>&1 ||
    { cat "$work/pgbench-init.log"; fail "pgbench -i failed"; }
t_init=$((SECONDS - t0))

as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -c "$CLIENTS" -j 2 -T "$SECS" -P 10 postgres \
    >"$work/pgbench-run.log" 2>&1 || { cat "$work/pgbench-run.log"; fail "pgbench run failed"; }
tps="$(awk '/^tps = /{print $3; exit}' "$work/pgbench-run.log")"
ntx="$(awk -F': ' '/number of transactions actually processed/{split($2, a, "/"); print a[1]; exit}' "$work/pgbench-run.log")"
nfailed="$(awk -F': ' '/number of failed transactions/{print $2 + 0; exit}' "$work/pgbench-run.log")"
log "pgbench: tps=$tps transactions=$ntx failed=${nfailed:-0}"
[[ -n "$ntx" && "$ntx" -gt 0 ]] || fail "pgbench processed no transactions"

# --- online reencrypt under load (earfs) ----------------------------------------
# A new data key version, then every file rewritten under it by the running daemon
# while pgbench writes: first files the server does not hold open (rate-limited),
# then the open ones too (--include-open). The crash, recovery, amcheck and
# checksum checks below then run on the rewritten files.
reenc_line="not run (backend $BACKEND)"
if [[ "$BACKEND" == earfs ]]; then
    "$EARFS_BIN" rotate "$FS_BACKING" >/dev/null || fail "earfs rotate failed"
    as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -n -c "$CLIENTS" -j 2 -T 20 postgres \
        >"$work/pgbench-reencrypt.log" 2>&1 &
    bench_pid=$!
    sleep 2
    t0=$SECONDS
    rc=0
    "$EARFS_BIN" reencrypt --rate 100MiB/s "$MNT" >"$work/reencrypt-1.log" 2>&1 || rc=$?
    [[ "$rc" == 0 || "$rc" == 23 ]] || { cat "$work/reencrypt-1.log"; fail "earfs reencrypt failed (exit $rc)"; }
    "$EARFS_BIN" reencrypt --include-open "$MNT" >"$work/reencrypt-2.log" 2>&1 ||
        { cat "$work/reencrypt-2.log"; fail "earfs reencrypt --include-open failed"; }
    t_reenc=$((SECONDS - t0))
    wait "$bench_pid" || { cat "$work/pgbench-reencrypt.log"; fail "pgbench failed while the files were rewritten"; }
    ntx_reenc="$(awk -F': ' '/number of transactions actually processed/{split($2, a, "/"); print a[1]; exit}' "$work/pgbench-reencrypt.log")"
    # Files written since under the new key are fine; none may be left on version 1.
    keys_out="$("$EARFS_BIN" keys --json "$FS_BACKING")"
    old_files="$(python3 -c 'import json,sys; k=json.load(sys.stdin); print(sum(n for v, n in k["files"]["key_versions"].items() if v != str(k["current_key_version"])))' <<<"$keys_out" 2>/dev/null || echo "?")"
    [[ "$old_files" == 0 ]] || { echo "$keys_out"; fail "$old_files file(s) still on an old key version after reencrypt"; }
    reenc_line="$(grep -m1 'rewritten under' "$work/reencrypt-1.log"), then with --include-open: $(grep -m1 'rewritten under' "$work/reencrypt-2.log") (${t_reenc}s in all; pgbench ran $ntx_reenc transactions meanwhile)"
    log "online reencrypt: $reenc_line"
fi

# --- crash under load ---------------------------------------------------------
# -n: no pre-run vacuum (it would TRUNCATE pgbench_history, defeating the
# history/balance checks below).
as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -n -c "$CLIENTS" -j 2 -T 60 postgres \
    >"$work/pgbench-crash.log" 2>&1 &
bench_pid=$!
sleep 10
crash_line=$(($(wc -l <"$pglog") + 1))
log "crashing the server (pg_ctl stop -m immediate) under pgbench load"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w -t 60 stop >/dev/null || fail "immediate stop failed"
wait "$bench_pid" || true   # clients see the connection drop; expected

# --- recovery -----------------------------------------------------------------
t0=$SECONDS
pg_start || fail "server did not restart after the crash"
t_recovery=$((SECONDS - t0))
recovery_lines="$(tail -n +"$crash_line" "$pglog" |
    grep -E 'not properly shut down|interrupted|automatic recovery|redo starts|redo done|invalid record|ready to accept' || true)"
printf '%s\n' "$recovery_lines" | sed 's/^/  recovery: /' >&2
grep -q 'not properly shut down' <<<"$recovery_lines" || fail "no 'database system was not properly shut down' in the log"
grep -q 'redo done' <<<"$recovery_lines" || fail "no 'redo done' in the log"
if tail -n +"$crash_line" "$pglog" | grep -E 'PANIC|invalid page|checksum verification failed|could not read block' >&2; then
    fail "errors in the server log after recovery"
fi

# --- verification ------------------------------------------------------------
accounts="$(psql_q -c "SELECT count(*) FROM pgbench_accounts")"
[[ "$accounts" == "$((SCALE * 100000))" ]] || fail "pgbench_accounts has $accounts rows, expected $((SCALE * 100000))"
history="$(psql_q -c "SELECT count(*) FROM pgbench_history")"
[[ "$history" -ge "$ntx" ]] || fail "pgbench_history has $history rows, fewer than the $ntx committed in the timed run"
# Every pgbench transaction adds the same delta to one account, teller,
# branch and history row, so all four sums must agree after recovery.
sums="$(psql_q -c "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ' ' ||
    (SELECT sum(tbalance) FROM pgbench_tellers) || ' ' ||
    (SELECT sum(bbalance) FROM pgbench_branches) || ' ' ||
    (SELECT coalesce(sum(delta), 0) FROM pgbench_history)")"
read -r s_a s_t s_b s_h <<<"$sums"
[[ "$s_a" == "$s_t" && "$s_t" == "$s_b" && "$s_b" == "$s_h" ]] ||
    fail "pgbench balance invariants broken: accounts=$s_a tellers=$s_t branches=$s_b history=$s_h"

t0=$SECONDS
psql_q -c "CREATE EXTENSION IF NOT EXISTS amcheck" || fail "CREATE EXTENSION amcheck failed"
nidx="$(psql_q -c "
    SELECT count(bt_index_check(index => c.oid, heapallindexed => true))
    FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_am am ON am.oid = c.relam
    WHERE am.amname = 'btree' AND i.indrelid::regclass::text LIKE 'pgbench_%'")" ||
    fail "amcheck bt_index_check reported corruption"
[[ "$nidx" -ge 3 ]] || fail "amcheck checked only $nidx pgbench indexes"
heap_bad="$(psql_q -c "
    SELECT count(*) FROM (VALUES ('pgbench_accounts'), ('pgbench_branches'),
                                 ('pgbench_tellers'), ('pgbench_history')) t(rel),
    LATERAL verify_heapam(t.rel::regclass, check_toast => true)")" ||
    fail "verify_heapam failed"
[[ "$heap_bad" == 0 ]] || fail "verify_heapam reported $heap_bad corrupt tuples"
t_amcheck=$((SECONDS - t0))
log "amcheck: $nidx btree indexes ok (heapallindexed), verify_heapam clean"

# Clean stop, unmount/remount (cold page cache), then offline checksums.
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 120 stop >/dev/null || fail "clean stop failed"
fs_unmount || fail "unmount failed"
fs_mount
t0=$SECONDS
checksum_out="$(as_pg "$PGBIN/pg_checksums" --check -D "$PGDATA" 2>&1)" || {
    printf '%s\n' "$checksum_out"
    fail "pg_checksums --check failed"
}
t_checksums=$((SECONDS - t0))
bad_checksums="$(awk -F': *' '/Bad checksums/{print $2}' <<<"$checksum_out")"
scanned="$(awk -F': *' '/Blocks scanned/{print $2}' <<<"$checksum_out")"

# Start once more on the fresh mount to prove the cluster is usable.
pg_start || fail "server did not start after remount"
accounts2="$(psql_q -c "SELECT count(*) FROM pgbench_accounts")"
[[ "$accounts2" == "$accounts" ]] || fail "row count changed across remount ($accounts -> $accounts2)"
as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 120 stop >/dev/null || fail "final stop failed"
pg_failed=0

echo "postgres summary ($BACKEND, PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}')):"
echo "  initdb: ${t_initdb}s   pgbench -i -s $SCALE: ${t_init}s"
echo "  pgbench -c $CLIENTS -T $SECS: tps=$tps, $ntx transactions"
echo "  online reencrypt under pgbench: $reenc_line"
echo "  crash under load + restart: recovery took ${t_recovery}s; log lines:"
printf '%s\n' "$recovery_lines" | sed 's/^.*\(LOG\|FATAL\|PANIC\): */    /'
echo "  rows: pgbench_accounts=$accounts, pgbench_history=$history (>= $ntx), balance sums equal ($s_a)"
echo "  amcheck: $nidx btree indexes bt_index_check(heapallindexed) ok, verify_heapam clean (${t_amcheck}s)"
echo "  pg_checksums --check after remount: $scanned blocks scanned, bad checksums: $bad_checksums (${t_checksums}s)"
echo "PASS: postgres $BACKEND ($((SECONDS - start)) s)"
