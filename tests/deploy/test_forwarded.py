"""gateway.trusted_proxies: forwarded headers are believed from those peers only."""

from __future__ import annotations

from typing import Any

import pytest

from kernel.config import ConfigError, config_from_mapping
from kernel.types import Scope
from proxy.forwarded import TrustedProxyHeaders, behind_proxies
from tests.support import make_config, static_model

pytestmark = pytest.mark.anyio

FORWARDED = [(b"x-forwarded-for", b"198.51.100.7, 203.0.113.9"),
             (b"x-forwarded-proto", b"https")]


async def seen_by_app(layer_of: Any, peer: str, headers: list[tuple[bytes, bytes]]) -> Scope:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope)

    scope = {"type": "http", "path": "/v1/models", "scheme": "http", "headers": headers,
             "client": (peer, 41000), "server": ("127.0.0.1", 8080)}
    await layer_of(app)(scope, None, None)
    return seen[0]


def trusting(*proxies: str) -> Any:
    return lambda app: TrustedProxyHeaders(app, trusted=proxies)


async def test_a_trusted_proxy_names_the_client_it_appended_last_and_the_scheme() -> None:
    scope = await seen_by_app(trusting("127.0.0.1"), "127.0.0.1", FORWARDED)
    assert scope["client"][0] == "203.0.113.9"
    assert scope["scheme"] == "https"


async def test_any_other_peer_keeps_its_address_and_scheme() -> None:
    scope = await seen_by_app(trusting("127.0.0.1"), "192.0.2.50", FORWARDED)
    assert scope["client"] == ("192.0.2.50", 41000)
    assert scope["scheme"] == "http"


@pytest.mark.parametrize("peer", ["10.1.2.3", "::ffff:10.1.2.3"])
async def test_a_network_trusts_its_addresses_also_on_a_dual_stack_listener(peer: str) -> None:
    scope = await seen_by_app(trusting("10.0.0.0/8", "::1"), peer, FORWARDED)
    assert scope["client"][0] == "203.0.113.9"


async def test_no_trusted_proxies_leaves_the_app_unwrapped() -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        raise AssertionError

    assert behind_proxies(app, ()) is app


def test_trusted_proxies_from_the_environment_are_comma_separated() -> None:
    config = config_from_mapping({"models": [static_model("m", "http://127.0.0.1:9")]},
                                 environ={"GATEWAY_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8"})
    assert config.gateway.trusted_proxies == ("127.0.0.1", "10.0.0.0/8")


@pytest.mark.parametrize(("value", "message"), [
    (["nginx"], "gateway.trusted_proxies[0] = 'nginx' (from test): must be an IP address"),
    (["10.0.0.1/8"], "gateway.trusted_proxies[0] = '10.0.0.1/8' (from test): must be an IP "),
    ("127.0.0.1", "gateway.trusted_proxies = '127.0.0.1' (from test): must be a list of strings"),
])
def test_a_trusted_proxy_that_is_no_address_stops_the_start(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        make_config([static_model("m", "http://127.0.0.1:9")],
                    gateway={"trusted_proxies": value})
    assert str(error.value).startswith(message)
