"""Summaries of a run: medians over repetitions with their spread, figures added over direct,
the targets, a text table, the JSON document and the PNG plot."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .systems import SERVERS

TARGETS = {
    "a_rps_c32": ("(a) req/s at concurrency 32", ">=", 1500.0),
    "a_added_p50_c1_ms": ("(a) added p50 at concurrency 1, ms", "<=", 1.0),
    "b_streams_per_s": ("(b) streams/s, 32 chunks each", ">=", 1200.0),
    "c_chunks_per_s": ("(c) relayed chunks/s, 240+ streams at 50 tok/s", ">=", 12000.0),
    "c_added_delay_p99_ms": ("(c) added p99 inter-token latency (per-token delay), ms", "<=",
                             10.0),
    "c_added_gap_p99_ms": ("(c) added p99 inter-token gap at the client, ms", "<=", 10.0),
}
# Backend and load generator together using more of the load core than this: the figure may
# say more about the load core than about the proxy.
BUSY = 0.85
KEEP_UP = 0.95  # a relay that delivers less than this share of the offered chunks fell behind


def _med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _spread(values: list[float | None]) -> float | None:
    """(max - min) / median over repetitions: the noise of one figure."""
    vals = [v for v in values if v is not None]
    if len(vals) < 2:
        return None
    mid = statistics.median(vals)
    return (max(vals) - min(vals)) / mid if mid else None


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in raw.get("nonstream", []):
        if not row.get("requests"):
            # None finished inside the window: there is no latency to speak of.
            row = {**row, "p50_ms": None, "p90_ms": None, "p99_ms": None}
        groups[(row["system"], row["concurrency"])].append(row)
    a = []
    for (system, c), rows in groups.items():
        a.append({"system": system, "concurrency": c, "reps": len(rows),
                  "rps": _med([r["rps"] for r in rows]),
                  "rps_spread": _spread([r["rps"] for r in rows]),
                  "p50_ms": _med([r["p50_ms"] for r in rows]),
                  "p50_spread": _spread([r["p50_ms"] for r in rows]),
                  "p99_ms": _med([r["p99_ms"] for r in rows]),
                  "errors": sum(r["errors"] for r in rows),
                  "proxy_cpu_us_per_req": _med([r.get("proxy_cpu_us_per_req") for r in rows]),
                  "req_per_core_s": _med([r.get("req_per_core_s") for r in rows]),
                  "cpu_spread": _spread([r.get("proxy_cpu_us_per_req") for r in rows]),
                  "proxy_core_share": _med([r.get("proxy_core_share") for r in rows]),
                  "core0_other": _med([r.get("core0_other") for r in rows]),
                  "core1_busy": _med([r.get("core1_busy") for r in rows]),
                  "core1_other": _med([r.get("core1_other") for r in rows]),
                  "core1_ours": _med([r.get("core1_ours") for r in rows])})
    direct = {r["concurrency"]: r for r in a if r["system"] == "direct"}
    for r in a:
        d = direct.get(r["concurrency"])
        r["added_p50_ms"] = _sub(r["p50_ms"], d["p50_ms"]) if d else None
        r["added_p99_ms"] = _sub(r["p99_ms"], d["p99_ms"]) if d else None
    out["nonstream"] = a

    sgroups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in raw.get("streams", []):
        sgroups[row["system"]].append(row)
    out["streams"] = [{
        "system": system, "reps": len(rows),
        "streams_per_s": _med([r["streams_per_s"] for r in rows]),
        "spread": _spread([r["streams_per_s"] for r in rows]),
        "events_per_stream": _med([r["events_per_stream"] for r in rows]),
        "reads_per_stream": _med([r["reads_per_stream"] for r in rows]),
        "duration_p50_ms": _med([r["duration_p50_ms"] for r in rows]),
        "duration_p99_ms": _med([r["duration_p99_ms"] for r in rows]),
        "errors": sum(r["errors"] for r in rows),
        "proxy_cpu_us_per_stream": _med([r.get("proxy_cpu_us_per_stream") for r in rows]),
        "streams_per_core_s": _med([r.get("streams_per_core_s") for r in rows]),
        "proxy_core_share": _med([r.get("proxy_core_share") for r in rows]),
        "core0_other": _med([r.get("core0_other") for r in rows]),
        "core1_busy": _med([r.get("core1_busy") for r in rows]),
        "core1_other": _med([r.get("core1_other") for r in rows]),
        "core1_ours": _med([r.get("core1_ours") for r in rows]),
    } for system, rows in sgroups.items()]

    c = [dict(r) for r in raw.get("paced", [])]
    pdirect = {r["streams"]: r for r in c if r["system"] == "direct"}
    for r in c:
        d = pdirect.get(r["streams"])
        r["added_gap_p50_ms"] = _sub(r["gap_p50_ms"], d["gap_p50_ms"]) if d else None
        r["added_gap_p99_ms"] = _sub(r["gap_p99_ms"], d["gap_p99_ms"]) if d else None
        r["added_delay_p50_ms"] = _sub(r["delay_p50_ms"], d["delay_p50_ms"]) if d else None
        r["added_delay_p99_ms"] = _sub(r["delay_p99_ms"], d["delay_p99_ms"]) if d else None
        r["kept_up"] = r["events_per_s"] >= KEEP_UP * r["offered_per_s"]
    out["paced"] = c
    out["targets"] = targets(out)
    out["relative"] = relative(out)
    return out


REFERENCES = ("aiohttp-bare", "nginx")
# The gateway under vllm-gateway serve (hypercorn), then its app under the other servers.
GATEWAYS = ("gateway", *SERVERS)


def relative(summary: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """The gateway's throughput as a share of the references' in the same run: what holds from
    run to run on a shared machine, where the absolute figures move with the neighbours."""
    a = {r["system"]: r["rps"] for r in summary["nonstream"] if r["concurrency"] == 32}
    b = {r["system"]: r["streams_per_s"] for r in summary["streams"]}
    most = max((r["streams"] for r in summary["paced"]), default=None)
    c = {r["system"]: r["events_per_s"] for r in summary["paced"] if r["streams"] == most}
    out = {}
    for key, figures in (("(a) req/s at concurrency 32", a), ("(b) streams/s", b),
                         (f"(c) chunks/s at {most} streams", c)):
        if not figures:
            continue
        for name in GATEWAYS:
            gateway = figures.get(name)
            if name != "gateway" and gateway is None:
                continue
            label = key if name == "gateway" else f"{key}, on {name.removeprefix('gateway-')}"
            out[label] = {ref: gateway / figures[ref] if gateway and figures.get(ref) else None
                          for ref in REFERENCES}
    return out


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """The gateway's figures against the targets; ``load_core_saturated`` says when the backend
    and the load generator used most of the load core, so the figure may be theirs."""
    gw_a = {r["concurrency"]: r for r in summary["nonstream"] if r["system"] == "gateway"}
    gw_b = next((r for r in summary["streams"] if r["system"] == "gateway"), None)
    gw_c = sorted((r for r in summary["paced"] if r["system"] == "gateway"
                   and r["streams"] >= 240), key=lambda r: r["streams"])
    projected = {
        "a_rps_c32": gw_a[32].get("req_per_core_s") if 32 in gw_a else None,
        "b_streams_per_s": gw_b.get("streams_per_core_s") if gw_b else None,
        "c_chunks_per_s": gw_c[0].get("chunks_per_core_s") if gw_c else None,
    }
    got: dict[str, tuple[float | None, float | None]] = {
        "a_rps_c32": (gw_a[32]["rps"], gw_a[32]["core1_ours"]) if 32 in gw_a else (None, None),
        "a_added_p50_c1_ms": (gw_a[1]["added_p50_ms"], gw_a[1]["core1_ours"])
        if 1 in gw_a else (None, None),
        "b_streams_per_s": (gw_b["streams_per_s"], gw_b["core1_ours"]) if gw_b else (None, None),
        "c_chunks_per_s": (gw_c[0]["events_per_s"], gw_c[0]["core1_ours"])
        if gw_c else (None, None),
        "c_added_delay_p99_ms": (gw_c[0]["added_delay_p99_ms"], gw_c[0]["core1_ours"])
        if gw_c else (None, None),
        "c_added_gap_p99_ms": (gw_c[0]["added_gap_p99_ms"], gw_c[0]["core1_ours"])
        if gw_c else (None, None),
    }
    out = {}
    for key, (label, op, goal) in TARGETS.items():
        value, core1 = got[key]
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out[key] = {"label": label, "target": f"{op} {goal:g}", "value": value, "met": met,
                    "load_core_saturated": core1 is not None and core1 > BUSY,
                    "per_core_second": projected.get(key)}
        if key.startswith("c_") and gw_c and not gw_c[0]["kept_up"]:
            # Behind the offered rate, gaps shrink (chunks arrive coalesced) while delays grow:
            # only the throughput and the delay say something then.
            out[key]["fell_behind"] = True
            if key == "c_added_gap_p99_ms":
                out[key]["met"] = None
        if key == "c_chunks_per_s" and gw_c:
            out[key]["streams"] = gw_c[0]["streams"]
            out[key]["offered"] = gw_c[0]["offered_per_s"]
    return out


# -- text ----------------------------------------------------------------------------------


def _n(value: Any, fmt: str = "{:.2f}") -> str:
    if value is None:
        return "-"
    return fmt.format(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in
                     enumerate(zip(header, widths, strict=True)))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                             enumerate(zip(r, widths, strict=True))))
    return out


def render(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    env = doc["environment"]
    lines = [f"vllm-gateway benchmark ({doc['mode']}), {env['started']}, "
             f"{env['cpus']} cores, load average {env['loadavg_start']} -> "
             f"{env['loadavg_end']}",
             f"command: {doc['command']}",
             "proxy on core 0; backend (benchmarks/responder.py) and load generators on core 1. "
             "Medians over reps; (±) is (max-min)/median over reps.", ""]
    rows = [[key, *(_pct(share.get(ref)) for ref in REFERENCES)]
            for key, share in s.get("relative", {}).items()]
    lines += ["the gateway as a share of the references in this run (what holds from run to run;"
              " the absolute figures move with the machine's load)"]
    lines += _table(["figure", *(f"of {ref}" for ref in REFERENCES)], rows)
    lines += [""]
    lines.append("(a) non-streaming chat completion, wrk closed loop")
    rows = []
    for r in sorted(s["nonstream"], key=lambda r: (r["concurrency"], _order(r["system"]))):
        rps = _n(r["rps"], "{:.0f}") if r["rps"] else "none finished"
        rows.append([r["system"], str(r["concurrency"]),
                     rps + (f" ±{r['rps_spread'] * 100:.0f}%"
                            if r["rps_spread"] is not None and r["rps"] else ""),
                     _n(r["p50_ms"]), _n(r["p99_ms"]), _n(r["added_p50_ms"]),
                     _n(r["added_p99_ms"]), _n(r["proxy_cpu_us_per_req"], "{:.0f}"),
                     _n(r["req_per_core_s"], "{:.0f}"),
                     _pct(r["proxy_core_share"]), _pct(r["core0_other"]),
                     _pct(r["core1_busy"]), _pct(r["core1_other"]), str(r["errors"])])
    lines += _table(["system", "conc", "req/s", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms",
                     "proxy CPU us/req", "req/core-s", "proxy core", "core0 other", "core1 busy",
                     "core1 other", "errors"], rows)
    lines += ["", "(b) streaming, 32 tokens as fast as the backend writes them, "
              f"closed loop at {_first(s['streams'], 'concurrency', doc)}"]
    rows = []
    for r in sorted(s["streams"], key=lambda r: _order(r["system"])):
        rows.append([r["system"], _n(r["streams_per_s"], "{:.0f}") + (
            f" ±{r['spread'] * 100:.0f}%" if r["spread"] is not None else ""),
            _n(r["events_per_stream"], "{:.0f}"), _n(r["reads_per_stream"], "{:.1f}"),
            _n(r["duration_p50_ms"]), _n(r["duration_p99_ms"]),
            _n(r["proxy_cpu_us_per_stream"], "{:.0f}"), _n(r["streams_per_core_s"], "{:.0f}"),
            _pct(r["proxy_core_share"]),
            _pct(r["core0_other"]), _pct(r["core1_busy"]), _pct(r["core1_other"]),
            str(r["errors"])])
    lines += _table(["system", "streams/s", "events", "client reads", "p50 ms", "p99 ms",
                     "proxy CPU us/stream", "streams/core-s", "proxy core", "core0 other",
                     "core1 busy", "core1 other", "errors"], rows)
    lines += ["", "(c) concurrent streams at 50 tokens/s each (gap: inter-token time at the "
              "client, ideal 20 ms; delay: backend write to client read)"]
    rows = []
    for r in sorted(s["paced"], key=lambda r: (r["streams"], _order(r["system"]))):
        rows.append([r["system"], str(r["streams"]), _n(r["events_per_s"], "{:.0f}"),
                     _n(r["offered_per_s"], "{:.0f}"), _n(r["gap_p50_ms"]),
                     _n(r["gap_p99_ms"]), _n(r["added_gap_p50_ms"]),
                     _n(r["added_gap_p99_ms"]), _n(r["delay_p50_ms"]),
                     _n(r["delay_p99_ms"]), _n(r["added_delay_p99_ms"]),
                     _n(r.get("proxy_cpu_s_per_1000_chunks"), "{:.3f}"),
                     _n(r.get("chunks_per_core_s"), "{:.0f}"),
                     _n(r.get("proxy_rss_mb"), "{:.0f}"), _pct(r.get("core0_other")),
                     _pct(r.get("core1_busy")), _pct(r.get("core1_other")),
                     f"{r['errors']}" + (f" ({r['backend_streams_left']} left)"
                                         if r["backend_streams_left"] else ""),
                     str(r.get("cut_after_window", 0))])
    lines += _table(["system", "streams", "chunks/s", "offered", "gap p50", "gap p99",
                     "+gap p50", "+gap p99", "delay p50", "delay p99", "+delay p99",
                     "CPU s/1k chunks", "chunks/core-s", "RSS MB", "core0 other", "core1 busy",
                     "core1 other", "errors", "cut"], rows)
    load = doc.get("load_tests") or {}
    if load:
        lines += ["", "(d) load tests, gateway alone: a soak of several models at full "
                  "concurrency, and a burst beyond the queue"]
        sk = load.get("soak")
        if sk:
            lines.append(
                f"soak: {len(sk['models'])} models x {sk['per_model']} concurrent for "
                f"{sk['seconds']:g} s: {sk['requests_ok']} ok ({sk['rps']:.0f}/s), client "
                f"statuses {sk['client_statuses']}, RSS {_n(sk['rss_mb_first'], '{:.1f}')} -> "
                f"{_n(sk['rss_mb_last'], '{:.1f}')} MB ({sk['rss_slope_mb_per_min']:+.2f} "
                f"MB/min), peak queue {sk['max_queue_depth']:.0f}, peak in flight "
                f"{sk['max_in_flight']:.0f}, counters after {_counters(sk['counters_after'])}: "
                + ("PASS" if sk["passed"] else "FAIL " + _failed(sk["checks"])))
        bu = load.get("burst")
        if bu:
            lines.append(
                f"burst: {bu['sent']} requests in {bu['spread_s']:g} s at one model "
                f"(max_concurrent 50, max_queue_size 200): admitted {bu['admitted']} + refused "
                f"(429) {bu['refused']} = {bu['admitted'] + bu['refused']}, statuses "
                f"{bu['statuses']}, peak queue {bu['peak_queue_depth']:.0f}, peak in flight "
                f"{bu['peak_in_flight']:.0f}: "
                + ("PASS" if bu["passed"] else "FAIL " + _failed(bu["checks"])))
        for name, why in load.get("skipped", {}).items():
            lines.append(f"{name}: skipped ({why})")
    quick = doc["mode"] == "quick"
    lines += ["", "targets (gateway, one core)" + (
        ": a --quick run is too short to judge them (one repetition, a few seconds each); "
        "the verdicts are indicative only" if quick else "")]
    rows = []
    for t in s["targets"].values():
        verdict = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        if quick and t["met"] is not None:
            verdict = f"indicative: {verdict}"
        if t.get("fell_behind"):
            verdict += " (fell behind the offered rate)"
        if t["load_core_saturated"]:
            verdict += " (load core saturated)"
        rows.append([t["label"], t["target"], _n(t["value"]),
                     _n(t.get("per_core_second"), "{:.0f}"), verdict])
    lines += _table(["target", "goal", "gateway", "per core-second", "verdict"], rows)
    lines.append("per core-second: the figure divided by the CPU time the gateway got, i.e. what "
                 "it would do with the core to itself if CPU-bound; an estimate that is less "
                 "sensitive to other people's load than the measured figure.")
    noise = doc.get("noise", {})
    if noise:
        lines += ["", "noise: " + "; ".join(f"{k} {v}" for k, v in noise.items())]
    for name, why in doc.get("skipped_systems", {}).items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def _first(rows: list[dict[str, Any]], key: str, doc: dict[str, Any]) -> str:
    raw = doc["raw"].get("streams", [])
    return f"concurrency {raw[0]['concurrency']}" if raw else "-"


def _counters(left: dict[str, float]) -> str:
    return "all 0" if not any(left.values()) else str(left)


def _failed(checks: dict[str, bool]) -> str:
    return ", ".join(k for k, v in checks.items() if not v)


ORDER = ("direct", "hypercorn-bare", "aiohttp-bare", "nginx", *GATEWAYS, "litellm")


def _order(system: str) -> int:
    return ORDER.index(system) if system in ORDER else len(ORDER)


def noise(raw: dict[str, Any], summary: dict[str, Any]) -> dict[str, str]:
    """How much to trust the figures: rep-to-rep spread and what else used the proxy's core."""
    out = {}
    spreads = [r["rps_spread"] for r in summary["nonstream"] if r["rps_spread"] is not None]
    if spreads:
        out["(a) req/s rep spread median/max"] = (f"{statistics.median(spreads) * 100:.0f}%/"
                                                   f"{max(spreads) * 100:.0f}%")
    p50s = [r["p50_spread"] for r in summary["nonstream"] if r["p50_spread"] is not None]
    if p50s:
        out["(a) p50 rep spread median/max"] = (f"{statistics.median(p50s) * 100:.0f}%/"
                                                f"{max(p50s) * 100:.0f}%")
    cpus = [r["cpu_spread"] for r in summary["nonstream"] if r.get("cpu_spread") is not None]
    if cpus:
        out["(a) proxy CPU us/req rep spread median/max"] = (
            f"{statistics.median(cpus) * 100:.0f}%/{max(cpus) * 100:.0f}%")
    bs = [r["spread"] for r in summary["streams"] if r["spread"] is not None]
    if bs:
        out["(b) streams/s rep spread max"] = f"{max(bs) * 100:.0f}%"
    for core, name in (("core0_other", "proxy"), ("core1_other", "load")):
        others = [r.get(core) for key in ("nonstream", "streams", "paced")
                  for r in raw.get(key, []) if r.get(core) is not None
                  and (core == "core1_other" or r["system"] != "direct")]
        if others:
            out[f"other people's work on the {name} core, median/max"] = (
                f"{statistics.median(others) * 100:.0f}%/{max(others) * 100:.0f}%")
    return out


