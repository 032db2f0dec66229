"""(e) The time to first token under a burst: ``python -m benchmarks.ttft [--streams 200]``.

Our equivalent of ``vllm bench serve --dataset-name random --random-output-len 128
--max-concurrency 200 --request-rate inf``: ``--streams`` clients start together, each on a
new connection, with random prompts (``--prompt-words``) and 128 output tokens, and send the
next request as soon as theirs ends, ``--requests`` in all; the backend
(``benchmarks/responder.py``, core 1) streams 100 tokens/s per stream. Each system (default:
direct, the bare aiohttp passthrough and the gateway; proxies on core 0) is driven in turn,
repetitions interleaved. Prints, per system, the median over repetitions of TTFT (all
requests, the clients' first requests, their later ones), ITL and output tokens/s, and the same
minus direct's; writes ``ttft.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import scenarios, systems
from .loadgen import quantiles
from .procs import Proc
from .run import ALL_SYSTEMS, _responder, check_system, log, start_system, stop_all


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ttft",
                                description=__doc__.split("\n")[0])
    p.add_argument("--systems", default="direct,aiohttp-bare,gateway",
                   help="comma-separated subset of " + ",".join(ALL_SYSTEMS))
    p.add_argument("--streams", type=int, default=200, help="concurrent streams")
    p.add_argument("--requests", type=int, default=600, help="requests in all")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=1000)
    p.add_argument("--tokens-per-second", type=float, default=100.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    return p


FIGURES = (("ttft_ms", "TTFT"), ("ttft_first_wave_ms", "TTFT 1st"),
           ("ttft_later_waves_ms", "TTFT later"), ("itl_ms", "ITL"))


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over repetitions per system, and each figure minus direct's."""
    out = []
    for name in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == name]
        row: dict[str, Any] = {"system": name, "reps": len(mine), "output_tokens_per_s":
                               statistics.median(r["output_tokens_per_s"] for r in mine)}
        for key, _ in FIGURES:
            for q in ("p50", "p99"):
                values = [r[key][q] for r in mine if r[key][q] is not None]
                row[f"{key}_{q}"] = statistics.median(values) if values else None
        out.append(row)
    direct = next((r for r in out if r["system"] == "direct"), None)
    for row in out:
        for key in list(row):
            if key.endswith(("_p50", "_p99")) and direct and direct.get(key) is not None \
                    and row[key] is not None:
                row["added_" + key] = row[key] - direct[key]
        if direct:
            row["throughput_share"] = row["output_tokens_per_s"] / direct["output_tokens_per_s"]
    return out


def gateway_view(log_file: Path, since: int) -> dict[str, dict[str, float | None]]:
    """The gateway's own account of the streams, from its access lines after byte ``since``
    (all repetitions): the wait for a slot and the time from the request's arrival in the app
    to its first byte."""
    seen: dict[str, list[float]] = {"queue_wait_ms": [], "ttfb_ms": []}
    with open(log_file, "rb") as f:
        f.seek(since)
        text = f.read().decode()
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("event") != "request":
            continue
        for key, values in seen.items():
            if entry.get(key) is not None:
                values.append(entry[key])
    return {key: quantiles(values, (0.5, 0.99)) for key, values in seen.items()}


def render(summary: list[dict[str, Any]]) -> str:
    head = ["system", "tokens/s", "share", *(f"{label} {q}" for _, label in FIGURES
                                            for q in ("p50", "p99")), "+TTFT p50", "+TTFT p99"]
    rows = [[r["system"], f"{r['output_tokens_per_s']:.0f}",
             f"{r.get('throughput_share', 1):.3f}",
             *(_ms(r[f"{key}_{q}"]) for key, _ in FIGURES for q in ("p50", "p99")),
             _ms(r.get("added_ttft_ms_p50")), _ms(r.get("added_ttft_ms_p99"))]
            for r in summary]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True))
                     for line in [head, *rows])


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def save(args: argparse.Namespace, name: str, doc: dict[str, Any]) -> None:
    """``doc`` in ``NAME.json`` in ``args.out``, after the command line and its arguments."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({
        "command": " ".join([f".venv/bin/python -m benchmarks.{name}", *sys.argv[1:]]),
        "args": vars(args), **doc}, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    work = Path(tempfile.mkdtemp(prefix="vllm-gateway-ttft-"))
    procs: list[Proc] = []
    running: list[systems.System] = []
    try:
        src, source_hash = systems.snapshot(work)
        backend, port = _responder("responder", args.tokens_per_second, work)
        procs.append(backend)
        scenarios.BACKENDS.members[:] = [backend]
        for name in wanted:
            why = systems.available(name)
            if why:
                log(f"skipping {name}: {why}")
                continue
            system = start_system(name, port, port, work, src)
            running.append(system)
            check_system(system)
            log(f"{name} ready")
        # The gateways' access lines of the load only, not of the checks before it.
        logs = {s.name: (s.proc.log, s.proc.log.stat().st_size) for s in running
                if s.proc is not None and s.name.startswith("gateway")}
        rows = scenarios.serve(running, streams=args.streams, requests=args.requests,
                               max_tokens=args.max_tokens, prompt_words=args.prompt_words,
                               reps=args.reps, log=log)
        inside = {name: gateway_view(path, since) for name, (path, since) in logs.items()}
    finally:
        stop_all(running, procs)
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(rows)
    save(args, "ttft", {"gateway_source_sha256": source_hash, "raw": rows, "summary": summary,
                        "gateway_view": inside})
    print(f"\n(e) {args.streams} concurrent streams, {args.requests} requests, "
          f"{args.max_tokens} tokens at {args.tokens_per_second:g}/s, prompts of "
          f"{args.prompt_words} words; medians of {args.reps} interleaved reps, ms")
    print(render(summary))
    for name, view in inside.items():
        print(f"{name}, from its access lines: " + ", ".join(
            f"{key} p50 {_ms(q['p50'])} p99 {_ms(q['p99'])}" for key, q in view.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
