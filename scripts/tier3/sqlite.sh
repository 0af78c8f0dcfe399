#!/usr/bin/env bash
# Tier 3: SQLite in WAL mode (with mmap) on the mounted file system.
#
# Phase 1 (python3 sqlite3): WAL, mmap_size=256MiB, many inserts/updates/
#   deletes in transactions, passive/full/restart/truncate checkpoints, a
#   concurrent reader connection, and it ends by _exit()ing with committed
#   but un-checkpointed WAL frames left behind (-wal/-shm files stay).
# Unmount + remount.
# Phase 2: reopen (WAL replay), PRAGMA integrity_check = ok, row count and a
#   content digest must equal what phase 1 committed, every row's hash checks;
#   more writes, VACUUM, wal_checkpoint(TRUNCATE), integrity_check again.
# Unmount + remount; sqlite3 CLI integrity_check (with mmap) must print ok.
#
#   EARFS_FS         backend: earfs (default) | gocryptfs | raw
#   SQLITE_ROWS      rows inserted in phase 1 (default 30000, ~50 MB)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=../lib/mountfs.sh
# shellcheck source=../lib/mountfs.sh
source "$here/../lib/mountfs.sh"

BACKEND="${EARFS_FS:-earfs}"
ROWS="${SQLITE_ROWS:-30000}"
start=$SECONDS

command -v sqlite3 >/dev/null || die "sqlite3 CLI not found; run scripts/deps-tier3.sh"
command -v python3 >/dev/null || die "python3 not found; run scripts/deps-tier3.sh"

work="$(fs_mktemp sqlite)"
fs_setup "$BACKEND" "$work"
DB="$MNT/test.db"
state="$work/state.json"   # expected contents, kept outside the mount

fail() {
    echo "FAIL: sqlite $BACKEND: $*"
    exit 1
}

cat >"$work/sqlite_t3.py" <<'PYEOF'
import hashlib, json, os, random, sqlite3, sys, time

phase, db, state_path, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
MMAP = 256 * 1024 * 1024


def connect():
    c = sqlite3.connect(db, isolation_level=None, timeout=30)
    c.execute("PRAGMA mmap_size=%d" % MMAP)
    got = c.execute("PRAGMA mmap_size").fetchone()[0]
    assert got == MMAP, "mmap_size not applied: %r" % got
    c.execute("PRAGMA synchronous=FULL")
    return c


def digest(c):
    h = hashlib.sha256()
    n = 0
    for rid, k, v, vh in c.execute("SELECT id, k, v, h FROM t ORDER BY id"):
        if hashlib.sha256(v).hexdigest() != vh:
            raise SystemExit("row %d: stored hash does not match its blob" % rid)
        h.update(b"%d|%s|%s|" % (rid, k.encode(), vh.encode()))
        n += 1
    return n, h.hexdigest()


def integrity(c):
    res = [r[0] for r in c.execute("PRAGMA integrity_check")]
    if res != ["ok"]:
        raise SystemExit("integrity_check: %r" % res[:20])
    return res[0]


def blob(rng):
    return rng.randbytes(rng.choice([16, 100, 400, 1000, 2500, 6000]))


