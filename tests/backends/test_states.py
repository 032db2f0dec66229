"""A server's state machine: every state x event either moves as the table says or is refused,
every move tells the pool, and the committed docs are the generated ones."""

from __future__ import annotations

import contextlib
import io
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends import states
from backends.states import TRANSITIONS, Event, InvalidTransition, ModelState, move

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    state: ModelState
    name: str = "m"
    reason: str = ""
    since: float = 0.0
    told: int = 0

    def notify(self) -> None:
        self.told += 1


@pytest.mark.parametrize(("state", "event"), list(itertools.product(ModelState, Event)),
                         ids=lambda v: v.value)
def test_every_state_and_event_moves_as_the_table_says_or_raises(
        state: ModelState, event: Event) -> None:
    server = Server(state)
    transition = TRANSITIONS.get((state, event))
    if transition is None:
        with pytest.raises(InvalidTransition):
            move(server, event)
        assert server.state is state
        assert server.told == 0
    else:
        assert move(server, event, "why") is transition.to
        assert server.state is transition.to
        assert server.reason == "why"
        assert server.since > 0
        assert server.told == 1


def test_in_production_an_invalid_move_is_logged_and_goes_where_the_event_leads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(states, "STRICT", False)
    server = Server(ModelState.STOPPED)
    assert move(server, Event.AWAKE) is ModelState.READY
    assert server.told == 1


def test_each_event_leads_to_one_state_and_every_state_is_reachable() -> None:
    for event in Event:
        assert len({t.to for (_, e), t in TRANSITIONS.items() if e is event}) == 1, event
    reached = {t.to for t in TRANSITIONS.values()} | {ModelState.STOPPED}
    assert reached == set(ModelState)
    assert set(states.EVENTS) == set(Event)


def test_the_committed_docs_are_the_generated_table_and_the_readme_has_the_diagram() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        states.markdown()
    assert (ROOT / "docs" / "server-states.md").read_text() == out.getvalue()
    assert states.mermaid() in (ROOT / "README.md").read_text()
