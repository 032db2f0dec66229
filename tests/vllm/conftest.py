"""The real-vLLM tier: the CPU build of vLLM in ``.venv-vllm`` (``scripts/setup-vllm.sh``),
serving a tiny model made at test time (``scripts/make-tiny-model.py``), run only through the
gateway's own launchers.

Without the venv the tier skips, saying why; in CI (``VLLM_GATEWAY_TEST_REQUIRE_ENGINE=1`` or
``CI=true``) it fails instead. A vLLM takes about a minute to start on 2 cores: the tests that
can share one gateway and its server do (``served``, for the whole session); that server also
loads LoRA adapters at run time (``LORA_ARGS``; ``tiny_loras`` makes two with
``scripts/make-tiny-lora.py``), and a test that loads one leaves it unloaded.

Every vLLM a test starts carries ``VLLM_GATEWAY_TEST_RUN`` in its environment, so a test finds
exactly the processes it started (``engine_processes``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx2
import pytest

from tests.otlp import Receiver, http_receiver
from tests.support import ROOT, gateway_process, need

T = TypeVar("T")
VLLM_VENV = ROOT / ".venv-vllm"
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
MAKE_TINY_MODEL = ROOT / "scripts" / "make-tiny-model.py"
MAKE_TINY_LORA = ROOT / "scripts" / "make-tiny-lora.py"
MARKER = "VLLM_GATEWAY_TEST_RUN"
# A generation of 8,128 tokens of the tiny model took a minute on a busy 2-core machine (load 8)
# and takes seconds on an idle one: it outlasts a test's look at it.
MAX_MODEL_LEN = 8192
STARTUP_TIMEOUT = 300.0
ADMIN_TOKEN = "vllm-tier-admin"
LONG_IDLE = 3600.0  # seconds: the shared gateways' models are not idle-stopped
# vLLM's flags for the tiny model on a CPU (docs in scripts/make-tiny-model.py).
VLLM_ARGS = ["--load-format", "dummy", "--max-model-len", str(MAX_MODEL_LEN),
             "--dtype", "bfloat16"]
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
# vLLM's spans (``--otlp-traces-endpoint``) leave in batches after 0.2 s, not the SDK's 5.
QUICK_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "200"}
# The shared server (``served``) also serves LoRA adapters loaded at run time, one at a time
# (the rank of make-tiny-lora.py's adapters).
LORA_ARGS = ["--enable-lora", "--max-loras", "1", "--max-lora-rank", "8"]
LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


# The shared server's cold start: first in the tier, so that it is that server's only start
# (run later, it unloads the server an earlier test started, and starts it again: a minute).
COLD_START = "test_serve.py::test_first_request_starts_vllm_and_waits_for_it"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = next((i for i, item in enumerate(items) if "tests/vllm/" in item.nodeid), None)
    cold = next((i for i, item in enumerate(items) if item.nodeid.endswith(COLD_START)), None)
    if first is not None and cold is not None:
        items.insert(first, items.pop(cold))


def required() -> bool:
    """Whether a run must have the tier (CI), not skip it."""
    return (os.environ.get("VLLM_GATEWAY_TEST_REQUIRE_ENGINE") == "1"
            or os.environ.get("CI") == "true")


def venv_problem() -> str | None:
    """Why there is no vLLM venv to run, or None."""
    if not VLLM_PYTHON.is_file():
        return f"no vLLM venv at {VLLM_VENV}; run scripts/setup-vllm.sh"
    return None


def _vllm_problem() -> str | None:
    if problem := venv_problem():
        return problem
    found = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm.entrypoints.openai.api_server"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        last = (found.stderr.strip().splitlines() or ["?"])[-1]
        return f"vLLM in {VLLM_VENV} does not import ({last}); run scripts/setup-vllm.sh"
    return None


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    need(_vllm_problem(), required=required())
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def tiny_model(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([str(vllm_python), str(MAKE_TINY_MODEL), str(directory)], check=True,
                   capture_output=True)
    return directory


@pytest.fixture(scope="session")
def tiny_loras(vllm_python: Path, tiny_model: Path,
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters for the tiny model (``scripts/make-tiny-lora.py``, seeds 1 and 2)."""
    directory = tmp_path_factory.mktemp("tiny-loras")
    made = {name: directory / name for name in ("tiny-lora-1", "tiny-lora-2")}
    subprocess.run([str(vllm_python), str(MAKE_TINY_LORA), str(tiny_model),
                    *map(str, made.values())], check=True, capture_output=True)
    return made


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
    config: Path  # the file it serves (``POST /admin/reload`` reads it again)
    # What vLLM's /health gave while it loaded (``watch_load``): "refused" or a status.
    health_during_load: list[str | int] | None = None

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


def watch_load(served: Served, start: Callable[[], T]) -> T:
    """Run ``start`` (which makes the gateway start vLLM), and meanwhile ask vLLM's own
    ``/health`` (once the gateway knows its address) until it answers 200."""
    outcomes: list[str | int] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = pool.submit(start)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while outcomes[-1:] != [200] and time.monotonic() < deadline:
            address = served.admin()["address"]
            if address is not None:
                try:
                    outcomes.append(httpx2.get(address + "/health", timeout=2).status_code)
                except httpx2.ConnectError:
                    outcomes.append("refused")
            elif started.done():
                break
            time.sleep(0.1)
        result = started.result()
    served.health_during_load = outcomes
    return result


