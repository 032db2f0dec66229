"""The benchmark harness runs end to end (``benchmarks.run --quick``, direct and gateway) and
writes a table and a JSON document with sane figures; nginx, LiteLLM and the gateway under
uvicorn and granian, when installed, answer through the harness's configuration of them.
Timings are not asserted: this is no benchmark."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from benchmarks import run, systems
from benchmarks.procs import LOAD_CORE, PROXY_CORE
from benchmarks.run import _responder, check_system
from tests.support import Processes

ROOT = Path(__file__).resolve().parent.parent


def _needs() -> str | None:
    if len(os.sched_getaffinity(0)) < 2 or not {PROXY_CORE, LOAD_CORE} <= os.sched_getaffinity(0):
        return "needs cores 0 and 1 (the proxy and the load are pinned apart)"
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install wrk util-linux)"
    return None


pytestmark = pytest.mark.skipif(_needs() is not None, reason=_needs() or "")


class Stoppable(Protocol):
    def stop(self) -> None: ...


@pytest.fixture
def stopped() -> Iterator[list[Stoppable]]:
    """The benchmark's processes (and systems) a test started in this process: stopped when
    the test ends, however it ends."""
    started: list[Stoppable] = []
    yield started
    for thing in reversed(started):
        thing.stop()


@pytest.mark.timeout(240)
def test_quick_run_writes_table_and_json(tmp_path: Path, processes: Processes) -> None:
    out = tmp_path / "results"
    proc = processes.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--systems", "direct,gateway",
         "--out", str(out)], cwd=ROOT, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    table = (out / "results.txt").read_text()
    for heading in ("(a) non-streaming", "(b) streaming", "(c) concurrent streams",
                    "(d) load tests, gateway alone", "targets (gateway, one core): a --quick",
                    "the gateway as a share of the references"):
        assert heading in table
    assert table in proc.stdout

    doc = json.loads((out / "results.json").read_text())
    assert doc["mode"] == "quick"
    summary = doc["summary"]
    a = {(r["system"], r["concurrency"]): r for r in summary["nonstream"]}
    assert set(a) == {(s, c) for s in ("direct", "gateway") for c in run.QUICK.concurrencies}
    for system in ("direct", "gateway"):
        row = a[(system, 1)]
        assert row["errors"] == 0
        assert row["rps"] > 5 and 0 < row["p50_ms"] <= row["p99_ms"]
    assert a[("direct", 1)]["rps"] > 100
    assert a[("gateway", 1)]["added_p50_ms"] is not None
    assert a[("gateway", 1)]["proxy_cpu_us_per_req"] > 0

    b = {r["system"]: r for r in summary["streams"]}
    for system in ("direct", "gateway"):
        assert b[system]["streams_per_s"] > 0
        assert b[system]["errors"] == 0
        # The role chunk, 32 tokens and [DONE], whatever the relay did to the framing.
        assert b[system]["events_per_stream"] == 34

    c = {r["system"]: r for r in summary["paced"]}
    for system in ("direct", "gateway"):
        assert c[system]["errors"] == 0
        assert c[system]["events_per_s"] > 0
        assert c[system]["gap_p50_ms"] is not None and c[system]["delay_p99_ms"] is not None
    assert c["direct"]["events_per_s"] > 0.5 * c["direct"]["offered_per_s"]
    assert c["gateway"]["proxy_cpu_s_per_1000_chunks"] > 0
    assert c["gateway"]["proxy_rss_mb"] > 10
    # Every stream the client finished or dropped has ended at the backend too.
    assert c["gateway"]["backend_streams_left"] == 0

    soak = doc["load_tests"]["soak"]
    assert soak["requests_ok"] > 0
    assert soak["checks"]["no_errors"], soak["client_statuses"]
    assert soak["checks"]["gateway_counted_every_answer"], soak["gateway_answered"]
    assert soak["checks"]["counters_back_to_zero"], soak["counters_after"]
    burst = doc["load_tests"]["burst"]
    assert burst["admitted"] + burst["refused"] == burst["sent"] == run.QUICK.burst_count
    assert burst["checks"]["only_200_and_429"], burst["statuses"]
    assert burst["checks"]["gateway_counted_429s"] and burst["checks"]["gateway_counted_200s"]
    assert burst["checks"]["retry_after_on_every_429"]
    assert burst["checks"]["counters_back_to_zero"], burst["counters_after"]

    assert set(summary["targets"]) >= {"a_rps_c32", "a_added_p50_c1_ms", "b_streams_per_s"}
    png = out / "results.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", ["nginx", "litellm", "aiohttp-bare", *systems.SERVERS])
def test_other_proxies_answer_through_the_harness(name: str, tmp_path: Path,
                                                  stopped: list[Stoppable]) -> None:
    why = systems.available(name)
    if why:
        pytest.skip(why)
    fast, fast_port = _responder("responder-fast", 0, tmp_path)
    stopped.append(fast)
    paced, paced_port = _responder("responder-paced", 50, tmp_path)
    stopped.append(paced)
    if name == "nginx":
        system = systems.nginx(fast_port, paced_port, tmp_path)
    elif name == "aiohttp-bare":
        system = systems.hypercorn_bare(tmp_path, backends=(fast_port, paced_port))
    elif name in systems.SERVERS:
        src, _ = systems.snapshot(tmp_path)
        system = systems.gateway({"fast": fast_port, "paced": paced_port}, tmp_path,
                                 src=src, name=name, server=name)
    else:
        system = systems.litellm(fast_port, paced_port, tmp_path)
    stopped.append(system)
    check_system(system)


@pytest.mark.timeout(120)
def test_burst_ttft_run_reports_direct_and_gateway(tmp_path: Path,
                                                   processes: Processes) -> None:
    """(e), ``benchmarks.ttft``: every request of the burst answered in full through each
    system, and the gateway's figures put next to direct's."""
    proc = processes.run(
        [sys.executable, "-m", "benchmarks.ttft", "--systems", "direct,gateway", "--reps", "1",
         "--streams", "8", "--requests", "16", "--max-tokens", "8", "--prompt-words", "50",
         "--tokens-per-second", "200", "--out", str(tmp_path)],
        cwd=ROOT, timeout=100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "ttft.json").read_text())
    for row in doc["raw"]:
        assert (row["completed"], row["errors"]) == (16, {}), row
        assert 0 < row["ttft_ms"]["p50"] <= row["ttft_ms"]["p99"]
        assert row["ttft_first_wave_ms"]["p99"] is not None
        assert row["ttft_later_waves_ms"]["p99"] is not None
        assert row["itl_ms"]["p50"] is not None and row["output_tokens_per_s"] > 0
    gateway = next(r for r in doc["summary"] if r["system"] == "gateway")
    assert gateway["added_ttft_ms_p99"] is not None and 0 < gateway["throughput_share"]
    # The gateway's own account: one access line per request, with its time to first byte.
    assert doc["gateway_view"]["gateway"]["ttfb_ms"]["p99"] is not None
    assert "+TTFT p99" in proc.stdout


@pytest.mark.timeout(120)
def test_compare_measures_a_revision_against_the_tree(processes: Processes) -> None:
    """``benchmarks.compare``: the bare passthrough and two gateways (HEAD's and the tree's)
    each answer (a) and (b), and each gateway is put as a share of the bare passthrough."""
    proc = processes.run(
        [sys.executable, "-m", "benchmarks.compare", "--base", "HEAD", "--reps", "1",
         "--seconds", "1"], cwd=ROOT, timeout=100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.split("best of 1 interleaved repetitions")[1].splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["aiohttp-bare", "gateway@HEAD",
                                                   "gateway@tree"]
    for line in lines[1:]:
        assert "x aiohttp-bare" in line, line
