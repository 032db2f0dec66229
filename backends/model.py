"""A configured model: its replica set, the requests that wait for it, and its totals.

Owns the per-model figures that belong to no one server: the requests waiting in ``lease``
(``waiting``), those the gateway holds for it outside the pool (``demand``), how many replicas
were last told ready (``serving``), its scale-ups and scale-downs, whether a reload retired it,
the model's state as its replicas make it (the one nearest to serving), and, for a model with
replicas, its prefix index (``routing = "prefix"``) and the counts of its routing choices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kernel.config import PREFIX_ROUTING, ModelSettings

from .prefixes import PrefixIndex
from .routing import REASONS, Ask
from .states import ModelState

if TYPE_CHECKING:
    from .server import Backend

# A model with replicas is in the first of these states that one of them is in.
MODEL_STATE_ORDER = (ModelState.READY, ModelState.WAKING, ModelState.STARTING,
                     ModelState.DRAINING, ModelState.STOPPING, ModelState.ASLEEP,
                     ModelState.FAILED, ModelState.STOPPED)


def _none() -> int:
    return 0


@dataclass(eq=False)
class Model:
    settings: ModelSettings
    # Every server of the model, the first first (``max_replicas``).
    replicas: list[Backend] = field(default_factory=list, repr=False)
    # Requests in ``lease`` waiting for a server of the model.
    waiting: int = 0
    # Requests for the model the gateway holds outside the pool (the pool's ``accounting``).
    demand: Callable[[], int] = _none
    # How many replicas were ready when the accounting was last told (its ``serving``).
    serving: int = 0
    scale_ups: int = 0
    scale_downs: int = 0
    # Why a reload took it out of the configuration (it serves what it has, then stops); None
    # while it is configured.
    retired: str | None = None
    # Which replica holds which prompt prefix (None: the model does not route by prefix).
    prefixes: PrefixIndex | None = field(init=False, repr=False)
    # Requests routed to a replica, by why (``routing.REASONS``), and prompt blocks matched.
    routed: dict[str, int] = field(init=False, repr=False)
    matched_blocks: int = 0

    def __post_init__(self) -> None:
        s = self.settings
        self.prefixes = PrefixIndex(s.prefix_index_size) if (
            s.max_replicas > 1 and s.routing == PREFIX_ROUTING) else None
        self.routed = dict.fromkeys(REASONS, 0)

    @property
    def name(self) -> str:
        return self.settings.name

    def state(self) -> ModelState:
        """Its one server's state, or of its replicas the one nearest to serving."""
        if len(self.replicas) == 1:
            return self.replicas[0].state
        states = {r.state for r in self.replicas}
        return next(s for s in MODEL_STATE_ORDER if s in states)

    def ready(self) -> int:
        return sum(r.state is ModelState.READY for r in self.replicas)

    def routed_by(self, ask: Ask) -> None:
        """Count a request's routing choice."""
        self.routed[ask.why] += 1
        self.matched_blocks += ask.matched

    def forget(self, server: Backend) -> None:
        """The server's prefix cache is gone (its run ended, it went to sleep)."""
        if self.prefixes is not None:
            self.prefixes.forget(server.replica)

    def unserved(self, server: Backend) -> int:
        """The requests that wait for the model, less those its other replicas serve."""
        unserved = self.waiting + self.demand()
        if len(self.replicas) > 1:
            unserved -= sum(r.leases for r in self.replicas if r is not server)
        return unserved
