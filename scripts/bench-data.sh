#!/usr/bin/env bash
# Speed of the data commands against `cp -a` of the same tree on the same disk, in one
# run (issue 10: adopt, reencrypt and decrypt at no less than 0.7x cp -a).
#
#   scripts/bench-data.sh [SIZE_MIB] [ROUNDS]   (defaults: 2048, a 2 GiB tree; 3 rounds)
#
# The tree mixes file sizes as a database directory does: a few 128 MiB files (table
# segments), 8 MiB files (WAL segments), 256 KiB files and many small ones. Each
# command runs on a cold page cache (caches dropped first where allowed) and is timed
# to its exit; earfs commands sync every file they write before they return, so the
# baseline is given twice: `cp -a` alone (its data may still be in the page cache when
# it returns) and `cp -a` followed by `sync` (durable, like the commands).
#
#   EARFS_BIN     the earfs binary (default: target/release/earfs)
#   BENCH_DIR     where the trees go (default: a temp dir under /var/tmp; must be one
#                 filesystem: adopt works in place)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EARFS_BIN="${EARFS_BIN:-$repo/target/release/earfs}"
size_mib="${1:-2048}"
rounds="${2:-3}"
[[ -x "$EARFS_BIN" ]] || { echo "build first: cargo build --release" >&2; exit 1; }
work="${BENCH_DIR:-$(mktemp -d /var/tmp/earfs-bench-data.XXXXXX)}"
mkdir -p "$work"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
}

# --- the tree -------------------------------------------------------------------
python3 - "$work/src" "$size_mib" <<'EOF'
import os, random, sys
root, total = sys.argv[1], int(sys.argv[2]) << 20
random.seed(1)
plan = [(128 << 20, 0.50), (8 << 20, 0.25), (256 << 10, 0.18), (None, 0.07)]
os.makedirs(root)
chunk = os.urandom(1 << 20)
n = 0
for size, share in plan:
    budget = int(total * share)
    d = os.path.join(root, f"d{n}")
    os.makedirs(d)
    while budget > 0:
        s = size if size else random.randint(1, 32 << 10)
        with open(os.path.join(d, f"f{n}"), "wb") as f:
            left = s
            while left > 0:
                k = min(left, len(chunk))
                f.write(chunk[:k])
                left -= k
        budget -= s
        n += 1
        if n % 200 == 0:
            d = os.path.join(root, f"d{n}")
            os.makedirs(d)
print(f"tree: {n} files")
EOF
du -sh "$work/src" | awk '{print "tree size: " $1}'

t() { # t NAME CMD...: run, print seconds
    local s e
    drop_caches
    s=$(date +%s.%N)
    "${@:2}" >/dev/null
    e=$(date +%s.%N)
    printf '%s %s %.2f\n' "$round" "$1" "$(echo "$e - $s" | bc -l)" | tee -a "$work/times"
}

# Each round times the baselines and the commands one after the other, so that each
# ratio compares runs seconds apart: on a shared machine the disk's speed drifts by
# more than the differences measured here over minutes.
key="$work/key"
for round in $(seq 1 "$rounds"); do
    rm -rf "$work/cp1" "$work/cp2" "$work/adopt-src" "$work/vol" "$work/plain" "$key"
    t cp_a cp -a "$work/src" "$work/cp1"
    t cp_a_sync bash -c "cp -a '$work/src' '$work/cp2' && sync"
    rm -rf "$work/cp1" "$work/cp2"
    cp -a "$work/src" "$work/adopt-src"
    t adopt "$EARFS_BIN" adopt --kms local --key-file "$key" "$work/adopt-src" "$work/vol"
    "$EARFS_BIN" rotate "$work/vol" >/dev/null
    t reencrypt "$EARFS_BIN" reencrypt "$work/vol"
    t decrypt "$EARFS_BIN" decrypt "$work/vol" "$work/plain"
    # The decrypted tree is the original, byte for byte.
    diff -r "$work/src" "$work/plain" >/dev/null || { echo "FAIL: decrypt differs from the source" >&2; exit 1; }
done

# Per command: the median time, and the median over the rounds of cp -a's time in
# that round / the command's.
python3 - "$work/times" "$size_mib" <<'EOF2'
import statistics, sys
times, mib = {}, int(sys.argv[2])
for line in open(sys.argv[1]):
    r, name, secs = line.split()
    times.setdefault(int(r), {})[name] = float(secs)
rounds = sorted(times)
print(f"\n{len(rounds)} round(s); medians:")
print(f"{'command':<10} {'seconds':>8} {'MiB/s':>7} {'vs cp -a':>9} {'vs cp -a + sync':>16}   per round vs cp -a")
for c in ["cp_a", "cp_a_sync", "adopt", "reencrypt", "decrypt"]:
    secs = statistics.median(times[r][c] for r in rounds)
    vs = [times[r]["cp_a"] / times[r][c] for r in rounds]
    vs_sync = [times[r]["cp_a_sync"] / times[r][c] for r in rounds]
    each = " ".join(f"{v:.2f}" for v in vs)
    print(f"{c:<10} {secs:8.2f} {mib / secs:7.0f} {statistics.median(vs):8.2f}x {statistics.median(vs_sync):15.2f}x   {each}")
print("\n(ratios: cp -a time / command time, higher is faster; the target is >= 0.7)")
EOF2
