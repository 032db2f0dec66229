"""Before and after, for a change on the hot path: ``python -m benchmarks.compare [--base main]``.

Starts the fast responder (core 1), the bare aiohttp passthrough and two gateways on core 0:
one from ``--base`` (a git revision, the gateway's packages as they were there) and one
from the working tree, and measures them in turn, repetitions interleaved so that the
neighbours' load hits all three alike: (a) wrk at concurrency 32 and (b) 32-token streams at
concurrency 32. Prints, per system, the best of ``--reps`` (the machine is shared: the best
repetition is the one least disturbed) of req/s, streams/s and the proxy's CPU per request and
per stream, and each gateway as a share of the bare passthrough.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import scenarios, systems
from .procs import Proc
from .run import _responder, check_system, log, stop_all
from .systems import PACKAGES, ROOT


def checkout(revision: str, work: Path) -> Path:
    """The gateway's packages as they are at ``revision``."""
    src = work / "base"
    src.mkdir(parents=True)
    # The packages as they were then: a revision from before a package was added lacks it.
    present = subprocess.run(["git", "ls-tree", "--name-only", revision, *PACKAGES], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout.split()
    archive = subprocess.run(["git", "archive", revision, *present], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    return src


def best(rows: list[dict[str, Any]], key: str, *, low: bool = False) -> float | None:
    values = [r[key] for r in rows if r.get(key)]
    if not values:
        return None
    return min(values) if low else max(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="main", help="git revision to compare against")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4, help="length of each measurement")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vllm-gateway-compare-"))
    procs: list[Proc] = []
    running: list[systems.System] = []
    try:
        base = checkout(args.base, work)
        head, _ = systems.snapshot(work)
        fast, port = _responder("responder-fast", 0, work)
        procs.append(fast)
        scenarios.BACKENDS.members[:] = [fast]
        running.append(systems.hypercorn_bare(work, backends=(port, port)))
        for name, src in ((f"gateway@{args.base}", base), ("gateway@tree", head)):
            running.append(systems.gateway({"fast": port}, work, src=src, name=name))
        for system in running:
            check_system(system)
        a, b = [], []
        for _ in range(args.reps):
            a += scenarios.nonstream(running, concurrencies=(32,), reps=1, warmup_s=1,
                                     seconds=args.seconds, work=work, log=log)
            b += scenarios.streams(running, concurrency=32, reps=1, warmup_s=0.5,
                                   seconds=args.seconds, log=log)
    finally:
        stop_all(running, procs)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nbest of {args.reps} interleaved repetitions, concurrency 32, proxies on one core")
    bare = running[0].name
    figures = {}
    for system in running:
        mine_a = [r for r in a if r["system"] == system.name]
        mine_b = [r for r in b if r["system"] == system.name]
        figures[system.name] = (best(mine_a, "rps"), best(mine_a, "proxy_cpu_us_per_req",
                                                         low=True),
                                best(mine_b, "streams_per_s"),
                                best(mine_b, "proxy_cpu_us_per_stream", low=True))
    for name, (rps, us_req, sps, us_stream) in figures.items():
        share = ""
        if name != bare:
            b_rps, _, b_sps, _ = figures[bare]
            share = (f"  = {rps / b_rps:.2f}x / {sps / b_sps:.2f}x {bare}"
                     if rps and b_rps and sps and b_sps else "")
        print(f"{name:24} {rps or 0:7.0f} req/s ({us_req or 0:4.0f} us/req)  "
              f"{sps or 0:6.0f} streams/s ({us_stream or 0:4.0f} us/stream){share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
