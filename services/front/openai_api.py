"""OpenAI-compatible request bodies and response shapes (the subset the gateway serves).

Extensions, as other servers name them: ``ignore_eos`` (decode exactly ``max_tokens``) and
``min_tokens`` (no end-of-sequence before that many tokens; at ``max_tokens`` or above: forced
length, stop strings ignored too), ``top_k``.
Served beyond the basics: ``n`` (each choice a request of its own), ``presence_penalty`` and
``frequency_penalty``, ``logprobs`` (completions: a count; chat: ``logprobs`` with
``top_logprobs``).

No field is dropped silently: a field these bodies do not declare is a 400
(``unsupported_parameter``), and a declared field of a feature the gateway does not implement
(``NEUTRAL``) is accepted only at the value that leaves the output unchanged, else a 400
(``unsupported_value``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from engine.api import MAX_LOGPROBS, MAX_STOP_CHARS, MAX_STOPS, MAX_TEMPERATURE, MAX_TOP_K

MAX_N = 16  # choices per request


def _whole(value: Any) -> Any:
    """JSON Schema's integer: 3 and 3.0 alike (the bodies are strict otherwise: no bools, no strings)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_whole)]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _Common(BaseModel):
    # strict: a value of the wrong JSON type is a 400, never coerced (true is not 1, "3" not 3);
    # a JSON integer still serves where a number is expected; NaN and infinities are refused
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str
    max_tokens: Int | None = None
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=0, le=MAX_TOP_K, description="0: no cut; a value above the vocabulary cuts nothing more")
    n: Int | None = Field(1, ge=1, le=MAX_N, description="choices to generate (each a request of its own)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = Field(
        None, description=f"up to {MAX_STOPS} strings of up to {MAX_STOP_CHARS} characters"
    )
    seed: Int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="a 64-bit integer")
    ignore_eos: bool = False
    min_tokens: Int = Field(0, ge=0)
    user: str | None = None
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="only {} (no bias)")


class CompletionBody(_Common):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Int], Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    )
    logprobs: Int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="log-probabilities of the chosen tokens and of this many likeliest ones",
    )
    echo: bool | None = Field(False, description="only false")
    best_of: Int | None = Field(None, description="only 1")
    suffix: str | None = Field(None, description='only "" (no suffix)')


