"""A cluster seen from any of its members, on a real redis-server: ``/metrics`` gives the whole
gateway's queue and in-flight figures without a member label and the process's own series with
its member id; ``/admin/models`` lists the members, the owner (token, since when) and the lease
ages; a process killed with kill -9 has its slots reclaimed, and the member that reclaimed them
says so on its admin event stream; with Redis gone a scrape answers at once, with the process's
own figures and ``gateway_cluster_state_up`` 0. Gateways in the test's event loop, on asyncio
and trio."""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from kernel.config import Config
from tests.ops.helpers import Samples, scrape
from tests.support import ROOT, eventually, make_config, redis_server, serving, static_model

pytestmark = pytest.mark.anyio

TOKEN = "t0ken"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
LEASE_S = 2.0


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def config(redis_url: str, prefix: str | None = None, slots: int = 1) -> Config:
    return make_config([static_model("a", "http://127.0.0.1:9", max_concurrent=slots)],
                       admin={"token": TOKEN},
                       cluster={"redis_url": redis_url,
                                "key_prefix": prefix or secrets.token_hex(6),
                                "lease_s": LEASE_S, "heartbeat_s": 0.5})


async def test_any_member_shows_the_whole_gateway(redis_url: str, anyio_backend: str) -> None:
    cfg = config(redis_url)
    async with contextlib.AsyncExitStack() as stack:
        # A process that holds 2 slots (of another model) under a lease of 1 s, to be killed.
        holder = await stack.enter_async_context(await anyio.open_process(
            [sys.executable, "-m", "tests.cluster.holder", redis_url,
             cfg.cluster.key_prefix or "", "1.0", "2"], cwd=ROOT, stderr=None))
        stack.callback(lambda: holder.returncode is None and holder.kill())
        client = await stack.enter_async_context(httpx2.AsyncClient(timeout=10))
        (url, this), (_, other) = [await stack.enter_async_context(serving(cfg))
                                   for _ in range(2)]
        assert this.node is not None and other.node is not None
        streams = [stack.enter_context(g.events.subscribe()) for g in (this, other)]
        # The other process holds the model's one slot and queues a second request.
        held = await other.accounting.join("a")
        assert held is not None and await other.accounting.acquire(held)
        queued = await other.accounting.join("a")
        scraped: Samples = {}
        try:
            # (The owner publishes its servers within a read of the board: 0.2 s.)
            with anyio.fail_after(5):
                while not any(name == "gateway_cluster_servers" for name, _ in scraped):
                    scraped = await scrape(client, url)
                    await anyio.sleep(0.05)
        finally:
            for ticket in (queued, held):
                assert ticket is not None
                await other.accounting.leave(ticket)
        me = ("member", this.node.id)
        # The whole gateway's figures: no member label, the same on every member.
        assert scraped[("gateway_queue_depth", frozenset({("model", "a")}))] == 1
        assert scraped[("gateway_in_flight", frozenset({("model", "a")}))] == 1
        assert scraped[("gateway_cluster_members", frozenset())] == 2
        assert scraped[("gateway_cluster_owner_token", frozenset())] >= 1
        servers = {labels: v for (name, labels), v in scraped.items()
                   if name == "gateway_cluster_servers"}
        assert sum(servers.values()) == 1 and all(("model", "a") in k for k in servers)
        # This process's own, with its member id; nothing of its own goes unlabelled.
        assert scraped[("gateway_cluster_state_up", frozenset({me}))] == 1
        assert scraped[("gateway_cluster_owns_pool", frozenset({me}))] == this.node.owner.holds()
        assert any(name == "gateway_build_info" and me in labels for name, labels in scraped)
        unlabelled = {name for name, labels in scraped if me not in labels}
        assert unlabelled == {"gateway_queue_depth", "gateway_in_flight", "gateway_cluster_servers",
                              "gateway_cluster_members", "gateway_cluster_owner_token"}

        listed = (await client.get(url + "/admin/models", headers=ADMIN)).json()["cluster"]
        assert listed["member"] == this.node.id and listed["error"] is None
        members = {m["id"]: m for m in listed["members"]}
        assert set(members) == {this.node.id, other.node.id}
        for member in members.values():
            assert member["pid"] and member["host"] and member["started"] <= listed["time"]
            assert 0 <= member["lease_age_s"] < LEASE_S
        owner = listed["owner"]
        assert owner["member"] in members and owner["token"] >= 1
        assert owner["since"] <= listed["time"] and 0 <= owner["lease_age_s"] < LEASE_S
        assert listed["owns_pool"] == (owner["member"] == this.node.id)

        # Killed: the member whose call reclaims its slots tells it on its event stream.
        assert holder.stdout is not None
        with anyio.fail_after(10):
            assert (await holder.stdout.receive()).startswith(b"held")
        holder.kill()

        def told() -> list[dict[str, Any]]:
            notices = [json.loads(n) for s in streams for n in s.notices]
            return [n for n in notices if n["event"] == "slots reclaimed"
                    and n["member"].split(":")[1] == str(holder.pid)]

        await eventually(lambda: told(), within=1.0 + 3)  # its lease, and a heartbeat
        reclaimed = told()[-1]
        assert (reclaimed["slots"], reclaimed["places"]) == (2, 0)
        assert reclaimed["by"] in (this.node.id, other.node.id)


async def test_a_scrape_without_redis_gives_the_processs_own_figures(
        tmp_path: Path, anyio_backend: str) -> None:
    with contextlib.ExitStack() as redis:
        url_of_redis = redis.enter_context(redis_server(tmp_path))
        async with serving(config(url_of_redis)) as (url, gateway), httpx2.AsyncClient(
                timeout=10) as client:
            assert gateway.node is not None
            me = ("member", gateway.node.id)
            redis.close()
            began = time.monotonic()
            scraped = await scrape(client, url)
            assert time.monotonic() - began < 3
            assert scraped[("gateway_cluster_state_up", frozenset({me}))] == 0
            assert not any(name == "gateway_queue_depth" for name, _ in scraped)
            assert any(name == "gateway_build_info" and me in labels for name, labels in scraped)
            listed = (await client.get(url + "/admin/models", headers=ADMIN)).json()["cluster"]
            assert "Redis unreachable" in listed["error"]

