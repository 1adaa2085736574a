"""Sending one request to an OpenAI-compatible server and timing its stream at the client.

The body asks for a forced output length through the request extension most servers share:
``max_tokens`` = ``min_tokens`` = N and ``ignore_eos: true`` (vLLM and SGLang name them so; our
gateway does too). ``stream_options.include_usage`` asks for the token counts in the last chunk;
without them the number of text-carrying chunks stands in for the output tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from loadgen.metrics import RequestRecord

Endpoint = Literal["completions", "chat"]


@dataclass(frozen=True)
class Target:
    base_url: str  # e.g. http://127.0.0.1:8000 (with or without a trailing /v1)
    model: str
    endpoint: Endpoint = "completions"
    api_key: str | None = None
    timeout_s: float = 300.0
    ignore_eos: bool = True  # send the forced-length extension fields

    @property
    def path(self) -> str:
        root = self.base_url.rstrip("/")
        if not root.endswith("/v1"):
            root += "/v1"
        return root + ("/completions" if self.endpoint == "completions" else "/chat/completions")


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: str
    input_tokens: int  # requested prompt length
    output_tokens: int  # forced output length


def request_body(target: Target, spec: RequestSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": spec.output_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = spec.output_tokens
    if target.endpoint == "completions":
        body["prompt"] = spec.prompt
    else:
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    return body


def _chunk_text(chunk: dict[str, Any], endpoint: Endpoint) -> str:
    text = ""
    for choice in chunk.get("choices") or ():
        if endpoint == "completions":
            text += choice.get("text") or ""
        else:
            text += (choice.get("delta") or {}).get("content") or ""
    return text


MAX_MESSAGE_CHARS = 500  # an error message is kept up to this length


class _StreamError(Exception):
    def __init__(self, kind: str, message: str | None = None) -> None:
        super().__init__(kind)
        self.kind, self.message = kind, message


def error_message(payload: Any) -> str | None:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}``), else its text."""
    if isinstance(payload, (bytes, bytearray)):
        text = payload.decode("utf-8", "replace")
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:
            return text.strip()[:MAX_MESSAGE_CHARS] or None
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail")
        else:
            msg = err
        if msg:
            return str(msg)[:MAX_MESSAGE_CHARS]
        payload = json.dumps(payload)
    return str(payload)[:MAX_MESSAGE_CHARS] or None


async def send_request(
    client: httpx.AsyncClient, target: Target, spec: RequestSpec, clock: Callable[[], float]
) -> RequestRecord:
    """Send one streaming request; never raises for a failed request, records its error kind."""
    sent = clock()
    chunk_times: list[float] = []
    usage: dict[str, Any] = {}
    error: str | None = None
    message: str | None = None
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    try:
        async with client.stream(
            "POST",
            target.path,
            json=request_body(target, spec),
            headers=headers,
            timeout=target.timeout_s,
        ) as resp:
            if resp.status_code != 200:
                raise _StreamError(f"http_{resp.status_code}", error_message(await resp.aread()))
            done = False
            async for line in resp.aiter_lines():
                now = clock()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    raise _StreamError("bad_chunk") from None
                if not isinstance(chunk, dict):
                    raise _StreamError("bad_chunk")
                if "error" in chunk:
                    raise _StreamError("stream_error", error_message(chunk))
                if _chunk_text(chunk, target.endpoint):
                    chunk_times.append(now)
                if chunk.get("usage"):
                    usage = chunk["usage"]
            if not done:
                raise _StreamError("incomplete")
    except _StreamError as exc:
        error, message = exc.kind, exc.message
    except httpx.TimeoutException as exc:
        error, message = "timeout", str(exc)[:MAX_MESSAGE_CHARS] or None
    except httpx.ConnectError as exc:
        error, message = "connect", str(exc)[:MAX_MESSAGE_CHARS] or None
    except httpx.HTTPError as exc:
        error, message = "protocol", str(exc)[:MAX_MESSAGE_CHARS] or None
    end = clock()
    out_tokens = int(usage.get("completion_tokens") or len(chunk_times))
    if error is None and out_tokens == 0:
        error = "empty"
    return RequestRecord(
        index=spec.index,
        sent_s=sent,
        end_s=end,
        input_tokens=int(usage.get("prompt_tokens") or spec.input_tokens),
        output_tokens=out_tokens,
        chunk_times_s=tuple(chunk_times),
        error=error,
        error_message=message,
    )
