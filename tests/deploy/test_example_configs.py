"""The example configurations in deploy/ and examples/ are valid as shipped, and so are their
commented-out real vLLM models once uncommented as the file says; the simulated ones for sleep
mode and replicas do what the README shows, through ``vllm-gateway serve``."""

from __future__ import annotations

import concurrent.futures
import re
from pathlib import Path
from typing import Any

import httpx2

from kernel.config import load_config
from tests.support import HTTP, ROOT, chat, gateway_process, wait_until

PODMAN_CONFIG = ROOT / "deploy" / "config.podman.toml"


def test_the_podman_config_is_valid_as_shipped() -> None:
    config = load_config(str(PODMAN_CONFIG), environ={})
    assert [m.name for m in config.models] == ["sim"]


def test_the_compose_clusters_config_is_valid_as_shipped() -> None:
    config = load_config(str(ROOT / "deploy" / "config.cluster.toml"),
                         environ={"GATEWAY_INSTANCE": "compose"})
    assert config.cluster.enabled and config.cluster.key_prefix == "vllm-gateway:compose"
    assert [(m.name, m.url) for m in config.models] == [("sim", "http://sim:8000")]


def test_the_compose_clusters_nginx_site_is_deploy_nginx_conf_but_for_its_upstream() -> None:
    """deploy/nginx.cluster.conf keeps every directive of deploy/nginx.conf (which says why
    each is there), but the upstream's servers: both gateways."""
    def directives(name: str) -> list[str]:
        lines = (line.split("#")[0].strip() for line in (ROOT / "deploy" / name).open())
        return [line for line in lines if line and not line.startswith("server ")]

    assert directives("nginx.cluster.conf") == directives("nginx.conf")


def test_the_commented_vllm_models_are_valid_once_uncommented(tmp_path: Path) -> None:
    # Uncommenting drops "# " before a table header or a key; prose comments stay comments.
    text = re.sub(r"^# (?=\[\[models\]\]|[a-z_]+ = )", "", PODMAN_CONFIG.read_text(),
                  flags=re.MULTILINE)
    path = tmp_path / "config.toml"
    path.write_text(text)
    config = load_config(str(path), environ={})
    vllm = [m for m in config.models if m.image and "vllm/vllm-openai" in m.image]
    assert [m.name for m in vllm] == ["qwen2.5-7b", "llama3.1-8b"]
    for model in vllm:
        assert "--gpu-memory-utilization" in model.args
        assert model.gpus == (0,)


def test_the_sleep_example_is_valid_and_its_models_sleep() -> None:
    config = load_config(str(ROOT / "examples" / "vllm-sleep.toml"), environ={})
    assert config.gateway.max_models_concurrent == 1
    assert [m.sleep_level for m in config.models] == [1, 2]
    for model in config.models:
        assert "--enable-sleep-mode" in model.command
        assert model.env["VLLM_SERVER_DEV_MODE"] == "1"


ADMIN = {"authorization": "Bearer example-admin"}


def example(name: str) -> str:
    return (ROOT / "examples" / name).read_text()


def models(url: str) -> dict[str, dict[str, Any]]:
    answer = HTTP.get(url + "/admin/models", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return {m["name"]: m for m in answer.json()["data"]}


def test_the_simulated_sleep_example_sleeps_an_idle_model_and_wakes_it(tmp_path: Path) -> None:
    with gateway_process(example("sim-sleep.toml"), tmp_path,
                         env={"GATEWAY_ADMIN_TOKEN": "example-admin"}) as (url, _):
        assert HTTP.post(url + "/v1/chat/completions", json=chat("sim-a"),
                         timeout=30).status_code == 200
        wait_until(lambda: models(url)["sim-a"]["state"] == "asleep", timeout=20)
        assert HTTP.post(url + "/v1/chat/completions", json=chat("sim-a"),
                         timeout=30).status_code == 200
        woken = models(url)["sim-a"]
        assert (woken["state"], woken["starts"], woken["sleeps"], woken["wakes"]) == (
            "ready", 1, 1, 1)
        # The other model's turn: the awake one sleeps to make room.
        assert HTTP.post(url + "/v1/chat/completions", json=chat("sim-b"),
                         timeout=30).status_code == 200
        turns = models(url)
        assert (turns["sim-a"]["state"], turns["sim-b"]["state"]) == ("asleep", "ready")


def test_the_simulated_replicas_example_starts_a_second_replica_under_a_burst(
        tmp_path: Path) -> None:
    with gateway_process(example("sim-replicas.toml"), tmp_path,
                         env={"GATEWAY_ADMIN_TOKEN": "example-admin"}) as (url, _):
        wait_until(lambda: models(url)["sim-chat"]["state"] == "ready", timeout=20)
        assert len([r for r in models(url)["sim-chat"]["replicas"]
                    if r["state"] == "ready"]) == 1

        def ask(_: int) -> int:
            return httpx2.post(url + "/v1/chat/completions", json=chat("sim-chat", max_tokens=60),
                               timeout=60).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as burst:
            assert list(burst.map(ask, range(8))) == [200] * 8
        model = models(url)["sim-chat"]
        assert model["scale_ups"] >= 1
        assert [r["starts"] for r in model["replicas"]] == [1, 1]
