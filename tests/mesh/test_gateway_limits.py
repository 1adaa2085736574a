"""What a client can make the gateway hold or compute, bounded: bodies before they are parsed,
prompts before they are tokenized (off the event loop), the generation one request asks for, and
the OpenAPI document stating the bounds. HTTP limits have nothing to do with the transport: these
run on the in-memory one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn

from services.gateway.connections import HEAD_SPREAD, ConnectionLimits, bounded_protocol
from services.run.runner import bind_socket
from tests.mesh.conftest import running_mesh
from tests.mesh.fake_engine import MAX_CONTEXT, FakeEngine, load

pytestmark = pytest.mark.usefixtures("cleanup")
FAKE = "tests.mesh.fake_engine:load"
CAP = 4096  # bytes of body, in these tests


@pytest.fixture
def transport_kind() -> str:
    return "memory"


@pytest.fixture
def config(mesh_config):
    return mesh_config.model_copy(
        update={"model": FAKE, "max_body_bytes": CAP, "max_prompt_chars": 1000, "max_request_tokens": 40}
    )


def completion(prompt, max_tokens: int = 3, **extra) -> dict:
    return {"model": FAKE, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


class CountingTokenizer:
    """The fake engine's tokenizer, counting what it was asked to encode."""

    def __init__(self, inner) -> None:
        self.inner, self.encoded = inner, []
        self.eos_token_id = inner.eos_token_id

    def encode(self, text: str) -> list[int]:
        self.encoded.append(len(text))
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)

    def apply_chat_template(self, messages):
        return self.inner.apply_chat_template(messages)


def counting_engine() -> FakeEngine:
    engine = FakeEngine()
    engine.tokenizer = CountingTokenizer(engine.tokenizer)
    return engine


# --- bodies ------------------------------------------------------------------------------------


async def test_a_body_over_the_cap_is_a_413_and_never_reaches_the_route(config, hub):
    async with running_mesh(config, hub, counting_engine) as m:
        tokenizer = m.mesh.workers[0].runner.engine.tokenizer
        oversized = json.dumps(completion("x" * (3 * CAP))).encode()
        for path in ("/v1/completions", "/v1/chat/completions", "/admin/schedule/pin"):
            response = await m.client.post(path, content=oversized, headers={"content-type": "application/json"})
            error = error_of(response, 413)
            assert error["code"] == "request_too_large" and str(CAP) in error["message"]
            assert response.headers["connection"] == "close"
        assert tokenizer.encoded == []
        ok = await m.client.post("/v1/completions", json=completion("fits"))
        assert ok.status_code == 200, ok.text


async def test_a_body_streamed_without_a_length_is_a_413_once_it_passes_the_cap(config, hub):
    sent = []

    async def chunks():
        for _ in range(64):  # 64 x 1 KiB: the answer comes after the cap, not after the body
            sent.append(1024)
            yield b" " * 1024

    async with running_mesh(config, hub, counting_engine) as m:
        response = await m.client.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert error_of(response, 413)["code"] == "request_too_large"
        assert sum(sent) <= CAP + 1024
        assert m.mesh.workers[0].runner.engine.tokenizer.encoded == []


async def test_a_body_within_the_cap_sent_in_pieces_is_served(config, hub):
    body = json.dumps(completion("in pieces")).encode()

    async def pieces():
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    async with running_mesh(config, hub, load) as m:
        response = await m.client.post(
            "/v1/completions", content=pieces(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 200, response.text


async def test_a_body_that_does_not_arrive_in_time_is_a_408(config, hub):
    stalled = asyncio.Event()

    async def stalling():
        yield b'{"model": '
        await stalled.wait()  # never set: the client stops sending
        yield b"}"

    async with running_mesh(config.model_copy(update={"body_timeout_s": 0.3}), hub, load) as m:
        response = await asyncio.wait_for(
            m.client.post("/v1/completions", content=stalling(), headers={"content-type": "application/json"}), 10
        )
        assert error_of(response, 408)["code"] == "request_timeout"


# --- prompts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", completion("y" * 1001), "prompt"),
        ("/v1/completions", completion(["y" * 1001]), "prompt"),
        (
            "/v1/chat/completions",
            {
                "model": FAKE,
                "max_tokens": 3,
                "messages": [{"role": "system", "content": "s" * 600}, {"role": "user", "content": "u" * 401}],
            },
            "messages",
        ),
    ],
)
async def test_a_prompt_over_max_prompt_chars_is_refused_before_it_is_tokenized(config, hub, path, body, param):
    async with running_mesh(config, hub, counting_engine) as m:
        error = error_of(await m.client.post(path, json=body), 400)
        assert error["param"] == param and error["code"] == "string_above_max_length"
        assert "1001" in error["message"] and "1000" in error["message"]
        assert m.mesh.workers[0].runner.engine.tokenizer.encoded == []


