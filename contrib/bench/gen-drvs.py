#!/usr/bin/env python3
"""Write the graphs of ../shared/bench/gen-graph.py as .drv files, without Nix.

Each derivation is exactly what `nix-instantiate` makes of gen-graph.py's expression
(same name, env, args, passAsFile for big fan-in), computed for any store directory, so
hauberk and Nix build the same work. Output (in OUTDIR):
  drvs/<hash>-<name>.drv   the ATerm files
  order.txt                their file names in topological order (for `hauberk drv add`)
  roots.txt                the store paths of the root derivations
  all.txt                  the store paths of every derivation, topological order

usage: gen-drvs.py --bench DIR --shape S -n N [--layers L] [--seed K] --salt S
                   --store-dir /nix/store --system x86_64-linux -o OUTDIR
"""
import argparse
import hashlib
import importlib.util
import os

B32 = "0123456789abcdfghijklmnpqrsvwxyz"


def nix32(h):
    n = (len(h) * 8 - 1) // 5 + 1
    out = []
    for i in range(n - 1, -1, -1):
        b = i * 5
        j, k = divmod(b, 8)
        c = (h[j] >> k) | ((h[j + 1] << (8 - k)) if j + 1 < len(h) else 0)
        out.append(B32[c & 0x1F])
    return "".join(out)


def store_path(store, typ, inner_hex, name):
    fp = "%s:sha256:%s:%s:%s" % (typ, inner_hex, store, name)
    d = hashlib.sha256(fp.encode()).digest()
    c = bytearray(20)
    for i, b in enumerate(d):
        c[i % 20] ^= b
    return "%s/%s-%s" % (store, nix32(bytes(c)), name)


def q(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") \
        .replace("\r", "\\r").replace("\t", "\\t") + '"'


def aterm(out_path, input_drvs, system, builder, args, env):
    outs = "[(%s,%s,\"\",\"\")]" % (q("out"), q(out_path))
    ins = "[" + ",".join("(%s,[%s])" % (q(k), q("out")) for k in sorted(input_drvs)) + "]"
    a = "[" + ",".join(q(x) for x in args) + "]"
    e = "[" + ",".join("(%s,%s)" % (q(k), q(v)) for k, v in sorted(env.items())) + "]"
    return "Derive(%s,%s,[],%s,%s,%s,%s)" % (outs, ins, q(system), q(builder), a, e)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True, help="directory of gen-graph.py")
    ap.add_argument("--shape", required=True)
    ap.add_argument("-n", type=int, required=True)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--salt", required=True)
    ap.add_argument("--store-dir", required=True)
    ap.add_argument("--system", default="x86_64-linux")
    ap.add_argument("-o", required=True)
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("gg", os.path.join(a.bench, "gen-graph.py"))
    gg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gg)
    nodes = gg.build_graph(a.shape, a.n, a.layers, a.seed)
    prefix = "b%s-%s-" % (a.salt, a.shape)
    os.makedirs(os.path.join(a.o, "drvs"), exist_ok=True)
    info = {}  # id -> (drv path, out path, hashDerivationModulo hex as an input)
    order, alls = [], []
    depended = set()
    for i, deps in nodes:
        depended.update(deps)
        name = prefix + ("root" if i == "root" else "n%d" % i)
        big = len(deps) > gg.BIG_FANIN
        env = {"builder": "/bin/sh", "deps": " ".join(info[d][1] for d in deps),
               "name": name, "salt": a.salt, "system": a.system, "out": ""}
        if big:
            env["passAsFile"] = "deps"
        args = ["-c", gg.SCRIPT_BIG if big else gg.SCRIPT]
        # hashDerivationModulo: outputs masked, inputs replaced by their modulo hashes.
        masked = aterm("", [info[d][2] for d in deps], a.system, "/bin/sh", args, env)
        mod = hashlib.sha256(masked.encode()).hexdigest()
        out = store_path(a.store_dir, "output:out", mod, name)
        env["out"] = out
        text = aterm(out, [info[d][0] for d in deps], a.system, "/bin/sh", args, env)
        # As an input, a derivation is hashed unmasked, its own inputs replaced likewise.
        unmasked = aterm(out, [info[d][2] for d in deps], a.system, "/bin/sh", args, env)
        as_input = hashlib.sha256(unmasked.encode()).hexdigest()
        refs = sorted(info[d][0] for d in deps)
        drv = store_path(a.store_dir, "text" + "".join(":" + r for r in refs),
                         hashlib.sha256(text.encode()).hexdigest(), name + ".drv")
        info[i] = (drv, out, as_input)
        base = os.path.basename(drv)
        with open(os.path.join(a.o, "drvs", base), "w") as f:
            f.write(text)
        order.append(os.path.join(a.o, "drvs", base))
        alls.append(drv)
    with open(os.path.join(a.o, "order.txt"), "w") as f:
        f.write("\n".join(order) + "\n")
    with open(os.path.join(a.o, "all.txt"), "w") as f:
        f.write("\n".join(alls) + "\n")
    with open(os.path.join(a.o, "roots.txt"), "w") as f:
        f.write("\n".join(info[i][0] for i, _ in nodes if i not in depended) + "\n")


if __name__ == "__main__":
    main()
