"""What clients may reach: only the OpenAI paths are forwarded, and with gateway API keys only
requests that carry one; the key itself never goes to a backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.support import chat, make_config, serving, serving_app, static_model

from .helpers import with_lifespan

pytestmark = pytest.mark.anyio

# vLLM's development, render and management endpoints: a client must never reach them.
DEV_PATHS = ["/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache",
             "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/start_profile",
             "/stop_profile", "/server_info", "/scale_elastic_ep", "/reset_mm_cache",
             "/pause", "/resume", "/is_paused", "/v1/chat/completions/render",
             "/v1/completions/render", "/inference/v1/generate", "/v1/messages/batches",
             "/v1/responses/resp_1/input_items", "/v1/audio/speech", "/invocations",
             "/v1/messages/render", "/v1/chat/completions/batch",
             "/v1/chat/completions/derender", "/v2/embed", "/v2/rerank", "/cohere/v2/chat",
             "/update_weights", "/abort_requests", "/version", "/load"]


def error_code(response: httpx2.Response) -> str:
    return response.json()["error"]["code"]


class Recording:
    """A backend that answers every request and keeps what it got. (The simulator's
    ``by_path`` cannot witness a forwarded ``/sleep``: it counts its own routes only.)"""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.headers: list[dict[bytes, bytes]] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])
        if scope["method"] == "POST":
            self.headers.append(dict(scope["headers"]))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"object": "chat.completion"}'})


async def test_only_the_openai_paths_reach_the_backend() -> None:
    backend = Recording()
    async with serving_app(with_lifespan(backend)) as backend_url:
        config = make_config([static_model("m", backend_url)])
        async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client:
            for path in DEV_PATHS:
                for method in ("POST", "GET"):
                    response = await client.request(method, url + path, json=chat("m"))
                    assert (response.status_code, error_code(response)) == (404, "not_found")
            wrong = await client.get(url + "/v1/chat/completions")
            assert (wrong.status_code, error_code(wrong)) == (405, "method_not_allowed")
            ok = await client.post(url + "/v1/chat/completions", json=chat("m"))
            assert ok.status_code == 200
    assert "/v1/chat/completions" in backend.paths
    assert set(backend.paths) <= {"/health", "/v1/chat/completions"}


async def test_api_keys_from_the_list_and_the_file_guard_the_client_routes(
        tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# the team's keys\n\nkey-from-file\n  key-two-from-file  \n")
    backend = Recording()
    async with serving_app(with_lifespan(backend)) as backend_url:
        config = make_config([static_model("m", backend_url)], admin={"token": "adm1n"},
                             auth={"api_keys": ["key-from-list"],
                                   "api_keys_file": str(keys_file)})
        async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client:
            async def post(path: str, authorization: str | None) -> httpx2.Response:
                headers = {"authorization": authorization} if authorization else {}
                return await client.post(url + path, json=chat("m"), headers=headers)

            for authorization in (None, "Bearer", "Basic a2V5LWZyb20tbGlzdA==",
                                  "Bearer key-from-lis", "Bearer key-from-listx",
                                  "Bearer # the team's keys"):
                refused = await post("/v1/chat/completions", authorization)
                assert refused.status_code == 401, authorization
                assert refused.json()["error"] == {
                    "message": refused.json()["error"]["message"],
                    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
            for key in ("key-from-list", "key-from-file", "key-two-from-file"):
                assert (await post("/v1/chat/completions", f"Bearer {key}")).status_code == 200
            # The Anthropic clients send the key as x-api-key.
            for key, status in (("key-from-list", 200), ("key-from-lis", 401)):
                response = await client.post(url + "/v1/chat/completions", json=chat("m"),
                                             headers={"x-api-key": key})
                assert response.status_code == status
            # Unknown paths are refused before they are looked up, like any request without a key.
            assert (await post("/sleep", None)).status_code == 401
            assert (await post("/sleep", "Bearer key-from-list")).status_code == 404

            models = url + "/v1/models"
            assert (await client.get(models)).status_code == 401
            assert (await client.get(models, headers={"authorization": "Bearer key-from-file"})
                    ).status_code == 200
            assert (await client.get(models + "/m")).status_code == 401
            for path in ("/health", "/ready", "/metrics"):
                assert (await client.get(url + path)).status_code == 200, path
            # The admin API has its own token, not a client key.
            admin = url + "/admin/models"
            assert (await client.get(admin, headers={"authorization": "Bearer key-from-list"})
                    ).status_code == 403
            assert (await client.get(admin, headers={"authorization": "Bearer adm1n"})
                    ).status_code == 200
    assert len(backend.headers) == 4
    assert all(b"authorization" not in headers and b"x-api-key" not in headers
               for headers in backend.headers)


async def test_without_gateway_keys_the_clients_authorization_goes_to_the_backend() -> None:
    backend = Recording()
    async with serving_app(with_lifespan(backend)) as backend_url:
        config = make_config([static_model("m", backend_url)])
        async with serving(config) as (url, _), httpx2.AsyncClient(timeout=30) as client:
            response = await client.post(url + "/v1/chat/completions", json=chat("m"),
                                         headers={"authorization": "Bearer backend-key"})
            assert response.status_code == 200
    assert [headers[b"authorization"] for headers in backend.headers] == [b"Bearer backend-key"]
