"""OpenAI options the gateway serves beyond the basics: n, logprobs/top_logprobs, presence and
frequency penalties; through the mesh, on tiny-llama (real log-probabilities)."""

from __future__ import annotations

import json
import math

import pytest

import engine
from tests.mesh.conftest import running_mesh

MODEL = "tiny-llama"


@pytest.fixture
def config(mesh_config, cleanup):
    return mesh_config.model_copy(update={"model": MODEL})


def tiny():
    return engine.load_engine(MODEL)


def completion(n_tokens: int = 6, **extra) -> dict:
    return {
        "model": MODEL,
        "prompt": "the cat sat on",
        "max_tokens": n_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


def chat(n_tokens: int = 6, **extra) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": n_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


async def test_completion_logprobs(config, hub) -> None:
    async with running_mesh(config, hub, tiny) as m:
        answer = await m.client.post("/v1/completions", json=completion(logprobs=2))
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 6
        assert all(lp <= 0 for lp in logprobs["token_logprobs"])
        assert all(1 <= len(top) <= 2 for top in logprobs["top_logprobs"])
        # greedy: the chosen token is the likeliest, so its log-probability tops the alternatives
        for lp, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"]):
            assert lp == pytest.approx(max(top.values()))
        assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
        plain = await m.client.post("/v1/completions", json=completion())
        assert plain.json()["choices"][0]["logprobs"] is None
        assert plain.json()["choices"][0]["text"] == choice["text"]  # logprobs change nothing else


async def test_chat_logprobs(config, hub) -> None:
    async with running_mesh(config, hub, tiny) as m:
        answer = await m.client.post("/v1/chat/completions", json=chat(logprobs=True, top_logprobs=3))
        assert answer.status_code == 200, answer.text
        content = answer.json()["choices"][0]["logprobs"]["content"]
        assert len(content) == 6
        for entry in content:
            assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
            assert len(entry["top_logprobs"]) == 3
            assert sum(math.exp(t["logprob"]) for t in entry["top_logprobs"]) <= 1 + 1e-6
        only = await m.client.post("/v1/chat/completions", json=chat(logprobs=True))
        assert all(e["top_logprobs"] == [] for e in only.json()["choices"][0]["logprobs"]["content"])
        refused = await m.client.post("/v1/chat/completions", json=chat(top_logprobs=2))
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "top_logprobs"


async def test_n_choices_each_a_request(config, hub) -> None:
    async with running_mesh(config, hub, tiny) as m:
        body = completion(8, n=3, temperature=1.0, seed=7)
        first = await m.client.post("/v1/completions", json=body)
        assert first.status_code == 200, first.text
        choices = first.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1, 2]
        assert first.json()["usage"]["completion_tokens"] == 24
        assert len({c["text"] for c in choices}) > 1  # seeds 7, 8, 9 sample differently
        again = await m.client.post("/v1/completions", json=body)
        assert [c["text"] for c in again.json()["choices"]] == [c["text"] for c in choices]


async def test_streamed_choices_match_the_whole_ones(config, hub) -> None:
    async with running_mesh(config, hub, tiny) as m:
        body = chat(8, n=2, temperature=1.0, seed=11)
        whole = (await m.client.post("/v1/chat/completions", json=body)).json()
        texts, finished = {0: "", 1: ""}, set()
        async with m.client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
            async for line in stream.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:])["choices"]:
                    texts[choice["index"]] += choice["delta"].get("content", "")
                    if choice["finish_reason"]:
                        finished.add(choice["index"])
        assert finished == {0, 1}
        assert [texts[0], texts[1]] == [c["message"]["content"] for c in whole["choices"]]


async def test_penalties(config, hub) -> None:
    async with running_mesh(config, hub, tiny) as m:
        plain = await m.client.post("/v1/completions", json=completion(24))
        penalised = await m.client.post(
            "/v1/completions", json=completion(24, presence_penalty=2.0, frequency_penalty=2.0)
        )
        assert plain.status_code == penalised.status_code == 200
        assert penalised.json()["choices"][0]["text"] != plain.json()["choices"][0]["text"]
        for field, value in (("presence_penalty", 2.5), ("frequency_penalty", -3)):
            bad = await m.client.post("/v1/completions", json=completion(4, **{field: value}))
            assert bad.status_code == 400 and bad.json()["error"]["param"] == field
