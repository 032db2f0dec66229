"""The whole gateway on a real socket, under faults of what it drives: a static backend that
goes down and comes back, a gateway killed with -9 under a running process model, and a pool
whose background work is gone (``/health`` says so)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import anyio
import httpx2
import pytest

from backends.launcher import free_port
from backends.pool import ModelState
from tests.backends.checks import running
from tests.support import (
    HTTP,
    chat,
    eventually,
    gateway_process,
    make_config,
    serving,
    simulator,
    static_model,
    wait_until,
)

pytestmark = pytest.mark.anyio

TOKEN = "t0ken"


async def ask(client: httpx2.AsyncClient, url: str, model: str) -> tuple[httpx2.Response, float]:
    began = anyio.current_time()
    response = await client.post(url + "/v1/chat/completions", json=chat(model))
    return response, anyio.current_time() - began


async def test_a_static_backend_down_up_down_is_answered_at_once_each_time() -> None:
    port = free_port()
    # The default startup_timeout (600 s) is what a request waited before.
    config = make_config([{"name": "s", "launcher": "static", "url": f"http://127.0.0.1:{port}",
                           "health_interval": 0.2, "health_failures": 2}],
                         admin={"token": TOKEN})
    auth = {"authorization": f"Bearer {TOKEN}"}
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        response, took = await ask(client, url, "s")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "backend_unavailable"
        assert "refuses connections" in response.json()["error"]["message"]
        assert str(port) not in response.text
        assert int(response.headers["retry-after"]) >= 1
        assert took < 2
        models = (await client.get(url + "/admin/models", headers=auth)).json()["data"]
        assert (models[0]["state"], models[0]["failure"]) == (
            "failed", "down: it refuses connections")
        with simulator(model="s", port=port):
            # Up: seen by the next check.
            await eventually(lambda: gateway.pool.backends["s"].state is ModelState.READY, 3)
            response, _ = await ask(client, url, "s")
            assert response.status_code == 200
        await eventually(lambda: gateway.pool.backends["s"].state is ModelState.FAILED, 3)
        response, took = await ask(client, url, "s")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "backend_unavailable"
        assert took < 1


async def test_health_is_503_once_the_pools_background_work_is_gone() -> None:
    config = make_config([static_model("m", "http://127.0.0.1:9")])
    async with serving(config) as (url, gateway), httpx2.AsyncClient() as client:
        assert (await client.get(url + "/health")).status_code == 200
        gateway.pool.supervisor.problem = "the idle reaper failed: RuntimeError('bug')"
        response = await client.get(url + "/health")
        assert response.status_code == 503
        assert response.json() == {"status": "failing",
                                   "reason": "the idle reaper failed: RuntimeError('bug')",
                                   "config_hash": gateway.reloads.hash}


def servers_of(model: str) -> list[int]:
    """The simulators serving this model, found by their command line (not their leash)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", b"simulator"] and model.encode() in argv:
            pid = int(cmdline.parent.name)
            if running(pid):
                pids.append(pid)
    return pids


def test_a_gateway_killed_with_9_leaves_no_server_and_no_secret(tmp_path: Path) -> None:
    model = f"m-{os.getpid()}-{free_port()}"
    text = f"""
[[models]]
name = "{model}"
launcher = "process"
command = ["{sys.executable}", "-m", "simulator", "--port", "{{port}}",
           "--model", "{{name}}"]
"""
    env = {"GATEWAY_ADMIN_TOKEN": TOKEN}
    with gateway_process(text, tmp_path, env=env) as (url, proc):
        assert HTTP.post(url + "/v1/chat/completions", json=chat(model)).status_code == 200
        [server] = servers_of(model)
        environ = Path(f"/proc/{server}/environ").read_bytes().split(b"\0")
        assert not any(var.startswith(b"GATEWAY_") for var in environ)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_until(lambda: not running(server), timeout=5)
    with gateway_process(text, tmp_path, env=env) as (url, proc):
        assert HTTP.post(url + "/v1/chat/completions", json=chat(model)).status_code == 200
        assert len(servers_of(model)) == 1
    assert servers_of(model) == []
