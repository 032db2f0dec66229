"""Which replica of a model holds which prompt prefix: the prefix index, bounded.

Keyed by chained block hashes (``middleware.prompt_prefix``): each block the gateway sent to a
replica is remembered with the replicas that got it (a bit per replica), so a new prompt's
longest run of remembered blocks names the replicas whose prefix cache likely holds it. The
index holds at most ``size`` blocks; past that, the least recently used go first. A request's
blocks are touched last to first, so the first blocks of a prompt, which every later request
that shares it touches again, are the last to go, and a chain loses its deep end first. The
index forgets a replica whose cache is gone (its run ended, it went to sleep): a new run starts
with an empty cache. vLLM evicts its own blocks too, unseen here; a replica that no longer holds
a prefix computes it again, as it would have anyway.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixIndex:
    __slots__ = ("blocks", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        # Block hash -> the replicas that got it, as bits (replica n: 1 << n); oldest use first.
        self.blocks: OrderedDict[int, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self.blocks)

    def longest(self, blocks: Sequence[int], among: int) -> tuple[int, int]:
        """How many of ``blocks``, from the first, some replica of ``among`` (bits) got, and
        which of them got that many (bits; 0 when none got the first)."""
        holders = matched = 0
        get = self.blocks.get
        for block in blocks:
            have = get(block, 0) & among
            if not have:
                break
            holders = have
            matched += 1
        return matched, holders

    def record(self, blocks: Sequence[int], replica: int) -> None:
        """``blocks`` went to ``replica``: remember them, the first as the most recent."""
        bit = 1 << replica
        index = self.blocks
        for block in reversed(blocks):
            have = index.get(block)
            if have is None:
                index[block] = bit
            else:
                index[block] = have | bit
                index.move_to_end(block)
        while len(index) > self.size:
            index.popitem(last=False)

    def forget(self, replica: int) -> None:
        """The replica's cache is gone: it holds no block from here on."""
        keep = ~(1 << replica)
        index = self.blocks
        for block, have in list(index.items()):
            have &= keep
            if have:
                index[block] = have  # an existing key keeps its place
            else:
                del index[block]
