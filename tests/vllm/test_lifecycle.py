"""A real vLLM's processes under the process launcher: an idle stop and the gateway's SIGTERM
leave none of them behind, and an engine that dies under a running server is noticed and
replaced by the next request."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support import wait_until

from .conftest import MAX_MODEL_LEN, STARTUP_TIMEOUT, Served, long_lived_gateway, serving_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(2 * STARTUP_TIMEOUT + 60)]

HI = [{"role": "user", "content": "hi"}]
# vLLM's API server, its engine and the engine's worker: the process group of a started vLLM.
TITLES = ("VLLM::EngineCore", "VLLM::Worker")


def ask(served: Served, **options: Any) -> Any:
    api = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0,
                        timeout=STARTUP_TIMEOUT)
    return api.completions.create(model="tiny", prompt="hello", **{"max_tokens": 2, **options})


def titles(served: Served) -> list[str]:
    return sorted(line.split(" ", 1)[1] for line in served.engine_processes())


# A gateway of this module's own: its tests kill its engine, and then the gateway.
lifecycle = long_lived_gateway("module", "lifecycle")


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_an_idle_stop_leaves_no_vllm_process(vllm_python: Path, tiny_model: Path,
                                             tmp_path: Path) -> None:
    with serving_vllm(vllm_python, tiny_model, tmp_path, idle_timeout=2.0) as served:
        assert ask(served).usage is not None
        assert set(TITLES) <= set(titles(served))
        wait_until(lambda: served.admin()["state"] == "stopped", timeout=30)
        assert served.engine_processes() == []


def test_an_engine_that_dies_is_noticed_and_the_next_request_starts_a_new_one(
        lifecycle: Served) -> None:
    ask(lifecycle)
    starts = lifecycle.admin()["starts"]
    stream = ask(lifecycle, max_tokens=MAX_MODEL_LEN - 64, stream=True,
                 extra_body={"ignore_eos": True})
    chunks = iter(stream)
    for _ in range(5):  # under way, and seconds from its end (see MAX_MODEL_LEN)
        next(chunks)
    # The engine itself, not one of its children that carry its title (its compile workers):
    # after PIDs wrap (pid_max 32768 here) a child may come first in /proc.
    titled = {int(line.split()[0]) for line in lifecycle.engine_processes()
              if "VLLM::EngineCore" in line}
    engine = next(pid for pid in titled if parent(pid) not in titled)
    os.kill(engine, signal.SIGKILL)
    with pytest.raises(openai.APIError) as failed:
        for _ in chunks:
            pass
    assert "EngineCore encountered an issue" in failed.value.message
    # vLLM's server exits once its engine is dead (its worker stays), and the gateway sees it.
    wait_until(lambda: lifecycle.admin()["state"] == "stopped", timeout=60)
    assert lifecycle.admin()["failure"].startswith("died")
    assert lifecycle.engine_processes() == []
    assert ask(lifecycle).usage is not None
    assert lifecycle.admin()["starts"] == starts + 1


def test_the_gateways_sigterm_leaves_no_vllm_process(lifecycle: Served) -> None:
    ask(lifecycle)
    assert set(TITLES) <= set(titles(lifecycle))
    lifecycle.process.send_signal(signal.SIGTERM)
    assert lifecycle.process.wait(timeout=60) == 0
    deadline = time.monotonic() + 2  # SIGKILLed ones may take a moment to go
    while lifecycle.engine_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lifecycle.engine_processes() == []
