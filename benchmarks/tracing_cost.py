"""What tracing costs a request: ``python -m benchmarks.tracing_cost [--base DIR] [--rounds 5]``.

One request at a time (a 1-token chat completion, not streamed) through the gateway's ASGI
app in process (no HTTP server in front: what is measured is the gateway's own path and its
upstream client), to the fast responder (``benchmarks.responder``) in a process of its own, on
uvloop. Variants, each a fresh process per round, the rounds interleaved so that a busy
machine weighs on all of them alike:

- ``off``: no ``[telemetry]``: no tracing piece in the stack;
- ``on``: ``telemetry.endpoint`` set, every request sampled, the spans exported in batches by
  the OTLP/HTTP exporter to a sink process that answers 200 (the export thread's CPU counts);
- ``sampled-out``: as ``on`` with ``sample_ratio = 0``: spans made, none recorded or exported;
- with ``--base DIR`` (a tree of the code before tracing, e.g. ``git archive``), ``base``: its
  ``off``.

Prints the gateway process's CPU time per request (its threads together: the exporter's too;
not the responder's), the median of the rounds, for each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SINK = """
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 1}).encode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _measure(variant: str, upstream: str, sink: str, requests: int) -> float:
    """CPU microseconds of this process (all its threads: the export's too) per request
    through the app, after a warm-up."""
    from kernel.config import config_from_mapping
    from proxy.app import build_app

    doc: dict = {"models": [{"name": "m", "launcher": "static", "url": upstream}]}
    if variant != "off":
        doc["telemetry"] = {"endpoint": sink, **({"sample_ratio": 0.0}
                                                 if variant == "sampled-out" else {})}
    gateway = build_app(config_from_mapping(doc, source="benchmark", environ={}))
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(BODY)).encode())]

    async def one() -> None:
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
                 "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "root_path": "", "query_string": b"", "headers": headers,
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080)}
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": BODY, "more_body": False}
            await asyncio.Event().wait()  # no disconnect while the answer goes out
            return {"type": "http.disconnect"}

        status = 0

        async def send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await gateway(scope, receive, send)
        assert status == 200, status

    async with gateway.running():
        for _ in range(requests // 5):  # the first waits for the model's first health check
            await one()
        began = time.process_time()
        for _ in range(requests):
            await one()
        tracing = getattr(gateway, "tracing", None)  # None: off, or the code before it
        if tracing:  # the spans still in the batch are part of the cost
            tracing.provider.force_flush()
        took = time.process_time() - began
    return took / requests * 1e6


def _child(args: argparse.Namespace) -> None:
    import uvloop

    from proxy.logs import configure_logging

    # The access lines go out as the gateway writes them (JSON), to nowhere.
    out, sys.stdout = sys.stdout, open(os.devnull, "w")
    configure_logging("json")
    print(uvloop.run(_measure(args.measure, args.upstream, args.sink, args.requests)), file=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="a tree of the code before tracing, measured as 'base'")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        _child(args)
        return
    up_port, sink_port = _free_port(), _free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    sink = f"http://127.0.0.1:{sink_port}"
    helpers = [subprocess.Popen([sys.executable, "-m", "benchmarks.responder", "--port",
                                 str(up_port)], cwd=ROOT, stdout=subprocess.DEVNULL),
               subprocess.Popen([sys.executable, "-c", SINK, str(sink_port)])]
    jobs = [("off", ROOT), ("on", ROOT), ("sampled-out", ROOT)]
    if args.base:
        jobs.insert(0, ("base", Path(args.base).resolve()))
    results: dict[str, list[float]] = {name: [] for name, _ in jobs}
    try:
        time.sleep(1.0)
        for _ in range(args.rounds):
            for name, tree in jobs:
                variant = "off" if name == "base" else name
                out = subprocess.run(
                    [sys.executable, __file__, "--measure", variant, "--upstream", upstream,
                     "--sink", sink, "--requests", str(args.requests)],
                    cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True,
                    capture_output=True, text=True)
                results[name].append(float(out.stdout.split()[-1]))
    finally:
        for helper in helpers:
            helper.terminate()
            helper.wait()
    for name, values in results.items():
        print(f"{name:12s} {statistics.median(values):7.1f} us CPU/request  "
              f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
