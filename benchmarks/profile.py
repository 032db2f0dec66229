"""Profile the gateway under load: ``python -m benchmarks.profile [--seconds 10] [--out DIR]``
(``--server gateway-uvicorn`` or ``gateway-granian``: its app under that server instead).

Starts the fast responder (core 1) and the gateway (core 0, from a snapshot of the tree, as
``benchmarks.run`` does), drives it with (a) wrk at concurrency 32 and then (b) 32-token
streams at concurrency 32, and records each with py-spy (the ``bench`` extra) attached to the
gateway: a flame graph (``profile-<scenario>.svg``) and collapsed stacks
(``profile-<scenario>.txt``), from which it prints where the time goes: by function (own
time and inclusive time), by package (whose code was on top of the stack) and by what each
sampled stack was doing (``bucket``: pool bookkeeping, request building, relay read or write,
task groups, access log...).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from . import scenarios, systems
from .procs import LOAD_CORE, Sample, pinned, usage
from .run import _responder, check_system
from .systems import ROOT

# Which package a frame's file belongs to (py-spy names files relative to site-packages or the
# working directory), first match wins.
PACKAGES = (
    ("aiohttp", "aiohttp/"), ("yarl", "yarl/"), ("multidict", "multidict/"),
    ("httpx2", "httpx2/"), ("httpcore2", "httpcore2/"), ("httpcore", "httpcore/"),
    ("h11", "h11/"), ("hypercorn", "hypercorn/"), ("uvicorn", "uvicorn/"),
    ("httptools", "httptools/"), ("granian", "granian/"), ("structlog", "structlog/"),
    ("prometheus_client", "prometheus_client/"), ("anyio", "anyio/"), ("sniffio", "sniffio/"),
    ("asyncio", "asyncio/"), ("json", "json/"), ("logging", "logging/"),
    ("gateway proxy/", "proxy/"), ("gateway middleware/", "middleware/"),
    ("gateway backends/", "backends/"), ("gateway kernel/", "kernel/"),
)
def _where(frame: str) -> str:
    return frame[frame.rfind("(") + 1:].rstrip(")") if "(" in frame else ""


def package_of(frame: str) -> str:
    where = _where(frame)
    for name, prefix in PACKAGES:
        if where.startswith(prefix) or "/" + prefix in where:
            return name
    if where.startswith("<") or where.endswith(".py") or ".py:" in where:
        return "stdlib" if "/" not in where.split(":")[0] or where.startswith("<") else "other"
    return "other"


def _function(frame: str) -> str:
    """``name (file:line)`` without the line, so a function's lines add up."""
    where = _where(frame)
    return frame[:frame.rfind("(")].strip() + " (" + where.rsplit(":", 1)[0] + ")"


# The ASGI server's frames, whichever runs the gateway.
SERVER = ("hypercorn/", "h11/", "uvicorn/", "httptools/", "granian/")


def _has(stack: str, *keys: str) -> bool:
    return any(k in stack for k in keys)


def bucket(frames: list[str]) -> str:
    """Which cost a sample belongs to, judged from its whole stack (the first rule that
    matches wins, so e.g. json work done for the access log counts as the log's)."""
    s, leaf = ";".join(frames), frames[-1]
    if _has(s, "structlog/"):
        return "structlog access log"
    if _has(s, "prometheus_client/"):
        return "prometheus_client counters/histograms"
    if _has(s, "json/"):
        return "json parse/dump"
    if _has(s, "_relay"):
        if _has(s, "aiter_raw", "iter_any", "aiohttp/"):
            return "relay: upstream body read (aiohttp or httpx2 client, chunked decode)"
        if _has(s, *SERVER):
            return "relay: downstream write (the server, socket write)"
        if _has(s, "progress.py"):
            return "relay: the response tracker's send wrapper (own code)"
        return "relay: other (header filter, loop)"
    if _has(s, "Answer.aclose"):
        return "upstream response close / connection release"
    if _has(s, "StreamingPassthrough._open"):
        return "upstream request send + response head (aiohttp or httpx2)"
    if _has(s, "disconnect.py"):
        return "ClientWatch and the pool lease under it (watcher task, cancel scope, lease)"
    if _has(s, "Gateway.__call__"):
        if _has(leaf, *SERVER):
            return "the server (send path outside the relay)"
        if _has(leaf, "middleware/", "proxy/", "kernel/"):
            return "gateway middleware/proxy/kernel own code"
        return "anyio/asyncio inside the middleware chain (semaphores, scopes, pool lease)"
    if _has(s, *SERVER):
        return "the server (accept, parse request, keep-alive)"
    if _has(s, "aiohttp/"):
        return "upstream client callbacks (aiohttp: bytes received, parsed, pooled)"
    return "event loop / other"


