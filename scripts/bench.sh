#!/usr/bin/env bash
# The benchmark: the raw backing filesystem, earfs (its default: the writeback cache on),
# earfs without the writeback cache, and gocryptfs, side by side in one run.
#
#   scripts/bench.sh [--quick] [--rounds N] [--backends "raw earfs ..."] [--groups "..."]
#                    [--out DIR] [--no-docs]
#
# Jobs, in five groups (one mount per group, backend and round):
#   fio-write   1 MiB sequential write, 4 KiB random write (each ends with fsync),
#               4 KiB append + fdatasync (IOPS and p99 latency)
#   fio-read    1 MiB sequential read, 4 KiB random read (buffered and O_DIRECT),
#               random read with 2, 4 and 8 jobs, mixed 70/30 16 KiB (ends with fsync);
#               on a file written and synced first, with the page cache dropped before
#               each job
#   rocksdb     db_bench fillrandom, overwrite, readrandom, overwrite with sync
#   pgbench     initdb, pgbench -i (timed), pgbench TPS with 4 clients
#   metadata    create, stat, readdir and unlink of 100,000 files (10,000 with --quick;
#               fewer where the hard descriptor limit is lower, see below)
#
# Rounds interleave the backends (raw earfs earfs-nowb gocryptfs, raw earfs …) group by
# group, so that each ratio compares runs seconds apart: this machine is shared and its
# disk's speed drifts over minutes. Each job's result is the median over the rounds, and
# its ratio the median of the per-round ratios to raw.
#
# Write jobs end with an fsync of their file, timed and added to fio's runtime, so raw
# means the disk, not the page cache. For each job on a FUSE backend the daemon's CPU time
# and its peak resident memory are recorded.
#
# Output: $OUT (default target/bench/<date>) holds results.jsonl (one line per run),
# results.json (medians and ratios), report.md and performance.svg. Unless --no-docs,
# docs/performance.md (the section between its bench.sh markers), docs/performance.svg
# and docs/bench-results.json are updated too.
#
# Installs what it needs (fio, RocksDB tools, PostgreSQL, gocryptfs, matplotlib) through
# scripts/deps-tier3.sh and apt-get, and builds earfs if target/release/earfs is missing.
# Interrupting it (Ctrl-C) unmounts what it mounted; the results so far stay in $OUT.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

quick=0
rounds=""
backends_arg="raw earfs earfs-nowb gocryptfs"
groups_arg="fio-write fio-read rocksdb pgbench metadata"
out=""
docs=1
while (($#)); do
    case "$1" in
        --quick) quick=1 ;;
        --rounds) rounds="${2:?--rounds needs a number}"; shift ;;
        --backends) backends_arg="${2:?--backends needs a list}"; shift ;;
        --groups) groups_arg="${2:?--groups needs a list}"; shift ;;
        --out) out="${2:?--out needs a directory}"; shift ;;
        --no-docs) docs=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
read -r -a backends <<<"$backends_arg"
read -r -a groups <<<"$groups_arg"
for b in "${backends[@]}"; do
    case "$b" in raw | earfs | earfs-nowb | gocryptfs) ;; *) echo "bench.sh: unknown backend '$b' (raw, earfs, earfs-nowb, gocryptfs)" >&2; exit 2 ;; esac
done
[[ "${backends[0]}" == raw ]] || { echo "bench.sh: the first backend must be raw: every ratio is to it" >&2; exit 2; }
for g in "${groups[@]}"; do
    case "$g" in fio-write | fio-read | rocksdb | pgbench | metadata) ;; *) echo "bench.sh: unknown group '$g'" >&2; exit 2 ;; esac
done
[[ "$rounds" =~ ^[0-9]*$ ]] || { echo "bench.sh: --rounds takes a positive number" >&2; exit 2; }

# Sizes: quick mode finishes in about five minutes; the full mode measures longer.
if ((quick)); then
    rounds="${rounds:-1}"
    fsize=256M secs=3 rocks_num=100000 rocks_sync=2000 pg_scale=2 pg_secs=5 meta_files=10000
