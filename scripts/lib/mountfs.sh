# shellcheck shell=bash
# Sourced helper for the tier-3 suites: create an encrypted volume, mount it,
# unmount/remount it, and always tear it down.
#
#   source "$repo/scripts/lib/mountfs.sh"
#   fs_setup BACKEND WORKDIR [--allow-other]   # sets MNT=$WORKDIR/mnt
#   fs_unmount; fs_mount                       # remount the same volume
#   fs_teardown                                # unmount + verify /proc/mounts
#
# BACKEND: earfs | gocryptfs | raw (plain directory, no FUSE; sanity only).
#
# fs_setup installs an EXIT/INT/TERM trap that runs the cleanups registered
# with fs_on_exit (last registered runs first) and then fs_teardown, so the
# mount is removed even if the calling script fails.  Scripts that need their
# own cleanup (stop a server, ...) must register it with fs_on_exit instead
# of installing their own trap.
#
# Environment:
#   EARFS_BIN        earfs binary      (default: $repo/target/release/earfs)
#   EARFS_TOOLS_DIR  cargo-installed tools (default: $repo/target/tools)
#   GOCRYPTFS_BIN    gocryptfs binary  (default: gocryptfs from PATH)
#   EARFS_MOUNT_ARGS extra flags for every earfs mount (e.g. --writeback-cache)
#   EARFS_INIT_ARGS  extra flags for earfs init (e.g. --format-version 1)

if [[ -n "${__EARFS_MOUNTFS_SOURCED:-}" ]]; then
    return 0
fi
__EARFS_MOUNTFS_SOURCED=1

EARFS_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EARFS_BIN="${EARFS_BIN:-$EARFS_REPO/target/release/earfs}"
EARFS_TOOLS_DIR="${EARFS_TOOLS_DIR:-$EARFS_REPO/target/tools}"
GOCRYPTFS_BIN="${GOCRYPTFS_BIN:-gocryptfs}"
export EARFS_REPO EARFS_BIN EARFS_TOOLS_DIR GOCRYPTFS_BIN

FS_BACKEND=""
FS_WORKDIR=""
FS_BACKING=""
FS_KEYFILE=""
FS_LOG=""
FS_ALLOW_OTHER=0
MNT=""
__FS_CLEANUPS=()
# The original stdout/stderr: a trap can fire while a command with its own
# redirections (cmd >log 2>&1) is in the foreground, and bash runs the trap
# with those redirections still active; the trap writes here instead.
exec {__FS_OUT}>&1 {__FS_ERR}>&2
__FS_TRAP_SET=0
__FS_EXITING=0

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    printf '[%s] ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2
    printf 'FAIL: %s: %s\n' "$(basename "$0" .sh)" "$*"
    exit 1
}

# Make a fresh temp dir under ${TMPDIR:-/tmp} that other users can traverse
# (postgres and pjdfstest's dummy users need to reach the mount point).
fs_mktemp() {
    local d
    d="$(mktemp -d "${TMPDIR:-/tmp}/earfs-${1:-t3}.XXXXXX")"
    chmod 0755 "$d"
    printf '%s\n' "$d"
}

# Is PATH a mount point according to /proc/mounts?
fs_is_mounted() {
    local p
    p="$(realpath -m "$1")"
    awk -v p="$p" '$2 == p { found = 1 } END { exit !found }' /proc/mounts
}

# Register a cleanup command (a function name or simple command line, run via
# eval) to run at exit before the file system is unmounted.
fs_on_exit() {
    __FS_CLEANUPS+=("$1")
    __fs_install_trap
}

__fs_install_trap() {
    if [[ "$__FS_TRAP_SET" == 0 ]]; then
        trap '__fs_exit_trap EXIT >&"$__FS_OUT" 2>&"$__FS_ERR"' EXIT
        trap '__fs_exit_trap INT >&"$__FS_OUT" 2>&"$__FS_ERR"; exit 130' INT
        trap '__fs_exit_trap TERM >&"$__FS_OUT" 2>&"$__FS_ERR"; exit 143' TERM
        __FS_TRAP_SET=1
    fi
}

