#!/usr/bin/env bash
# Installs the test dependencies and runs every test tier:
#   1. static checks: cargo fmt, clippy, the layering check;
#   2. unit and fs/ tests without a mount, the format-v1 and format-v2 fixtures, and the
#      crash-state explorer (tests/crash.rs: every state a power cut can leave, v2 must
#      keep every synced byte, v1's window must be found);
#   3. real-mount tests of every operation (tests/mount.rs), on the local key provider
#      and again on AWS KMS (moto) and Google Cloud KMS (our REST fake); the KMS
#      providers end to end with faults (tests/kms.rs); the daemon as systemd runs it:
#      notifications, signals, status, metrics, config errors, CMK revocation
#      (tests/daemon.rs); the systemd units (systemd-analyze verify);
#   4. peers' suites and real databases on a real mount (scripts/tier3/): fsx,
#      pjdfstest (compared with gocryptfs), PostgreSQL, RocksDB, SQLite;
#   and reports the XTS speed ratio against OpenSSL (a benchmark, not a pass/fail test).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
start=$(date +%s)
step() { printf '\n=== %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

step "dependencies"
scripts/deps.sh
scripts/deps-tier3.sh
scripts/deps-kms.sh

step "static checks"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
scripts/check-layering.sh
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps
shellcheck -x -P SCRIPTDIR scripts/*.sh scripts/tier3/*.sh scripts/lib/*.sh .ci/run

step "build"
cargo build --release --all-targets

step "systemd units (systemd-analyze verify)"
scripts/verify-units.sh target/release/earfs

step "the KMS fakes' own tests"
python3 tests/fakes/test_aws_kms_fake.py
python3 tests/fakes/test_gcp_kms_fake.py

step "the benchmark report's own test (scripts/bench.sh's medians, ratios, table and chart)"
/usr/bin/python3 scripts/lib/test_bench_report.py

step "unit, fs, KMS and real-mount tests"
cargo test --release -- --test-threads=4

step "real-mount tests again on a format-v1 volume (v1 files keep their rules)"
EARFS_TEST_FORMAT=1 cargo test --release --test mount -- --test-threads=4

step "real-mount tests again without the FUSE writeback cache (on by default)"
EARFS_TEST_MOUNT_ARGS=--no-writeback-cache cargo test --release --test mount -- --test-threads=4

step "real-mount tests on a volume whose key is in AWS KMS (moto), then Google Cloud KMS (fake)"
EARFS_TEST_KMS=aws cargo test --release --test mount -- --test-threads=4
EARFS_TEST_KMS=gcp cargo test --release --test mount -- --test-threads=4

step "speed: earfs vs openssl (benchmark, reported only)"
EARFS_SPEED_CMD="$repo/target/release/earfs speed --json" scripts/speed-vs-openssl.sh || echo "speed ratio below target (see above); not a test failure on a shared machine"

step "tier 3: fsx, pjdfstest, PostgreSQL, RocksDB, SQLite on earfs"
EARFS_BIN="$repo/target/release/earfs" EARFS_FS=earfs scripts/tier3/all.sh

step "tier 3 again without the FUSE writeback cache (on by default)"
EARFS_BIN="$repo/target/release/earfs" EARFS_FS=earfs EARFS_MOUNT_ARGS=--no-writeback-cache \
  EARFS_TIER3_RESULTS="$repo/target/tier3-no-writeback" scripts/tier3/all.sh --no-deps

if grep -E '^earfs:' /proc/mounts; then
  echo "FAIL: earfs mounts left behind" >&2
  exit 1
fi
step "all tiers passed"
