"""Client API keys: with keys configured, the OpenAI routes answer only requests that carry one.

The keys come from ``[auth] api_keys`` and ``[auth] api_keys_file``, validated and read once at
start-up by the configuration. A request must send ``Authorization: Bearer KEY`` (the OpenAI
clients) or ``x-api-key: KEY`` (the Anthropic clients); without one, or with a key that is not
among them, it gets 401 ``invalid_api_key``. Keys are held and compared as SHA-256 digests, so
the time a comparison takes tells nothing about how much of a key a guess got right. Both
headers are removed before the request goes on: the key is the gateway's, and a backend never
sees it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from kernel.errors import GatewayError
from kernel.types import ASGIApp, Receive, Scope, Send, header

KEY_HEADERS = frozenset({b"authorization", b"x-api-key"})


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


class Keys:
    """A set of bearer keys, held as SHA-256 digests."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = frozenset(hashlib.sha256(key.encode()).digest() for key in keys)

    def __contains__(self, token: bytes) -> bool:
        return hashlib.sha256(token).digest() in self._digests


def _invalid_key(message: str) -> GatewayError:
    return GatewayError(401, message, type="invalid_request_error", code="invalid_api_key",
                        should_retry=False)


class ClientKeys:
    def __init__(self, app: ASGIApp, *, keys: Iterable[str]) -> None:
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
        if token not in self.keys:
            await _invalid_key("Incorrect API key provided.").answer(scope, send)
            return
        headers = [(key, value) for key, value in scope["headers"] if key not in KEY_HEADERS]
        await self.app({**scope, "headers": headers}, receive, send)