else
    rounds="${rounds:-3}"
    fsize=1G secs=8 rocks_num=300000 rocks_sync=5000 pg_scale=10 pg_secs=15 meta_files=100000
fi
((rounds >= 1)) || { echo "bench.sh: --rounds takes a positive number" >&2; exit 2; }
# earfs holds one descriptor for each file the kernel knows, up to its hard RLIMIT_NOFILE
# less a reserve of a sixteenth (docs/operations.md, "Descriptors"). Where the hard limit
# (inherited from this shell) is lower than the metadata job needs, the job shrinks to
# fit, and the report says how many files it used.
nofile="$(ulimit -Hn)"
if [[ "$nofile" =~ ^[0-9]+$ ]]; then
    reserve=$((nofile / 16)); ((reserve < 32)) && reserve=32; ((reserve > 4096)) && reserve=4096
    fit=$((nofile - reserve - 500))
    if ((meta_files > fit)); then
        echo "bench.sh: the metadata job uses $fit files, not $meta_files: the hard descriptor limit is $nofile (raise it with ulimit -Hn as a user with CAP_SYS_RESOURCE)" >&2
        meta_files="$fit"
    fi
fi

# --- what it needs ------------------------------------------------------------------
[[ $EUID == 0 ]] || { echo "bench.sh: run as root (it mounts, drops caches and runs PostgreSQL as postgres)" >&2; exit 1; }
"$here/deps-tier3.sh" >/dev/null
# The chart: Debian's matplotlib, for Debian's python3 (a python3 earlier in PATH, such as
# pyenv's, would not see it).
report_py=/usr/bin/python3
"$report_py" -c 'import matplotlib' 2>/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-matplotlib >/dev/null
}
export EARFS_BIN="${EARFS_BIN:-$repo/target/release/earfs}"
[[ -x "$EARFS_BIN" ]] || (cd "$repo" && cargo build --release --quiet)

out="${out:-$repo/target/bench/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
results="$out/results.jsonl"
: >"$results"
PGBIN="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d | sort -V | tail -n 1)"

# shellcheck source=scripts/lib/mountfs.sh
source "$here/lib/mountfs.sh"

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# The FUSE daemon of the mounted volume: pid, CPU seconds, peak resident KiB.
DPID=""
daemon_pid() {
    DPID=""
    [[ "$BACKEND" == raw ]] && return 0
    DPID="$(pgrep -o -f -- "$FS_BACKING" || true)"
    [[ -n "$DPID" ]] || die "no daemon process found for $FS_BACKING"
}
daemon_cpu() { # utime + stime, in seconds
    [[ -n "$DPID" ]] || { echo 0; return; }
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.3f\n", ($12 + $13) / hz }' "/proc/$DPID/stat"
}
daemon_hwm() { # VmHWM, KiB
    [[ -n "$DPID" ]] || { echo 0; return; }
    awk '/^VmHWM:/ { print $2 }' "/proc/$DPID/status"
}
now() { date +%s.%N; }

# record JOB METRICS_JSON CPU0 T0: one line of results.jsonl
record() {
    local cpu1 t1
    cpu1="$(daemon_cpu)"
    t1="$(now)"
    python3 - "$results" "$ROUND" "$BACKEND" "$1" "$2" "$3" "$cpu1" "$4" "$t1" "$(daemon_hwm)" <<'EOF'
import json, sys
path, rnd, backend, job, metrics, cpu0, cpu1, t0, t1, hwm = sys.argv[1:]
line = {"round": int(rnd), "backend": backend, "job": job, "metrics": json.loads(metrics),
        "wall_s": round(float(t1) - float(t0), 3)}
if backend != "raw":
    line["daemon_cpu_s"] = round(float(cpu1) - float(cpu0), 3)
    line["daemon_peak_rss_kib"] = int(hwm)
with open(path, "a") as f:
    f.write(json.dumps(line) + "\n")
EOF
}

