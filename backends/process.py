"""Process launcher: a local command (bare-metal ``vllm serve``, or the simulator).

``{port}`` in the command becomes a free loopback port, ``{python}`` the running interpreter,
``{name}`` the model's name. The output is kept (last lines) for the log when a start fails.
The server runs in a session of its own (vLLM's workers are its children): stopping sends
SIGTERM to that process group, waits ``stop_timeout`` for the server, then kills what is left
of the group, and always reaps the server.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys

import anyio
from anyio.abc import Process, TaskGroup

from proxy.config import ModelSettings

from .launcher import LaunchError, free_port

TAIL_LINES = 40
STOP_TIMEOUT = 10.0
# Seconds to read the rest of the output after the exit (a child may keep it open longer).
OUTPUT_GRACE = 1.0


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
            raise LaunchError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None
        self._process = process
        task_group.start_soon(self._watch, process)
        self.address = f"http://127.0.0.1:{port}"
        return self.address

    async def _watch(self, process: Process) -> None:
        """Notice the exit, and keep the output's last lines until then."""
        async with anyio.create_task_group() as reader:
            reader.start_soon(self._read, process)
            await process.wait()
            reader.cancel_scope.deadline = anyio.current_time() + OUTPUT_GRACE
        self._exited.set()

    async def _read(self, process: Process) -> None:
        assert process.stdout is not None
        pending = b""
        with contextlib.suppress(anyio.ClosedResourceError):  # stop() closed it under us
            async for data in process.stdout:
                pending += data
                *lines, pending = pending.split(b"\n")
                self._tail.extend(line.decode(errors="replace") for line in lines)
        if pending:
            self._tail.append(pending.decode(errors="replace"))

    @property
    def pid(self) -> int | None:
        """The server's process id (also its process group's), from its start to its stop."""
        return None if self._process is None else self._process.pid

    def is_alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def wait_exit(self) -> str:
        await self._exited.wait()
        assert self._process is not None
        status = self._process.returncode
        assert status is not None
        if status < 0:
            return f"the process was killed by signal {-status}"
        return f"the process exited with status {status}"

    async def stop(self) -> None:
        process, self._process = self._process, None
        self.address = None
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                _signal_group(process, signal.SIGTERM)
                with anyio.move_on_after(self.stop_timeout):
                    await process.wait()
            # The group outlives its leader while a child is left (and then its id is not
            # reused), so this also ends a worker that the server left behind.
            _signal_group(process, signal.SIGKILL)
            await process.wait()
            await process.aclose()

    def has_running(self) -> bool:
        return False

    async def output_tail(self) -> str:
        return "\n".join(self._tail)


def _signal_group(process: Process, signum: int) -> None:
    """Signal the process group that the server leads (``start_new_session``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(process.pid, signum)
