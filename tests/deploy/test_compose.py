"""podman-compose.yml as the README runs it: up, a request to a model container the gateway
starts through the host's Podman, down, and nothing left running."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.launcher import free_port
from tests.support import HTTP, ROOT, chat, wait_until

from .conftest import ENGINE_SOCKET, GATEWAY_IMAGE, SIM_IMAGE, image_problem, need

pytestmark = pytest.mark.containers


def compose_binary() -> str | None:
    beside = Path(sys.executable).parent / "podman-compose"  # the venv's, from the test extras
    return str(beside) if beside.exists() else shutil.which("podman-compose")


def containers(label: str, *, running: bool = False) -> list[str]:
    """Names of the containers (all, or the running ones) that carry the label."""
    out = subprocess.run(["podman", "ps", *([] if running else ["--all"]), "--filter",
                          f"label={label}", "--format", "{{.Names}}"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


class Compose:
    def __init__(self, binary: str, project: str, env: dict[str, str],
                 file: str | None = None) -> None:
        self.binary, self.project, self.env = binary, project, env
        self.files = ["-f", file] if file else []

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.binary, "-p", self.project, *self.files, *args], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def compose() -> Iterator[Compose]:
    binary = compose_binary()
    need(image_problem(GATEWAY_IMAGE, SIM_IMAGE)
         or (None if binary else "podman-compose missing; run scripts/bootstrap.sh")
         or (None if os.path.exists(ENGINE_SOCKET)
             else f"no Podman socket at {ENGINE_SOCKET}; run scripts/setup-podman.sh"))
    assert binary is not None
    project = "vgtest" + uuid.uuid4().hex[:8]
    env = {**os.environ, "GATEWAY_BIND": f"127.0.0.1:{free_port()}",
           "GATEWAY_INSTANCE": project, "PODMAN_SOCKET": ENGINE_SOCKET}
    run = Compose(binary, project, env)
    try:
        yield run
    finally:
        run("down")
        for name in containers(f"vllm-gateway.instance={project}"):
            subprocess.run(["podman", "rm", "--force", name], capture_output=True)


def test_compose_up_serves_a_model_container_and_down_leaves_nothing(compose: Compose) -> None:
    up = compose("up", "-d")
    assert up.returncode == 0, up.stderr
    url = "http://" + compose.env["GATEWAY_BIND"]
    try:
        wait_until(lambda: HTTP.get(url + "/health").status_code == 200, timeout=30)
    except AssertionError:
        raise AssertionError(compose("logs").stdout) from None

    response = HTTP.post(url + "/v1/chat/completions", json=chat("sim", max_tokens=3),
                         timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "tok tok tok "
    model_containers = f"vllm-gateway.instance={compose.project}"
    assert containers(model_containers, running=True) == [f"vllm-gateway-{compose.project}-sim"]

    down = compose("down")
    assert down.returncode == 0, down.stderr
    assert containers(model_containers) == []  # the gateway stopped what it started
    assert containers(f"com.docker.compose.project={compose.project}") == []
