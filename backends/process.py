"""Process launcher: a local command (bare-metal ``vllm serve``, or the simulator).

``{port}`` in the command becomes a free loopback port, ``{python}`` the running interpreter,
``{name}`` the model's name. The output is kept (last lines) for the log when a start fails.
Stopping sends SIGTERM, waits ``stop_timeout``, then kills, and always reaps the process.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import anyio
from anyio.abc import Process, TaskGroup

from proxy.config import ModelSettings

from .launcher import LaunchError, free_port

TAIL_LINES = 40
STOP_TIMEOUT = 10.0


class ProcessLauncher:
    def __init__(self, model: ModelSettings, *, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.model = model
        self.stop_timeout = stop_timeout
        self.address: str | None = None
        self._process: Process | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._exited = anyio.Event()

    def command(self, port: int) -> list[str]:
        values = {"port": str(port), "python": sys.executable, "name": self.model.name}
        return [part.format(**values) for part in self.model.command]

    async def start(self, task_group: TaskGroup) -> str:
        port = free_port()
        command = self.command(port)
        self._tail.clear()
        self._exited = anyio.Event()
        try:
            process = await anyio.open_process(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env={**os.environ, **self.model.env}, start_new_session=True)
        except OSError as exc:
            raise LaunchError(f"cannot run {command[0]!r}: {exc.strerror}") from None
        self._process = process
        task_group.start_soon(self._collect, process)
        self.address = f"http://127.0.0.1:{port}"
        return self.address

    async def _collect(self, process: Process) -> None:
        """Keep the output's last lines and notice the exit; ends with the process."""
        assert process.stdout is not None
        pending = b""
        async for data in process.stdout:
            pending += data
            *lines, pending = pending.split(b"\n")
            self._tail.extend(line.decode(errors="replace") for line in lines)
        if pending:
            self._tail.append(pending.decode(errors="replace"))
        await process.wait()
        self._exited.set()

    def is_alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def wait_exit(self) -> str:
        await self._exited.wait()
        assert self._process is not None
        return f"the process exited with status {self._process.returncode}"

    async def stop(self) -> None:
        process, self._process = self._process, None
        self.address = None
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.terminate()
                with anyio.move_on_after(self.stop_timeout):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
            await process.wait()
            await process.aclose()

    def output_tail(self) -> str:
        return "\n".join(self._tail)
