#!/usr/bin/env bash
# The sandbox's cost per build: hauberk sandboxed vs hauberk --no-sandbox vs Nix 2.8 with
# and without its sandbox, on the same graph shape, --max-jobs 2, in one session.
# usage: sandbox-bench.sh [SHAPE N] [ROUNDS]    (default: layered 500, 1 round)
# Needs root (namespaces) and Nix 2.8 (skip Nix with NO_NIX=1). Results appended to
# contrib/bench/results/sandbox.tsv: tool mode shape N build_s per_drv_ms.
# Modes: hauberk no-sandbox, sandbox (reused per-slot sandboxes, the default) and
# sandbox-noreuse (HAUBERK_SANDBOX_REUSE=0: a sandbox made and torn down per build; run
# once after the rounds, NOREUSE=0 skips it). Ends with each round's ratio and the median.
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
RUN=$(mktemp)
trap 'chmod -R u+w "$WORK" 2>/dev/null; rm -rf "$WORK"; rm -f "$RUN"' EXIT
row() { printf '%s\t%s\t%s\t%s\t%s\t%.2f\n' "$1" "$2" "$SHAPE" "$N" "$3" "$(echo "$3 * 1000 / $N" | bc -l)" | tee -a "$OUT" "$RUN"; }
hb_ns() { row hauberk no-sandbox "$(hb --build-arg=--no-sandbox)"; }
hb_sb() {
  row hauberk sandbox "$(hb --build-arg=--sandbox --build-arg=--sandbox-paths --build-arg="$PATHS")"
}
nix_run() {  # MODE true|false
  RESULTS=/dev/null WORK=/tmp/nixbench bash "$SHARED/nix-baseline.sh" "$SHAPE" "$N" "" \
    --option sandbox "$1" --option sandbox-paths "$PATHS" | cut -f5
}
nix_ns() { row nix-2.8 no-sandbox "$(nix_run false)"; }
nix_sb() { row nix-2.8 sandbox "$(nix_run true)"; }
# Each mode runs after the other one in every other round: a run that follows one which
# freed many inodes is slower on ext4 without a journal (see above), and neither mode
# should always be the one that pays.
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then hb_ns; hb_sb; else hb_sb; hb_ns; fi
  if [ "${NO_NIX:-0}" != 1 ]; then
    if [ $((r % 2)) = 1 ]; then nix_ns; nix_sb; else nix_sb; nix_ns; fi
  fi
done
# A sandbox made and torn down per build (HAUBERK_SANDBOX_REUSE=0), once, last: it frees
# the most inodes of all.
if [ "${NOREUSE:-1}" = 1 ]; then
  s=$(HAUBERK_SANDBOX_REUSE=0 hb --build-arg=--sandbox --build-arg=--sandbox-paths \
        --build-arg="$PATHS")
  row hauberk sandbox-noreuse "$s"
fi
# Per round: each sandbox's time over its tool's time without; then the medians.
python3 - "$RUN" <<'PY'
import sys, statistics as st
rows = [l.split('\t') for l in open(sys.argv[1]) if l.strip()]
runs = {}
for tool, mode, _, _, s, _ in rows:
    runs.setdefault((tool, mode), []).append(float(s))
def ratios(tool, mode):
    a, b = runs.get((tool, mode), []), runs.get((tool, 'no-sandbox'), [])
    if len(a) < len(b):
        b = [st.median(b)] * len(a)
    return [x / y for x, y in zip(a, b)]
for tool, mode in [('hauberk', 'sandbox'), ('hauberk', 'sandbox-noreuse'), ('nix-2.8', 'sandbox')]:
    r = ratios(tool, mode)
    if r:
        print('%s %s / no-sandbox: rounds %s, median %.2fx' % (
            tool, mode, ' '.join('%.2f' % x for x in r), st.median(r)))
PY
