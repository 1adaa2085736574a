"""What a client can make the gateway hold or compute, bounded: bodies before they are parsed,
prompts before they are tokenized (off the event loop), the generation one request asks for, and
the OpenAPI document stating the bounds. HTTP limits have nothing to do with the transport: these
run on the in-memory one."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

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
    return mesh_config.model_copy(update={"model": FAKE, "max_body_bytes": CAP, "max_prompt_chars": 1000,
                                          "max_request_tokens": 40})


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
        response = await m.client.post("/v1/completions", content=chunks(),
                                       headers={"content-type": "application/json"})
        assert error_of(response, 413)["code"] == "request_too_large"
        assert sum(sent) <= CAP + 1024
        assert m.mesh.workers[0].runner.engine.tokenizer.encoded == []


async def test_a_body_within_the_cap_sent_in_pieces_is_served(config, hub):
    body = json.dumps(completion("in pieces")).encode()

    async def pieces():
        for i in range(0, len(body), 7):
            yield body[i:i + 7]

    async with running_mesh(config, hub, load) as m:
        response = await m.client.post("/v1/completions", content=pieces(),
                                       headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text


async def test_a_body_that_does_not_arrive_in_time_is_a_408(config, hub):
    stalled = asyncio.Event()

    async def stalling():
        yield b'{"model": '
        await stalled.wait()  # never set: the client stops sending
        yield b"}"

    async with running_mesh(config.model_copy(update={"body_timeout_s": 0.3}), hub, load) as m:
        response = await asyncio.wait_for(m.client.post(
            "/v1/completions", content=stalling(), headers={"content-type": "application/json"}), 10)
        assert error_of(response, 408)["code"] == "request_timeout"


# --- prompts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", completion("y" * 1001), "prompt"),
    ("/v1/completions", completion(["y" * 1001]), "prompt"),
    ("/v1/chat/completions", {"model": FAKE, "max_tokens": 3, "messages": [
        {"role": "system", "content": "s" * 600}, {"role": "user", "content": "u" * 401}]}, "messages"),
])
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
        error = error_of(await m.client.post("/v1/chat/completions", json={
            "model": FAKE, "max_tokens": 41, "messages": [{"role": "user", "content": "x"}]}), 400)
        assert error["param"] == "max_tokens"
        ok = await m.client.post("/v1/completions", json=completion("x", 13, n=3))
        assert ok.status_code == 200, ok.text


async def test_the_openapi_document_states_the_bounds(config, hub):
    async with running_mesh(config.model_copy(update={"max_request_tokens": 10_000}), hub, load) as m:
        document = (await m.client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    for name in ("CompletionBody", "ChatBody"):
        properties = schemas[name]["properties"]
        integer = next(o for o in properties["max_tokens"]["anyOf"] if o.get("type") == "integer")
        assert integer["maximum"] == MAX_CONTEXT - 1  # the context bounds it below max_tokens_limit
        assert "10000" in properties["n"]["description"] and "10000" in properties["max_tokens"]["description"]
        top_k = json.dumps(properties["top_k"])
        assert '"maximum": 1048576' in top_k, top_k
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert {"408", "413"} <= set(document["paths"][path]["post"]["responses"])
