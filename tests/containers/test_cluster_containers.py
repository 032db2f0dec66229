"""Container models in a ``[cluster]``: three real gateway processes on one redis-server and a
real Podman. The pool's owner starts the model's container; an owner that steps down alive
(stopped past its lease, then resumed) leaves it running, and the new owner adopts it by its
labels; so does a survivor of an owner killed with kill -9, serving within seconds; an owner
stopped with SIGTERM while other members run hands the container over; the last member stopped
removes it. One container all along, never started twice."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.test_gateways import LEASE_S, cluster_table
from tests.cluster.test_pool_owner import ADMIN, TOKEN, cluster, owns
from tests.support import HTTP, chat, gateway_processes, redis_server, wait_until

from .conftest import SIM_IMAGE, containers_of

pytestmark = pytest.mark.containers


def config_text(redis_url: str, engine_url: str, prefix: str) -> str:
    return cluster_table(redis_url) + f"""key_prefix = "{prefix}"

[admin]
token = "{TOKEN}"

[engines.local]
url = "{engine_url}"
stop_timeout = 5.0

[[models]]
name = "sim"
launcher = "container"
engine = "local"
image = "{SIM_IMAGE}"
args = ["--host", "0.0.0.0", "--port", "8000", "--model", "sim"]
startup_timeout = 30.0
"""


def containers(prefix: str) -> list[str]:
    """``ID STATE`` of each container of the cluster, found by its label."""
    out = subprocess.run(["podman", "ps", "--all", "--filter", f"label=vllm-gateway.cluster="
                          f"{prefix}", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(f"{c['Id'][:12]} {c['State']}" for c in json.loads(out or "[]"))


def served(url: str) -> str:
    """A request through the gateway at ``url`` answered 200; the model's address there."""
    answer = HTTP.post(url + "/v1/chat/completions", json=chat("sim"), timeout=30)
    assert answer.status_code == 200, answer.text
    (entry,) = HTTP.get(url + "/admin/models", headers=ADMIN).json()["data"]
    return entry["address"]


def adopted(log: Path, container: str) -> bool:
    """Whether the gateway adopted the container and serves from it (its log says)."""
    events = [json.loads(line) for line in log.read_text().splitlines()
              if line.startswith("{") and line.endswith("}")]
    found = [i for i, e in enumerate(events)
             if e["event"] == "adopting container" and container.startswith(e["container"])]
    return bool(found) and any(e["event"] == "model ready" for e in events[found[-1]:])


@pytest.fixture
def prefix() -> Iterator[str]:
    """The cluster's key prefix, of the test's own; its containers are removed afterwards."""
    name = f"vllm-gateway-test:{os.urandom(4).hex()}"
    yield name
    for line in containers_of(name, "vllm-gateway.cluster"):
        subprocess.run(["podman", "rm", "-f", line.split()[0]], capture_output=True)


def test_a_new_owner_adopts_the_container_and_nothing_runs_twice(
        engine_url: str, prefix: str, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_server(tmp_path))
        text = config_text(redis_url, engine_url, prefix)
        runs = [(tmp_path / name, ("--worker", worker))
                for name, worker in (("a", "uvloop"), ("b", "asyncio"), ("c", "asyncio"))]
        for directory, _ in runs:
            directory.mkdir()
        started = stack.enter_context(gateway_processes(text, runs))
        # url -> (process, log)
        members = {url: (proc, directory / "gateway.log")
                   for (url, proc), (directory, _) in zip(started, runs, strict=True)}

        def owner(*among: str) -> str:
            (url,) = [url for url in among or members if owns(url)]
            return url

        first = owner()
        # Asked through another, the owner starts the one container, labelled for the cluster.
        address = served(next(url for url in members if url != first))
        (container,) = containers(prefix)
        assert container.endswith(" running")
        inspect = subprocess.run(["podman", "inspect", container.split()[0]],
                                 capture_output=True, text=True, check=True).stdout
        labels = json.loads(inspect)[0]["Config"]["Labels"]
        assert labels["vllm-gateway.cluster"] == prefix and labels["vllm-gateway.model"] == "sim"

        # The owner stopped past its lease: another owns the pool and adopts the container;
        # the first, resumed, steps down and leaves it running (it routes to the new owner's).
        members[first][0].send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: any(owns(url) for url in members if url != first),
                       timeout=LEASE_S + 3)
            second = owner(*(url for url in members if url != first))
            wait_until(lambda: adopted(members[second][1], container))
        finally:
            members[first][0].send_signal(signal.SIGCONT)
        wait_until(lambda: not owns(first))
        assert served(first) == served(second) == address
        assert containers(prefix) == [container]

        # The new owner killed (kill -9): a survivor owns the pool within the lease, adopts
        # the container and serves, within 10 s of the kill.
        proc, _ = members.pop(second)
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: any(owns(url) for url in members), timeout=LEASE_S + 3)
        third = owner()
        wait_until(lambda: adopted(members[third][1], container))
        assert served(third) == address
        assert time.monotonic() - killed <= 10
        assert containers(prefix) == [container]

        # The owner stopped (SIGTERM) while another member runs hands the container over.
        proc, _ = members.pop(third)
        (last,) = members
        wait_until(lambda: len(cluster(third)["members"]) == 2)  # the killed one is gone
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        wait_until(lambda: owns(last) and adopted(members[last][1], container))
        assert served(last) == address
        assert containers(prefix) == [container]
        # The last member stopped: nothing is left.
    assert containers(prefix) == []
