"""The gateway's answers to bad input (the OpenAI error shape) and its log line per request."""

from __future__ import annotations

import json
import logging

import pytest

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


@pytest.mark.parametrize("path, body", [("/v1/completions", completion("x", -1)),
                                        ("/v1/chat/completions", chat("x", -1))])
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
        response = await m.client.post("/v1/completions", content=body,
                                       headers={"content-type": "application/json"})
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
