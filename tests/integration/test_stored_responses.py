"""Stored responses (``GET /v1/responses/{id}``, ``POST /v1/responses/{id}/cancel``) reach the
server that made them, on a real socket with simulator processes: the replica that made it,
not the least loaded one; and a server stopped since is a 404, with no start for it."""

from __future__ import annotations

import anyio
import httpx2
import pytest

from backends.pool import ModelState
from tests.support import chat, eventually, make_config, serving, sim_model

pytestmark = pytest.mark.anyio

TOKEN = "t0ken"
AUTH = {"authorization": f"Bearer {TOKEN}"}


async def test_a_stored_response_is_asked_of_the_replica_that_made_it() -> None:
    config = make_config([sim_model("m", "--tokens-per-second", "20", max_replicas=2,
                                    min_replicas=2)])
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        first, second = gateway.pool.replicas["m"]
        await eventually(lambda: first.state is second.state is ModelState.READY, within=20)
        async with anyio.create_task_group() as tg:
            # The first replica is busy with a stream: the response is made by the second.
            busy = chat("m", max_tokens=200, stream=True)
            tg.start_soon(lambda: client.post(url + "/v1/chat/completions", json=busy))
            await eventually(lambda: first.leases == 1)
            made = (await client.post(url + "/v1/responses", json={
                "model": "m", "input": "hello", "max_output_tokens": 2})).json()
            assert gateway.response_ids.made(made["id"])[1] == (1, second.starts)
            tg.cancel_scope.cancel()
        await eventually(lambda: first.leases == 0)
        # Both idle now: a request that names no server would go to the first, which never
        # heard of the response.
        for _ in range(3):
            got = await client.get(url + f"/v1/responses/{made['id']}")
            assert got.status_code == 200 and got.json()["id"] == made["id"]
        # Complete: its server refuses to cancel it (only a background one can be), where the
        # other replica would not know it (404).
        cancelled = await client.post(url + f"/v1/responses/{made['id']}/cancel")
        assert cancelled.status_code == 400


async def test_a_response_whose_server_stopped_since_is_gone_and_starts_nothing() -> None:
    config = make_config([sim_model("m")], admin={"token": TOKEN})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        made = (await client.post(url + "/v1/responses", json={
            "model": "m", "input": "hello", "max_output_tokens": 2})).json()
        assert (await client.get(url + f"/v1/responses/{made['id']}")).status_code == 200
        unloaded = await client.post(url + "/admin/models/m/unload", headers=AUTH)
        assert unloaded.status_code == 200
        backend = gateway.pool.backends["m"]
        await eventually(lambda: backend.state is ModelState.STOPPED)
        for path in (f"/v1/responses/{made['id']}", f"/v1/responses/{made['id']}/cancel"):
            gone = await client.request("GET" if path.endswith(made["id"]) else "POST",
                                        url + path)
            assert gone.status_code == 404
            assert gone.json()["error"]["code"] == "response_not_found"
            assert gone.json()["error"]["param"] == "response_id"
        assert backend.state is ModelState.STOPPED and backend.starts == 1
