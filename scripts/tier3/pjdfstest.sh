#!/usr/bin/env bash
# Tier 3: pjdfstest (crates.io `pjdfstest`, the Rust rewrite) on the mount.
#
#   pjdfstest.sh              run on EARFS_FS (default earfs); PASS if the suite
#                             ran to completion (and, with PJDFSTEST_STRICT=1,
#                             nothing failed)
#   pjdfstest.sh --compare    run on EARFS_FS and on gocryptfs with the same
#                             configuration; FAIL if EARFS_FS passes fewer tests
#                             than gocryptfs (and list the tests gocryptfs
#                             passes but EARFS_FS does not)
#
# Must run as root; the volume is mounted with allow_other because many tests
# switch to the dummy users nobody:nogroup and tests:tests (created by
# scripts/deps-tier3.sh).
#
#   EARFS_FS              backend: earfs (default) | gocryptfs | raw
#   EARFS_TIER3_RESULTS   where count files and logs go (default $repo/target/tier3)
#   PJDFSTEST_TIMEOUT     seconds before the run is killed (default 1800)
#   PJDFSTEST_STRICT      1: fail on any failed test
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=../lib/mountfs.sh
# shellcheck source=../lib/mountfs.sh
source "$here/../lib/mountfs.sh"

BACKEND="${EARFS_FS:-earfs}"
RESULTS="${EARFS_TIER3_RESULTS:-$EARFS_REPO/target/tier3}"
TIMEOUT="${PJDFSTEST_TIMEOUT:-1800}"
mkdir -p "$RESULTS"

compare=0
case "${1:-}" in
    --compare) compare=1 ;;
    "") ;;
    *) die "usage: $0 [--compare]" ;;
esac

[[ "$(id -u)" == 0 ]] || die "pjdfstest.sh must run as root"

