"""The soak: the gateway under load for a long time, its model servers killed under it and its
clients hanging up, watched for what leaks: ``python -m benchmarks.soak --minutes 60 --out DIR``.

It runs ``vllm-gateway serve`` as a process on a config it writes: ``--models`` simulated models
(``python -m simulator``, started by the process launcher, ``--max-concurrent`` slots each),
each with ``--clients`` clients in a closed loop (``benchmarks.loadgen``'s ``soak`` mode:
streaming and plain requests alternately), ``--disconnect`` of the requests hanging up early.
Every ``--kill-every`` minutes the server of one model (each in turn) is killed with SIGKILL:
the simulator process under the gateway that listens on the port ``/admin/models`` names; the
next request for the model starts it again.

Every ``--reload-every`` minutes (half a period first) it reloads the gateway's configuration
live: it rewrites the file with a limit-only change (the first model's ``max_queue_size``, set
and unset in turn) and POSTs ``/admin/reload``; each must be applied as that change alone, with
no request failing for it.

Every ``--sample-every`` seconds it reads the gateway's process from ``/proc`` (RSS, open
descriptors, threads, its TCP connections: from clients, and the others, to the model servers)
and the gauges of ``/metrics`` (in flight, queued, in flight per replica). The gateway exposes no
count of its asyncio tasks, so none is sampled. It writes ``soak.csv`` (the samples),
``soak.json`` (all of it, with the checks), ``soak.png`` (the plot; matplotlib, the ``bench``
extra) and the gateway's log, prints the checks, and exits 1 if one fails:

- memory and descriptors flat after the warm-up: the least-squares slope of the samples under
  load, per hour, within ``RSS_MB_PER_HOUR`` and ``FDS_PER_HOUR``, or, over a span too short
  for a slope per hour to mean anything, a rise of ``RSS_NOISE_MB`` and ``FDS_NOISE`` over it;
- after the load, every gauge and client connection back to 0 and the descriptors back to
  where they were before it;
- the gateway stops on SIGTERM, and no process it started outlives it;
- every reload applied, as the one limit it changed;
- every failed request explained: the load generator knows which requests it hung up (those
  are not failures), and a failure of a killed model's request that was in flight at the kill
  or began within ``--kill-window`` seconds after it is put down to the kill; any other is not
  explained.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import report, scenarios, systems
from .procs import descendants, http_get, open_fds, rss_kb, start_time, tcp_sockets, threads
from .systems import ROOT, System

SIM = ["{python}", "-m", "simulator", "--port", "{port}", "--model", "{name}"]
COLUMNS = ("t_s", "phase", "rss_mb", "fds", "threads", "client_conns", "upstream_conns",
           "in_flight", "queue_depth", "replica_in_flight", "models_ready", "answered_200")
# What must be 0 once the load has stopped.
GAUGES = ("in_flight", "queue_depth", "replica_in_flight", "client_conns")
# Flat: at ~300 requests/s, 10 MB an hour is ~10 bytes a request, far below any per-request
# leak (one dict kept per request is hundreds of bytes); 20 descriptors an hour is below one per
# kill at the default --kill-every (and "back after the load" catches even one). Over a short
# span the allocator's and the connections' own movement would read as a steep slope (RSS
# settles by a few MB in the first minutes; a kill drops ~40 upstream connections for a few
# seconds), so there a rise up to that noise over the span passes.
RSS_MB_PER_HOUR = 10.0
RSS_NOISE_MB = 5.0
FDS_PER_HOUR = 20.0
FDS_NOISE = 50.0
STOP_WAIT = 60.0  # seconds the gateway gets to stop on SIGTERM
# hypercorn on asyncio notices that a client closed an idle keep-alive connection only when
# the connection's keep-alive time is up (75 s by default): that short, they are gone soon after
# the load ends.
KEEP_ALIVE = 10.0
# The first model's queue bound while a reload has set it (the others keep the gateway's 200).
RELOAD_QUEUE_SIZE = 150


@dataclass
class Kill:
    at: float  # seconds since the load began
    model: str
    pid: int
    failures: Counter[str] = field(default_factory=Counter)


class Soak:
    """The gateway under watch: its samples, the servers it started, the kills."""

    def __init__(self, system: System, token: str, models: list[str]) -> None:
        assert system.proc is not None
        self.proc = system.proc
        self.port = system.fast.port
        self.base = f"http://{system.fast.host}:{self.port}"
        self.auth = {"authorization": f"Bearer {token}"}
        self.models = models
        self.zero = time.monotonic()  # when the load begins
        self.samples: list[dict[str, Any]] = []
        self.missed = 0
        self.servers: dict[tuple[int, int], str] = {}  # (pid, start time): command line
        self.kills: list[Kill] = []
        self.reloads: list[dict[str, Any]] = []

    def admin(self, path: str, *, post: bool = False) -> Any:
        status, body = http_get(self.base + path, timeout=120, headers=self.auth,
                                data=b"" if post else None)
        if status != 200:
            raise RuntimeError(f"{path} answered {status}: {body[:500]!r}")
        return json.loads(body)

    def note_servers(self) -> list[int]:
        """The processes under the gateway now, each remembered (to find it later if it
        outlives the gateway)."""
        pids = descendants(self.proc.pid)
        for pid in pids:
            began = start_time(pid)
            if began is not None:
                self.servers.setdefault((pid, began), " ".join(_argv(pid)))
        return pids

    def sample(self, phase: str) -> dict[str, Any] | None:
        pid = self.proc.pid
        self.note_servers()
        try:
            m = scenarios.scrape(self.base)
        except OSError:
            self.missed += 1
            return None
        conns = [(local, state) for local, _, state in tcp_sockets(pid) if state != "LISTEN"]

        def total(name: str, **labels: str) -> int:
            return round(sum(scenarios.metric(m, name, model=x, **labels) for x in self.models))

        row = {"t_s": round(time.monotonic() - self.zero, 2), "phase": phase,
               "rss_mb": round(rss_kb(pid) / 1024, 2), "fds": open_fds(pid),
               "threads": threads(pid),
               "client_conns": sum(1 for local, _ in conns if local == self.port),
               "upstream_conns": sum(1 for local, _ in conns if local != self.port),
               "in_flight": total("gateway_in_flight"),
               "queue_depth": total("gateway_queue_depth"),
               "replica_in_flight": total("gateway_replica_in_flight"),
               "models_ready": total("gateway_backend_state", state="ready"),
               "answered_200": total("gateway_requests_total", status="200")}
        self.samples.append(row)
        return row

    def kill(self, model: str) -> bool:
        """SIGKILL the simulator serving ``model``; False if it is not ready now."""
        entry = next(e for e in self.admin("/admin/models")["data"] if e["name"] == model)
        if entry["state"] != "ready" or not entry["address"]:
            return False
        port = entry["address"].rsplit(":", 1)[1]
        for pid in self.note_servers():
            argv = _argv(pid)
            # The leash runs it (``python -I -S leash.py FD python -m simulator ...``).
            if argv[1:3] == ["-m", "simulator"] and argv[argv.index("--port") + 1] == port:
                os.kill(pid, signal.SIGKILL)
                self.kills.append(Kill(round(time.monotonic() - self.zero, 2), model, pid))
                return True
        raise RuntimeError(f"no simulator process on port {port} under the gateway")

    def reload(self, conf: Path) -> None:
        """Set or unset the first model's ``max_queue_size`` in the file (renamed into place),
        then reload; noted with whether it was applied as that one change."""
        model = self.models[0]
        text = conf.read_text()
        named = f'name = "{model}"\n'
        limit = f"max_queue_size = {RELOAD_QUEUE_SIZE}\n"
        text = (text.replace(named + limit, named) if named + limit in text
                else text.replace(named, named + limit))
        staged = conf.with_suffix(".staged")
        staged.write_text(text)
        staged.replace(conf)
        try:
            answer = self.admin("/admin/reload", post=True)
            applied = answer["models"]["changed"] == {model: ["max_queue_size"]}
        except (OSError, RuntimeError) as exc:
            answer, applied = {"error": str(exc)}, False
        self.reloads.append({"at_s": round(time.monotonic() - self.zero, 2),
                             "applied": applied, "answer": answer})

    def alive(self) -> dict[int, str]:
        """The processes the gateway started that run still."""
        return {pid: cmd for (pid, began), cmd in self.servers.items()
                if start_time(pid) == began}

    def orphans(self, grace: float = 5.0) -> dict[int, str]:
        deadline = time.monotonic() + grace
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = args.minutes * 60
    names = [f"soak-{i + 1}" for i in range(args.models)]
    table: dict[str, object] = {
        "launcher": "process", "startup_timeout": 60.0, "idle_timeout": 86400.0,
        "command": [*SIM, "--tokens-per-second", f"{args.tokens_per_second:g}"]}
    token = secrets.token_hex(16)
    system = systems.gateway(dict.fromkeys(names, table), out, src=ROOT,
                             max_concurrent=args.max_concurrent, max_queue_size=200,
                             core=None, env={"GATEWAY_ADMIN_TOKEN": token},
                             settings={"keep_alive_timeout": KEEP_ALIVE})
    soak = Soak(system, token, names)
    try:
        for name in names:
            soak.admin(f"/admin/models/{name}/load", post=True)
        time.sleep(1.0)  # the start's own connections settle
        soak.zero = time.monotonic() + scenarios.LOADGEN_START
        soak.sample("before")
        end = soak.zero + seconds
        plan = [soak.zero + k * args.kill_every * 60
                for k in range(1, int(seconds // (args.kill_every * 60)) + 1)
                if k * args.kill_every * 60 <= seconds - args.kill_window
                ] if args.kill_every else []
        planned = len(plan)
        every = args.reload_every * 60
        reloads = [soak.zero + k * every - every / 2
                   for k in range(1, int(seconds // every) + 2) if k * every - every / 2 < seconds
                   ] if every else []
        planned_reloads = len(reloads)
        next_sample = [soak.zero]

        def poll() -> None:
            now = time.monotonic()
            if plan and now >= plan[0] and soak.kill(names[len(soak.kills) % len(names)]):
                plan.pop(0)
            if reloads and now >= reloads[0]:
                reloads.pop(0)
                soak.reload(out / "gateway.toml")  # systems.gateway writes it there
            if next_sample[0] <= now <= end:
                next_sample[0] += args.sample_every
                soak.sample("load" if now - soak.zero >= args.warmup else "warm-up")

        spec = {"mode": "soak", **system.fast.spec(), "models": names,
                "per_model": args.clients, "max_tokens": args.max_tokens, "window_end": end,
                "disconnect": args.disconnect, "seed": args.seed,
                "hang_up_within": args.max_tokens / args.tokens_per_second}
        result, _ = scenarios.loadgen(spec, poll=poll, timeout=seconds + 600)
        before = soak.samples[0]
        deadline = time.monotonic() + args.settle
        while True:
            row = soak.sample("after")
            settled = row is not None and not any(row[g] for g in GAUGES) and (
                row["fds"] <= before["fds"])
            if settled or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        soak.note_servers()
        began_stop = time.monotonic()
        soak.proc.popen.send_signal(signal.SIGTERM)
        try:
            status: int | None = soak.proc.popen.wait(timeout=STOP_WAIT)
        except subprocess.TimeoutExpired:
            status = None
        stop_s = time.monotonic() - began_stop
        orphans = soak.orphans()
    finally:
        system.stop()
        for pid in soak.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return verdict(args, soak, result, planned=planned, planned_reloads=planned_reloads,
                   status=status, stop_s=stop_s, orphans=orphans)


def attribute(failures: list[list[Any]], kills: list[Kill], zero: float,
              window: float) -> Counter[str]:
    """Put each failure down to the kill of its model that it was in flight at or began
    within ``window`` seconds after (counted on the kill); what is left is returned."""
    unexplained: Counter[str] = Counter()
    for began, ended, model, what in failures:
        kill = next((k for k in kills if k.model == model
                     and began - zero <= k.at + window and ended - zero >= k.at), None)
        if kill is None:
            unexplained[what] += 1
        else:
            kill.failures[what] += 1
    return unexplained


def flat(rows: list[dict[str, Any]], key: str, per_hour: float, noise: float) -> dict[str, Any]:
    """The slope of ``key`` per hour over ``rows``, and the limit it is held to."""
    hours = [r["t_s"] / 3600 for r in rows]
    span = hours[-1] - hours[0] if len(hours) > 1 else 0.0
    fitted = scenarios.slope(hours, [r[key] for r in rows])
    limit = max(per_hour, noise / span) if span else float("inf")
    return {"slope_per_hour": fitted, "limit_per_hour": limit, "span_min": span * 60,
            "first": rows[0][key] if rows else None, "last": rows[-1][key] if rows else None,
            "ok": len(rows) >= 3 and fitted <= limit}


def verdict(args: argparse.Namespace, soak: Soak, result: dict[str, Any], *, planned: int,
            planned_reloads: int, status: int | None, stop_s: float,
            orphans: dict[int, str]) -> dict[str, Any]:
    unexplained = attribute(result["failures"], soak.kills, soak.zero, args.kill_window)
    steady = [r for r in soak.samples if r["phase"] == "load"]
    before, after = soak.samples[0], soak.samples[-1]
    rss = flat(steady, "rss_mb", RSS_MB_PER_HOUR, RSS_NOISE_MB)
    fds = flat(steady, "fds", FDS_PER_HOUR, FDS_NOISE)
    hung_up = sum(result["hung_up"].values())
    failed = len(result["failures"])
    checks = {
        "memory flat after warm-up": (
            rss["ok"], f"RSS {rss['first']:.1f} -> {rss['last']:.1f} MB, slope "
            f"{rss['slope_per_hour']:+.1f} MB/h over {rss['span_min']:.1f} min, limit "
            f"{rss['limit_per_hour']:.1f} MB/h"),
        "descriptors flat after warm-up": (
            fds["ok"], f"{fds['first']} -> {fds['last']} open, slope "
            f"{fds['slope_per_hour']:+.1f}/h, limit {fds['limit_per_hour']:.1f}/h"),
        "descriptors back after the load": (
            after["fds"] <= before["fds"],
            f"{before['fds']} before the load, {after['fds']} after"),
        "gauges back to 0": (
            not any(after[g] for g in GAUGES),
            ", ".join(f"{g} {after[g]}" for g in GAUGES)),
        "gateway stopped on SIGTERM": (
            status is not None, f"exit status {status} after {stop_s:.1f} s"),
        "no orphaned server": (
            not orphans, f"{len(soak.servers)} processes started, left running: "
            + (", ".join(f"{pid} ({cmd[:80]})" for pid, cmd in orphans.items()) or "none")),
        "every error explained": (
            not unexplained, f"{failed} failed: {failed - sum(unexplained.values())} put down "
            f"to the kills, unexplained {dict(unexplained) or 'none'}; {hung_up} hung up by "
            "the clients"),
        "every kill done": (
            len(soak.kills) == planned, f"{len(soak.kills)} of {planned}"),
        "every reload applied": (
            sum(r["applied"] for r in soak.reloads) == planned_reloads,
            f"{sum(r['applied'] for r in soak.reloads)} of {planned_reloads} applied"
            + "".join(f"; at {r['at_s']} s: {r['answer']}" for r in soak.reloads
                      if not r["applied"])),
    }
    answered = result["ok"] + failed + hung_up
    return {
        "args": vars(args), "warmup_s": args.warmup, "models": soak.models,
        "requests": {"answered_ok": result["ok"], "failed": failed, "hung_up": hung_up,
                     "sent": answered, "hung_up_kinds": result["hung_up"],
                     "statuses": result["statuses"],
                     "ok_per_s": result["ok"] / (args.minutes * 60)},
        "kills": [{"at_s": k.at, "model": k.model, "pid": k.pid, "failures": dict(k.failures)}
                  for k in soak.kills],
        "reloads": [{"at_s": r["at_s"], "applied": r["applied"]} for r in soak.reloads],
        "unexplained": dict(unexplained),
        "failures": [[round(b - soak.zero, 3), round(e - soak.zero, 3), m, w]
                     for b, e, m, w in result["failures"]],
        "rss": rss, "fds": fds, "missed_samples": soak.missed,
        "processes_started": len(soak.servers),
        "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()},
        "passed": all(ok for ok, _ in checks.values()),
        "samples": soak.samples,
        "per_second": result["per_second"],
        "per_second_from_s": round(result["began"] - soak.zero, 3),
    }


def write_csv(samples: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(samples)


def plot(doc: dict[str, Any], path: Path) -> str | None:
    """The PNG, or why there is none."""
    plt = report.pyplot()
    if plt is None:
        return report.NO_MATPLOTLIB
    rows = doc["samples"]
    t = [r["t_s"] / 60 for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    panels = [
        (axes[0], "gateway RSS, MB", ("rss_mb",)),
        (axes[1], "gateway: open descriptors, TCP connections", (
            "fds", "client_conns", "upstream_conns")),
        (axes[2], "gauges (all models)", ("in_flight", "queue_depth")),
    ]
    for ax, title, keys in panels:
        for key in keys:
            ax.plot(t, [r[key] for r in rows], marker=".", label=key)
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize="small")
    ax = axes[3]
    start = doc["per_second_from_s"] / 60
    ax.plot([start + i / 60 for i in range(len(doc["per_second"]))], doc["per_second"],
            linewidth=0.5)
    ax.set_title("answered in full per second (clients' view)")
    ax.set_xlabel("minutes since the load began")
    for ax in axes:
        ax.axvspan(min(t[0], 0), doc["warmup_s"] / 60, color="0.9", zorder=0)
        for kill in doc["kills"]:
            ax.axvline(kill["at_s"] / 60, color="red", linestyle="--", linewidth=0.8)
        ax.grid(True, alpha=0.3)
    axes[0].text(doc["warmup_s"] / 60, axes[0].get_ylim()[0], " warm-up | red: a server killed",
                 fontsize="small", va="bottom")
    a = doc["args"]
    fig.suptitle(f"soak: {a['minutes']:g} min, {len(doc['models'])} models x {a['clients']} "
                 f"clients, {a['disconnect']:.0%} hang up, {len(doc['kills'])} servers killed: "
                 f"{'PASS' if doc['passed'] else 'FAIL'}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def render(doc: dict[str, Any]) -> str:
    r = doc["requests"]
    lines = [f"soak: {doc['args']['minutes']:g} min, {r['sent']} requests, "
             f"{r['answered_ok']} answered in full ({r['ok_per_s']:.0f}/s), {r['hung_up']} hung "
             f"up by the clients ({r['hung_up'] / max(r['sent'], 1):.1%}: "
             f"{r['hung_up_kinds']}), {r['failed']} failed"]
    for kill in doc["kills"]:
        lines.append(f"  kill at {kill['at_s'] / 60:.2f} min: {kill['model']} (pid "
                     f"{kill['pid']}), failures put down to it: {kill['failures'] or 'none'}")
    for name, check in doc["checks"].items():
        lines.append(f"{'PASS' if check['ok'] else 'FAIL'}  {name}: {check['detail']}")
    lines.append("PASS" if doc["passed"] else "FAIL")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=60.0, help="length of the load")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak"))
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--clients", type=int, default=50, help="concurrent clients per model")
    p.add_argument("--disconnect", type=float, default=0.1,
                   help="share of the requests whose client hangs up early")
    p.add_argument("--kill-every", type=float, default=5.0,
                   help="minutes between two kills of a model's server (0: none)")
    p.add_argument("--reload-every", type=float, default=10.0,
                   help="minutes between live reloads of the configuration (0: none)")
    p.add_argument("--kill-window", type=float, default=15.0,
                   help="seconds after a kill in which its model's failures are put down to it")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds")
    p.add_argument("--warmup", type=float,
                   help="seconds left out of the slopes (default: 10%% of the run, >= 30)")
    p.add_argument("--settle", type=float, default=30.0,
                   help="seconds the gauges get to fall back to 0 after the load")
    p.add_argument("--max-concurrent", type=int, default=40, help="slots per model")
    p.add_argument("--max-tokens", type=int, default=20)
    p.add_argument("--tokens-per-second", type=float, default=50.0,
                   help="the simulators' pace per stream")
    p.add_argument("--seed", type=int, default=0, help="of the hang-ups")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = max(30.0, 6.0 * args.minutes)  # a tenth of the run
    if args.minutes * 60 - args.warmup < 3 * args.sample_every:
        parser.error("the run leaves fewer than 3 samples after the warm-up")
    args.out = str(Path(args.out).resolve())
    os.chdir(ROOT)
    doc = run(args)
    out = Path(args.out)
    write_csv(doc["samples"], out / "soak.csv")
    report.write_json(doc, out / "soak.json")
    why = plot(doc, out / "soak.png")
    text = render(doc)
    (out / "soak.txt").write_text(text + "\n")
    print(text)
    print(f"wrote {out / 'soak.csv'}, {out / 'soak.json'}, {out / 'soak.txt'}"
          + (f", {out / 'soak.png'}" if why is None else f" (no PNG: {why})"))
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
