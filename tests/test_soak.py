"""The soak (``benchmarks.soak``) for one minute instead of the hour: three simulated models
under 50 clients each, one model server killed under the load (half a minute in), a tenth of
the requests hung up by their clients, the configuration reloaded live twice, and every check
of the hour passes: memory and descriptors flat, every gauge back to 0, the gateway stopped
with no server left running, every failed request explained; and which failures a kill
explains."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from benchmarks.procs import LOAD_CORE
from benchmarks.soak import COLUMNS, Kill, attribute
from tests.support import ROOT, Processes

pytestmark = pytest.mark.skipif(
    LOAD_CORE not in os.sched_getaffinity(0) or shutil.which("taskset") is None,
    reason="the load generator runs pinned to core 1 (taskset, from util-linux)")


@pytest.mark.timeout(420)
def test_one_minute_soak_passes_every_check(tmp_path: Path, processes: Processes) -> None:
    proc = processes.run(
        [sys.executable, "-m", "benchmarks.soak", "--minutes", "1", "--kill-every", "0.5",
         "--reload-every", "0.5", "--sample-every", "3", "--warmup", "15", "--out",
         str(tmp_path)], cwd=ROOT,
        timeout=390)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-2] == "PASS", proc.stdout

    doc = json.loads((tmp_path / "soak.json").read_text())
    assert doc["passed"]
    failed = [name for name, check in doc["checks"].items() if not check["ok"]]
    assert not failed, doc["checks"]
    # The one kill, half a minute in, cut requests of its model short, and they are put down to
    # it (a server with 40 requests in flight cannot die without failing some).
    (kill,) = doc["kills"]
    assert kill["model"] == "soak-1" and 25 <= kill["at_s"] <= 40
    assert sum(kill["failures"].values()) > 0
    assert doc["unexplained"] == {}
    # Two live reloads (15 s and 45 s in), each applied as the limit it changed, under load.
    assert [r["applied"] for r in doc["reloads"]] == [True, True]
    requests = doc["requests"]
    assert requests["answered_ok"] > 1000
    assert 0.05 < requests["hung_up"] / requests["sent"] < 0.15
    assert requests["hung_up_kinds"]["stream, after the first byte"] > 0

    with open(tmp_path / "soak.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    assert rows[0]["phase"] == "before" and rows[-1]["phase"] == "after"
    assert sum(row["phase"] == "load" for row in rows) >= 12
    assert max(int(row["in_flight"]) for row in rows) > 0
    assert (tmp_path / "gateway.log").stat().st_size > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "soak.png").exists()
    else:
        assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failure_is_put_down_to_a_kill_of_its_model_in_flight_at_it_or_soon_after() -> None:
    zero = 1000.0  # the load generator's clock when the load began
    kills = [Kill(60.0, "a", 1), Kill(120.0, "b", 2)]
    failures = [
        [zero + 59.5, zero + 60.1, "a", "502"],  # in flight at the kill
        [zero + 70.0, zero + 70.2, "a", "503"],  # began within the window
        [zero + 76.0, zero + 76.1, "a", "503"],  # past the window
        [zero + 59.5, zero + 60.1, "b", "502"],  # another model's
        [zero + 10.0, zero + 10.1, "a", "incomplete"],  # before any kill
    ]
    unexplained = attribute(failures, kills, zero, window=15.0)
    assert kills[0].failures == {"502": 1, "503": 1}
    assert kills[1].failures == {}
    assert unexplained == {"503": 1, "502": 1, "incomplete": 1}
