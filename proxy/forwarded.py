"""Forwarded headers, believed only from the proxies the operator names.

Behind nginx every connection comes from nginx, so the access log would show nginx as the
client of every request. The proxy names the real client in ``X-Forwarded-For`` (and the scheme
and host in ``X-Forwarded-Proto`` / ``-Host``), but any client can send those headers too. So
they are applied, by hypercorn's ``ProxyFixMiddleware`` (legacy mode, one hop: the last address
in the list, the one the proxy appended itself), only when the connection's peer is one of
``gateway.trusted_proxies``; any other peer keeps its own address and its headers are ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from hypercorn.middleware import ProxyFixMiddleware

from kernel.types import ASGIApp, Receive, Scope, Send


class TrustedProxyHeaders:
    def __init__(self, app: ASGIApp, *, trusted: Iterable[str]) -> None:
        self.app = app
        self.networks = tuple(ipaddress.ip_network(proxy) for proxy in trusted)
        self.fixed = ProxyFixMiddleware(app, mode="legacy", trusted_hops=1)

    def is_trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:  # not an IP address: a unix socket's peer, say
            return False
        if address.version == 6 and address.ipv4_mapped is not None:  # a dual-stack listener
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] in ("http", "websocket") and client and self.is_trusted(client[0]):
            await self.fixed(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def behind_proxies(app: ASGIApp, trusted: tuple[str, ...]) -> ASGIApp:
    """The app as served: with the forwarded headers of ``trusted`` peers applied, if any."""
    return TrustedProxyHeaders(app, trusted=trusted) if trusted else app
