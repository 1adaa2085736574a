"""Tracing across the mesh with OpenTelemetry: off unless ``MeshConfig.tracing``, one trace per request.

A request's spans join into one trace through W3C trace context (``traceparent``, ``tracestate``)
in the headers of the messages that carry it (``Bus.publish(headers=...)``, ``Delivery.headers``):

    POST /v1/completions (gateway, server)
      └ publish encode (gateway, producer)
          └ encode (worker or encoder: the engine step that prefilled it)
              ├ decode (role "worker": from its prefill's end to its last token)
              └ publish handoff (encoder, producer: KV stored, KvReady published)
                  └ receive handoff (decoder, consumer: KV fetched)
                      └ decode (decoder: from its import to its last token)

Off, nothing here imports ``opentelemetry``: services hold ``NO_TRACING``, whose methods do
nothing, and check ``enabled`` before any per-request work. On, the process has one tracer
provider (``start_tracing``, at the entry point, or ``use_provider``, for tests and embedders); it
is this module's, never OpenTelemetry's global one, so tests can install their own and other
libraries' instrumentation (FastAPI's own spans) stays off.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from common.config import MeshConfig

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
INSTALL_HINT = "pip install 'exegpt[tracing]'"
OTLP_HINT = "pip install opentelemetry-exporter-otlp-proto-http"
TRACER_NAME = "exegpt"

Kind = Literal["internal", "server", "client", "producer", "consumer"]
Attributes = Mapping[str, str | int | float | bool | None]  # None values are left out


def _present(attributes: Attributes | None) -> dict[str, str | int | float | bool] | None:
    return None if attributes is None else {k: v for k, v in attributes.items() if v is not None}


class TracingUnavailable(RuntimeError):
    """Tracing is on but OpenTelemetry (or the configured exporter) is not installed."""


class NoTracing:
    """Tracing off: every call does nothing and returns nothing."""

    enabled = False

    def extract(self, headers: Mapping[str, str]) -> None:
        return None

    def inject(self, parent: Any = None) -> None:
        return None

    def start(
        self,
        name: str,
        *,
        parent: Any = None,
        kind: Kind = "internal",
        start_s: float | None = None,
        attributes: Attributes | None = None,
    ) -> None:
        return None

    def end(
        self,
        span: Any,
        *,
        end_s: float | None = None,
        attributes: Attributes | None = None,
        error: str | None = None,
        name: str | None = None,
    ) -> None:
        return None

    def annotate(
        self, span: Any, *, attributes: Attributes | None = None, error: str | None = None, name: str | None = None
    ) -> None:
        return None

    def record(
        self,
        name: str,
        *,
        parent: Any,
        start_s: float,
        end_s: float,
        kind: Kind = "internal",
        attributes: Attributes | None = None,
        error: str | None = None,
    ) -> None:
        return None

    def context_of(self, span: Any) -> None:
        return None

    def span(
        self, name: str, *, parent: Any = None, kind: Kind = "internal", attributes: Attributes | None = None
    ) -> contextlib.AbstractContextManager[None]:
        return _NOTHING


_NOTHING = contextlib.nullcontext()
NO_TRACING = NoTracing()


class OtelTracing:
    """Spans from one OpenTelemetry tracer. ``parent`` arguments are contexts (``extract``,
    ``context_of``); None means the current one. Times are ``time.time()`` seconds."""

    enabled = True

    def __init__(self, tracer: Any) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracer, self._trace, self._context = tracer, trace, context
        self._propagator = TraceContextTextMapPropagator()  # W3C, whatever OTEL_PROPAGATORS says
        self._kinds = {
            "internal": trace.SpanKind.INTERNAL,
            "server": trace.SpanKind.SERVER,
            "client": trace.SpanKind.CLIENT,
            "producer": trace.SpanKind.PRODUCER,
            "consumer": trace.SpanKind.CONSUMER,
        }

    def extract(self, headers: Mapping[str, str]) -> Any:
        """The context that ``headers`` carry (an empty one, so spans under it are roots, if none)."""
        return self._propagator.extract(headers, context=self._context.Context())

    def inject(self, parent: Any = None) -> dict[str, str]:
        """Headers that carry ``parent`` (default: the current context) to the next service."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=parent)
        return carrier

    def start(
        self,
        name: str,
        *,
        parent: Any = None,
        kind: Kind = "internal",
        start_s: float | None = None,
        attributes: Attributes | None = None,
    ) -> Any:
        return self._tracer.start_span(
            name,
            context=parent,
            kind=self._kinds[kind],
            attributes=_present(attributes),
            start_time=None if start_s is None else _ns(start_s),
        )

    def end(
        self,
        span: Any,
        *,
        end_s: float | None = None,
        attributes: Attributes | None = None,
        error: str | None = None,
        name: str | None = None,
    ) -> None:
        if span is not None:
            self.annotate(span, attributes=attributes, error=error, name=name)
            span.end(end_time=None if end_s is None else _ns(end_s))

    def annotate(
        self, span: Any, *, attributes: Attributes | None = None, error: str | None = None, name: str | None = None
    ) -> None:
        """Rename ``span``, add ``attributes`` (None values left out), or mark it failed."""
        if name is not None:
            span.update_name(name)
        if attributes:
            span.set_attributes(_present(attributes))
        if error is not None:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))

    def record(
        self,
        name: str,
        *,
        parent: Any,
        start_s: float,
        end_s: float,
        kind: Kind = "internal",
        attributes: Attributes | None = None,
        error: str | None = None,
    ) -> Any:
        """A span that already happened; returns its context (for the spans that follow from it)."""
        span = self.start(name, parent=parent, kind=kind, start_s=start_s, attributes=attributes)
        self.end(span, end_s=end_s, error=error)
        return self.context_of(span)

    def context_of(self, span: Any) -> Any:
        return self._trace.set_span_in_context(span, self._context.Context())

    @contextlib.contextmanager
    def span(
        self, name: str, *, parent: Any = None, kind: Kind = "internal", attributes: Attributes | None = None
    ) -> Iterator[Any]:
        """A span around the block, current within it (an exception marks it failed)."""
        with self._tracer.start_as_current_span(
            name, context=parent, kind=self._kinds[kind], attributes=_present(attributes)
        ) as span:
            yield span