# -- files -----------------------------------------------------------------------------------


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


NO_MATPLOTLIB = "matplotlib is not installed (pip install -e '.[bench]')"


def pyplot() -> Any:
    """matplotlib's pyplot drawing to files (Agg), or None: matplotlib is the optional
    ``bench`` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(doc: dict[str, Any], path: Path) -> str | None:
    """The PNG, or why there is none (matplotlib is the optional ``bench`` extra)."""
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    s = doc["summary"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = [(axes[0][0], "rps", "(a) req/s"), (axes[0][1], "p50_ms", "(a) p50 latency, ms"),
              (axes[1][0], "p99_ms", "(a) p99 latency, ms")]
    systems = sorted({r["system"] for r in s["nonstream"]}, key=_order)
    colors = {name: f"C{i}" for i, name in enumerate(ORDER)}
    concurrencies = sorted({r["concurrency"] for r in s["nonstream"]})
    for ax, key, title in panels:
        for system in systems:
            rows = sorted((r for r in s["nonstream"] if r["system"] == system
                           and r[key]), key=lambda r: r["concurrency"])
            ax.plot([r["concurrency"] for r in rows], [r[key] for r in rows], marker="o",
                    label=system, color=colors.get(system))
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_yscale("log")
        ax.set_xlabel("concurrency (non-streaming)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax = axes[1][1]
    for system in sorted({r["system"] for r in s["paced"]}, key=_order):
        rows = sorted((r for r in s["paced"] if r["system"] == system),
                      key=lambda r: r["streams"])
        rows = [r for r in rows if r["delay_p99_ms"] is not None]
        ax.plot([r["streams"] for r in rows], [r["delay_p99_ms"] for r in rows], marker="o",
                label=system, color=colors.get(system))
    ax.set_yscale("log")
    ax.set_xlabel("concurrent streams at 50 tokens/s")
    ax.set_title("(c) p99 per-token delay, backend write to client read, ms")
    ax.grid(True, which="both", alpha=0.3)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.suptitle(f"vllm-gateway benchmark ({doc['mode']}, {doc['environment']['started']}, "
                 "proxy pinned to one core)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report OUT/results.json``: summarize and render a run again
    (after a change to the summaries, or to get the PNG once matplotlib is installed)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.report RESULTS.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    doc = json.loads(path.read_text())
    doc["summary"] = summarize(doc["raw"])
    doc["noise"] = noise(doc["raw"], doc["summary"])
    text = render(doc)
    write_json(doc, path)
    path.with_suffix(".txt").write_text(text + "\n")
    why = plot(doc, path.with_suffix(".png"))
    print(text)
    if why:
        print(f"(no PNG: {why})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
