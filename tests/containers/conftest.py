"""Container tests need a Docker-compatible API (Podman's, started by scripts/setup-podman.sh)
and the simulator image (scripts/build-images.sh). Where there is none they skip, saying why;
with VLLM_GATEWAY_TEST_REQUIRE_ENGINE=1 (CI) they fail instead."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator

import httpx2
import pytest

from tests.support import need

ENGINE_URL = os.environ.get("VLLM_GATEWAY_TEST_ENGINE", "unix:///run/podman/podman.sock")
SIM_IMAGE = "localhost/vllm-gateway-sim:test"


def _engine() -> httpx2.Client:
    transport = httpx2.HTTPTransport(uds=ENGINE_URL.removeprefix("unix://"))
    return httpx2.Client(transport=transport, base_url="http://engine", timeout=10)


def _engine_problem() -> str | None:
    try:
        with _engine() as client:
            client.get("/_ping").raise_for_status()
            images = client.get("/images/json").json()
    except (httpx2.HTTPError, OSError) as exc:
        return f"no container engine at {ENGINE_URL} ({exc}); run scripts/setup-podman.sh"
    tags = {tag for image in images for tag in image.get("RepoTags") or []}
    if SIM_IMAGE not in tags:
        return f"image {SIM_IMAGE} missing; run scripts/build-images.sh"
    return None


@pytest.fixture(scope="session")
def engine_url() -> str:
    need(_engine_problem())
    return ENGINE_URL


def containers_of(instance: str, label: str = "vllm-gateway.instance") -> list[str]:
    """``NAME STATE`` of each container carrying this gateway instance's label (or another
    label with that value)."""
    filters = json.dumps({"label": [f"{label}={instance}"]})
    with _engine() as client:
        found = client.get("/containers/json", params={"all": "1", "filters": filters}).json()
    return sorted(f"{c['Names'][0].lstrip('/')} {c['State']}" for c in found)


@pytest.fixture
def instance() -> Iterator[str]:
    """A gateway instance name of the test's own; its containers are removed afterwards."""
    name = "test-" + uuid.uuid4().hex[:8]
    yield name
    for line in containers_of(name):
        subprocess.run(["podman", "rm", "-f", line.split()[0]], capture_output=True)
