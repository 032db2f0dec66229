"""The scenarios: each drives one system with a load generator on the load core and samples the
system's CPU and the cores' busy time over exactly the measured window.

(a) ``nonstream``: wrk, small chat completions, closed loop at each concurrency.
(b) ``streams``: 32-token streams written as fast as the backend writes them, closed loop.
(c) ``paced``: N concurrent streams at 50 tokens/s each; relayed chunks/s, inter-token gaps,
    relay delay (the responder stamps each event), proxy CPU per 1,000 chunks, RSS.
(d) ``soak`` and ``burst``: the predecessor's load tests, against the gateway alone.
"""

from __future__ import annotations

import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .procs import LOAD_CORE, Group, HasCPU, Pid, Sample, http_get, pinned, usage
from .systems import ROOT, System, Target

TOKENS_PER_SECOND = 50.0
LOADGEN_START = 0.6  # seconds a load generator process needs to import and connect

_LUA = """wrk.method = "POST"
wrk.body = [[{body}]]
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {{"requests":%d,"duration_us":%d,"bytes":%d,'
    .. '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,'
    .. '"timeouts":%d,"mean_us":%.1f,"max_us":%.0f,"p50_us":%.0f,"p90_us":%.0f,'
    .. '"p99_us":%.0f,"p999_us":%.0f}}\\n', summary.requests, summary.duration,
    summary.bytes, e.connect, e.read, e.write, e.status, e.timeout, latency.mean,
    latency.max, latency:percentile(50.0), latency:percentile(90.0),
    latency:percentile(99.0), latency:percentile(99.9)))
end
"""


def _lua(target: Target, work: Path) -> Path:
    body = json.dumps({"model": target.model, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 16})
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in
                        {"Content-Type": "application/json", **target.headers}.items())
    path = work / f"wrk-{target.port}-{target.model}.lua"
    path.write_text(_LUA.format(body=body, headers=headers))
    return path


def wrk(target: Target, concurrency: int, seconds: int, work: Path) -> dict[str, Any]:
    argv = pinned(LOAD_CORE, ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s",
                              "--timeout", "10s", "-s", str(_lua(target, work)), target.url])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[len("WRKJSON "):])
    raise RuntimeError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")


def loadgen(spec: dict[str, Any], *, at: list[float] | None = None,
            procs: dict[str, HasCPU] | None = None, poll: Any = None,
            timeout: float = 600) -> tuple[dict[str, Any], list[Sample]]:
    """Run a load generator; take a ``Sample`` at each monotonic time in ``at`` (with the
    generator's own CPU as ``load``); ``poll()`` is called every ~50 ms while it runs."""
    argv = pinned(LOAD_CORE, [sys.executable, "-m", "benchmarks.loadgen", json.dumps(spec)])
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    procs = {**(procs or {}), "load": Pid(proc.pid)}
    samples: list[Sample] = []
    try:
        for t in at or []:
            while time.monotonic() < t:
                if poll is not None:
                    poll()
                time.sleep(min(0.05, max(0.0, t - time.monotonic())))
            samples.append(Sample.take(procs))
        if poll is not None:
            while proc.poll() is None:
                poll()
                time.sleep(0.05)
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"load generator failed ({proc.returncode}): {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1]), samples


# The backends (both responders), counted on the load core; set by the runner.
BACKENDS = Group([])


def _procs(system: System) -> dict[str, HasCPU]:
    procs: dict[str, HasCPU] = {"backend": BACKENDS}
    if system.proc is not None:
        procs["proxy"] = system.proc
    return procs


def _cpu_fields(system: System, use: dict[str, float]) -> dict[str, Any]:
    seconds = use["seconds"]
    out: dict[str, Any] = {"core0_busy": use.get("core0_busy"),
                           "core1_busy": use.get("core1_busy")}
    ours = (use.get("backend_cpu_s", 0.0) + use.get("load_cpu_s", 0.0)) / seconds
    out["core1_ours"] = ours
    # What else ran on the load core: other people's work (approximate: our share is read
    # from per-process counters, the core's from /proc/stat).
    out["core1_other"] = max(0.0, (use.get("core1_busy") or 0.0) - ours)
    if system.proc is not None:
        cpu = use["proxy_cpu_s"]
        out["proxy_cpu_s"] = cpu
        out["proxy_core_share"] = cpu / seconds
        # What else ran on the proxy's core while it was measured: other people's work.
        out["core0_other"] = max(0.0, (use.get("core0_busy") or 0.0) - cpu / seconds)
    return out


