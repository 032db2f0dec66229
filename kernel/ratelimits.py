"""Tenants' rate windows and usage: the seam a shared store plugs into, as ``kernel.accounting``
is for the queues.

Each tenant has two windows, its requests and its tokens (prompt + completion) of the last
minute, a sliding minute in steps of a second: a second's use leaves the window 60 s after that
second began. ``admit`` counts a request of a tenant with ``rpm_limit`` or ``tpm_limit`` into
its requests window, unless a window is spent: the requests window holds ``rpm_limit``, or the
tokens window holds ``tpm_limit`` (a request's tokens are known only once it answered, so the
window is spent once they reach the limit, and the request that spends it is not cut off). It
says where each limited window stands (``Window``: what the ``x-ratelimit-*`` headers say).
``record`` adds an answered request's tokens to its tenant's tokens window (and the request to
its requests window, where ``admit`` did not count it) and its usage per model: requests,
prompt and completion tokens, errors, seconds waited for a slot. ``report`` reads both back for
``GET /admin/tenants``.

State is kept by tenant name, in objects the gateway owns, so that a configuration reloaded
keeps it. ``InMemoryLedger`` is the one of a single process (a monotonic clock);
``cluster.ratelimits.RedisLedger`` the one of every process sharing a Redis (the Redis server's
clock, so that the processes' clocks do not matter). ``in_flight`` is this process's requests
of each tenant now (queued or answering), kept by the tenants layer.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kernel.config import TenantSettings

# Seconds in a window, and in one of its steps.
WINDOW_S = 60
# A model's usage, in the order ``record`` takes it and ``report`` gives it.
USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "errors", "queue_wait_s")


@dataclass(frozen=True, slots=True)
class Window:
    """One limit of a tenant as a request found it."""

    limit: int
    used: int
    # Seconds until the window holds none of its present use (OpenAI's "reset").
    reset: float
    # Seconds until the window has room again (0: it has).
    retry_after: float

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def spent(self) -> bool:
        return self.used >= self.limit


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ``admit`` found: the tenant's limited windows (None: no such limit), and whether
    the request was counted (it was unless a window was spent)."""

    requests: Window | None
    tokens: Window | None
    admitted: bool


@dataclass(frozen=True, slots=True)
class Spent:
    """What one answered request used, for ``record``."""

    tenant: str
    model: str
    # Whether it goes into its tenant's requests window here (``admit`` did not count it, and
    # it was not refused).
    count_request: bool
    prompt_tokens: int
    completion_tokens: int
    error: bool
    queue_wait_s: float


class Ledger(Protocol):
    """The tenants' windows and usage."""

    # This process's requests of each tenant now (queued or answering).
    in_flight: Counter[str]

    async def admit(self, tenant: TenantSettings) -> Verdict:
        """Count a request of a tenant with a rate limit, unless a window is spent."""

    async def record(self, spent: Spent) -> None:
        """An answered (or refused) request's tokens and usage."""

    async def report(self, tenants: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Per tenant: ``requests`` and ``tokens`` in its windows now, and ``usage`` per model
        (``USAGE_FIELDS``)."""


def window_figures(seconds: Iterable[tuple[int, int]], now: float,
                   limit: int) -> tuple[int, float, float]:
    """The use, reset and retry-after of a window of ``(second, use)`` steps that are all
    within the minute before ``now``."""
    steps = sorted(seconds)
    used = sum(n for _, n in steps)
    if not steps:
        return 0, 0.0, 0.0
    reset = max(0.0, steps[-1][0] + WINDOW_S - now)
    retry = 0.0
    left = used
    for second, n in steps:
        if left < limit:
            break
        left -= n
        retry = max(0.0, second + WINDOW_S - now)
    return used, reset, retry


class _Steps:
    """One window in memory: its use per second, for the seconds of the last minute."""

    __slots__ = ("use",)

    def __init__(self) -> None:
        self.use: dict[int, int] = {}

    def live(self, now: float) -> dict[int, int]:
        oldest = math.floor(now) - WINDOW_S + 1
        if self.use and min(self.use) < oldest:
            self.use = {s: n for s, n in self.use.items() if s >= oldest}
        return self.use

    def window(self, now: float, limit: int) -> Window:
        used, reset, retry = window_figures(self.live(now).items(), now, limit)
        return Window(limit, used, reset, retry)

    def add(self, now: float, n: int) -> None:
        if n:
            second = math.floor(now)
            self.use[second] = self.use.get(second, 0) + n


class InMemoryLedger:
    """The windows and usage of one process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.in_flight: Counter[str] = Counter()
        self._requests: defaultdict[str, _Steps] = defaultdict(_Steps)
        self._tokens: defaultdict[str, _Steps] = defaultdict(_Steps)
        self._usage: defaultdict[str, dict[str, list[float]]] = defaultdict(dict)

    async def admit(self, tenant: TenantSettings) -> Verdict:
        now = self.clock()
        steps = self._requests[tenant.name]
        requests = steps.window(now, tenant.rpm_limit) if tenant.rpm_limit else None
        tokens = (self._tokens[tenant.name].window(now, tenant.tpm_limit)
                  if tenant.tpm_limit else None)
        if (requests and requests.spent) or (tokens and tokens.spent):
            return Verdict(requests, tokens, admitted=False)
        steps.add(now, 1)
        if requests is not None:
            requests = Window(requests.limit, requests.used + 1,
                              math.floor(now) + WINDOW_S - now, 0.0)
        return Verdict(requests, tokens, admitted=True)

    async def record(self, spent: Spent) -> None:
        now = self.clock()
        if spent.count_request:
            self._requests[spent.tenant].add(now, 1)
        self._tokens[spent.tenant].add(now, spent.prompt_tokens + spent.completion_tokens)
        usage = self._usage[spent.tenant].setdefault(spent.model, [0] * len(USAGE_FIELDS))
        for i, n in enumerate((1, spent.prompt_tokens, spent.completion_tokens,
                               int(spent.error), spent.queue_wait_s)):
            usage[i] += n

    async def report(self, tenants: Iterable[str]) -> dict[str, dict[str, Any]]:
        now = self.clock()
        return {name: {
            "requests": sum(self._requests[name].live(now).values()),
            "tokens": sum(self._tokens[name].live(now).values()),
            "usage": {model: _usage(figures)
                      for model, figures in self._usage.get(name, {}).items()},
        } for name in tenants}


def _usage(figures: Iterable[float]) -> dict[str, float]:
    usage = dict(zip(USAGE_FIELDS, figures, strict=True))
    usage["queue_wait_s"] = round(usage["queue_wait_s"], 3)
    return usage