async def test_tokenizing_runs_off_the_event_loop(config, hub):
    """A tokenizer that blocks (a long prompt) holds its request only: the gateway answers others."""
    entered, release = threading.Event(), threading.Event()

    class Blocking(CountingTokenizer):
        def encode(self, text: str) -> list[int]:
            if text.startswith("block"):
                entered.set()
                release.wait(30)
            return super().encode(text)

    def blocking_engine() -> FakeEngine:
        engine = FakeEngine()
        engine.tokenizer = Blocking(engine.tokenizer)
        return engine

    async with running_mesh(config, hub, blocking_engine) as m:
        slow = asyncio.ensure_future(m.client.post("/v1/completions", json=completion("block me")))
        try:
            assert await asyncio.to_thread(entered.wait, 10)
            health = await asyncio.wait_for(m.client.get("/health"), 5)
            assert health.status_code == 200 and not slow.done()
        finally:
            release.set()
        assert (await asyncio.wait_for(slow, 10)).status_code == 200


# --- the generation one request asks for -------------------------------------------------------


async def test_n_times_max_tokens_over_the_cap_is_a_400_naming_it(config, hub):
    async with running_mesh(config, hub, load) as m:
        error = error_of(await m.client.post("/v1/completions", json=completion("x", 14, n=3)), 400)
        assert error["param"] == "n" and error["code"] == "integer_above_max_value"
        assert "40" in error["message"] and "n=3" in error["message"]
        error = error_of(
            await m.client.post(
                "/v1/chat/completions",
                json={"model": FAKE, "max_tokens": 41, "messages": [{"role": "user", "content": "x"}]},
            ),
            400,
        )
        assert error["param"] == "max_tokens"
        ok = await m.client.post("/v1/completions", json=completion("x", 13, n=3))
        assert ok.status_code == 200, ok.text
        unstated = {"model": FAKE, "prompt": "x", "n": 4, "ignore_eos": True}  # the default max_tokens fits the cap
        ok = await m.client.post("/v1/completions", json=unstated)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 40, ok.text


async def test_the_openapi_document_states_the_bounds(config, hub):
    async with running_mesh(config.model_copy(update={"max_request_tokens": 1000}), hub, load) as m:
        document = (await m.client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    for name in ("CompletionBody", "ChatBody"):
        properties = schemas[name]["properties"]
        integer = next(o for o in properties["max_tokens"]["anyOf"] if o.get("type") == "integer")
        assert integer["maximum"] == MAX_CONTEXT - 1  # the context bounds it below max_tokens_limit
        assert "1000" in properties["n"]["description"] and "1000" in properties["max_tokens"]["description"]
        top_k = json.dumps(properties["top_k"])
        assert '"maximum": 1048576' in top_k, top_k
        clauses = {c["if"]["properties"]["n"]["minimum"]: c["then"]["properties"] for c in schemas[name]["allOf"]}
        assert set(clauses) == set(range(4, 17))  # from n = 4, n x max_tokens <= 1000 bounds max_tokens below 255
        assert clauses[16]["max_tokens"]["anyOf"][0]["maximum"] == 1000 // 16
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert {"408", "413"} <= set(document["paths"][path]["post"]["responses"])


# --- connections: a real server on 127.0.0.1 ---------------------------------------------------


@contextlib.asynccontextmanager
async def served(app, limits: ConnectionLimits) -> AsyncIterator[int]:
    """``app`` behind uvicorn with the gateway's protocol on a free port of 127.0.0.1 (its lifespan
    is the caller's); the port. The socket listens before uvicorn starts: a connection waits in the
    backlog until it accepts."""
    sock = bind_socket("127.0.0.1", 0)
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="error", http=bounded_protocol(limits)))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def answer_of(reader: asyncio.StreamReader, timeout_s: float = 10) -> tuple[int, bytes]:
    """The status and whole answer the server sends before it closes the connection."""
    data = await asyncio.wait_for(reader.read(), timeout_s)  # read() returns at EOF: it closed
    return (int(data.split(b" ", 2)[1]) if data else 0), data


