"""A server's state machine: every way a server's state can change, and why.

Owns one invariant: a server's ``state`` changes only through ``move``, and only along a row of
``TRANSITIONS`` (state x event -> next state, and what the controller does with it). ``move``
is the one writer: it checks the row, sets the state, records the reason and the time, and tells
the server's ``notify`` (the pool's: it wakes whoever waits for a change and emits the change
to the admin's event stream and the slots layer). A move the table lacks is a bug: it raises
``InvalidTransition`` where ``STRICT`` is on (the tests turn it on) and otherwise logs an error
and moves anyway, so that production keeps serving and says so (never a silent change).

``python -m backends.states`` prints the table and its diagram as markdown
(``docs/server-states.md``; a test checks that the committed copy is the generated one).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

log = structlog.get_logger("gateway.pool")

# Raise on a move the table lacks (tests), instead of logging it (production).
STRICT = False


class ModelState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    FAILED = "failed"
    ASLEEP = "asleep"
    WAKING = "waking"


class Event(enum.Enum):
    """What happened to a server, or what it was told."""

    LAUNCH = "launch"
    HEALTHY = "healthy"
    DOWN = "down"
    UP = "up"
    DRAIN = "drain"
    UNDRAIN = "undrain"
    SLEEP = "sleep"
    WAKE = "wake"
    AWAKE = "awake"
    NO_ROOM = "no_room"
    STOP = "stop"
    RUN_ENDS = "run_ends"
    STOPPED = "stopped"
    RUN_FAILED = "run_failed"


EVENTS = {
    Event.LAUNCH: "a request, the scale-up or an adopted server begins a run",
    Event.HEALTHY: "the started server passed its health check",
    Event.DOWN: "a static server failed its checks (or refused connections at start-up)",
    Event.UP: "a static server that was down passed a check",
    Event.DRAIN: "an unload takes the server out of service",
    Event.UNDRAIN: "the unload was given up",
    Event.SLEEP: "idle (idle_timeout) or evicted, with sleep_level",
    Event.WAKE: "a request or the scale-up wants the asleep server",
    Event.AWAKE: "the server said it is awake",
    Event.NO_ROOM: "the wake found no room within placement_timeout",
    Event.STOP: "asked to stop: idle, evicted, unloaded, asleep too long, shutdown",
    Event.RUN_ENDS: "the run's task ends: died, unhealthy, start failed, or stopped",
    Event.STOPPED: "the launcher stopped the server, and the run went well",
    Event.RUN_FAILED: "the launcher stopped the server; its start, server or stop failed",
}


@dataclass(frozen=True, slots=True)
class Transition:
    to: ModelState
    # What the controller does with the move, for the reader (the code is beside the event).
    actions: str


S = ModelState
E = Event
_STOP = Transition(S.STOPPING, "cancel the run's task group (no new lease from here on)")
_ENDS = Transition(S.STOPPING, "stop the launcher, shielded")

TRANSITIONS: dict[tuple[ModelState, Event], Transition] = {
    (S.STOPPED, E.LAUNCH): Transition(S.STARTING, "spawn the run's task: room, start, health"),
    (S.FAILED, E.LAUNCH): Transition(S.STARTING, "after failure_backoff: as from stopped"),
    (S.STARTING, E.HEALTHY): Transition(S.READY, "answer the waiting requests; count the start"),
    (S.STARTING, E.DOWN): Transition(S.FAILED, "refuse the waiting requests at once (503)"),
    (S.READY, E.DOWN): Transition(S.FAILED, "refuse new requests at once (503)"),
    (S.FAILED, E.UP): Transition(S.READY, "serve again"),
    (S.READY, E.DRAIN): Transition(S.DRAINING, "no new lease; in-flight ones finish"),
    (S.DRAINING, E.UNDRAIN): Transition(S.READY, "serve again"),
    (S.READY, E.SLEEP): Transition(S.ASLEEP, "send the run a sleep command; keep the budget"),
    (S.ASLEEP, E.WAKE): Transition(S.WAKING, "send the run a wake command (room made first)"),
    (S.WAKING, E.AWAKE): Transition(S.READY, "answer the waiting requests; count the wake"),
    (S.WAKING, E.NO_ROOM): Transition(S.ASLEEP, "refuse the waiting requests (503)"),
    (S.STARTING, E.STOP): _STOP,
    (S.READY, E.STOP): _STOP,
    (S.DRAINING, E.STOP): _STOP,
    (S.ASLEEP, E.STOP): _STOP,
    (S.WAKING, E.STOP): _STOP,
    (S.STOPPING, E.STOP): Transition(S.STOPPING, "keep the newer reason"),
    (S.STARTING, E.RUN_ENDS): _ENDS,
    (S.READY, E.RUN_ENDS): _ENDS,
    (S.DRAINING, E.RUN_ENDS): _ENDS,
    (S.ASLEEP, E.RUN_ENDS): _ENDS,
    (S.WAKING, E.RUN_ENDS): _ENDS,
    (S.FAILED, E.RUN_ENDS): _ENDS,
    (S.STOPPING, E.RUN_ENDS): _ENDS,
    (S.STOPPING, E.STOPPED): Transition(S.STOPPED, "answer a start still waited for (503)"),
    (S.STOPPING, E.RUN_FAILED): Transition(S.FAILED, "backoff until failure_backoff passes"),
}


# Each event leads to one state, whichever state it comes in (so an invalid move in production
# still goes where the event means).
TARGETS = {event: t.to for (_, event), t in TRANSITIONS.items()}


class InvalidTransition(AssertionError):
    """A move that ``TRANSITIONS`` lacks: a bug in the pool."""


class Movable(Protocol):
    state: ModelState
    reason: str
    since: float

    @property
    def name(self) -> str: ...

    def notify(self) -> None: ...


def move(server: Movable, event: Event, reason: str = "") -> ModelState:
    """Apply ``event`` to the server: the one place a server's state changes."""
    was = server.state
    if (was, event) not in TRANSITIONS:
        if STRICT:
            raise InvalidTransition(f"{server.name}: no move from {was.value} on {event.value}")
        log.error("invalid state transition", model=server.name, state=was.value,
                  event_name=event.value, reason=reason)
    to = TARGETS[event]
    server.state = to
    server.reason = reason or EVENTS[event]
    server.since = time.monotonic()
    server.notify()
    return to


def markdown(notify: Callable[[str], None] = print) -> None:
    """The table and its diagram, as ``docs/server-states.md`` holds them."""
    notify("# A server's states\n")
    notify("Generated by `python -m backends.states` from `backends/states.py`; do not edit.\n")
    notify("| state | event | next state | what the controller does |")
    notify("| --- | --- | --- | --- |")
    for (state, event), t in TRANSITIONS.items():
        notify(f"| {state.value} | {event.value} | {t.to.value} | {t.actions} |")
    notify("\nEvents:\n")
    for event, meaning in EVENTS.items():
        notify(f"- `{event.value}`: {meaning}")
    notify("")
    notify(mermaid())


def mermaid() -> str:
    """The state diagram (mermaid), one arrow per state pair with its events."""
    arrows: dict[tuple[ModelState, ModelState], list[str]] = {}
    for (state, event), t in TRANSITIONS.items():
        arrows.setdefault((state, t.to), []).append(event.value)
    lines = ["```mermaid", "stateDiagram-v2", "    [*] --> stopped"]
    lines += [f"    {a.value} --> {b.value}: {', '.join(events)}"
              for (a, b), events in arrows.items()]
    lines.append("```")
    return "\n".join(lines)


if __name__ == "__main__":
    markdown()
