"""A private ``redis-server`` for the workers of one ``serve --workers N`` with no
``cluster.redis_url``: on a unix socket in a folder of its own (mode 0700), without persistence
(``--save "" --appendonly no``) or a TCP port, gone with its folder at the end.

Started only once it is known to be needed; ``RedisServer.running`` answers once the server
answers a ``PING``. Needs the ``redis-server`` binary (Debian: ``redis-server``), not coredis.
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


@contextlib.contextmanager
def running(directory: Path | None = None, *,
            preexec: Callable[[], None] | None = None) -> Iterator[str]:
    """A redis-server on ``redis.sock`` in ``directory`` (a new folder in ``runtime_root()``,
    removed at the end, unless given); its ``unix://`` URL once it answers. ``preexec`` runs in
    its process before the binary (the supervisor ties it to itself). Raises
    ``RedisUnavailable`` when the binary is missing or the server does not answer."""
    binary = shutil.which(BINARY)
    if binary is None:
        raise RedisUnavailable(f"{BINARY} is not on PATH")
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="vllm-gateway-", dir=runtime_root()))
            stack.callback(shutil.rmtree, directory, ignore_errors=True)
        sock = directory / "redis.sock"
        log = directory / "redis.log"
        proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(directory),
             "--logfile", str(log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=preexec)
        stack.callback(_stop, proc)
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                said = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
                raise RedisUnavailable(
                    f"{BINARY} did not answer on {sock} within {START_TIMEOUT:g} s"
                    + (f": {said[-1]}" if said else ""))
            time.sleep(0.02)
        yield f"unix://{sock}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
