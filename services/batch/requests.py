"""Turning request JSON (OpenAI completion/chat bodies, or Batch API lines) into batch jobs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from common.messages.jobs import BatchJob, ChatTurn
from common.messages.work import Sampling
from engine.api import MAX_TEMPERATURE, MAX_TOP_K
from services.hosting.sampling import checked

ENDPOINTS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
MAX_TOKENS_DEFAULT = 16


class InvalidRequest(ValueError):
    """A request line that cannot become a job; the message says why."""


@dataclass(frozen=True)
class ParsedRequest:
    custom_id: str | None
    model: str
    kind: str
    prompt: str
    messages: tuple[ChatTurn, ...]
    sampling: Sampling

    def job(self, job_id: str, batch_id: str | None, reply_to: str | None) -> BatchJob:
        return BatchJob(
            job_id, self.model, self.kind, self.prompt, self.messages, self.sampling, reply_to, batch_id, time.time()
        )


def _number(body: dict[str, Any], key: str, kind: type, default: Any, low: float, high: float) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise InvalidRequest(f"{key} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    if not low <= value <= high:
        raise InvalidRequest(f"{key} must be in [{low:g}, {high:g}], got {value!r}")
    return kind(value)


def sampling_from_body(body: dict[str, Any], max_tokens_limit: int) -> Sampling:
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop must be a string or a list of strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidRequest(f"seed must be an integer, got {seed!r}")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise InvalidRequest("ignore_eos must be true or false")
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    try:
        return checked(
            Sampling(
                max_tokens=_number(body, key, int, MAX_TOKENS_DEFAULT, 1, max_tokens_limit),
                temperature=_number(body, "temperature", float, 0.0, 0.0, MAX_TEMPERATURE),
                top_k=_number(body, "top_k", int, 0, 0, MAX_TOP_K),
                top_p=_number(body, "top_p", float, 1.0, 1e-9, 1.0),
                seed=seed,
                stop=tuple(stop),
                ignore_eos=ignore_eos,
            )
        )
    except ValueError as exc:  # what the parameters' own checks refuse (a seed beyond 64 bits)
        raise InvalidRequest(str(exc)) from None


def parse_body(
    body: Any, kind: str, default_model: str | None, max_tokens_limit: int, custom_id: str | None = None
) -> ParsedRequest:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = body.get("model", default_model)
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required")
    if body.get("n", 1) != 1:
        raise InvalidRequest("only n=1 is supported")
    if kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest("prompt must be a non-empty string")
        messages: tuple[ChatTurn, ...] = ()
    else:
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise InvalidRequest("messages must be a non-empty list")
        turns = []
        for m in raw:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequest("each message needs a string role and string content")
            turns.append(ChatTurn(m["role"], m["content"]))
        prompt, messages = "", tuple(turns)
    return ParsedRequest(custom_id, model, kind, prompt, messages, sampling_from_body(body, max_tokens_limit))


def parse_batch_line(line: str, endpoint: str, default_model: str | None, max_tokens_limit: int) -> ParsedRequest:
    """One line of a Batch API input file: ``{"custom_id", "method", "url", "body"}``."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"not JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("a line must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidRequest("custom_id must be a non-empty string")
    if obj.get("method", "POST") != "POST":
        raise InvalidRequest("method must be POST")
    url = obj.get("url", endpoint)
    if url not in ENDPOINTS:
        raise InvalidRequest(f"url must be one of {', '.join(ENDPOINTS)}, got {url!r}")
    if url != endpoint:
        raise InvalidRequest(f"url {url!r} differs from the batch's endpoint {endpoint!r}")
    return parse_body(obj.get("body"), ENDPOINTS[endpoint], default_model, max_tokens_limit, custom_id)


def parse_plain_line(line: str, default_model: str | None, max_tokens_limit: int) -> ParsedRequest:
    """A line for ``exegpt batch submit``: a Batch API line, or a bare completion/chat body."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"not JSON: {exc.msg}") from None
    if isinstance(obj, dict) and "body" in obj:
        return parse_batch_line(line, obj.get("url", "/v1/completions"), default_model, max_tokens_limit)
    kind = "chat" if isinstance(obj, dict) and "messages" in obj else "completion"
    return parse_body(obj, kind, default_model, max_tokens_limit)