class ContentPart(BaseModel):
    """One part of a chat message's content; only ``{"type": "text", "text": ...}`` is served
    (other types and fields are refused when the prompt is built, naming the part; the schema
    states the served shape)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "properties": {"type": {"enum": ["text"], "type": "string"}, "text": {"type": "string"}},
            "required": ["type", "text"],
            "additionalProperties": False,
        },
    )

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] = Field(description="a string, or a list of text parts (joined with newlines)")


class ChatBody(_Common):
    # top_logprobs above 0 needs logprobs: true (a 400 otherwise), as the schema says too
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]},
            "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = None
    logprobs: bool | None = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="needs logprobs: true")
    response_format: dict[str, Any] | None = Field(None, description='only {"type": "text"}')
    tools: list[dict[str, Any]] | None = Field(None, description="only [] (no tools)")
    tool_choice: str | dict[str, Any] | None = Field(None, description='only "none"')


# Fields of features the gateway does not implement: the values it accepts (each leaves the output
# as if the field were absent), and how a refusal names them.
_SHARED: dict[str, tuple[tuple[Any, ...], str]] = {
    "logit_bias": ((None, {}), "{}"),
}
NEUTRAL: dict[type[_Common], dict[str, tuple[tuple[Any, ...], str]]] = {
    CompletionBody: {
        **_SHARED,
        "echo": ((None, False), "false"),
        "best_of": ((None, 1), "1"),
        "suffix": ((None, ""), '""'),
    },
    ChatBody: {
        **_SHARED,
        "response_format": ((None, {"type": "text"}), '{"type": "text"}'),
        "tools": ((None, []), "[]"),
        "tool_choice": ((None, "none"), '"none"'),
    },
}


def neutral_schemas(schemas: dict[str, Any]) -> None:
    """In the OpenAPI components, each field of an unimplemented feature accepts only its
    neutral values (as ``non_neutral`` enforces)."""
    for body, fields in NEUTRAL.items():
        properties = schemas.get(body.__name__, {}).get("properties", {})
        for name, (accepted, _) in fields.items():
            if name in properties:
                options = [{"type": "null"} if a is None else {"const": a} for a in accepted]
                properties[name] = {
                    "title": properties[name].get("title", name),
                    "anyOf": options,
                    "description": "accepted only at a value that leaves the output unchanged",
                }


def _same(value: Any, accepted: Any) -> bool:
    """Equal, without counting ``True``/``False`` as 1/0 (or the reverse)."""
    return value == accepted and isinstance(value, bool) == isinstance(accepted, bool)


def non_neutral(body: _Common) -> tuple[str, Any, str] | None:
    """The first field of an unimplemented feature set to a value that would change the output:
    ``(field, value, the accepted value)``; None when there is none."""
    for name, (accepted, shown) in NEUTRAL.get(type(body), {}).items():
        value = getattr(body, name)
        if not any(_same(value, a) for a in accepted):
            return name, value, shown
    return None


def error_body(
    message: str, *, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _envelope(
    rid: str, kind: str, model: str, choices: list[dict[str, Any]], use: dict[str, int] | None
) -> dict[str, Any]:
    """The fields every answer and chunk share, around its choices."""
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, "usage": use}


def completion(rid: str, model: str, text: str, reason: str | None, use: dict[str, int]) -> dict[str, Any]:
    """A completion of one choice."""
    return completion_response(rid, model, [completion_choice(0, text, reason)], use)


def completion_response(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return _envelope(rid, "text_completion", model, choices, use)


def completion_choice(
    index: int, text: str, reason: str | None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


def chat_completion(rid: str, model: str, text: str, reason: str | None, use: dict[str, int]) -> dict[str, Any]:
    """A chat completion of one choice."""
    return chat_response(rid, model, [chat_choice(0, text, reason)], use)


def chat_response(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return _envelope(rid, "chat.completion", model, choices, use)


def chat_choice(index: int, text: str, reason: str | None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": reason,
    }


def completion_chunk(
    rid: str,
    model: str,
    text: str,
    reason: str | None,
    use: dict[str, int] | None = None,
    *,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choices = [] if use else [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]
    return _envelope(rid, "text_completion", model, choices, use)


def chat_chunk(
    rid: str,
    model: str,
    text: str | None,
    reason: str | None,
    use: dict[str, int] | None = None,
    *,
    first: bool = False,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    delta: dict[str, str] = {"role": "assistant"} if first else {}
    if text is not None:
        delta["content"] = text
    choices = [] if use else [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]
    return _envelope(rid, "chat.completion.chunk", model, choices, use)


# --- log-probabilities, in each endpoint's shape ---------------------------------------------
# A token is (text, log-probability, top alternatives as (text, log-probability)).
LoggedToken = tuple[str, float, list[tuple[str, float]]]


def completion_logprobs(tokens: list[LoggedToken], offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, and each token's offset in the text."""
    offsets, at = [], offset
    for text, _, _ in tokens:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": [t for t, _, _ in tokens],
        "token_logprobs": [lp for _, lp, _ in tokens],
        "top_logprobs": [_by_text(top) for _, _, top in tokens],
        "text_offset": offsets,
    }


def _by_text(top: list[tuple[str, float]]) -> dict[str, float]:
    """Alternatives keyed by text, likeliest first; tokens whose text is the same (byte pieces
    of one character) keep the likeliest's value."""
    keyed: dict[str, float] = {}
    for text, logprob in top:
        keyed.setdefault(text, logprob)
    return keyed


def chat_logprobs(tokens: list[LoggedToken]) -> dict[str, Any]:
    """The chat shape: one entry per token, with its UTF-8 bytes."""

    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(text, lp), "top_logprobs": [entry(t, v) for t, v in top]} for text, lp, top in tokens]}


# --- the error shape, as the OpenAPI document declares it ------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error, service_unavailable_error or server_error")
    param: str | None = Field(None, description="the request field at fault, if any")
    code: str | None = Field(None, description="a machine-readable reason, e.g. rate_limit_exceeded")


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx the gateway answers has this body."""

    error: ErrorDetail


def rate_limited(message: str) -> dict[str, Any]:
    """A 429's body: a limit of the gateway or of the caller's key was reached."""
    return error_body(message, kind="rate_limit_error", code="rate_limit_exceeded")


def unavailable(message: str) -> dict[str, Any]:
    """A 503's body: the broker or the store does not answer."""
    return error_body(message, kind="service_unavailable_error", code="service_unavailable")