def write_phase():
    rng = random.Random(42)
    c = connect()
    mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    assert mode == "wal", mode
    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v BLOB, h TEXT)")
    c.execute("CREATE INDEX t_h ON t(h)")
    reader = connect()  # second connection: reads through mmap + the -shm index
    ckpts = {"PASSIVE": 0, "FULL": 0, "RESTART": 0, "TRUNCATE": 0}
    nid = 0
    txn = 0
    t0 = time.time()
    while nid < rows:
        c.execute("BEGIN")
        for _ in range(min(250, rows - nid)):
            nid += 1
            v = blob(rng)
            c.execute("INSERT INTO t (id, k, v, h) VALUES (?, ?, ?, ?)",
                      (nid, "key-%08d" % nid, v, hashlib.sha256(v).hexdigest()))
        # churn: update and delete some earlier rows
        for _ in range(25):
            rid = rng.randint(1, nid)
            v = blob(rng)
            c.execute("UPDATE t SET v = ?, h = ? WHERE id = ?", (v, hashlib.sha256(v).hexdigest(), rid))
        for _ in range(3):
            c.execute("DELETE FROM t WHERE id = ?", (rng.randint(1, nid),))
        c.execute("COMMIT")
        txn += 1
        if txn % 5 == 0:
            # concurrent reader sees a consistent snapshot
            n = reader.execute("SELECT count(*) FROM t").fetchone()[0]
            assert 0 < n <= nid
            reader.execute("SELECT sum(length(v)) FROM t WHERE id % 97 = 0").fetchone()
        if txn % 10 == 0:
            kind = ["PASSIVE", "FULL", "RESTART", "TRUNCATE"][(txn // 10) % 4]
            busy, _, _ = c.execute("PRAGMA wal_checkpoint(%s)" % kind).fetchone()
            ckpts[kind] += 1
    integrity(c)
    # A last committed transaction that is never checkpointed: the process
    # exits without closing, so the -wal file must be replayed on reopen.
    c.execute("BEGIN")
    for _ in range(300):
        nid += 1
        v = blob(rng)
        c.execute("INSERT INTO t (id, k, v, h) VALUES (?, ?, ?, ?)",
                  (nid, "key-%08d" % nid, v, hashlib.sha256(v).hexdigest()))
    c.execute("COMMIT")
    n, d = digest(c)
    wal = os.path.getsize(db + "-wal") if os.path.exists(db + "-wal") else 0
    with open(state_path, "w") as f:
        json.dump({"rows": n, "digest": d, "max_id": nid}, f)
    print("phase1: %d rows (%d transactions) in %.1fs, checkpoints %s, "
          "db %d bytes, wal left %d bytes" % (n, txn + 1, time.time() - t0, ckpts,
                                               os.path.getsize(db), wal), flush=True)
    if wal == 0:
        raise SystemExit("expected a non-empty -wal file to be left behind")
    os._exit(0)  # no close(): leave the WAL un-checkpointed


def verify_phase():
    st = json.load(open(state_path))
    had_wal = os.path.exists(db + "-wal") and os.path.getsize(db + "-wal") > 0
    c = connect()
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ok = integrity(c)
    n, d = digest(c)
    if (n, d) != (st["rows"], st["digest"]):
        raise SystemExit("content mismatch after remount: %d rows %s, expected %d rows %s"
                         % (n, d, st["rows"], st["digest"]))
    print("phase2: wal present at reopen: %s; integrity_check: %s; %d rows, digest matches"
          % (had_wal, ok, n), flush=True)
    rng = random.Random(7)
    nid = st["max_id"]
    for _ in range(20):
        c.execute("BEGIN")
        for _ in range(200):
            nid += 1
            v = blob(rng)
            c.execute("INSERT INTO t (id, k, v, h) VALUES (?, ?, ?, ?)",
                      (nid, "key-%08d" % nid, v, hashlib.sha256(v).hexdigest()))
        c.execute("DELETE FROM t WHERE id %% 101 = %d" % rng.randint(0, 100))
        c.execute("COMMIT")
    c.execute("VACUUM")
    busy, _, _ = c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0, "TRUNCATE checkpoint was blocked"
    integrity(c)
    n, d = digest(c)
    with open(state_path, "w") as f:
        json.dump({"rows": n, "digest": d, "max_id": nid}, f)
    c.close()
    print("phase2: after more writes + VACUUM + wal_checkpoint(TRUNCATE): %d rows, integrity ok" % n)


def final_phase():
    st = json.load(open(state_path))
    c = connect()
    integrity(c)
    n, d = digest(c)
    if (n, d) != (st["rows"], st["digest"]):
        raise SystemExit("content mismatch after second remount")
    c.close()
    print("phase3: %d rows, digest matches, integrity ok" % n)


{"write": write_phase, "verify": verify_phase, "final": final_phase}[phase]()
PYEOF

py() { python3 "$work/sqlite_t3.py" "$1" "$DB" "$state" "$ROWS"; }

log "sqlite on $BACKEND: $ROWS rows, WAL + mmap"
t0=$SECONDS
py write || fail "phase 1 (writes) failed"
t_write=$((SECONDS - t0))
[[ -s "$DB-wal" ]] || fail "no -wal file left after phase 1"

fs_unmount || fail "unmount failed"
fs_mount
t0=$SECONDS
py verify || fail "phase 2 (reopen after remount) failed"

fs_unmount || fail "unmount failed"
fs_mount
py final || fail "phase 3 failed"
# The CLI, with mmap, must also say ok.
cli="$(sqlite3 "$DB" "PRAGMA mmap_size=268435456;" "PRAGMA integrity_check;" "PRAGMA journal_mode;" "SELECT count(*) FROM t;" 2>&1)" ||
    fail "sqlite3 CLI failed: $cli"
mapfile -t cli_lines <<<"$cli"
[[ "${cli_lines[1]:-}" == ok ]] || fail "sqlite3 CLI integrity_check: $cli"
[[ "${cli_lines[2]:-}" == wal ]] || fail "journal_mode is not wal: $cli"
t_verify=$((SECONDS - t0))

echo "sqlite summary ($BACKEND): writes ${t_write}s, remount+verify ${t_verify}s;" \
    "sqlite3 CLI: integrity_check=${cli_lines[1]} journal_mode=${cli_lines[2]} rows=${cli_lines[3]:-?}"
echo "PASS: sqlite $BACKEND ($((SECONDS - start)) s)"
