"""The gateway's answers to bad input (the OpenAI error shape) and its log line per request."""

from __future__ import annotations

import json
import logging

import pytest

from engine.api import MAX_STOP_CHARS, MAX_STOPS, MAX_TOP_K
from tests.mesh.conftest import running_mesh
from tests.mesh.fake_engine import MAX_CONTEXT, ByteTokenizer, load

pytestmark = pytest.mark.usefixtures("cleanup")
FAKE = "tests.mesh.fake_engine:load"
LOGGER = "services.gateway.app"


@pytest.fixture
def config(mesh_config):
    return mesh_config.model_copy(update={"model": FAKE})


def completion(prompt: str, n: int, **extra) -> dict:
    return {"model": FAKE, "prompt": prompt, "max_tokens": n, "temperature": 0, **extra}


def chat(content: str, n: int) -> dict:
    return {"model": FAKE, "messages": [{"role": "user", "content": content}], "max_tokens": n}


async def error_of(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    "path, body", [("/v1/completions", completion("x", -1)), ("/v1/chat/completions", chat("x", -1))]
)
async def test_max_tokens_below_one_says_it_must_be_at_least_one(config, hub, path, body):
    async with running_mesh(config, hub, load) as m:
        error = await error_of(await m.client.post(path, json=body))
        assert error["param"] == "max_tokens"
        assert "max_tokens must be >= 1" in error["message"]
        assert "-1" in error["message"] and "context length" not in error["message"]


async def test_a_prompt_longer_than_the_context_names_the_prompt_its_length_and_the_limit(config, hub):
    async with running_mesh(config, hub, load) as m:
        error = await error_of(await m.client.post("/v1/completions", json=completion("x" * 300, 4)))
        assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"
        assert "300" in error["message"] and str(MAX_CONTEXT) in error["message"]

        tokenizer = ByteTokenizer()
        chat_len = len(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "y" * 300}])))
        error = await error_of(await m.client.post("/v1/chat/completions", json=chat("y" * 300, 4)))
        assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
        assert str(chat_len) in error["message"] and str(MAX_CONTEXT) in error["message"]


async def test_a_prompt_that_fits_but_leaves_no_room_for_max_tokens_names_both(config, hub):
    async with running_mesh(config, hub, load) as m:
        error = await error_of(await m.client.post("/v1/completions", json=completion("x" * 250, 10)))
        assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
        for number in ("250", "10", str(MAX_CONTEXT)):
            assert number in error["message"]


async def test_malformed_json_says_the_body_is_not_valid_json(config, hub):
    async with running_mesh(config, hub, load) as m:
        body = b'{"model": "x",\n  not json}'
        response = await m.client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        error = await error_of(response)
        assert error["param"] is None
        assert "not valid JSON" in error["message"]
        assert "line 2 column 3" in error["message"], error["message"]
        assert "decode error" not in error["message"]


