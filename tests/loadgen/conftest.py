"""A small fake OpenAI-compatible streaming server, run on 127.0.0.1 at a random port."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class FakeBehaviour:
    first_token_delay_s: float = 0.0  # simulated prefill time
    token_delay_s: float = 0.0  # simulated decode step
    fail_every: int = 0  # every n-th request (1-based) answers 500; 0: never
    hang_every: int = 0  # every n-th request never finishes its stream; 0: never
    max_context: int = 0  # prompt words + max_tokens above it answer 400; listed in /v1/models
    stream_error_every: int = 0  # every n-th request sends an error object inside its stream
    bodies: list[dict] = field(default_factory=list)


def make_app(behaviour: FakeBehaviour) -> FastAPI:
    app = FastAPI()
    never = asyncio.Event()  # hung streams wait on it until the server shuts down

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": "fake-model", "object": "model"}
        if behaviour.max_context:
            entry["max_model_len"] = behaviour.max_context  # as vLLM lists it
        return {"object": "list", "data": [entry]}

    async def complete(request: Request, chat: bool):
        body = await request.json()
        behaviour.bodies.append(body)
        n = len(behaviour.bodies)
        if behaviour.fail_every and n % behaviour.fail_every == 0:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
        max_tokens = int(body["max_tokens"])
        prompt_tokens = len((body.get("prompt") or body["messages"][0]["content"]).split())
        if behaviour.max_context and prompt_tokens + max_tokens > behaviour.max_context:
            return JSONResponse(
                {
                    "error": {
                        "message": f"This model's maximum context length is {behaviour.max_context} tokens",
                        "type": "invalid_request_error",
                        "code": "context_length_exceeded",
                    }
                },
                400,
            )

        async def stream():
            await asyncio.sleep(behaviour.first_token_delay_s)  # simulated work
            for i in range(max_tokens):
                if i:
                    await asyncio.sleep(behaviour.token_delay_s)
                if behaviour.hang_every and n % behaviour.hang_every == 0 and i == 1:
                    await never.wait()
                if behaviour.stream_error_every and n % behaviour.stream_error_every == 0 and i == 1:
                    yield f"data: {json.dumps({'error': {'message': 'engine fell over'}})}\n\n"
                    return
                piece = {"delta": {"content": f" t{i}"}} if chat else {"text": f" t{i}"}
                yield f"data: {json.dumps({'choices': [piece | {'index': 0}]})}\n\n"
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, chat=True)

    return app


@dataclass
class FakeServer:
    url: str
    behaviour: FakeBehaviour


@pytest.fixture
def fake_server():
    """The server runs in its own thread and event loop, so synchronous CLI calls can load it."""
    behaviour = FakeBehaviour()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)  # connections queue in the backlog until the server accepts them
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(make_app(behaviour), log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield FakeServer(f"http://127.0.0.1:{port}", behaviour)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "fake server did not stop"
