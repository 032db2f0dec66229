"""Container tests need a Docker-compatible API (Podman's, started by scripts/setup-podman.sh)
and the simulator image (scripts/build-images.sh). Where there is none they skip, saying why;
with VLLM_GATEWAY_TEST_REQUIRE_ENGINE=1 (CI) they fail instead."""

from __future__ import annotations

import os
import subprocess

import httpx2
import pytest

ENGINE_URL = os.environ.get("VLLM_GATEWAY_TEST_ENGINE", "unix:///run/podman/podman.sock")
SIM_IMAGE = "localhost/vllm-gateway-sim:test"


def _engine_problem() -> str | None:
    path = ENGINE_URL.removeprefix("unix://")
    try:
        transport = httpx2.HTTPTransport(uds=path)
        with httpx2.Client(transport=transport, timeout=5) as client:
            client.get("http://engine/_ping").raise_for_status()
            images = client.get("http://engine/images/json").json()
    except (httpx2.HTTPError, OSError) as exc:
        return f"no container engine at {ENGINE_URL} ({exc}); run scripts/setup-podman.sh"
    tags = {tag for image in images for tag in image.get("RepoTags") or []}
    if SIM_IMAGE not in tags:
        return f"image {SIM_IMAGE} missing; run scripts/build-images.sh"
    return None


@pytest.fixture(scope="session")
def engine_url() -> str:
    problem = _engine_problem()
    if problem:
        if os.environ.get("VLLM_GATEWAY_TEST_REQUIRE_ENGINE") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    return ENGINE_URL


def containers_of(instance: str) -> list[str]:
    """Names of the containers carrying this gateway instance's label, as Podman lists them."""
    out = subprocess.run(
        ["podman", "ps", "-a", "--filter", f"label=vllm-gateway.instance={instance}",
         "--format", "{{.Names}} {{.State}}"],
        capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line]
