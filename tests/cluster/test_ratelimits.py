"""The tenants' ledger (``kernel.ratelimits.Ledger``) in memory and in a real redis-server: the
same answers from both, and with Redis, one tenant's limits and usage shared exactly by every
process (two ledgers here, as two gateway processes hold them)."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from kernel.config import ClusterSettings, Config, TenantSettings
from kernel.ratelimits import InMemoryLedger, Ledger, Spent
from tests.support import make_config, redis_server, sim_model

pytestmark = pytest.mark.anyio

TEAM = TenantSettings(name="team", rpm_limit=3, tpm_limit=100)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def clustered(url: str) -> Config:
    cluster = ClusterSettings(redis_url=url, key_prefix=secrets.token_hex(6), enabled=True,
                              heartbeat=3.0)
    return dataclasses.replace(make_config([sim_model("m")]), cluster=cluster)


@asynccontextmanager
async def ledgers(kind: str, request: pytest.FixtureRequest, count: int = 1,
                  ) -> AsyncIterator[list[Ledger]]:
    """``count`` ledgers sharing their state: in memory, one object; in Redis, as many."""
    if kind == "in-memory":
        yield [InMemoryLedger()] * count
        return
    from cluster.ratelimits import RedisLedger

    config = clustered(request.getfixturevalue("redis_url"))
    async with AsyncExitStack() as stack:
        opened: list[AbstractAsyncContextManager[Any]] = [
            RedisLedger(config).running() for _ in range(count)]
        yield [await stack.enter_async_context(ledger) for ledger in opened]


KINDS = pytest.mark.parametrize("kind", ["in-memory", "redis"])


def spent(prompt: int, completion: int, *, model: str = "m", error: bool = False,
          count_request: bool = False) -> Spent:
    return Spent("team", model, count_request, prompt, completion, error, 0.25)


@KINDS
async def test_requests_are_admitted_up_to_rpm_limit_and_a_refusal_is_not_counted(
        kind: str, request: pytest.FixtureRequest) -> None:
    async with ledgers(kind, request) as (ledger,):
        verdicts = [await ledger.admit(TEAM) for _ in range(5)]
        assert [v.admitted for v in verdicts] == [True, True, True, False, False]
        assert [v.requests.remaining for v in verdicts] == [2, 1, 0, 0, 0]
        refused = verdicts[-1]
        assert refused.requests.spent and not refused.tokens.spent
        assert 59 < refused.requests.retry_after <= 60
        assert 59 < refused.requests.reset <= 60
        assert (await ledger.report(["team"]))["team"]["requests"] == 3


@KINDS
async def test_tokens_recorded_spend_the_token_window_and_add_up_per_model(
        kind: str, request: pytest.FixtureRequest) -> None:
    async with ledgers(kind, request) as (ledger,):
        assert (await ledger.admit(TEAM)).tokens.remaining == 100
        await ledger.record(spent(60, 30))
        assert (await ledger.admit(TEAM)).tokens.remaining == 10
        await ledger.record(spent(5, 5, model="n", error=True))
        verdict = await ledger.admit(TEAM)
        assert not verdict.admitted and verdict.tokens.spent and verdict.tokens.used == 100
        # A tenant without limits: its request is counted in its window as it is recorded.
        await ledger.record(spent(1, 1, count_request=True))
        report = (await ledger.report(["team", "nobody"]))
        assert report["team"]["requests"] == 3
        assert report["team"]["tokens"] == 102
        assert report["team"]["usage"] == {
            "m": {"requests": 2, "prompt_tokens": 61, "completion_tokens": 31, "errors": 0,
                  "queue_wait_s": 0.5},
            "n": {"requests": 1, "prompt_tokens": 5, "completion_tokens": 5, "errors": 1,
                  "queue_wait_s": 0.25}}
        assert report["nobody"] == {"requests": 0, "tokens": 0, "usage": {}}


async def test_processes_sharing_redis_share_a_tenants_limit_exactly(
        request: pytest.FixtureRequest) -> None:
    tenant = TenantSettings(name="team", rpm_limit=7)
    admitted: list[bool] = []

    async def admit(ledger: Ledger) -> None:
        admitted.append((await ledger.admit(tenant)).admitted)

    async with ledgers("redis", request, count=2) as pair:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(admit, pair[i % 2])
        assert admitted.count(True) == 7
        await pair[0].record(spent(4, 2))
        await pair[1].record(spent(1, 1))
        report = await pair[1].report(["team"])
        assert report["team"]["usage"]["m"]["completion_tokens"] == 3
        assert report["team"]["tokens"] == 8


async def test_without_redis_admit_is_refused_503_and_nothing_is_skipped(
        tmp_path: Path) -> None:
    from cluster.ratelimits import RedisLedger
    from kernel.errors import GatewayError

    ledger = RedisLedger(clustered(f"unix://{tmp_path}/none.sock"))
    async with ledger.running():
        with pytest.raises(GatewayError) as info:
            await ledger.admit(TEAM)
    assert (info.value.status, info.value.code) == (503, "state_unavailable")