async def test_each_finished_request_logs_one_line_and_an_error_also_warns(config, hub, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    secret = "do not log this prompt"
    async with running_mesh(config, hub, load) as m:
        caplog.clear()
        ok = await m.client.post("/v1/completions", json=completion(secret, 3))
        assert ok.status_code == 200
        streamed = await m.client.post("/v1/completions", json=completion(secret, 4, stream=True))
        assert streamed.status_code == 200
        bad = await m.client.post("/v1/completions", json=completion(secret, -1))
        assert bad.status_code == 400
        records = [r for r in caplog.records if r.name == LOGGER]

    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(infos) == 3, infos
    first, second, third = infos
    assert first.startswith("POST /v1/completions 200 ") and " ms" in first
    assert ok.json()["id"] in first and FAKE in first
    assert f"prompt_tokens={len(secret)}" in first and "completion_tokens=3" in first
    assert second.startswith("POST /v1/completions 200 ") and "completion_tokens=4" in second
    assert third.startswith("POST /v1/completions 400 ") and FAKE in third
    assert len(warnings) == 1 and "400" in warnings[0]
    assert json.loads(bad.text)["error"]["message"] in warnings[0]
    assert all(secret not in r.getMessage() for r in records)


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, -84779791397644528517120])
async def test_a_seed_beyond_64_bits_is_a_400_naming_it(config, hub, seed):
    async with running_mesh(config, hub, load) as m:
        error = await error_of(await m.client.post("/v1/completions", json=completion("x", 3, seed=seed)))
        assert error["param"] == "seed"
        ok = await m.client.post("/v1/completions", json=completion("x", 3, seed=2**63 - 1))
        assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_k", 2**63),
        ("top_k", 2**64),
        ("top_k", 10**30),
        ("top_k", -1),
        ("temperature", 2.5),
        ("top_p", 0),
        ("stop", ["s"] * (MAX_STOPS + 1)),
        ("stop", "x" * (MAX_STOP_CHARS + 1)),
        ("stop", ["ok", "x" * (MAX_STOP_CHARS + 1)]),
    ],
)
async def test_a_sampling_field_out_of_bounds_is_a_400_naming_it(config, hub, field, value):
    async with running_mesh(config, hub, load) as m:
        for path, body in (
            ("/v1/completions", completion("x", 3)),
            ("/v1/chat/completions", chat_body([{"role": "user", "content": "x"}])),
        ):
            error = await error_of(await m.client.post(path, json={**body, field: value}))
            assert error["param"].split(".")[0] == field, error  # stop.1: the second stop string
        assert m.mesh.workers[0].runner.engine.steps == []  # nothing reached a worker


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_nan_and_infinities_are_a_400_naming_the_field(config, hub, field, literal):
    """JSON has no NaN, but Python's parser reads these literals: they never reach a worker."""
    async with running_mesh(config, hub, load) as m:
        text = json.dumps(completion("x", 3))[:-1] + f', "{field}": {literal}}}'
        response = await m.client.post(
            "/v1/completions", content=text.encode(), headers={"content-type": "application/json"}
        )
        error = await error_of(response)
        assert error["param"] == field and "finite" in error["message"], error
        assert m.mesh.workers[0].runner.engine.steps == []


async def test_the_largest_top_k_is_served(config, hub):
    async with running_mesh(config, hub, load) as m:
        ok = await m.client.post("/v1/completions", json=completion("x", 3, top_k=MAX_TOP_K, temperature=1.0))
        assert ok.status_code == 200, ok.text


# --- OpenAI parameters are never dropped silently ---------------------------------------------


def chat_body(messages: list, n: int = 3, **extra) -> dict:
    return {"model": FAKE, "messages": messages, "max_tokens": n, "temperature": 0, **extra}


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", completion("x", 3, frobnicate=1), "frobnicate"),
        ("/v1/completions", completion("x", 3, repetition_penalty=1.2), "repetition_penalty"),
        (
            "/v1/chat/completions",
            chat_body([{"role": "user", "content": "x"}], parallel_tool_calls=True),
            "parallel_tool_calls",
        ),
        (
            "/v1/chat/completions",
            chat_body([{"role": "user", "content": "x"}], reasoning_effort="low"),
            "reasoning_effort",
        ),
        ("/v1/chat/completions", chat_body([{"role": "user", "content": "x", "name": "ann"}]), "messages.0.name"),
        (
            "/v1/completions",
            completion("x", 3, stream=True, stream_options={"include_usage": True, "x": 1}),
            "stream_options.x",
        ),
    ],
)
async def test_an_unknown_field_is_a_400_naming_it(config, hub, path, body, param):
    async with running_mesh(config, hub, load) as m:
        error = await error_of(await m.client.post(path, json=body))
        assert error["param"] == param and error["code"] == "unsupported_parameter"
        assert param in error["message"]


@pytest.mark.parametrize(
    "path, field, value",
    [
        ("/v1/completions", "logit_bias", {"50": -100}),
        ("/v1/completions", "echo", True),
        ("/v1/completions", "best_of", 3),
        ("/v1/completions", "suffix", "tail"),
        ("/v1/chat/completions", "response_format", {"type": "json_object"}),
        ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
        ("/v1/chat/completions", "tool_choice", "auto"),
    ],
)
async def test_a_non_neutral_value_of_an_unsupported_feature_is_a_400_naming_it(config, hub, path, field, value):
    body = completion("x", 3) if path == "/v1/completions" else chat_body([{"role": "user", "content": "x"}])
    async with running_mesh(config, hub, load) as m:
        error = await error_of(await m.client.post(path, json={**body, field: value}))
        assert error["param"] == field and error["code"] == "unsupported_value"
        assert field in error["message"]


