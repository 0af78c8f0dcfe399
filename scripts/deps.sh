#!/usr/bin/env bash
# Installs what building and testing earfs needs on Debian: FUSE 3, strace (the fsync
# test traces the daemon; tests/keyring_kill.rs kills the keyring commands at each
# step through it), util-linux (setpriv), OpenSSL (the speed comparison), Python 3
# (mmap and lock tests), shellcheck (the scripts' static check); for the CLI and package tests (tests/cli.rs, tests/package.rs):
# groff and man-db (the man pages render), zsh and fish (their completion scripts
# parse), dpkg-dev and binutils (scripts/package.sh: dpkg-shlibdeps, strip), lintian, systemd-analyze;
# python3-jsonschema (tests/json.rs); python3-matplotlib (the benchmark report's test).
# Idempotent and quick when all is there.
set -euo pipefail
need=()
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v strace >/dev/null || need+=(strace)
command -v setpriv >/dev/null || need+=(util-linux)
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null || need+=(python3)
command -v xxd >/dev/null || need+=(xxd)
command -v taskset >/dev/null || need+=(util-linux)
command -v shellcheck >/dev/null || need+=(shellcheck)
# tests/fstab.rs: mount(8), findmnt, mount.fuse3 (fuse3), systemd-fstab-generator and
# systemd-analyze (systemd; no running systemd needed).
command -v mount >/dev/null || need+=(mount)
command -v findmnt >/dev/null || need+=(util-linux)
if [ ! -x /usr/lib/systemd/system-generators/systemd-fstab-generator ] ||
  ! command -v systemd-analyze >/dev/null; then
  need+=(systemd)
fi
# promtool checks systemd/examples/earfs-alerts.yml (tests/metrics.rs).
command -v promtool >/dev/null || need+=(prometheus)
command -v groff >/dev/null || need+=(groff-base)
command -v man >/dev/null || need+=(man-db)
command -v zsh >/dev/null || need+=(zsh)
command -v fish >/dev/null || need+=(fish)
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
command -v strip >/dev/null || need+=(binutils)
command -v lintian >/dev/null || need+=(lintian)
command -v systemd-analyze >/dev/null || need+=(systemd)
# tests/json.rs validates every --json output against docs/schemas/ (Draft 2020-12).
python3 -c 'from jsonschema import Draft202012Validator' 2>/dev/null || need+=(python3-jsonschema)
# scripts/lib/test_bench_report.py: the benchmark's chart, with Debian's python3.
/usr/bin/python3 -c 'import matplotlib' 2>/dev/null || need+=(python3 python3-matplotlib)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -e /dev/fuse ]; then
  echo "deps: /dev/fuse is missing; load the fuse module (modprobe fuse)" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "deps: cargo (Rust) is required" >&2
  exit 1
fi