def analyse(collapsed: Path, top: int = 25) -> dict[str, object]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        # py-spy may put the thread's name first; keep the frames (they name a file).
        frames = [f for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        total += n
        own[_function(frames[-1])] += n
        packages[package_of(frames[-1])] += n
        buckets[bucket(frames)] += n
        for f in {_function(f) for f in frames}:
            inclusive[f] += n
        for f in {f for f in frames if package_of(f).startswith("gateway")}:
            lines[f] += n

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, v / total) for k, v in counter.most_common(top)] if total else []

    return {"samples": total, "own": share(own), "inclusive": share(inclusive),
            "packages": share(packages), "buckets": share(buckets),
            "gateway_lines": share(lines)}


def spy(pid: int, seconds: float, out: Path, fmt: str) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    subprocess.run(pinned(LOAD_CORE, [py_spy, "record", "--pid", str(pid), "--duration",
                                      str(int(seconds)), "--rate", "200",
                                      "--subprocesses", "--format", fmt, "--output",
                                      str(out)]),
                   check=True, capture_output=True, timeout=seconds + 60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--server", default="hypercorn", choices=["hypercorn", *systems.SERVERS],
                        help="the server the gateway runs under (vllm-gateway serve: hypercorn)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vllm-gateway-profile-"))
    src, source_hash = systems.snapshot(work)
    fast, port = _responder("responder-fast", 0, work)
    gw = None
    report: dict[str, object] = {"gateway_source_sha256": source_hash}
    try:
        gw = systems.gateway({"fast": port}, work, src=src, server=args.server)
        assert gw.proc is not None
        check_system(gw)
        for scenario in ("nonstream-c32", "streams-c32"):
            for fmt, suffix in (("raw", "txt"), ("flamegraph", "svg")):
                path = out / f"profile-{scenario}.{suffix}"
                end = time.monotonic() + args.seconds + 3
                if scenario.startswith("nonstream"):
                    load = subprocess.Popen(pinned(LOAD_CORE, [
                        "wrk", "-t1", "-c32", f"-d{int(args.seconds) + 3}s", "--timeout", "10s",
                        "-s", str(scenarios._lua(gw.fast, work)), gw.fast.url]),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                else:
                    spec = {"mode": "streams", **gw.fast.spec(), "max_tokens": 32,
                            "concurrency": 32, "window_start": time.monotonic() + 1,
                            "window_end": end}
                    load = subprocess.Popen(pinned(LOAD_CORE, [
                        sys.executable, "-m", "benchmarks.loadgen", json.dumps(spec)]),
                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                time.sleep(1.0)
                before = Sample.take({"gateway": gw.proc})
                spy(gw.proc.pid, args.seconds, path, fmt)
                after = Sample.take({"gateway": gw.proc})
                output, _ = load.communicate(timeout=60)
                if fmt == "raw":
                    result = analyse(path)
                    result["gateway_core_share"] = usage(before, after)["gateway_cpu_s"] / (
                        after.at - before.at)
                    result["load"] = output.strip().splitlines()[-1][:300] if output else ""
                    report[scenario] = result
                    print_report(scenario, result)
    finally:
        if gw is not None:
            gw.stop()
        fast.stop()
        shutil.rmtree(work, ignore_errors=True)
    (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}/profile-*.svg (flame graphs), profile-*.txt (collapsed stacks), "
          "profile.json")
    return 0


def print_report(scenario: str, result: dict[str, object]) -> None:
    print(f"\n== {scenario}: {result['samples']} samples, gateway used "
          f"{result['gateway_core_share']:.0%} of its core; load: {result['load']}")
    for title, key, n in (("by package of the leaf frame", "packages", 15),
                          ("where the time goes (by what the stack is doing)", "buckets", 20),
                          ("own time by function", "own", 25),
                          ("inclusive time by function", "inclusive", 45),
                          ("inclusive time by gateway line", "gateway_lines", 30)):
        print(f"-- {title}")
        for name, frac in result[key][:n]:  # type: ignore[index]
            print(f"  {frac * 100:5.1f}%  {name}")


if __name__ == "__main__":
    sys.exit(main())
