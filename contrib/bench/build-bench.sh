#!/usr/bin/env bash
# Build-engine benchmark: hauberk against Nix 2.8 and the fork/exec floor, in one run.
#
# usage: contrib/bench/build-bench.sh [SHAPE:N ...]     (default: wide:1000 chain:500
#                                                        layered:2000 layered:5000)
#   env: BENCH (default ../shared/bench beside the checkout), HAUBERK (default
#        target/release/hauberk), WORK (default /tmp/hauberk-bench), NIX=0 to skip Nix,
#        JOBS (max-jobs, default 2), FIRST_N (time-to-first-build graph size, default 50000)
# prints a markdown table: shape, N, hauberk s, Nix s, fork floor s, ratios, peak RSS.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
BENCH=${BENCH:-$TOP/../shared/bench}
HAUBERK=${HAUBERK:-$TOP/target/release/hauberk}
WORK=${WORK:-/tmp/hauberk-bench}
JOBS=${JOBS:-2}
FIRST_N=${FIRST_N:-50000}
NIX=${NIX:-1}
[ -x "$HAUBERK" ] || (cd "$TOP" && cargo build --release --locked)
[ -f "$BENCH/gen-graph.py" ] || { echo "gen-graph.py not found in $BENCH (set BENCH)" >&2; exit 1; }
shapes=("$@"); [ ${#shapes[@]} -gt 0 ] || shapes=(wide:1000 chain:500 layered:2000 layered:5000)
mkdir -p "$WORK"
now() { date +%s.%N; }
rss() { awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$1"; }

echo "| shape | N | drvs | hauberk s | Nix 2.8 s | fork floor s | hauberk / floor | Nix / hauberk | hauberk ms/drv | hauberk peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for sn in "${shapes[@]}"; do
  shape=${sn%%:*}; n=${sn##*:}
  salt="h$(date +%s%N | tail -c 9)"
  d="$WORK/$shape-$n-$salt"; mkdir -p "$d"
  store="$d/store"; state="$d/state"
  python3 "$HERE/gen-drvs.py" --bench "$BENCH" --shape "$shape" -n "$n" --salt "$salt" \
    --store-dir "$store" -o "$d/g"
  xargs -a "$d/g/order.txt" "$HAUBERK" --store-dir "$store" --state-dir "$state" drv add >/dev/null
  drvs=$(wc -l <"$d/g/all.txt")
  t0=$(now)
  /usr/bin/time -v -o "$d/h.time" "$HAUBERK" --store-dir "$store" --state-dir "$state" \
    build --max-jobs "$JOBS" $(cat "$d/g/roots.txt") >"$d/h.out" 2>"$d/h.err"
  t1=$(now)
  h=$(echo "$t1 - $t0" | bc -l)
  hr=$(rss "$d/h.time")
  p=2; [ "$shape" = chain ] && p=1
  floor=$(WORK="$d/fl" RESULTS="$d/fl.tsv" bash "$BENCH/fork-limit.sh" "$shape" "$n" "$p" | cut -f5)
  if [ "$NIX" = 1 ] && command -v nix-store >/dev/null; then
    nixs=$(WORK="$d/nix" RESULTS="$d/nix.tsv" JOBS="$JOBS" bash "$BENCH/nix-baseline.sh" "$shape" "$n" | cut -f5)
  else
    nixs=""
  fi
  ratio=$(echo "$h / $floor" | bc -l)
  nr=""; [ -n "$nixs" ] && nr=$(printf '%.1fx' "$(echo "$nixs / $h" | bc -l)")
  printf '| %s | %s | %s | %.2f | %s | %.2f | %.2fx | %s | %.2f | %s |\n' "$shape" "$n" "$drvs" "$h" \
    "${nixs:-n/a}" "$floor" "$ratio" "${nr:-n/a}" "$(echo "1000 * $h / $drvs" | bc -l)" "$hr"
done

# Time to the first builder at FIRST_N queued derivations (wide: N independent leaves + root).
salt="f$(date +%s%N | tail -c 9)"
d="$WORK/first-$FIRST_N-$salt"; mkdir -p "$d"
python3 "$HERE/gen-drvs.py" --bench "$BENCH" --shape wide -n "$FIRST_N" --salt "$salt" \
  --store-dir "$d/store" -o "$d/g"
xargs -a "$d/g/order.txt" "$HAUBERK" --store-dir "$d/store" --state-dir "$d/state" drv add >/dev/null
# The root depends on all FIRST_N leaves, so the worker must start a leaf before it has
# loaded the whole graph. We time the first '@ build-started' trace line, printed at fork.
t0=$(now)
"$HAUBERK" --store-dir "$d/store" --state-dir "$d/state" build --max-jobs "$JOBS" --print-build-trace \
  $(cat "$d/g/roots.txt") 2>&1 >/dev/null | while IFS= read -r line; do
  case "$line" in "@ build-started"*) t1=$(now); printf '\ntime to first build with %s queued: %.1f ms\n' "$FIRST_N" "$(echo "1000 * ($t1 - $t0)" | bc -l)"; break;; esac
done
pkill -f -- "--state-dir $d/state" 2>/dev/null || true
