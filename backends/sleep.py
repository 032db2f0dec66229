"""vLLM's sleep mode as the pool drives it (vLLM 0.32, ``docs/vllm-facts.md``).

A server offers it only when started with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``;
otherwise ``/is_sleeping`` is 404 (``NoSleepMode``). A sleep uses ``mode=wait`` (the default,
``abort``, would cut generations; the pool sleeps only a model with none, but a request the pool
did not count must not be cut either). A level 2 wake takes the weights back, reloads them (level
2 dropped them), then the KV cache; a level 1 wake takes everything back in one call. A wake is
over when ``/is_sleeping`` says so. The calls wait as long as the server takes: the caller
bounds them (``fail_after``).
"""

from __future__ import annotations

import anyio
import httpx2

POLL = 0.02
FLAGS = "--enable-sleep-mode and VLLM_SERVER_DEV_MODE=1"


class NoSleepMode(Exception):
    """The server has no sleep API (404 on ``/is_sleeping``)."""


class SleepModeError(Exception):
    """A sleep-mode call went wrong; the message says which and how."""


def _ok(response: httpx2.Response, what: str) -> httpx2.Response:
    if response.status_code != 200:
        raise SleepModeError(f"{what} answered {response.status_code}")
    return response


async def is_sleeping(http: httpx2.AsyncClient, address: str) -> bool:
    response = await http.get(address + "/is_sleeping")
    if response.status_code == 404:
        raise NoSleepMode(f"the server has no sleep API (404 on /is_sleeping): start it with "
                          f"{FLAGS}")
    return bool(_ok(response, "/is_sleeping").json().get("is_sleeping"))


async def sleep(http: httpx2.AsyncClient, address: str, level: int) -> None:
    """Put the server to sleep at ``level`` once what it runs has finished."""
    _ok(await http.post(address + "/sleep", params={"level": level, "mode": "wait"},
                        timeout=None), f"POST /sleep?level={level}&mode=wait")


async def wake(http: httpx2.AsyncClient, address: str, level: int) -> None:
    """Wake the server from a sleep at ``level``; returns once it says it is awake."""
    async def wake_up(tag: str | None) -> None:
        params = {"tags": tag} if tag else None
        _ok(await http.post(address + "/wake_up", params=params, timeout=None),
            "POST /wake_up" + (f"?tags={tag}" if tag else ""))

    if level == 2:
        await wake_up("weights")
        _ok(await http.post(address + "/collective_rpc", json={"method": "reload_weights"},
                            timeout=None), "POST /collective_rpc reload_weights")
        await wake_up("kv_cache")
    else:
        await wake_up(None)
    # The server says it is awake only when asked: polled.
    while await is_sleeping(http, address):  # noqa: ASYNC110
        await anyio.sleep(POLL)
