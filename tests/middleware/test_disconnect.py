"""ClientWatch: a wait that ends the moment the client disconnects, losing no message, or once
a send to a client that stopped reading has waited send_timeout."""

from __future__ import annotations

import anyio
import pytest
from anyio.lowlevel import checkpoint

from relay.disconnect import ClientWatch, SendWatches, cancellable

from .asgi import Client, settle

pytestmark = pytest.mark.anyio


async def test_the_wait_result_comes_back_when_the_client_stays() -> None:
    client = Client()
    watch = ClientWatch(client.receive)

    async def wait() -> str:
        await checkpoint()
        return "slot"

    assert await watch.run(wait) == (True, "slot")
    assert not watch.disconnected


async def test_messages_read_while_waiting_reach_the_app_in_order() -> None:
    client = Client({"type": "http.request", "body": b"a", "more_body": True},
                    {"type": "http.request", "body": b"b", "more_body": False})
    watch = ClientWatch(client.receive)
    go = anyio.Event()

    async def wait() -> None:
        await go.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.run, wait)
        await settle()
        assert client.unread == 0
        go.set()
    client.push({"type": "http.disconnect"})
    assert [(await watch.receive()).get("body") for _ in range(3)] == [b"a", b"b", None]


async def test_a_disconnect_ends_the_wait_at_once() -> None:
    client = Client.with_body()
    watch = ClientWatch(client.receive)
    cancelled = False

    async def wait() -> None:
        nonlocal cancelled
        try:
            await anyio.sleep_forever()
        finally:
            cancelled = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: watch.run(wait))
        await settle()
        client.disconnect()
        await settle()
        assert cancelled
    assert watch.disconnected


async def test_the_result_after_a_disconnect_says_the_client_left() -> None:
    client = Client()
    watch = ClientWatch(client.receive)
    client.disconnect()
    assert await watch.run(anyio.sleep_forever) == (False, None)
    # The disconnect is kept for the app, and a later wait does not even start.
    assert await watch.receive() == {"type": "http.disconnect"}
    assert await watch.run(pytest.fail) == (False, None)


async def test_an_error_of_the_wait_comes_out_as_itself() -> None:
    watch = ClientWatch(Client().receive)

    async def wait() -> None:
        raise LookupError("no backend")

    with pytest.raises(LookupError, match="no backend"):
        await watch.run(wait)


async def test_a_cancellation_from_outside_cancels_the_wait_and_propagates() -> None:
    client = Client()
    watch = ClientWatch(client.receive)
    reached_end = False
    with anyio.move_on_after(0.01) as scope:
        await watch.run(anyio.sleep_forever)
        reached_end = True
    assert scope.cancelled_caught
    assert not reached_end
    # The cancelled receive lost nothing: the next message still reaches the app.
    client.disconnect()
    assert await watch.receive() == {"type": "http.disconnect"}


async def test_a_failing_receive_ends_the_wait_and_comes_out_as_itself() -> None:
    async def receive() -> dict:
        await checkpoint()
        raise ConnectionError("server gone")

    watch = ClientWatch(receive)
    with anyio.fail_after(5), pytest.raises(ConnectionError, match="server gone"):
        await watch.run(anyio.sleep_forever)


async def test_a_send_that_does_not_complete_ends_the_wait_after_send_timeout() -> None:
    watch = ClientWatch(Client.with_body().receive)
    sends = SendWatches(0.2).new()
    never = anyio.Event()

    async def stuck_send(message: dict) -> None:
        await never.wait()

    async def relay() -> None:
        send = cancellable(stuck_send)
        for _ in range(3):  # sends that complete do not count towards a stall
            sends.begun += 1
            await anyio.sleep(0.1)
            sends.done += 1
        sends.begun += 1
        await send({"type": "http.response.body"})

    began = anyio.current_time()
    assert await watch.run(relay, sends) == (False, None)
    assert watch.stalled and not watch.disconnected
    assert 0.3 + 0.2 <= anyio.current_time() - began < 0.3 + 0.2 + 0.2


async def test_sends_that_each_complete_in_time_never_stall() -> None:
    watch = ClientWatch(Client.with_body().receive)
    sends = SendWatches(0.2).new()

    async def relay() -> str:
        for _ in range(10):
            sends.begun += 1
            await anyio.sleep(0.1)
            sends.done += 1
        return "answered"

    assert await watch.run(relay, sends) == (True, "answered")
    assert not watch.stalled