_MEANING = {
    400: "Invalid request: the body is not valid JSON, a field is unknown, unsupported or out of "
    "range, or the prompt and max_tokens do not fit the context",
    401: "No API key, or one the gateway does not know (only when keys are configured)",
    403: "A key of scope user on an admin route",
    404: "Not found: the model is not the one served, or the batch or file does not exist (or belongs to another key)",
    410: "The batch's record was lost (its index or its kept results name it, the batch folder does "
    "not hold it): its state cannot be told; submit it again",
    408: "The request body did not arrive whole within `body_timeout_s`",
    413: "The body is larger than the gateway accepts (`max_body_bytes`; a file upload: its own limit)",
    429: "A limit was reached: requests in flight at this gateway, the encode queue's depth, or "
    "the key's requests in flight or tokens per minute; retry after `Retry-After` seconds "
    "(absent: the request is larger than the key's tokens per minute)",
    503: "The message broker or the store does not answer; retry after `Retry-After` seconds",
    504: "No result within the request's deadline (request_timeout_s)",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route: each status with the error body, and ``Retry-After`` on 429/503."""
    return {
        status: {
            "model": ErrorResponse,
            "description": _MEANING[status],
            **({"headers": _RETRY_AFTER} if status in (429, 503) else {}),
        }
        for status in statuses
    }


# --- one object per endpoint kind ------------------------------------------------------------
class Answers:
    """How one endpoint kind answers, whole and streamed: ``COMPLETIONS`` (``/v1/completions``) and
    ``CHAT`` (``/v1/chat/completions``). ``name`` labels its metrics; ``id_prefix`` starts its
    response ids."""

    name: str
    id_prefix: str

    def choice(self, index: int, text: str, reason: str | None, tokens: list[LoggedToken]) -> dict[str, Any]:
        """One choice of a whole response (``tokens``: its log-probabilities, when asked for)."""
        raise NotImplementedError

    def response(self, rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
        raise NotImplementedError

    def opening(self, rid: str, model: str, index: int) -> dict[str, Any] | None:
        """The chunk that opens a streamed choice before its first token (None: there is none)."""
        return None

    def chunk(
        self, rid: str, model: str, text: str, reason: str | None, index: int, tokens: list[LoggedToken], offset: int
    ) -> dict[str, Any]:
        """One streamed token of choice ``index`` (``offset``: that choice's text before it)."""
        raise NotImplementedError

    def usage_chunk(self, rid: str, model: str, use: dict[str, int]) -> dict[str, Any]:
        raise NotImplementedError


class _Completions(Answers):
    name, id_prefix = "completions", "cmpl"

    def choice(self, index: int, text: str, reason: str | None, tokens: list[LoggedToken]) -> dict[str, Any]:
        return completion_choice(index, text, reason, completion_logprobs(tokens) if tokens else None)

    def response(self, rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
        return completion_response(rid, model, choices, use)

    def chunk(
        self, rid: str, model: str, text: str, reason: str | None, index: int, tokens: list[LoggedToken], offset: int
    ) -> dict[str, Any]:
        logprobs = completion_logprobs(tokens, offset) if tokens else None
        return completion_chunk(rid, model, text, reason, index=index, logprobs=logprobs)

    def usage_chunk(self, rid: str, model: str, use: dict[str, int]) -> dict[str, Any]:
        return completion_chunk(rid, model, "", None, use)


class _Chat(Answers):
    name, id_prefix = "chat", "chatcmpl"

    def choice(self, index: int, text: str, reason: str | None, tokens: list[LoggedToken]) -> dict[str, Any]:
        return chat_choice(index, text, reason, chat_logprobs(tokens) if tokens else None)

    def response(self, rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
        return chat_response(rid, model, choices, use)

    def opening(self, rid: str, model: str, index: int) -> dict[str, Any] | None:
        return chat_chunk(rid, model, "", None, first=True, index=index)  # the role, before any content

    def chunk(
        self, rid: str, model: str, text: str, reason: str | None, index: int, tokens: list[LoggedToken], offset: int
    ) -> dict[str, Any]:
        logprobs = chat_logprobs(tokens) if tokens else None
        return chat_chunk(rid, model, text, reason, index=index, logprobs=logprobs)

    def usage_chunk(self, rid: str, model: str, use: dict[str, int]) -> dict[str, Any]:
        return chat_chunk(rid, model, "", None, use)


COMPLETIONS: Answers = _Completions()
CHAT: Answers = _Chat()
