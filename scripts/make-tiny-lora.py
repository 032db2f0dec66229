"""Make a LoRA adapter for the tiny model (``scripts/make-tiny-model.py``), without training or
downloading anything.

    .venv-vllm/bin/python scripts/make-tiny-lora.py MODEL_DIR ADAPTER_DIR [ADAPTER_DIR ...]

writes into each ADAPTER_DIR what vLLM reads as a PEFT adapter: ``adapter_config.json`` and
``adapter_model.safetensors`` with random low-rank weights (rank ``RANK``; the n-th directory's
drawn from seed n) for the attention projections of every layer, sized from the model's
``config.json``. The tiny model's dummy weights are drawn within +-0.001, so weights drawn
from a normal distribution outweigh them: an answer with the adapter differs from the base
model's, and two adapters answer differently. Needs ``numpy`` and ``safetensors`` (both come
with vLLM; not torch, whose import takes seconds). Idempotent: a directory that holds an
adapter already is left as it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RANK = 8
ALPHA = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _shapes(config: dict) -> dict[str, tuple[int, int]]:
    """Each target's (in, out) features."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    queries = config["num_attention_heads"] * head_dim
    keys = config["num_key_value_heads"] * head_dim
    return {"q_proj": (hidden, queries), "k_proj": (hidden, keys), "v_proj": (hidden, keys),
            "o_proj": (queries, hidden)}


def make_tiny_lora(model: Path, directory: Path, seed: int = 1) -> Path:
    """Write the adapter into ``directory`` (made if missing) unless it is there; return it."""
    if (directory / "adapter_config.json").is_file():
        return directory
    import numpy as np
    from safetensors.numpy import save_file

    config = json.loads((model / "config.json").read_text())
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for target, (fan_in, fan_out) in _shapes(config).items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((RANK, fan_in), np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((fan_out, RANK), np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    adapter = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model),
        "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(TARGETS), "fan_in_fan_out": False, "modules_to_save": None,
        "use_rslora": False, "use_dora": False,
    }
    # Written last: its presence says the adapter is complete.
    (directory / "adapter_config.json").write_text(json.dumps(adapter, indent=2) + "\n")
    return directory


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} MODEL_DIR ADAPTER_DIR [ADAPTER_DIR ...]")
    for seed, directory in enumerate(sys.argv[2:], start=1):
        print(make_tiny_lora(Path(sys.argv[1]), Path(directory), seed))
