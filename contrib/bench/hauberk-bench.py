#!/usr/bin/env python3
"""Time `hauberk build` on a graph from ../shared/bench/gen-graph.py (the same derivations
Nix builds there: same names, env, builder and script), in a fresh store.

usage: hauberk-bench.py SHAPE N [--jobs 2] [--layers 20] [--seed 1] [--hauberk PATH]
                         [--work DIR] [--build-arg ARG]...   (default --no-sandbox)
Prints one TSV line: shape N drvs add_s build_s drv_per_s cpu_s peak_rss_MiB first_build_ms
(add_s: adding the .drv files with `hauberk drv add`, level by level; build_s: wall time of
`hauberk build --max-jobs J ROOTS`, which is what compares with fork-limit.sh.)
Environment: KEEP=1 keeps the scratch store; STATS=FILE appends the build's `--stats` lines;
LOG=FILE appends its whole standard error (with RUST_LOG=hauberk=debug, the per-step setup
times that setup-steps.py sums); TMP_BASE=DIR puts build directories below DIR.
"""
import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("HAUBERK_SHARED_BENCH", os.path.join(HERE, "../../../shared/bench"))
if not os.path.isdir(SHARED):
    SHARED = "/work/shared/bench"
SCRIPT = 'echo "$name" > $out; for d in $deps; do echo "$d" >> $out; done'
SCRIPT_BIG = 'read -r deps < "$depsPath"; ' + SCRIPT
BIG_FANIN = 1000


def jstr(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape")
    ap.add_argument("n", type=int)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hauberk", default=os.path.join(HERE, "../../target/release/hauberk"))
    ap.add_argument("--work", default="/tmp/hauberk-bench")
    ap.add_argument("--build-arg", action="append", default=[],
                    help="extra 'hauberk build' argument (default: --no-sandbox)")
    a = ap.parse_args()
    salt = "h%d%d" % (time.time_ns() % 10**9, os.getpid())
    d = os.path.join(a.work, "%s-%d-%s" % (a.shape, a.n, salt))
    os.makedirs(os.path.join(d, "json"), exist_ok=True)
    # Build directories go below TMP_BASE when set (a tmpfs, say), else below the store.
    tmp = os.path.join(os.environ["TMP_BASE"], os.path.basename(d)) if os.environ.get("TMP_BASE") \
        else os.path.join(d, "tmp")
    os.makedirs(tmp, exist_ok=True)
    jobs = os.path.join(d, "jobs.txt")
    subprocess.run([sys.executable, os.path.join(SHARED, "gen-graph.py"), "--shape", a.shape,
                    "-n", str(a.n), "--layers", str(a.layers), "--seed", str(a.seed),
                    "--salt", salt, "-o", "/dev/null", "--jobs", jobs],
                   check=True, stderr=subprocess.DEVNULL)
    nodes = [l.split() for l in open(jobs)]
    base = [a.hauberk, "--store-dir", os.path.join(d, "store"), "--state-dir", os.path.join(d, "state")]
    level = {}
    for n in nodes:
        level[n[0]] = 1 + max((level[x] for x in n[1:]), default=-1)
    by_level = {}
    for n in nodes:
        by_level.setdefault(level[n[0]], []).append(n)
    drv, out = {}, {}
    t0 = time.time()
    for lv in sorted(by_level):
        files = []
        for n in by_level[lv]:
            name, deps = n[0], n[1:]
            big = len(deps) > BIG_FANIN
            env = {"builder": "/bin/sh", "deps": " ".join(out[x] for x in deps), "name": name,
                   "out": "", "salt": salt, "system": "x86_64-linux"}
            if big:
                env["passAsFile"] = "deps"
            j = ('{"name": %s, "system": "x86_64-linux", "builder": "/bin/sh", "args": ["-c", %s], '
                 '"env": {%s}, "outputs": {"out": {}}, "inputDrvs": {%s}, "inputSrcs": []}') % (
                jstr(name), jstr(SCRIPT_BIG if big else SCRIPT),
                ", ".join("%s: %s" % (jstr(k), jstr(v)) for k, v in sorted(env.items())),
                ", ".join('%s: ["out"]' % jstr(drv[x]) for x in deps))
            f = os.path.join(d, "json", name + ".json")
            with open(f, "w") as fh:
                fh.write(j)
            files.append((name, f))
        for i in range(0, len(files), 2000):
            chunk = files[i:i + 2000]
            r = subprocess.run(base + ["drv", "add"] + [f for _, f in chunk], check=True,
                               capture_output=True, text=True)
            for (name, _), p in zip(chunk, r.stdout.split()):
                drv[name] = p
                text = open(p).read()
                out[name] = re.match(r'Derive\(\[\("out","([^"]+)"', text).group(1)
    add_s = time.time() - t0
    depended = set(x for n in nodes for x in n[1:])
    roots = [drv[n[0]] for n in nodes if n[0] not in depended]
    cmd = ["/usr/bin/time", "-f", "%U %S %M", "-o", os.path.join(d, "time")] + base + [
        "build", "--max-jobs", str(a.jobs), "--stats"] + (a.build_arg or ["--no-sandbox"]) + roots
    env = dict(os.environ, TMPDIR=tmp)
    # Do not bill the build for writing back the setup's files (its syncfs would).
    os.sync()
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    build_s = time.time() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        sys.exit("hauberk build failed: %d" % r.returncode)
    u, s, m = open(os.path.join(d, "time")).read().split()[-3:]
    fb = re.search(r"first-build-ms (\d+)", r.stderr)
    if os.environ.get("STATS"):
        with open(os.environ["STATS"], "a") as fh:
            for line in r.stderr.splitlines():
                if line.startswith("stats:"):
                    fh.write("%s %s\n" % (" ".join(a.build_arg or ["--no-sandbox"]), line))
    if os.environ.get("LOG"):
        with open(os.environ["LOG"], "a") as fh:
            fh.write(r.stderr)
    print("\t".join([a.shape, str(a.n), str(len(nodes)), "%.2f" % add_s, "%.3f" % build_s,
                     "%.1f" % (len(nodes) / build_s), "%.2f" % (float(u) + float(s)),
                     "%.1f" % (int(m) / 1024), fb.group(1) if fb else "-"]))
    if os.environ.get("KEEP") != "1":
        subprocess.run(["chmod", "-R", "u+w", d])
        subprocess.run(["rm", "-rf", d, tmp])


if __name__ == "__main__":
    main()
