"""LoRA adapters through the whole gateway on a real socket: listed by /v1/models with their
base model as ``parent``, served on demand by the base model's server (the simulator with
vLLM's runtime LoRA API, started by the process launcher, which sets the variable it needs),
one swapped for another at ``max_loras``, shown by the metrics and the admin API; a stream that
waits for a load hears so, and a load that fails is the client's error in the OpenAI shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.support import chat, eventually, make_config, serving, sim_model

pytestmark = pytest.mark.anyio

TOKEN = "adapters-admin"


def base(tmp_path: Path, *sim_args: str, **settings: Any) -> dict[str, Any]:
    """Model ``base`` with adapters ``sql`` and ``poet`` (their directories made) on a
    simulator with the LoRA API."""
    adapters = []
    for name in ("sql", "poet"):
        (tmp_path / name).mkdir()
        adapters.append({"name": name, "path": str(tmp_path / name)})
    return sim_model("base", "--enable-lora", *sim_args, adapters=adapters, **settings)


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    line = next(line for line in text.splitlines() if line.startswith(f"{name}{{{wanted}}}"))
    return float(line.rsplit(" ", 1)[1])


async def test_adapters_are_listed_served_on_demand_and_swapped_at_max_loras(
        tmp_path: Path) -> None:
    config = make_config([base(tmp_path)], admin={"token": TOKEN})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        listed = (await client.get(url + "/v1/models")).json()["data"]
        assert [(m["id"], m.get("parent")) for m in listed] == [
            ("base", None), ("sql", "base"), ("poet", "base")]
        one = (await client.get(url + "/v1/models/poet")).json()
        assert (one["id"], one["parent"]) == ("poet", "base")

        for name in ("sql", "poet"):
            answer = await client.post(url + "/v1/chat/completions", json=chat(name))
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == name
        address = gateway.pool.backends["base"].address
        assert (await client.get(address + "/sim/lora")).json()["calls"] == [
            "load sql", "unload sql", "load poet"]

        metrics = (await client.get(url + "/metrics")).text
        loaded = {name: metric(metrics, "gateway_adapter_loaded", model="base", adapter=name,
                               replica="0") for name in ("sql", "poet")}
        assert loaded == {"sql": 0.0, "poet": 1.0}
        assert metric(metrics, "gateway_adapter_unloads_total", model="base",
                      adapter="sql") == 1.0
        admin = (await client.get(url + "/admin/models",
                                  headers={"authorization": f"Bearer {TOKEN}"})).json()
        (model,) = admin["data"]
        assert model["adapters"] == [{"name": "sql", "loaded_on": []},
                                     {"name": "poet", "loaded_on": [0]}]
        assert model["replicas"][0]["adapters"] == ["poet"]


async def test_a_stream_hears_its_adapter_load_and_a_failed_load_is_an_openai_error(
        tmp_path: Path) -> None:
    config = make_config([base(tmp_path, "--lora-load-delay", "0.6")],
                         gateway={"stream_keepalive": 0.2})
    (tmp_path / "poet").rmdir()  # gone since the start-up's check
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        await gateway.pool.load("base")
        async with client.stream("POST", url + "/v1/chat/completions",
                                 json=chat("sql", stream=True)) as stream:
            assert stream.status_code == 200
            text = (await stream.aread()).decode()
        assert ": waiting for adapter 'sql' of model 'base': loading" in text
        assert text.rstrip().endswith("data: [DONE]")

        failed = await client.post(url + "/v1/chat/completions", json=chat("poet"))
        assert failed.status_code == 502
        assert failed.json() == {"error": {
            "message": "The adapter 'poet' of model 'base' failed to load: Loading lora poet "
                       "failed: No adapter found for <path>",
            "type": "upstream_error", "param": None, "code": "adapter_load_failed"}}
        # The failure took nothing with it: the model and the loaded adapter serve on.
        again = await client.post(url + "/v1/chat/completions", json=chat("sql"))
        assert json.loads(again.text)["model"] == "sql"
        await eventually(lambda: gateway.accounting.in_flight("base") == 0, within=2)