Tracing = NoTracing | OtelTracing

_provider: Any = None  # the process's tracer provider, once tracing started
_tracing: OtelTracing | None = None


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def use_provider(provider: Any) -> OtelTracing | None:
    """Make ``provider`` (an OpenTelemetry ``TracerProvider``) the one this process's services
    trace to when their config turns tracing on; a test installs one with an in-memory exporter
    (None forgets it; services already built keep what they hold)."""
    global _provider, _tracing
    _provider = provider
    _tracing = None if provider is None else OtelTracing(provider.get_tracer(TRACER_NAME))
    return _tracing


def start_tracing(config: MeshConfig, role: str) -> None:
    """At a process's start, when ``config.tracing``: a tracer provider for service
    ``exegpt-<role>`` that sends spans to ``config.otlp_endpoint`` (OTLP over HTTP), or writes
    them to stderr as JSON lines. Raises TracingUnavailable when a package it needs is missing.
    A provider already installed (``use_provider``) is kept."""
    if _provider is not None:
        return
    check_installed(config)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = _exporter(config.otlp_endpoint)
    resource = Resource.create({"service.name": f"exegpt-{role}", "service.namespace": config.namespace})
    provider = TracerProvider(resource=resource)  # flushed and shut down at interpreter exit
    provider.add_span_processor(BatchSpanProcessor(exporter))
    use_provider(provider)


def check_installed(config: MeshConfig) -> None:
    """Raise TracingUnavailable, with the command that installs it, when tracing as ``config``
    sets it up needs a package that is missing."""
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        raise TracingUnavailable(f"tracing is on but OpenTelemetry is not installed: {INSTALL_HINT}") from None
    if config.otlp_endpoint is not None:
        try:
            import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        except ImportError:
            raise TracingUnavailable(
                f"otlp_endpoint is set but the OTLP exporter is not installed: {OTLP_HINT}"
            ) from None


def _exporter(endpoint: str | None) -> Any:
    if endpoint is None:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=traces_url(endpoint))


def traces_url(endpoint: str) -> str:
    """The collector's traces URL: ``http://host:4318`` gets the standard ``/v1/traces`` path."""
    head, sep, path = endpoint.partition("://")
    if sep and "/" not in path.rstrip("/"):
        return f"{head}://{path.rstrip('/')}/v1/traces"
    return endpoint


def tracing_for(config: MeshConfig) -> Tracing:
    """What a service traces with: nothing when ``config.tracing`` is off, else the process's
    provider (started here, as service ``exegpt-mesh``, if the entry point did not)."""
    if not config.tracing:
        return NO_TRACING
    if _tracing is None:
        start_tracing(config, "mesh")
    assert _tracing is not None
    return _tracing
