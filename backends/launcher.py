"""What the pool asks of every way to run a model's server."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog
from anyio.abc import TaskGroup

from kernel.config import ModelSettings

log = structlog.get_logger("gateway.pool")


# What a vLLM server needs to load and unload LoRA adapters while it runs (a model with
# ``adapters``): the variable for any server the gateway starts, and the flags for a container's
# (a process model's command is the operator's: the README shows the flags to put in it).
LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def lora_env(model: ModelSettings) -> dict[str, str]:
    return LORA_ENV if model.adapters else {}


def lora_flags(model: ModelSettings) -> list[str]:
    if not model.adapters:
        return []
    return ["--enable-lora", "--max-loras", str(model.max_loras),
            "--max-lora-rank", str(model.max_lora_rank)]


class LaunchError(Exception):
    """The backend could not be started; the message says why, for the client and the log."""


class Launcher(Protocol):
    """One model's server: a local process, a container, or a fixed URL."""

    address: str | None

    async def start(self, task_group: TaskGroup) -> str:
        """Start the server; return its base URL once it runs (health is the pool's job).

        Helpers that live as long as the server (an output reader) go in ``task_group``."""

    async def wait_exit(self) -> str:
        """Return, with the reason, when the running server dies by itself."""

    def is_alive(self) -> bool: ...

    async def stop(self) -> None:
        """Stop the server and free what it held; safe to call when it is not running."""

    async def output_tail(self) -> str:
        """The last lines the server wrote, for the log when it fails."""

    def has_running(self) -> bool:
        """Whether a server of this model, left by an earlier run, is there to be adopted."""


class Supervisor:
    """Runs the loops that must last as long as the gateway (the reaper, an engine's event
    stream) and remembers why one ended: ``/health`` then answers 503, so that the orchestrator
    restarts a gateway that no longer does its work, rather than the loop's error taking down
    everything else."""

    def __init__(self) -> None:
        self.problem: str | None = None

    async def run(self, what: str, loop: Callable[[], Awaitable[None]]) -> None:
        try:
            await loop()
            why = "ended"
        except Exception as exc:
            log.exception("background task failed", task=what)
            why = f"failed: {exc!r}"
        self.problem = self.problem or f"{what} {why}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now; the kernel will not hand it out again right away."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