def load_health(served: Served) -> list[str | int]:
    """What vLLM's ``/health`` gave during a load (the cold start's, or a new one's)."""
    if served.health_during_load is None:
        httpx2.post(served.url + "/admin/models/tiny/unload", headers=served.auth, timeout=60)
        watch_load(served, lambda: httpx2.post(served.url + "/admin/models/tiny/load",
                                               headers=served.auth, timeout=STARTUP_TIMEOUT))
    assert served.health_during_load is not None
    return served.health_during_load


# The sessions of the vLLMs seen so far, by marker. vLLM retitles its engine and worker
# (setproctitle), which overwrites their environment; they are found by the session the
# launcher gave the server, which they keep even once the server is gone.
_SESSIONS: dict[str, set[int]] = {}


def engine_processes(marker: str) -> list[str]:
    """``PID TITLE`` of every live process of the vLLMs started with this marker."""
    needle = f"{MARKER}={marker}".encode()
    sessions = _SESSIONS.setdefault(marker, set())
    live = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # After the command's name: state, parent, process group, session, ...
            state, _, _, session = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            if state == "Z":
                continue  # exited, not yet reaped by its parent
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                sessions.add(int(session))
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        live.append((entry.name, int(session), title))
    return [f"{pid} {title}" for pid, session, title in live if session in sessions]


def tiny_model_table(python: Path, model_dir: Path, marker: str,
                     **settings: Any) -> dict[str, Any]:
    """The [[models]] table of ``tiny``: a vLLM started by the process launcher."""
    return {"name": "tiny", "launcher": "process", "command": vllm_command(python, model_dir),
            "env": {**VLLM_ENV, MARKER: marker}, "startup_timeout": STARTUP_TIMEOUT,
            **settings}


@pytest.fixture(scope="session")
def vllm_traces() -> Iterator[Receiver]:
    """Where the shared vLLM sends its spans (tests/vllm/test_tracing.py reads them)."""
    with http_receiver() as receiver:
        yield receiver


def with_traces(model: dict[str, Any], receiver: Receiver) -> dict[str, Any]:
    """The ``tiny`` table with vLLM tracing every request into the receiver."""
    return {**model, "command": [*model["command"], "--otlp-traces-endpoint",
                                 receiver.url + "/v1/traces"],
            "env": {**model["env"], **QUICK_EXPORT, "OTEL_SERVICE_NAME": "vllm",
                    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}}


@contextlib.contextmanager
def serving_vllm(python: Path, model_dir: Path, directory: Path, *,
                 marker: str | None = None, traces: Receiver | None = None,
                 **settings: Any) -> Iterator[Served]:
    """``vllm-gateway serve`` with ``tiny`` (not started: the first request starts it), vLLM's
    spans sent to ``traces`` where given."""
    marker = marker or uuid.uuid4().hex
    model = tiny_model_table(python, model_dir, marker, **settings)
    config = toml_config([with_traces(model, traces) if traces else model],
                         admin={"token": ADMIN_TOKEN})
    try:
        with gateway_process(config, directory) as (url, process):
            yield Served(url, process, marker, directory / "gateway.toml")
    finally:
        # Whatever a failed test left: nothing it started may outlive it.
        for line in engine_processes(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)


def long_lived_gateway(scope: Literal["session", "module"], name: str, *,
                       traced: bool = False, lora: bool = False) -> Any:
    """A fixture: a gateway (never idle-stopped) for the tests of that scope to share; with
    ``traced``, its vLLM sends its spans to ``vllm_traces``; with ``lora``, it loads LoRA
    adapters at run time (LORA_ARGS, LORA_ENV)."""
    @pytest.fixture(scope=scope, name=name)
    def gateway(request: pytest.FixtureRequest, vllm_python: Path, tiny_model: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
        traces = request.getfixturevalue("vllm_traces") if traced else None
        marker = uuid.uuid4().hex
        settings: dict[str, Any] = {"idle_timeout": LONG_IDLE}
        if lora:
            settings["command"] = [*vllm_command(vllm_python, tiny_model), *LORA_ARGS]
            settings["env"] = {**VLLM_ENV, **LORA_ENV, MARKER: marker}
        with serving_vllm(vllm_python, tiny_model, tmp_path_factory.mktemp(name),
                          marker=marker, traces=traces, **settings) as served:
            yield served
    return gateway


# One gateway and its vLLM for every test that can share them; vLLM traces every request and
# loads LoRA adapters at run time.
served = long_lived_gateway("session", "served", traced=True, lora=True)


def metric(address: str, name: str) -> float:
    """The value of one of vLLM's metrics (``vllm:NAME``, summed over its labels)."""
    text = httpx2.get(address + "/metrics", timeout=5).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(f"vllm:{name}{{")]
    assert values, f"vllm:{name} not in {address}/metrics"
    return sum(values)
