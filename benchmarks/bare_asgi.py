"""Reference points, not gateways: hypercorn (uvloop) with nothing else in the way.

``python -m benchmarks.bare_asgi --bind 127.0.0.1:PORT`` reads the request body and answers
the same JSON the responder would, with no middleware and no upstream hop, so in scenario (a)
it shows what hypercorn itself costs on the proxy core at that moment: the ceiling of any
gateway built on it, on this machine, under this background load.

``--upstream URL [--paced-upstream URL]`` makes it the barest passthrough the gateway's own
parts allow: every request forwarded with aiohttp (one session, raw bytes, hop-by-hop headers
dropped; ``/paced/...`` to the second backend) and relayed chunk by chunk; no admission,
queue, slots, retries, watch or log. The ceiling of a gateway made of hypercorn and aiohttp;
the gateway's distance from it is what its layers cost.
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


HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"host",
                        b"content-length", b"date", b"server"})


async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    if UPSTREAM is None:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
        return
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
               if k not in HOP_BY_HOP]
    path = scope["path"]
    upstream = UPSTREAM
    if path.startswith("/paced/"):
        path, upstream = path[len("/paced"):], PACED_UPSTREAM
    async with SESSION.request(scope["method"], upstream + path, headers=headers,
                               data=b"".join(chunks)) as response:
        await send({"type": "http.response.start", "status": response.status, "headers": [
            (k, v) for k, v in response.raw_headers if k.lower() not in HOP_BY_HOP]})
        async for chunk in response.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


UPSTREAM: str | None = None
PACED_UPSTREAM = ""
SESSION = None


def main() -> int:
    import uvloop
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_asgi")
    parser.add_argument("--bind", required=True)
    parser.add_argument("--upstream", help="forward every request there (aiohttp)")
    parser.add_argument("--paced-upstream", default="", help="where /paced/... goes")
    args = parser.parse_args()
    config = Config()
    config.bind = [args.bind]
    config.accesslog = None
    config.backlog = 2048

    async def run() -> None:
        global SESSION, UPSTREAM, PACED_UPSTREAM
        if args.upstream:
            import aiohttp

            UPSTREAM, PACED_UPSTREAM = args.upstream, args.paced_upstream
            SESSION = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        if SESSION is not None:
            await SESSION.close()

    uvloop.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
