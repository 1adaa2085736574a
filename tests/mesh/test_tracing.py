"""Tracing across services: one request's spans form one trace, from the gateway's HTTP span
through encode, the hand-off and decode, over both transports; off, nothing is recorded and
nothing of OpenTelemetry is imported by the services."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from common import tracing
from common.config import MeshConfig
from optimizer.schedule import Schedule
from tests.mesh.conftest import running_mesh
from tests.mesh.fake_engine import FakeEngine

FAKE = "tests.mesh.fake_engine:load"
WAA = Schedule(policy="waa-c", num_devices=2, encode_batch=4, decode_batch=8, encoder_devices=1, decoder_devices=1)
REPO = Path(__file__).resolve().parents[2]
SERVER = "POST /v1/completions"


@pytest.fixture(scope="module")
def provider_spans():
    """This module's tracer provider, recording in memory (OpenTelemetry's global one is never set)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "exegpt-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.use_provider(None)
    provider.shutdown()


@pytest.fixture
def spans(provider_spans):
    provider_spans.clear()
    return provider_spans


@pytest.fixture
def config(mesh_config, cleanup):
    return mesh_config.model_copy(update={"model": FAKE, "tracing": True})


async def complete(m, max_tokens: int = 5) -> str:
    response = await m.client.post(
        "/v1/completions", json={"model": FAKE, "prompt": "one two three", "max_tokens": max_tokens}
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


async def trace_of(spans: InMemorySpanExporter, rid: str, names: set[str]) -> dict[str, list]:
    """The finished spans of request ``rid`` by name, once every one of ``names`` is there (the
    server span ends just after the response)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        got: dict[str, list] = {}
        for span in spans.get_finished_spans():
            if span.attributes.get("exegpt.request_id") == rid:
                got.setdefault(span.name, []).append(span)
        if names <= set(got) or loop.time() > deadline:
            return got
        await asyncio.sleep(0.01)


def parent_of(span) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_one_trace_from_the_gateway_through_a_hand_off(config, hub, spans) -> None:
    async with running_mesh(config, hub, FakeEngine, workers=2, schedule=WAA) as m:
        rid = await complete(m)
        names = {SERVER, "publish encode", "encode", "publish handoff", "receive handoff", "decode"}
        got = await trace_of(spans, rid, names)
    assert set(got) == names and all(len(v) == 1 for v in got.values()), {k: len(v) for k, v in got.items()}
    server, publish, encode, handoff, receive, decode = (
        got[n][0] for n in (SERVER, "publish encode", "encode", "publish handoff", "receive handoff", "decode")
    )
    trace_id = server.context.trace_id
    assert {s.context.trace_id for s in spans.get_finished_spans()} == {trace_id}  # nothing else traced
    assert server.parent is None and server.kind == SpanKind.SERVER  # the root
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/v1/completions"
    assert parent_of(publish) == server.context.span_id and publish.kind == SpanKind.PRODUCER
    assert parent_of(encode) == publish.context.span_id and encode.kind == SpanKind.CONSUMER
    assert parent_of(handoff) == encode.context.span_id and handoff.kind == SpanKind.PRODUCER
    assert parent_of(receive) == handoff.context.span_id and receive.kind == SpanKind.CONSUMER
    assert parent_of(decode) == receive.context.span_id
    assert encode.attributes["exegpt.role"] == "encoder" and decode.attributes["exegpt.role"] == "decoder"
    assert encode.attributes["exegpt.worker_id"] != decode.attributes["exegpt.worker_id"]
    assert encode.attributes["exegpt.batch_size"] == 1
    assert encode.attributes["exegpt.prompt_tokens"] == publish.attributes["exegpt.prompt_tokens"] > 0
    assert decode.attributes["exegpt.output_tokens"] == 5 and decode.attributes["exegpt.outcome"] == "length"
    # the time line: encode, then the hand-off, then decode, all within the HTTP request
    assert server.start_time <= publish.start_time <= encode.start_time <= encode.end_time
    assert encode.end_time <= handoff.end_time and receive.end_time <= decode.start_time
    # a publish ends at the broker's confirm, which can reach the publisher after the delivery
    assert handoff.start_time <= receive.start_time <= receive.end_time
    assert decode.end_time <= server.end_time


async def test_a_worker_encodes_and_decodes_with_no_hand_off(config, hub, spans) -> None:
    async with running_mesh(config, hub, FakeEngine, workers=1) as m:
        rid = await complete(m, max_tokens=3)
        got = await trace_of(spans, rid, {SERVER, "publish encode", "encode", "decode"})
    assert set(got) == {SERVER, "publish encode", "encode", "decode"}
    server, publish, encode, decode = (got[n][0] for n in (SERVER, "publish encode", "encode", "decode"))
    assert len({s.context.trace_id for s in (server, publish, encode, decode)}) == 1
    assert server.parent is None
    assert parent_of(publish) == server.context.span_id
    assert parent_of(encode) == publish.context.span_id
    assert parent_of(decode) == encode.context.span_id
    assert encode.attributes["exegpt.role"] == decode.attributes["exegpt.role"] == "worker"
    assert encode.attributes["exegpt.worker_id"] == decode.attributes["exegpt.worker_id"]
    assert encode.end_time == decode.start_time  # decoding starts where its prefill ends
    assert decode.attributes["exegpt.output_tokens"] == 3


async def test_a_client_trace_is_joined(config, hub, spans) -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with running_mesh(config, hub, FakeEngine, workers=1) as m:
        response = await m.client.post(
            "/v1/completions", headers={"traceparent": parent}, json={"model": FAKE, "prompt": "one", "max_tokens": 2}
        )
        assert response.status_code == 200
        got = await trace_of(spans, response.json()["id"], {SERVER, "decode"})
    server = got[SERVER][0]
    assert server.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert server.parent.span_id == 0xB7AD6B7169203331 and server.parent.is_remote
    assert got["decode"][0].context.trace_id == server.context.trace_id


async def test_off_records_nothing(mesh_config, cleanup, hub, spans) -> None:
    config = mesh_config.model_copy(update={"model": FAKE})  # tracing off: the default
    assert config.tracing is False
    async with running_mesh(config, hub, FakeEngine, workers=2, schedule=WAA) as m:
        await complete(m)
        assert all(w.tracing is tracing.NO_TRACING for w in m.mesh.workers)
    assert spans.get_finished_spans() == ()


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )


def test_off_the_services_import_no_opentelemetry() -> None:
    """Off, no OpenTelemetry module is imported on the services' account. (FastAPI itself may import
    the OpenTelemetry API, for its own instrumentation: those modules are the baseline.)"""
    result = run_python("""
        import sys
        import fastapi  # some versions import the OpenTelemetry API for their own instrumentation
        def otel():
            return {m for m in sys.modules if m.startswith("opentelemetry")}
        before = otel()
        import common.tracing, services.run.runner, services.worker.worker, services.gateway.app
        from common.config import MeshConfig
        assert common.tracing.tracing_for(MeshConfig()) is common.tracing.NO_TRACING
        assert otel() == before, sorted(otel() - before)
        assert not any(m.startswith("opentelemetry.sdk") for m in sys.modules)
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_tracing_module_imports_nothing_until_on() -> None:
    result = run_python("""
        import sys
        from common.config import MeshConfig
        from common import tracing
        assert tracing.tracing_for(MeshConfig()) is tracing.NO_TRACING
        assert not any(m.startswith("opentelemetry") for m in sys.modules)
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_on_without_the_packages_the_process_exits_at_start() -> None:
    result = run_python("""
        import sys
        sys.modules["opentelemetry.sdk"] = None  # as if exegpt[tracing] were not installed
        from services.cli import main
        sys.exit(main(["worker", "--tracing", "--amqp-url", "amqp://x", "--redis-url", "redis://x"]))
    """)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'exegpt[tracing]'" in lines[0], result.stderr


def test_an_otlp_endpoint_needs_its_exporter() -> None:
    result = run_python("""
        import sys
        sys.modules["opentelemetry.exporter.otlp.proto.http.trace_exporter"] = None
        from services.cli import main
        sys.exit(main(["gateway", "--tracing", "--otlp-endpoint", "http://127.0.0.1:4318"]))
    """)
    assert result.returncode == 2 and "opentelemetry-exporter-otlp-proto-http" in result.stderr, result.stderr


def test_on_spans_go_to_stderr_as_json_lines() -> None:
    """With no OTLP endpoint the console exporter writes each span as one JSON line, with the
    service name of the process's role."""
    result = run_python("""
        from common import tracing
        from common.config import MeshConfig
        tracing.start_tracing(MeshConfig(tracing=True, namespace="ns1"), "worker")
        spans = tracing.tracing_for(MeshConfig(tracing=True))
        ctx = spans.record("encode", parent=None, start_s=1.0, end_s=2.0, attributes={"exegpt.request_id": "r1"})
        spans.end(spans.start("decode", parent=ctx, start_s=2.0), end_s=3.0)
    """)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [s["name"] for s in lines] == ["encode", "decode"]
    assert all(s["resource"]["attributes"]["service.name"] == "exegpt-worker" for s in lines)
    assert lines[0]["resource"]["attributes"]["service.namespace"] == "ns1"
    assert lines[1]["parent_id"] == lines[0]["context"]["span_id"]


def test_the_flag_and_the_environment_turn_it_on(monkeypatch) -> None:
    from services.cli import build_parser
    from services.cli.serve import build_config

    for role in ("serve", "gateway", "worker", "scheduler", "up"):
        args = build_parser().parse_args([role, "--tracing", "--otlp-endpoint", "http://c:4318"])
        config = build_config(args)
        assert config.tracing is True and config.otlp_endpoint == "http://c:4318"
    assert build_config(build_parser().parse_args(["serve"])).tracing is False
    monkeypatch.setenv("EXEGPT_TRACING", "1")
    monkeypatch.setenv("EXEGPT_OTLP_ENDPOINT", "http://c:4318/v1/traces")
    assert MeshConfig().tracing is True
    assert tracing.traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert tracing.traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert tracing.traces_url(MeshConfig().otlp_endpoint) == "http://c:4318/v1/traces"
