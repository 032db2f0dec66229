"""What the tests share: a simulator in a subprocess, configs, and a gateway on a real socket."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import sniffio
from hypercorn.config import Config as HypercornConfig

from backends.launcher import free_port
from kernel.config import Config, config_from_mapping
from proxy.app import Gateway

ROOT = Path(__file__).resolve().parent.parent
SIM = ["{python}", "-m", "simulator", "--port", "{port}", "--model", "{name}"]


# One client for the tests' polling: a fresh httpx2.get() builds a TLS context each call (~80 ms).
HTTP = httpx2.Client(timeout=5, limits=httpx2.Limits(keepalive_expiry=300))


@dataclass
class Simulator:
    process: subprocess.Popen[str]
    url: str

    def stats(self) -> dict[str, Any]:
        return HTTP.get(self.url + "/sim/stats").json()


@contextlib.contextmanager
def simulator(*args: str, model: str = "sim", port: int = 0, ready: bool = True,
              env: dict[str, str] | None = None) -> Iterator[Simulator]:
    """A simulator process (on a free port unless given one; ``env`` added to its
    environment), stopped and reaped at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--port", str(port), "--model", model,
         *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, **env} if env else None)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        sim = Simulator(proc, line.split()[-1].strip())
        if ready:
            wait_until(lambda: HTTP.get(sim.url + "/health").status_code == 200)
        yield sim
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# Every process the suite starts inherits it (pytest's pid), so the check after the suite finds
# those left running even where they outlived their parent (``stray_processes``).
SESSION_MARKER = "VLLM_GATEWAY_TEST_SESSION"
# Seconds a process group gets between SIGTERM and SIGKILL.
STOP_TIMEOUT = 10.0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member is another user's (a setuid helper): still there
        return True
    return True


