"""The gateway's HTTP face: an OpenAI-compatible API built by ``create_app`` (no module-level app).

Tokenization happens here: the gateway loads the model's tokenizer, so that it can reject a prompt
longer than the context with a 400 before any work is queued, and count prompt tokens for usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.config import MeshConfig
from common.messages.work import Sampling
from common.names import Names
from common.scheduling import schedule_records
from common.tracing import TRACEPARENT, TRACESTATE, Tracing, tracing_for
from common.transport.connect import LocalHub, open_transports
from common.transport.errors import is_outage
from engine.api import Tokenizer
from services.front import openai_api as oa
from services.front.core import Gateway, Pending, RequestFailed, ServedModel
from services.front.metrics import Metrics
from services.gateway.admin import admin_router
from services.gateway.admission import Admission, Refused, Ticket
from services.gateway.bodies import BoundBodies, header
from services.gateway.dashboard import Dashboard, dashboard_router
from services.gateway.keys import RequireKeys, load_keys
from services.gateway.outage import AnswerOutages
from services.gateway.plugins import Lifespan
from services.hosting.engines import is_factory_spec, load_engine, served_model_name
from services.ops import RETRY_AFTER_S, roles_covered, transport_checks

log = logging.getLogger(__name__)


def load_served_model(config: MeshConfig) -> ServedModel:
    """The served model's tokenizer and context, read without its weights (``engine.load_tokenizer``).

    A ``package.module:factory`` spec is another engine implementation: only the engine it builds
    knows its tokenizer, so that one is built.
    """
    if is_factory_spec(config.model):
        engine = load_engine(config)
        return ServedModel(served_model_name(config), engine.tokenizer, engine.max_context)
    from engine import load_tokenizer

    info = load_tokenizer(config.model)
    return ServedModel(served_model_name(config), info.tokenizer, info.max_context)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class InProcess(Protocol):
    """What the embedded server starts beside its gateway (``services.run.embedded.LocalMesh``)."""

    def render_metrics(self) -> bytes:
        """Its services' metrics, which the gateway's /metrics adds to its own."""
        ...


WorkersFactory = Callable[[], AbstractAsyncContextManager[InProcess]]


def create_app(
    config: MeshConfig,
    model: ServedModel,
    *,
    hub: LocalHub | None = None,
    workers: WorkersFactory | None = None,
    routers: tuple[APIRouter, ...] = (),
    lifespans: tuple[Lifespan, ...] = (),
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """The gateway app; ``workers`` starts in-process services first (embedded mode).

    ``/v1/*`` needs a key of scope user, ``/admin/*`` one of scope admin (``services.gateway.keys``);
    the keys are those the config names (none: every route is open).

    ``routers`` are mounted next to the OpenAI routes (their handlers find the ``Gateway`` at
    ``request.app.state.gateway``); ``lifespans`` are entered after the gateway started (and left
    before it closes); ``on_ready`` is called once the gateway can take requests.
    """
    hub = hub or LocalHub()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if workers is not None:  # embedded: their metrics join the gateway's at /metrics
                app.state.mesh = await stack.enter_async_context(workers())
            transports = await open_transports(config, Names(config.namespace), hub)
            gateway = Gateway(config, transports, model.name, metrics)
            await gateway.start()
            stack.push_async_callback(gateway.close)
            app.state.gateway = gateway
            app.state.dashboard = Dashboard(gateway, app)
            stack.push_async_callback(app.state.dashboard.close)
            app.state.admission = Admission(
                config,
                is_live=gateway.pending.__contains__,
                read_depth=lambda: gateway.bus.queue_depth(gateway.names.encode_queue),
            )
            for extra in lifespans:
                await stack.enter_async_context(extra(app))
            if on_ready is not None:
                on_ready()
            yield

    app = FastAPI(title="ExeGPT mesh gateway", lifespan=lifespan)
    app.state.model, app.state.config, app.state.metrics = model, config, metrics
    install_error_handlers(app)
    app.add_middleware(AnswerOutages)  # innermost: a broker or store failure of any route is a 503
    app.add_middleware(
        BoundBodies,
        max_bytes=config.max_body_bytes,
        timeout_s=config.body_timeout_s,
        exempt=lambda scope: is_upload(app, scope),
    )  # after the key check: no body read for a 401
    app.add_middleware(RequireKeys, keys=load_keys(config))
    app.add_middleware(LogRequests)  # outermost: it also sees what RequireKeys refuses
    if (tracing := tracing_for(config)).enabled:  # off: not even a middleware
        app.add_middleware(TraceRequests, tracing=tracing)  # a server span around all of it
    app.include_router(openai_router())
    app.include_router(admin_router())
    app.include_router(dashboard_router())
    for router in routers:
        app.include_router(router)
    app.openapi = lambda: openapi_document(app, model, config)  # type: ignore[method-assign]
    return app


def openapi_document(app: FastAPI, served: ServedModel, config: MeshConfig) -> dict[str, Any]:
    """FastAPI's document, less the 422 it adds to every route with a body or parameters: the
    gateway answers invalid input with a 400 in the OpenAI error shape (declared per route).
    ``model`` names the one model served as its only valid value, ``max_tokens`` the largest it
    accepts (the limit, the context less one prompt token, the work one request may ask for), ``n``
    that work's cap, a prompt of token ids the vocabulary's range; a generation route's 200 is
    JSON, or an SSE stream with ``stream``."""
    max_tokens = max(1, min(config.max_tokens_limit, served.max_context - 1, config.max_request_tokens))
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        if "#/components/schemas/HTTPValidationError" not in json.dumps(schema.get("paths")):
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("CompletionBody", "ChatBody"):
            properties = components.get(name, {}).get("properties", {})
            if "model" in properties:
                properties["model"]["enum"] = [served.name]
            vocab = getattr(served.tokenizer, "vocab_size", None)
            for option in properties.get("prompt", {}).get("anyOf", []):
                if vocab and option.get("items", {}).get("type") == "integer":
                    option["items"].update(minimum=0, maximum=vocab - 1)
            for limited in ("max_tokens", "max_completion_tokens"):
                if limited in properties:
                    properties[limited]["anyOf"] = [
                        {"type": "integer", "minimum": 1, "maximum": max_tokens},
                        {"type": "null"},
                    ]
                    properties[limited]["description"] = (
                        f"at most {max_tokens}; prompt tokens + max_tokens within the context "
                        f"({served.max_context}, else 400 context_length_exceeded); n x max_tokens at most "
                        f"{config.max_request_tokens}"
                    )
            if "n" in properties:
                properties["n"]["description"] = (
                    f"choices to generate (each a request of its own); "
                    f"n x max_tokens at most {config.max_request_tokens}"
                )
                components[name].setdefault("allOf", []).extend(
                    request_tokens_schema(properties, max_tokens, config.max_request_tokens)
                )
        for path in ("/v1/completions", "/v1/chat/completions"):
            ok = schema.get("paths", {}).get(path, {}).get("post", {}).get("responses", {}).get("200")
            if ok is not None:
                ok.setdefault("content", {})["text/event-stream"] = {  # each event's data: a chunk object
                    "schema": {"description": "`data: {chunk}` events, then `data: [DONE]`"}
                }
        oa.neutral_schemas(components)
        _json_schema_bounds(components)
        app.openapi_schema = schema
    return app.openapi_schema


def request_tokens_schema(properties: dict[str, Any], max_tokens: int, cap: int) -> list[dict[str, Any]]:
    """``n`` x ``max_tokens`` <= ``cap`` in JSON Schema: for each ``n`` from which the cap bounds
    ``max_tokens`` below ``max_tokens``, an if/then lowering its maximum."""
    limited = [field for field in ("max_tokens", "max_completion_tokens") if field in properties]
    return [
        {
            "if": {"properties": {"n": {"type": "integer", "minimum": n}}, "required": ["n"]},
            "then": {
                "properties": {
                    field: {"anyOf": [{"type": "integer", "maximum": cap // n}, {"type": "null"}]} for field in limited
                }
            },
        }
        for n in range(2, oa.MAX_N + 1)
        if cap // n < max_tokens
    ]


def is_upload(app: FastAPI, scope: Scope) -> bool:
    """A multipart request to a route that declares a multipart body (it bounds the upload as
    it parses it). The routes are read from the API document (included routers are not listed
    flat in ``app.routes``), once."""
    if (header(scope, b"content-type") or b"").split(b";")[0].strip().lower() != b"multipart/form-data":
        return False
    uploads = getattr(app.state, "upload_paths", None)
    if uploads is None:
        from starlette.routing import compile_path

        uploads = app.state.upload_paths = tuple(
            compile_path(template)[0]
            for template, operations in app.openapi().get("paths", {}).items()
            if any(
                "multipart/form-data" in (op.get("requestBody") or {}).get("content", {})
                for op in operations.values()
                if isinstance(op, dict)
            )
        )
    path = scope.get("path", "")
    return any(regex.match(path) for regex in uploads)


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """The methods the API document gives this request's path (several routes may share one path;
    the document is what clients and `Allow` must agree with)."""
    from starlette.routing import compile_path

    path = scope.get("path", "")
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|constrained-\S+|function-\S+|\w+\[.*\])$")


def param_of(loc: tuple[Any, ...]) -> str:
    """The field a validation error names, as ``messages.0.content``: the location without
    ``body`` and without the union branches pydantic adds (``prompt.constrained-str``)."""
    return ".".join(str(p) for p in loc[1:] if not (isinstance(p, str) and _UNION_TAG.match(p)))


def telling(errors: list[dict[str, Any]], first: dict[str, Any]) -> dict[str, Any]:
    """Of the errors about ``first``'s field, one about the value rather than a union branch it
    is not of: for a list of stop strings with one too long, "String should have at most 256
    characters (stop.1)", not "Input should be a valid string (stop)"."""
    field = param_of(first.get("loc", ()))
    related = [e for e in errors if (p := param_of(e.get("loc", ()))) == field or p.startswith(f"{field}.")]
    return next((e for e in related if not str(e.get("type", "")).endswith("_type")), first)


_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _json_schema_bounds(node: Any) -> None:
    """Constraints pydantic leaves under its own names in a union branch (``ge``) under JSON
    Schema's (``minimum``)."""
    if isinstance(node, dict):
        for ours, theirs in _BOUNDS.items():
            if ours in node and isinstance(node[ours], (int, float)) and "type" in node:
                node[theirs] = node.pop(ours)
        for value in node.values():
            _json_schema_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _json_schema_bounds(value)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        return JSONResponse(oa.error_body(str(exc), kind=kind, param=exc.param, code=exc.code), exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return JSONResponse(oa.error_body(not_json_message(first, exc.body)), 400)
        unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
        if unknown:  # a field the gateway does not know is refused, never ignored
            param = param_of(unknown[0].get("loc", ()))
            return JSONResponse(
                oa.error_body(
                    f"Unsupported parameter: '{param}' is not supported by this server",
                    param=param,
                    code="unsupported_parameter",
                ),
                400,
            )
        first = telling(errors, first)
        param = param_of(first.get("loc", ())) or None
        return JSONResponse(oa.error_body(f"{first['msg']} ({param or 'body'})", param=param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})  # its headers too
        if exc.status_code == 405:  # `Allow` names every method of the path, not one route's
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
        return JSONResponse(
            oa.error_body(str(exc.detail), code=str(exc.status_code)), exc.status_code, headers=headers or None
        )

    @app.exception_handler(Refused)
    async def _refused(_: Request, exc: Refused) -> JSONResponse:
        headers = None if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse(oa.rate_limited(str(exc)), 429, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(oa.error_body(f"internal error: {type(exc).__name__}", kind="server_error"), 500)


def not_json_message(error: dict[str, Any], doc: Any) -> str:
    """The body did not parse: say so, where (line, column) and why, as ``json`` reports it."""
    pos = error.get("loc", ("body", 0))[-1]
    reason = error.get("ctx", {}).get("error", "invalid JSON")
    if isinstance(doc, (bytes, bytearray)):
        doc = doc.decode("utf-8", "replace")
    if isinstance(doc, str) and isinstance(pos, int):
        where = json.JSONDecodeError(reason, doc, pos)
        return f"The request body is not valid JSON: {reason} at line {where.lineno} column {where.colno} (char {pos})"
    return f"The request body is not valid JSON: {reason}"


class LogRequests:
    """ASGI middleware: one INFO line per finished HTTP request (a stream: once it ended) with its
    method, path, status, duration and what the route left in ``request.state`` (request_id,
    model, prompt_tokens, pending: its completion tokens); a 4xx/5xx also gets a WARNING with the
    error message. No prompt or completion text is logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, state = time.perf_counter(), scope.setdefault("state", {})
        status, body = 500, bytearray()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and len(body) < 4096:
                body.extend(message.get("body", b""))
            await send(message)

        error: str | None = None
        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            status, error = 500, f"internal error: {type(exc).__name__}"
            raise
        finally:
            ms = (time.perf_counter() - start) * 1000
            line = f"{scope['method']} {scope['path']} {status} {ms:.1f} ms"
            known = {
                "id": state.get("request_id"),
                "model": state.get("model"),
                "prompt_tokens": state.get("prompt_tokens"),
            }
            if (pending := state.get("pending")) is not None:
                known["completion_tokens"] = pending.next_index
            line += "".join(f" {k}={v}" for k, v in known.items() if v is not None)
            log.info("%s", line)
            if status >= 400:
                log.warning("%s: %s", line, error or error_message(bytes(body)))


class TraceRequests:
    """ASGI middleware (tracing on): a server span per HTTP request, the parent of the spans the
    route makes (the encode work's publish); it joins the client's trace when the request
    carries ``traceparent``. It ends when the response did (a stream: once it ended)."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app, self.tracing = app, tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        carried = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in (TRACEPARENT.encode(), TRACESTATE.encode())
        }
        parent = self.tracing.extract(carried) if carried else None
        method, path, status = scope["method"], scope["path"], 500
        state = scope.setdefault("state", {})

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.tracing.span(
            f"{method} {path}",
            parent=parent,
            kind="server",
            attributes={"http.request.method": method, "url.path": path},
        ) as span:
            try:
                await self.app(scope, receive, sending)
            finally:
                route = getattr(scope.get("route"), "path", None)
                self.tracing.annotate(
                    span,
                    name=f"{method} {route}" if route else None,
                    error=(f"HTTP {status}" if status >= 500 else None),
                    attributes={
                        "http.response.status_code": status,
                        "http.route": route,
                        "exegpt.request_id": state.get("request_id"),
                    },
                )


def error_message(body: bytes) -> str:
    """The message of an OpenAI-shaped error body (else the body's start)."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


# --- request validation ---------------------------------------------------------------------


def check_model(body: oa._Common, model: ServedModel) -> None:
    if body.model != model.name:
        raise ApiError(
            404,
            f"The model '{body.model}' does not exist; this server serves '{model.name}'",
            param="model",
            code="model_not_found",
        )
    if (refused := oa.non_neutral(body)) is not None:
        name, value, accepted = refused
        raise ApiError(
            400,
            f"Unsupported value: '{name}' does not support {json.dumps(value)}; this server accepts only {accepted}",
            param=name,
            code="unsupported_value",
        )


def check_prompt_chars(chars: int, max_chars: int, param: str) -> None:
    """A prompt too long to be worth tokenizing: a 400 before the tokenizer sees it."""
    if chars > max_chars:
        raise ApiError(
            400,
            f"The prompt has {chars} characters; this server accepts at most {max_chars} (max_prompt_chars)",
            param=param,
            code="string_above_max_length",
        )


def completion_prompt(body: oa.CompletionBody, model: ServedModel, max_chars: int) -> list[int]:
    """The prompt's token ids (text is tokenized: call it off the event loop)."""
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        vocab = getattr(model.tokenizer, "vocab_size", None)
        bad = [t for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise ApiError(
                400,
                f"token id {bad[0]} is outside this model's vocabulary (0 to {vocab - 1 if vocab else '...'})",
                param="prompt",
            )
        return list(prompt)  # type: ignore[arg-type]
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "exactly one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    check_prompt_chars(len(prompt), max_chars, "prompt")
    return model.tokenizer.encode(str(prompt))


def message_text(content: str | list[oa.ContentPart], where: str) -> str:
    """A message's content as one string: a list of text parts is joined with newlines; any other
    part, or a field of a text part other than ``type`` and ``text``, is a 400 naming it."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        param = f"{where}.content.{j}"
        if part.type != "text":
            raise ApiError(
                400,
                f"Unsupported value: content part type '{part.type}' ({param}) is not supported; only text parts are",
                param=param,
                code="unsupported_value",
            )
        if part.model_extra:
            name = f"{param}.{next(iter(part.model_extra))}"
            raise ApiError(
                400,
                f"Unsupported parameter: '{name}' is not supported by this server",
                param=name,
                code="unsupported_parameter",
            )
        if part.text is None:
            raise ApiError(400, f"a text part needs its text ({param}.text)", param=f"{param}.text")
        texts.append(part.text)
    return "\n".join(texts)


def chat_prompt(body: oa.ChatBody, model: ServedModel, max_chars: int) -> list[int]:
    """The messages' token ids, templated (call it off the event loop)."""
    messages = [
        {"role": m.role, "content": message_text(m.content, f"messages.{i}")} for i, m in enumerate(body.messages)
    ]
    check_prompt_chars(sum(len(m["content"]) for m in messages), max_chars, "messages")
    return model.tokenizer.encode(model.tokenizer.apply_chat_template(messages))


def check_request_tokens(body: oa._Common, sampling: Sampling, config: MeshConfig) -> None:
    """The generation one request asks for, all choices together, within ``max_request_tokens``."""
    n = body.n or 1
    if n * sampling.max_tokens > config.max_request_tokens:
        raise ApiError(
            400,
            f"n x max_tokens may be at most {config.max_request_tokens} tokens per request "
            f"(max_request_tokens); you requested n={n}, max_tokens={sampling.max_tokens}",
            param="n" if n > 1 else "max_tokens",
            code="integer_above_max_value",
        )


def sampling_of(
    body: oa._Common,
    max_tokens: int | None,
    prompt_ids: list[int],
    model: ServedModel,
    config: MeshConfig,
    *,
    prompt_param: str = "prompt",
) -> Sampling:
    """``prompt_param`` names the field that holds the prompt (chat: ``messages``) in errors."""
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", param=prompt_param)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(
            400,
            f"max_tokens must be >= 1; you requested max_tokens={max_tokens}",
            param="max_tokens",
            code="integer_below_min_value",
        )
    room = model.max_context - len(prompt_ids)
    if room < 1:
        raise ApiError(
            400,
            f"The prompt has {len(prompt_ids)} tokens; this model's maximum context "
            f"length is {model.max_context} tokens (prompt and completion together)",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is None:  # 16, or less where the limit, the context or n x max_tokens says so
        wanted = max(1, min(config.max_tokens_limit, room, 16, config.max_request_tokens // (body.n or 1)))
    else:
        wanted = max_tokens
    if wanted > config.max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens may be at most {config.max_tokens_limit}; you requested max_tokens={wanted}",
            param="max_tokens",
            code="integer_above_max_value",
        )
    if wanted > room:
        raise ApiError(
            400,
            f"This model's maximum context length is {model.max_context} tokens; you "
            f"requested {len(prompt_ids) + wanted} tokens ({len(prompt_ids)} in the prompt, "
            f"max_tokens={wanted}): shorten the prompt or lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    forced = body.ignore_eos or body.min_tokens >= wanted  # exactly max_tokens (stop strings ignored too)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return Sampling(
        wanted,
        body.temperature,
        body.top_k,
        body.top_p,
        body.seed,
        stop,
        forced,
        body.presence_penalty or 0.0,
        body.frequency_penalty or 0.0,
        logprobs_wanted(body),
        0 if forced else body.min_tokens,
    )


def logprobs_wanted(body: oa._Common) -> int | None:
    """How many top log-probabilities each token reports (0: the chosen token's only; None: none)."""
    if isinstance(body, oa.ChatBody):
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    return getattr(body, "logprobs", None)


# --- routes -----------------------------------------------------------------------------------

GENERATION_ERRORS = oa.error_responses(400, 401, 404, 408, 413, 429, 503, 504)


def openai_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health(request: Request) -> dict[str, str]:
        return {"status": "ok", "model": request.app.state.model.name}

    @router.get("/health/live")
    async def live() -> dict[str, str]:
        """The process answers (a container's liveness probe)."""
        return {"status": "live"}

    @router.get(
        "/health/ready",
        responses={503: {"description": "Not ready: a check failed (see `checks`); retry after `Retry-After` seconds"}},
    )
    async def ready(request: Request) -> JSONResponse:
        """Ready for requests: the broker and the store answer, the queues a request travels
        exist on the broker (``routes``), and the schedule in force has a live worker for each role
        it needs."""
        gateway: Gateway = request.app.state.gateway
        checks = await transport_checks(gateway.transports, gateway.names)
        checks["routes"] = gateway.routable
        update = None
        if checks["store"]:
            update, _ = await schedule_records(gateway.transports.store, gateway.names)
        checks["workers"] = roles_covered(update)
        ok = all(checks.values())
        body = {"status": "ready" if ok else "not ready", "checks": checks}
        if ok:
            return JSONResponse(body)
        return JSONResponse(body, 503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @router.get("/v1/models", responses=oa.error_responses(401))
    async def models(request: Request) -> dict[str, Any]:
        served = request.app.state.model
        return {
            "object": "list",  # max_model_len: the context (prompt + output tokens), as vLLM names it
            "data": [
                {
                    "id": served.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "exegpt",
                    "max_model_len": served.max_context,
                }
            ],
        }

    @router.get(
        "/metrics",
        responses={
            200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **oa.error_responses(503),
        },
    )
    async def metrics(request: Request) -> Response:
        gateway: Gateway = request.app.state.gateway
        for queue in (gateway.names.encode_queue, gateway.names.handoff_queue):
            gateway.metrics.queue_depth.labels(queue).set(await gateway.bus.queue_depth(queue))
        gateway.metrics.observe_schedule(*await schedule_records(gateway.transports.store, gateway.names))
        body = gateway.metrics.render()
        mesh = getattr(request.app.state, "mesh", None)
        if mesh is not None:  # embedded: one process serves the scheduler's and its worker's too
            body += mesh.render_metrics()
        return Response(body, media_type="text/plain; version=0.0.4")

    @router.post("/v1/completions", responses=GENERATION_ERRORS)
    async def completions(body: oa.CompletionBody, request: Request) -> Response:
        model: ServedModel = request.app.state.model
        request.state.model = body.model  # for the request's log line
        check_model(body, model)
        config: MeshConfig = request.app.state.config
        prompt_ids = await asyncio.to_thread(completion_prompt, body, model, config.max_prompt_chars)
        request.state.prompt_tokens = len(prompt_ids)
        sampling = sampling_of(body, body.max_tokens, prompt_ids, model, config)
        check_request_tokens(body, sampling, config)
        return await respond(request, oa.COMPLETIONS, body, prompt_ids, sampling)

    @router.post("/v1/chat/completions", responses=GENERATION_ERRORS)
    async def chat(body: oa.ChatBody, request: Request) -> Response:
        model: ServedModel = request.app.state.model
        request.state.model = body.model  # for the request's log line
        check_model(body, model)
        config: MeshConfig = request.app.state.config
        prompt_ids = await asyncio.to_thread(chat_prompt, body, model, config.max_prompt_chars)
        request.state.prompt_tokens = len(prompt_ids)
        wanted = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            sampling_of(
                body, body.max_tokens, prompt_ids, model, config, prompt_param="messages"
            )  # both given: each must be acceptable
        sampling = sampling_of(body, wanted, prompt_ids, model, config, prompt_param="messages")
        check_request_tokens(body, sampling, config)
        return await respond(request, oa.CHAT, body, prompt_ids, sampling)

    return router


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
