"""A request's validation: its model, its prompt tokenized within the limits, and its wire ``Sampling``."""

from __future__ import annotations

import json

from common.config import MeshConfig
from common.messages.work import Sampling
from services.front import openai_api as oa
from services.front.core import ServedModel
from services.gateway.errors import ApiError
from services.hosting.sampling import checked


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
    ids = [p for p in prompt if isinstance(p, int)] if isinstance(prompt, list) else []
    if prompt and len(ids) == len(prompt):
        vocab = getattr(model.tokenizer, "vocab_size", None)
        bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise ApiError(
                400,
                f"token id {bad[0]} is outside this model's vocabulary (0 to {vocab - 1 if vocab else '...'})",
                param="prompt",
            )
        return ids
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "exactly one prompt per request is supported", param="prompt")
        text = str(prompt[0])
    else:
        text = prompt
    check_prompt_chars(len(text), max_chars, "prompt")
    return model.tokenizer.encode(text)


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
    sampling = Sampling(
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
    try:
        return checked(sampling)
    except ValueError as exc:  # what the engine's own checks refuse and the schema let through
        raise ApiError(400, str(exc)) from None


def logprobs_wanted(body: oa._Common) -> int | None:
    """How many top log-probabilities each token reports (0: the chosen token's only; None: none)."""
    if isinstance(body, oa.ChatBody):
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    return getattr(body, "logprobs", None)


# --- routes -----------------------------------------------------------------------------------
