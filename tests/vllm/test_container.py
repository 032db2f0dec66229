"""The container launcher runs the same real vLLM in a Podman container: the test image's
Debian with this machine's Python, ``.venv-vllm`` and the tiny model mounted read-only, and
its ``/usr`` too (vLLM's CPU kernels need libnuma, and torch.compile a C++ compiler, which the
image lacks). The compile caches are this machine's, so the container compiles only what a
process-launched vLLM here has not (a cold compile takes over a minute on 2 cores)."""

from __future__ import annotations

import getpass
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.containers.conftest import ENGINE_URL, _engine_problem, containers_of
from tests.support import gateway_process, need

from .conftest import ADMIN_TOKEN, STARTUP_TIMEOUT, VLLM_ARGS, VLLM_ENV, VLLM_VENV, toml_config

pytestmark = [pytest.mark.vllm, pytest.mark.containers,
              pytest.mark.timeout(STARTUP_TIMEOUT + 60)]

BASE_IMAGE = "localhost/vllm-gateway-base:bookworm"  # scripts/build-images.sh, with the sim's


@pytest.fixture
def instance() -> Iterator[str]:
    need(_engine_problem())
    name = "vllm-test-" + uuid.uuid4().hex[:8]
    yield name
    for line in containers_of(name):
        subprocess.run(["podman", "rm", "-f", line.split()[0]], capture_output=True)


def test_a_real_vllm_in_a_container_serves_and_is_removed_at_shutdown(
        vllm_python: Path, tiny_model: Path, instance: str, tmp_path: Path) -> None:
    prefix = vllm_python.resolve().parent.parent  # the interpreter the venv was made with
    caches = [Path.home() / ".cache" / "vllm",
              Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"]
    for cache in caches:
        cache.mkdir(parents=True, exist_ok=True)
    model = {
        "name": "tiny", "launcher": "container", "engine": "local", "image": BASE_IMAGE,
        "args": [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server",
                 "--model", str(tiny_model), "--served-model-name", "tiny",
                 "--host", "0.0.0.0", "--port", "8000", *VLLM_ARGS],
        "volumes": [*(f"{path}:{path}:ro" for path in (VLLM_VENV, prefix, tiny_model, "/usr")),
                    *(f"{path}:{path}" for path in caches)],
        "env": VLLM_ENV, "shm_size": "1g", "startup_timeout": STARTUP_TIMEOUT,
    }
    config = toml_config([model], gateway={"instance": instance}, admin={"token": ADMIN_TOKEN},
                         **{"engines.local": {"url": ENGINE_URL}})
    with gateway_process(config, tmp_path) as (url, gateway):
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                            timeout=STARTUP_TIMEOUT)
        answer = api.chat.completions.create(model="tiny", max_tokens=3,
                                             messages=[{"role": "user", "content": "hi"}],
                                             extra_body={"ignore_eos": True})
        assert answer.usage is not None and answer.usage.completion_tokens == 3
        assert [line.split()[1] for line in containers_of(instance)] == ["running"]
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(timeout=60) == 0
    assert containers_of(instance) == []
