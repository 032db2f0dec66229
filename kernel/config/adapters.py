"""A model's LoRA ``adapters`` (``[{name = "...", path = "..."}, ...]``): each served on the
model's own servers under its name, loaded on a server when a request first names it there.

An adapter's ``path`` is where its server reads it (vLLM's ``lora_path``): for a ``process``
model that is this host, so it must be readable here at start-up; a container's or a static
server's file system is not the gateway's to look at.
"""

from __future__ import annotations

import dataclasses
import os

from .validation import _fail, _required, _Sources

# vLLM's --max-lora-rank choices (vllm/config/lora.py).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclasses.dataclass(frozen=True, slots=True)
class AdapterSettings:
    name: str = _required()
    path: str = _required()


def _check_adapters(adapters: tuple[AdapterSettings, ...], max_lora_rank: int, path: str,
                    launcher: str, sources: _Sources) -> None:
    """vLLM's rank; for a process model, paths this host reads (its server reads them here)."""
    if max_lora_rank not in LORA_RANKS:
        _fail(f"{path}.max_lora_rank", max_lora_rank, sources,
              "one of vLLM's ranks: " + ", ".join(map(str, LORA_RANKS)))
    for i, adapter in enumerate(adapters):
        if launcher == "process" and not os.access(adapter.path, os.R_OK):
            _fail(f"{path}.adapters[{i}].path", adapter.path, sources, "a path this host can "
                  "read: a process model's server reads its adapters here")
