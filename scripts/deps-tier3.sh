#!/usr/bin/env bash
# Idempotent installer for everything the tier-3 suites (scripts/tier3/*) need.
# A second run does no network work when everything is present.
#
#   EARFS_TOOLS_DIR  where `cargo install --root` puts fsx and pjdfstest
#                    (default: $repo/target/tools; binaries in $EARFS_TOOLS_DIR/bin)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EARFS_TOOLS_DIR="${EARFS_TOOLS_DIR:-$repo/target/tools}"

FSX_VERSION="0.3.2"
PJDFSTEST_VERSION="0.2.2"

log() { printf '[deps-tier3] %s\n' "$*" >&2; }

# --- Debian packages ---------------------------------------------------------
# fuse3: fusermount3; libacl1-dev/acl: pjdfstest build + ACL tests;
# postgresql + postgresql-contrib: server, pgbench, pg_checksums, amcheck;
# rocksdb-tools: db_bench, ldb, sst_dump; librocksdb-dev: the power-cut test's
# RocksDB driver (tests/powercut/rocks.cc, built with g++); psmisc: fuser (diagnostics on busy
# unmounts); procps: pgrep.
apt_pkgs=(
    fuse3 gocryptfs
    postgresql postgresql-contrib
    rocksdb-tools librocksdb-dev sqlite3 python3
    fio strace shellcheck
    libacl1-dev acl pkg-config build-essential
    psmisc procps util-linux
)

missing=()
for p in "${apt_pkgs[@]}"; do
    if ! dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    log "apt packages: all present"
fi

# Debian's postgresql-common may have auto-created and started a 'main'
# cluster; the suites use their own cluster on a free port and don't care.

# --- pjdfstest dummy users -----------------------------------------------------
# pjdfstest switches to two dummy users; we configure nobody:nogroup and
# tests:tests.
if ! getent group tests >/dev/null; then
    log "creating group 'tests'"
    groupadd --system tests
fi
if ! getent passwd tests >/dev/null; then
    log "creating user 'tests'"
    useradd --system --gid tests --no-create-home --home-dir / \
        --shell /usr/sbin/nologin --comment "Dummy user for pjdfstest" tests
fi

# --- crates.io tools ------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
    if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        log "ERROR: cargo not found (needed to install fsx and pjdfstest)"
        exit 1
    fi
fi

# install_crate CRATE VERSION BINARY
install_crate() {
    local crate="$1" version="$2" bin="$EARFS_TOOLS_DIR/bin/$3"
    if [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -qF -- "$version"; then
        log "$crate $version: already in $EARFS_TOOLS_DIR/bin"
        return 0
    fi
    log "cargo install $crate $version -> $EARFS_TOOLS_DIR"
    mkdir -p "$EARFS_TOOLS_DIR"
    cargo install --locked --root "$EARFS_TOOLS_DIR" --version "$version" "$crate"
}

install_crate fsx "$FSX_VERSION" fsx
install_crate pjdfstest "$PJDFSTEST_VERSION" pjdfstest

log "OK: tier-3 dependencies present (tools in $EARFS_TOOLS_DIR/bin)"
