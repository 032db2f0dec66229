"""``vllm-gateway serve`` under each hypercorn worker, and on uvicorn: a streamed answer, and a
disconnect."""

from __future__ import annotations

import time
from pathlib import Path

import httpx2
import pytest

from tests.support import chat, gateway_process, simulator


@pytest.mark.parametrize("options", [["--worker", "asyncio"], ["--worker", "uvloop"],
                                     ["--worker", "trio"], ["--server", "uvicorn"]],
                         ids=["asyncio", "uvloop", "trio", "uvicorn"])
def test_worker_streams_and_notices_a_disconnect(options: list[str], tmp_path: Path) -> None:
    with simulator("--tokens-per-second", "20") as sim:
        config = f"""
[[models]]
name = "m"
served_name = "sim"
launcher = "static"
url = "{sim.url}"
"""
        with gateway_process(config, tmp_path, *options) as (url, _):
            with httpx2.stream("POST", url + "/v1/chat/completions", timeout=30,
                               json=chat("m", max_tokens=4, stream=True)) as response:
                lines = [line for line in response.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            assert sum("tok" in line for line in lines) == 4

            with httpx2.stream("POST", url + "/v1/chat/completions", timeout=30,
                               json=chat("m", max_tokens=1000, stream=True)) as response:
                for _ in response.iter_lines():
                    break
            deadline = time.monotonic() + 5
            while sim.stats()["aborted"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            stats = sim.stats()
            assert stats["aborted"] == 1
            assert stats["running"] == 0