def end_group(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> None:
    """End ``proc`` and every process of its group (it leads one: ``Processes.start``), the
    ones that outlived it too: SIGTERM, then SIGKILL for what is left after ``timeout``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reaped, the leader leaves the group
            if proc.returncode is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.02)


class Processes:
    """The processes one test starts, each the leader of a process group of its own, so that
    what they start in turn (a benchmark's gateway and backends) is ended with them. The
    ``processes`` fixture ends every group still running when the test ends, however it ends."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[Any]] = []

    def start(self, argv: list[str], **popen: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, start_new_session=True, **popen)
        self.started.append(proc)
        return proc

    def run(self, argv: list[str], *, timeout: float,
            **popen: Any) -> subprocess.CompletedProcess[str]:
        """As ``subprocess.run(capture_output=True, text=True)``, but a timeout ends the whole
        group (``subprocess.run`` kills the child alone: what it started would live on)."""
        proc = self.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **popen)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_group(proc)
            raise
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def stop(self) -> None:
        for proc in reversed(self.started):
            end_group(proc)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


def stray_processes(session: str) -> dict[int, str]:
    """The live processes of this test session (``SESSION_MARKER`` = ``session`` in their
    environment, or a child of this process) other than this one, with their command lines."""
    me = os.getpid()
    marker = f"{SESSION_MARKER}={session}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            ours = int(stat[1]) == me or marker in (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):  # gone, or another user's
            continue
        if ours and stat[0] != "Z":
            found[int(entry.name)] = cmdline.strip()
    return found


def end_strays(pids: list[int], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL what is left after ``timeout``; a child of ours is reaped."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            pids = [pid for pid in pids if is_running(pid)]
            time.sleep(0.05)


def is_running(pid: int) -> bool:
    """Whether the process runs (neither gone nor a zombie)."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def need(problem: str | None, *, required: bool | None = None) -> None:
    """Skip the test for what it needs and lacks (``problem``), or fail it where the run must
    have everything: ``required``, by default ``VLLM_GATEWAY_TEST_REQUIRE_ENGINE=1`` (CI)."""
    if problem is None:
        return
    if required is None:
        required = os.environ.get("VLLM_GATEWAY_TEST_REQUIRE_ENGINE") == "1"
    if required:
        pytest.fail(problem)
    pytest.skip(problem)


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A private ``redis-server`` on a unix socket in ``directory``, without persistence, as
    ``serve --workers`` starts one; its ``unix://`` URL. Skips the test where the binary is
    missing (fails it in CI: ``need``)."""
    import shutil

    from cluster import private_redis

    need(None if shutil.which(private_redis.BINARY) else "redis-server is not installed "
         "(Debian: apt-get install redis-server)")
    with private_redis.running(directory) as server:
        yield server.url


def wait_until(check: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (httpx2.TransportError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {check}")
        time.sleep(interval)


async def eventually(check: Any, within: float = 10.0) -> None:
    """Wait until ``check()`` is true (state that nothing signals); fail after ``within`` s."""
    with anyio.fail_after(within):
        while not check():
            await anyio.sleep(0.01)


def sim_model(name: str, *sim_args: str, **settings: Any) -> dict[str, Any]:
    """A [[models]] table for a simulator started by the process launcher."""
    return {"name": name, "launcher": "process", "command": [*SIM, *sim_args],
            "startup_timeout": 20.0, **settings}


def static_model(name: str, url: str, **settings: Any) -> dict[str, Any]:
    """A [[models]] table for a server someone else runs."""
    return {"name": name, "launcher": "static", "url": url, "startup_timeout": 5.0, **settings}


def make_config(models: list[dict[str, Any]], **sections: Any) -> Config:
    return config_from_mapping({"models": models, **sections}, source="test")


def chat(model: str, *, max_tokens: int = 4, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens, "stream": stream, **extra}


@contextlib.asynccontextmanager
async def serving(config: Config, **gateway_options: Any) -> AsyncIterator[tuple[str, Gateway]]:
    """The gateway on a real hypercorn socket in this event loop, with its lifespan."""
    gateway = Gateway(config, **gateway_options)
    async with serving_app(gateway) as url:
        yield url, gateway


async def answer_lifespan(receive: Any, send: Any) -> None:
    """A test backend's lifespan: answered, not ignored, since hypercorn's trio worker can fail
    to start an app whose lifespan returns before the server sends the start-up message."""
    while (await receive())["type"] == "lifespan.startup":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


class HeldBackend:
    """An OpenAI-shaped backend whose answers wait until the test releases them."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.received = 0
        # The client address of each connection a POST came on: one per TCP connection.
        self.connections: set[tuple[str, int]] = set()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["method"] == "POST":
            self.received += 1
            self.connections.add(tuple(scope["client"]))
            await self.release.wait()
        body = b'{"object": "chat.completion", "choices": []}'
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serving_app(app: Any) -> AsyncIterator[str]:
    """Any ASGI app on a real hypercorn socket in this event loop, with its lifespan."""
    if sniffio.current_async_library() == "trio":
        from hypercorn.trio import serve
    else:
        from hypercorn.asyncio import serve
    port = free_port()
    hc = HypercornConfig()
    hc.bind = [f"127.0.0.1:{port}"]
    hc.accesslog = None
    hc.errorlog = None
    hc.graceful_timeout = 1.0
    hc.backlog = 2048
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve(app, hc, shutdown_trigger=stop.wait))
        url = f"http://127.0.0.1:{port}"
        async with httpx2.AsyncClient() as client:
            for _ in range(500):
                with contextlib.suppress(httpx2.TransportError):
                    if (await client.get(url + "/health")).status_code == 200:
                        break
                await anyio.sleep(0.01)
        try:
            yield url
        finally:
            stop.set()


def read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    """The request's head and its body (by content-length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return data, b""
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        more = conn.recv(65536)
        if not more:
            break
        body += more
    return head, body


@contextlib.contextmanager
def raw_backend(answer: Callable[[socket.socket, bytes], None]) -> Iterator[str]:
    """A healthy backend on a real socket; ``answer(conn, head)`` answers each POST."""
    stop = threading.Event()
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                head, _ = read_request(conn)
                if head.startswith(b"GET"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
                                 b"connection: close\r\n\r\n")
                else:
                    answer(conn, head)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        server.close()


@contextlib.contextmanager
def gateway_process(config_text: str, tmp_path: Path, *args: str,
                    env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """``vllm-gateway serve`` as a real process on a free port; SIGTERM and reap at the end."""
    with gateway_processes(config_text, [(tmp_path, args)], env=env) as (gateway,):
        yield gateway


@contextlib.contextmanager
def gateway_processes(config_text: str, runs: list[tuple[Path, tuple[str, ...]]], *,
                      env: dict[str, str] | None = None
                      ) -> Iterator[list[tuple[str, subprocess.Popen]]]:
    """A ``gateway_process`` for each (directory, arguments) of ``runs``, all on one
    configuration, started together (their start-ups overlap)."""
    gateways: list[tuple[str, subprocess.Popen]] = []
    logs = []
    try:
        for directory, args in runs:
            path = directory / "gateway.toml"
            path.write_text(config_text)
            port = free_port()
            logs.append(open(directory / "gateway.log", "w"))
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path),
                 "--bind", f"127.0.0.1:{port}", *args],
                cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})})
            gateways.append((f"http://127.0.0.1:{port}", proc))
        # A start-up takes a second or two on an idle machine, tens of seconds on a loaded one
        # (the suite's workers, a vLLM starting beside it): 60 s for each, as their start-ups
        # share the CPUs. One that exits fails at once, naming its log.
        deadline = time.monotonic() + 60 * len(runs)
        for (url, proc), log in zip(gateways, logs, strict=True):
            def up(url: str = url, proc: subprocess.Popen = proc, log: Any = log) -> bool:
                assert proc.poll() is None, f"the gateway exited ({proc.returncode}): {log.name}"
                return HTTP.get(url + "/health").status_code == 200

            wait_until(up, timeout=max(0.0, deadline - time.monotonic()))
        yield gateways
    finally:
        for _, proc in gateways:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in gateways:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


def module_gateway(config_text: str) -> Any:
    """A module's fixture: one ``gateway_process`` on ``config_text`` for all its tests; its
    URL."""
    @pytest.fixture(scope="module")
    def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
        with gateway_process(config_text, tmp_path_factory.mktemp("gateway")) as (url, _):
            yield url
    return gateway
