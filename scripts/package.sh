#!/usr/bin/env bash
# Builds the Debian package earfs_VERSION_ARCH.deb with plain dpkg-deb (no debhelper,
# no cargo-deb: nothing more to compile or install in CI than what the tests use).
#
# Usage: scripts/package.sh [OUTDIR]          (default OUTDIR: target/debian)
#   EARFS_BIN=PATH        package this binary instead of running cargo build --release
#   SOURCE_DATE_EPOCH=N   the date of the build (default: the last commit's), for the
#                         binary's --version, the changelog and the files' times
#   EARFS_MAINTAINER      the Maintainer: field: set it to your team's address when you
#                         publish the package (the default is a placeholder)
#
# Contents:
#   /usr/bin/earfs                              the binary (stripped)
#   /usr/sbin/mount.fuse.earfs -> ../bin/earfs  the mount(8) helper (mount -t fuse.earfs)
#   /lib/systemd/system/earfs@.service          the unit (ExecStart=/usr/bin/earfs ...)
#   /etc/earfs/                                 mode 0700, for the NAME.toml files
#   /usr/share/man/man1/earfs*.1.gz             one page per command (earfs man);
#   /usr/share/man/man8/mount.fuse.earfs.8.gz   -> earfs-mount(1)
#   bash, zsh and fish completions in their vendor directories
#   /usr/share/doc/earfs/                       README, operations, exit codes, KMS docs;
#     examples/earfs-example.toml               the config to copy to /etc/earfs/NAME.toml
#     examples/systemd/*.d/                     the database drop-ins (site-specific:
#                                               they name an instance and a mountpoint,
#                                               so they are examples, not installed units)
# Depends: fuse3 and the shared libraries the binary links (dpkg-shlibdeps).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
out=${1:-$repo/target/debian}
mkdir -p "$out"
out=$(cd "$out" && pwd)

for tool in dpkg-deb dpkg-shlibdeps strip gzip; do
  if ! command -v "$tool" >/dev/null; then
    echo "package: $tool is missing (scripts/deps.sh installs dpkg-dev and binutils)" >&2
    exit 1
  fi
done

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
maintainer=${EARFS_MAINTAINER:-earfs maintainers <earfs@example.com>}
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)

bin=${EARFS_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --bin earfs
  bin=$repo/target/release/earfs
fi
if [ ! -x "$bin" ]; then
  echo "package: $bin is not an executable (EARFS_BIN)" >&2
  exit 1
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
doc=$root/usr/share/doc/earfs

# The binary, stripped (its debug info is for developers, not for nodes).
install -D -m 0755 "$bin" "$root/usr/bin/earfs"
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/earfs"
# mount -t fuse.earfs runs /sbin/mount.fuse.earfs (mount(8), "external helpers").
install -d -m 0755 "$root/usr/sbin"
ln -s ../bin/earfs "$root/usr/sbin/mount.fuse.earfs"

# The unit, pointing at the packaged binary.
install -d -m 0755 "$root/lib/systemd/system"
sed 's#/usr/local/bin/earfs#/usr/bin/earfs#g' systemd/earfs@.service \
  >"$root/lib/systemd/system/earfs@.service"
chmod 0644 "$root/lib/systemd/system/earfs@.service"
if grep -q /usr/local/bin "$root/lib/systemd/system/earfs@.service"; then
  echo "package: /usr/local/bin left in earfs@.service" >&2
  exit 1
fi

# The config directory: keys' settings and credentials paths, root only.
install -d -m 0700 "$root/etc/earfs"

# Man pages and completions, made by the binary itself from its clap definitions.
"$root/usr/bin/earfs" man "$stage/man" >/dev/null
install -d -m 0755 "$root/usr/share/man/man1"
for page in "$stage"/man/*.1; do
  name=$(basename "$page")
  gzip -9n <"$page" >"$root/usr/share/man/man1/$name.gz"
done
install -d -m 0755 "$root/usr/share/man/man8"
ln -s ../man1/earfs-mount.1.gz "$root/usr/share/man/man8/mount.fuse.earfs.8.gz"
install -d -m 0755 "$root/usr/share/bash-completion/completions" \
  "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
"$root/usr/bin/earfs" completions bash >"$root/usr/share/bash-completion/completions/earfs"
"$root/usr/bin/earfs" completions zsh >"$root/usr/share/zsh/vendor-completions/_earfs"
"$root/usr/bin/earfs" completions fish >"$root/usr/share/fish/vendor_completions.d/earfs.fish"

# Documentation and examples.
install -d -m 0755 "$doc/examples/systemd"
install -m 0644 README.md docs/operations.md docs/exit-codes.md docs/kms.md "$doc/"
install -m 0644 systemd/earfs-example.toml "$doc/examples/"
for d in systemd/examples/*.d; do
  install -d -m 0755 "$doc/examples/systemd/$(basename "$d")"
  install -m 0644 "$d"/*.conf "$doc/examples/systemd/$(basename "$d")/"
done
cat >"$doc/copyright" <<EOF
earfs: encryption at rest for database nodes

Copyright (c) $(date -u -d "@$SOURCE_DATE_EPOCH" +%Y) the earfs authors

License: Apache-2.0

On Debian systems, the full text of the Apache License, Version 2.0 can be found
in /usr/share/common-licenses/Apache-2.0.
EOF
{
  printf 'earfs (%s) unstable; urgency=medium\n\n' "$version"
  printf '  * Built from git revision %s.\n\n' "$revision"
  printf ' -- %s  %s\n' "$maintainer" "$(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$doc/changelog.gz"
find "$root" -type f -exec chmod go-w {} +

# Control files.
install -d -m 0755 "$root/DEBIAN"
mkdir -p "$stage/debian"
printf 'Source: earfs\n\nPackage: earfs\nArchitecture: any\n' >"$stage/debian/control"
shlibs=$(cd "$stage" && dpkg-shlibdeps -O -e"$root/usr/bin/earfs" 2>/dev/null |
  sed -n 's/^shlibs:Depends=//p')
if [ -z "$shlibs" ]; then
  echo "package: dpkg-shlibdeps found no library dependencies of the binary" >&2
  exit 1
fi
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: earfs
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: $shlibs, fuse3
Section: admin
Priority: optional
Description: encryption at rest for database nodes (FUSE, AES-256-XTS)
 earfs is a FUSE filesystem that encrypts every file of a database's data
 directory with AES-256-XTS (per 4 KiB sector) under data keys wrapped by a
 KMS: a local key file, AWS KMS or Google Cloud KMS.
 .
 It runs as a systemd service (earfs@NAME, configured by /etc/earfs/NAME.toml)
 or by hand (earfs mount), and mounts from /etc/fstab (type fuse.earfs).
EOF
# systemd reads the new or changed unit (debhelper's snippet, without debhelper).
for script in postinst postrm; do
  cat >"$root/DEBIAN/$script" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null || true
fi
EOF
  chmod 0755 "$root/DEBIAN/$script"
done
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
  xargs -0 md5sum >DEBIAN/md5sums)
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"

deb=$out/earfs_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
