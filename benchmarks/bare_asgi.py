"""A reference point, not a proxy: hypercorn (uvloop) serving a canned chat completion.

``python -m benchmarks.bare_asgi --bind 127.0.0.1:PORT``. It reads the request body and answers
the same JSON the responder would, with no middleware and no upstream hop, so in scenario (a)
it shows what hypercorn itself costs on the proxy core at that moment: the ceiling of any
gateway built on it, on this machine, under this background load.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

BODY = (b'{"id":"chatcmpl-0","object":"chat.completion","created":0,"model":"fast","choices":'
        b'[{"index":0,"message":{"role":"assistant","content":"' + b"tok " * 16 + b'"},'
        b'"finish_reason":"length"}],"usage":{"prompt_tokens":1,"total_tokens":17,'
        b'"completion_tokens":16}}')
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main() -> int:
    import uvloop
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_asgi")
    parser.add_argument("--bind", required=True)
    config = Config()
    config.bind = [parser.parse_args().bind]
    config.accesslog = None
    config.backlog = 2048

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    uvloop.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