if [[ "$compare" == 1 ]]; then
    start=$SECONDS
    rc_a=0
    rc_b=0
    EARFS_FS="$BACKEND" bash "$0" || rc_a=$?
    if [[ "$BACKEND" != gocryptfs ]]; then
        EARFS_FS=gocryptfs bash "$0" || rc_b=$?
    fi
    [[ -s "$RESULTS/pjdfstest-$BACKEND.count" ]] || { echo "FAIL: pjdfstest compare: no result for $BACKEND (rc=$rc_a)"; exit 1; }
    [[ -s "$RESULTS/pjdfstest-gocryptfs.count" ]] || { echo "FAIL: pjdfstest compare: no result for gocryptfs (rc=$rc_b)"; exit 1; }
    a_passed="$(awk -F= '$1 == "passed" {print $2}' "$RESULTS/pjdfstest-$BACKEND.count")"
    b_passed="$(awk -F= '$1 == "passed" {print $2}' "$RESULTS/pjdfstest-gocryptfs.count")"
    # Tests gocryptfs passes that BACKEND does not, and vice versa.
    mapfile -t regress < <(comm -13 <(awk '$2 == "ok" {print $1}' "$RESULTS/pjdfstest-$BACKEND.status" | sort) \
        <(awk '$2 == "ok" {print $1}' "$RESULTS/pjdfstest-gocryptfs.status" | sort))
    mapfile -t gains < <(comm -23 <(awk '$2 == "ok" {print $1}' "$RESULTS/pjdfstest-$BACKEND.status" | sort) \
        <(awk '$2 == "ok" {print $1}' "$RESULTS/pjdfstest-gocryptfs.status" | sort))
    echo "pjdfstest compare: $BACKEND passed $a_passed, gocryptfs passed $b_passed"
    if ((${#regress[@]})); then
        echo "  passed on gocryptfs but not on $BACKEND:"
        printf '    %s\n' "${regress[@]}"
    fi
    if ((${#gains[@]})); then
        echo "  passed on $BACKEND but not on gocryptfs:"
        printf '    %s\n' "${gains[@]}"
    fi
    if ((a_passed < b_passed)); then
        echo "FAIL: pjdfstest compare: $BACKEND passes fewer tests than gocryptfs ($a_passed < $b_passed) ($((SECONDS - start)) s)"
        exit 1
    fi
    echo "PASS: pjdfstest compare: $BACKEND $a_passed >= gocryptfs $b_passed ($((SECONDS - start)) s)"
    exit 0
fi

PJDFSTEST="$(fs_tool pjdfstest)"
# Never let a stale result from an earlier run stand in for this one.
rm -f "$RESULTS/pjdfstest-$BACKEND.count" "$RESULTS/pjdfstest-$BACKEND.status"
getent passwd tests >/dev/null || die "dummy user 'tests' missing; run scripts/deps-tier3.sh"
start=$SECONDS

work="$(fs_mktemp pjd)"
fs_setup "$BACKEND" "$work" --allow-other
# A directory on a different file system, for the EXDEV (cross-device) tests.
secondary="$work/secondary"
mkdir -p "$secondary"
chmod 0755 "$secondary"

# One configuration for every backend: the comparison is only fair if it is
# identical.  Features: see `pjdfstest -l`.
#  posix_fallocate  - posix_fallocate(2) (mode 0) works
#  utimensat        - utimensat(2) works
#  utime_now        - UTIME_NOW works
#  rename_ctime     - rename(2) updates st_ctime of the renamed object
# Not enabled: chflags/file_flags/stat_st_birthtime/chflags_sf_snapshot (BSD
# only), nfsv4_acls.  allow_remount=false: the EROFS tests would remount the
# FUSE mount read-only with mount(8), which is not part of the contract.
cfg="$work/pjdfstest.toml"
cat >"$cfg" <<EOF
[features]
posix_fallocate = {}
utimensat = {}
utime_now = {}
rename_ctime = {}

[settings]
naptime = 0.01
allow_remount = false

[dummy_auth]
entries = [
    ["nobody", "nogroup"],
    ["tests", "tests"],
]
EOF
cp "$cfg" "$RESULTS/pjdfstest.toml"

out="$RESULTS/pjdfstest-$BACKEND.log"
log "pjdfstest on $BACKEND ($MNT), log: $out"
rc=0
(cd "$MNT" && NO_COLOR=1 timeout -k 10 "$TIMEOUT" "$PJDFSTEST" -c "$cfg" -p "$MNT" -s "$secondary") >"$out" 2>&1 || rc=$?

# "Summary: F failed, S skipped, P passed, E expected failures, T total"
summary="$(grep -E '^Summary: ' "$out" | tail -n 1 || true)"
if [[ -z "$summary" ]]; then
    tail -n 40 "$out"
    echo "FAIL: pjdfstest $BACKEND: no summary line (rc=$rc; timeout ${TIMEOUT}s?)"
    exit 1
fi
failed="$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$summary")"
skipped="$(sed -E 's/.* ([0-9]+) skipped.*/\1/' <<<"$summary")"
passed="$(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$summary")"

# Per-test status: "name ok|FAILED|skipped".
awk '$0 !~ /^[[:space:]]/ && NF == 2 && ($2 == "ok" || $2 == "FAILED" || $2 == "skipped") {print $1, $2}' "$out" >"$RESULTS/pjdfstest-$BACKEND.status"
printf 'backend=%s\npassed=%s\nfailed=%s\nskipped=%s\n' "$BACKEND" "$passed" "$failed" "$skipped" >"$RESULTS/pjdfstest-$BACKEND.count"

if [[ "$failed" != 0 ]]; then
    echo "failed tests ($BACKEND):"
    awk '$2 == "FAILED" {print "  " $1}' "$RESULTS/pjdfstest-$BACKEND.status"
fi
echo "pjdfstest $BACKEND: $passed passed, $failed failed, $skipped skipped"
echo "  (counts: $RESULTS/pjdfstest-$BACKEND.count, full log: $out)"
if [[ "${PJDFSTEST_STRICT:-0}" == 1 && "$failed" != 0 ]]; then
    echo "FAIL: pjdfstest $BACKEND: $failed tests failed ($((SECONDS - start)) s)"
    exit 1
fi
echo "PASS: pjdfstest $BACKEND ran to completion ($((SECONDS - start)) s)"
