"""(f) ``serve --workers 2`` against one process: ``python -m benchmarks.workers``.

Starts the two responders (core 1; ``benchmarks/responder.py``), the gateway as one process
(``gateway-workers1``: ``serve``) and with ``--workers 2`` (``gateway-workers2``: two workers
and their private redis-server), neither pinned (unlike the other benchmarks' proxies: the two
get the same cores to run on, shared with the backends and the load generator), and drives
each in turn, repetitions interleaved:

- (a) requests/s of small completions (wrk, closed loop at ``--concurrency``);
- (c) relayed stream chunks/s, ``--streams`` concurrent streams at 50 tokens/s;
- (e) the burst: ``--burst`` new streams at once on new connections (``benchmarks.ttft``'s
  load, on the 50 tokens/s backend), and the p99 time to first token each system adds to
  ``direct``'s.

With each figure, the CPU each system spent on it, over all its processes (supervisor, workers,
redis-server): on a machine with a core per worker, N workers give N cores' worth of
``1 / CPU per request``, so the ratio of the CPU per request says what ``--workers N`` scales
to where this 2-core machine cannot show it (the load and the backends need cores too). Prints
a table and writes ``workers.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import scenarios, systems, ttft
from .procs import Proc, loadavg
from .run import _responder, check_system, log, stop_all

# Each system's name and its number of workers.
SYSTEMS = {"gateway-workers1": 1, systems.WORKERS: 2}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.workers",
                                description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=64, help="(a) connections")
    p.add_argument("--seconds", type=float, default=5.0, help="(a) and (c): measured seconds")
    p.add_argument("--streams", type=int, default=400, help="(c) concurrent streams")
    p.add_argument("--burst", type=int, default=200, help="(e) streams started at once")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    return p


def _all_workers_listen(system: systems.System, count: int, timeout: float = 60.0) -> None:
    """Wait until each of the ``count`` workers listens (``Running on`` in their log)."""
    assert system.proc is not None
    deadline = time.monotonic() + timeout
    while system.proc.log.read_text(errors="replace").count("Running on") < count:
        if time.monotonic() > deadline or not system.proc.alive():
            raise RuntimeError(f"{system.name}: not {count} workers:\n{system.proc.log_tail()}")
        time.sleep(0.1)


def _median(rows: list[dict[str, Any]], system: str, key: str) -> float | None:
    values = [r[key] for r in rows if r["system"] == system and r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(raw: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per system: medians over the repetitions, and the burst's TTFT against direct's."""
    burst = {row["system"]: row for row in ttft.summarize(raw["burst"])}
    out = []
    for name in SYSTEMS:
        out.append({
            "system": name,
            "rps": _median(raw["nonstream"], name, "rps"),
            "cpu_us_per_req": _median(raw["nonstream"], name, "proxy_cpu_us_per_req"),
            "chunks_per_s": _median(raw["paced"], name, "events_per_s"),
            "cpu_s_per_1000_chunks": _median(raw["paced"], name, "proxy_cpu_s_per_1000_chunks"),
            "gap_p99_ms": _median(raw["paced"], name, "gap_p99_ms"),
            "burst_ttft_p99_ms": burst.get(name, {}).get("ttft_first_wave_ms_p99"),
            "burst_added_ttft_p99_ms": burst.get(name, {}).get("added_ttft_first_wave_ms_p99"),
        })
    return out


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def render(summary: list[dict[str, Any]]) -> str:
    one, two = summary
    head = ["system", "req/s", "us CPU/req", "chunks/s", "CPU s/1k chunks", "gap p99 ms",
            "burst TTFT p99 ms", "added"]

    def cells(r: dict[str, Any]) -> list[str]:
        return [r["system"], _num(r["rps"]), _num(r["cpu_us_per_req"]),
                _num(r["chunks_per_s"]), f"{r['cpu_s_per_1000_chunks'] or 0:.3f}",
                _num(r["gap_p99_ms"]), _num(r["burst_ttft_p99_ms"]),
                _num(r["burst_added_ttft_p99_ms"])]

    rows = [cells(one), cells(two),
            ["2 vs 1", _ratio(two["rps"], one["rps"]),
             _ratio(two["cpu_us_per_req"], one["cpu_us_per_req"]),
             _ratio(two["chunks_per_s"], one["chunks_per_s"]),
             _ratio(two["cpu_s_per_1000_chunks"], one["cpu_s_per_1000_chunks"]), "", "", ""]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True))
                     for line in [head, *rows])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    why = systems.available(systems.WORKERS)
    if why:
        raise SystemExit(why)
    work = Path(tempfile.mkdtemp(prefix="vllm-gateway-workers-"))
    procs: list[Proc] = []
    running: list[systems.System] = []
    raw: dict[str, list[dict[str, Any]]] = {}
    began = loadavg()
    try:
        src, source_hash = systems.snapshot(work)
        fast, fast_port = _responder("responder-fast", 0, work)
        paced, paced_port = _responder("responder-paced", scenarios.TOKENS_PER_SECOND, work)
        procs += [fast, paced]
        scenarios.BACKENDS.members[:] = [fast, paced]
        for name, count in SYSTEMS.items():
            system = systems.gateway({"fast": fast_port, "paced": paced_port}, work, src=src,
                                     name=name, core=None, workers=count)
            running.append(system)
            _all_workers_listen(system, count)
            check_system(system)
            log(f"{name} ready")
        seconds = max(1, round(args.seconds))
        raw["nonstream"] = scenarios.nonstream(
            running, concurrencies=(args.concurrency,), reps=args.reps, warmup_s=1,
            seconds=seconds, work=work, log=log)
        raw["paced"] = []
        for _ in range(args.reps):
            raw["paced"] += scenarios.paced(
                running, steps=(args.streams,), ramp_s=1.0, seconds=args.seconds,
                backend_url=f"http://127.0.0.1:{paced_port}", log=log)
        # The burst on the paced backend (so that the streams overlap), direct as the baseline.
        on_paced = [dataclasses.replace(s, fast=s.paced)
                    for s in [systems.direct(fast_port, paced_port), *running]]
        raw["burst"] = scenarios.serve(on_paced, streams=args.burst, requests=2 * args.burst,
                                       max_tokens=64, prompt_words=100, reps=args.reps, log=log)
    finally:
        stop_all(running, procs)
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(raw)
    ttft.save(args, "workers", {"gateway_source_sha256": source_hash, "raw": raw,
                                "loadavg": {"start": began, "end": loadavg()},
                                "summary": summary})
    print(f"\n(f) --workers 2 against one process; (a) c={args.concurrency}, (c) "
          f"{args.streams} streams at {scenarios.TOKENS_PER_SECOND:g} tokens/s, (e) "
          f"{args.burst} new streams at once; medians of {args.reps} interleaved reps; "
          f"load average {began} -> {loadavg()}")
    print(render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
