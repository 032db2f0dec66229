"""The example configurations in deploy/ are valid as shipped, and so are their commented-out
real vLLM models once uncommented as the file says."""

from __future__ import annotations

import re
from pathlib import Path

from kernel.config import load_config
from tests.support import ROOT

PODMAN_CONFIG = ROOT / "deploy" / "config.podman.toml"


def test_the_podman_config_is_valid_as_shipped() -> None:
    config = load_config(str(PODMAN_CONFIG), environ={})
    assert [m.name for m in config.models] == ["sim"]


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
