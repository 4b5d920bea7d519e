#!/usr/bin/env python3
"""Sums the sandbox setup times that `hauberk build` logs per build with
RUST_LOG=hauberk=debug ("sandbox setup of '...': N us (step M us xK, ...)"): the average
setup per build, then each kind of step, slowest first.

usage: LOG=/tmp/build.log RUST_LOG=hauberk=debug KEEP=1 python3 hauberk-bench.py \\
           layered 500 --build-arg=--sandbox --build-arg=--sandbox-paths \\
           '--build-arg=/bin /lib /lib64 /usr'
       python3 setup-steps.py /tmp/build.log
"""
import collections
import re
import sys


def main():
    total, builds = 0, 0
    us, calls = collections.Counter(), collections.Counter()
    for line in open(sys.argv[1]):
        m = re.search(r"sandbox setup of '[^']*': (\d+)us \((.*)\)", line)
        if not m:
            continue
        builds += 1
        total += int(m.group(1))
        for part in m.group(2).split(", "):
            s = re.match(r"(.*) (\d+)us x(\d+)$", part)
            if s:
                us[s.group(1)] += int(s.group(2))
                calls[s.group(1)] += int(s.group(3))
    if not builds:
        sys.exit("no sandbox setup lines (RUST_LOG=hauberk=debug?)")
    print("builds %d, setup %.0f us per build" % (builds, total / builds))
    for kind, t in us.most_common():
        print("%-45s %7.1f us per build %5.1f calls" % (kind, t / builds, calls[kind] / builds))


if __name__ == "__main__":
    main()
