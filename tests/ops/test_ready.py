"""/health and /ready: liveness is cheap, readiness asks the container engines (at most once a
second) and says why it is not ready."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import httpx2
import pytest

from backends import engine_api
from proxy import routes
from proxy.routes import EnginePings
from tests.support import make_config, serving, static_model

pytestmark = pytest.mark.anyio


class Api:
    """Stands in for an engine's aiodocker client: answers, fails or hangs when pinged."""

    def __init__(self, behaviour: str = "answers") -> None:
        self.behaviour = behaviour
        self.pings = 0

    async def ping(self) -> bool:
        self.pings += 1
        if self.behaviour == "hangs":
            await anyio.sleep_forever()
        return self.behaviour == "answers"


@pytest.fixture
def fake_pings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engines' pings go to the stand-ins (backends/engine_api.py's own test pings a
    real socket)."""
    async def ping(api: Api) -> bool:
        return await api.ping()

    monkeypatch.setattr(engine_api, "ping", ping)


def engines(**apis: Api) -> Any:
    return SimpleNamespace(engines={name: SimpleNamespace(api=api) for name, api in apis.items()})


@pytest.mark.usefixtures("fake_pings")
async def test_engines_that_fail_or_hang_are_named_and_pings_are_kept_a_while(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "PING_TIMEOUT", 0.05)
    good, down, stuck = Api(), Api("fails"), Api("hangs")
    pings = EnginePings(engines(local=good, gpu1=down, gpu2=stuck))
    assert await pings.silent() == ["gpu1", "gpu2"]
    assert await pings.silent() == ["gpu1", "gpu2"]
    assert (good.pings, down.pings, stuck.pings) == (1, 1, 1)
    down.behaviour = "answers"
    monkeypatch.setattr(routes, "PING_TTL", 0.0)
    assert await pings.silent() == ["gpu2"]
    assert (good.pings, down.pings) == (2, 2)


@pytest.mark.usefixtures("fake_pings")
async def test_ready_says_why_it_is_not() -> None:
    config = make_config([static_model("m", "http://127.0.0.1:9")], admin={"token": "t0ken"})
    async with serving(config) as (url, gateway), httpx2.AsyncClient() as client:
        async def ready() -> tuple[int, str | None]:
            response = await client.get(url + "/ready")
            return response.status_code, response.json().get("reason")

        assert await ready() == (200, None)
        gateway.engine_pings = EnginePings(engines(podman=Api("fails")))
        assert await ready() == (503, "container engine not answering: podman")
        gateway.drain()
        assert await ready() == (503, "draining")
        assert (await client.get(url + "/health")).status_code == 200
    assert not gateway.running_now
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await routes.ready(gateway, send)
    assert sent[0]["status"] == 503
    assert b'"not started"' in sent[1]["body"]


ENGINE_URL = os.environ.get("VLLM_GATEWAY_TEST_ENGINE", "unix:///run/podman/podman.sock")


@pytest.mark.containers
@pytest.mark.skipif(not Path(ENGINE_URL.removeprefix("unix://")).exists(),
                    reason=f"no container engine at {ENGINE_URL}")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # aiodocker: asyncio only
async def test_a_real_engine_answers_the_ping_at_once() -> None:
    config = make_config([{"name": "c", "launcher": "container", "engine": "local",
                           "image": "localhost/vllm-gateway-sim:test"}],
                         engines={"local": {"url": ENGINE_URL}})
    async with serving(config) as (url, _), httpx2.AsyncClient() as client:
        with anyio.fail_after(0.5):  # Podman 4 takes a second for /version; /_ping is instant
            ready = await client.get(url + "/ready")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


@pytest.mark.usefixtures("fake_pings")
async def test_a_hundred_probes_at_once_share_one_ping(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = Api("hangs")
    monkeypatch.setattr(routes, "PING_TIMEOUT", 0.2)
    pings = EnginePings(engines(podman=slow))
    answers: list[list[str]] = []

    async def probe() -> None:
        answers.append(await pings.silent())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(probe)
    assert slow.pings == 1
    assert answers == [["podman"]] * 100
