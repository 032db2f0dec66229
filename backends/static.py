"""Static launcher: a server someone else runs at a fixed URL; health only, no lifecycle."""

from __future__ import annotations

import anyio
from anyio.abc import TaskGroup

from kernel.config import ModelSettings


class StaticLauncher:
    def __init__(self, model: ModelSettings) -> None:
        assert model.url is not None
        self.url = model.url.rstrip("/")
        self.address: str | None = None

    async def start(self, task_group: TaskGroup) -> str:
        self.address = self.url
        return self.url

    async def wait_exit(self) -> str:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    def is_alive(self) -> bool:
        return True

    async def stop(self) -> None:
        self.address = None

    def has_running(self) -> bool:
        return False

    async def output_tail(self) -> str:
        return ""