# -- (a) ------------------------------------------------------------------------------------


def nonstream(systems: list[System], *, concurrencies: tuple[int, ...], reps: int,
              warmup_s: int, seconds: int, work: Path, log: Any) -> list[dict[str, Any]]:
    rows = []
    for rep in range(reps):
        for c in concurrencies:
            for system in systems:
                if warmup_s:
                    wrk(system.fast, c, warmup_s, work)
                before = Sample.take(_procs(system))
                children = resource.getrusage(resource.RUSAGE_CHILDREN)
                r = wrk(system.fast, c, seconds, work)
                spent = resource.getrusage(resource.RUSAGE_CHILDREN)
                after = Sample.take(_procs(system))
                use = usage(before, after)
                use["load_cpu_s"] = (spent.ru_utime + spent.ru_stime - children.ru_utime
                                     - children.ru_stime)
                rps = r["requests"] / (r["duration_us"] / 1e6)
                errors = sum(r[k] for k in ("connect_errors", "read_errors", "write_errors",
                                            "status_errors", "timeouts"))
                row = {"system": system.name, "concurrency": c, "rep": rep, "rps": rps,
                       "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000,
                       "p99_ms": r["p99_us"] / 1000, "requests": r["requests"],
                       "errors": errors, **_cpu_fields(system, use)}
                if system.proc is not None and r["requests"] and use["proxy_cpu_s"]:
                    row["proxy_cpu_us_per_req"] = use["proxy_cpu_s"] / r["requests"] * 1e6
                    row["req_per_core_s"] = r["requests"] / use["proxy_cpu_s"]
                rows.append(row)
                log(f"  (a) {system.name:8} c={c:<4} rep {rep}: {rps:8.0f} req/s  "
                    f"p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  "
                    f"errors {errors}  proxy {_f(row.get('proxy_cpu_us_per_req'), 0)} us/req "
                    f"core0 {use.get('core0_busy', 0):.0%} (other "
                    f"{_pct(row.get('core0_other'))}) {_core1(row)}")
    return rows


# -- (b) ------------------------------------------------------------------------------------


def streams(systems: list[System], *, concurrency: int, reps: int, warmup_s: float,
            seconds: float, log: Any) -> list[dict[str, Any]]:
    rows = []
    for rep in range(reps):
        for system in systems:
            start = time.monotonic() + LOADGEN_START + warmup_s
            end = start + seconds
            spec = {"mode": "streams", **system.fast.spec(), "max_tokens": 32,
                    "concurrency": concurrency, "window_start": start, "window_end": end}
            result, (before, after) = loadgen(spec, at=[start, end], procs=_procs(system))
            use = usage(before, after)
            row = {"system": system.name, "rep": rep, "concurrency": concurrency,
                   "streams_per_s": result["streams_per_s"],
                   "events_per_stream": result["events_per_stream"],
                   "reads_per_stream": result["reads_per_stream"],
                   "duration_p50_ms": result["duration_ms"]["p50"],
                   "duration_p99_ms": result["duration_ms"]["p99"],
                   "ttfb_p50_ms": result["ttfb_ms"]["p50"],
                   "errors": sum(result["errors"].values()), "error_kinds": result["errors"],
                   **_cpu_fields(system, use)}
            if system.proc is not None and result["streams"] and use["proxy_cpu_s"]:
                row["proxy_cpu_us_per_stream"] = use["proxy_cpu_s"] / result["streams"] * 1e6
                row["streams_per_core_s"] = result["streams"] / use["proxy_cpu_s"]
            rows.append(row)
            log(f"  (b) {system.name:8} rep {rep}: {row['streams_per_s']:7.0f} streams/s  "
                f"{row['events_per_stream']:.0f} events in {row['reads_per_stream']:.1f} reads  "
                f"errors {row['errors'] or ''}{result['errors'] or ''}  proxy "
                f"{_f(row.get('proxy_cpu_us_per_stream'), 0)} us/stream  core0 "
                f"{use.get('core0_busy', 0):.0%} (other {_pct(row.get('core0_other'))}) "
                f"{_core1(row)}")
    return rows


# -- (c) ------------------------------------------------------------------------------------


def responder_running(url: str) -> int:
    return json.loads(http_get(url + "/sim/stats")[1])["running"]