async def test_neutral_values_of_unsupported_features_are_accepted(config, hub):
    neutral = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "user": "someone"}
    async with running_mesh(config, hub, load) as m:
        plain = await m.client.post("/v1/completions", json=completion("neutral", 5))
        for extra in (
            {**neutral, "logprobs": None, "echo": False, "best_of": 1, "suffix": None},
            {"presence_penalty": None, "frequency_penalty": None, "logit_bias": None, "n": None, "echo": None},
        ):
            same = await m.client.post("/v1/completions", json={**completion("neutral", 5), **extra})
            assert same.status_code == 200, same.text
            assert same.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]

        messages = [{"role": "user", "content": "neutral"}]
        plain = await m.client.post("/v1/chat/completions", json=chat_body(messages, 5))
        for extra in (
            {
                **neutral,
                "logprobs": False,
                "top_logprobs": 0,
                "response_format": {"type": "text"},
                "tools": [],
                "tool_choice": "none",
            },
            {"logprobs": None, "top_logprobs": None, "response_format": None, "tools": None, "tool_choice": None},
        ):
            same = await m.client.post("/v1/chat/completions", json={**chat_body(messages, 5), **extra})
            assert same.status_code == 200, same.text
            assert same.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


async def test_chat_content_as_a_list_of_text_parts_is_joined(config, hub):
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    async with running_mesh(config, hub, load) as m:
        joined = await m.client.post(
            "/v1/chat/completions", json=chat_body([{"role": "user", "content": "first\nsecond"}], 6)
        )
        listed = await m.client.post(
            "/v1/chat/completions",
            json=chat_body([{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}], 6),
        )
        alone = await m.client.post(
            "/v1/chat/completions",
            json=chat_body(
                [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first\nsecond"}], 6
            ),
        )
        assert joined.status_code == listed.status_code == alone.status_code == 200, listed.text
        assert listed.json()["choices"][0]["message"] == alone.json()["choices"][0]["message"]
        assert listed.json()["usage"] == alone.json()["usage"]


@pytest.mark.parametrize(
    "part, param, named",
    [
        ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, "messages.0.content.1", "image_url"),
        ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "messages.0.content.1", "input_audio"),
        ({"type": "text", "text": "b", "cache_control": {}}, "messages.0.content.1.cache_control", "cache_control"),
    ],
)
async def test_a_non_text_content_part_is_a_400_naming_it(config, hub, part, param, named):
    content = [{"type": "text", "text": "a"}, part]
    async with running_mesh(config, hub, load) as m:
        error = await error_of(
            await m.client.post("/v1/chat/completions", json=chat_body([{"role": "user", "content": content}]))
        )
        assert error["param"] == param and named in error["message"]
        assert error["code"] in ("unsupported_value", "unsupported_parameter")


async def test_a_full_request_with_every_supported_field_still_works(config, hub):
    full = {
        "model": FAKE,
        "max_tokens": 5,
        "min_tokens": 5,
        "ignore_eos": True,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "seed": 7,
        "stop": ["never-seen"],
        "n": 1,
        "user": "u",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with running_mesh(config, hub, load) as m:
        streamed = await m.client.post("/v1/completions", json={**full, "prompt": "full"})
        assert streamed.status_code == 200, streamed.text
        chunks = [
            json.loads(ln[6:]) for ln in streamed.text.splitlines() if ln.startswith("data: ") and ln != "data: [DONE]"
        ]
        assert chunks[-1]["usage"]["completion_tokens"] == 5

        chat_full = {
            **full,
            "messages": [{"role": "user", "content": "full"}],
            "stream": False,
            "max_completion_tokens": 4,
            "min_tokens": 4,
        }
        chat_full.pop("stream_options")
        whole = await m.client.post("/v1/chat/completions", json=chat_full)
        assert whole.status_code == 200, whole.text
        assert whole.json()["usage"]["completion_tokens"] == 4


async def test_the_openapi_schema_still_describes_the_request_bodies(config, hub):
    async with running_mesh(config, hub, load) as m:
        schema = (await m.client.get("/openapi.json")).json()
    bodies = schema["components"]["schemas"]
    for name, fields in (
        ("CompletionBody", {"prompt", "max_tokens", "ignore_eos", "logprobs", "echo"}),
        ("ChatBody", {"messages", "max_completion_tokens", "tools", "response_format"}),
    ):
        assert fields <= set(bodies[name]["properties"]), bodies[name]["properties"].keys()
        assert bodies[name]["additionalProperties"] is False
