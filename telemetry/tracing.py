"""OpenTelemetry's SDK as the gateway uses it: the tracer provider made from ``[telemetry]`` and
the W3C trace context read from a request's headers and written into another's.

Everything the table leaves unset is the SDK's to read from the standard ``OTEL_*`` variables
(``kernel.config.telemetry``): the exporter's endpoint, headers, timeout and certificates, the
sampler, the resource's attributes. The service is named ``vllm-gateway`` unless one of them
names it. Spans are exported in batches from the SDK's own thread (``BatchSpanProcessor``, its
``OTEL_BSP_*`` variables). The context is carried as the globally configured propagator says
(``OTEL_PROPAGATORS``; by default W3C ``traceparent``/``tracestate`` and ``baggage``).

Only imported when the gateway traces: the SDK is an optional install (the ``otel`` extra).
"""

from __future__ import annotations

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

from kernel.config import TelemetrySettings
from kernel.types import Scope

SERVICE = "vllm-gateway"
TRACES_PATH = "/v1/traces"  # the OTLP/HTTP path the SDK adds to OTEL_EXPORTER_OTLP_ENDPOINT


def tracer_provider(settings: TelemetrySettings,
                    exporter: SpanExporter | None = None) -> TracerProvider:
    """The provider the gateway's spans come from, exporting to ``exporter`` (by default the
    OTLP exporter of ``settings.traces``, the protocol)."""
    named = {SERVICE_NAME: settings.service_name} if settings.service_name else {}
    resource = Resource.create(named)
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
    sampler = (ParentBasedTraceIdRatio(settings.sample_ratio)
               if settings.sample_ratio is not None else None)  # None: OTEL_TRACES_SAMPLER
    provider = TracerProvider(resource=resource, sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter or otlp_exporter(settings)))
    return provider


def otlp_exporter(settings: TelemetrySettings) -> SpanExporter:
    headers = dict(settings.headers) or None
    if settings.traces == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=settings.endpoint, headers=headers)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )
    endpoint = settings.endpoint and settings.endpoint.rstrip("/") + TRACES_PATH
    return HttpExporter(endpoint=endpoint, headers=headers)


# The headers the propagator reads and writes (its choice is made once, from the environment).
FIELDS = frozenset(name.encode() for name in propagate.get_global_textmap().fields)


def incoming_context(scope: Scope) -> Context:
    """The trace context the request came with (none: a new trace begins)."""
    carrier = {key.decode(): value.decode("latin-1")
               for key, value in scope["headers"] if key in FIELDS}
    return propagate.extract(carrier)


def with_context(headers: list[tuple[bytes, bytes]],
                 span: trace.Span) -> list[tuple[bytes, bytes]]:
    """``headers`` with the trace context of ``span`` in place of any the client sent."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return [*((k, v) for k, v in headers if k not in FIELDS),
            *((k.encode(), v.encode("latin-1")) for k, v in carrier.items())]