__fs_exit_trap() {
    local rc=$? i
    if [[ "$__FS_EXITING" == 1 ]]; then
        return 0
    fi
    __FS_EXITING=1
    set +e
    [[ "$1" != EXIT && "$rc" == 0 ]] && rc=1   # interrupted: treat as a failure
    for ((i = ${#__FS_CLEANUPS[@]} - 1; i >= 0; i--)); do
        eval "${__FS_CLEANUPS[$i]}" || log "cleanup '${__FS_CLEANUPS[$i]}' failed"
    done
    if [[ -n "$FS_WORKDIR" ]]; then
        # Keep the evidence (logs, backing dir) of a failed run.
        if [[ "$rc" != 0 && "${FS_KEEP_WORKDIR_ON_FAIL:-1}" == 1 ]]; then
            FS_KEEP_WORKDIR=1
        fi
        if ! fs_teardown; then
            log "FAIL: could not tear down the mount at $MNT"
            [[ "$rc" == 0 ]] && rc=1
        fi
    fi
    if [[ "$1" == EXIT ]]; then
        exit "$rc"
    fi
}

# Create the volume in $FS_WORKDIR/backing.
fs_create() {
    case "$FS_BACKEND" in
        earfs)
            [[ -x "$EARFS_BIN" ]] || die "earfs binary not found at $EARFS_BIN (set EARFS_BIN)"
            local init_extra=()
            read -r -a init_extra <<<"${EARFS_INIT_ARGS:-}"
            "$EARFS_BIN" init --kms local "${init_extra[@]}" --key-file "$FS_KEYFILE" "$FS_BACKING"
            ;;
        gocryptfs)
            # -scryptn 10: fast (insecure) KDF, fine for tests.
            "$GOCRYPTFS_BIN" -q -init -extpass "echo pw" -scryptn 10 "$FS_BACKING"
            ;;
        raw)
            ;;
        *)
            die "unknown backend '$FS_BACKEND' (expected earfs, gocryptfs or raw)"
            ;;
    esac
}

# Mount $FS_BACKING at $MNT (returns once the mount serves).
fs_mount() {
    [[ -n "$FS_WORKDIR" ]] || die "fs_mount: call fs_setup first"
    fs_is_mounted "$MNT" && die "fs_mount: $MNT is already mounted"
    case "$FS_BACKEND" in
        earfs)
            local -a opts=(--log-file "$FS_LOG")
            [[ "$FS_ALLOW_OTHER" == 1 ]] && opts+=(--allow-other)
            # EARFS_MOUNT_ARGS: extra flags for every earfs mount (e.g. --writeback-cache).
            local -a extra=()
            read -r -a extra <<<"${EARFS_MOUNT_ARGS:-}"
            opts+=("${extra[@]}")
            # Daemon output goes to a file: an inherited stdout would keep
            # pipes in the calling scripts open.
            if ! "$EARFS_BIN" mount "${opts[@]}" "$FS_BACKING" "$MNT" >>"$FS_LOG" 2>&1 {__FS_OUT}>&- {__FS_ERR}>&-; then
                cat "$FS_LOG" >&2
                die "earfs mount failed"
            fi
            ;;
        gocryptfs)
            local -a opts=(-q -nosyslog -extpass "echo pw")
            # gocryptfs' -allow_other also turns on default_permissions.
            [[ "$FS_ALLOW_OTHER" == 1 ]] && opts+=(-allow_other)
            if ! "$GOCRYPTFS_BIN" "${opts[@]}" "$FS_BACKING" "$MNT" >>"$FS_LOG" 2>&1 {__FS_OUT}>&- {__FS_ERR}>&-; then
                cat "$FS_LOG" >&2
                die "gocryptfs mount failed"
            fi
            ;;
        raw)
            return 0
            ;;
    esac
    # The contract says mount returns once the FS serves; double-check.
    local i
    for ((i = 0; i < 50; i++)); do
        if fs_is_mounted "$MNT" && stat "$MNT" >/dev/null 2>&1; then
            # Let other users (postgres, pjdfstest dummy users) in.
            chmod 0755 "$MNT"
            return 0
        fi
        sleep 0.1
    done
    die "fs_mount: $FS_BACKEND did not show up at $MNT within 5 s"
}

# Wait until no process has our backing dir on its command line any more
# (the FUSE daemon must have finished writing back before we remount or
# inspect the backing dir).  Only waits; never kills.
__fs_wait_daemon_exit() {
    local i
    for ((i = 0; i < 100; i++)); do
        pgrep -f -- "$FS_BACKING" >/dev/null 2>&1 || return 0
        sleep 0.1
    done
    log "WARNING: FUSE daemon for $FS_BACKING still running 10 s after unmount"
    return 1
}

