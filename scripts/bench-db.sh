#!/usr/bin/env bash
# shellcheck disable=SC2034  # the arrays are read through a nameref
# Real-database benchmark: RocksDB db_bench and PostgreSQL pgbench on the raw backing
# filesystem, on earfs and on gocryptfs, one after the other in one run, with the ratio
# of each to raw. Uses the tier-3 suites (which also verify the data). A benchmark,
# not a test: numbers go to docs/performance.md.
#
# Env: BACKENDS (default "raw earfs gocryptfs"), EARFS_MOUNT_ARGS (e.g. --writeback-cache).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
read -r -a backends <<<"${BACKENDS:-raw earfs gocryptfs}"
declare -A fills reads tpss
for b in "${backends[@]}"; do
  out="$(EARFS_FS="$b" "$here/tier3/rocksdb.sh" 2>/dev/null)"
  fills[$b]="$(awk '/^  fillrandom:/ {print $2}' <<<"$out")"
  reads[$b]="$(awk '/^  readrandom:/ {print $2}' <<<"$out")"
  out="$(EARFS_FS="$b" "$here/tier3/postgres.sh" 2>/dev/null)"
  tpss[$b]="$(sed -n 's/.*pgbench -c [0-9]* -T [0-9]*: tps=\([0-9.]*\),.*/\1/p' <<<"$out")"
done
base="${backends[0]}"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
printf '| workload |'; printf ' %s |' "${backends[@]}"; printf '\n|---|'; printf -- '---|%.0s' "${backends[@]}"; printf '\n'
for w in fills reads tpss; do
  case $w in fills) label="RocksDB fillrandom ops/s" ;; reads) label="RocksDB readrandom ops/s" ;; tpss) label="pgbench TPS (4 clients)" ;; esac
  printf '| %s |' "$label"
  for b in "${backends[@]}"; do
    declare -n arr=$w
    printf ' %s (%s×) |' "${arr[$b]}" "$(ratio "${arr[$b]}" "${arr[$base]}")"
    unset -n arr
  done
  printf '\n'
done