# fio_job JOB [--sync FILE] ARGS...: run fio in $MNT and record its IOPS, bandwidth and
# p99 latencies. With --sync, FILE is fsynced after fio's run and the fsync's time is
# added to the run's: bytes / (fio's runtime + that fsync) is then the rate at which the
# data reached the disk, not the page cache. (fio's end_fsync is not counted in its
# runtime, and timing fio's process adds about 0.4 s of its start-up.)
fio_job() {
    local job="$1" sync_file="" cpu0 t0 sync_s=0 json="$out/fio-$ROUND-$BACKEND-$1.json"
    shift
    if [[ "${1:-}" == --sync ]]; then sync_file="$2"; shift 2; fi
    cpu0="$(daemon_cpu)"
    t0="$(now)"
    fio --name="$job" --directory="$MNT" --ioengine=psync --group_reporting \
        --output-format=json --output="$json" "$@" >/dev/null ||
        die "fio $job on $BACKEND failed"
    if [[ -n "$sync_file" ]]; then
        sync_s="$(python3 -c 'import os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR); t = time.monotonic(); os.fsync(fd)
print(time.monotonic() - t)' "$MNT/$sync_file")" || die "fsync of $sync_file on $BACKEND failed"
    fi
    record "$job" "$(python3 - "$json" "$sync_s" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))["jobs"][0]
sync_s = float(sys.argv[2])
r, w = d["read"], d["write"]
def p99(x):
    p = x.get("clat_ns", {}).get("percentile") or x.get("lat_ns", {}).get("percentile") or {}
    return p.get("99.000000", 0) / 1000
moved = r["io_bytes"] + w["io_bytes"]
# (runtime: the longest of the jobs; job_runtime would add them up.)
secs = max(r["runtime"], w["runtime"]) / 1000 + sync_s
m = {"bytes": moved, "seconds": secs, "final_fsync_s": sync_s, "MBps": moved / secs / 1e6,
     "iops": (r["total_ios"] + w["total_ios"]) / secs}
if r["io_bytes"]:
    m["read_p99_us"] = p99(r)
if w["io_bytes"]:
    m["write_p99_us"] = p99(w)
sync = d.get("sync", {}).get("lat_ns", {})
if sync.get("N"):
    m["sync_p99_us"] = sync["percentile"]["99.000000"] / 1000
    # One append + fdatasync as the application sees it: write + sync.
    m["commit_p99_us"] = m["sync_p99_us"] + m.get("write_p99_us", 0)
print(json.dumps(m))
EOF
)" "$cpu0" "$t0"
}

group_fio_write() {
    fio_job seqwrite-1m --sync seqwrite-1m.0.0 --rw=write --bs=1m --size="$fsize" --runtime="$secs"
    rm -f "$MNT"/seqwrite-1m.*
    drop_caches
    fio_job randwrite-4k --sync randwrite-4k.0.0 --rw=randwrite --bs=4k --size="$fsize" --runtime="$secs"
    rm -f "$MNT"/randwrite-4k.*
    drop_caches
    fio_job append-4k-fdatasync --rw=write --bs=4k --fdatasync=1 --size="$fsize" \
        --runtime="$secs" --time_based --file_append=1 --fallocate=none
    rm -f "$MNT"/append-4k-fdatasync.*
}

