#!/usr/bin/env bash
# The sandbox's cost per build: hauberk sandboxed vs hauberk --no-sandbox vs Nix 2.8 with
# and without its sandbox, on the same graph shape, --max-jobs 2, in one session.
# usage: sandbox-bench.sh [SHAPE N] [ROUNDS]    (default: layered 500, 1 round)
# Needs root (namespaces) and Nix 2.8 (skip Nix with NO_NIX=1). Results appended to
# contrib/bench/results/sandbox.tsv: tool mode shape N build_s per_drv_ms.
# Modes: hauberk no-sandbox, sandbox (reused per-slot sandboxes, the default) and
# sandbox-noreuse (HAUBERK_SANDBOX_REUSE=0: a sandbox made and torn down per build).
# hauberk's stores go below WORK (default /var/tmp/hauberk-bench): like Nix's /nix/store,
# not below /tmp (a store below /tmp costs the reused sandbox a move per build, as each
# build gets a fresh /tmp).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SHARED=${HAUBERK_SHARED_BENCH:-$HERE/../../../shared/bench}
[ -d "$SHARED" ] || SHARED=/work/shared/bench
SHAPE=${1:-layered}; N=${2:-500}; ROUNDS=${3:-1}
R=$HERE/results; mkdir -p "$R"; OUT=$R/sandbox.tsv
[ -s "$OUT" ] || printf 'tool\tmode\tshape\tN\tbuild_s\tper_drv_ms\n' >"$OUT"
PATHS='/bin /lib /lib64 /usr'
WORK=${WORK:-/var/tmp/hauberk-bench}
# Scratch stores are kept until the end: on ext4 without a journal, freshly freed inodes
# make the next run's inode allocation slow (recently_deleted), which would bill one mode
# for the previous run's clean-up.
hb() { KEEP=1 python3 "$HERE/hauberk-bench.py" "$SHAPE" "$N" --work "$WORK" "$@" | cut -f5; }
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"' EXIT
row() { printf '%s\t%s\t%s\t%s\t%s\t%.2f\n' "$1" "$2" "$SHAPE" "$N" "$3" "$(echo "$3 * 1000 / $N" | bc -l)" | tee -a "$OUT"; }
for r in $(seq "$ROUNDS"); do
  s=$(hb --build-arg=--no-sandbox)
  row hauberk no-sandbox "$s"
  s=$(hb --build-arg=--sandbox --build-arg=--sandbox-paths --build-arg="$PATHS")
  row hauberk sandbox "$s"
  s=$(HAUBERK_SANDBOX_REUSE=0 hb --build-arg=--sandbox --build-arg=--sandbox-paths \
        --build-arg="$PATHS")
  row hauberk sandbox-noreuse "$s"
  if [ "${NO_NIX:-0}" != 1 ]; then
    s=$(RESULTS=/dev/null WORK=/tmp/nixbench bash "$SHARED/nix-baseline.sh" "$SHAPE" "$N" "" \
          --option sandbox false | cut -f5)
    row nix-2.8 no-sandbox "$s"
    s=$(RESULTS=/dev/null WORK=/tmp/nixbench bash "$SHARED/nix-baseline.sh" "$SHAPE" "$N" "" \
          --option sandbox true --option sandbox-paths "$PATHS" | cut -f5)
    row nix-2.8 sandbox "$s"
  fi
done
