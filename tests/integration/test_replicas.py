"""Replicas of a model through the whole gateway on a real socket, each replica a simulator
process: a burst starts a second one, both serve, both stop when idle; a replica killed
mid-stream ends its stream with an SSE error while new requests go to the other; the admin API
and the metrics show each replica."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
import pytest

from backends.pool import Ask, ModelState, route
from backends.prefixes import PrefixIndex
from backends.process import ProcessLauncher
from middleware import request_context
from middleware.prompt_prefix import prefix_blocks
from proxy.app import Gateway
from tests.backends.test_routing import home
from tests.backends.test_routing import replicas as idle
from tests.middleware.test_request_context import Lines
from tests.support import HTTP, chat, eventually, make_config, serving, sim_model

pytestmark = pytest.mark.anyio

TOKEN = "t0ken"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def served(address: str) -> int:
    """Generations a simulator received."""
    return HTTP.get(address + "/sim/stats").json()["requests"]


async def stream(client: httpx2.AsyncClient, url: str, model: str,
                 **extra: Any) -> tuple[int, bytes]:
    async with client.stream("POST", url + "/v1/chat/completions",
                             json=chat(model, max_tokens=10, stream=True, **extra)) as r:
        return r.status_code, b"".join([chunk async for chunk in r.aiter_raw()])


async def test_a_burst_starts_a_second_replica_both_serve_and_both_stop_when_idle() -> None:
    config = make_config(
        [sim_model("m", "--tokens-per-second", "20", max_replicas=2, max_concurrent=2,
                   scale_up_after=0.3, idle_timeout=2.0)],
        admin={"token": TOKEN})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=60) as client:
        replicas = gateway.pool.replicas["m"]
        addresses: dict[int, str] = {}

        def note_addresses() -> bool:
            for r in replicas:
                if r.address is not None:
                    addresses[r.replica] = r.address
            return len(addresses) == 2

        results: list[tuple[int, bytes]] = []

        async def one() -> None:
            results.append(await stream(client, url, "m"))

        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(one)
            # Two at a time on the first replica (half a second each); the rest wait past
            # scale_up_after, so the second one starts and takes its share.
            await eventually(note_addresses, within=20)
            models = (await client.get(url + "/admin/models", headers=AUTH)).json()["data"]
            listed = models[0]["replicas"]
            assert [r["replica"] for r in listed] == [0, 1]
            assert listed[0]["state"] == "ready" and listed[0]["address"] == addresses[0]
        assert [status for status, _ in results] == [200] * 12
        assert all(body.rstrip().endswith(b"data: [DONE]") for _, body in results)
        assert served(addresses[0]) > 0 and served(addresses[1]) > 0
        assert served(addresses[0]) + served(addresses[1]) == 12
        assert gateway.pool.models["m"].scale_ups == 1
        metrics = (await client.get(url + "/metrics")).text
        assert 'gateway_scale_ups_total{model="m"} 1.0' in metrics
        assert 'gateway_replica_in_flight{model="m",replica="1"} 0.0' in metrics
        # Each replica has its own idle timer: both stop (min_replicas = 0).
        await eventually(lambda: all(r.state is ModelState.STOPPED for r in replicas),
                         within=15)
        assert gateway.pool.models["m"].scale_downs == 2
        assert gateway.accounting.in_flight("m") == 0 and gateway.accounting.depth("m") == 0
        metrics = (await client.get(url + "/metrics")).text
        assert 'gateway_scale_downs_total{model="m"} 2.0' in metrics
        assert 'gateway_replica_state{model="m",replica="1",state="stopped"} 1.0' in metrics


async def test_a_replica_killed_mid_stream_ends_that_stream_and_the_other_serves_on() -> None:
    config = make_config(
        [sim_model("m", "--tokens-per-second", "5", max_replicas=2, min_replicas=2,
                   max_concurrent=4, health_interval=0.2)])
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=60) as client:
        replicas = gateway.pool.replicas["m"]
        await eventually(lambda: all(r.state is ModelState.READY for r in replicas), within=20)
        async with client.stream("POST", url + "/v1/chat/completions",
                                 json=chat("m", max_tokens=50, stream=True)) as r:
            assert r.status_code == 200
            chunks = r.aiter_raw()
            await chunks.__anext__()
            victim = next(b for b in replicas if b.leases == 1)
            launcher = victim.launcher
            assert isinstance(launcher, ProcessLauncher) and launcher.pid is not None
            os.kill(launcher.pid, signal.SIGKILL)
            rest = b"".join([chunk async for chunk in chunks])
        events = [json.loads(line[len(b"data: "):]) for line in rest.split(b"\n")
                  if line.startswith(b"data: {")]
        assert events[-1]["error"]["code"] == "upstream_failed"
        # New requests go to the other replica while the killed one is away.
        for _ in range(3):
            response = await client.post(url + "/v1/chat/completions", json=chat("m"))
            assert response.status_code == 200
        # min_replicas: the killed one is started again.
        await eventually(lambda: all(r.state is ModelState.READY for r in replicas), within=20)


@contextlib.asynccontextmanager
async def two_replicas(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
        tuple[str, Gateway, httpx2.AsyncClient, Lines]]:
    """The gateway with model "m" on two ready replicas, its access lines recorded."""
    lines = Lines()
    monkeypatch.setattr(request_context, "access_log", lines)
    config = make_config([sim_model("m", max_replicas=2, min_replicas=2)])
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=60) as client:
        replicas = gateway.pool.replicas["m"]
        await eventually(lambda: all(r.state is ModelState.READY for r in replicas), within=20)
        yield url, gateway, client, lines


async def test_requests_of_one_session_go_to_one_replica(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with two_replicas(monkeypatch) as (url, gateway, client, lines):
        replicas = gateway.pool.replicas["m"]
        addresses = [r.address for r in replicas]
        assert None not in addresses
        before = [served(a) for a in addresses if a]
        for _ in range(4):
            response = await client.post(url + "/v1/chat/completions",
                                         json=chat("m", user="alice"))
            assert response.status_code == 200
        for _ in range(4):
            response = await client.post(url + "/v1/chat/completions", json=chat("m"),
                                         headers={"x-session-id": "alice"})
            assert response.status_code == 200
        counts = sorted(served(a) - b for a, b in zip(addresses, before, strict=True) if a)
        # The body's user and the header name the same session: all eight on one replica,
        # and the access line names it.
        assert counts == [0, 8]
        home = next(r.replica for r, a in zip(replicas, addresses, strict=True)
                    if a and served(a) - before[r.replica] == 8)
        # (The line is written just after the answer went out.)
        await eventually(lambda: [line["replica"] for line in lines.lines
                                  if line["path"] == "/v1/chat/completions"] == [home] * 8)


async def test_a_connect_that_fails_is_tried_again_on_the_other_replica() -> None:
    config = make_config([sim_model("m", max_replicas=2, min_replicas=2,
                                    health_interval=3600.0)],
                         upstream={"backoff_base": 0.0, "backoff_max": 0.0})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=60) as client:
        replicas = gateway.pool.replicas["m"]
        await eventually(lambda: all(r.state is ModelState.READY for r in replicas), within=20)
        # Replica 1's address now refuses connections (nothing listens at port 9; no health
        # check will notice within the test), and the session goes there first.
        launcher = replicas[1].launcher
        assert isinstance(launcher, ProcessLauncher)
        working, launcher.address = launcher.address, "http://127.0.0.1:9"
        session = next(f"s{i}" for i in range(100)
                       if route(replicas, Ask(f"s{i}")) is replicas[1])
        try:
            response = await client.post(url + "/v1/chat/completions",
                                         json=chat("m", user=session))
        finally:
            launcher.address = working
        assert response.status_code == 200
        assert gateway.metrics.retries.labels("m")._value.get() == 1
        assert served(replicas[0].address or "") == 1


def system_prompt_on(replica: int) -> str:
    """A long system prompt that no replica holds yet, whose first block's hash picks
    ``replica`` of two idle ones."""
    for i in range(100):
        text = f"You are assistant number {i}. Answer briefly and cite sources. " * 30
        blocks = prefix_blocks(json.dumps(
            {"messages": [{"role": "system", "content": text}]}).encode(), 256)
        if home(PrefixIndex(100), blocks, idle(0, 0)) == replica:
            return text
    raise AssertionError("no such prompt")


async def test_requests_that_share_a_long_system_prompt_keep_to_one_replica(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with two_replicas(monkeypatch) as (url, gateway, client, lines):
        replicas = gateway.pool.replicas["m"]
        addresses = [r.address or "" for r in replicas]
        before = [served(a) for a in addresses]
        prompts = [system_prompt_on(0), system_prompt_on(1)]
        for turn in range(4):
            for system in prompts:
                response = await client.post(url + "/v1/chat/completions", json={
                    "model": "m", "max_tokens": 2,
                    "messages": [{"role": "system", "content": system},
                                 {"role": "user", "content": f"question {turn}"}]})
                assert response.status_code == 200
        # Each system prompt's four requests went to the replica its first request went to.
        assert [served(a) - b for a, b in zip(addresses, before, strict=True)] == [4, 4]
        # The access line says why: the first of each by its first block's hash, the rest by
        # the prefix they share.
        await eventually(lambda: [(line["replica"], line["route"]) for line in lines.lines
                                  if line["path"] == "/v1/chat/completions"]
                         == [(0, "hash"), (1, "hash")] + [(0, "prefix"), (1, "prefix")] * 3)
        metrics = (await client.get(url + "/metrics")).text
        assert 'gateway_routed_requests_total{model="m",reason="prefix"} 6.0' in metrics
        assert 'gateway_routed_requests_total{model="m",reason="hash"} 2.0' in metrics
        index = gateway.pool.models["m"].prefixes
        assert index is not None
        # Each prompt's blocks, the system prompt's (about 1,900 characters: 7 blocks of 256)
        # shared by its four requests.
        assert f'gateway_prefix_index_blocks{{model="m"}} {len(index)}.0' in metrics
        assert 14 <= len(index) <= 16
        # A replica that stops forgets its prefixes: the other's stay.
        await gateway.pool.runs.stop_and_wait(replicas[1], "test")
        assert len(gateway.pool.models["m"].prefixes or ()) == len(index) < 14
