"""CPU per request of the accounting in Redis ([cluster]) against the in-memory one, in one
gateway process (issue 26's goal: <= 1.2x).

Two figures, each for both accountings: the accounting alone (join, try_acquire, leave of one
request, in this process; in Redis also with two tenants' rules, ``FairRedisAccounting``), and
a whole request through a ``vllm-gateway serve`` process to a
simulator (the gateway process's CPU time from /proc), both gateways measured in turn, round
by round: the medians' ratio.
Needs redis-server on PATH. Run: ``.venv/bin/python -m benchmarks.accounting_cost``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from cluster.accounting import RedisAccounting
from cluster.fair_accounting import FairRedisAccounting
from kernel.accounting import Accounting, InMemoryAccounting
from kernel.config import ClusterSettings, TenantSettings
from tests.support import (
    HTTP,
    chat,
    gateway_process,
    make_config,
    redis_server,
    simulator,
    static_model,
)

from .procs import cpu_seconds

ALONE = 5000
# Requests per round of the whole request, and its rounds (each gateway in turn).
WHOLE = 200
ROUNDS = 10


async def alone(accounting: Accounting, tenant: TenantSettings | None = None) -> float:
    began = time.process_time()
    for _ in range(ALONE):
        ticket = await accounting.join("m", tenant)
        assert ticket is not None and await accounting.try_acquire(ticket)
        await accounting.leave(ticket)
    return (time.process_time() - began) / ALONE


async def accounting_alone(url: str) -> dict[str, float]:
    cfg = make_config([static_model("m", "http://127.0.0.1:9")])
    cluster = ClusterSettings(redis_url=url, key_prefix="bench", enabled=True, heartbeat=3.0)
    shared = RedisAccounting(dataclasses.replace(cfg, cluster=cluster))
    tenants = make_config([static_model("m", "http://127.0.0.1:9")],
                          tenants=[{"name": "a", "weight": 2}, {"name": "b"}])
    fair = FairRedisAccounting(dataclasses.replace(
        tenants, cluster=dataclasses.replace(cluster, key_prefix="bench-fair")))
    async with shared.running(), fair.running():
        return {"in-memory": await alone(InMemoryAccounting(cfg)), "redis": await alone(shared),
                "redis, two tenants": await alone(fair, tenants.tenants[0])}


def whole(tmp: Path, sim_url: str, redis_url: str) -> dict[str, list[float]]:
    """CPU per request of each gateway, in rounds of ``WHOLE`` requests taken in turn (so that
    the neighbours' load hits both alike)."""
    tables = {"in-memory": "", "redis": f'[cluster]\nredis_url = "{redis_url}"'}
    rounds: dict[str, list[float]] = {name: [] for name in tables}
    with contextlib.ExitStack() as stack:
        gateways = {}
        for name, table in tables.items():
            text = f'{table}\n[[models]]\nname = "m"\nlauncher = "static"\nurl = "{sim_url}"\n'
            (tmp / name).mkdir()
            gateways[name] = stack.enter_context(gateway_process(text, tmp / name))
            for _ in range(100):  # warm
                HTTP.post(gateways[name][0] + "/v1/chat/completions", json=chat("m"))
        for _ in range(ROUNDS):
            for name, (url, proc) in gateways.items():
                began = cpu_seconds(proc.pid)
                for _ in range(WHOLE):
                    assert HTTP.post(url + "/v1/chat/completions",
                                     json=chat("m")).status_code == 200
                rounds[name].append((cpu_seconds(proc.pid) - began) / WHOLE)
    return rounds


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp)) as url:
        for name, seconds in anyio.run(accounting_alone, url).items():
            print(f"accounting alone, {name}: {seconds * 1e6:.1f} us CPU per request")
        with simulator(model="m") as sim:
            rounds = whole(Path(tmp), sim.url, url)
        for name, figures in rounds.items():
            print(f"whole request, {name}: {statistics.median(figures) * 1e6:.0f} us gateway CPU "
                  f"per request (median of {ROUNDS} rounds; best {min(figures) * 1e6:.0f})")
        redis, in_memory = (statistics.median(rounds[name]) for name in ("redis", "in-memory"))
        print(f"ratio: {redis / in_memory:.2f}x")


if __name__ == "__main__":
    main()
