"""How long admitting one large body stalls the event loop:
``python -m benchmarks.body_stall [--mib 10] [--reps 5]``.

The admission layer alone, on uvloop, takes a JSON body of ``--mib`` MiB (a completion whose
prompt is an array of token ids, and chat messages) in 64 KiB messages, as hypercorn hands it
over; a ticker that sleeps 1 ms at a time records the longest gap between its wake-ups (what
every stream on the gateway waits while the body is parsed) and the whole time taken.
"""

from __future__ import annotations

import argparse
import json
import time

import anyio
from anyio.lowlevel import checkpoint

from kernel.config import config_from_mapping
from middleware.admission import Admission

CHUNK = 1 << 16


def _body(mib: int) -> bytes:
    messages = [{"role": "user", "content": "hello " * 50}] * 1000
    prompt = list(range(mib * 1024 * 1024 // 8))
    raw = json.dumps({"model": "m", "messages": messages, "prompt": prompt}).encode()
    return raw[:mib * 1024 * 1024 - 1].rsplit(b",", 1)[0] + b"]}"


async def _once(layer: Admission, raw: bytes) -> tuple[float, float]:
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await anyio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    chunks = [raw[i:i + CHUNK] for i in range(0, len(raw), CHUNK)]

    async def receive() -> dict:
        await checkpoint()
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict) -> None:
        pass

    async def inner(scope: dict, receive: object, send: object) -> None:
        pass

    layer.app = inner
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())]}
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.01)
        began = time.perf_counter()
        await layer(scope, receive, send)
        took = time.perf_counter() - began
        done = True
    return worst, took


async def main(mib: int, reps: int) -> None:
    config = config_from_mapping({
        "gateway": {"max_body_bytes": (mib + 1) << 20,
                    "max_buffered_body_bytes": (mib + 1) << 20},
        "models": [{"name": "m", "launcher": "static", "url": "http://127.0.0.1:1"}]},
        source="benchmark")
    layer = Admission(None, config=config)  # type: ignore[arg-type]
    raw = _body(mib)
    json.loads(raw)
    results = [await _once(layer, raw) for _ in range(reps)]
    stalls = sorted(round(w * 1000, 1) for w, _ in results)
    took = sorted(round(t * 1000, 1) for _, t in results)
    print(f"{len(raw) / 2 ** 20:.1f} MiB body, {reps} reps: longest loop stall ms {stalls} "
          f"(best {stalls[0]}), whole admission ms {took} (best {took[0]})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    anyio.run(main, args.mib, args.reps, backend_options={"use_uvloop": True})
