"""The replica choice (``backends.routing.route``) and the prefix index, as pure functions: the
longest prefix within the load bound, the rendezvous fallback that every process computes
alike, sessions first, the index's bound and what it forgets."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from backends.pool import Ask, ModelState, route
from backends.prefixes import PrefixIndex
from middleware.prompt_prefix import chained_blocks

SLACK = SimpleNamespace(affinity_slack=1.5)


def replicas(*leases: int, slots: int = 8, down: tuple[int, ...] = ()) -> list[Any]:
    return [SimpleNamespace(state=ModelState.STOPPED if i in down else ModelState.READY,
                            yields_to=None, replica=i, leases=n, slots=slots, settings=SLACK)
            for i, n in enumerate(leases)]


def prompt(name: str, blocks: int = 8) -> tuple[int, ...]:
    """A prompt of ``blocks`` whole blocks of 16 characters."""
    return chained_blocks((name * 200)[:16 * blocks], 16)


def home(index: PrefixIndex, blocks: tuple[int, ...], servers: list[Any]) -> int:
    chosen = route(servers, Ask(blocks=blocks), index)
    assert chosen is not None
    return chosen.replica


def test_a_prompt_goes_to_the_replica_that_holds_its_longest_prefix() -> None:
    index = PrefixIndex(1000)
    shared = prompt("You are a careful assistant. ", 12)
    # Replica 1 got the first 4 blocks, replica 2 the first 8: the longest wins.
    index.record(shared[:4], 1)
    index.record(shared[:8], 2)
    ask = Ask(blocks=shared)
    chosen = route(replicas(0, 0, 0), ask, index)
    assert chosen is not None and chosen.replica == 2
    assert (ask.why, ask.matched) == ("prefix", 8)
    # The whole prompt is now remembered for replica 2: the next one matches all 12.
    again = Ask(blocks=shared)
    route(replicas(0, 0, 0), again, index)
    assert (again.why, again.matched) == ("prefix", 12)


@pytest.mark.parametrize(("leases", "slots", "expected", "why"), [
    # Replica 0 holds the prefix. Ready load 2+0+0: the bound is ceil(1.5 x 3 / 3) = 2, and
    # replica 0 has 2 already: passed over for the one of the others that the hash picks.
    ((2, 0, 0), 8, None, "hash"),
    # 1+1+1: bound ceil(1.5 x 4 / 3) = 2, replica 0 has 1: it keeps the prefix.
    ((1, 1, 1), 8, 0, "prefix"),
    # No free slot on replica 0.
    ((1, 0, 0), 1, None, "hash"),
    # Every replica over the bound: the least loaded.
    ((1, 1, 1), 1, 0, "load"),
])
def test_the_prefix_holder_is_passed_over_beyond_the_load_bound(
        leases: tuple[int, ...], slots: int, expected: int | None, why: str) -> None:
    index = PrefixIndex(1000)
    blocks = prompt("a long shared system prompt ")
    index.record(blocks, 0)
    ask = Ask(blocks=blocks)
    chosen = route(replicas(*leases, slots=slots), ask, index)
    assert chosen is not None and ask.why == why
    if expected is None:
        assert chosen.replica != 0
    else:
        assert chosen.replica == expected


def test_with_no_match_every_process_picks_the_same_replica_by_the_first_block() -> None:
    """Two independent indexes (two gateway processes) send a new prompt to the same replica,
    and different prompts spread over the replicas."""
    picked = set()
    for i in range(30):
        blocks = prompt(f"agent {i}: you are ")
        first, second = PrefixIndex(100), PrefixIndex(100)
        ask = Ask(blocks=blocks)
        one = home(first, blocks, replicas(0, 0, 0, 0))
        assert route(replicas(0, 0, 0, 0), ask, second) is not None
        assert ask.why == "hash" and ask.matched == 0
        assert home(second, blocks, replicas(0, 0, 0, 0)) == one
        picked.add(one)
    assert picked == {0, 1, 2, 3}


def test_a_new_prompt_with_a_known_first_block_follows_it() -> None:
    """An agent's growing conversation: the longer prompt shares its start with the earlier one
    and goes where that went, though its own first block's hash might pick another."""
    index = PrefixIndex(1000)
    start = "You are an agent. Tools: search, read. " * 4
    short = chained_blocks(start + "user: find the file", 16)
    longer = chained_blocks(start + "user: find the file\nassistant: found it\nuser: open it", 16)
    before = home(index, short, replicas(0, 0))
    ask = Ask(blocks=longer)
    chosen = route(replicas(0, 0), ask, index)
    assert chosen is not None and chosen.replica == before
    assert ask.why == "prefix" and ask.matched == len(short)


def test_a_session_wins_over_the_prefix() -> None:
    index = PrefixIndex(1000)
    blocks = prompt("shared ")
    index.record(blocks, 0)
    session = next(f"user-{i}" for i in range(100)
                   if route(replicas(0, 0), Ask(f"user-{i}")).replica == 1)  # type: ignore[union-attr]
    ask = Ask(session, blocks)
    chosen = route(replicas(0, 0), ask, index)
    assert chosen is not None and chosen.replica == 1 and ask.why == "session"


def test_without_an_index_or_blocks_the_least_loaded_takes_it() -> None:
    ask = Ask(blocks=prompt("x"))
    chosen = route(replicas(3, 1, 2), ask)  # routing = "least_loaded": no index
    assert chosen is not None and chosen.replica == 1 and ask.why == "load"
    ask = Ask()
    chosen = route(replicas(3, 1, 2), ask, PrefixIndex(10))  # a prompt shorter than a block
    assert chosen is not None and chosen.replica == 1 and ask.why == "load"


def test_only_ready_replicas_are_matched() -> None:
    index = PrefixIndex(1000)
    blocks = prompt("shared ")
    index.record(blocks, 1)
    ask = Ask(blocks=blocks)
    chosen = route(replicas(0, 0, down=(1,)), ask, index)
    assert chosen is not None and chosen.replica == 0 and ask.why == "hash"


def test_the_index_keeps_at_most_its_size_and_drops_the_least_recently_used_first() -> None:
    index = PrefixIndex(10)
    old, new = prompt("old ", 6), prompt("new ", 6)
    index.record(old, 0)
    index.record(new, 1)
    assert len(index) == 10
    # The old prompt lost its deep end first; its first blocks are kept the longest.
    assert index.longest(old, 0b11) == (4, 0b01)
    assert index.longest(new, 0b11) == (6, 0b10)
    # Used again, the old prompt's start becomes the most recent: the rest of it goes first,
    # then the new one's end.
    index.record(old[:2], 0)
    index.record(prompt("third ", 4), 2)
    assert index.longest(old, 0b111) == (2, 0b001)
    assert index.longest(new, 0b111) == (4, 0b010)
    assert len(index) == 10


def test_a_replica_forgotten_holds_nothing_and_shared_blocks_stay_with_the_others() -> None:
    index = PrefixIndex(100)
    shared, own = prompt("shared ", 4), prompt("own ", 4)
    index.record(shared, 0)
    index.record(shared, 1)
    index.record(own, 1)
    index.forget(1)
    assert index.longest(shared, 0b11) == (4, 0b01)
    assert index.longest(own, 0b11) == (0, 0)
    assert len(index) == 4