group_fio_read() {
    # One file, written and synced, then read with a cold cache by every job.
    local f=(--filename=data)
    fio --name=prep --directory="$MNT" --filename=data --rw=write --bs=1m --size="$fsize" \
        --end_fsync=1 --output=/dev/null >/dev/null || die "fio prep on $BACKEND failed"
    drop_caches
    fio_job seqread-1m "${f[@]}" --rw=read --bs=1m --size="$fsize" --runtime="$secs"
    drop_caches
    fio_job randread-4k "${f[@]}" --rw=randread --bs=4k --size="$fsize" --runtime="$secs" --time_based
    drop_caches
    fio_job randread-4k-direct "${f[@]}" --rw=randread --bs=4k --size="$fsize" --runtime="$secs" --time_based --direct=1
    local n
    for n in 2 4 8; do
        drop_caches
        fio_job "randread-4k-j$n" "${f[@]}" --rw=randread --bs=4k --size="$fsize" --runtime="$secs" \
            --time_based --numjobs="$n"
    done
    drop_caches
    fio_job mixed-16k --sync data "${f[@]}" --rw=randrw --rwmixread=70 --bs=16k --size="$fsize" \
        --runtime="$secs" --time_based
    rm -f "$MNT/data"
}

group_rocksdb() {
    local db="$MNT/rocksdb" cpu0 t0 log="$out/rocksdb-$ROUND-$BACKEND.log"
    local common=(--db="$db" --num="$rocks_num" --value_size=400 --threads=1 --seed=42
        --write_buffer_size=8388608 --target_file_size_base=8388608
        --max_bytes_for_level_base=33554432 --statistics=0)
    opsec() { tr '\r' '\n' <"$log" | grep -E "^$1 +:" | tail -n 1 | sed -E 's/.* ([0-9]+) ops\/sec.*/\1/'; }
    cpu0="$(daemon_cpu)"; t0="$(now)"
    db_bench "${common[@]}" --benchmarks=fillrandom,overwrite,readrandom --use_existing_db=0 >"$log" 2>&1 ||
        { tail -n 20 "$log" >&2; die "db_bench on $BACKEND failed"; }
    record rocksdb "{\"fillrandom\": $(opsec fillrandom), \"overwrite\": $(opsec overwrite), \"readrandom\": $(opsec readrandom)}" "$cpu0" "$t0"
    cpu0="$(daemon_cpu)"; t0="$(now)"
    db_bench "${common[@]}" --benchmarks=overwrite --use_existing_db=1 --sync=1 --writes="$rocks_sync" >"$log" 2>&1 ||
        { tail -n 20 "$log" >&2; die "db_bench --sync on $BACKEND failed"; }
    record rocksdb-sync "{\"overwrite_sync\": $(opsec overwrite)}" "$cpu0" "$t0"
}

group_pgbench() {
    local data="$MNT/pgdata" sock="$FS_WORKDIR/sock" port log="$out/pg-$ROUND-$BACKEND.log" cpu0 t0 t1 tps
    port="$(fs_free_port)"
    mkdir -p "$data" "$sock"
    chown postgres:postgres "$data" "$sock"
    chmod 0700 "$data"
    as_pg() { runuser -u postgres -- "$@"; }
    as_pg "$PGBIN/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C >>"$log" 2>&1 ||
        { tail -n 20 "$log" >&2; die "initdb on $BACKEND failed"; }
    PG_STOP="as_pg $PGBIN/pg_ctl -D $data -m fast -w -t 120 stop"
    touch "$FS_WORKDIR/pg.log"
    chown postgres:postgres "$FS_WORKDIR/pg.log"
    as_pg "$PGBIN/pg_ctl" -D "$data" -l "$FS_WORKDIR/pg.log" -w -t 300 \
        -o "-p $port -k $sock -c listen_addresses=127.0.0.1 -c max_wal_size=4GB" start >>"$log" 2>&1 ||
        { cat "$FS_WORKDIR/pg.log" >&2; die "PostgreSQL on $BACKEND did not start"; }
    cpu0="$(daemon_cpu)"; t0="$(now)"
    as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -i -s "$pg_scale" -q postgres >>"$log" 2>&1 ||
        { tail -n 20 "$log" >&2; eval "$PG_STOP" || true; die "pgbench -i on $BACKEND failed"; }
    t1="$(now)"
    record pgbench-init "{\"seconds\": $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')}" "$cpu0" "$t0"
    cpu0="$(daemon_cpu)"; t0="$(now)"
    as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -c 4 -j 2 -T "$pg_secs" postgres >"$out/pgbench-$ROUND-$BACKEND.log" 2>&1 ||
        { tail -n 20 "$out/pgbench-$ROUND-$BACKEND.log" >&2; eval "$PG_STOP" || true; die "pgbench on $BACKEND failed"; }
    tps="$(awk '/^tps = /{ print $3; exit }' "$out/pgbench-$ROUND-$BACKEND.log")"
    record pgbench "{\"tps\": ${tps:-0}}" "$cpu0" "$t0"
    eval "$PG_STOP" >>"$log" 2>&1 || die "PostgreSQL on $BACKEND did not stop"
    PG_STOP=""
}

