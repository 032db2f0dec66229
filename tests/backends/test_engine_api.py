"""The engine's ping (backends/engine_api.py) against a real HTTP server on a Unix socket and
on TCP, as a Docker or Podman API answers it: a success, an error status, nobody listening."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiodocker
import pytest
from aiohttp import web

from backends import engine_api

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiodocker: asyncio only


@asynccontextmanager
async def engine(status: int, path: Path | None) -> AsyncIterator[str]:
    """An engine API that answers ``GET /_ping`` with ``status``; yields its URL."""
    pinged: list[str] = []

    async def ping(request: web.Request) -> web.Response:
        pinged.append(request.path)
        return web.Response(status=status, text="OK")

    app = web.Application()
    app.router.add_get("/_ping", ping)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.UnixSite(runner, str(path)) if path else web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        if path:
            yield f"unix://{path}"
        else:
            yield f"tcp://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
    assert pinged == ["/_ping"]


@pytest.mark.parametrize("unix", [True, False], ids=["unix", "tcp"])
@pytest.mark.parametrize(("status", "answers"), [(200, True), (500, False)])
async def test_the_ping_is_an_unversioned_get(tmp_path: Path, unix: bool, status: int,
                                              answers: bool) -> None:
    async with engine(status, tmp_path / "api.sock" if unix else None) as url, \
            aiodocker.Docker(url=url) as docker:
        assert await engine_api.ping(docker) is answers


async def test_nobody_listening_does_not_answer(tmp_path: Path) -> None:
    async with aiodocker.Docker(url=f"unix://{tmp_path / 'none.sock'}") as docker:
        assert await engine_api.ping(docker) is False
