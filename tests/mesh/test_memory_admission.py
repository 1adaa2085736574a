"""Admission by KV-cache memory through the mesh: a request that could never fit a worker's
cache is refused (400) with the reason; the rest wait for room and complete; none kills a worker."""

from __future__ import annotations

import asyncio

import pytest

import engine
from tests.mesh.conftest import running_mesh

BUDGET_TOKENS = 256


def small_cache_engine():
    tiny = engine.load_engine("tiny-llama")
    tiny.set_kv_budget(tiny.kv_bytes_per_token * BUDGET_TOKENS)
    return tiny


@pytest.fixture
def config(mesh_config, cleanup):
    return mesh_config.model_copy(update={"model": "tiny-llama"})


def completion(max_tokens: int) -> dict:
    return {
        "model": "tiny-llama",
        "prompt": "one two three four",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


async def test_too_large_is_refused_and_the_rest_wait_for_room(config, hub) -> None:
    async with running_mesh(config, hub, small_cache_engine, workers=1) as m:
        worker = m.mesh.workers[0]
        assert worker.driver.kv_tokens == BUDGET_TOKENS
        big = m.client.post("/v1/completions", json=completion(400))
        normal = [m.client.post("/v1/completions", json=completion(60)) for _ in range(8)]
        answers = await asyncio.gather(big, *normal)
        refused = answers[0]
        assert refused.status_code == 400, refused.text
        message = refused.json()["error"]["message"]
        assert "KV cache" in message and f"holds {BUDGET_TOKENS}" in message
        assert [a.status_code for a in answers[1:]] == [200] * 8
        assert all(a.json()["usage"]["completion_tokens"] == 60 for a in answers[1:])
        most = answers[1].json()["usage"]["prompt_tokens"] + 60  # positions each may hold
        assert 1 < worker.max_batch_seen <= BUDGET_TOKENS // most
        assert not worker.stopping.is_set() and m.mesh.tasks[-1].done() is False
