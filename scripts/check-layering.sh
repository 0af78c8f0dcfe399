#!/usr/bin/env bash
# Checks the module dependency rules of DESIGN.md and that `unsafe` appears only in src/sys/.
#   cli → daemon → fuse → fs → content → crypto;  daemon → kms → crypto;
#   daemon → volume → kms;  fs → sys;  daemon → sys;  crypto → sys (SIMD kernel only).
# Nothing imports cli or daemon. Only src/fuse/ imports fuser.
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A allowed=(
  [cli]="daemon kms volume crypto content fs fuse sys"
  [daemon]="fuse fs content kms volume crypto sys"
  [fuse]="fs"
  [fs]="content crypto sys volume"
  [content]="crypto"
  [crypto]="sys"
  [kms]="crypto"
  [volume]="kms crypto"
  [sys]=""
)
# fs may use volume only for the reserved name constant (CONFIG_NAME).
fail=0
for mod in "${!allowed[@]}"; do
  [ -d "src/$mod" ] || continue
  while IFS= read -r line; do
    file=${line%%:*}
    for dep in $(grep -oE 'crate::[a-z_]+' <<<"${line#*:}" | sed 's/crate:://' | sort -u); do
      [ "$dep" = "$mod" ] && continue
      case " ${allowed[$mod]} " in
        *" $dep "*) ;;
        *) echo "layering: src/$mod may not use crate::$dep ($file)"; fail=1 ;;
      esac
    done
  done < <(grep -rn 'crate::' "src/$mod" || true)
done
if grep -rn 'volume::' src/fs | grep -vE 'CONFIG_NAME|CONFIG_TMP_NAME' | grep -q .; then
  echo "layering: src/fs may use crate::volume only for CONFIG_NAME"; fail=1
fi
# fuser only in src/fuse/.
if grep -rln 'fuser::' src --include=*.rs | grep -v '^src/fuse/' | grep -q .; then
  echo "layering: only src/fuse/ may import fuser:"; grep -rln 'fuser::' src | grep -v '^src/fuse/'; fail=1
fi
# unsafe only in src/sys/.
if grep -rnE '\bunsafe\b' src --include=*.rs | grep -v '^src/sys/' | grep -vE '^\S+:\s*//' | grep -vE 'deny\(unsafe_code\)' | grep -q .; then
  echo "layering: unsafe outside src/sys/:"
  grep -rnE '\bunsafe\b' src --include=*.rs | grep -v '^src/sys/' | grep -vE 'deny\(unsafe_code\)'
  fail=1
fi
if [ "$fail" -ne 0 ]; then
  echo "layering check FAILED"; exit 1
fi
echo "layering check passed"
