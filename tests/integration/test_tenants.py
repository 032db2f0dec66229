"""Tenants through a real ``vllm-gateway serve`` process in front of the simulator: each key's
tenant, its limits as a client meets them (429 with OpenAI's headers, Anthropic's shape on its
routes, 403 for a model it may not use), and its usage as the operator reads it
(``GET /admin/tenants``, ``/metrics``), counted from plain, streamed and Anthropic answers."""

from __future__ import annotations

import json
import re

import httpx2

from tests.support import HTTP, chat, module_gateway

ADMIN = "admin-token-0001"
SIM = '["{python}", "-m", "simulator", "--port", "{port}", "--model", "{name}"'
CONFIG = f"""
[admin]
token = "{ADMIN}"
[auth]
api_keys = ["sk-nobody-0001"]
[[tenants]]
name = "limited"
keys = ["sk-limited-0001"]
rpm_limit = 2
[[tenants]]
name = "tokens"
keys = ["sk-tokens-0001"]
tpm_limit = 10
[[tenants]]
name = "metered"
keys = ["sk-metered-0001"]
models = ["sim"]
[[models]]
name = "sim"
launcher = "process"
command = {SIM}, "--tokens-per-second", "2000"]
startup_timeout = 20.0
[[models]]
name = "other"
launcher = "process"
command = {SIM}]
startup_timeout = 20.0
"""
# The simulator counts a prompt's words: "hi" is one token; it answers max_tokens tokens.
HI = [{"role": "user", "content": "hi"}]

gateway = module_gateway(CONFIG)


def post(url: str, key: str, body: dict, path: str = "/v1/chat/completions") -> httpx2.Response:
    return HTTP.post(url + path, json=body, headers={"authorization": f"Bearer {key}"})


def events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines()
            if line.startswith("data: {")]


def test_beyond_rpm_limit_a_client_gets_429_with_openais_headers_on_both_apis(
        gateway: str) -> None:
    answers = [post(gateway, "sk-limited-0001", chat("sim")) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["1", "0"]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
    refused = post(gateway, "sk-limited-0001", chat("sim"))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "requests"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert re.fullmatch(r"\d+(\.\d+)?s|1m0s", refused.headers["x-ratelimit-reset-requests"])
    anthropic = HTTP.post(gateway + "/v1/messages", headers={"x-api-key": "sk-limited-0001"},
                          json={"model": "sim", "max_tokens": 4, "messages": HI})
    assert anthropic.status_code == 429
    assert anthropic.json()["error"]["type"] == "rate_limit_error"
    assert anthropic.headers["x-ratelimit-limit-requests"] == "2"


def test_once_the_token_window_is_spent_the_next_request_is_refused(gateway: str) -> None:
    first = post(gateway, "sk-tokens-0001", chat("sim", max_tokens=12))
    assert first.status_code == 200
    assert first.headers["x-ratelimit-remaining-tokens"] == "10"
    refused = post(gateway, "sk-tokens-0001", chat("sim"))
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "tokens"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


def test_a_model_the_tenant_may_not_use_is_403(gateway: str) -> None:
    refused = post(gateway, "sk-metered-0001", chat("other"))
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed"


def test_usage_is_counted_from_every_kind_of_answer_and_shown_per_tenant(
        gateway: str) -> None:
    key = "sk-metered-0001"
    plain = post(gateway, key, chat("sim", max_tokens=3))
    assert plain.json()["usage"]["completion_tokens"] == 3
    unasked = post(gateway, key, chat("sim", max_tokens=4, stream=True))
    assert all("usage" not in e for e in events(unasked.text))  # as the client asked
    assert unasked.text.endswith("data: [DONE]\n\n")
    asked = post(gateway, key, chat("sim", max_tokens=5, stream=True,
                                    stream_options={"include_usage": True}))
    assert events(asked.text)[-1]["usage"]["completion_tokens"] == 5
    for stream in (False, True):
        answer = HTTP.post(gateway + "/v1/messages", headers={"x-api-key": key}, json={
            "model": "sim", "max_tokens": 6, "messages": HI, "stream": stream})
        assert answer.status_code == 200
    report = HTTP.get(gateway + "/admin/tenants",
                      headers={"authorization": f"Bearer {ADMIN}"}).json()
    tenants = {t["name"]: t for t in report["data"]}
    assert set(tenants) == {"limited", "tokens", "metered", "default"}
    metered = tenants["metered"]
    # 3 + 4 + 5 + 6 + 6 completion tokens, a prompt of one token each time.
    assert metered["usage"]["sim"] == {"requests": 5, "prompt_tokens": 5,
                                       "completion_tokens": 24, "errors": 0,
                                       "queue_wait_s": metered["usage"]["sim"]["queue_wait_s"]}
    assert metered["window"] == {"requests": 5, "tokens": 29}
    assert metered["limits"]["models"] == ["sim"]
    assert metered["in_flight"] == 0
    assert "sk-" not in json.dumps(report)
    metrics = HTTP.get(gateway + "/metrics").text
    assert ('gateway_tenant_tokens_total{kind="completion",model="sim",tenant="metered"} 24.0'
            in metrics)
    assert 'gateway_tenant_requests_total{model="sim",tenant="metered"} 5.0' in metrics


def test_a_key_lists_and_looks_up_only_the_models_its_tenant_may_use(gateway: str) -> None:
    def listed(key: str) -> list[str]:
        answer = HTTP.get(gateway + "/v1/models", headers={"authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
        return [m["id"] for m in answer.json()["data"]]

    assert listed("sk-metered-0001") == ["sim"]
    assert listed("sk-nobody-0001") == ["sim", "other"]
    hidden = HTTP.get(gateway + "/v1/models/other",
                      headers={"authorization": "Bearer sk-metered-0001"})
    assert hidden.status_code == 403
    assert hidden.json()["error"]["code"] == "model_not_allowed"
    shown = HTTP.get(gateway + "/v1/models/sim",
                     headers={"authorization": "Bearer sk-metered-0001"})
    assert shown.status_code == 200 and shown.json()["id"] == "sim"
