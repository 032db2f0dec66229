"""The admin API's event stream and the dashboard page, over real sockets: who may open them,
what the stream says as things happen, and what a subscriber that stops reading may hold."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx2
import pytest

from kernel.errors import error_body, unavailable
from telemetry.events import EventHub, error_code
from tests.support import (
    HeldBackend,
    chat,
    eventually,
    make_config,
    serving,
    serving_app,
    sim_model,
    static_model,
)

from .helpers import with_lifespan
from .test_admin import ADMIN, TOKEN, UNREACHABLE, error_of

pytestmark = pytest.mark.anyio


async def events(response: httpx2.Response) -> AsyncIterator[tuple[str, Any]]:
    """The stream's events, as (name, JSON data)."""
    name = None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))


async def next_event(stream: AsyncIterator[tuple[str, Any]], name: str,
                     within: float = 5.0) -> Any:
    with anyio.fail_after(within):
        async for event, data in stream:
            if event == name:
                return data
    raise AssertionError(f"the stream ended before a {name!r} event")


async def test_the_stream_and_the_page_need_the_admin_api() -> None:
    config = make_config([static_model("m", UNREACHABLE)])
    async with serving(config) as (url, _), httpx2.AsyncClient() as client:
        for path in ("/admin/events", "/admin/ui"):
            response = await client.get(url + path, headers=ADMIN)
            assert (response.status_code, error_of(response)["code"]) == (404, "not_found")


async def test_the_stream_needs_the_token() -> None:
    config = make_config([static_model("m", UNREACHABLE)], admin={"token": TOKEN})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=5) as client:
        for headers, status, code in [({}, 401, "missing_admin_token"),
                                      ({"authorization": "Bearer nope"}, 403,
                                       "invalid_admin_token")]:
            response = await client.get(url + "/admin/events", headers=headers)
            assert (response.status_code, error_of(response)["code"]) == (status, code)
        assert not gateway.events.listening
        refused = await client.post(url + "/admin/events", headers=ADMIN)
        assert refused.status_code == 405


async def test_the_page_is_self_contained_and_loads_nothing_from_outside() -> None:
    config = make_config([static_model("m", UNREACHABLE)], admin={"token": TOKEN})
    async with serving(config) as (url, _), httpx2.AsyncClient() as client:
        page = await client.get(url + "/admin/ui")  # no token: the page asks for it
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+';", policy)
    assert "connect-src 'self'" in policy
    html = page.text
    assert not re.search(r"\b(src|href)=\"(https?:)?//", html)
    assert "@import" not in html and "url(" not in html
    assert "sessionStorage" in html


async def test_state_changes_and_requests_arrive_as_they_happen() -> None:
    config = make_config([sim_model("a"), sim_model("b")], admin={"token": TOKEN})
    async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client, \
            client.stream("GET", url + "/admin/events", headers=ADMIN) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = events(response)
        first = await next_event(stream, "state")
        assert {m["name"]: m["state"] for m in first["data"]} == {"a": "stopped",
                                                                  "b": "stopped"}
        assert first["data"][0]["actions"] == ["load"]

        async def load() -> None:
            assert (await client.post(url + "/admin/models/a/load",
                                      headers=ADMIN)).status_code == 200

        seen = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(load)
            while "ready" not in seen:
                state = await next_event(stream, "state")
                seen.append(next(m["state"] for m in state["data"] if m["name"] == "a"))
        assert seen[0] == "starting" and seen[-1] == "ready"
        assert state["data"][0]["address"].startswith("http://127.0.0.1:")

        answer = await client.post(url + "/v1/chat/completions", json=chat("a"),
                                   headers={"x-request-id": "dash-1"})
        assert answer.status_code == 200
        missing = await client.post(url + "/v1/chat/completions", json=chat("nope"),
                                    headers={"x-request-id": "dash-2"})
        assert missing.status_code == 404
        summaries: list[dict[str, Any]] = []
        with anyio.fail_after(1):
            while len(summaries) < 2:
                summaries += (await next_event(stream, "requests"))["requests"]
        ok, refused = summaries
        assert (ok["request_id"], ok["model"], ok["status"], ok["error"]) == (
            "dash-1", "a", 200, None)
        assert ok["path"] == "/v1/chat/completions"
        assert 0 < ok["ttfb_ms"] <= ok["duration_ms"]
        assert ok["queue_wait_ms"] >= 0
        assert (refused["request_id"], refused["status"], refused["error"]) == (
            "dash-2", 404, "model_not_found")

        drained = await client.post(url + "/admin/drain", headers=ADMIN)
        assert drained.status_code == 202
        assert (await next_event(stream, "state"))["draining"] is True