def limits(**changes) -> ConnectionLimits:
    return ConnectionLimits(
        **{"header_timeout_s": 5.0, "max_header_bytes": 8192, "max_connections": 0, "max_per_client": 0, **changes}
    )


async def test_slow_and_idle_clients_are_closed_at_the_header_timeout_and_others_served(config, hub):
    timeout_s = 0.5
    async with running_mesh(config, hub, load) as m, served(m.app, limits(header_timeout_s=timeout_s)) as port:
        loop = asyncio.get_running_loop()
        opened = loop.time()
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]
        for i, (_, writer) in enumerate(clients[:4]):  # two stay idle; four start a request and stall
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nX-Slow: " + b"a" * i)
            await writer.drain()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            normal = await client.post("/v1/completions", json=completion("normal"))
        assert normal.status_code == 200, normal.text
        answers = await asyncio.gather(*(answer_of(reader) for reader, _ in clients))
        closed_after = loop.time() - opened
        assert [status for status, _ in answers] == [408] * 6, answers
        assert b"header_timeout_s" in answers[0][1]
        assert timeout_s <= closed_after < timeout_s + 3
        for _, writer in clients:
            writer.close()


async def test_connections_opened_together_time_out_spread_not_in_one_burst(config, hub):
    """A slowloris opens its connections at once; their 408s (and the reconnects after) come
    spread over up to HEAD_SPREAD of the timeout, never before it."""
    timeout_s, count = 0.5, 24
    async with running_mesh(config, hub, load) as m, served(m.app, limits(header_timeout_s=timeout_s)) as port:
        loop = asyncio.get_running_loop()
        opened = loop.time()
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]

        async def closed_at(reader) -> float:
            status, _ = await answer_of(reader)
            assert status == 408
            return loop.time() - opened

        after = sorted(await asyncio.gather(*(closed_at(reader) for reader, _ in clients)))
        for _, writer in clients:
            writer.close()
    assert after[0] >= timeout_s
    assert after[-1] < timeout_s * (1 + HEAD_SPREAD) + 1.0
    assert after[-1] - after[0] > timeout_s * HEAD_SPREAD / 4, after  # all at once without the spread


@pytest.mark.parametrize("in_pieces", [False, True])
async def test_headers_over_the_cap_are_a_431_and_the_connection_closes(config, hub, in_pieces):
    async with running_mesh(config, hub, counting_engine) as m, served(m.app, limits(max_header_bytes=8192)) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"b" * 200_000 + b"\r\n\r\n"
        for i in range(0, len(head), 4096 if in_pieces else len(head)):
            writer.write(head[i : i + (4096 if in_pieces else len(head))])
            try:
                await writer.drain()
            except ConnectionError:  # closed while we were still sending
                break
        status, data = await answer_of(reader)
        assert status == 431 and b"max_header_bytes" in data
        writer.close()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/health", headers={"X-Fine": "c" * 4000})).status_code == 200


@pytest.mark.parametrize("caps, refused", [(dict(max_per_client=3), 429), (dict(max_connections=3), 503)])
async def test_connections_past_a_cap_are_refused_at_once_and_counted_down_when_they_close(config, hub, caps, refused):
    async with running_mesh(config, hub, load) as m, served(m.app, limits(**caps)) as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for reader, writer in held[:1]:  # the server has taken them: one answers
            writer.write(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        status, data = await answer_of(reader, 5)
        assert status == refused and b"retry-after: 1" in data.lower(), data
        writer.close()
        for _, held_writer in held:
            held_writer.close()
            await held_writer.wait_closed()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(3):  # the server counted them down as they closed
                assert (await client.get("/health")).status_code == 200


async def test_a_body_over_the_cap_is_answered_413_at_once_over_a_socket(config, hub):
    """Content-Length far over the cap: the answer comes before the body is sent, at once."""
    async with running_mesh(config, hub, counting_engine) as m, served(m.app, limits()) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        start = loop.time()
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (60 * 1024 * 1024) + b'{"model": "' + b"x" * 1000
        )
        await writer.drain()
        status, data = await answer_of(reader, 5)
        assert status == 413 and b"request_too_large" in data
        assert loop.time() - start < 1.0
        assert m.mesh.workers[0].runner.engine.tokenizer.encoded == []
        writer.close()
