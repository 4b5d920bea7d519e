#!/usr/bin/env bash
# CI daemon benchmark: N jobs (default 100,000) whose derivations are already in the store,
# listed by a trivial nix-eval-jobs evaluator (`cat` of a JSON-lines file in a git input).
# Measures, from the daemon's own millisecond log timestamps: time to register every job
# (evaluation started -> evaluation succeeded), time to the first build (evaluation started
# -> first 'build N started'), and the daemon's peak RSS with the whole queue held.
# The daemon is stopped with SIGTERM once both are seen (building 100,000 leaves is not
# the point). usage: contrib/bench/ci-bench.sh [N]
#   env: BENCH (../shared/bench), HAUBERK (target/release/hauberk), WORK (/tmp/hauberk-ci-bench),
#        REUSE=DIR: a directory of an earlier run (skips generating and adding the .drv files;
#        a fresh CI database is used)
set -euo pipefail
# The example builders use the host toolchain and paths: no sandbox.
export HAUBERK_SANDBOX=${HAUBERK_SANDBOX:-off}
HERE=$(cd "$(dirname "$0")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
BENCH=${BENCH:-$TOP/../shared/bench}
HAUBERK=${HAUBERK:-$TOP/target/release/hauberk}
N=${1:-100000}
WORK=${REUSE:-${WORK:-/tmp/hauberk-ci-bench}/$N-$(date +%s)}
[ -x "$HAUBERK" ] || (cd "$TOP" && cargo build --release --locked)
mkdir -p "$WORK"
H=("$HAUBERK" --store-dir "$WORK/store" --state-dir "$WORK/state")

if [ -z "${REUSE:-}" ]; then
echo "generating and adding $N derivations (setup, not measured)..." >&2
python3 "$HERE/gen-drvs.py" --bench "$BENCH" --shape wide -n "$N" --salt "c$(date +%s)" \
  --store-dir "$WORK/store" -o "$WORK/g"
head -n "$N" "$WORK/g/order.txt" | xargs "${H[@]}" drv add >"$WORK/drvs.txt"

# The evaluator's output: one nix-eval-jobs line per job.
mkdir -p "$WORK/repo"
python3 - "$WORK/drvs.txt" "$WORK/repo/jobs.jsonl" <<'PY'
import json, sys
import re
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as out:
    for i, drv in enumerate(l.strip() for l in f):
        name = drv.rsplit("/", 1)[1][33:-4]
        # As nix-eval-jobs prints it: with the outputs (read from the .drv's first output).
        path = re.match(r'Derive\(\[\("out","([^"]*)"', open(drv).read(200)).group(1)
        out.write(json.dumps({"attr": "job%d" % i, "drvPath": drv, "name": name,
                              "system": "x86_64-linux", "outputs": {"out": path}}) + "\n")
PY
git -C "$WORK/repo" init -q -b main
git -C "$WORK/repo" add jobs.jsonl
git -C "$WORK/repo" -c user.name=b -c user.email=b@b commit -q -m jobs
fi
cat >"$WORK/specs.conf" <<SPEC
[spec bench]
systems = x86_64-linux
evaluator = /bin/cat %{src}/jobs.jsonl
protocol = nix-eval-jobs

[input src]
url = $WORK/repo
branch = main
SPEC

run=$(date +%s%N)
log="$WORK/daemon-$run.log"
/usr/bin/time -v -o "$WORK/time-$run" "${H[@]}" -v ci --one-shot --max-jobs 2 \
  --database "$WORK/ci-$run.sqlite" --specifications "$WORK/specs.conf" >"$WORK/out" 2>"$log" &
tpid=$!
for _ in $(seq 1 1200); do
  if grep -q "evaluation 1 succeeded" "$log" && grep -q "build [0-9]* started" "$log"; then break; fi
  sleep 0.1
done
sleep 1
pkill -TERM -P "$tpid" || true   # the daemon, child of time(1)
wait "$tpid" || true
python3 - "$log" "$WORK/time-$run" "$N" <<'PY'
import re, sys
from datetime import datetime
def ts(line):
    return datetime.strptime(line[1:24], "%Y-%m-%dT%H:%M:%S.%f")
lines = open(sys.argv[1]).read().splitlines()
start = next(ts(l) for l in lines if "evaluation 1 started" in l)
done = next(ts(l) for l in lines if "evaluation 1 succeeded" in l)
first = next(ts(l) for l in lines if re.search(r"build \d+ started", l))
rss = next(int(l.split(":")[1]) for l in open(sys.argv[2]) if "Maximum resident" in l)
n = int(sys.argv[3])
print("| jobs | register all (s) | first build after evaluation start (ms) | daemon peak RSS (MiB) | RSS per queued build (bytes) |")
print("|---|---|---|---|---|")
print("| %d | %.2f | %.0f | %.1f | %.0f |" % (n, (done - start).total_seconds(),
      (first - start).total_seconds() * 1000, rss / 1024, rss * 1024 / n))
PY
