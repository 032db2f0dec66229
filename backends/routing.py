"""Which ready replica of a model takes a request: the choice, a pure function of the replicas,
the request's ``Ask`` and the model's prefix index.

In order:
- a session (``user``, ``x-session-id``) goes to its replica: the highest rendezvous hash of
  session and replica;
- else, with a prefix index (``routing = "prefix"``) and a prompt of at least one block, the
  replica that holds the longest run of the prompt's blocks (``prefixes``); none holds its
  first block: the highest rendezvous hash of the first block and the replica, which every
  gateway process computes alike, so that they agree without asking each other; of several
  that hold as many blocks, that hash decides too;
- else, or when the replica chosen so would be over the bound, the least loaded (the first of
  equals, so that a light load keeps to few replicas and the others go idle).
The bound is the same for sessions and prefixes (bounded-load consistent hashing): a replica
with no free slot, or with more than ``affinity_slack`` times the average load of the ready
replicas (the new request counted), is passed over. Each choice says why (``Ask.why``:
``session``, ``prefix``, ``hash``, ``load``) and how many blocks matched; the blocks are then
remembered for the replica chosen, whatever the reason, since its cache now holds them.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .states import ModelState

if TYPE_CHECKING:
    from .prefixes import PrefixIndex
    from .server import Backend

SESSION = "session"
PREFIX = "prefix"
HASH = "hash"
LOAD = "load"
REASONS = (SESSION, PREFIX, HASH, LOAD)


@dataclass(slots=True)
class Ask:
    """What a request says about the replica it goes to, and, once routed, why it went there."""

    session: str | None = None
    # The prompt's chained block hashes (``middleware.prompt_prefix``); empty: go by load.
    blocks: Sequence[int] = ()
    # The replica whose connect failed: another one, while another is ready.
    avoid: int | None = None
    # The LoRA adapter the request names: a replica that holds it is preferred.
    adapter: str | None = None
    why: str = ""
    matched: int = 0


def _ready(replicas: list[Backend], avoid: int | None) -> list[Backend]:
    return [r for r in replicas if r.state is ModelState.READY and r.yields_to is None
            and r.replica != avoid]


def route(replicas: list[Backend], ask: Ask, index: PrefixIndex | None = None) -> Backend | None:
    """The ready replica the request goes to (see the module's docstring), or None if none is
    ready. Fills in ``ask.why`` and ``ask.matched``, and records the blocks in ``index``."""
    ready = _ready(replicas, ask.avoid)
    if not ready and ask.avoid is not None:
        ready = _ready(replicas, None)  # the replica whose connect failed is the only one ready
    if not ready:
        return None
    total = 0
    least = ready[0]
    for r in ready:
        total += r.leases
        if r.leases < least.leases:
            least = r
    bound = math.ceil(least.settings.affinity_slack * (total + 1) / len(ready))
    chosen, ask.why, ask.matched = least, LOAD, 0
    blocks = ask.blocks
    if ask.session is not None:
        # Hashes of ints are the same in every process (a str's is salted per process): a
        # session keeps its replica across a restart of the gateway, which adopts its servers.
        key = zlib.crc32(ask.session.encode())
        affine = max(ready, key=lambda r: hash((key, r.replica)))
        if affine.leases < affine.slots and affine.leases < bound:
            chosen, ask.why = affine, SESSION
    elif blocks and index is not None:
        fits = [r for r in ready if r.leases < r.slots and r.leases < bound]
        if fits:
            among = 0
            for r in fits:
                among |= 1 << r.replica
            ask.matched, holders = index.longest(blocks, among)
            first = blocks[0]
            chosen = max((r for r in fits if not holders or holders >> r.replica & 1),
                         key=lambda r: hash((first, r.replica)))
            ask.why = PREFIX if ask.matched else HASH
    if blocks and index is not None:
        index.record(blocks, chosen.replica)
    return chosen
