"""`hypercorn --config deploy/hypercorn.toml proxy.asgi:app`, as the README shows it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Any

from kernel.config import GatewaySettings
from tests.support import HTTP, ROOT, chat

from .conftest import processes_with, stop

HYPERCORN_TOML = ROOT / "deploy" / "hypercorn.toml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def sim_config(model: str) -> str:
    return f"""
[[models]]
name = "{model}"
launcher = "process"
command = ["{{python}}", "-m", "simulator", "--port", "{{port}}", "--model", "{{name}}"]
startup_timeout = 20.0
"""


def test_idle_connections_outlast_nginx_keepalive() -> None:
    nginx = re.search(r"^\s*keepalive_timeout (\d+)s;", NGINX_CONF.read_text(), re.MULTILINE)
    assert nginx is not None
    assert tomllib.loads(HYPERCORN_TOML.read_text())["keep_alive_timeout"] > int(nginx[1])
    assert GatewaySettings().keep_alive_timeout > int(nginx[1])


def test_hypercorn_serves_the_gateway_and_stops_its_models_on_sigterm(
        hypercorn_cli: Any) -> None:
    model = "hc-" + uuid.uuid4().hex[:8]
    url, proc = hypercorn_cli(sim_config(model), "--config", str(HYPERCORN_TOML),
                              "proxy.asgi:app")
    response = HTTP.post(url + "/v1/chat/completions", json=chat(model, max_tokens=3))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "tok tok tok "
    [sim] = processes_with(f"--model {model}")
    # The gateway runs in hypercorn's process (no worker fork), the server under its leash.
    assert parent_of(parent_of(sim)) == proc.pid

    assert stop(proc, timeout=10) == 0
    assert processes_with(f"--model {model}") == []


def test_a_bad_configuration_stops_hypercorn_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(sim_config("m"))
    result = subprocess.run(
        [sys.executable, "-m", "hypercorn", "--config", str(HYPERCORN_TOML), "--bind",
         "127.0.0.1:0", "proxy.asgi:app"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
        env={**os.environ, "GATEWAY_CONFIG": str(config), "GATEWAY_MAX_CONCURRENT": "0"})
    assert result.returncode == 2
    assert ("vllm-gateway: config error: gateway.max_concurrent = 0 (from environment variable "
            "GATEWAY_MAX_CONCURRENT)") in result.stderr
    assert "Traceback" not in result.stderr
