#!/usr/bin/env python3
"""Time from starting `hauberk build` to its first builder, from the first
'@ build-started' trace line; the build is then stopped (SIGTERM).

usage: first-build.py HAUBERK [GLOBAL OPTIONS] build [OPTIONS] DRV...
(the command must include --print-build-trace)
"""
import signal
import subprocess
import sys
import time

t0 = time.monotonic()
p = subprocess.Popen(sys.argv[1:], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
for line in p.stderr:
    if line.startswith(b"@ build-started"):
        print("first build after %.1f ms" % ((time.monotonic() - t0) * 1000))
        break
else:
    print("no build started", file=sys.stderr)
p.send_signal(signal.SIGTERM)
p.wait()
