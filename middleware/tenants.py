"""Tenants: the models a tenant may use, its rate limits, and its usage.

After admission (the model is known) and before the queue. The request's tenant is its key's
(``ClientKeys`` put it in the request's state), or the tenant ``default`` where no key is
needed. In order:

- a model the tenant may not use (``models``) is 403 ``model_not_allowed``;
- a tenant with ``rpm_limit`` or ``tpm_limit`` has the request counted in its windows
  (``kernel.ratelimits``); a spent window is 429 ``rate_limit_exceeded`` in the OpenAI shape
  (type ``requests`` or ``tokens``, as OpenAI says it; Anthropic's on its routes), with
  ``Retry-After`` (when the window has room again) and the ``x-ratelimit-*`` headers that
  OpenAI sends: ``limit``, ``remaining`` and ``reset`` for ``requests`` and ``tokens``, each of
  a limit the tenant has. An answer that goes through carries them too;
- the answer's tokens are read as it passes (``middleware.usage``; a streamed completion whose
  client did not ask for its usage asks for it, and the client does not see it) and, with the
  request, its error or not and its wait for a slot, go to the ledger (the tenant's tokens
  window, its usage per model) and to the Prometheus counters ``gateway_tenant_*``.

The layer is in the stack only where the configuration has client keys or ``[[tenants]]``: a
gateway without either has nothing to do here, and no cost.
"""

from __future__ import annotations

import math

import anyio
import structlog

from kernel.config import Config, TenantSettings
from kernel.context import STATE, RequestState
from kernel.errors import ERROR_KEY, GatewayError
from kernel.ratelimits import Ledger, Spent, Verdict, Window
from kernel.types import ASGIApp, Message, Receive, Scope, Send
from telemetry.metrics import GatewayMetrics

from .usage import ASKED_PATHS, UsageScan, UsageStrip, asking_for_usage

log = structlog.get_logger("gateway.tenants")


def reset_text(seconds: float) -> str:
    """A duration as OpenAI writes its ``x-ratelimit-reset-*`` headers: ``250ms``, ``1.5s``,
    ``1m0s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def rate_headers(verdict: Verdict) -> list[tuple[bytes, bytes]]:
    headers = []
    for kind, window in ((b"requests", verdict.requests), (b"tokens", verdict.tokens)):
        if window is not None:
            headers += [(b"x-ratelimit-limit-" + kind, str(window.limit).encode()),
                        (b"x-ratelimit-remaining-" + kind, str(window.remaining).encode()),
                        (b"x-ratelimit-reset-" + kind, reset_text(window.reset).encode())]
    return headers


def rate_limited(tenant: str, verdict: Verdict) -> GatewayError:
    spent: list[tuple[str, Window]] = [
        (kind, window) for kind, window in (("requests", verdict.requests),
                                            ("tokens", verdict.tokens))
        if window is not None and window.spent]
    kind, window = spent[0]
    retry = max(w.retry_after for _, w in spent)
    per_min = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
    return GatewayError(
        429, f"Rate limit reached for tenant '{tenant}' on {per_min}: Limit {window.limit}, "
        f"Used {window.used}. Please try again in {reset_text(retry)}.", type=kind,
        code="rate_limit_exceeded", retry_after=max(1, math.ceil(retry)),
        headers=tuple(rate_headers(verdict)))


def model_not_allowed(model: str) -> GatewayError:
    return GatewayError(403, f"This API key may not use the model '{model}'.",
                        type="invalid_request_error", code="model_not_allowed", param="model",
                        should_retry=False)


class Tenants:
    def __init__(self, app: ASGIApp, *, config: Config, ledger: Ledger,
                 metrics: GatewayMetrics) -> None:
        self.app = app
        self.ledger = ledger
        self.metrics = metrics
        self.default = config.default_tenant

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: RequestState = scope[STATE]
        tenant = state.tenant
        if tenant is None:
            tenant = state.tenant = self.default
        model = state.model.name
        if not tenant.may_use(model):
            self.metrics.reject(model, "model_not_allowed")
            await self._record(tenant, model, error=True)
            raise model_not_allowed(model)
        headers: list[tuple[bytes, bytes]] = []
        counted = False
        if tenant.rpm_limit or tenant.tpm_limit:
            verdict = await self.ledger.admit(tenant)
            if not verdict.admitted:
                self.metrics.reject(model, "rate_limited")
                await self._record(tenant, model, error=True)
                raise rate_limited(tenant.name, verdict)
            counted = True
            headers = rate_headers(verdict)
        strip = None
        if state.stream and scope["path"] in ASKED_PATHS:
            asking = asking_for_usage(state.body_bytes)
            if asking is not None:
                state.body_bytes = asking
                strip = UsageStrip()
        scan = UsageScan()
        status = 0
        failed = False

        async def tenant_send(message: Message) -> None:
            nonlocal status, failed
            if message["type"] == "http.response.start":
                status = message["status"]
                if headers:
                    message = {**message, "headers": [*message["headers"], *headers]}
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if ERROR_KEY in message:
                    failed = True
                elif body:
                    scan.feed(body)
                if strip is not None and status == 200 and ERROR_KEY not in message:
                    more = message.get("more_body", False)
                    body = strip.strip(body, last=not more)
                    if not body and more:
                        return
                    message = {**message, "body": body}
            await send(message)

        self.ledger.in_flight[tenant.name] += 1
        try:
            await self.app(scope, receive, tenant_send)
        except BaseException:
            failed = True
            raise
        finally:
            self.ledger.in_flight[tenant.name] -= 1
            with anyio.CancelScope(shield=True):
                await self._record(tenant, model, counted=counted, prompt=scan.prompt,
                                   completion=scan.completion,
                                   error=failed or status >= 400 or state.error is not None,
                                   queue_wait=state.queue_wait or 0.0)

    async def _record(self, tenant: TenantSettings, model: str, *, error: bool,
                      counted: bool = True, prompt: int = 0, completion: int = 0,
                      queue_wait: float = 0.0) -> None:
        """The request's usage: to the counters, and to the ledger (a refusal is counted in
        neither window)."""
        self.metrics.tenant_usage(tenant.name, model, prompt, completion, error, queue_wait)
        try:
            await self.ledger.record(Spent(tenant.name, model, not counted, prompt,
                                           completion, error, queue_wait))
        except GatewayError as exc:  # the shared store is away: the answer went out anyway
            log.warning("tenant usage not recorded", tenant=tenant.name, model=model,
                        reason=exc.message)
