"""Run the whole comparison: ``python -m benchmarks.run [--quick] [--out benchmarks/results]``.

Starts two backends (``benchmarks/responder.py``: one answering at once, one pacing 50
tokens/s) on core 1, the systems (direct, nginx, LiteLLM, the gateway) with every proxy on core
0, warms and checks each, runs scenarios (a) to (c) against all of them in the same run, then
the load tests (d) against the gateway alone, prints a table and writes ``results.json``,
``results.txt`` and ``results.png`` (the PNG needs the ``bench`` extra: matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import report, scenarios, systems
from .procs import LOAD_CORE, Proc, loadavg, start, wait_http
from .systems import ROOT, System

# Also the order each scenario visits them in: LiteLLM last, since a proxy that does not cancel
# its upstream streams when the client goes leaves the shared backend busy for a while.
ALL_SYSTEMS = ("direct", "hypercorn-bare", "aiohttp-bare", "nginx", "gateway", *systems.SERVERS,
               systems.WORKERS, "litellm")


@dataclass(frozen=True)
class Plan:
    concurrencies: tuple[int, ...] = (1, 32, 256)
    a_reps: int = 3
    a_warmup_s: int = 1
    a_seconds: int = 5
    b_concurrency: int = 32
    b_reps: int = 3
    b_warmup_s: float = 1.0
    b_seconds: float = 5.0
    c_steps: tuple[int, ...] = (100, 250, 500)
    c_ramp_s: float = 2.0
    c_seconds: float = 8.0
    soak_seconds: float = 300.0
    soak_sample_s: float = 5.0
    burst_count: int = 1000
    burst_spread_s: float = 10.0
    burst_max_tokens: int = 100  # 2 s per request at 50 tokens/s


FULL = Plan()
QUICK = Plan(a_reps=1, a_warmup_s=0, a_seconds=1, b_reps=1, b_warmup_s=0.3, b_seconds=1.0,
             c_steps=(100,), c_ramp_s=0.5, c_seconds=1.0, soak_seconds=3.0,
             soak_sample_s=0.5, burst_count=1000, burst_spread_s=1.0, burst_max_tokens=15)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split(
        "\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny durations, one repetition, one (c) step (~30 s for two systems)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the results")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                   help="comma-separated subset of " + ",".join(ALL_SYSTEMS))
    p.add_argument("--reps", type=int, help="repetitions of (a) and (b)")
    p.add_argument("--concurrencies", help="comma-separated concurrencies of (a); empty: no (a)")
    p.add_argument("--c-steps", help="comma-separated stream counts of (c); empty: no (c)")
    p.add_argument("--soak-seconds", type=float, help="length of the soak in (d)")
    p.add_argument("--skip-load-tests", action="store_true", help="leave out (d)")
    p.add_argument("--keep-logs", action="store_true",
                   help="copy the servers' logs into OUT/logs")
    return p


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", flush=True)


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return ""
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr) else ""


def _responder(name: str, tokens_per_second: float, work: Path) -> tuple[Proc, int]:
    proc = start(name, [sys.executable, "-m", "benchmarks.responder", "--port", "0",
                        "--tokens-per-second", str(tokens_per_second)],
                 core=LOAD_CORE, logs=work, cwd=ROOT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = proc.log.read_text() if proc.log.exists() else ""
        if text.startswith("listening on "):
            port = int(text.split()[2].rsplit(":", 1)[1])
            wait_http(proc, f"http://127.0.0.1:{port}/health")
            return proc, port
        if not proc.alive():
            break
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"{name} did not start: {proc.log_tail()}")


def check_system(system: System) -> None:
    """One plain and one streamed answer through the system, checked; also warms it up."""
    checks = ((system.fast, False), (system.fast, True), (system.paced, True))
    for target, stream in checks[:1] if system.reference else checks:
        body = json.dumps({"model": target.model, "max_tokens": 4, "stream": stream,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        request = urllib.request.Request(target.url, data=body, method="POST", headers={
            "content-type": "application/json", **target.headers})
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
        if "tok" not in text or (stream and "[DONE]" not in text):
            raise RuntimeError(f"{system.name} answered oddly: {text[:300]}")
    for _ in range(20):
        body = json.dumps({"model": system.fast.model, "max_tokens": 16,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        request = urllib.request.Request(system.fast.url, data=body, method="POST", headers={
            "content-type": "application/json", **system.fast.headers})
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()


def stop_all(running: list[System], procs: list[Proc]) -> None:
    """Stop the systems, then the backends they stand in front of."""
    for system in running:
        system.stop()
    for proc in procs:
        proc.stop()


def start_system(name: str, fast_port: int, paced_port: int, work: Path, src: Path) -> System:
    """One of ``ALL_SYSTEMS`` in front of the two backends, started and answering."""
    if name == "direct":
        return systems.direct(fast_port, paced_port)
    if name == "nginx":
        return systems.nginx(fast_port, paced_port, work)
    if name == "litellm":
        return systems.litellm(fast_port, paced_port, work)
    if name == "hypercorn-bare":
        return systems.hypercorn_bare(work)
    if name == "aiohttp-bare":
        return systems.hypercorn_bare(work, backends=(fast_port, paced_port))
    if name == systems.WORKERS:
        return systems.gateway({"fast": fast_port, "paced": paced_port}, work, src=src,
                               name=name, core=None, workers=2)
    server = "hypercorn" if name == "gateway" else name
    return systems.gateway({"fast": fast_port, "paced": paced_port}, work, src=src, name=name,
                           server=server)


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else FULL
    if args.reps:
        plan = dataclasses.replace(plan, a_reps=args.reps, b_reps=args.reps)
    if args.concurrencies is not None:
        plan = dataclasses.replace(plan, concurrencies=_ints(args.concurrencies))
    if args.c_steps is not None:
        plan = dataclasses.replace(plan, c_steps=_ints(args.c_steps))
    if args.soak_seconds:
        plan = dataclasses.replace(plan, soak_seconds=args.soak_seconds)
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(wanted) - set(ALL_SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems: {', '.join(sorted(unknown))}")
    if os.cpu_count() is not None and os.cpu_count() < 2:  # type: ignore[operator]
        raise SystemExit("needs two cores (proxy on core 0, backend and load on core 1)")
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vllm-gateway-bench-"))
    began = time.monotonic()
    doc: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "command": " ".join([".venv/bin/python -m benchmarks.run",
                             *map(shlex.quote, sys.argv[1:])]),
        "plan": dataclasses.asdict(plan),
        "environment": {
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "loadavg_start": loadavg(),
            "python": platform.python_version(), "kernel": platform.release(),
            "wrk": _version(["wrk", "-v"]), "nginx": _version([systems.NGINX, "-v"]),
        },
        "raw": {}, "skipped_systems": {},
    }
    procs: list[Proc] = []
    running: list[System] = []
    src, source_hash = systems.snapshot(work)
    doc["environment"]["gateway_source_sha256"] = source_hash
    try:
        fast, fast_port = _responder("responder-fast", 0, work)
        paced, paced_port = _responder("responder-paced", scenarios.TOKENS_PER_SECOND, work)
        procs += [fast, paced]
        scenarios.BACKENDS.members[:] = [fast, paced]
        backend_paced = f"http://127.0.0.1:{paced_port}"
        for name in ALL_SYSTEMS:
            if name not in wanted:
                continue
            why = systems.available(name)
            if why:
                doc["skipped_systems"][name] = why
                log(f"skipping {name}: {why}")
                continue
            log(f"starting {name}")
            system = start_system(name, fast_port, paced_port, work, src)
            running.append(system)
            check_system(system)
            log(f"  {name} ready in {system.startup_s:.1f} s, answers checked")
        doc["versions"] = {s.name: s.version for s in running}
        log("(a) non-streaming")
        doc["raw"]["nonstream"] = scenarios.nonstream(
            running, concurrencies=plan.concurrencies, reps=plan.a_reps,
            warmup_s=plan.a_warmup_s, seconds=plan.a_seconds, work=work, log=log)
        relays = [s for s in running if not s.reference]
        log("(b) streaming as fast as the backend writes")
        doc["raw"]["streams"] = scenarios.streams(
            relays, concurrency=plan.b_concurrency, reps=plan.b_reps,
            warmup_s=plan.b_warmup_s, seconds=plan.b_seconds, log=log)
        log("(c) concurrent streams at 50 tokens/s")
        doc["raw"]["paced"] = scenarios.paced(
            relays, steps=plan.c_steps, ramp_s=plan.c_ramp_s, seconds=plan.c_seconds,
            backend_url=backend_paced, log=log)
        for system in running:
            if system.proc is not None and not system.proc.alive():
                raise RuntimeError(f"{system.name} died during the run:\n"
                                   f"{system.proc.log_tail()}")
            system.stop()
        running.clear()
        doc["load_tests"] = load_tests(plan, wanted, args, paced_port, backend_paced, work,
                                       src)
    finally:
        stop_all(running, procs)
        if args.keep_logs:
            shutil.copytree(work, out / "logs", dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    doc["environment"]["loadavg_end"] = loadavg()
    doc["environment"]["elapsed_s"] = round(time.monotonic() - began, 1)
    doc["summary"] = report.summarize(doc["raw"])
    doc["noise"] = report.noise(doc["raw"], doc["summary"])
    return doc


def load_tests(plan: Plan, wanted: list[str], args: argparse.Namespace, paced_port: int,
               backend_paced: str, work: Path, src: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"skipped": {}}
    if "gateway" not in wanted or args.skip_load_tests:
        result["skipped"]["(d)"] = ("--skip-load-tests" if args.skip_load_tests
                                    else "the gateway is not among --systems")
        return result
    models = ["m0", "m1", "m2"]
    log(f"(d) soak: {len(models)} models x 50 concurrent for {plan.soak_seconds:g} s")
    soak_gw = systems.gateway(dict.fromkeys(models, paced_port), work, src=src, name="gateway-soak",
                              max_concurrent=50, max_queue_size=200)
    try:
        result["soak"] = scenarios.soak(soak_gw, models=models, per_model=50,
                                        seconds=plan.soak_seconds,
                                        sample_every=plan.soak_sample_s,
                                        backend_url=backend_paced, log=log)
    finally:
        soak_gw.stop()
    log(f"(d) burst: {plan.burst_count} requests in {plan.burst_spread_s:g} s, "
        "max_queue_size 200")
    burst_gw = systems.gateway({"burst": paced_port}, work, src=src, name="gateway-burst",
                               max_concurrent=50, max_queue_size=200)
    try:
        result["burst"] = scenarios.burst(burst_gw, count=plan.burst_count,
                                          spread_s=plan.burst_spread_s,
                                          max_tokens=plan.burst_max_tokens,
                                          max_concurrent=50, max_queue_size=200, log=log)
    finally:
        burst_gw.stop()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.out = str(Path(args.out).resolve())
    os.chdir(ROOT)
    doc = run(args)
    out = Path(args.out)
    text = report.render(doc)
    report.write_json(doc, out / "results.json")
    (out / "results.txt").write_text(text + "\n")
    why = report.plot(doc, out / "results.png")
    print()
    print(text)
    print()
    print(f"wrote {out / 'results.json'}, {out / 'results.txt'}"
          + (f", {out / 'results.png'}" if why is None else f" (no PNG: {why})")
          + f" in {doc['environment']['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
