"""A real vLLM's processes under the process launcher: an engine that dies under a running
server is noticed and replaced by the next request; an idle stop (of that new server) and the
gateway's SIGTERM (while a vLLM loads) leave none of them behind. One gateway, run in that
order: each vLLM start takes a minute here."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from tests.support import wait_until

from .conftest import LONG_IDLE, MAX_MODEL_LEN, STARTUP_TIMEOUT, Served, long_lived_gateway

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
IDLE_TIMEOUT = 2.0  # what the idle stop's test reloads the gateway with


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


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


def test_an_idle_stop_leaves_no_vllm_process(lifecycle: Served) -> None:
    starts = lifecycle.admin()["starts"]
    ask(lifecycle)  # on the server the last test started, where it ran first
    assert set(TITLES) <= set(titles(lifecycle))
    # The running model's idle timeout cut short, live (a reload that keeps its server).
    text = lifecycle.config.read_text()
    lifecycle.config.write_text(text.replace(f"idle_timeout = {LONG_IDLE}",
                                             f"idle_timeout = {IDLE_TIMEOUT}"))
    reloaded = httpx2.post(lifecycle.url + "/admin/reload", headers=lifecycle.auth, timeout=10)
    assert reloaded.status_code == 200, reloaded.text
    wait_until(lambda: lifecycle.admin()["state"] == "stopped", timeout=IDLE_TIMEOUT + 30)
    assert lifecycle.engine_processes() == []
    assert lifecycle.admin()["starts"] <= starts + 1


def test_the_gateways_sigterm_leaves_no_vllm_process(lifecycle: Served) -> None:
    # A vLLM that loads (the operator's load waits for it): the API server, its engine and the
    # engine's worker are all there before its port opens, and the gateway's stop ends them as
    # surely as a ready server's.
    def load() -> None:
        with contextlib.suppress(httpx2.HTTPError):  # cut short by the gateway's exit
            httpx2.post(lifecycle.url + "/admin/models/tiny/load", headers=lifecycle.auth,
                        timeout=STARTUP_TIMEOUT)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        loading = pool.submit(load)
        wait_until(lambda: set(TITLES) <= set(titles(lifecycle)), timeout=STARTUP_TIMEOUT)
        assert lifecycle.admin()["state"] == "starting"
        lifecycle.process.send_signal(signal.SIGTERM)
        assert lifecycle.process.wait(timeout=60) == 0
        loading.result(timeout=10)
    deadline = time.monotonic() + 2  # SIGKILLed ones may take a moment to go
    while lifecycle.engine_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lifecycle.engine_processes() == []
