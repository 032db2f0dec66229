"""A process that contends for a cluster's pool (``python -m tests.cluster.contender URL PREFIX
LEASE_S``) and says on stdout, one JSON line each, what happens: ``contending`` (after its first
claim), ``owner elected`` (its token), ``owner stepped down``, and, every 50 ms once it has held
a token, whether a fenced action of it passes (``fence``: true or false) and whether Redis still
takes its last token (``valid``)."""

from __future__ import annotations

import dataclasses
import json
import sys

import anyio
import coredis
import structlog

from cluster.owner import NotOwner, OwnerLease
from kernel.config import ClusterSettings, config_from_mapping


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def main(url: str, prefix: str, lease_s: float) -> None:
    cluster = ClusterSettings(redis_url=url, key_prefix=prefix, lease_s=lease_s, enabled=True,
                              heartbeat=lease_s / 4)
    # (Not tests.support: what it imports would take seconds to load.)
    models = [{"name": "a", "launcher": "static", "url": "http://127.0.0.1:9"}]
    config = dataclasses.replace(config_from_mapping({"models": models}), cluster=cluster)
    lease = OwnerLease(config, f"contender-{prefix}-{id(config)}",
                       on_event=lambda what, fields: say(event=what, token=fields["token"]))
    last: int | None = None
    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        async with lease.running(client):
            say(event="contending")
            while True:
                await anyio.sleep(0.05)
                last = lease.token or last
                if last is None:
                    continue
                try:
                    fenced = await lease.fence() == last
                except NotOwner:
                    fenced = False
                say(fence=fenced, valid=await lease.valid(last), token=last)


if __name__ == "__main__":
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    anyio.run(main, sys.argv[1], sys.argv[2], float(sys.argv[3]))
