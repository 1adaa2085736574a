"""Our models against Hugging Face ``transformers`` on the same weights (the reference oracle)."""

from __future__ import annotations

import pytest
import torch

from engine.runners import greedy_logits
from tests.brokers import need_module
from tests.engine.conftest import req, run_to_end

transformers = need_module("transformers")

TINY_LOGIT_TOL = 1e-3  # float32, tiny models (logits of magnitude ~30): only summation order differs
SMOLLM2_LOGIT_TOL = 5e-4  # float32, 30 layers, logits of magnitude ~40 (measured ~6e-5)
GREEDY_TOKENS = 32


def our_logits(engine, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits that chose them, through the engine's prefill/decode path."""
    return greedy_logits(engine.runner, prompt, steps)


def hf_logits(hf_model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens[:-1]])
    with torch.inference_mode():
        out = hf_model(input_ids=ids).logits[0].float()
    return out[len(prompt) - 1 :]


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    hf_model.generation_config.eos_token_id = None  # forced length, like ignore_eos (EOS not suppressed)
    hf_model.generation_config.pad_token_id = 0
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def check_against(engine, hf_model, prompt: list[int], tol: float) -> float:
    tokens, ours = our_logits(engine, prompt, GREEDY_TOKENS)
    ref = hf_logits(hf_model, prompt, tokens)
    diff = (ours - ref).abs().max().item()
    print(f"max abs logit diff {diff:.2e} (tolerance {tol:.0e}, max |logit| {ref.abs().max().item():.1f})")
    assert diff < tol, f"max abs logit diff {diff:.2e} >= {tol:.0e}"
    assert tokens == hf_greedy(hf_model, prompt, GREEDY_TOKENS)
    events = run_to_end(engine, [req("r", prompt, max_tokens=GREEDY_TOKENS, ignore_eos=True)])
    assert events.tokens["r"] == tokens  # the engine's own loop agrees with the runner
    return diff


@pytest.mark.parametrize("name, hf_class", [("tiny-llama", "LlamaForCausalLM"), ("tiny-opt", "OPTForCausalLM")])
def test_tiny_decoder_matches_transformers(make_engine, models_dir, name, hf_class):
    engine = make_engine(name)
    hf = getattr(transformers, hf_class).from_pretrained(str(models_dir / name), dtype=torch.float32).eval()
    check_against(engine, hf, list(b"The oracle says: "), TINY_LOGIT_TOL)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """transformers' own GGUF reader: dequantizes and un-permutes Q/K independently of ours."""
    need_module("accelerate")  # transformers needs it to read GGUF
    from engine.gguf_loader import smollm2_path

    path = smollm2_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return hf.eval()


@pytest.mark.smollm2
def test_smollm2_weights_and_tokens_match_transformers_gguf_reader(smollm2, smollm2_hf):
    ours = dict(smollm2.runner.model.state_dict())
    theirs = smollm2_hf.state_dict()
    assert set(theirs) - {"lm_head.weight"} <= set(ours)
    for name, ref in theirs.items():
        if name in ours:
            assert torch.equal(ours[name].float(), ref.float()), name
    from engine.gguf_loader import smollm2_path

    path = smollm2_path()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    messages = [{"role": "user", "content": "What is the capital of France? Answer: naïve café, 2024."}]
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert smollm2.tokenizer.encode(smollm2.tokenizer.apply_chat_template(messages)) == list(expected)


@pytest.mark.smollm2
def test_smollm2_matches_transformers(smollm2, smollm2_hf):
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    check_against(smollm2, smollm2_hf, smollm2.tokenizer.encode(prompt), SMOLLM2_LOGIT_TOL)


@pytest.mark.smollm2
def test_smollm2_answers_and_tokenizes(smollm2):
    tok = smollm2.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 3  # <|im_start|> is one special token
    assert tok.decode(tok.encode("Paris, 2024: naïve café")) == "Paris, 2024: naïve café"
    out = run_to_end(smollm2, [req("q", ids, max_tokens=16)])
    assert "Paris" in out.text["q"]
    assert out.reason["q"] == "stop"  # ends with <|im_end|>


