"""``FairRedisAccounting``: ``cluster.accounting.RedisAccounting`` with the tenants' order in each
model's queue (``kernel.fair_accounting``'s rules: priorities within ``max_priority_wait``,
shares by weight, each tenant's ``max_concurrent``), exact across the processes.

Its script is ``accounting.lua`` with ``fair_accounting.lua`` before its ops, which replaces
how a ticket is queued, handed its slot, dropped, registered again and placed:
every decision is still one atomic call, the leases, the reclaim of a dead process's tickets
and the inbox wake-ups are ``RedisAccounting``'s. Each call sends the tenants' priority,
weight and bound (the same in every process: they are part of what the members share,
``kernel.config.shared``); each ticket names its tenant, in Redis and in the heartbeat (a Redis
that lost it registers it again under its tenant). A first come first served configuration
(``Config.fair_queues`` false) runs ``RedisAccounting`` and its script alone, at no cost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.accounting import SCRIPT, RedisAccounting, RedisTicket
from kernel.accounting import Ticket, removed
from kernel.config import Config, TenantSettings

# accounting.lua with the tenants' rules before its ops.
_OPS = SCRIPT.index("\nlocal result = 0\n")
FAIR_SCRIPT = (SCRIPT[:_OPS] + "\n" + Path(__file__).with_name("fair_accounting.lua").read_text()
               + SCRIPT[_OPS:])


def redis_accounting(config: Config) -> RedisAccounting:
    """The accounting of a [cluster]: fair where tenants differ, else first come first served
    (as ``kernel.fair_accounting.in_memory_accounting`` picks in one process)."""
    return FairRedisAccounting(config) if config.fair_queues else RedisAccounting(config)


class FairRedisTicket(RedisTicket):
    __slots__ = ("tenant",)

    def __init__(self, ticket_id: str, model: str, tenant: str) -> None:
        super().__init__(ticket_id, model)
        self.tenant = tenant


class FairRedisAccounting(RedisAccounting):
    script = FAIR_SCRIPT

    def __init__(self, config: Config) -> None:
        self._tenants: list[Any] = []
        super().__init__(config)

    def _configure(self, config: Config, kept: dict[str, int]) -> None:
        super()._configure(config, kept)
        self._default = config.default_tenant
        self._tenants = [len(config.tenants), round(config.gateway.max_priority_wait * 1000)]
        for tenant in config.tenants:
            self._tenants += [tenant.name, tenant.priority, 1.0 / tenant.weight,
                              tenant.max_concurrent or 0]

    async def _call(self, op: str, *args: Any) -> Any:
        return await super()._call(op, *self._tenants, *args)

    async def join(self, model: str, tenant: TenantSettings | None = None) -> Ticket | None:
        if model not in self._limits:  # removed by a reload after this request's admission
            raise removed(model)
        name = (tenant or self._default).name
        return await self._join(
            FairRedisTicket(f"{self.owner}:{next(self._numbers)}", model, name), name)

    def _live(self, ticket: RedisTicket) -> list[Any]:
        assert isinstance(ticket, FairRedisTicket)
        return [*super()._live(ticket), ticket.tenant]

    async def in_flight_by_tenant(self, default: str) -> dict[str, int]:
        flat = await self._call("counts")
        return {name: int(count) for name, count in zip(flat[::2], flat[1::2], strict=True)}
