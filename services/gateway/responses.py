"""A request's answer: admitted, submitted once per choice, then answered whole or streamed (SSE)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from common.messages.work import Sampling
from common.transport.errors import is_outage
from engine.api import Tokenizer
from services.front import openai_api as oa
from services.front.core import Gateway, Pending, RequestFailed
from services.gateway.admission import Admission, Refused, Ticket
from services.gateway.errors import ApiError


async def respond(
    request: Request, endpoint: oa.Answers, body: oa._Common, prompt_ids: list[int], sampling: Sampling
) -> Response:
    """Admit the request (``Admission``: 429 past a limit), submit one request per choice
    (``n``; with a seed, choice i samples with seed + i) and answer with all of them; a choice
    that fails fails the response and aborts the others, and so does a client that leaves."""
    gateway: Gateway = request.app.state.gateway
    request.state.request_id = rid = f"{endpoint.id_prefix}-{uuid.uuid4().hex}"
    ticket = await admit(request, endpoint.name, body.n or 1, len(prompt_ids) + sampling.max_tokens)
    pendings: list[Pending] = []
    try:
        for i in range(body.n or 1):
            seeded = sampling if i == 0 or sampling.seed is None else replace(sampling, seed=sampling.seed + i)
            pendings.append(
                await gateway.submit(prompt_ids, seeded, request_id=rid if i == 0 else f"{rid}-{i}", stream=body.stream)
            )
    except BaseException as exc:
        ticket.cancel()
        for pending in pendings:
            await gateway.abort(pending)
        if is_outage(exc):
            gateway.metrics.requests.labels(endpoint.name, "503").inc()
            gateway.metrics.refused.labels("unavailable").inc()
        raise
    ticket.bind(pendings)
    request.state.pending = Choices(pendings)  # their completion tokens, once the response ended
    tokenizer = request.app.state.model.tokenizer
    response: Response
    try:
        if body.stream:
            response = await stream_response(gateway, pendings, endpoint, body, tokenizer)
        else:
            response = await until_disconnected(request, whole_response(gateway, pendings, endpoint, tokenizer))
    except RequestFailed as exc:
        gateway.metrics.requests.labels(endpoint.name, str(exc.status)).inc()
        for pending in pendings:
            await gateway.abort(pending)
        raise ApiError(exc.status, str(exc), code="generation_failed") from None
    except BaseException:  # cancelled, or the client left: the workers drop its work
        for pending in pendings:
            await gateway.abort(pending)
        raise
    if response.status_code == CLIENT_CLOSED:
        for pending in pendings:
            await gateway.abort(pending)
    gateway.metrics.requests.labels(endpoint.name, str(response.status_code)).inc()
    return response


async def admit(request: Request, endpoint: str, choices: int, tokens_each: int) -> Ticket:
    """The admission of one HTTP request (``Refused``: a 429); the caller's key, when keys are
    configured, has its own limits."""
    admission: Admission = request.app.state.admission
    gateway: Gateway = request.app.state.gateway
    entry = getattr(request.state, "api_key", None)
    try:
        await admission.check_queue()
        return admission.admit(entry.owner if entry is not None else None, choices, tokens_each)
    except Refused as exc:
        gateway.metrics.requests.labels(endpoint, "429").inc()
        gateway.metrics.refused.labels(exc.reason).inc()
        raise
    except Exception as exc:
        if is_outage(exc):
            gateway.metrics.requests.labels(endpoint, "503").inc()
            gateway.metrics.refused.labels("unavailable").inc()
        raise


CLIENT_CLOSED = 499  # as nginx logs a request whose client closed the connection first
DISCONNECT_POLL_S = 0.5


async def until_disconnected(request: Request, answer: Awaitable[Response]) -> Response:
    """``answer``, unless the client disconnects first: then it is cancelled and the result is a
    499 (nobody reads it; the log line and the metrics do)."""
    work = asyncio.ensure_future(answer)
    watch = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        return JSONResponse(oa.error_body("the client closed the connection"), CLIENT_CLOSED)
    return work.result()


async def disconnected(request: Request) -> None:
    """Returns once the client has gone: its server sent ``http.disconnect``."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(DISCONNECT_POLL_S)  # a server that answers at once: poll, not spin


@dataclass
class Choices:
    """The requests of one response, as its log line counts them."""

    pendings: list[Pending]

    @property
    def next_index(self) -> int:  # completion tokens released so far, all choices together
        return sum(p.next_index for p in self.pendings)


def logged(token: Any, tokenizer: Tokenizer) -> oa.LoggedToken:
    """A token with its log-probabilities, as text."""
    top = [(tokenizer.decode([t.token_id]), t.logprob) for t in token.top_logprobs]
    return tokenizer.decode([token.token_id]), token.logprob, top


async def whole_response(
    gateway: Gateway, pendings: list[Pending], endpoint: oa.Answers, tokenizer: Tokenizer
) -> JSONResponse:
    async def collect(index: int, pending: Pending) -> dict[str, Any]:
        texts, tokens, reason = [], [], None
        async for token in pending.tokens():
            texts.append(token.text)
            reason = token.finish_reason
            if token.logprob is not None:
                tokens.append(logged(token, tokenizer))
        return endpoint.choice(index, "".join(texts), reason, tokens)

    choices = await asyncio.gather(*(collect(i, p) for i, p in enumerate(pendings)))
    use = oa.usage(pendings[0].prompt_len, sum(p.next_index for p in pendings))
    return JSONResponse(endpoint.response(pendings[0].request_id, gateway.model, list(choices), use))


async def stream_response(
    gateway: Gateway, pendings: list[Pending], endpoint: oa.Answers, body: oa._Common, tokenizer: Tokenizer
) -> StreamingResponse:
    """Wait for each choice's first token (so early failures get a status code), then stream SSE."""
    streams = [p.tokens() for p in pendings]
    firsts = [await anext(s) for s in streams]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = sse_events(gateway, pendings, endpoint, firsts, streams, include_usage, tokenizer)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def sse_events(
    gateway: Gateway,
    pendings: list[Pending],
    endpoint: oa.Answers,
    firsts: list[Any],
    rest: list[AsyncIterator[Any]],
    include_usage: bool,
    tokenizer: Tokenizer,
) -> AsyncIterator[str]:
    rid, model = pendings[0].request_id, gateway.model
    offsets = [0] * len(pendings)  # completions: each choice's text so far, for text_offset

    def chunk(index: int, token: Any) -> str:
        logs = [logged(token, tokenizer)] if token.logprob is not None else []
        offset, offsets[index] = offsets[index], offsets[index] + len(token.text)
        return _sse(endpoint.chunk(rid, model, token.text, token.finish_reason, index, logs, offset))

    try:
        for index, first in enumerate(firsts):
            opening = endpoint.opening(rid, model, index)
            if opening is not None:
                yield _sse(opening)
            yield chunk(index, first)
        async for index, token in merged(rest):
            yield chunk(index, token)
        if include_usage:
            use = oa.usage(pendings[0].prompt_len, sum(p.next_index for p in pendings))
            yield _sse(endpoint.usage_chunk(rid, model, use))
    except RequestFailed as exc:
        yield _sse(oa.error_body(str(exc), kind="server_error", code=str(exc.status)))
    finally:
        for pending in pendings:
            if not pending.done:
                await gateway.abort(pending)  # the client went away mid-stream, or a choice failed
    yield "data: [DONE]\n\n"


async def merged(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several streams as they come, each with its stream's index; the first error ends
    all of them."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    ended = object()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except Exception as exc:
            await queue.put((index, exc))
        await queue.put((index, ended))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            index, item = await queue.get()
            if item is ended:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
