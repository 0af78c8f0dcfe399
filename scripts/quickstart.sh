#!/usr/bin/env bash
# Quick start on the local key provider: installs what it needs, builds earfs, creates a
# volume and mounts it under ./demo, writes a file, and shows that the backing bytes are
# ciphertext. Run as root (or with sudo). Unmount with: target/release/earfs umount demo/mnt
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
scripts/deps.sh
cargo build --release --quiet
earfs="$repo/target/release/earfs"
demo="${DEMO_DIR:-$repo/demo}"
mkdir -p "$demo/mnt"
if awk -v m="$demo/mnt" '$2 == m {found=1} END {exit !found}' /proc/mounts; then
  "$earfs" umount "$demo/mnt"
fi
if [ ! -e "$demo/backing/earfs.conf" ]; then
  "$earfs" init --kms local --key-file "$demo/master.key" "$demo/backing"
fi
"$earfs" mount --log-file "$demo/earfs.log" "$demo/backing" "$demo/mnt"
echo
"$earfs" info "$demo/backing"
echo
echo "Hello from earfs: this line is plaintext only inside the mount." > "$demo/mnt/hello.txt"
echo "--- through the mount ($demo/mnt/hello.txt):"
cat "$demo/mnt/hello.txt"
echo "--- on disk ($demo/backing/hello.txt, 4096-byte header then ciphertext):"
xxd -s 4096 "$demo/backing/hello.txt"
if grep -rq "Hello from earfs" "$demo/backing"; then
  echo "ERROR: plaintext found in the backing file" >&2
  exit 1
fi
echo "--- the plaintext does not appear anywhere in $demo/backing"
echo
echo "The volume is mounted at $demo/mnt. Unmount with: $earfs umount $demo/mnt"
