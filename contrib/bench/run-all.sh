#!/usr/bin/env bash
# Runs hauberk, the fork/exec floor and Nix 2.8 on the issue's shapes in one session
# (absolute times drift between machines and runs: compare within a run).
# usage: run-all.sh [--no-nix]   results go to contrib/bench/results/*.tsv
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SHARED=${HAUBERK_SHARED_BENCH:-$HERE/../../../shared/bench}
[ -d "$SHARED" ] || SHARED=/work/shared/bench
R=$HERE/results; mkdir -p "$R"
for shape in "wide 1000" "chain 500" "layered 2000" "layered 5000"; do
  set -- $shape
  echo "== $1 $2"
  python3 "$HERE/hauberk-bench.py" "$1" "$2" | tee -a "$R/hauberk.tsv"
  RESULTS=$R/fork-limit.tsv WORK=/tmp/forklimit bash "$SHARED/fork-limit.sh" "$1" "$2" | tail -1
  if [ "${NO_NIX:-0}" != 1 ]; then
    RESULTS=$R/nix-baseline.tsv WORK=/tmp/nixbench bash "$SHARED/nix-baseline.sh" "$1" "$2" | tail -1
  fi
done
