"""Process launcher: a local command (bare-metal ``vllm serve``, or the simulator).

``{port}`` in the command becomes a free loopback port, ``{python}`` the running interpreter,
``{name}`` the model's name. The output is kept (last lines) for the log when a start fails.
The server runs in a session of its own (vLLM's workers are its children): stopping sends
SIGTERM to that process group, waits ``stop_timeout`` for the server, then kills what is left
of the group, reaps the server, and waits until no process of the group is left, so the memory
measured afterwards is free.

The server never outlives the gateway: on Linux it runs under a leash (``backends/leash.py``)
that ends its process group when the gateway dies, even by ``kill -9`` or the OOM killer. Its
environment is the gateway's without any ``GATEWAY_*`` variable (the admin token, the client
keys), plus the model's ``env``; a model's ``gpus`` become ``CUDA_VISIBLE_DEVICES``, in the PCI
order that NVML's indexes follow, and a model with LoRA ``adapters`` gets
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` (the flags that enable LoRA are its command's).
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import anyio
from anyio.abc import Process, TaskGroup

from kernel.config import ENV_PREFIX, ModelSettings

from .launcher import LaunchError, free_port, lora_env

TAIL_LINES = 40
STOP_TIMEOUT = 10.0
# Seconds to read the rest of the output after the exit (a child may keep it open longer).
OUTPUT_GRACE = 1.0
GROUP_POLL = 0.02  # seconds, doubling up to GROUP_POLL_MAX, while a stopped group is left
GROUP_POLL_MAX = 0.25
LEASH = str(Path(__file__).with_name("leash.py"))
_lifeline: int | None = None


def lifeline() -> int:
    """The read end of a pipe whose write end the gateway holds until it dies."""
    global _lifeline
    if _lifeline is None:
        _lifeline, _ = os.pipe()  # the write end is never closed, and never inherited
    return _lifeline


def server_env(model: ModelSettings, environ: Mapping[str, str]) -> dict[str, str]:
    """What the model's server sees: none of the gateway's own settings and secrets."""
    env = {k: v for k, v in environ.items() if not k.startswith(ENV_PREFIX)}
    if model.gpus:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, model.gpus))
    return {**env, **model.env, **lora_env(model)}


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
        env = server_env(self.model, os.environ)
        pass_fds: tuple[int, ...] = ()
        if sys.platform == "linux":
            # The leash starts the command: what cannot be run must be found out here.
            if shutil.which(command[0], path=env.get("PATH")) is None:
                raise LaunchError(f"cannot run {command[0]!r}: No such file or directory, or "
                                  "not executable")
            pass_fds = (lifeline(),)
            command = [sys.executable, "-I", "-S", LEASH, str(pass_fds[0]), *command]
        try:
            process = await anyio.open_process(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=env, start_new_session=True, pass_fds=pass_fds)
        except OSError as exc:
            raise LaunchError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None
        except ValueError as exc:  # a NUL in an argument or in the environment
            raise LaunchError(f"cannot run {command[0]!r}: {exc}") from None
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
            with anyio.move_on_after(self.stop_timeout):
                poll = GROUP_POLL
                # The scan of /proc runs in a thread: on a busy host it takes milliseconds.
                while await anyio.to_thread.run_sync(_group_runs, process.pid):
                    await anyio.sleep(poll)
                    poll = min(2 * poll, GROUP_POLL_MAX)

    def has_running(self) -> bool:
        return False

    async def output_tail(self) -> str:
        return "\n".join(self._tail)


def _group_runs(pgid: int) -> bool:
    """Whether a process of the group is left that is not a zombie (a zombie holds no memory,
    and where the reaper of orphans is no init it may never be reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False  # no process at all, not even a zombie: no need to look
    except PermissionError:
        pass
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _signal_group(process: Process, signum: int) -> None:
    """Signal the process group that the server leads (``start_new_session``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(process.pid, signum)
