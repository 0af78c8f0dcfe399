#!/usr/bin/env bash
# fio on the raw backing disk, on earfs (its default, the writeback cache on, and
# without it) and on gocryptfs, side by side in one run, and the ratio of each to the
# raw disk.
# A benchmark, not a test: numbers go to docs/performance.md.
#
# Env: BENCH_SECONDS (per job, default 15), BENCH_SIZE (file size, default 512M),
#      BACKENDS (default "raw earfs earfs-nowb gocryptfs"; earfs-nowb mounts with
#      --no-writeback-cache; also earfs-v1: a format-1 volume; earfs-wb, the old name
#      of --writeback-cache, is now the default), JOBS (job names, default all), EARFS_BIN.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
secs="${BENCH_SECONDS:-15}"
size="${BENCH_SIZE:-512M}"
read -r -a backends <<<"${BACKENDS:-raw earfs earfs-nowb gocryptfs}"
command -v fio >/dev/null || { apt-get update -qq && apt-get install -y -qq fio >/dev/null; }
command -v jq >/dev/null || { apt-get update -qq && apt-get install -y -qq jq >/dev/null; }

jobs=(
  "randwrite-4k|--rw=randwrite --bs=4k --ioengine=psync --fsync=0 --end_fsync=1"
  "randread-4k|--rw=randread --bs=4k --ioengine=psync"
  "seqwrite-1m|--rw=write --bs=1m --ioengine=psync --end_fsync=1"
  "seqread-1m|--rw=read --bs=1m --ioengine=psync"
  "append-4k-fdatasync|--rw=write --bs=4k --ioengine=psync --fdatasync=1"
  # A log: each record appended past the end of the file, then fdatasync.
  "logappend-4k-fdatasync|--rw=write --bs=4k --ioengine=psync --fdatasync=1 --file_append=1 --fallocate=none"
  "logappend-100b-fdatasync|--rw=write --bs=100 --ioengine=psync --fdatasync=1 --file_append=1 --fallocate=none"
)
if [[ -n "${JOBS:-}" ]]; then
  picked=()
  for j in "${jobs[@]}"; do
    [[ " $JOBS " == *" ${j%%|*} "* ]] && picked+=("$j")
  done
  jobs=("${picked[@]}")
fi

results="$(mktemp -d "${TMPDIR:-/tmp}/earfs-fio.XXXXXX")"
for b in "${backends[@]}"; do
  (
    # shellcheck source=scripts/lib/mountfs.sh disable=SC1091
    source "$here/lib/mountfs.sh"
    backend="$b"
    [[ "$b" == earfs-wb ]] && { backend=earfs; export EARFS_MOUNT_ARGS="--writeback-cache"; }
    [[ "$b" == earfs-nowb ]] && { backend=earfs; export EARFS_MOUNT_ARGS="--no-writeback-cache"; }
    [[ "$b" == earfs-v1 ]] && { backend=earfs; export EARFS_INIT_ARGS="--format-version 1"; }
    work="$(fs_mktemp "fio-$b")"
    fs_setup "$backend" "$work"
    for j in "${jobs[@]}"; do
      name="${j%%|*}"; args="${j#*|}"
      # shellcheck disable=SC2086
      fio --name="$name" --directory="$MNT" --size="$size" --runtime="$secs" --time_based \
          --numjobs=1 --group_reporting --output-format=json $args >"$results/$b-$name.json" 2>"$results/$b-$name.err" \
        || { cat "$results/$b-$name.err" >&2; exit 1; }
      rm -f "$MNT/$name".*
      # Drop the page cache between jobs so reads come from the backing disk.
      sync; echo 3 >/proc/sys/vm/drop_caches || true
    done
    fs_teardown
  )
done

printf '\n| job | %s |\n|---|%s\n' "$(printf '%s | ' "${backends[@]}" | sed 's/ | $//')" "$(printf -- '---|%.0s' "${backends[@]}")"
for j in "${jobs[@]}"; do
  name="${j%%|*}"
  row="| $name |"
  base=""
  for b in "${backends[@]}"; do
    f="$results/$b-$name.json"
    bw=$(jq '[.jobs[0].read.bw_bytes, .jobs[0].write.bw_bytes] | add' "$f")
    iops=$(jq '[.jobs[0].read.iops, .jobs[0].write.iops] | add | floor' "$f")
    [[ -z "$base" ]] && base="$bw"
    ratio=$(awk -v a="$bw" -v b="$base" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
    row="$row $(awk -v x="$bw" 'BEGIN { if (x >= 1e7) printf "%.1f MB/s", x / 1e6; else printf "%.0f kB/s", x / 1e3 }') ($iops IOPS, ${ratio}×) |"
  done
  echo "$row"
done
echo
echo "raw = the backing directory's filesystem; ratios are to the first column, measured in this run."
rm -rf "$results"
