"""Deployment tests run the real tools: Podman (the gateway's image, podman-compose), nginx and
hypercorn's command line. Where a tool or an image is missing they skip, saying how to get it;
with VLLM_GATEWAY_TEST_REQUIRE_ENGINE=1 (CI) they fail instead. scripts/test.sh sets them up
(as root: scripts/setup-system.sh, scripts/setup-podman.sh, scripts/build-images.sh)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.launcher import free_port
from tests.support import HTTP, ROOT, need, wait_until

GATEWAY_IMAGE = "localhost/vllm-gateway:latest"
SIM_IMAGE = "localhost/vllm-gateway-sim:test"
ENGINE_SOCKET = os.environ.get("VLLM_GATEWAY_TEST_ENGINE",
                               "unix:///run/podman/podman.sock").removeprefix("unix://")


def image_problem(*images: str) -> str | None:
    if shutil.which("podman") is None:
        return "podman missing; run scripts/setup-podman.sh (as root)"
    for image in images:
        if subprocess.run(["podman", "image", "exists", image]).returncode != 0:
            return f"image {image} missing; run scripts/build-images.sh (as root)"
    return None


@pytest.fixture(scope="session")
def gateway_image() -> str:
    need(image_problem(GATEWAY_IMAGE))
    return GATEWAY_IMAGE


def stop(proc: subprocess.Popen[Any], timeout: float = 15) -> int:
    """SIGTERM, wait, and SIGKILL only if it did not go in time; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def processes_with(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (a model's server, not the leash
    that the process launcher runs it under)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z" and "backends/leash.py" not in cmdline:
            pids.append(int(entry.name))
    return pids


def access_log(path: Path, request_id: str) -> dict[str, Any] | None:
    """The gateway's access line (JSON) for one request, once it is written whole."""
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:  # the last line, still being written
                continue
            if entry.get("event") == "request" and entry.get("request_id") == request_id:
                return entry
    return None


@pytest.fixture
def hypercorn_cli(tmp_path: Path) -> Iterator[Any]:
    """Starts ``hypercorn ARGS`` (the real command line) on a free port with GATEWAY_CONFIG set;
    yields its URL and process. Stopped with SIGTERM at the end."""
    procs: list[subprocess.Popen[Any]] = []

    def start(config_text: str, *args: str) -> tuple[str, subprocess.Popen[Any]]:
        config = tmp_path / "gateway.toml"
        config.write_text(config_text)
        port = free_port()
        log = open(tmp_path / "hypercorn.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "hypercorn", *args, "--bind", f"127.0.0.1:{port}"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "GATEWAY_CONFIG": str(config)})
        log.close()
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: proc.poll() is not None or HTTP.get(url + "/").status_code > 0,
                   timeout=20)
        assert proc.poll() is None, (tmp_path / "hypercorn.log").read_text()
        return url, proc

    yield start
    for proc in procs:
        stop(proc)
