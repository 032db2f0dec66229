"""examples/mounted_app.py: the gateway mounted at /llm in a Starlette application, served by
hypercorn's command line as the README shows it."""

from __future__ import annotations

import json
import time
import uuid
from itertools import pairwise
from pathlib import Path
from typing import Any

from tests.support import HTTP, ROOT, chat

from .conftest import processes_with, stop


def test_mounted_gateway_serves_under_its_prefix_and_lives_in_the_host_lifespan(
        hypercorn_cli: Any, tmp_path: Path) -> None:
    model = "mounted-" + uuid.uuid4().hex[:8]
    url, proc = hypercorn_cli(f"""
[[models]]
name = "{model}"
launcher = "process"
command = ["{{python}}", "-m", "simulator", "--port", "{{port}}", "--model", "{{name}}",
           "--tokens-per-second", "20"]
startup_timeout = 20.0
""", "--config", str(ROOT / "deploy" / "hypercorn.toml"), "examples.mounted_app:create_app()")

    assert HTTP.get(url + "/").json() == {"openai_base_url": url + "/llm/v1"}
    models = HTTP.get(url + "/llm/v1/models").json()
    assert [m["id"] for m in models["data"]] == [model]
    assert HTTP.get(url + "/v1/models").status_code == 404  # only under the mount

    arrivals = []
    with HTTP.stream("POST", url + "/llm/v1/chat/completions",
                     json=chat(model, max_tokens=8, stream=True), timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    arrivals.append(time.monotonic())
    # 8 tokens at 20 per second: they come one by one, about 50 ms apart, not all at the end.
    assert len(arrivals) == 8
    assert sum(later - earlier > 0.02 for earlier, later in pairwise(arrivals)) >= 5
    assert len(processes_with(f"--model {model}")) == 1

    # The host's lifespan shutdown leaves Gateway.running(): the model's server is stopped.
    assert stop(proc, timeout=10) == 0
    assert processes_with(f"--model {model}") == []
    # Logged as `vllm-gateway serve` logs (not a terminal: JSON lines), configuration first.
    logged = [json.loads(line) for line in (tmp_path / "hypercorn.log").read_text().splitlines()
              if line.startswith("{")]
    assert logged[0]["event"] == "effective configuration"
    assert [m["name"] for m in logged[0]["config"]["models"]] == [model]
    assert "model stopped" in [line["event"] for line in logged]
