"""vLLM's sleep mode for the simulator, as vLLM 0.32 serves it.

Only on a simulator started with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1`` (what
real vLLM needs); otherwise these paths are 404, as on a vLLM server without them.

* ``POST /sleep?level=L&mode=M``: L 0 (pause scheduling), 1 (weights to host memory, KV cache
  dropped) or 2 (everything dropped; weights must be reloaded), default 1; M ``abort`` (the
  default: generations in flight are cut), ``wait`` (they finish first) or ``keep`` (they pause
  and resume on wake). Answers ``{"status": "sleeping", "level": L}`` once asleep, after
  ``--sleep-delay`` seconds.
* ``POST /wake_up`` with optional repeated ``tags`` (``weights``, ``kv_cache``, ``scheduling``;
  none: everything): each call takes ``--wake-delay`` seconds and answers
  ``{"status": "awake" | "sleeping", "tags": ...}`` ("sleeping" while something is still
  asleep).
* ``GET /is_sleeping``: ``{"is_sleeping": bool}``.
* ``GET /sim/sleep`` (the simulator's own): the calls so far, the level, what sleeps, whether
  level 2's weights still wait for their reload, and ``held``: the generations that came while
  the engine slept (a gateway that waits for the wake sends none).
* ``POST /collective_rpc`` with ``{"method": "reload_weights"}``: ``{"results": [null]}``;
  reloads the weights dropped by level 2.

From the moment a sleep begins until the engine is fully awake, new generations are held, not
answered (as vLLM holds them); ``vllm:engine_sleep_state`` tells the state. ``calls`` records
every sleep-mode call in order, so a test can check a level-2 wake (weights, reload_weights,
kv_cache). With ``--fail-wake`` every ``wake_up`` answers 500 (vLLM's error shape) and the
engine sleeps on; with ``--start-asleep`` it starts as after a level 1 sleep. ``MEMORY`` lets
a process that really holds GPU memory (``tests/gpu/gpu_holder.py``) free and take it back
with the sleep and the wake.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

LEVELS = (0, 1, 2)
MODES = ("abort", "wait", "keep")
TAGS = ("weights", "kv_cache")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")


@dataclass
class MemoryHooks:
    """What frees and takes back the memory of a tag (``weights``, ``kv_cache``); by default
    nothing (the simulator holds none)."""

    release: Callable[[str], None] = lambda tag: None
    restore: Callable[[str], None] = lambda tag: None


MEMORY = MemoryHooks()


def _unprocessable(message: str) -> web.Response:
    # FastAPI's answer to a query parameter out of its bounds.
    return web.json_response({"detail": [{"type": "value_error", "msg": message}]}, status=422)


@dataclass
class SleepMode:
    """The sleep state of one simulated engine and its routes."""

    sleep_delay: float = 0.0
    wake_delay: float = 0.0
    level: int | None = None  # of the last sleep, while anything sleeps
    paused: bool = False  # scheduling paused: new generations are held
    asleep: set[str] = field(default_factory=set)  # tags whose memory is freed
    weights_lost: bool = False  # level 2 dropped them: reload_weights before they serve
    keeping: bool = False  # a sleep with mode=keep: generations in flight pause as well
    fail_wake: bool = False
    start_asleep: bool = False  # as after a level 1 sleep (``--start-asleep``)
    calls: list[str] = field(default_factory=list)
    held: int = 0  # generations that came while asleep
    _awake: asyncio.Event = field(default_factory=asyncio.Event)
    _running: set[asyncio.Task[object]] = field(default_factory=set)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)  # no generation in flight

    def __post_init__(self) -> None:
        self._idle.set()
        if self.start_asleep:
            self.level, self.paused, self.asleep = 1, True, set(TAGS)
        else:
            self._awake.set()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/sleep", self.sleep)
        app.router.add_post("/wake_up", self.wake_up)
        app.router.add_get("/is_sleeping", self.is_sleeping)
        app.router.add_post("/collective_rpc", self.collective_rpc)
        app.router.add_get("/sim/sleep", self.sim_sleep)

    @property
    def sleeping(self) -> bool:
        return self.paused or bool(self.asleep)

    async def hold(self) -> None:
        """Wait until the engine is awake (at once if it is)."""
        await self._awake.wait()

    def generating(self, task: asyncio.Task[object]) -> Callable[[], None]:
        """Count a generation in flight (a sleep with ``abort`` cuts it); returns its end."""
        self._running.add(task)
        self._idle.clear()

        def ended() -> None:
            self._running.discard(task)
            if not self._running:
                self._idle.set()

        return ended

    def metrics(self, label: str) -> str:
        state = "awake" if not self.sleeping else (
            "discard_all" if self.level == 2 else "weights_offloaded" if self.level == 1
            else "")
        return (
            "# HELP vllm:engine_sleep_state Engine sleep state; awake = 0 means engine is "
            "sleeping; awake = 1 means engine is awake; weights_offloaded = 1 means sleep "
            "level 1; discard_all = 1 means sleep level 2.\n"
            "# TYPE vllm:engine_sleep_state gauge\n"
            + "".join(f'vllm:engine_sleep_state{{engine="0",model_name="{label}",'
                      f'sleep_state="{s}"}} {1.0 if s == state else 0.0}\n'
                      for s in SLEEP_STATES))

    async def sleep(self, request: web.Request) -> web.Response:
        try:
            level = int(request.query.get("level", "1"))
        except ValueError:
            return _unprocessable("level must be an integer")
        mode = request.query.get("mode", "abort")
        if level not in LEVELS:
            return _unprocessable("level must be 0, 1 or 2")
        if mode not in MODES:
            return _unprocessable(f"mode must be one of {', '.join(MODES)}")
        self.calls.append(f"sleep level={level} mode={mode}")
        self.paused = True
        self.keeping = mode == "keep"
        self._awake.clear()
        if mode == "abort":
            for task in list(self._running):
                task.cancel()
        elif mode == "wait":
            await self._idle.wait()
        await asyncio.sleep(self.sleep_delay)
        if level >= 1:
            self.level = level
            for tag in TAGS:
                if tag not in self.asleep:
                    self.asleep.add(tag)
                    MEMORY.release(tag)
            self.weights_lost = self.weights_lost or level == 2
        elif self.level is None:
            self.level = 0
        return web.json_response({"status": "sleeping", "level": level})

    async def wake_up(self, request: web.Request) -> web.Response:
        tags = request.query.getall("tags", []) or None
        self.calls.append("wake_up " + (",".join(tags) if tags else "all"))
        await asyncio.sleep(self.wake_delay)
        if self.fail_wake:
            return web.json_response(
                {"error": {"message": "Simulated wake failure", "type": "InternalServerError",
                           "param": None, "code": 500}}, status=500)
        for tag in TAGS if tags is None else tags:
            if tag in self.asleep:
                self.asleep.discard(tag)
                MEMORY.restore(tag)
        if not self.asleep:  # as vLLM: scheduling resumes once all memory is back
            self.paused = self.keeping = False
            self.level = None
            self._awake.set()
        return web.json_response({"status": "sleeping" if self.sleeping else "awake",
                                  "tags": tags})

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.sleeping})

    async def sim_sleep(self, request: web.Request) -> web.Response:
        """For tests: the calls so far and what sleeps."""
        return web.json_response({"calls": self.calls, "level": self.level,
                                  "asleep": sorted(self.asleep), "paused": self.paused,
                                  "weights_lost": self.weights_lost, "held": self.held})

    async def collective_rpc(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            return web.json_response({"detail": f"JSON decode error: {exc}"}, status=400)
        if not isinstance(body, dict) or body.get("method") is None:
            return web.json_response({"detail": "Missing 'method' in request body"},
                                     status=400)
        method = body["method"]
        self.calls.append(f"collective_rpc {method}")
        if method == "reload_weights":
            if "weights" in self.asleep:
                return web.json_response(
                    {"error": {"message": "reload_weights needs the weights awake",
                               "type": "InternalServerError", "param": None, "code": 500}},
                    status=500)
            self.weights_lost = False
        return web.json_response({"results": [None]})
