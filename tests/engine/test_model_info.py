"""``load_tokenizer`` reads only the tokenizer and the config, and agrees with the loaded engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import load_engine, load_tokenizer
from tests.brokers import need_smollm2

TEXTS = ["The capital of France is", "  spaces, digits 12345 and émojis 🙂\n<|im_end|> tail", "x"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
REPO_ROOT = Path(__file__).resolve().parents[2]


def assert_agrees(info, engine) -> None:
    tok, ref = info.tokenizer, engine.tokenizer
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text)
        assert tok.decode(ref.encode(text)) == ref.decode(ref.encode(text))
    assert tok.apply_chat_template(MESSAGES) == ref.apply_chat_template(MESSAGES)
    assert (tok.eos_token_id, tok.bos_token_id, tok.add_bos) == (ref.eos_token_id, ref.bos_token_id, ref.add_bos)
    assert info.max_context == engine.max_context
    assert info.prompt_in_context == engine.runner.prompt_in_context


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-t5"])
def test_tiny_models_agree_with_the_engine(name, make_engine, models_dir):
    engine = make_engine(name)
    assert_agrees(load_tokenizer(name, models_dir=models_dir), engine)


def test_max_context_cap_matches_the_engine(make_engine, models_dir):
    info = load_tokenizer("tiny-llama", max_context=100, models_dir=models_dir)
    assert info.max_context == make_engine("tiny-llama", max_context=100).max_context == 100


@pytest.mark.smollm2
def test_smollm2_agrees_with_the_engine():
    need_smollm2()
    assert_agrees(load_tokenizer("smollm2"), load_engine("smollm2", device="cpu"))


def test_unknown_model_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        load_tokenizer("no-such-model")
    with pytest.raises(ValueError, match="no config.json"):
        load_tokenizer(str(tmp_path))


def test_reading_the_tokenizer_imports_no_torch(make_engine, models_dir):
    make_engine("tiny-t5")  # the folder exists, as it does once any worker wrote it
    code = (
        "import sys; from engine import load_tokenizer; "
        f"info = load_tokenizer('tiny-t5', models_dir={str(models_dir)!r}); "
        "print(info.max_context, 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert out == ["2048", "False"]
