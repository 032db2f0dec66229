"""The gateway for an ASGI server's own command line:

    GATEWAY_CONFIG=config.toml hypercorn --config deploy/hypercorn.toml proxy.asgi:app

The configuration is read and validated at import, as ``vllm-gateway serve`` reads it: the file
named by ``GATEWAY_CONFIG`` (else ``./config.toml``) with the ``GATEWAY_*`` overrides; a bad one
exits with status 2 and its one-line message. The server's settings are then the server's own
(hypercorn's ``bind``, ``backlog``, ``graceful_timeout``, ``keep_alive_timeout``): the gateway's
``bind``, ``backlog``, ``shutdown_grace`` and ``keep_alive_timeout`` apply to
``vllm-gateway serve`` only. Run one worker process: the queues, the slots and the models it
started are that process's state.
"""

from __future__ import annotations

from .app import build_app
from .cli import load_or_exit
from .forwarded import behind_proxies
from .logs import configure_logging, log_configuration

config = load_or_exit()
configure_logging(config.gateway.log_format)
log_configuration(config)
app = behind_proxies(build_app(config), config.gateway.trusted_proxies)
