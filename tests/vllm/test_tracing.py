"""One trace holds the gateway's spans and a real vLLM's: a gateway traces by its
``[telemetry]`` table, the tier's shared vLLM by ``--otlp-traces-endpoint`` (both into OTLP
receivers), and vLLM continues the ``traceparent`` the gateway sends it.

The tracing gateway here is a second one in front of the shared vLLM (a ``static`` model at its
address), so the tier starts no vLLM for it; the span of a model start is tested with the
simulator (tests/integration/test_tracing.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.otlp import Receiver, Span, http_receiver
from tests.support import HTTP, chat, gateway_process, wait_until

from .conftest import QUICK_EXPORT, STARTUP_TIMEOUT, Served, toml_config

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(STARTUP_TIMEOUT + 120)]


def test_one_trace_holds_the_gateways_spans_and_vllms(served: Served, vllm_traces: Receiver,
                                                       tmp_path: Path) -> None:
    # The shared gateway starts vLLM (if no earlier test did); the tracing one uses it as is.
    assert HTTP.post(served.url + "/v1/chat/completions", timeout=STARTUP_TIMEOUT,
                     json=chat("tiny", max_tokens=1)).status_code == 200
    model = {"name": "tiny", "launcher": "static", "url": served.backend()}
    with http_receiver() as collector:
        config = toml_config([model], telemetry={"endpoint": collector.url})
        with gateway_process(config, tmp_path, env=QUICK_EXPORT) as (url, _):
            answer = HTTP.post(url + "/v1/chat/completions", timeout=60,
                               json=chat("tiny", max_tokens=4, ignore_eos=True))
            assert answer.status_code == 200, answer.text
            wait_until(lambda: collector.named("upstream"), timeout=30)
    (upstream,) = collector.named("upstream")

    def vllms() -> list[Span]:
        return [s for s in vllm_traces.named("llm_request") if s.trace_id == upstream.trace_id]

    wait_until(vllms, timeout=60)
    (vllm,) = vllms()
    trace = {span.name: span for span in collector.spans if span.trace_id == upstream.trace_id}
    request = trace["POST /v1/chat/completions"]
    assert request.service == "vllm-gateway" and vllm.service == "vllm"
    assert upstream.parent_id == request.span_id
    assert vllm.parent_id == upstream.span_id
    assert vllm.attributes["gen_ai.usage.completion_tokens"] == 4
