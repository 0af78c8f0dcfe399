"""Driver and checker of the SQLite power-cut test (tests/powercut.rs).

  sqlite.py prepare DB        create the table, WAL mode
  sqlite.py write DB COUNT    commit transaction i (i = 0..COUNT), WAL mode,
                              synchronous=FULL; print "ack i" once COMMIT returned
  sqlite.py check DB ACKED    integrity_check is ok; every transaction i < ACKED is
                              present; the rows present are exactly transactions 0..n
                              (commits are acknowledged in order), each whole
"""
import sqlite3
import sys


def payload(i):
    # Rows of arbitrary lengths, so that pages fill and split unevenly.
    return "v%d:" % i + chr(97 + i % 26) * (1 + (i * 7919) % 3000)


def connect(path):
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA synchronous=FULL")
    return con


def prepare(path):
    con = connect(path)
    mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    assert mode == "wal", mode
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    con.execute("CREATE TABLE c (k INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
    con.execute("CREATE INDEX t_v ON t (v)")
    con.execute("INSERT INTO c VALUES (0, 0)")
    con.close()


def write(path, count):
    con = connect(path)
    # Checkpoint often: the run then also writes the database file and rewinds the WAL.
    con.execute("PRAGMA wal_autocheckpoint=40")
    for i in range(count):
        con.execute("BEGIN")
        con.execute("INSERT INTO t VALUES (?, ?)", (i, payload(i)))
        con.execute("UPDATE c SET n = ? WHERE k = 0", (i + 1,))
        con.execute("COMMIT")
        print("ack %d" % i, flush=True)
    con.close()


def check(path, acked):
    con = connect(path)
    res = [r[0] for r in con.execute("PRAGMA integrity_check")]
    if res != ["ok"]:
        print("integrity_check: %s" % "; ".join(res[:5]))
        return 1
    rows = con.execute("SELECT id, v FROM t ORDER BY id").fetchall()
    for n, (i, v) in enumerate(rows):
        if i != n or v != payload(i):
            print("row %d is id %s (%d bytes), not transaction %d" % (n, i, len(v), n))
            return 1
    if len(rows) < acked:
        print("%d transactions present, %d acknowledged: transaction %d lost"
              % (len(rows), acked, len(rows)))
        return 1
    (c,) = con.execute("SELECT n FROM c WHERE k = 0").fetchone()
    if c != len(rows):
        print("counter %d but %d rows: a transaction is half there" % (c, len(rows)))
        return 1
    print("ok: %d transactions (%d acknowledged)" % (len(rows), acked))
    return 0


def main():
    cmd, path = sys.argv[1], sys.argv[2]
    if cmd == "prepare":
        prepare(path)
        return 0
    if cmd == "write":
        write(path, int(sys.argv[3]))
        return 0
    if cmd == "check":
        return check(path, int(sys.argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
