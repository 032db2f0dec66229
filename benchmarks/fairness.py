"""Tenants in one model's queue (#28), through a ``vllm-gateway serve`` process to a simulator:
``.venv/bin/python -m benchmarks.fairness [--seconds 12]``.

The model has 4 slots and each answer takes 0.1 s (5 tokens at 50 tokens/s): 40 requests a
second at most. Requests arrive at a steady rate per tenant, each tenant with its own key; the
queue wait of each request is read from the gateway's access log (``queue_wait_ms``).

- small alone: the small tenant, 5 requests a second, by itself;
- flood, FIFO: the small tenant beside a big one sending 10x its rate (55 a second, more than
  the model's 40), both keys in one tenant: one line in the order requests came, as before
  tenants;
- flood, fair: the same load, each key its own ``[[tenants]]`` table of equal weight;
- the bound: a ``priority = 1`` tenant keeps the model saturated (50 a second) while a
  ``priority = -1`` one sends 2 a second, ``gateway.max_priority_wait = 1``.

Prints, per case and tenant, the requests answered and the p50, p90 and largest queue wait.
With ``--redis`` the gateway keeps its queues in a private redis-server (``[cluster]``, each
case under a key prefix of its own): the same rules, in Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio
import httpx2

from tests.support import chat, gateway_process, redis_server, simulator

SLOTS = 4
TOKENS = 5
TOKENS_PER_SECOND = 50.0
KEYS = {"small": "sk-small-0000000000000001", "big": "sk-big-00000000000000001",
        "low": "sk-low-00000000000000001", "high": "sk-high-0000000000000001"}


def config(sim_url: str, tenants: str, gateway: str = "") -> str:
    return (f'[gateway]\nlog_format = "json"\nqueue_timeout = 60\n{gateway}\n'
            f'[[models]]\nname = "m"\nlauncher = "static"\nurl = "{sim_url}"\n'
            f"max_concurrent = {SLOTS}\nmax_queue_size = 2000\n{tenants}")


def tenant_tables(*names: str, **priorities: int) -> str:
    return "".join(f'[[tenants]]\nname = "{name}"\nkeys = ["{KEYS[name]}"]\n'
                   f"priority = {priorities.get(name, 0)}\n" for name in names)


def one_tenant(*names: str) -> str:
    return "[auth]\napi_keys = [" + ", ".join(f'"{KEYS[n]}"' for n in names) + "]\n"


async def send(url: str, rates: dict[str, float], seconds: float) -> None:
    """Each tenant's requests at its steady rate for ``seconds``; each request's id names its
    tenant."""
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx2.AsyncClient(timeout=120, limits=limits) as client, \
            anyio.create_task_group() as tg:

        async def one(name: str, number: int) -> None:
            await client.post(url + "/v1/chat/completions", json=chat("m", max_tokens=TOKENS),
                              headers={"authorization": f"Bearer {KEYS[name]}",
                                       "x-request-id": f"{name}-{number}"})

        async def tenant(name: str, rate: float) -> None:
            began = anyio.current_time()
            for number in range(int(rate * seconds)):
                await anyio.sleep_until(began + number / rate)
                tg.start_soon(one, name, number)

        for name, rate in rates.items():
            tg.start_soon(tenant, name, rate)


def waits(log: Path) -> tuple[dict[str, list[float]], dict[str, Counter[int]]]:
    """Each tenant's queue waits in seconds of its answered requests, and the statuses of the
    others, from the access log."""
    out: dict[str, list[float]] = {}
    failed: dict[str, Counter[int]] = {}
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        name = str(entry.get("request_id", "")).split("-")[0]
        if entry.get("event") != "request" or name not in KEYS:  # not a health check
            continue
        if entry.get("status") == 200:
            out.setdefault(name, []).append((entry.get("queue_wait_ms") or 0.0) / 1000)
        else:
            failed.setdefault(name, Counter())[entry.get("status")] += 1
    return out, failed


def case(label: str, directory: Path, text: str, rates: dict[str, float], seconds: float,
         redis_url: str | None) -> None:
    directory.mkdir()
    if redis_url is not None:
        text += f'[cluster]\nredis_url = "{redis_url}"\nkey_prefix = "{directory.name}"\n'
    with gateway_process(text, directory) as (url, _):
        anyio.run(send, url, rates, seconds)
    answered, failed = waits(directory / "gateway.log")
    for name, each in sorted(answered.items()):
        each.sort()
        p50, p90 = statistics.median(each), each[int(0.9 * (len(each) - 1))]
        others = ", ".join(f"{n} x {status}" for status, n in sorted(failed.get(name, {}).items()))
        print(f"{label:<14} {name:<6} {len(each):>5} answered   queue wait p50 {p50 * 1000:7.0f} "
              f"ms   p90 {p90 * 1000:7.0f} ms   max {each[-1] * 1000:7.0f} ms"
              + (f"   not answered: {others}" if others else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each case")
    parser.add_argument("--redis", action="store_true",
                        help="the queues in a private redis-server ([cluster])")
    args = parser.parse_args()
    seconds = args.seconds
    flood = {"small": 5.0, "big": 50.0}
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        redis_url = stack.enter_context(redis_server(work)) if args.redis else None
        sim = stack.enter_context(
            simulator("--tokens-per-second", str(TOKENS_PER_SECOND), model="m"))
        case("small alone", work / "alone", config(sim.url, one_tenant("small")),
             {"small": 5.0}, seconds, redis_url)
        case("flood, FIFO", work / "fifo", config(sim.url, one_tenant("small", "big")),
             flood, seconds, redis_url)
        case("flood, fair", work / "fair", config(sim.url, tenant_tables("small", "big")),
             flood, seconds, redis_url)
        case("the bound", work / "bound",
             config(sim.url, tenant_tables("low", "high", low=-1, high=1),
                    "max_priority_wait = 1"),
             {"low": 2.0, "high": 50.0}, seconds, redis_url)
    print(f"({time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
