"""deploy/compose.cluster.yaml as the README runs it: Redis, two gateways in one ``[cluster]``
and nginx in front of both, with podman-compose. Requests through nginx reach both gateways, and
a burst gets exactly the limits of one gateway (7 answers, 7 x 429); with one gateway killed,
nginx's requests are served by the other; down leaves nothing."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator

import anyio
import httpx2
import pytest

from backends.launcher import free_port
from tests.support import HTTP, chat, wait_until

from .conftest import GATEWAY_IMAGE, SIM_IMAGE, image_problem, need
from .test_compose import Compose, compose_binary, containers

pytestmark = pytest.mark.containers

FILE = "deploy/compose.cluster.yaml"
INFRA_IMAGE = "localhost/vllm-gateway-infra:test"
GATEWAYS = ("gateway-1", "gateway-2")




def requests_seen(name: str) -> Counter[int]:
    """The statuses of the forwarded requests in a gateway container's access log."""
    out = subprocess.run(["podman", "logs", name], capture_output=True, text=True).stdout
    statuses: Counter[int] = Counter()
    for line in out.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "request" and entry.get("path") == "/v1/chat/completions":
                statuses[entry["status"]] += 1
    return statuses


@pytest.fixture
def compose() -> Iterator[Compose]:
    binary = compose_binary()
    need(image_problem(GATEWAY_IMAGE, SIM_IMAGE, INFRA_IMAGE)
         or (None if binary else "podman-compose missing; run scripts/bootstrap.sh"))
    assert binary is not None
    project = "vgcluster" + uuid.uuid4().hex[:8]
    env = {**os.environ, "GATEWAY_PORT": str(free_port()), "GATEWAY_INSTANCE": project}
    run = Compose(binary, project, env, file=FILE)
    try:
        yield run
    finally:
        run("down", "-t", "5")
        for name in containers(f"com.docker.compose.project={project}"):
            subprocess.run(["podman", "rm", "--force", name], capture_output=True)


def burst(url: str, n: int) -> list[int]:
    statuses: list[int] = []

    async def main() -> None:
        async with httpx2.AsyncClient(timeout=60) as client, anyio.create_task_group() as tg:
            async def one() -> None:
                response = await client.post(url + "/v1/chat/completions",
                                             json=chat("sim", max_tokens=100))  # 2 s each
                statuses.append(response.status_code)

            for _ in range(n):
                tg.start_soon(one)

    anyio.run(main)
    return sorted(statuses)


def test_two_gateways_behind_nginx_hold_the_limits_together_and_survive_one(
        compose: Compose) -> None:
    up = compose("up", "-d")
    assert up.returncode == 0, up.stderr
    project = compose.project
    names = {service: f"{project}_{service}_1" for service in GATEWAYS}
    url = f"http://127.0.0.1:{compose.env['GATEWAY_PORT']}"

    def serving(name: str) -> bool:
        logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
        return "Running on" in logs.stdout + logs.stderr

    try:
        wait_until(lambda: all(serving(name) for name in names.values()), timeout=60)
        wait_until(lambda: HTTP.get(url + "/health").status_code == 200, timeout=10)
    except AssertionError:
        raise AssertionError(compose("logs").stdout[-5000:]) from None

    # 14 at once, through nginx to both gateways: 3 slots and 4 places in the queue, shared.
    assert burst(url, 14) == [200] * 7 + [429] * 7
    seen = {service: requests_seen(name) for service, name in names.items()}
    assert all(sum(statuses.values()) > 0 for statuses in seen.values()), seen
    assert sum(seen.values(), Counter()) == Counter({200: 7, 429: 7})

    # One gateway killed: nginx's requests are served by the other.
    subprocess.run(["podman", "kill", names["gateway-1"]], capture_output=True, check=True)
    for _ in range(6):
        answer = HTTP.post(url + "/v1/chat/completions", json=chat("sim"), timeout=30)
        assert answer.status_code == 200, answer.text

    down = compose("down", "-t", "5")
    assert down.returncode == 0, down.stderr
    assert containers(f"com.docker.compose.project={project}") == []
    assert subprocess.run(["podman", "network", "exists", f"{project}_default"]).returncode != 0
