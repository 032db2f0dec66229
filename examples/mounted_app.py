r"""The gateway mounted at ``/llm`` inside another Starlette application.

    GATEWAY_CONFIG=config.toml hypercorn --config deploy/hypercorn.toml \
        'examples.mounted_app:create_app()'
    curl http://127.0.0.1:8080/llm/v1/models

Starlette runs the lifespan of the application it serves, never that of a mounted one, so the
gateway's start-up and shutdown (its backend pool, the reaper that stops idle models, the
container engines, the upstream client) are entered from the host application's lifespan with
``Gateway.running()``; leaving it stops every model the gateway started. Under the mount the
gateway sees ``root_path = "/llm"`` and answers ``/llm/v1/chat/completions`` as it answers
``/v1/chat/completions`` alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from proxy.app import build_app
from proxy.cli import load_or_exit
from proxy.logs import configure_logging, log_configuration


def create_app() -> Starlette:
    """The host application; the gateway's configuration as ``vllm-gateway serve`` reads it
    (``GATEWAY_CONFIG``, else ``./config.toml``, and the ``GATEWAY_*`` variables; a bad one
    exits with status 2 and its one-line message), logged as ``serve`` logs it."""
    config = load_or_exit()
    configure_logging(config.gateway.log_format)
    log_configuration(config)
    gateway = build_app(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with gateway.running():
            yield

    async def home(request: Request) -> JSONResponse:
        return JSONResponse({"openai_base_url": str(request.url_for("llm", path="/v1"))})

    return Starlette(routes=[Route("/", home), Mount("/llm", app=gateway, name="llm")],
                     lifespan=lifespan)
