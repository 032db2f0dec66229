"""Live reload through the whole gateway on a real socket, each model a simulator process: an
unchanged model keeps its server and its stream in flight; limits change for the next requests;
a removed model finishes its stream, stops, and is then unknown; a model whose command changed
finishes on its old server and starts a new one for the next request; an invalid or refused
configuration changes nothing (``POST /admin/reload``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from backends.pool import ModelState
from kernel.config import load_config
from tests.support import chat, eventually, make_config, serving, sim_model

pytestmark = pytest.mark.anyio

TOKEN = "t0ken"
AUTH = {"authorization": f"Bearer {TOKEN}"}
SLOW = ("--tokens-per-second", "20")


def pid(gateway: Any, model: str) -> int | None:
    return gateway.pool.backends[model].launcher.pid


async def stream(client: httpx2.AsyncClient, url: str, model: str, started: anyio.Event,
                 out: list[bytes]) -> None:
    """A stream of 10 tokens at 20 a second; ``started`` once its first bytes came."""
    async with client.stream("POST", url + "/v1/chat/completions",
                             json=chat(model, max_tokens=10, stream=True)) as r:
        assert r.status_code == 200
        body = b""
        async for chunk in r.aiter_raw():
            body += chunk
            started.set()
        out.append(body)


async def while_streaming(url: str, client: httpx2.AsyncClient, model: str,
                          act: Callable[[], Awaitable[None]]) -> bytes:
    """Run ``act`` while a stream of ``model`` is under way; the stream's whole body."""
    started, out = anyio.Event(), []
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream, client, url, model, started, out)
        await started.wait()
        await act()
    return out[0]


async def test_a_reload_keeps_unchanged_models_and_their_streams_and_applies_limits() -> None:
    models = [sim_model("a", *SLOW), sim_model("b", max_queue_size=5)]
    config = make_config(models, admin={"token": TOKEN})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        async def reload() -> None:
            new = make_config([models[0], sim_model("b", max_queue_size=7, max_concurrent=3),
                               sim_model("c")], admin={"token": TOKEN})
            before.append(pid(gateway, "a"))
            plan = gateway.reloads.reload(new)
            assert plan.added == ("c",) and not plan.removed and not plan.restarted
            assert dict(plan.changed) == {"b": ("max_concurrent", "max_queue_size")}

        before: list[int | None] = []
        assert (await while_streaming(url, client, "a", reload)).endswith(b"data: [DONE]\n\n")
        assert before == [pid(gateway, "a")]
        assert gateway.pool.backends["a"].starts == 1
        assert gateway.pool.backends["b"].slots == 3
        r = await client.post(url + "/v1/chat/completions", json=chat("c"))
        assert r.status_code == 200
        admin = (await client.get(url + "/admin/models", headers=AUTH)).json()
        assert admin["config"]["reloads"]["applied"] == 1
        health = (await client.get(url + "/health")).json()
        assert health["config_hash"] == admin["config"]["hash"] == gateway.reloads.hash


async def test_a_lower_max_queue_size_refuses_the_next_request_beyond_it() -> None:
    models = [sim_model("a", *SLOW, max_concurrent=1, max_queue_size=5)]
    async with serving(make_config(models)) as (url, gateway), \
            httpx2.AsyncClient(timeout=30) as client:
        async def reload_then_fill() -> None:
            gateway.reloads.reload(make_config([{**models[0], "max_queue_size": 1}]))
            # One waits for the slot (the queue's one place); the next is refused.
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(partial(client.post, url + "/v1/chat/completions",
                                          json=chat("a")))
                    await eventually(lambda: gateway.accounting.depth("a") == 1)
                    r = await client.post(url + "/v1/chat/completions", json=chat("a"))
                    assert r.status_code == 429

        await while_streaming(url, client, "a", reload_then_fill)


async def test_a_removed_model_finishes_its_stream_then_stops_and_is_unknown() -> None:
    models = [sim_model("a"), sim_model("gone", *SLOW)]
    async with serving(make_config(models)) as (url, gateway), \
            httpx2.AsyncClient(timeout=30) as client:
        async def remove() -> None:
            plan = gateway.reloads.reload(make_config(models[:1]))
            assert plan.removed == ("gone",)
            r = await client.post(url + "/v1/chat/completions", json=chat("gone"))
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "model_not_found"
            assert server.state is ModelState.READY  # serving its stream

        server = gateway.pool.backends["gone"]
        assert (await while_streaming(url, client, "gone", remove)).endswith(
            b"data: [DONE]\n\n")
        await eventually(lambda: server.state is ModelState.STOPPED)
        await eventually(lambda: "gone" not in gateway.pool.retiring)
        assert server not in gateway.pool.servers
        assert server.launcher.pid is None


async def test_a_changed_command_restarts_on_the_next_request_after_the_old_finishes() -> None:
    async with serving(make_config([sim_model("a", *SLOW)])) as (url, gateway), \
            httpx2.AsyncClient(timeout=30) as client:
        async def change_command() -> None:
            old_pid.append(old.launcher.pid)
            plan = gateway.reloads.reload(make_config([sim_model("a", "--max-concurrency", "4")]))
            assert dict(plan.restarted) == {"a": ("command",)}
            assert gateway.pool.backends["a"] is not old

        old = gateway.pool.backends["a"]
        old_pid: list[int | None] = []
        assert (await while_streaming(url, client, "a", change_command)).endswith(
            b"data: [DONE]\n\n")
        r = await client.post(url + "/v1/chat/completions", json=chat("a"))
        assert r.status_code == 200
        assert pid(gateway, "a") not in (None, *old_pid)
        await eventually(lambda: old.state is ModelState.STOPPED)


def write(path: Path, models: list[dict[str, Any]], **gateway: Any) -> None:
    lines = [f'[admin]\ntoken = "{TOKEN}"\n[gateway]\n'
             + "".join(f"{k} = {v!r}\n" for k, v in gateway.items())]
    for m in models:
        lines.append("[[models]]\n" + "".join(
            f"{k} = {v!r}\n".replace("'", '"') for k, v in m.items()))
    path.write_text("\n".join(lines))


async def test_an_invalid_or_refused_configuration_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    write(path, [sim_model("a", max_queue_size=5)])
    config = load_config(str(path), environ={})
    async with serving(config, load=lambda: load_config(str(path), environ={})) as (url, gw), \
            httpx2.AsyncClient(timeout=30) as client:
        before = gw.reloads.hash
        write(path, [sim_model("a", max_queue_size=0)])
        r = await client.post(url + "/admin/reload", headers=AUTH)
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["code"] == "invalid_config" and "max_queue_size" in error["message"]
        write(path, [sim_model("a")], bind="127.0.0.1:1", instance="other")
        r = await client.post(url + "/admin/reload", headers=AUTH)
        assert r.status_code == 409
        message = r.json()["error"]["message"]
        assert "gateway.bind" in message and "gateway.instance" in message
        assert gw.reloads.hash == before and gw.config is config
        write(path, [sim_model("a", max_queue_size=6)])
        r = await client.post(url + "/admin/reload", headers=AUTH)
        assert r.status_code == 200
        assert r.json()["models"]["changed"] == {"a": ["max_queue_size"]}
        metrics = (await client.get(url + "/metrics")).text
        for outcome in ("applied", "invalid", "refused"):
            assert f'gateway_config_reloads_total{{outcome="{outcome}"}} 1.0' in metrics
        assert f'gateway_config_info{{hash="{gw.reloads.hash}"}} 1.0' in metrics
