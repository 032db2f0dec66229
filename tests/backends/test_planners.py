"""The pool's planners by tables: a snapshot of servers, GPU figures, waits and the time in,
a decision out; no event loop, no server."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from backends.planners import (
    BringUp,
    Evict,
    Expire,
    Fits,
    Memory,
    Reap,
    TooBig,
    View,
    Wait,
    place,
    tick,
    yielders,
)
from backends.states import ModelState

R, S, A, W = ModelState.READY, ModelState.STOPPED, ModelState.ASLEEP, ModelState.WAKING
ST, F, D, SP = ModelState.STARTING, ModelState.FAILED, ModelState.DRAINING, ModelState.STOPPING
G0, G1 = (None, 0), (None, 1)
H0 = ("remote", 0)


def v(key: int, state: ModelState = R, **kw: Any) -> View:
    kw.setdefault("model", f"m{key}")
    if "gpus" in kw:
        kw["devices"] = frozenset(kw.pop("gpus"))
    return View(key=key, state=state, **kw)


# The server to place is key 0, starting (not placed yet).
NEW = v(0, ST)
NEW_GPU = v(0, ST, gpus=[G0], need_mb=600, vram_mb=600)

PLACE = [
    ("empty pool", NEW, [], {}, 2, Fits()),
    ("under the budget", NEW, [v(1)], {}, 2, Fits()),
    ("a start not placed holds no slot", NEW, [v(1), v(2, ST)], {}, 3, Fits()),
    ("a placed start holds a slot", NEW, [v(1), v(2, ST, placed=True)], {}, 2, Wait()),
    ("a placed wake holds a slot", NEW, [v(1), v(2, W, placed=True)], {}, 2, Wait()),
    ("asleep holds no slot", NEW, [v(1, A)], {}, 1, Fits()),
    ("failed holds no slot", NEW, [v(1, F)], {}, 1, Fits()),
    ("draining holds a slot", NEW, [v(1, D)], {}, 1, Wait()),
    ("stopping holds a slot", NEW, [v(1, SP)], {}, 1, Wait()),
    ("over budget, busy: wait", NEW, [v(1, leases=1)], {}, 1, Wait()),
    ("over budget, idle: stop it", NEW, [v(1, idle=True)], {}, 1, Evict(1, False, "model budget")),
    ("over budget, idle sleeper: sleep it", NEW, [v(1, idle=True, sleeps=True)], {}, 1,
     Evict(1, True, "model budget")),
    ("least recently used first", NEW, [v(1, idle=True, last_used=5), v(2, idle=True, last_used=3)],
     {}, 2, Evict(2, False, "model budget")),
    ("min_replicas kept", NEW,
     [v(1, idle=True, model="k", min_replicas=1), v(2, leases=1)], {}, 2, Wait()),
    ("above min_replicas one goes", NEW,
     [v(1, idle=True, model="k", min_replicas=1), v(2, model="k", min_replicas=1, leases=1)],
     {}, 2, Evict(1, False, "model budget")),
    ("fits the memory", NEW_GPU, [], {G0: Memory(1000, 300)}, 4, Fits()),
    ("short of memory, nothing idle: wait", NEW_GPU, [v(1, leases=1, gpus=[G0])],
     {G0: Memory(1000, 500)}, 4, Wait()),
    ("short of memory: the idle one on that GPU", NEW_GPU,
     [v(1, idle=True, gpus=[G1], last_used=1), v(2, idle=True, gpus=[G0], last_used=9)],
     {G0: Memory(1000, 500), G1: Memory(1000, 500)}, 4, Evict(2, False, "GPU memory")),
    ("short of memory: one on another GPU does not help", NEW_GPU,
     [v(1, idle=True, gpus=[G1])], {G0: Memory(1000, 500)}, 4, Wait()),
    ("short of memory: asleep on that GPU stopped last", NEW_GPU,
     [v(1, A, gpus=[G0], last_used=1), v(2, idle=True, gpus=[G0], last_used=9)],
     {G0: Memory(1000, 500)}, 4, Evict(2, False, "GPU memory")),
    ("short of memory: asleep stopped when none is idle", NEW_GPU,
     [v(1, A, gpus=[G0], sleeps=True)], {G0: Memory(1000, 500)}, 4,
     Evict(1, False, "GPU memory")),
    ("an asleep one whose sleep is in flight is not taken", NEW_GPU,
     [v(1, A, gpus=[G0], sleeping=True)], {G0: Memory(1000, 500)}, 4, Wait()),
    ("unread memory: the configured figures of those loaded", NEW_GPU,
     [v(1, leases=1, gpus=[G0], vram_mb=500)], {G0: Memory(1000, None)}, 4, Wait()),
    ("unread memory: fits beside them", NEW_GPU,
     [v(1, leases=1, gpus=[G0], vram_mb=400)], {G0: Memory(1000, None)}, 4, Fits()),
    ("unread memory: asleep ones count nothing", NEW_GPU,
     [v(1, A, gpus=[G0], vram_mb=900)], {G0: Memory(1000, None)}, 4, Fits()),
    ("unknown size: placed by the budget only", NEW_GPU, [v(1, leases=1, gpus=[G0])],
     {G0: Memory(None, None)}, 4, Fits()),
    ("no memory needed: any device", replace(NEW_GPU, need_mb=0), [],
     {G0: Memory(1000, 1000)}, 4, Fits()),
    ("a wake needs less what it holds asleep", replace(NEW_GPU, need_mb=100), [],
     {G0: Memory(1000, 950)}, 4, Wait()),
    ("a wake that needs little fits", replace(NEW_GPU, need_mb=50), [],
     {G0: Memory(1000, 950)}, 4, Fits()),
    ("over budget and short: the one on the short GPU first", NEW_GPU,
     [v(1, idle=True, gpus=[G1], last_used=1), v(2, idle=True, gpus=[G0], last_used=9)],
     {G0: Memory(1000, 900)}, 2, Evict(2, False, "model budget")),
    ("the same index on another host is another device", v(0, ST, gpus=[H0], need_mb=600),
     [v(1, idle=True, gpus=[G0])], {H0: Memory(1000, 100), G0: Memory(1000, 900)}, 4, Fits()),
    ("short on the remote host: the idle one there", v(0, ST, gpus=[H0], need_mb=600),
     [v(1, idle=True, gpus=[G0]), v(2, idle=True, gpus=[H0])],
     {H0: Memory(1000, 900), G0: Memory(1000, 100)}, 4, Evict(2, False, "GPU memory")),
]


@pytest.mark.parametrize(("start", "servers", "ledger", "budget", "decision"),
                         [row[1:] for row in PLACE], ids=[row[0] for row in PLACE])
def test_place(start: View, servers: list[View], ledger: dict[Any, Memory], budget: int,
               decision: object) -> None:
    assert place(start, [start, *servers], ledger, budget) == decision


def test_a_server_bigger_than_its_device_is_never_placed() -> None:
    with pytest.raises(TooBig) as big:
        place(NEW_GPU, [NEW_GPU], {G0: Memory(500, 0)}, 4)
    assert (big.value.device, big.value.need_mb, big.value.total_mb) == (G0, 600, 500)


YIELD = [
    ("nobody serving", NEW, [], {}, 1, []),
    ("over budget: the one with the fewest leases", NEW,
     [v(1, leases=3), v(2, leases=1), v(3, leases=2)], {}, 3, [2]),
    ("equal leases: the least recently used", NEW,
     [v(1, leases=1, last_used=5), v(2, leases=1, last_used=2)], {}, 2, [2]),
    ("under budget and memory fits: nobody", NEW, [v(1, leases=1)], {}, 2, []),
    ("one yields already: no second", NEW, [v(1, leases=1, yields_to=0), v(2, leases=1)], {},
     2, []),
    ("yielding to another start does not count", NEW,
     [v(1, leases=1, yields_to=7), v(2, leases=2)], {}, 2, [2]),
    ("short of memory: every busy one on that GPU", NEW_GPU,
     [v(1, leases=1, gpus=[G0]), v(2, leases=1, gpus=[G0]), v(3, leases=1, gpus=[G1])],
     {G0: Memory(1000, 800)}, 9, [1, 2]),
    ("not ready ones never yield", NEW, [v(1, D, leases=1), v(2, A)], {}, 1, []),
    ("starting ones never yield", NEW, [v(1, ST, placed=True)], {}, 1, []),
    ("the start itself never yields", v(0, R, leases=1), [v(1, leases=2)], {}, 1, [1]),
    ("short of memory on another GPU: not in the way", NEW_GPU,
     [v(1, leases=1, gpus=[G1])], {G0: Memory(1000, 800)}, 9, []),
    ("short on the remote host only: the busy one there", v(0, ST, gpus=[H0], need_mb=600),
     [v(1, leases=1, gpus=[G0]), v(2, leases=1, gpus=[H0])], {H0: Memory(1000, 800)}, 9, [2]),
    ("short and over budget: those in the way suffice", NEW_GPU,
     [v(1, leases=1, gpus=[G0]), v(2, leases=0, gpus=[G1])], {G0: Memory(1000, 800)}, 2, [1]),
    ("memory fits, over budget: one more", NEW_GPU,
     [v(1, leases=2, gpus=[G0]), v(2, leases=1, gpus=[G1])], {G0: Memory(1000, 0)}, 2, [2]),
]


@pytest.mark.parametrize(("start", "servers", "ledger", "budget", "keys"),
                         [row[1:] for row in YIELD], ids=[row[0] for row in YIELD])
def test_yielders(start: View, servers: list[View], ledger: dict[Any, Memory], budget: int,
                  keys: list[int]) -> None:
    assert yielders(start, [start, *servers], ledger, budget) == keys


def rep(key: int, state: ModelState = R, **kw: Any) -> View:
    """A replica of model "r" (min_replicas and scale_up_after as given)."""
    return v(key, state, model="r", replica=key, **kw)


TICK = [
    ("nothing idle", [v(0, leases=1, last_used=0)], [], {}, 1000, [], [], []),
    ("idle before its timeout", [v(0, idle=True, last_used=900, idle_timeout=300)], [], {}, 1000,
     [], [], []),
    ("idle for its timeout: stopped", [v(0, idle=True, last_used=700, idle_timeout=300)], [], {},
     1000, [], [Reap(0, False, False)], []),
    ("a sleeper is put to sleep", [v(0, idle=True, sleeps=True, idle_timeout=10)], [], {}, 10,
     [], [Reap(0, True, False)], []),
    ("not idle is never reaped", [v(0, D, idle=False, idle_timeout=1)], [], {}, 10, [], [], []),
    ("the last replicas first; min_replicas kept",
     [rep(0, idle=True, min_replicas=1, idle_timeout=1),
      rep(1, idle=True, min_replicas=1, idle_timeout=1)], [], {}, 10,
     [], [Reap(1, False, True)], []),
    ("min_replicas 2 of 3", [rep(k, idle=True, min_replicas=2, idle_timeout=1) for k in range(3)],
     [], {}, 10, [], [Reap(2, False, True)], []),
    ("replicas without min: all reaped, last first",
     [rep(0, idle=True, idle_timeout=1), rep(1, idle=True, idle_timeout=1)], [], {}, 10,
     [], [Reap(1, False, True), Reap(0, False, True)], []),
    ("asleep past its asleep_timeout: stopped",
     [v(0, A, asleep_since=0, asleep_timeout=100)], [], {}, 100, [], [], [Expire(0)]),
    ("asleep within its asleep_timeout", [v(0, A, asleep_since=1, asleep_timeout=100)], [], {},
     100, [], [], []),
    ("asleep, its sleep in flight: kept", [v(0, A, sleeping=True, asleep_timeout=1)], [], {}, 100,
     [], [], []),
    ("no min_replicas, nobody waits: nothing", [rep(0), rep(1, S)], [[0, 1]], {}, 0, [], [], []),
    ("min_replicas 2: one started",
     [rep(0, min_replicas=2), rep(1, S, min_replicas=2)], [[0, 1]], {}, 0,
     [BringUp(1, False, "min_replicas", 1)], [], []),
    ("min_replicas: one at a time",
     [rep(0, ST, min_replicas=2), rep(1, S, min_replicas=2)], [[0, 1]], {}, 0, [], [], []),
    ("min_replicas: an asleep one is woken first",
     [rep(0, S, min_replicas=1), rep(1, A, min_replicas=1)], [[0, 1]], {}, 0,
     [BringUp(1, True, "min_replicas", 0)], [], []),
    ("min_replicas: an asleep one mid-sleep is not woken",
     [rep(0, S, min_replicas=1), rep(1, A, min_replicas=1, sleeping=True)], [[0, 1]], {}, 0,
     [BringUp(0, False, "min_replicas", 0)], [], []),
    ("failed within its backoff: not started",
     [rep(0, F, min_replicas=1, retry_at=5, run_over=True)], [[0]], {}, 1, [], [], []),
    ("failed past its backoff: started",
     [rep(0, F, min_replicas=1, retry_at=5, run_over=True)], [[0]], {}, 5,
     [BringUp(0, False, "min_replicas", 0)], [], []),
    ("failed, its run not over: not started",
     [rep(0, F, min_replicas=1, retry_at=0, run_over=False)], [[0]], {}, 5, [], [], []),
    ("saturated past scale_up_after: one more",
     [rep(0, leases=1, scale_up_after=3), rep(1, S, scale_up_after=3)], [[0, 1]], {"r": 3.0}, 0,
     [BringUp(1, False, "saturated", 1)], [], []),
    ("saturated, not waited long enough",
     [rep(0, leases=1, scale_up_after=3), rep(1, S, scale_up_after=3)], [[0, 1]], {"r": 2.9}, 0,
     [], [], []),
    ("waited, but a slot is free",
     [rep(0, leases=1, slots=2, scale_up_after=3), rep(1, S)], [[0, 1]], {"r": 9.0}, 0,
     [], [], []),
    ("waited, none ready: the requests bring one up themselves",
     [rep(0, S, scale_up_after=3), rep(1, S)], [[0, 1]], {"r": 9.0}, 0, [], [], []),
    ("saturated, every replica up", [rep(0, leases=1, scale_up_after=1), rep(1, leases=1)],
     [[0, 1]], {"r": 9.0}, 0, [], [], []),
    ("a woken replica is not stopped for its asleep_timeout",
     [rep(0, S, min_replicas=1), rep(1, A, min_replicas=1, asleep_timeout=1)], [[0, 1]], {}, 50,
     [BringUp(1, True, "min_replicas", 0)], [], []),
    ("scale-up and scale-down in one tick",
     [rep(0, leases=1, scale_up_after=1), rep(1, S), v(2, idle=True, idle_timeout=1)],
     [[0, 1]], {"r": 2.0}, 5, [BringUp(1, False, "saturated", 1)], [Reap(2, False, False)], []),
]


@pytest.mark.parametrize(("servers", "scaled", "waited", "now", "up", "reap", "expire"),
                         [row[1:] for row in TICK], ids=[row[0] for row in TICK])
def test_tick(servers: list[View], scaled: list[list[int]], waited: dict[str, float],
              now: float, up: list[BringUp], reap: list[Reap], expire: list[Expire]) -> None:
    decisions = tick(servers, [[servers[k] for k in keys] for keys in scaled], waited, now)
    assert (decisions.up, decisions.reap, decisions.expire) == (up, reap, expire)
