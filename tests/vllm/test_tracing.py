"""One trace holds the gateway's spans and a real vLLM's: the gateway traces by its
``[telemetry]`` table, vLLM by ``--otlp-traces-endpoint``, both into one OTLP receiver, and
vLLM continues the ``traceparent`` the gateway sends it."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from pathlib import Path

import pytest

from tests.otlp import http_receiver
from tests.support import HTTP, chat, gateway_process, wait_until

from .conftest import STARTUP_TIMEOUT, engine_processes, tiny_model_table, toml_config

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(STARTUP_TIMEOUT + 120)]

# Batches leave after 0.2 s, not the SDK's default 5.
QUICK_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "200"}


def test_one_trace_holds_the_gateways_spans_and_vllms(vllm_python: Path, tiny_model: Path,
                                                       tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    with http_receiver() as collector:
        model = tiny_model_table(vllm_python, tiny_model, marker)
        model["command"] += ["--otlp-traces-endpoint", collector.url + "/v1/traces"]
        model["env"] = {**model["env"], **QUICK_EXPORT, "OTEL_SERVICE_NAME": "vllm",
                        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
        config = toml_config([model], telemetry={"endpoint": collector.url})
        try:
            with gateway_process(config, tmp_path, env=QUICK_EXPORT) as (url, _):
                answer = HTTP.post(url + "/v1/chat/completions", timeout=STARTUP_TIMEOUT,
                                   json=chat("tiny", max_tokens=4, ignore_eos=True))
                assert answer.status_code == 200, answer.text
                wait_until(lambda: collector.named("llm_request"), timeout=60)
        finally:
            for line in engine_processes(marker):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split()[0]), signal.SIGKILL)
    (upstream,) = collector.named("upstream")
    trace = {span.name: span for span in collector.spans if span.trace_id == upstream.trace_id}
    assert {"POST /v1/chat/completions", "model start", "upstream",
            "llm_request"} <= set(trace)
    request, vllm = trace["POST /v1/chat/completions"], trace["llm_request"]
    assert request.service == "vllm-gateway" and vllm.service == "vllm"
    assert trace["model start"].parent_id == upstream.parent_id == request.span_id
    assert vllm.parent_id == upstream.span_id
    assert vllm.attributes["gen_ai.usage.completion_tokens"] == 4
