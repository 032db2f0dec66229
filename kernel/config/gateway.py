"""The ``[gateway]`` section: the gateway's own address, limits, timeouts and logging, and the
checks a field's bounds cannot say (the bind address, the instance name, the body budget, the
loading feedback's tick, the trusted proxies)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Iterable

from .validation import DAY, HOUR, ConfigError, _fail, _show, _Sources, _spec


@dataclasses.dataclass(frozen=True, slots=True)
class GatewaySettings:
    bind: str = _spec("127.0.0.1:8080")
    max_queue_size: int = _spec(200, lo=1, hi=1_000_000)
    max_concurrent: int = _spec(50, lo=1, hi=10_000)
    max_models_concurrent: int = _spec(3, lo=1, hi=1_000)
    # Models kept asleep at once (vLLM's sleep mode: level 1 holds the weights in host memory);
    # beyond it the one asleep longest is stopped.
    max_models_asleep: int = _spec(2, lo=0, hi=1_000)
    max_concurrent_total: int | None = _spec(None, lo=1, hi=1_000_000)
    queue_timeout: float = _spec(60.0, lo=0.001, hi=DAY)
    # Seconds a request may wait while requests of a higher priority ([[tenants]] priority) that
    # came after it are granted first; then it goes before them. Below queue_timeout (checked
    # where priorities differ), so that a low priority is slower but does not time out for it.
    max_priority_wait: float = _spec(10.0, lo=0.001, hi=DAY)
    max_body_bytes: int = _spec(10 * 1024 * 1024, lo=1, hi=1024 ** 3)
    # Response ids remembered with the model that made them (a few hundred bytes each), so
    # that GET /v1/responses/{id} and its cancel reach that model.
    max_response_ids: int = _spec(10_000, lo=1, hi=10_000_000)
    # Seconds one send to the client may take: a client that stops reading for longer is ended
    # as if it had disconnected (as nginx's send_timeout, and its default).
    send_timeout: float = _spec(60.0, lo=0.001, hi=DAY)
    # Seconds the whole request body may take to arrive (a body sent a byte a second holds its
    # bytes and its connection): then 408.
    body_timeout: float = _spec(30.0, lo=0.001, hi=DAY)
    # Bytes of request bodies held at once by every request in flight or queued together; a
    # request that would go past it gets 503 with Retry-After. At least max_body_bytes.
    max_buffered_body_bytes: int = _spec(256 * 1024 * 1024, lo=1, hi=1024 ** 4)
    # Connections the kernel may hold for accept(): a burst beyond it waits for SYN retries.
    backlog: int = _spec(2048, lo=1, hi=65535)
    placement_timeout: float = _spec(30.0, lo=0.001, hi=DAY)
    shutdown_grace: float = _spec(30.0, lo=0.0, hi=DAY)
    # Seconds a stream may wait (for its model or a slot) before it gets its 200 and an SSE
    # comment every as many seconds; 0: no feedback, the status waits for the answer. A value
    # between is refused (_check_keepalive): the ticker would spin.
    stream_keepalive: float = _spec(2.0, lo=0.0, hi=HOUR)
    gpu_memory_mb: int | None = _spec(None, lo=1, hi=10_000_000)
    # Names this gateway's containers (labels, names); None: made from the host and the config.
    instance: str | None = _spec(None)
    log_format: str = _spec("auto", choices=("auto", "json", "console"))
    # Seconds an idle client connection stays open: above a proxy's own upstream keep-alive
    # (nginx: 60 s), so that the proxy, never the gateway, closes an idle connection; otherwise
    # the proxy may send a request down a connection the gateway is closing and answer 502.
    keep_alive_timeout: float = _spec(75.0, lo=0.001, hi=DAY)
    # Peers (addresses or networks) whose X-Forwarded-For/-Proto/-Host are believed.
    trusted_proxies: tuple[str, ...] = ()
    # The model (its name or an alias) a request that names none goes to; None: the only
    # model, when exactly one is configured.
    default_model: str | None = _spec(None)


_BIND = re.compile(r"(?P<host>\[[^\]]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")


def _check_bind(bind: str, sources: _Sources) -> None:
    match = _BIND.fullmatch(bind)
    ok = match is not None and 1 <= int(match["port"]) <= 65535
    if ok and match["host"].startswith("["):
        try:
            ipaddress.IPv6Address(match["host"][1:-1])
        except ValueError:
            ok = False
    if not ok:
        _fail("gateway.bind", bind, sources, "HOST:PORT: a host name, an IPv4 address or an "
              "[IPv6] address, and a port from 1 to 65535")


# A container name's characters (the instance is part of every container's name), kept short.
_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _check_instance(instance: str | None, sources: _Sources) -> None:
    if instance is not None and not _INSTANCE.fullmatch(instance):
        _fail("gateway.instance", instance, sources, "up to 63 letters, digits and _ . - "
              "starting with a letter or digit (it names containers)")


def _check_body_budget(gateway: GatewaySettings, sources: _Sources) -> None:
    if gateway.max_buffered_body_bytes < gateway.max_body_bytes:
        _fail("gateway.max_buffered_body_bytes", gateway.max_buffered_body_bytes, sources,
              f"at least gateway.max_body_bytes ({gateway.max_body_bytes}): a body of the "
              "largest size allowed must fit")


MIN_KEEPALIVE = 0.1


def _check_keepalive(keepalive: float, sources: _Sources) -> None:
    if 0 < keepalive < MIN_KEEPALIVE:
        _fail("gateway.stream_keepalive", keepalive, sources,
              f"0 (no loading feedback) or a number from {MIN_KEEPALIVE} to {HOUR:.1f}")


def _check_trusted_proxies(proxies: tuple[str, ...], sources: _Sources) -> None:
    for i, proxy in enumerate(proxies):
        try:
            ipaddress.ip_network(proxy)
        except ValueError:
            raise ConfigError(
                f"gateway.trusted_proxies[{i}] = {_show(proxy)} (from "
                f"{sources.of('gateway.trusted_proxies')}): must be an IP address or a network "
                "like 10.0.0.0/8 (no host bits set)") from None


def _check_priority_wait(gateway: GatewaySettings, priorities: Iterable[int],
                         sources: _Sources) -> None:
    if len(set(priorities)) > 1 and gateway.max_priority_wait >= gateway.queue_timeout:
        _fail("gateway.max_priority_wait", gateway.max_priority_wait, sources,
              f"below gateway.queue_timeout ({gateway.queue_timeout:g}) where tenants have "
              "different priorities: a low-priority request would time out before its turn")
