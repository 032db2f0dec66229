"""The gateway's image (./Containerfile, built by scripts/build-images.sh) run by Podman."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.launcher import free_port
from tests.support import HTTP, chat, wait_until

pytestmark = pytest.mark.containers

# A model the gateway starts as a process inside its own container: the simulator, which the
# image holds with the rest of the package.
CONFIG = """
[gateway]
max_concurrent = 4

[[models]]
name = "sim"
launcher = "process"
command = ["{python}", "-m", "simulator", "--port", "{port}", "--model", "{name}"]
startup_timeout = 20.0
"""
MOUNT = "/etc/vllm-gateway/config.toml"


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check,
                          timeout=60)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    path.chmod(0o644)  # the image's user, 10001, reads it
    return path


@pytest.fixture
def container(gateway_image: str, config_file: Path) -> Iterator[tuple[str, str]]:
    """The image run as the README runs it: the config mounted, port 8080 published."""
    name = "vllm-gateway-test-" + uuid.uuid4().hex[:8]
    port = free_port()
    podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8080",
           "-v", f"{config_file}:{MOUNT}:ro", gateway_image)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: HTTP.get(url + "/health").status_code == 200, timeout=30)
        yield name, url
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def test_a_request_through_the_containerised_gateway_reaches_its_model(
        container: tuple[str, str]) -> None:
    name, url = container
    response = HTTP.post(url + "/v1/chat/completions", json=chat("sim", max_tokens=3),
                         timeout=30)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "tok tok tok "
    assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
    # Tracing and shared state are in the image (the otel and cluster extras).
    imports = podman("exec", name, "python3", "-c", "import opentelemetry.sdk, coredis")
    assert imports.returncode == 0
    assert podman("healthcheck", "run", name, check=False).returncode == 0

    began = time.monotonic()
    podman("stop", "--time", "20", name)
    assert time.monotonic() - began < 5  # it handled SIGTERM, not killed after the timeout
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    assert state["ExitCode"] == 0


def test_variables_override_the_mounted_file(gateway_image: str, config_file: Path) -> None:
    result = podman("run", "--rm", "-v", f"{config_file}:{MOUNT}:ro",
                    "-e", "GATEWAY_MAX_QUEUE_SIZE=7", gateway_image, "check-config")
    effective = json.loads(result.stdout)
    assert effective["source"] == f"file {MOUNT}"
    assert effective["gateway"]["max_concurrent"] == 4
    assert effective["gateway"]["max_queue_size"] == 7
    assert effective["gateway"]["bind"] == "0.0.0.0:8080"


def test_the_health_check_fails_when_the_gateway_does_not_answer(gateway_image: str) -> None:
    name = "vllm-gateway-test-" + uuid.uuid4().hex[:8]
    podman("run", "-d", "--name", name, "--entrypoint", "sleep", gateway_image, "60")
    try:
        assert podman("healthcheck", "run", name, check=False).returncode != 0
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
