"""The real-vLLM tier: the CPU build of vLLM in ``.venv-vllm`` (``scripts/setup-vllm.sh``),
serving a tiny model made at test time (``scripts/make-tiny-model.py``), run only through the
gateway's own launchers.

Without the venv the tier skips, saying why; in CI (``VLLM_GATEWAY_TEST_REQUIRE_ENGINE=1`` or
``CI=true``) it fails instead. A vLLM takes about a minute to start on 2 cores: the tests that
can share one gateway and its server do (``served``, for the whole session).

Every vLLM a test starts carries ``VLLM_GATEWAY_TEST_RUN`` in its environment, inherited by
its engine and worker processes, so a test finds exactly the processes it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.support import ROOT, gateway_process

VLLM_VENV = ROOT / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
MAKE_TINY_MODEL = ROOT / "scripts" / "make-tiny-model.py"
MARKER = "VLLM_GATEWAY_TEST_RUN"
MAX_MODEL_LEN = 2048  # long enough for a generation that outlasts a test's observation
STARTUP_TIMEOUT = 300.0
ADMIN_TOKEN = "vllm-tier-admin"
# vLLM's flags for the tiny model on a CPU (docs in scripts/make-tiny-model.py).
VLLM_ARGS = ["--load-format", "dummy", "--max-model-len", str(MAX_MODEL_LEN),
             "--dtype", "bfloat16"]
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def _required() -> bool:
    return (os.environ.get("VLLM_GATEWAY_TEST_REQUIRE_ENGINE") == "1"
            or os.environ.get("CI") == "true")


def _vllm_problem() -> str | None:
    if not VLLM_PYTHON.is_file():
        return f"no vLLM venv at {VLLM_VENV}; run scripts/setup-vllm.sh"
    found = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm.entrypoints.openai.api_server"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        last = (found.stderr.strip().splitlines() or ["?"])[-1]
        return f"vLLM in {VLLM_VENV} does not import ({last}); run scripts/setup-vllm.sh"
    return None


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    problem = _vllm_problem()
    if problem:
        if _required():
            pytest.fail(problem)
        pytest.skip(problem)
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def tiny_model(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([str(vllm_python), str(MAKE_TINY_MODEL), str(directory)], check=True,
                   capture_output=True)
    return directory


def vllm_command(python: Path | str, model_dir: Path | str) -> list[str]:
    """The API server's command (the CPU package's ``vllm`` command does not run)."""
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "{name}", "--host", "127.0.0.1", "--port", "{port}", *VLLM_ARGS]


def toml_value(value: Any) -> str:
    """Strings, numbers, lists and tables of them, as TOML (JSON's strings are TOML's)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return json.dumps(value)


def toml_config(models: list[dict[str, Any]], **sections: dict[str, Any]) -> str:
    lines = []
    for name, table in sections.items():
        lines += [f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    for model in models:
        lines += ["[[models]]", *(f"{k} = {toml_value(v)}" for k, v in model.items())]
    return "\n".join(lines) + "\n"


@dataclass
class Served:
    """A ``vllm-gateway serve`` process whose model ``tiny`` is a real vLLM."""

    url: str
    process: subprocess.Popen
    marker: str

    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}

    def admin(self) -> dict[str, Any]:
        response = httpx2.get(self.url + "/admin/models", timeout=5, headers=self.auth)
        response.raise_for_status()
        return next(m for m in response.json()["data"] if m["name"] == "tiny")

    def backend(self) -> str:
        """vLLM's own address (the model must be ready)."""
        address = self.admin()["address"]
        assert address, self.admin()
        return address

    def engine_processes(self) -> list[str]:
        return engine_processes(self.marker)


def engine_processes(marker: str) -> list[str]:
    """``PID TITLE`` of every live process started with this marker in its environment."""
    found = []
    needle = f"{MARKER}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, not yet reaped by its parent
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        found.append(f"{entry.name} {title}")
    return found


def tiny_model_table(python: Path, model_dir: Path, marker: str,
                     **settings: Any) -> dict[str, Any]:
    """The [[models]] table of ``tiny``: a vLLM started by the process launcher."""
    return {"name": "tiny", "launcher": "process", "command": vllm_command(python, model_dir),
            "env": {**VLLM_ENV, MARKER: marker}, "startup_timeout": STARTUP_TIMEOUT,
            **settings}


@contextlib.contextmanager
def serving_vllm(python: Path, model_dir: Path, directory: Path,
                 **settings: Any) -> Iterator[Served]:
    """``vllm-gateway serve`` with ``tiny`` (not started: the first request starts it)."""
    marker = uuid.uuid4().hex
    config = toml_config([tiny_model_table(python, model_dir, marker, **settings)],
                         admin={"token": ADMIN_TOKEN})
    try:
        with gateway_process(config, directory) as (url, process):
            yield Served(url, process, marker)
    finally:
        # Whatever a failed test left: nothing it started may outlive it.
        for line in engine_processes(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)


@pytest.fixture(scope="session")
def served(vllm_python: Path, tiny_model: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One gateway and its vLLM for every test that can share them."""
    with serving_vllm(vllm_python, tiny_model, tmp_path_factory.mktemp("served"),
                      idle_timeout=3600.0) as served:
        yield served


def metric(address: str, name: str) -> float:
    """The value of one of vLLM's metrics (``vllm:NAME``, summed over its labels)."""
    text = httpx2.get(address + "/metrics", timeout=5).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(f"vllm:{name}{{")]
    assert values, f"vllm:{name} not in {address}/metrics"
    return sum(values)
