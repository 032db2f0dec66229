"""A process that holds slots of a cluster's model (``python -m tests.cluster.holder URL PREFIX
LEASE_S SLOTS``): its accounting takes ``SLOTS`` slots of the model ``held`` (its
``max_concurrent``), prints ``held`` and waits to be killed."""

from __future__ import annotations

import dataclasses
import sys

import anyio

from cluster.accounting import RedisAccounting
from kernel.config import ClusterSettings, config_from_mapping


async def main(url: str, prefix: str, lease_s: float, slots: int) -> None:
    cluster = ClusterSettings(redis_url=url, key_prefix=prefix, lease_s=lease_s, enabled=True,
                              heartbeat=lease_s / 4)
    # (Not tests.support: what it imports would take seconds to load.)
    models = [{"name": "held", "launcher": "static", "url": "http://127.0.0.1:9",
               "max_concurrent": slots}]
    config = dataclasses.replace(config_from_mapping({"models": models}), cluster=cluster)
    async with RedisAccounting(config).running() as accounting:
        for _ in range(slots):
            ticket = await accounting.join("held")
            assert ticket is not None and await accounting.acquire(ticket)
        print("held", flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
