"""SIGTERM to a real ``vllm-gateway serve`` during live streams: what finishes in the grace
finishes, what does not ends with an SSE error event, and nothing it started outlives it."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx2
import pytest

from tests.support import HTTP, chat, gateway_process, wait_until

GRACE = 2.0
CONFIG = f"""
[gateway]
shutdown_grace = {GRACE}

[[models]]
name = "m"
launcher = "process"
command = ["{{python}}", "-m", "simulator", "--port", "{{port}}", "--model", "{{name}}",
           "--tokens-per-second", "20"]
startup_timeout = 20.0
"""


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


class Stream(threading.Thread):
    """One streamed chat completion, read to its end in a thread of its own."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.max_tokens = max_tokens
        self.lines: list[str] = []
        self.ended_at = 0.0

    def run(self) -> None:
        with httpx2.stream("POST", self.url + "/v1/chat/completions", timeout=60,
                           json=chat("m", max_tokens=self.max_tokens, stream=True)) as response:
            for line in response.iter_lines():
                if line:
                    self.lines.append(line)
        self.ended_at = time.monotonic()


@pytest.mark.parametrize("options", [["--worker", "asyncio"], ["--worker", "trio"],
                                     ["--server", "uvicorn"]], ids=["asyncio", "trio", "uvicorn"])
def test_sigterm_finishes_streams_within_the_grace_ends_the_rest_and_leaves_no_process(
        tmp_path: Path, options: list[str]) -> None:
    with gateway_process(CONFIG, tmp_path, *options) as (url, proc):
        assert HTTP.post(url + "/v1/chat/completions", json=chat("m")).status_code == 200
        models = children_of(proc.pid)
        assert len(models) == 1
        short = Stream(url, max_tokens=10)  # half a second at 20 tokens/s: within the grace
        long = Stream(url, max_tokens=1000)
        short.start()
        long.start()
        wait_until(lambda: short.lines and long.lines)

        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until(lambda: HTTP.get(url + "/ready").status_code == 503)
        assert HTTP.get(url + "/health").status_code == 200
        refused = HTTP.post(url + "/v1/chat/completions", json=chat("m"))
        assert (refused.status_code, refused.json()["error"]["code"]) == (503, "shutting_down")

        short.join(timeout=GRACE + 10)
        long.join(timeout=GRACE + 10)
        assert proc.wait(timeout=GRACE + 15) == 0
        stopped = time.monotonic()

    assert short.lines[-1] == "data: [DONE]"
    assert short.ended_at - signalled < GRACE
    assert long.lines[-1].startswith("data: {")
    assert json.loads(long.lines[-1][len("data: "):])["error"]["code"] == "shutting_down"
    assert len(long.lines) < 1000
    assert GRACE - 0.5 < long.ended_at - signalled < GRACE + 5
    assert stopped - signalled < GRACE + 10
    assert [pid for pid in models if Path(f"/proc/{pid}").exists()] == []
    log = (tmp_path / "gateway.log").read_text()
    assert "Traceback" not in log
