"""LoRA adapters on a real vLLM, through a gateway: the tier's shared server runs with
``--enable-lora --max-loras 1`` (``conftest.LORA_ARGS``), and a gateway of its own stands in
front of it as a static model with two adapters made by ``scripts/make-tiny-lora.py``. Each is
loaded on demand, the other unloaded at ``max_loras = 1``, and each answers otherwise than the
base model to the same greedy, seeded request. The shared server is left holding no adapter."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.support import gateway_process

from .conftest import STARTUP_TIMEOUT, Served, toml_config

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(STARTUP_TIMEOUT + 120)]


def loaded(vllm: str) -> list[str]:
    """The adapters vLLM lists now (with their parent)."""
    listed = httpx2.get(vllm + "/v1/models", timeout=10).json()["data"]
    assert all(m["parent"] == "tiny" for m in listed if m["id"] != "tiny"), listed
    return [m["id"] for m in listed if m["id"] != "tiny"]


def test_adapters_load_on_demand_swap_at_max_loras_and_answer_otherwise(
        served: Served, tiny_loras: dict[str, Path], tmp_path: Path) -> None:
    httpx2.post(served.url + "/admin/models/tiny/load", headers=served.auth,
                timeout=STARTUP_TIMEOUT)
    vllm = served.backend()
    one, two = tiny_loras
    config = toml_config([{"name": "tiny", "launcher": "static", "url": vllm, "max_loras": 1,
                           "adapters": [{"name": name, "path": str(path)}
                                        for name, path in tiny_loras.items()]}])
    try:
        with gateway_process(config, tmp_path) as (url, _):
            def ask(model: str) -> Any:
                answer = httpx2.post(url + "/v1/chat/completions", timeout=300, json={
                    "model": model, "messages": [{"role": "user", "content": "hello world"}],
                    "max_tokens": 8, "temperature": 0, "seed": 7})
                assert answer.status_code == 200, answer.text
                assert answer.json()["model"] == model
                return answer.json()["choices"][0]["message"]["content"]

            listed = httpx2.get(url + "/v1/models", timeout=10).json()["data"]
            assert [(m["id"], m.get("parent")) for m in listed] == [
                ("tiny", None), (one, "tiny"), (two, "tiny")]
            base = ask("tiny")
            first = ask(one)
            assert loaded(vllm) == [one]
            second = ask(two)
            assert loaded(vllm) == [two]  # the gateway unloaded the first at max_loras = 1
            assert len({base, first, second}) == 3, (base, first, second)
            assert ask(one) == first
            assert loaded(vllm) == [one]
            metrics = httpx2.get(url + "/metrics", timeout=10).text
            assert f'gateway_adapter_loads_total{{adapter="{one}",model="tiny"}} 2.0' in metrics
            assert f'gateway_adapter_unloads_total{{adapter="{one}",model="tiny"}} 1.0' in metrics
    finally:
        for name in loaded(vllm):  # the shared server as the other tests expect it
            with contextlib.suppress(httpx2.HTTPError):
                httpx2.post(vllm + "/v1/unload_lora_adapter", json={"lora_name": name},
                            timeout=30)
