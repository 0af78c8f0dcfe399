#!/usr/bin/env bash
# Compare the earfs XTS sector cipher with `openssl speed -evp aes-256-xts`
# at 4096-byte data units, one core, side by side on this machine.
#
# Env:
#   EARFS_SPEED_CMD  command printing `earfs speed --json`'s document
#                    (earfs.speed.v1; default: target/release/earfs speed --json)
#   SECONDS_PER_RUN  seconds per direction per round for both tools (default 1)
#   ROUNDS           alternating rounds (openssl enc, openssl dec, ours);
#                    the best round of each tool and direction is compared,
#                    which filters out interference from other load on a
#                    shared machine (default 5)
#   CPU              core to pin to with taskset (default 0)
#   MIN_RATIO        required ours/openssl ratio (default 0.8)
# Exit status: 0 if both ratios >= MIN_RATIO, 1 if not, 2 on errors.
set -euo pipefail

cd "$(dirname "$0")/.."
CMD=${EARFS_SPEED_CMD:-target/release/earfs speed --json}
SECS=${SECONDS_PER_RUN:-1}
ROUNDS=${ROUNDS:-5}
CPU=${CPU:-0}
MIN_RATIO=${MIN_RATIO:-0.8}

PIN=()
if command -v taskset >/dev/null 2>&1; then
    PIN=(taskset -c "$CPU")
else
    echo "warning: taskset not found, not pinning to one core" >&2
fi

# Build first so compilation does not overlap the measurements.
if [[ -z ${EARFS_SPEED_CMD:-} ]]; then
    cargo build --quiet --release --bin earfs
fi

# openssl prints "The 'numbers' are in 1000s of bytes per second" and a
# table whose last line is "AES-256-XTS  <N>k" for -bytes 4096.
openssl_bps() {
    local out
    out=$("${PIN[@]}" openssl speed "$@" -evp aes-256-xts -bytes 4096 -seconds "$SECS" 2>/dev/null) || {
        echo "openssl speed failed" >&2
        exit 2
    }
    awk '/^(AES-256-XTS|aes-256-xts)[[:space:]]/ { v = $NF } END {
            if (v == "") exit 1
            sub(/k$/, "", v); printf "%.0f\n", v * 1000 }' <<<"$out" || {
        echo "could not parse openssl output:" >&2
        echo "$out" >&2
        exit 2
    }
}

field() {
    python3 -c 'import json, sys; print(json.loads(sys.argv[2])[sys.argv[1]])' "$1" "$2" 2>/dev/null || true
}
max() { awk -v a="${1:-0}" -v b="$2" 'BEGIN { print (b + 0 > a + 0) ? b : a }'; }

ossl_enc=0 ossl_dec=0 ours_enc=0 ours_dec=0 impl=
for ((round = 1; round <= ROUNDS; round++)); do
    oe=$(openssl_bps)
    od=$(openssl_bps -decrypt)
    # shellcheck disable=SC2086 # CMD is intentionally word-split.
    json=$("${PIN[@]}" $CMD --seconds "$SECS")
    impl=$(field aes_kernel "$json")
    we=$(field encrypt_bytes_per_sec "$json")
    wd=$(field decrypt_bytes_per_sec "$json")
    if [[ -z $we || -z $wd ]]; then
        echo "could not parse speed JSON: $json" >&2
        exit 2
    fi
    awk -v r="$round" -v oe="$oe" -v od="$od" -v we="$we" -v wd="$wd" 'BEGIN {
        printf "round %d: openssl enc %.1f dec %.1f MB/s; earfs enc %.1f dec %.1f MB/s\n",
            r, oe / 1e6, od / 1e6, we / 1e6, wd / 1e6 }'
    ossl_enc=$(max "$ossl_enc" "$oe")
    ossl_dec=$(max "$ossl_dec" "$od")
    ours_enc=$(max "$ours_enc" "$we")
    ours_dec=$(max "$ours_dec" "$wd")
done

awk -v oe="$ours_enc" -v od="$ours_dec" -v se="$ossl_enc" -v sd="$ossl_dec" \
    -v impl="$impl" -v min="$MIN_RATIO" -v cpu="$CPU" -v rounds="$ROUNDS" 'BEGIN {
    re = oe / se; rd = od / sd
    printf "AES-256-XTS, 4096-byte sectors, one core (cpu %s), best of %s rounds\n", cpu, rounds
    printf "%-10s %16s %16s %8s\n", "direction", "earfs MB/s", "openssl MB/s", "ratio"
    printf "%-10s %16.1f %16.1f %8.3f\n", "encrypt", oe / 1e6, se / 1e6, re
    printf "%-10s %16.1f %16.1f %8.3f\n", "decrypt", od / 1e6, sd / 1e6, rd
    printf "earfs kernel: %s; target ratio >= %s: %s\n", impl, min,
        (re >= min && rd >= min) ? "PASS" : "FAIL"
    exit (re >= min && rd >= min) ? 0 : 1
}'