def test_gpt2_folder_matches_transformers(make_engine, models_dir, tmp_path):
    """A GPT-2 checkpoint (fused c_attn, Conv1D weights) loads into our GPT module."""
    config = transformers.GPT2Config(
        vocab_size=259, n_positions=256, n_embd=64, n_layer=2, n_head=4, bos_token_id=256, eos_token_id=256
    )
    hf = transformers.GPT2LMHeadModel(config)
    engine = _hf_folder(tmp_path, models_dir, make_engine, hf)
    check_against(engine, hf, list(b"GPT-2 says: "), TINY_LOGIT_TOL)


def test_tiny_t5_matches_transformers(make_engine, models_dir):
    engine = make_engine("tiny-t5")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(
        str(models_dir / "tiny-t5"), dtype=torch.float32
    ).eval()
    prompt = list(b"translate: the oracle speaks")
    tokens, ours = our_logits(engine, prompt, GREEDY_TOKENS)
    start = hf.config.decoder_start_token_id
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[start] + tokens[:-1]])).logits[0]
    diff = (ours - ref).abs().max().item()
    print(f"max abs logit diff {diff:.2e} (tolerance {TINY_LOGIT_TOL:.0e}, max |logit| {ref.abs().max().item():.1f})")
    assert diff < TINY_LOGIT_TOL
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=GREEDY_TOKENS, do_sample=False)
    assert out[0, 1:].tolist() == tokens
    assert run_to_end(engine, [req("r", prompt, max_tokens=GREEDY_TOKENS, ignore_eos=True)]).tokens["r"] == tokens


@pytest.mark.smollm2
def test_smollm2_batch_matches_solo(smollm2):
    tok = smollm2.tokenizer
    questions = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea, please."]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in questions]
    solo = [
        run_to_end(smollm2, [req(f"s{i}", p, max_tokens=12, ignore_eos=True)]).tokens[f"s{i}"]
        for i, p in enumerate(prompts)
    ]
    out = run_to_end(smollm2, [req(f"b{i}", p, max_tokens=12 - 3 * i, ignore_eos=True) for i, p in enumerate(prompts)])
    assert [out.tokens[f"b{i}"] for i in range(3)] == [s[: 12 - 3 * i] for i, s in enumerate(solo)]


def _hf_folder(tmp_path, models_dir, make_engine, hf_model):
    """Save a transformers model with the tiny byte tokenizer next to it; return our engine on it."""
    import shutil

    make_engine("tiny-llama")  # its tokenizer files
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):  # every 1-D weight here is a norm's scale
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.3 if p.dim() > 1 else 0.05)
    hf_model.eval().save_pretrained(str(tmp_path))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models_dir / "tiny-llama" / f, tmp_path / f)
    return make_engine(str(tmp_path))


def test_untied_gqa_llama_folder(tmp_path, models_dir, make_engine):
    config = transformers.LlamaConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rms_norm_eps=1e-6,
        bos_token_id=256,
        eos_token_id=256,
    )
    hf = transformers.LlamaForCausalLM(config)
    engine = _hf_folder(tmp_path, models_dir, make_engine, hf)
    assert not engine.runner.model.args.tie_word_embeddings
    check_against(engine, hf, list(b"untied head, 4 queries per kv head"), TINY_LOGIT_TOL)


def test_post_layernorm_projected_opt_folder(tmp_path, models_dir, make_engine):
    """OPT-350m's shape: post-LN blocks and embeddings projected in and out."""
    config = transformers.OPTConfig(
        vocab_size=259,
        hidden_size=64,
        word_embed_proj_dim=32,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        do_layer_norm_before=False,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=258,
    )
    hf = transformers.OPTForCausalLM(config)
    engine = _hf_folder(tmp_path, models_dir, make_engine, hf)
    check_against(engine, hf, list(b"post-LN OPT"), TINY_LOGIT_TOL)


def test_gated_gelu_t5_folder_without_output_rescale(tmp_path, models_dir, make_engine):
    """T5 v1.1's shape: gated-GELU (tanh) feed-forward, no d_model**-0.5 rescale before the LM head."""
    config = transformers.T5Config(
        vocab_size=259,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=258,
        pad_token_id=258,
        eos_token_id=256,
    )
    hf = transformers.T5ForConditionalGeneration(config)
    engine = _hf_folder(tmp_path, models_dir, make_engine, hf)
    prompt = list(b"gated gelu")
    tokens, ours = our_logits(engine, prompt, 16)
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[258] + tokens[:-1]])).logits[0]
    assert (ours - ref).abs().max().item() < TINY_LOGIT_TOL
