"""Two ``vllm-gateway serve`` processes sharing one redis-server (``[cluster]``) in front of one
static simulator model: the model's limits hold across both exactly, each one's /metrics shows
the whole gateway's, and a gateway killed with kill -9 has its slots reclaimed by the other
within the lease. One gateway runs on uvloop, the other on trio."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2

from backends.launcher import free_port
from tests.support import (
    HTTP,
    ROOT,
    chat,
    gateway_process,
    redis_server,
    simulator,
    wait_until,
)

LEASE_S = 2.0
Gateways = list[tuple[str, subprocess.Popen[bytes]]]


def cluster_table(redis_url: str) -> str:
    return f"""
[cluster]
redis_url = "{redis_url}"
lease_s = {LEASE_S}
heartbeat_s = 0.5
"""


def config_text(redis_url: str, sim_url: str) -> str:
    return cluster_table(redis_url) + model_table(sim_url)


def model_table(sim_url: str) -> str:
    """A static model at ``sim_url``, 3 slots and a queue of 4."""
    return f"""
[gateway]
queue_timeout = 60.0

[[models]]
name = "m"
launcher = "static"
url = "{sim_url}"
max_concurrent = 3
max_queue_size = 4
"""


@contextlib.contextmanager
def two_gateways(tmp_path: Path) -> Iterator[Gateways]:
    """A redis-server, a simulator at 20 tokens a second, and two gateways on them."""
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_server(tmp_path))
        sim = stack.enter_context(simulator("--tokens-per-second", "20", model="m"))
        yield stack.enter_context(gateways_on(config_text(redis_url, sim.url), tmp_path))



@contextlib.contextmanager
def gateways_on(text: str, tmp_path: Path) -> Iterator[Gateways]:
    """Two gateways on one configuration, one on uvloop, the other on trio."""
    with contextlib.ExitStack() as stack:
        gateways = []
        for worker in ("uvloop", "trio"):
            directory = tmp_path / worker
            directory.mkdir()
            gateways.append(stack.enter_context(
                gateway_process(text, directory, "--worker", worker)))
        yield gateways


async def post(client: httpx2.AsyncClient, url: str, max_tokens: int) -> int:
    response = await client.post(url + "/v1/chat/completions",
                                 json=chat("m", max_tokens=max_tokens), timeout=60)
    return response.status_code


def test_the_limits_hold_across_two_gateways_exactly(tmp_path: Path) -> None:
    with two_gateways(tmp_path) as gateways:
        statuses: list[int] = []

        async def main() -> None:
            async with httpx2.AsyncClient() as client, anyio.create_task_group() as tg:
                async def one(url: str) -> None:
                    statuses.append(await post(client, url, max_tokens=60))  # 3 s each

                for n in range(14):
                    tg.start_soon(one, gateways[n % 2][0])

        anyio.run(main)
        # 3 slots and 4 places in the queue, whichever gateway each request came to.
        assert sorted(statuses) == [200] * 7 + [429] * 7


def test_a_killed_gateways_slots_are_reclaimed_within_the_lease(tmp_path: Path) -> None:
    with two_gateways(tmp_path) as gateways:
        (first, proc), (second, _) = gateways
        waited: dict[str, float] = {}

        async def main() -> None:
            async with httpx2.AsyncClient() as client, anyio.create_task_group() as tg:
                async def holding() -> None:
                    with contextlib.suppress(httpx2.TransportError):  # its gateway is killed
                        await post(client, first, 600)

                for _ in range(3):  # the 3 slots, held by the first for 30 s
                    tg.start_soon(holding)
                await anyio.sleep(1.0)
                killed = 0.0

                async def queued() -> None:
                    assert await post(client, second, 2) == 200
                    waited["s"] = time.monotonic() - killed

                tg.start_soon(queued)
                await anyio.sleep(0.5)
                assert "s" not in waited  # queued behind the first's 3
                # The second's /metrics shows the whole gateway: the 3 the first holds too.
                scraped = (await client.get(second + "/metrics")).text
                assert 'gateway_in_flight{model="m"} 3.0' in scraped
                assert 'gateway_queue_depth{model="m"} 1.0' in scraped
                assert "gateway_cluster_members 2.0" in scraped
                os.kill(proc.pid, signal.SIGKILL)
                killed = time.monotonic()
                with anyio.fail_after(LEASE_S + 5):
                    while "s" not in waited:
                        await anyio.sleep(0.05)
                tg.cancel_scope.cancel()

        anyio.run(main)
        # Within the lease, and the one heartbeat of the other that sweeps it, and its tokens.
        assert waited["s"] <= LEASE_S + 2.0
        # The survivor, whose call reclaimed them, says so in its log.
        log = (tmp_path / "trio" / "gateway.log").read_text().splitlines()
        (told,) = [json.loads(line) for line in log if '"slots reclaimed"' in line]
        assert (told["slots"], told["places"]) == (3, 0)


def test_without_redis_a_request_gets_503_and_health_says_why(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack, simulator(model="m") as sim:
        redis = contextlib.ExitStack()
        redis_url = redis.enter_context(redis_server(tmp_path))
        url, _ = stack.enter_context(gateway_process(config_text(redis_url, sim.url), tmp_path))
        assert HTTP.post(url + "/v1/chat/completions", json=chat("m")).status_code == 200
        redis.close()
        answer = HTTP.post(url + "/v1/chat/completions", json=chat("m"))
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "state_unavailable"
        assert float(answer.headers["retry-after"]) >= 1
        health = HTTP.get(url + "/health")
        assert health.status_code == 503 and "shared state unavailable" in health.json()["reason"]
        with redis_server(tmp_path):  # back, empty
            wait_until(lambda: HTTP.post(url + "/v1/chat/completions",
                                         json=chat("m")).status_code == 200, timeout=10)
            assert HTTP.get(url + "/health").status_code == 200


def test_a_gateway_with_another_configuration_is_refused(tmp_path: Path) -> None:
    with redis_server(tmp_path) as redis_url, simulator(model="m") as sim:
        text = config_text(redis_url, sim.url)
        with gateway_process(text, tmp_path):
            other = tmp_path / "other.toml"
            other.write_text(text.replace("max_concurrent = 3", "max_concurrent = 4"))
            refused = subprocess.run(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", str(other),
                 "--bind", f"127.0.0.1:{free_port()}"],
                cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2
        assert refused.stderr.splitlines()[-1].startswith(
            'vllm-gateway: config error: models["m"].max_concurrent = 4 here, but 3 in the '
            "cluster 'vllm-gateway:default'")
