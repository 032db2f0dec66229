"""/metrics after known traffic, scraped and parsed as Prometheus does, on real sockets."""

from __future__ import annotations

from importlib.metadata import version

import anyio
import httpx2
import pytest

from backends.pool import ModelState
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


async def test_counters_histograms_and_the_pools_figures_after_known_traffic() -> None:
    config = make_config([sim_model("m")])
    async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client:
        for _ in range(2):
            assert (await client.post(url + "/v1/chat/completions",
                                      json=chat("m"))).status_code == 200
        async with client.stream("POST", url + "/v1/chat/completions",
                                 json=chat("m", stream=True)) as response:
            assert [line async for line in response.aiter_lines() if line][-1] == "data: [DONE]"
        assert (await client.post(url + "/v1/chat/completions",
                                  json=chat("nope"))).status_code == 404

        async def start_timed() -> bool:
            return value(await scrape(client, url), "gateway_backend_start_seconds_count",
                         model="m") == 1

        await eventually(start_timed)
        samples = await scrape(client, url)

    def m(name: str, **labels: str) -> float | None:
        return value(samples, name, model="m", **labels)

    assert m("gateway_requests_total", status="200") == 3
    assert value(samples, "gateway_requests_total", model="-", status="404") == 1
    for histogram in ("gateway_queue_wait_seconds", "gateway_time_to_first_byte_seconds",
                      "gateway_request_duration_seconds"):
        assert m(histogram + "_count") == 3, histogram
        assert m(histogram + "_bucket", le="+Inf") == 3, histogram
        # A request with no model got no slot: it has no timings of its own.
        assert value(samples, histogram + "_count", model="-") is None, histogram
    assert m("gateway_request_duration_seconds_sum") >= m("gateway_time_to_first_byte_seconds_sum")
    # The first request waited for the start; the start's own time is below its duration.
    assert 0 < m("gateway_backend_start_seconds_sum") < m("gateway_request_duration_seconds_sum")
    assert m("gateway_cold_starts_total") == 1
    assert m("gateway_evictions_total") == 0
    assert {state.value: m("gateway_backend_state", state=state.value) for state in ModelState} \
        == {state.value: (1.0 if state is ModelState.READY else 0.0) for state in ModelState}
    assert m("gateway_queue_depth") == 0
    assert m("gateway_in_flight") == 0
    assert m("gateway_backend_measured_vram_bytes") is None  # no GPU measured it
    assert value(samples, "gateway_build_info", version=version("vllm-gateway")) == 1


async def test_the_wait_for_a_slot_and_the_queue_full_rejection_are_counted() -> None:
    backend = HeldBackend()
    async with serving_app(with_lifespan(backend)) as backend_url:
        config = make_config([static_model("m", backend_url)],
                             gateway={"max_concurrent": 1, "max_queue_size": 1})
        async with serving(config) as (url, gateway), httpx2.AsyncClient(timeout=30) as client:
            statuses: list[int] = []

            async def post() -> None:
                statuses.append((await client.post(url + "/v1/chat/completions",
                                                   json=chat("m"))).status_code)

            async def held() -> bool:
                return backend.received == 1

            async def queued() -> bool:
                return gateway.accounting.depth("m") == 1

            async with anyio.create_task_group() as tg:
                tg.start_soon(post)
                await eventually(held)
                tg.start_soon(post)
                await eventually(queued)
                await post()
                await anyio.sleep(0.3)
                backend.release.set()
            samples = await scrape(client, url)

    def m(name: str, **labels: str) -> float | None:
        return value(samples, name, model="m", **labels)

    assert sorted(statuses) == [200, 200, 429]
    assert m("gateway_rejected_total", reason="queue_full") == 1
    assert m("gateway_requests_total", status="429") == 1
    # Observed where the slot is waited for: one took it at once, one waited for the release.
    assert m("gateway_queue_wait_seconds_count") == 2
    assert m("gateway_queue_wait_seconds_bucket", le="0.1") == 1
    assert m("gateway_queue_wait_seconds_sum") >= 0.3