def wait_backend_idle(url: str, timeout: float = 20.0) -> int:
    """Streams the backend still runs after ``timeout`` (0: all ended or were cancelled)."""
    deadline = time.monotonic() + timeout
    while True:
        running = responder_running(url)
        if running == 0 or time.monotonic() > deadline:
            return running
        time.sleep(0.1)


def paced(systems: list[System], *, steps: tuple[int, ...], ramp_s: float, seconds: float,
          backend_url: str, log: Any) -> list[dict[str, Any]]:
    rows = []
    for n in steps:
        for system in systems:
            start = time.monotonic() + LOADGEN_START + ramp_s + 0.5
            end = start + seconds
            spec = {"mode": "paced", **system.paced.spec(), "streams": n, "ramp": ramp_s,
                    "tokens_per_second": TOKENS_PER_SECOND, "tail": 0.5,
                    "window_start": start, "window_end": end}
            rss_at_end: list[float] = []

            def poll(system: System = system, end: float = end,
                     rss_at_end: list[float] = rss_at_end) -> None:
                if system.proc is not None and not rss_at_end and time.monotonic() >= end:
                    rss_at_end.append(system.proc.rss_mb())

            result, (before, after) = loadgen(spec, at=[start, end], procs=_procs(system),
                                              poll=poll)
            use = usage(before, after)
            left = wait_backend_idle(backend_url)
            row: dict[str, Any] = {
                "system": system.name, "streams": n, "events_per_s": result["events_per_s"],
                "offered_per_s": result["offered_per_s"],
                "covering_streams": result["covering_streams"],
                "gap_p50_ms": result["gap_ms"]["p50"], "gap_p99_ms": result["gap_ms"]["p99"],
                "gap_p999_ms": result["gap_ms"]["p99.9"],
                "delay_p50_ms": result["delay_ms"]["p50"],
                "delay_p99_ms": result["delay_ms"]["p99"],
                "errors": sum(result["errors"].values()), "error_kinds": result["errors"],
                "cut_after_window": result["cut_after_window"],
                "error_samples": result.get("error_samples", []),
                "backend_streams_left": left, **_cpu_fields(system, use)}
            if system.proc is not None:
                chunks = result["events"]
                row["proxy_cpu_s_per_1000_chunks"] = (use["proxy_cpu_s"] / chunks * 1000
                                                      if chunks else None)
                # What the proxy could relay with a whole core (CPU-bound, linear): an
                # estimate that does not depend on how much of the core others took.
                row["chunks_per_core_s"] = (chunks / use["proxy_cpu_s"]
                                            if use["proxy_cpu_s"] else None)
                row["proxy_rss_mb"] = rss_at_end[0] if rss_at_end else system.proc.rss_mb()
            rows.append(row)
            cpu = row.get("proxy_cpu_s_per_1000_chunks")
            log(f"  (c) {system.name:8} {n:4} streams: {row['events_per_s']:8.0f} chunks/s "
                f"(offered {row['offered_per_s']:.0f})  gap p50/p99 "
                f"{_f(row['gap_p50_ms'])}/{_f(row['gap_p99_ms'])} ms  delay p99 "
                f"{_f(row['delay_p99_ms'])} ms  cpu/1k chunks {_f(cpu, 3)} s  "
                f"errors {row['errors'] or ''}{result['errors'] or ''}  core0 "
                f"{use.get('core0_busy', 0):.0%} (other {_pct(row.get('core0_other'))}) "
                f"{_core1(row)}"
                + (f"  BACKEND STILL STREAMING {left}" if left else ""))
    return rows


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _core1(row: dict[str, Any]) -> str:
    return (f"core1 {_pct(row.get('core1_busy'))} (ours {_pct(row.get('core1_ours'))}, other "
            f"{_pct(row.get('core1_other'))})")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


# -- (d) ------------------------------------------------------------------------------------

_METRIC = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str, timeout: float = 10.0) -> list[tuple[str, dict[str, str], float]]:
    status, body = http_get(url + "/metrics", timeout=timeout)
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    out = []
    for line in body.decode().splitlines():
        m = _METRIC.match(line)
        if m and not line.startswith("#"):
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def metric(samples: list[tuple[str, dict[str, str], float]], name: str,
           **labels: str) -> float:
    return sum(v for n, lab, v in samples
               if n == name and all(lab.get(k) == w for k, w in labels.items()))


