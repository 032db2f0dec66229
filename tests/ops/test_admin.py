"""The admin API on real sockets: its token, and what load, unload and drain do."""

from __future__ import annotations

from typing import Any

import anyio
import httpx2
import pytest

from kernel.config import config_from_mapping
from tests.support import (
    HeldBackend,
    chat,
    make_config,
    serving,
    serving_app,
    sim_model,
    static_model,
)

from .helpers import eventually, scrape, value, with_lifespan

pytestmark = pytest.mark.anyio

TOKEN = "adm1n-t0ken"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
UNREACHABLE = "http://127.0.0.1:9"


def error_of(response: httpx2.Response) -> dict[str, Any]:
    payload = response.json()
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    return payload["error"]


async def test_without_a_token_configured_there_is_no_admin_api() -> None:
    config = make_config([static_model("m", UNREACHABLE)])
    async with serving(config) as (url, gateway), httpx2.AsyncClient() as client:
        for method, path in [("GET", "/admin/models"), ("POST", "/admin/drain"),
                             ("POST", "/admin/models/m/load")]:
            response = await client.request(method, url + path, headers=ADMIN)
            assert response.status_code == 404
            assert error_of(response)["code"] == "not_found"
        assert not gateway.draining


async def test_the_admin_api_needs_the_token() -> None:
    config = config_from_mapping({"models": [static_model("m", UNREACHABLE)]},
                                 environ={"GATEWAY_ADMIN_TOKEN": TOKEN})
    refused = [
        ({}, 401, "missing_admin_token"),
        ({"authorization": "Basic YWRtaW46eA=="}, 401, "missing_admin_token"),
        ({"authorization": "Bearer"}, 401, "missing_admin_token"),
        ({"authorization": "Bearer not-the-token"}, 403, "invalid_admin_token"),
        ({"authorization": f"Bearer {TOKEN}x"}, 403, "invalid_admin_token"),
    ]
    async with serving(config) as (url, gateway), httpx2.AsyncClient() as client:
        for headers, status, code in refused:
            for method, path in [("GET", "/admin/models"), ("POST", "/admin/drain")]:
                response = await client.request(method, url + path, headers=headers)
                assert response.status_code == status, (headers, path)
                assert error_of(response)["code"] == code
        assert not gateway.draining
        lower_case = {"authorization": f"bearer {TOKEN}"}
        listed = await client.get(url + "/admin/models", headers=lower_case)
        assert listed.status_code == 200
        assert [m["name"] for m in listed.json()["data"]] == ["m"]
        assert (await client.post(url + "/admin/drain", headers=ADMIN)).status_code == 202
        assert gateway.draining


async def test_admin_routes_refuse_unknown_models_paths_and_methods() -> None:
    config = make_config([static_model("org/m", UNREACHABLE)], admin={"token": TOKEN})
    async with serving(config) as (url, _), httpx2.AsyncClient() as client:
        async def call(method: str, path: str) -> tuple[int, str]:
            response = await client.request(method, url + path, headers=ADMIN)
            return response.status_code, error_of(response)["code"]

        assert await call("POST", "/admin/models/nope/load") == (404, "model_not_found")
        assert await call("POST", "/admin/models/org/m/restart") == (404, "not_found")
        assert await call("POST", "/admin/models/load") == (404, "not_found")
        assert await call("GET", "/admin/models/org/m/load") == (405, "method_not_allowed")
        assert await call("POST", "/admin/models") == (405, "method_not_allowed")
        assert await call("GET", "/admin/drain") == (405, "method_not_allowed")


async def test_load_evict_and_unload_a_model() -> None:
    config = make_config(
        [sim_model("a", aliases=["alias-a"]), sim_model("b", "--tokens-per-second", "20")],
        gateway={"max_models_concurrent": 1}, admin={"token": TOKEN})
    async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
        async def admin(method: str, path: str) -> Any:
            response = await client.request(method, url + path, headers=ADMIN)
            assert response.status_code == 200, response.text
            return response.json()

        loaded = await admin("POST", "/admin/models/alias-a/load")
        assert (loaded["name"], loaded["state"], loaded["starts"]) == ("a", "ready", 1)
        assert loaded["launcher"] == "process"
        assert loaded["address"].startswith("http://127.0.0.1:")
        # Only one model fits: loading b evicts the idle a.
        assert (await admin("POST", "/admin/models/b/load"))["state"] == "ready"
        listed = {m["name"]: m for m in (await admin("GET", "/admin/models"))["data"]}
        assert listed["a"]["state"] == "stopped"
        assert listed["a"]["evictions"] == 1
        assert listed["b"]["leases"] == listed["b"]["in_flight"] == 0
        assert listed["b"]["last_used"] is not None

        # Unloading drains first: the stream in flight finishes, then the model stops.
        lines: list[str] = []
        unloaded: dict[str, Any] = {}

        async def stream() -> None:
            async with client.stream("POST", url + "/v1/chat/completions",
                                     json=chat("b", max_tokens=10, stream=True)) as response:
                lines.extend([line async for line in response.aiter_lines() if line])

        async def unload() -> None:
            unloaded.update(await admin("POST", "/admin/models/b/unload"))

        async def b_leased() -> bool:
            return gateway.pool.backends["b"].leases == 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            await eventually(b_leased)
            tg.start_soon(unload)
        assert lines[-1] == "data: [DONE]"
        assert unloaded["state"] == "stopped"
        assert unloaded["address"] is None

        async def both_timed() -> bool:
            samples = await scrape(client, url)
            return all(value(samples, "gateway_backend_start_seconds_count", model=name) == 1
                       for name in "ab")

        await eventually(both_timed)
        samples = await scrape(client, url)
    assert value(samples, "gateway_evictions_total", model="a") == 1
    assert value(samples, "gateway_cold_starts_total", model="b") == 1
    assert value(samples, "gateway_backend_state", model="b", state="stopped") == 1


