"""vLLM's runtime LoRA API for the simulator, as vLLM 0.32 serves it
(``vllm/entrypoints/serve/lora/api_router.py``, ``vllm/entrypoints/openai/models/serving.py``).

Only on a simulator started with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``
(what real vLLM needs); otherwise these paths are 404, as on a vLLM server without them.

* ``POST /v1/load_lora_adapter`` with ``{"lora_name", "lora_path", "load_inplace"}``: after
  ``--lora-load-delay`` seconds, 200 with the text ``Success: LoRA adapter 'NAME' added
  successfully.``; 400 (``InvalidUserInput``) for an empty name or path, the served model's
  name, or a name loaded already (unless ``load_inplace``); 404 (``NotFoundError``, ``Loading
  lora NAME failed: No adapter found for PATH``, with a path under /tmp, /home, ... shown as
  ``<path>``, as vLLM hides them) when PATH is no directory.
* ``POST /v1/unload_lora_adapter`` with ``{"lora_name"}``: 200 ``Success: LoRA adapter 'NAME'
  removed successfully.``; 404 ``The lora adapter 'NAME' cannot be found.``
* A loaded adapter is served under its name (``model`` in a request and its answer) and listed
  by ``/v1/models`` with ``parent`` set to the served model and ``root`` to its path.
* ``GET /sim/lora`` (the simulator's own): the adapters loaded now, every load and unload call
  in order (``load NAME``, ``unload NAME``), the most loads seen in flight at once, and how many
  requests named each adapter.

vLLM does not bound the adapters a server's API has loaded (``--max-loras`` bounds those its
engine runs in one batch); neither does the simulator.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
# vLLM's error messages show no file path (``sanitize_message``): these become ``<path>``.
_PATHS = (re.compile(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+"),
          re.compile(r"(?:/[\w\-]+)+/[\w\-]+\.\w+"))


def enabled_by(environ: dict[str, str] | os._Environ[str]) -> bool:
    """Whether the environment allows runtime loading, as vLLM reads the variable."""
    return environ.get(ENV, "0").strip().lower() in ("1", "true")


def _error(status: int, kind: str, message: str) -> web.Response:
    for path in _PATHS:
        message = path.sub("<path>", message)
    error = {"message": message, "type": kind, "param": None, "code": status}
    return web.json_response({"error": error}, status=status)


@dataclass
class Lora:
    """The adapters one simulated server has loaded, and its LoRA routes."""

    model: str
    load_delay: float = 0.0
    loaded: dict[str, str] = field(default_factory=dict)  # name: path
    calls: list[str] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)
    loading: int = 0
    most_loading: int = 0

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        app.router.add_get("/sim/lora", self.sim_lora)

    def serves(self, name: str) -> bool:
        return name in self.loaded

    def generated(self, name: str) -> None:
        self.served[name] = self.served.get(name, 0) + 1

    def cards(self, created: int) -> list[dict[str, Any]]:
        """The adapters' entries in ``/v1/models``, as vLLM makes them."""
        return [{"id": name, "object": "model", "created": created, "owned_by": "vllm",
                 "root": path, "parent": self.model, "max_model_len": None,
                 "permission": []} for name, path in self.loaded.items()]

    async def load(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            return _error(400, "Bad Request", "lora_name and lora_path must be strings")
        self.calls.append(f"load {name}")
        if not name or not path:
            return _error(400, "InvalidUserInput",
                          "Both 'lora_name' and 'lora_path' must be provided.")
        if name == self.model:
            return _error(400, "InvalidUserInput",
                          f"The lora adapter '{name}' conflicts with a served base model.")
        if name in self.loaded and body.get("load_inplace") is not True:
            return _error(400, "InvalidUserInput", f"The lora adapter '{name}' has already been "
                          "loaded. If you want to load the adapter in place, set "
                          "'load_inplace' to True.")
        self.loading += 1
        self.most_loading = max(self.most_loading, self.loading)
        try:
            await asyncio.sleep(self.load_delay)
        finally:
            self.loading -= 1
        if not os.path.isdir(path):  # noqa: ASYNC240 - one local stat, as vLLM makes it
            return _error(404, "NotFoundError",
                          f"Loading lora {name} failed: No adapter found for {path}")
        self.loaded[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        name = body.get("lora_name")
        if not isinstance(name, str):
            return _error(400, "Bad Request", "lora_name must be a string")
        self.calls.append(f"unload {name}")
        if not name:
            return _error(400, "InvalidUserInput",
                          "'lora_name' needs to be provided to unload a LoRA adapter.")
        if self.loaded.pop(name, None) is None:
            return _error(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def sim_lora(self, request: web.Request) -> web.Response:
        return web.json_response({"loaded": list(self.loaded), "calls": self.calls,
                                  "most_loading": self.most_loading, "served": self.served})


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = json.loads(await request.read())
    except ValueError:
        return _error(400, "Bad Request", "Request body is not valid JSON")
    if not isinstance(body, dict):
        return _error(400, "Bad Request", "Request body must be a JSON object")
    return body
