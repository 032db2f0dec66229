"""The ``[telemetry]`` section: OpenTelemetry traces, exported by OTLP to a collector.

Tracing is off unless an endpoint is set: ``telemetry.endpoint`` here, or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; ``OTEL_SDK_DISABLED=true``
turns it off whatever is set. Each key of the table stands for standard variables, which the
OpenTelemetry SDK reads itself where the table leaves a key unset: ``endpoint`` for
``OTEL_EXPORTER_OTLP_ENDPOINT`` (the collector's base address: the HTTP exporter adds
``/v1/traces``), ``protocol`` for ``OTEL_EXPORTER_OTLP_PROTOCOL``, ``service_name`` for
``OTEL_SERVICE_NAME`` (else ``vllm-gateway``), ``sample_ratio`` for
``OTEL_TRACES_SAMPLER=parentbased_traceidratio`` with its ``OTEL_TRACES_SAMPLER_ARG``, ``headers``
for ``OTEL_EXPORTER_OTLP_HEADERS``. The derived ``traces`` says what is in force: None (off) or
the protocol of the exporter. The SDK is an optional install (the ``otel`` extra): a gateway
told to trace without it is refused at start-up.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
from collections.abc import Mapping

from .validation import _NO_BOUNDS, ConfigError, _fail, _is_url, _Sources, _spec

PROTOCOLS = ("http/protobuf", "grpc")
# The exporter's module for each protocol (opentelemetry-exporter-otlp-proto-http / -grpc).
EXPORTERS = {"http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
             "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"}
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
INSTALL = "pip install 'vllm-gateway[otel]'"


@dataclasses.dataclass(frozen=True, slots=True)
class TelemetrySettings:
    endpoint: str | None = _spec(None)
    protocol: str | None = _spec(None, choices=PROTOCOLS)
    service_name: str | None = _spec(None)
    sample_ratio: float | None = _spec(None, lo=0.0, hi=1.0)
    headers: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}),
        metadata={**_NO_BOUNDS, "secret": True})
    # Derived (``_resolve_telemetry``): None when the gateway does not trace, else the protocol
    # its exporter speaks.
    traces: str | None = dataclasses.field(
        default=None, metadata={**_NO_BOUNDS, "derived": True})


def _resolve_telemetry(settings: TelemetrySettings, environ: Mapping[str, str],
                       sources: _Sources) -> TelemetrySettings:
    """Whether the gateway traces, by which protocol; refused when the packages are missing."""
    if settings.endpoint is not None and not _is_url(settings.endpoint, ("http", "https")):
        _fail("telemetry.endpoint", settings.endpoint, sources,
              "an http:// or https:// URL (the collector's OTLP address)")
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return settings
    switch = next((f"{var} (from environment variable {var})" for var in ENDPOINT_VARS
                   if environ.get(var)), None)
    if settings.endpoint is not None:
        switch = f"telemetry.endpoint (from {sources.of('telemetry.endpoint')})"
    if switch is None:
        return settings
    protocol = settings.protocol
    if protocol is None:
        var = next((v for v in PROTOCOL_VARS if environ.get(v)), None)
        protocol = environ[var].strip() if var else PROTOCOLS[0]
        if protocol not in PROTOCOLS:
            raise ConfigError(f"{var} = {protocol!r} (from environment variable {var}): must be "
                              f"one of {', '.join(map(repr, PROTOCOLS))}")
    for module in ("opentelemetry.sdk.trace", EXPORTERS[protocol]):
        if _missing(module):
            raise ConfigError(f"{switch} turns tracing on, but {module} is not installed: "
                              f"{INSTALL}")
    return dataclasses.replace(settings, traces=protocol)


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # a parent package is missing
        return True
