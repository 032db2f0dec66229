"""``vllm-gateway serve`` configured by the standard ``OTEL_*`` variables alone exports its
spans to a real OTLP receiver, over HTTP and over gRPC, and its log lines carry the trace id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.otlp import grpc_receiver, http_receiver
from tests.support import HTTP, chat, gateway_process, wait_until

CONFIG = """
[[models]]
name = "sim"
launcher = "process"
command = ["{python}", "-m", "simulator", "--port", "{port}", "--model", "{name}"]
startup_timeout = 20.0
"""
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


@pytest.mark.parametrize(("protocol", "receiver"), [("http/protobuf", http_receiver),
                                                    ("grpc", grpc_receiver)])
def test_the_gateway_exports_one_trace_per_request_to_the_collector(
        protocol, receiver, tmp_path: Path) -> None:
    with receiver() as collector:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
               "OTEL_EXPORTER_OTLP_PROTOCOL": protocol, "OTEL_SERVICE_NAME": "gw-under-test",
               "OTEL_BSP_SCHEDULE_DELAY": "100"}
        with gateway_process(CONFIG, tmp_path, env=env) as (url, _):
            answer = HTTP.post(url + "/v1/chat/completions", json=chat("sim"), timeout=30,
                               headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
            assert answer.status_code == 200
            wait_until(lambda: collector.named("upstream"), timeout=10)
        spans = {span.name: span for span in collector.spans if span.trace_id == CLIENT_TRACE}
    assert {"POST /v1/chat/completions", "model start", "upstream"} <= set(spans)
    request = spans["POST /v1/chat/completions"]
    assert request.service == "gw-under-test"
    assert request.parent_id == CLIENT_SPAN
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["gen_ai.request.model"] == "sim"
    for child in ("model start", "upstream"):
        assert spans[child].parent_id == request.span_id
    # The probes are not traced (gateway_process waited on /health).
    assert not collector.named("GET")
    lines = [json.loads(line) for line in (tmp_path / "gateway.log").read_text().splitlines()
             if line.startswith("{")]
    requests = [line for line in lines if line.get("event") == "request"]
    (access,) = [line for line in requests if line["path"] == "/v1/chat/completions"]
    assert access["trace_id"] == CLIENT_TRACE
    assert all("trace_id" not in line for line in requests if line["path"] == "/health")
