"""Container models while their engine fails: a Podman API service restarted under a running
gateway, a stop made while it is away, and an engine that accepts and never answers.

The restarted service is one of the test's own (``podman system service`` on a socket of its
own, over the same storage), so that the shared service other tests use keeps running."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2
import pytest

from backends.pool import ModelState
from tests.support import eventually, make_config, serving, sim_model

from .conftest import containers_of
from .test_container_models import ask, container_model

pytestmark = [pytest.mark.anyio, pytest.mark.containers]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiodocker runs on asyncio only


class PodmanService:
    """``podman system service`` on a private socket, to stop and start at will."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))  # a short socket path
        self.socket = self.dir / "podman.sock"
        self.url = f"unix://{self.socket}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", self.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        transport = httpx2.HTTPTransport(uds=str(self.socket))
        with httpx2.Client(transport=transport, base_url="http://engine", timeout=2) as client:
            for _ in range(150):
                try:
                    if client.get("/_ping").status_code == 200:
                        return
                except (httpx2.TransportError, OSError):
                    pass
                time.sleep(0.1)
        raise AssertionError("the private podman service did not answer within 15 s")

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        self.process = None


@pytest.fixture
def podman(engine_url: str) -> Iterator[PodmanService]:
    service = PodmanService()
    service.start()
    try:
        yield service
    finally:
        if service.process is not None:
            service.stop()
        shutil.rmtree(service.dir, ignore_errors=True)


def on(engine: str, model: dict, **settings: object) -> dict:
    return {**model, "engine": engine, **settings}


async def test_the_engine_restarted_under_a_running_gateway(
        podman: PodmanService, instance: str) -> None:
    config = make_config([container_model("a")], gateway={"instance": instance},
                         engines={"local": {"url": podman.url, "stop_timeout": 5.0}})
    async with serving(config) as (url, gateway), httpx2.AsyncClient() as client:
        assert (await ask(url, "a")).status_code == 200
        [container] = containers_of(instance)
        podman.stop()
        # The container runs on without its API service, and so do its requests.
        assert (await ask(url, "a")).status_code == 200
        assert (await client.get(url + "/health")).status_code == 200
        podman.start()
        assert (await ask(url, "a")).status_code == 200
        assert containers_of(instance) == [container]
        # The events are followed again: a death is seen without any request.
        await anyio.run_process(["podman", "kill", container.split()[0]])
        await eventually(lambda: gateway.pool.backends["a"].state is ModelState.STOPPED, 20)
        assert (await ask(url, "a")).status_code == 200
        assert gateway.pool.backends["a"].starts == 2
        assert (await client.get(url + "/health")).status_code == 200
    assert containers_of(instance) == []


async def test_a_death_while_the_engine_was_away_is_noticed_once_it_is_back(
        podman: PodmanService, instance: str) -> None:
    config = make_config([container_model("a")], gateway={"instance": instance},
                         engines={"local": {"url": podman.url, "stop_timeout": 5.0}})
    async with serving(config) as (url, gateway):
        assert (await ask(url, "a")).status_code == 200
        [container] = containers_of(instance)
        podman.stop()
        await anyio.run_process(["podman", "kill", container.split()[0]])
        await anyio.sleep(1.0)
        assert gateway.pool.backends["a"].state is ModelState.READY  # nobody could tell yet
        podman.start()
        await eventually(lambda: gateway.pool.backends["a"].state is ModelState.STOPPED, 20)
        assert (await ask(url, "a")).status_code == 200
    assert containers_of(instance) == []


async def test_a_stop_while_the_engine_is_away_fails_that_model_only_and_it_recovers(
        podman: PodmanService, instance: str) -> None:
    config = make_config([container_model("a", failure_backoff=1.0), sim_model("p")],
                         gateway={"instance": instance},
                         engines={"local": {"url": podman.url, "stop_timeout": 5.0}})
    async with serving(config) as (url, gateway):
        assert (await ask(url, "a")).status_code == 200
        assert (await ask(url, "p")).status_code == 200
        podman.stop()
        with anyio.fail_after(10):
            await gateway.pool.unload("a")
        a = gateway.pool.backends["a"]
        assert a.state is ModelState.FAILED
        assert a.failure is not None and "its stop failed: engine 'local' cannot be reached" \
            in a.failure
        assert (await ask(url, "p")).status_code == 200
        refused = await ask(url, "a")
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "backend_unavailable"
        assert "retry-after" in refused.headers
        assert str(podman.socket) not in refused.text
        podman.start()
        await anyio.sleep(1.0)
        # The container the failed stop left is removed before the new one is made.
        assert (await ask(url, "a")).status_code == 200
        assert len(containers_of(instance)) == 1
    assert containers_of(instance) == []


class Relay:
    """A unix socket in front of the real engine that, once told to hang, accepts and reads
    but never answers, on new connections and on those already open."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.dir = Path(tempfile.mkdtemp(prefix="hang-", dir="/tmp"))
        self.url = f"unix://{self.dir / 'engine.sock'}"
        self.hang = False
        self._forever = asyncio.Event()

    async def __aenter__(self) -> Relay:
        self.server = await asyncio.start_unix_server(self._client, self.dir / "engine.sock")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            up_writer.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            if self.hang:
                await self._forever.wait()
            sink.write(data)
            await sink.drain()


async def test_a_hung_engine_times_out_without_holding_up_another_engines_starts(
        engine_url: str, instance: str) -> None:
    async with Relay(engine_url.removeprefix("unix://")) as relay:
        config = make_config(
            [on("stuck", container_model("s")), on("good", container_model("g"))],
            gateway={"instance": instance},
            engines={"good": {"url": engine_url, "stop_timeout": 5.0},
                     "stuck": {"url": relay.url, "api_timeout": 3.0, "stop_timeout": 1.0}})
        async with serving(config) as (url, gateway):
            relay.hang = True
            answers: dict[str, tuple[int, float, str]] = {}

            async def timed(model: str) -> None:
                began = anyio.current_time()
                response = await ask(url, model)
                answers[model] = (response.status_code, anyio.current_time() - began,
                                  response.text)

            async with anyio.create_task_group() as tg:
                tg.start_soon(timed, "s")
                await anyio.sleep(0.1)
                tg.start_soon(timed, "g")
            status, took, text = answers["s"]
            assert status == 503
            assert "model_start_failed" in text
            assert "engine 'stuck' did not answer" in text
            assert took < 10
            assert answers["g"][0] == 200
            assert gateway.pool.backends["g"].state is ModelState.READY
            assert gateway.pool.backends["s"].state is ModelState.FAILED
    assert containers_of(instance) == []