group_metadata() {
    local cpu0 t0 m
    cpu0="$(daemon_cpu)"; t0="$(now)"
    m="$(python3 "$here/lib/metadata-job.py" "$MNT" "$meta_files")" || die "the metadata job on $BACKEND failed"
    record metadata "$m" "$cpu0" "$t0"
}

# A PostgreSQL server left running would hold the mount: stop it before the unmount.
PG_STOP=""
stop_pg() { [[ -z "$PG_STOP" ]] || eval "$PG_STOP" >/dev/null 2>&1 || true; }
fs_on_exit stop_pg

start=$SECONDS
total=$((rounds * ${#groups[@]} * ${#backends[@]}))
step=0
echo "bench: $rounds round(s) of ${groups[*]} on ${backends[*]}; results in $out" >&2
for ((ROUND = 1; ROUND <= rounds; ROUND++)); do
    for g in "${groups[@]}"; do
        for BACKEND in "${backends[@]}"; do
            step=$((step + 1))
            printf '[%s] %d/%d round %d: %s on %s\n' "$(date +%H:%M:%S)" "$step" "$total" "$ROUND" "$g" "$BACKEND" >&2
            backend="$BACKEND"
            EARFS_MOUNT_ARGS=""
            [[ "$BACKEND" == earfs-nowb ]] && { backend=earfs; EARFS_MOUNT_ARGS="--no-writeback-cache"; }
            export EARFS_MOUNT_ARGS
            work="$(fs_mktemp "bench-$BACKEND")"
            fs_setup "$backend" "$work" --allow-other >/dev/null 2>"$out/setup.log" ||
                { cat "$out/setup.log" >&2; die "could not mount $BACKEND"; }
            daemon_pid
            "group_${g//-/_}"
            fs_teardown 2>>"$out/setup.log" || die "could not unmount $BACKEND"
        done
    done
done
echo "bench: measured in $((SECONDS - start)) s" >&2

# --- the report -------------------------------------------------------------------
machine="$(python3 - "$EARFS_BIN" "$PGBIN" <<'EOF'
import json, os, platform, re, subprocess, sys
def out(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return ""
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
src = out("findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", "/var/tmp")
print(json.dumps({
    "date": out("date", "-u", "+%Y-%m-%d %H:%M UTC"),
    "kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(), "memory_gib": round(mem / 2**20, 1),
    "backing": src,
    "earfs": out(sys.argv[1], "--version").splitlines()[0] if out(sys.argv[1], "--version") else "?",
    "gocryptfs": out("gocryptfs", "-version").split(";")[0],
    "fio": out("fio", "--version"),
    "rocksdb": "db_bench " + (re.findall(r"[0-9.]+", out("db_bench", "--version")) or ["?"])[0],
    "postgresql": out(os.path.join(sys.argv[2], "postgres"), "--version"),
}))
EOF
)"
args=("$results" "$out" --machine "$machine" --mode "$([[ $quick == 1 ]] && echo quick || echo full)"
    --params "file $fsize, ${secs} s per timed fio job, db_bench --num=$rocks_num (sync: $rocks_sync writes), pgbench scale $pg_scale for ${pg_secs} s, $meta_files files")
((docs)) && args+=(--docs "$repo/docs")
"$report_py" "$here/lib/bench-report.py" "${args[@]}"
