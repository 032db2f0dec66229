"""A tenant's tokens counted from a real vLLM's answers: a second gateway, with a tenant, in
front of the tier's shared vLLM (a static model at its address), so no vLLM starts here."""

from __future__ import annotations

from pathlib import Path

import httpx2
import openai
import pytest

from tests.support import gateway_process

from .conftest import STARTUP_TIMEOUT, Served

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(STARTUP_TIMEOUT + 60)]

ADMIN = "tenants-admin-0001"
HI = [{"role": "user", "content": "hi"}]


def test_tokens_of_plain_and_streamed_answers_are_counted(served: Served,
                                                          tmp_path: Path) -> None:
    shared = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0,
                           timeout=300)
    shared.models.list()
    httpx2.post(served.url + "/admin/models/tiny/load", headers=served.auth,
                timeout=STARTUP_TIMEOUT)
    config = f"""
[admin]
token = "{ADMIN}"
[[tenants]]
name = "team"
keys = ["sk-team-0001"]
[[models]]
name = "tiny"
launcher = "static"
url = "{served.backend()}"
"""
    with gateway_process(config, tmp_path) as (url, _):
        api = openai.OpenAI(base_url=url + "/v1", api_key="sk-team-0001", max_retries=0,
                            timeout=60)
        plain = api.chat.completions.create(model="tiny", messages=HI, max_tokens=4,
                                            extra_body={"ignore_eos": True})
        assert plain.usage is not None
        chunks = list(api.chat.completions.create(
            model="tiny", messages=HI, max_tokens=5, stream=True,
            extra_body={"ignore_eos": True}))
        # The client did not ask for the usage chunk: it does not get it.
        assert all(c.choices and c.usage is None for c in chunks)
        report = httpx2.get(url + "/admin/tenants", timeout=5,
                            headers={"authorization": f"Bearer {ADMIN}"}).json()
    team = next(t for t in report["data"] if t["name"] == "team")
    assert team["usage"]["tiny"]["requests"] == 2
    assert team["usage"]["tiny"]["completion_tokens"] == 4 + 5
    assert team["usage"]["tiny"]["prompt_tokens"] == 2 * plain.usage.prompt_tokens