def counters_zero(url: str, models: list[str], timeout: float = 5.0) -> dict[str, float]:
    """Queue depth and in-flight per model, polled until all are zero or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        left = {f"{name}[{model}]": metric(m, name, model=model)
                for model in models for name in ("gateway_queue_depth", "gateway_in_flight")}
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def soak(system: System, *, models: list[str], per_model: int, seconds: float,
         sample_every: float, backend_url: str, log: Any) -> dict[str, Any]:
    assert system.proc is not None
    base = f"http://{system.fast.host}:{system.fast.port}"
    began = time.monotonic() + LOADGEN_START
    end = began + seconds
    spec = {"mode": "soak", **system.fast.spec(), "models": models, "per_model": per_model,
            "max_tokens": 20, "window_end": end}
    before = scrape(base)
    samples: list[dict[str, float]] = []
    next_at = [began]
    proc = system.proc

    missed = [0]

    def poll() -> None:
        now = time.monotonic()
        if now >= next_at[0] and now <= end:
            next_at[0] += sample_every
            try:
                m = scrape(base)
            except OSError:
                missed[0] += 1
                return
            samples.append({
                "t": now - began, "rss_mb": proc.rss_mb(), "cpu_s": proc.cpu_seconds(),
                "queue_depth": sum(metric(m, "gateway_queue_depth", model=x) for x in models),
                "in_flight": sum(metric(m, "gateway_in_flight", model=x) for x in models),
                "ok_total": sum(metric(m, "gateway_requests_total", model=x, status="200")
                                for x in models)})

    result, _ = loadgen(spec, poll=poll, timeout=seconds + 120)
    left = counters_zero(base, models)
    backend_left = wait_backend_idle(backend_url)
    after = scrape(base)
    answered = {s: sum(metric(after, "gateway_requests_total", model=x, status=s)
                       - metric(before, "gateway_requests_total", model=x, status=s)
                       for x in models) for s in ("200", "429", "502", "503", "504", "500")}
    # RSS: compare the first sample after a warm-up tenth with the last, and fit a slope.
    steady = [s for s in samples if s["t"] >= seconds * 0.1] or samples
    rss_slope = slope([s["t"] for s in steady], [s["rss_mb"] for s in steady]) * 60
    rss_growth = steady[-1]["rss_mb"] - steady[0]["rss_mb"] if steady else 0.0
    client_errors = {k: v for k, v in result["statuses"].items() if k != "200"}
    checks = {
        "no_errors": not client_errors,
        "gateway_counted_every_answer": answered["200"] == result["ok"],
        "counters_back_to_zero": not any(left.values()),
        "backend_idle_after": backend_left == 0,
        "rss_stable": rss_growth <= max(10.0, 0.05 * steady[0]["rss_mb"]) if steady else False,
    }
    out = {"seconds": seconds, "models": models, "per_model": per_model,
           "requests_ok": result["ok"], "client_statuses": result["statuses"],
           "rps": result["ok"] / seconds, "gateway_answered": answered,
           "counters_after": left, "backend_streams_left": backend_left,
           "rss_mb_first": steady[0]["rss_mb"] if steady else None,
           "rss_mb_last": steady[-1]["rss_mb"] if steady else None,
           "rss_mb_max": max(s["rss_mb"] for s in samples) if samples else None,
           "rss_growth_mb": rss_growth, "rss_slope_mb_per_min": rss_slope,
           "max_queue_depth": max((s["queue_depth"] for s in samples), default=0),
           "max_in_flight": max((s["in_flight"] for s in samples), default=0),
           "per_second_min": min(result["per_second"][1:], default=0),
           "per_second_max": max(result["per_second"][1:], default=0),
           "samples": samples, "missed_samples": missed[0], "checks": checks,
           "passed": all(checks.values())}
    log(f"  (d) soak {seconds:g} s: {out['rps']:.0f} req/s ok={result['ok']} "
        f"statuses {result['statuses']}  rss {out['rss_mb_first']:.1f} -> "
        f"{out['rss_mb_last']:.1f} MB ({rss_slope:+.2f} MB/min)  counters after {left}  "
        f"{'PASS' if out['passed'] else 'FAIL ' + str(checks)}")
    return out


def slope(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of ``ys`` over ``xs`` (0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def burst(system: System, *, count: int, spread_s: float, max_tokens: int,
          max_concurrent: int, max_queue_size: int, log: Any) -> dict[str, Any]:
    base = f"http://{system.fast.host}:{system.fast.port}"
    model = system.fast.model
    before = scrape(base)
    peak = {"queue_depth": 0.0, "in_flight": 0.0}

    def poll() -> None:
        try:
            m = scrape(base)
        except OSError:
            peak["missed"] = peak.get("missed", 0) + 1
            return
        peak["queue_depth"] = max(peak["queue_depth"],
                                  metric(m, "gateway_queue_depth", model=model))
        peak["in_flight"] = max(peak["in_flight"], metric(m, "gateway_in_flight", model=model))

    spec = {"mode": "burst", **system.fast.spec(), "count": count, "spread": spread_s,
            "max_tokens": max_tokens}
    result, _ = loadgen(spec, poll=poll, timeout=300)
    left = counters_zero(base, [model])
    after = scrape(base)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    statuses = result["statuses"]
    ok, refused = statuses.get("200", 0), statuses.get("429", 0)
    checks = {
        "only_200_and_429": set(statuses) <= {"200", "429"},
        "admitted_plus_refused_is_sent": ok + refused == count,
        "capacity_used_before_refusing": ok >= max_concurrent + max_queue_size,
        # Sampled every ~50 ms, so a peak a request or two short of the bound still counts.
        "queue_filled_up": peak["queue_depth"] >= 0.95 * max_queue_size,
        "queue_never_beyond_bound": peak["queue_depth"] <= max_queue_size,
        "in_flight_never_beyond_bound": peak["in_flight"] <= max_concurrent,
        "gateway_counted_429s": delta("gateway_rejected_total", model=model,
                                      reason="queue_full") == refused,
        "gateway_counted_200s": delta("gateway_requests_total", model=model,
                                      status="200") == ok,
        "retry_after_on_every_429": result["retry_after_ok"],
        "counters_back_to_zero": not any(left.values()),
    }
    out = {"sent": count, "spread_s": spread_s, "admitted": ok, "refused": refused,
           "statuses": statuses, "peak_queue_depth": peak["queue_depth"],
           "peak_in_flight": peak["in_flight"], "first_429_s": result["first_429_s"],
           "last_200_s": result["last_200_s"], "elapsed_s": result["elapsed_s"],
           "counters_after": left, "checks": checks, "passed": all(checks.values())}
    log(f"  (d) burst {count} in {spread_s:g} s: admitted {ok}, refused {refused}, "
        f"statuses {statuses}, peak queue {peak['queue_depth']:.0f}, peak in flight "
        f"{peak['in_flight']:.0f}  {'PASS' if out['passed'] else 'FAIL ' + str(checks)}")
    return out


# -- (e) ------------------------------------------------------------------------------------


def serve(systems: list[System], *, streams: int, requests: int, max_tokens: int,
          prompt_words: int, reps: int, log: Any) -> list[dict[str, Any]]:
    """``vllm bench serve``'s load (``loadgen`` mode ``serve``) against each system in turn,
    repetitions interleaved; the proxy's CPU over the whole run."""
    rows = []
    for rep in range(reps):
        for system in systems:
            spec = {"mode": "serve", **system.fast.spec(), "streams": streams,
                    "requests": requests, "max_tokens": max_tokens,
                    "prompt_words": prompt_words, "seed": rep}
            before = Sample.take(_procs(system))
            result, _ = loadgen(spec, procs=_procs(system))
            use = usage(before, Sample.take(_procs(system)))
            row = {"system": system.name, "rep": rep, **{
                k: result[k] for k in ("streams", "requests", "completed", "elapsed_s",
                                       "output_tokens_per_s", "requests_per_s", "ttft_ms",
                                       "ttft_first_wave_ms", "ttft_later_waves_ms", "itl_ms",
                                       "errors")}, **_cpu_fields(system, use)}
            rows.append(row)
            log(f"  (e) {system.name:8} {streams} streams rep {rep}: "
                f"{row['output_tokens_per_s']:7.0f} tokens/s  TTFT p50/p99 "
                f"{_f(row['ttft_ms']['p50'])}/{_f(row['ttft_ms']['p99'])} ms (first wave p99 "
                f"{_f(row['ttft_first_wave_ms']['p99'])}, later "
                f"{_f(row['ttft_later_waves_ms']['p99'])})  ITL p50/p99 "
                f"{_f(row['itl_ms']['p50'])}/{_f(row['itl_ms']['p99'])} ms  errors "
                f"{row['errors'] or ''}  core0 {use.get('core0_busy', 0):.0%} (other "
                f"{_pct(row.get('core0_other'))}) {_core1(row)}")
    return rows
