#!/usr/bin/env bash
# Soak run of the power-cut tier (tests/powercut.rs, scripts/tier3/powercut.sh):
# many more cut points and states per cut point, over several seeds.
#
#   powercut-soak.sh [SEEDS]   (default 5 seeds)
#
#   EARFS_POWERCUT_CUTS (default 400), EARFS_POWERCUT_PG_CUTS (default 40),
#   EARFS_POWERCUT_STATES (default 4), EARFS_POWERCUT_COMMITS (default 1000),
#   EARFS_POWERCUT_PG_COMMITS (default 200)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seeds="${1:-5}"
export EARFS_POWERCUT_CUTS="${EARFS_POWERCUT_CUTS:-400}"
export EARFS_POWERCUT_PG_CUTS="${EARFS_POWERCUT_PG_CUTS:-40}"
export EARFS_POWERCUT_STATES="${EARFS_POWERCUT_STATES:-4}"
export EARFS_POWERCUT_COMMITS="${EARFS_POWERCUT_COMMITS:-1000}"
export EARFS_POWERCUT_PG_COMMITS="${EARFS_POWERCUT_PG_COMMITS:-200}"
for ((seed = 1; seed <= seeds; seed++)); do
    echo "=== powercut soak: seed $seed of $seeds"
    EARFS_POWERCUT_SEED="$seed" bash "$repo/scripts/tier3/powercut.sh"
done
echo "PASS: powercut soak ($seeds seeds)"
