"""Models in real containers on a real Podman: cold start, idle stop, swap, death, adoption."""

from __future__ import annotations

from typing import Any

import anyio
import httpx2
import pytest

from backends.pool import ModelState
from tests.support import chat, eventually, make_config, serving

from .conftest import SIM_IMAGE, containers_of

pytestmark = [pytest.mark.anyio, pytest.mark.containers]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiodocker runs on asyncio only


def container_model(name: str, *extra: str, **settings: Any) -> dict[str, Any]:
    return {"name": name, "launcher": "container", "engine": "local", "image": SIM_IMAGE,
            "args": ["--host", "0.0.0.0", "--port", "8000", "--model", name, *extra],
            "startup_timeout": 30.0, **settings}


def config_with(engine_url: str, instance: str, models: list[dict[str, Any]],
                **gateway: Any) -> Any:
    return make_config(models, gateway={"instance": instance, **gateway},
                       engines={"local": {"url": engine_url, "stop_timeout": 5.0}})


async def ask(url: str, model: str) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=60) as client:
        return await client.post(url + "/v1/chat/completions", json=chat(model))


async def test_cold_start_on_first_request_then_idle_stop_removes_it(
        engine_url: str, instance: str) -> None:
    config = config_with(engine_url, instance, [container_model("a", idle_timeout=1.0)])
    async with serving(config) as (url, gateway):
        assert containers_of(instance) == []
        response = await ask(url, "a")
        assert response.status_code == 200
        assert [line.split()[1] for line in containers_of(instance)] == ["running"]
        await eventually(lambda: gateway.pool.backends["a"].state is ModelState.STOPPED, 15)
        assert containers_of(instance) == []


async def test_swap_under_a_budget_of_one(engine_url: str, instance: str) -> None:
    config = config_with(engine_url, instance, [container_model("a"), container_model("b")],
                         max_models_concurrent=1)
    async with serving(config) as (url, gateway):
        assert (await ask(url, "a")).status_code == 200
        assert (await ask(url, "b")).status_code == 200
        names = [line.split()[0] for line in containers_of(instance)]
        assert names == [f"vllm-gateway-{instance}-b"]
        assert gateway.pool.backends["a"].state is ModelState.STOPPED
    assert containers_of(instance) == []


async def test_a_container_killed_outside_is_noticed_and_restarted(
        engine_url: str, instance: str) -> None:
    config = config_with(engine_url, instance, [container_model("a")])
    async with serving(config) as (url, gateway):
        assert (await ask(url, "a")).status_code == 200
        await anyio.run_process(["podman", "kill", f"vllm-gateway-{instance}-a"])
        # Seen from the engine's events, without any request.
        await eventually(lambda: gateway.pool.backends["a"].state is ModelState.STOPPED, 15)
        assert containers_of(instance) == []
        assert (await ask(url, "a")).status_code == 200
        assert gateway.pool.backends["a"].starts == 2


async def test_a_restarted_gateway_adopts_its_running_container(
        engine_url: str, instance: str) -> None:
    models = [container_model("a")]
    keep = make_config(models, gateway={"instance": instance},
                       engines={"local": {"url": engine_url, "on_shutdown": "keep"}})
    async with serving(keep) as (url, _):
        assert (await ask(url, "a")).status_code == 200
    before = containers_of(instance)
    assert [line.split()[1] for line in before] == ["running"]
    async with serving(config_with(engine_url, instance, models)) as (url, gateway):
        await eventually(lambda: gateway.pool.backends["a"].state is ModelState.READY)
        assert (await ask(url, "a")).status_code == 200
        assert containers_of(instance) == before
    assert containers_of(instance) == []


async def test_a_left_container_is_removed_by_policy(engine_url: str, instance: str) -> None:
    models = [container_model("a")]
    keep = make_config(models, gateway={"instance": instance},
                       engines={"local": {"url": engine_url, "on_shutdown": "keep"}})
    async with serving(keep) as (url, _):
        assert (await ask(url, "a")).status_code == 200
    remove = make_config(models, gateway={"instance": instance},
                         engines={"local": {"url": engine_url, "on_start": "remove"}})
    async with serving(remove) as (_, gateway):
        assert containers_of(instance) == []
        assert gateway.pool.backends["a"].state is ModelState.STOPPED


@pytest.mark.parametrize(("settings", "reason"), [
    ({"image": "localhost/no-such-image:1"}, "is not present"),
    ({"args": ["--no-such-flag"]}, "exited"),
])
async def test_a_bad_image_or_command_is_503_and_leaves_nothing(
        engine_url: str, instance: str, settings: dict[str, Any], reason: str) -> None:
    config = config_with(engine_url, instance, [container_model("a", **settings)])
    async with serving(config) as (url, _):
        response = await ask(url, "a")
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "model_start_failed"
        assert reason in error["message"]
        assert containers_of(instance) == []
