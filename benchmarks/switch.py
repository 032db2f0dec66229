"""The model switch, end to end: two simulated models, room for one, a request for each in turn.

Each request after the first two finds the other model loaded: with ``sleep_level`` it costs the
other's sleep and its own wake; without, the other's stop and its own cold start. Prints the
seconds of each switch (a whole request: the gateway on a real socket, the simulators started by
the process launcher) for both, best and median.

    .venv/bin/python -m benchmarks.switch [--start-delay 3] [--wake-delay 0.2] [--switches 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import anyio
import httpx2

from tests.support import chat, make_config, serving, sim_model


def models(start_delay: float, wake_delay: float, sleep: bool) -> list[dict[str, Any]]:
    args = ["--startup-delay", str(start_delay), "--enable-sleep-mode", "--wake-delay",
            str(wake_delay)]
    extra: dict[str, Any] = {"sleep_level": 1} if sleep else {}
    return [sim_model(name, *args, env={"VLLM_SERVER_DEV_MODE": "1"},
                      startup_timeout=start_delay + 30, **extra) for name in ("a", "b")]


async def switches(start_delay: float, wake_delay: float, count: int, sleep: bool) -> list[float]:
    config = make_config(models(start_delay, wake_delay, sleep),
                         gateway={"max_models_concurrent": 1,
                                  "placement_timeout": start_delay + 30})
    times = []
    async with serving(config) as (url, _), httpx2.AsyncClient(timeout=start_delay + 60) as http:
        for i in range(count + 2):
            began = time.perf_counter()
            answer = await http.post(url + "/v1/chat/completions", json=chat("ab"[i % 2]))
            assert answer.status_code == 200, answer.text
            if i >= 2:  # the first two are cold starts either way
                times.append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start-delay", type=float, default=3.0)
    parser.add_argument("--wake-delay", type=float, default=0.2)
    parser.add_argument("--switches", type=int, default=6)
    args = parser.parse_args()
    for sleep in (True, False):
        times = anyio.run(switches, args.start_delay, args.wake_delay, args.switches, sleep)
        label = "sleep_level = 1" if sleep else "no sleep (stop) "
        print(f"{label}: switch best {min(times):.3f} s, median {statistics.median(times):.3f} s "
              f"over {len(times)} (simulator start {args.start_delay:g} s, wake "
              f"{args.wake_delay:g} s)", file=sys.stdout)


if __name__ == "__main__":
    main()
