"""Client API keys: with keys configured, the OpenAI routes answer only requests that carry one.

The keys come from ``[auth] api_keys`` and ``[auth] api_keys_file``, validated and read once at
start-up by the configuration. A request must send ``Authorization: Bearer KEY`` (the OpenAI
clients) or ``x-api-key: KEY`` (the Anthropic clients); without one, or with a key that is not
among them, it gets 401 ``invalid_api_key``. A key's tenant (``[[tenants]]``; the tenant
``default`` for the keys no tenant lists) goes to the request's state for the later layers. Keys
are held and compared as SHA-256 digests, so the time a comparison takes tells nothing about how
much of a key a guess got right. Both headers are removed before the request goes on: the key is
the gateway's, and a backend never sees it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

from kernel.config import TenantSettings
from kernel.context import STATE
from kernel.errors import GatewayError
from kernel.types import ASGIApp, Receive, Scope, Send, header

KEY_HEADERS = frozenset({b"authorization", b"x-api-key"})
Owner = TypeVar("Owner")


def bearer_token(scope: Scope) -> bytes | None:
    """The token of the request's ``Authorization: Bearer`` header, if it has one."""
    value = header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


def client_key(scope: Scope) -> bytes | None:
    """The key the request carries: its bearer token, else its ``x-api-key``."""
    token = bearer_token(scope)
    if token is None:
        token = (header(scope, b"x-api-key") or b"").strip() or None
    return token


class Keys(Generic[Owner]):
    """Bearer keys, held as SHA-256 digests, each with its owner (for a set: True)."""

    def __init__(self, keys: Mapping[str, Owner] | Iterable[str]) -> None:
        owners = keys if isinstance(keys, Mapping) else dict.fromkeys(keys, True)
        self._owners = {hashlib.sha256(key.encode()).digest(): owner
                        for key, owner in owners.items()}

    def __contains__(self, token: bytes) -> bool:
        return hashlib.sha256(token).digest() in self._owners

    def owner(self, token: bytes) -> Owner | None:
        return self._owners.get(hashlib.sha256(token).digest())


def _invalid_key(message: str) -> GatewayError:
    return GatewayError(401, message, type="invalid_request_error", code="invalid_api_key",
                        should_retry=False)


class ClientKeys:
    def __init__(self, app: ASGIApp, *, keys: Mapping[str, TenantSettings]) -> None:
        self.app = app
        self.keys = Keys(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = client_key(scope)
        if token is None:
            await _invalid_key("No API key provided: send it as 'Authorization: Bearer KEY' "
                               "or 'x-api-key: KEY'.").answer(scope, send)
            return
        tenant = self.keys.owner(token)
        if tenant is None:
            await _invalid_key("Incorrect API key provided.").answer(scope, send)
            return
        scope[STATE].tenant = tenant
        headers = [(key, value) for key, value in scope["headers"] if key not in KEY_HEADERS]
        await self.app({**scope, "headers": headers}, receive, send)
