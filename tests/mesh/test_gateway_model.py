"""The gateway reads the model's tokenizer and context only: it never builds an engine."""

from __future__ import annotations

import pytest

import engine
import services.gateway.app
from common.config import MeshConfig
from engine.engine import LocalEngine
from services.gateway import load_served_model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-t5"])
def test_the_served_model_comes_without_an_engine(name, tmp_path, monkeypatch):
    monkeypatch.setenv("EXEGPT_MODELS_DIR", str(tmp_path))
    reference = engine.load_engine(name, device="cpu")  # writes the folder, as a worker would
    monkeypatch.setattr(LocalEngine, "__init__", _refuse)
    monkeypatch.setattr(services.gateway.app, "load_engine", _refuse)
    model = load_served_model(MeshConfig(model=name))
    assert model.name == name
    assert model.max_context == reference.max_context
    prompt = reference.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}]) == prompt
    assert model.tokenizer.encode(prompt) == reference.tokenizer.encode(prompt)


def test_a_factory_spec_still_builds_its_engine():
    model = load_served_model(MeshConfig(model="tests.mesh.fake_engine:load"))
    assert model.max_context == 256 and model.tokenizer.encode("ab") == [97, 98]


def _refuse(*args, **kwargs):
    raise AssertionError("the gateway built an engine")
