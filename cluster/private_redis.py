"""A private ``redis-server`` for the workers of one ``serve --workers N`` with no
``cluster.redis_url``: on a unix socket in a folder of its own (mode 0700), without persistence
(``--save "" --appendonly no``) or a TCP port, gone with its folder at the end.

``running`` gives it once it answers a ``PING``; the supervisor starts it again if it exits
(``RedisServer.start``). Needs the ``redis-server`` binary (Debian: ``redis-server``), not
coredis.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

BINARY = "redis-server"
# Seconds it has to answer a PING after its start, and to exit after a SIGTERM.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class RedisUnavailable(Exception):
    """The server could not be started (one line: what went wrong)."""


def runtime_root() -> Path:
    """Where the folder goes: the user's runtime directory (``XDG_RUNTIME_DIR``, a tmpfs that
    only they may enter), else the temporary directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) if runtime and Path(runtime).is_dir() else Path(tempfile.gettempdir())


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class RedisServer:
    """A redis-server on ``redis.sock`` in ``directory``; ``preexec`` runs in its process
    before the binary (the supervisor ties it to itself)."""

    def __init__(self, binary: str, directory: Path,
                 preexec: Callable[[], None] | None = None) -> None:
        self.binary = binary
        self.socket = directory / "redis.sock"
        self.log = directory / "redis.log"
        self.argv = [binary, "--port", "0", "--unixsocket", str(self.socket),
                     "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                     "--dir", str(directory), "--logfile", str(self.log)]
        self.preexec = preexec
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        """Start it and wait until it answers; ``RedisUnavailable`` if it does not."""
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=self.preexec)
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                said = (self.log.read_text(errors="replace").strip().splitlines()
                        if self.log.exists() else [])
                self.stop()
                raise RedisUnavailable(
                    f"{BINARY} did not answer on {self.socket} within {START_TIMEOUT:g} s"
                    + (f": {said[-1]}" if said else ""))
            time.sleep(0.02)

    def exited(self) -> int | None:
        """Its exit status if it has exited (reaped), else None."""
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def running(directory: Path | None = None, *,
            preexec: Callable[[], None] | None = None) -> Iterator[RedisServer]:
    """A ``RedisServer`` in ``directory`` (a new folder in ``runtime_root()``, removed at the
    end, unless given), started and answering; stopped at the end. Raises
    ``RedisUnavailable`` when the binary is missing or the server does not answer."""
    binary = shutil.which(BINARY)
    if binary is None:
        raise RedisUnavailable(f"{BINARY} is not on PATH")
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="vllm-gateway-", dir=runtime_root()))
            stack.callback(shutil.rmtree, directory, ignore_errors=True)
        server = RedisServer(binary, directory, preexec)
        stack.callback(server.stop)
        server.start()
        yield server
