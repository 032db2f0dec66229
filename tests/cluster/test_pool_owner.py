"""Two ``vllm-gateway serve`` processes on one redis-server in front of a model the gateway
starts (a simulator, ``launcher = "process"``): one of them owns the pool and starts the one
server, the other routes to it; when the owner is stopped (SIGSTOP) past its lease, the other
takes the pool over, and the first, resumed, stops its server and routes to the new owner's;
when the owner is killed, the other takes the pool over within the lease and starts the model
again on the next request. One gateway runs on uvloop, the other on trio."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.cluster.test_gateways import LEASE_S, Gateways, cluster_table, gateways_on
from tests.support import HTTP, chat, redis_server, wait_until

TOKEN = "t0ken"
ADMIN = {"authorization": f"Bearer {TOKEN}"}


def config_text(redis_url: str) -> str:
    return cluster_table(redis_url) + f"""
[admin]
token = "{TOKEN}"

[[models]]
name = "m"
launcher = "process"
command = ["{{python}}", "-m", "simulator", "--port", "{{port}}", "--model", "{{name}}"]
startup_timeout = 20.0
max_concurrent = 3
"""


def model(url: str) -> dict[str, Any]:
    (entry,) = HTTP.get(url + "/admin/models", headers=ADMIN).json()["data"]
    return entry


@contextlib.contextmanager
def two_gateways(tmp_path: Path) -> Iterator[Gateways]:
    with redis_server(tmp_path) as redis_url, gateways_on(config_text(redis_url), tmp_path) as both:
        yield both


def cluster(url: str) -> dict[str, Any]:
    """The gateway's view of its cluster (its admin event stream's first snapshot)."""
    with HTTP.stream("GET", url + "/admin/events", headers=ADMIN) as events:
        for line in events.iter_lines():
            if line.startswith("data: "):
                return json.loads(line[6:])["cluster"]
    raise AssertionError("no snapshot")


def owns(url: str) -> bool:
    """Whether the gateway owns the pool."""
    return cluster(url)["owns_pool"]


def served(url: str) -> dict[str, Any]:
    """A request to the gateway at ``url`` answered 200; the model as it shows it then."""
    answer = HTTP.post(url + "/v1/chat/completions", json=chat("m"), timeout=30)
    assert answer.status_code == 200, answer.text
    return model(url)


def test_one_owner_drives_the_model_and_another_takes_over_when_it_stops_or_dies(
        tmp_path: Path) -> None:
    with two_gateways(tmp_path) as gateways:
        owners = [owns(url) for url, _ in gateways]
        assert sorted(owners) == [False, True]  # exactly one
        (first_url, first), (second_url, second) = (gateways[owners.index(True)],
                                                    gateways[owners.index(False)])
        # A request to the other starts the model in the owner, and is routed to it.
        seen = served(second_url)
        started = served(first_url)
        assert seen["state"] == started["state"] == "ready"
        assert seen["address"] == started["address"] and started["starts"] == 1
        # The owner is stopped (SIGSTOP) past its lease: the other owns the pool; resumed,
        # the first steps down and stops its server, and routes to the new owner's.
        first.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: owns(second_url), timeout=LEASE_S + 3)
        finally:
            first.send_signal(signal.SIGCONT)
        wait_until(lambda: model(first_url)["state"] == "stopped" and not owns(first_url))
        again = served(first_url)
        assert again["address"] == model(second_url)["address"] != started["address"]
        # The owner dies (kill -9), and its server with it (the leash): the first owns the
        # pool within the lease and starts the model again for the next request.
        os.kill(second.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: owns(first_url), timeout=LEASE_S + 3)
        assert time.monotonic() - killed <= LEASE_S + 1.5
        last = served(first_url)
        assert last["state"] == "ready" and last["address"] != again["address"]
