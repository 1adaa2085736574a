"""OpenAI-compatible request bodies and response shapes (the subset the gateway serves).

Extensions, as other servers name them: ``ignore_eos`` (decode exactly ``max_tokens``) and
``min_tokens`` (accepted as 0, or equal to ``max_tokens`` meaning forced length), ``top_k``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    user: str | None = None


class CompletionBody(_Common):
    prompt: str | list[int] | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str, reason: str | None, use: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
            "usage": use}


def chat_completion(rid: str, model: str, text: str, reason: str | None, use: dict[str, int]) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
            "usage": use}


def completion_chunk(rid: str, model: str, text: str, reason: str | None,
                     use: dict[str, int] | None = None) -> dict[str, Any]:
    choices = [] if use else [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chat_chunk(rid: str, model: str, text: str | None, reason: str | None,
               use: dict[str, int] | None = None, *, first: bool = False) -> dict[str, Any]:
    delta: dict[str, str] = {"role": "assistant"} if first else {}
    if text is not None:
        delta["content"] = text
    choices = [] if use else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": choices, "usage": use}
