from __future__ import annotations

import pytest

from services.cli import main
from tests.engine.conftest import req, run_to_end


@pytest.fixture
def models_env(monkeypatch, models_dir):
    monkeypatch.setenv("EXEGPT_MODELS_DIR", str(models_dir))


def test_generate_prints_the_completion(models_env, capsys, llama):
    prompt = llama.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    expected = run_to_end(llama, [req("x", llama.tokenizer.encode(prompt), max_tokens=8, ignore_eos=True)]).text["x"]
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-llama",
                "--prompt",
                "hi",
                "--max-tokens",
                "8",
                "--ignore-eos",
                "--device",
                "cpu",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize(
    "model, message",
    [
        ("gpt-17", "unknown model 'gpt-17'"),
        ("/nope/model.gguf", "GGUF file not found"),
    ],
)
def test_generate_errors_are_one_line(models_env, capsys, model, message):
    assert main(["generate", "--model", model, "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_generate_rejects_bad_gguf(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    assert main(["generate", "--model", str(bad), "--prompt", "hi", "--device", "cpu"]) == 2
    assert "broken.gguf" in capsys.readouterr().err


def test_generate_rejects_bad_sampling(models_env, capsys):
    assert main(["generate", "--model", "tiny-llama", "--prompt", "hi", "--top-p", "0", "--device", "cpu"]) == 2
    assert "top_p" in capsys.readouterr().err