async def test_a_request_in_flight_shows_before_it_ends() -> None:
    backend = HeldBackend()
    async with serving_app(with_lifespan(backend)) as backend_url:
        config = make_config([static_model("m", backend_url)], admin={"token": TOKEN})
        async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client, \
                client.stream("GET", url + "/admin/events", headers=ADMIN) as response:
            stream = events(response)
            await next_event(stream, "state")
            async def ask() -> None:
                await client.post(url + "/v1/chat/completions", json=chat("m"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(ask)
                while True:
                    state = await next_event(stream, "state", within=1)
                    if state["in_flight"] == 1:
                        break
                assert state["data"][0]["in_flight"] == 1
                backend.release.set()


async def test_a_subscriber_that_stops_reading_holds_a_bounded_backlog() -> None:
    """Requests go on while the dashboard reads nothing: it is owed at most events_buffer
    summaries, and when it reads again it is told how many were dropped."""
    config = make_config([static_model("m", UNREACHABLE)],
                         admin={"token": TOKEN, "events_buffer": 16})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client, \
            client.stream("GET", url + "/admin/events", headers=ADMIN) as response:
        assert response.status_code == 200
        await eventually(lambda: gateway.events.listening)
        (subscriber,) = gateway.events._subscribers
        scope = {"type": "http", "path": "/v1/chat/completions"}
        published = 3000
        # Nothing is read meanwhile, and the summaries come in bursts of 100 between the
        # writer's turns: far more than it takes.
        for i in range(published):
            gateway.events.request_ended(scope, request_id=str(i), model="m")
            assert len(subscriber.requests) <= 16
            if i % 100 == 0:
                await anyio.lowlevel.checkpoint()
        received = dropped = 0
        with anyio.fail_after(10):
            async for event, data in events(response):
                if event == "requests":
                    received += len(data["requests"])
                    dropped += data["dropped"]
                    if received + dropped == published:
                        break
        assert dropped >= published // 2
        assert received + dropped == published


async def test_a_stuck_subscriber_is_ended_and_streams_are_limited() -> None:
    config = make_config([static_model("m", UNREACHABLE)], admin={
        "token": TOKEN, "events_buffer": 4, "events_send_timeout": 0.5, "events_streams": 1})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        async with client.stream("GET", url + "/admin/events", headers=ADMIN) as response:
            assert response.status_code == 200
            await eventually(lambda: gateway.events.listening)
            second = await client.get(url + "/admin/events", headers=ADMIN)
            assert (second.status_code, error_of(second)["code"]) == (
                429, "too_many_event_streams")
            assert "retry-after" in second.headers
            scope = {"type": "http", "path": "/v1/chat/completions"}
            with anyio.fail_after(10):
                # Big enough to fill the socket's buffers in a few writes; then a write hangs.
                while gateway.events.listening:
                    gateway.events.request_ended(scope, model="m" * 400_000)
                    await anyio.sleep(0.01)
        # Its place is free again.
        async with client.stream("GET", url + "/admin/events", headers=ADMIN) as response:
            assert response.status_code == 200


async def test_the_streams_end_when_the_gateway_winds_down() -> None:
    config = make_config([static_model("m", UNREACHABLE)], admin={"token": TOKEN},
                         gateway={"shutdown_grace": 0.1})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client, \
            client.stream("GET", url + "/admin/events", headers=ADMIN) as response:
        stream = events(response)
        await next_event(stream, "state")
        with anyio.fail_after(5):
            await gateway.wind_down()
            async for _ in stream:
                pass
        await eventually(lambda: not gateway.events.listening)


def test_the_error_code_of_a_summary_names_what_went_wrong() -> None:
    refused = error_body("Queue full.", type="rate_limit_error", code="queue_full")
    vllm = (b'{"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", '
            b'"param": "model", "code": 404}}')
    assert error_code(None, 429, refused) == "queue_full"
    assert error_code(None, 404, vllm) == "NotFoundError"
    assert error_code(None, 502, b"<html>Bad Gateway</html>") is None
    assert error_code(None, 500, b'{"error": "boom"}') is None
    assert error_code(None, 200, refused) is None
    assert error_code(unavailable("x", code="shutting_down"), 200, None) == "shutting_down"
    assert error_code(OSError("gone"), 200, None) == "OSError"


async def test_the_streams_share_one_snapshot_per_change() -> None:
    """Every open dashboard owes a snapshot after a change; the gateway builds it once (it reads
    NVML), not once per dashboard."""
    hub = EventHub(streams=4)
    built = 0

    def snapshot() -> dict[str, Any]:
        nonlocal built
        built += 1
        return {"n": built}

    sent: list[list[bytes]] = [[] for _ in range(4)]

    async def stream(chunks: list[bytes]) -> None:
        async def send(message: Any) -> None:
            if b"event: state" in message.get("body", b""):
                chunks.append(message["body"])

        await hub.stream(anyio.Event().wait, send, snapshot)  # type: ignore[arg-type]

    async with anyio.create_task_group() as tg:
        for chunks in sent:
            tg.start_soon(stream, chunks)
        await eventually(lambda: all(sent))
        for _ in range(3):
            hub.changed()
            await eventually(lambda: all(len(chunks) == len(sent[0]) for chunks in sent))
            await anyio.sleep(0.1)
        hub.close()
    assert all(len(chunks) >= 4 for chunks in sent)
    assert built == len(sent[0])


async def test_the_clusters_events_arrive_as_cluster_events() -> None:
    """A member or an owner coming or going reaches every stream as a ``cluster`` event, with a
    fresh snapshot after it."""
    hub = EventHub()
    bodies: list[bytes] = []

    async def send(message: Any) -> None:
        bodies.append(message.get("body", b""))

    async with anyio.create_task_group() as tg:
        tg.start_soon(hub.stream, anyio.Event().wait, send, dict)
        await eventually(lambda: bodies)
        hub.notice("member lost", {"member": "host:12:ab", "host": "host", "pid": 12})
        await eventually(lambda: any(b"event: cluster" in body for body in bodies))
        hub.close()
    body = next(body for body in bodies if b"event: cluster" in body)
    data = json.loads(body.split(b"event: cluster\ndata: ", 1)[1].split(b"\n", 1)[0])
    assert data["event"] == "member lost" and data["member"] == "host:12:ab"
    assert b"event: state" in b"".join(bodies[bodies.index(body):])