async def test_drain_refuses_new_requests_and_lets_those_in_flight_finish() -> None:
    backend = HeldBackend()
    async with serving_app(with_lifespan(backend)) as backend_url:
        config = make_config([static_model("m", backend_url)], admin={"token": TOKEN})
        async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client:
            assert (await client.get(url + "/ready")).status_code == 200
            answered: list[httpx2.Response] = []

            async def in_flight() -> None:
                answered.append(await client.post(url + "/v1/chat/completions",
                                                  json=chat("m")))

            async def held() -> bool:
                return backend.received == 1

            async with anyio.create_task_group() as tg:
                tg.start_soon(in_flight)
                await eventually(held)
                drained = await client.post(url + "/admin/drain", headers=ADMIN)
                assert (drained.status_code, drained.json()) == (
                    202, {"status": "draining", "in_flight": 1})

                ready = await client.get(url + "/ready")
                assert (ready.status_code, ready.json()["reason"]) == (503, "draining")
                refused = await client.post(url + "/v1/chat/completions", json=chat("m"))
                assert refused.status_code == 503
                assert refused.headers["retry-after"] == "1"
                assert error_of(refused)["code"] == "shutting_down"
                load = await client.post(url + "/admin/models/m/load", headers=ADMIN)
                assert (load.status_code, error_of(load)["code"]) == (503, "shutting_down")
                assert (await client.get(url + "/health")).status_code == 200
                assert (await client.get(url + "/metrics")).status_code == 200
                listed = (await client.get(url + "/admin/models", headers=ADMIN)).json()
                assert (listed["draining"], listed["in_flight"]) == (True, 1)
                backend.release.set()
            assert answered[0].status_code == 200
            assert backend.received == 1  # the refused request never reached it


async def test_sleep_and_wake_a_model_with_their_counters_and_wake_times() -> None:
    sleepy = sim_model("a", "--enable-sleep-mode", "--wake-delay", "0.2", sleep_level=1,
                       env={"VLLM_SERVER_DEV_MODE": "1"})
    config = make_config([sleepy, sim_model("plain")], admin={"token": TOKEN})
    async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client:
        async def admin(path: str, status: int = 200) -> Any:
            response = await client.post(url + path, headers=ADMIN)
            assert response.status_code == status, response.text
            return response.json()

        await admin("/admin/models/a/load")
        asleep = await admin("/admin/models/a/sleep")
        assert (asleep["state"], asleep["sleeps"], asleep["wakes"]) == ("asleep", 1, 0)
        assert asleep["actions"] == ["unload", "wake"]
        assert asleep["address"] is not None  # the server runs on
        samples = await scrape(client, url)
        assert value(samples, "gateway_backend_state", model="a", state="asleep") == 1
        woken = await admin("/admin/models/a/wake")
        assert (woken["state"], woken["sleeps"], woken["wakes"]) == ("ready", 1, 1)

        refused = error_of(await client.post(url + "/admin/models/plain/sleep", headers=ADMIN))
        assert refused["code"] == "model_cannot_sleep"
        listed = {m["name"]: m for m in (await client.get(url + "/admin/models",
                                                          headers=ADMIN)).json()["data"]}
        assert listed["plain"]["actions"] == ["load"]
        samples = await scrape(client, url)
    assert value(samples, "gateway_sleeps_total", model="a") == 1
    assert value(samples, "gateway_wakes_total", model="a") == 1
    assert value(samples, "gateway_backend_wake_seconds_count", model="a") == 1
    assert value(samples, "gateway_backend_wake_seconds_sum", model="a") >= 0.2
    assert value(samples, "gateway_backend_start_seconds_count", model="a") == 1


async def test_a_model_offers_only_the_verbs_of_its_state_and_refuses_the_others() -> None:
    sleepy = sim_model("a", "--enable-sleep-mode", sleep_level=1,
                       env={"VLLM_SERVER_DEV_MODE": "1"})
    config = make_config([sleepy], admin={"token": TOKEN})
    async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client:
        async def verb(action: str) -> httpx2.Response:
            return await client.post(url + f"/admin/models/a/{action}", headers=ADMIN)

        async def offered() -> list[str]:
            listed = await client.get(url + "/admin/models", headers=ADMIN)
            return listed.json()["data"][0]["actions"]

        async def refused(action: str, state: str) -> None:
            answer = await verb(action)
            assert answer.status_code == 409, answer.text
            assert error_of(answer)["code"] == "invalid_state"
            assert error_of(answer)["type"] == "invalid_request_error"
            assert f"is {state}: {action} does not apply" in error_of(answer)["message"]

        assert await offered() == ["load"]
        for action in ("unload", "sleep", "wake"):
            await refused(action, "stopped")
        assert (await verb("load")).json()["actions"] == ["unload", "sleep"]
        for action in ("load", "wake"):
            await refused(action, "ready")
        assert (await verb("sleep")).json()["actions"] == ["unload", "wake"]
        for action in ("load", "sleep"):
            await refused(action, "asleep")
        assert (await client.get(url + "/admin/models", headers=ADMIN)).json()["data"][0][
            "sleeps"] == 1  # the refused sleep did nothing
        assert (await verb("wake")).json()["state"] == "ready"
        assert (await verb("unload")).json()["actions"] == ["load"]
