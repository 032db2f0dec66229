"""One replica of a model against two, on the same simulated backend, the per-replica slots
fixed: requests per second and latency through the whole gateway (a real socket, the
simulators started by the process launcher).

Each simulator paces every generation (``--tokens-per-second``), so a replica's throughput is
its ``max_concurrent`` slots over the generation's length; the clients keep more requests in
flight than two replicas have slots. ``scale-out`` starts with no replica and may add a second
after ``scale_up_after`` of saturation: its figure includes the cold starts.

    .venv/bin/python -m benchmarks.replicas [--seconds 10] [--clients 24] [--slots 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import anyio
import httpx2

from backends.pool import ModelState
from tests.support import chat, eventually, make_config, serving, sim_model

LAYOUTS: dict[str, dict[str, Any]] = {
    "1 replica": {"max_replicas": 1, "min_replicas": 1},
    "2 replicas": {"max_replicas": 2, "min_replicas": 2},
    "scale-out 0->2": {"max_replicas": 2, "min_replicas": 0, "scale_up_after": 0.5},
}


async def measure(layout: dict[str, Any], *, seconds: float, clients: int, slots: int,
                  tokens: int, tokens_per_second: float) -> dict[str, float]:
    model = sim_model("m", "--tokens-per-second", str(tokens_per_second), max_concurrent=slots,
                      **layout)
    config = make_config([model], gateway={"queue_timeout": 120.0, "max_queue_size": 1000})
    latencies: list[float] = []
    failures = 0
    async with serving(config) as (url, gateway), httpx2.AsyncClient(
            timeout=120, limits=httpx2.Limits(max_connections=clients)) as http:
        replicas = gateway.pool.replicas["m"]
        warm = layout["min_replicas"]
        await eventually(lambda: sum(r.state is ModelState.READY for r in replicas) == warm,
                         within=60)
        body = chat("m", max_tokens=tokens)
        began = time.perf_counter()
        end = began + seconds

        async def client() -> None:
            nonlocal failures
            while time.perf_counter() < end:
                sent = time.perf_counter()
                answer = await http.post(url + "/v1/chat/completions", json=body)
                if answer.status_code == 200:
                    latencies.append(time.perf_counter() - sent)
                else:
                    failures += 1

        async with anyio.create_task_group() as tg:
            for _ in range(clients):
                tg.start_soon(client)
        took = time.perf_counter() - began
        ready = sum(r.starts for r in replicas)
    return {"req_s": len(latencies) / took, "p50_s": statistics.median(latencies),
            "p99_s": sorted(latencies)[int(len(latencies) * 0.99) - 1] if latencies else 0.0,
            "failures": failures, "starts": ready}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--slots", type=int, default=4, help="max_concurrent per replica")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--tokens-per-second", type=float, default=50.0)
    args = parser.parse_args()
    ideal = args.slots * args.tokens_per_second / args.tokens
    print(f"{args.clients} clients, {args.slots} slots per replica, {args.tokens} tokens at "
          f"{args.tokens_per_second:g}/s (a replica's ideal: {ideal:.1f} req/s), "
          f"{args.seconds:g} s each", file=sys.stdout)
    for name, layout in LAYOUTS.items():
        got = anyio.run(lambda layout=layout: measure(
            layout, seconds=args.seconds, clients=args.clients, slots=args.slots,
            tokens=args.tokens, tokens_per_second=args.tokens_per_second))
        print(f"{name:>15}: {got['req_s']:6.1f} req/s, p50 {got['p50_s']:.3f} s, p99 "
              f"{got['p99_s']:.3f} s, {got['failures']} failed, {got['starts']} server starts",
              file=sys.stdout)


if __name__ == "__main__":
    main()