# Unmount, with retries; fails loudly if the mount is still there.
fs_unmount() {
    [[ -n "$MNT" ]] || return 0
    if [[ "$FS_BACKEND" == raw ]]; then
        return 0
    fi
    local i
    sync
    for ((i = 1; i <= 10; i++)); do
        fs_is_mounted "$MNT" || break
        case "$FS_BACKEND" in
            earfs)
                if [[ -x "$EARFS_BIN" ]]; then
                    "$EARFS_BIN" umount "$MNT" 2>/dev/null || fusermount3 -u "$MNT" 2>/dev/null || true
                else
                    fusermount3 -u "$MNT" 2>/dev/null || true
                fi
                ;;
            *)
                fusermount3 -u "$MNT" 2>/dev/null || umount "$MNT" 2>/dev/null || true
                ;;
        esac
        fs_is_mounted "$MNT" || break
        log "unmount of $MNT busy (attempt $i), retrying"
        if [[ "$i" -ge 3 ]] && command -v fuser >/dev/null 2>&1; then
            fuser -vm "$MNT" >&2 || true
        fi
        sleep 1
    done
    if fs_is_mounted "$MNT"; then
        log "FAIL: $MNT still mounted after 10 attempts; detaching lazily"
        fusermount3 -uz "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
        return 1
    fi
    __fs_wait_daemon_exit || true
    return 0
}

# fs_setup BACKEND WORKDIR [--allow-other]
fs_setup() {
    [[ $# -ge 2 ]] || die "usage: fs_setup BACKEND WORKDIR [--allow-other]"
    FS_BACKEND="$1"
    FS_WORKDIR="$2"
    FS_ALLOW_OTHER=0
    [[ "${3:-}" == --allow-other ]] && FS_ALLOW_OTHER=1
    case "$FS_BACKEND" in
        earfs | gocryptfs | raw) ;;
        *)
            rmdir "$FS_WORKDIR" 2>/dev/null || true
            die "unknown backend '$FS_BACKEND' (expected earfs, gocryptfs or raw)"
            ;;
    esac
    FS_BACKING="$FS_WORKDIR/backing"
    FS_KEYFILE="$FS_WORKDIR/earfs.key"
    FS_LOG="$FS_WORKDIR/fs-daemon.log"
    MNT="$FS_WORKDIR/mnt"
    mkdir -p "$FS_BACKING" "$MNT"
    chmod 0755 "$FS_WORKDIR" "$FS_BACKING" "$MNT"
    __fs_install_trap
    fs_create
    fs_mount
    log "mounted $FS_BACKEND volume at $MNT (backing $FS_BACKING, allow_other=$FS_ALLOW_OTHER)"
}

# Unmount and check /proc/mounts; removes nothing on disk except when
# FS_KEEP_WORKDIR is unset and the unmount succeeded (then WORKDIR is removed).
fs_teardown() {
    [[ -n "$FS_WORKDIR" ]] || return 0
    local ok=0
    fs_unmount || ok=1
    if fs_is_mounted "$MNT"; then
        ok=1
    fi
    if grep -qF -- "$FS_WORKDIR" /proc/mounts; then
        log "FAIL: something under $FS_WORKDIR is still mounted:"
        grep -F -- "$FS_WORKDIR" /proc/mounts >&2 || true
        ok=1
    fi
    if [[ "$ok" == 0 ]]; then
        if [[ -z "${FS_KEEP_WORKDIR:-}" ]]; then
            rm -rf -- "$FS_WORKDIR"
        else
            log "keeping $FS_WORKDIR (FS_KEEP_WORKDIR set)"
        fi
        FS_WORKDIR=""
        return 0
    fi
    log "FAIL: teardown of $MNT incomplete; leaving $FS_WORKDIR in place"
    return 1
}

# A free TCP port on 127.0.0.1.
fs_free_port() {
    python3 - <<'EOF'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

# Path of a cargo-installed tool, or die with a hint.
fs_tool() {
    local t="$EARFS_TOOLS_DIR/bin/$1"
    if [[ -x "$t" ]]; then
        printf '%s\n' "$t"
    elif command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    else
        die "$1 not found in $EARFS_TOOLS_DIR/bin; run scripts/deps-tier3.sh"
    fi
}
