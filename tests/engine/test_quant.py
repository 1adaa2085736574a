"""Weight-only quantization (``engine.quant``) and bfloat16 on the CPU.

Kernel and shape checks run on small random matrices and tiny-llama (milliseconds). The oracle
checks run SmolLM2 in each choice against float32 on a fixed set of texts, teacher-forced (the
argmax at every position of each text, so that one early divergence does not cascade), and compare
perplexity on the same texts.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine import load_engine
from engine.kv_cache import KVCache
from engine.models.common import Batch, PackedWeight
from engine.quant import (
    INT4_GROUP,
    Fp16Weight,
    Int4Grid,
    Int4Weight,
    Int8Weight,
    can_int4,
    check_mode,
    quantize_,
    quantized_bytes,
)
from tests.engine.conftest import req, run_to_end

# ---- kernels --------------------------------------------------------------------------------------


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def test_int8_weight_computes_with_its_dequantized_weight():
    w, b = _weight(48, 96), torch.randn(48)
    q = Int8Weight(w, b)
    x = torch.randn(5, 96)
    y = q(x)
    assert y.shape == (5, 48) and y.dtype == torch.float32
    assert _rel_err(y, x @ q.dequantize().T + b) < 1e-2  # bfloat16 input and output
    assert _rel_err(q.dequantize(), w) < 1e-2  # per-row int8
    assert q.nbytes() == 48 * 96 + 48 * 2


def test_int4_weight_is_exact_on_its_grid_and_close_elsewhere():
    n, k, g = 64, 4 * INT4_GROUP, INT4_GROUP
    gen = torch.Generator().manual_seed(1)
    levels = torch.randint(0, 16, (n, k // g, g), generator=gen).float()
    levels[..., 0], levels[..., 1] = 0, 15  # each group spans levels 0..15
    scale = (torch.rand(n, k // g, 1, generator=gen) * 0.1 + 0.01).bfloat16().float()
    low = (-8 * scale + torch.randn(n, k // g, 1, generator=gen) * 0.01).bfloat16().float()
    w = (levels * scale + low).reshape(n, k)  # a Q4_1-style grid with bfloat16 scales
    x = torch.randn(3, k).bfloat16().float()  # inputs the kernel reads exactly
    ref = x @ w.T
    assert _rel_err(Int4Weight(w)(x), ref) < 4e-3  # only bfloat16 rounding of offsets and outputs
    other = _weight(n, k)
    assert _rel_err(Int4Weight(other)(x), x @ other.T) < 0.1  # 4 bits of random weights


def test_int4_needs_rows_of_16_and_columns_of_a_group():
    assert can_int4(_weight(32, 64)) and not can_int4(_weight(33, 64)) and not can_int4(_weight(32, 48))
    with pytest.raises(ValueError, match="divisible"):
        Int4Weight(_weight(259, 64))


def test_fp16_weight_is_near_float32_and_keeps_the_dtype_asked_for():
    w, b = _weight(40, 72), torch.randn(40)
    x = torch.randn(6, 72)
    y = Fp16Weight(w, b)(x)
    assert y.dtype == torch.float32 and _rel_err(y, x @ w.T + b) < 1e-3
    assert Fp16Weight(w)(x.bfloat16()).dtype == torch.bfloat16
    assert Fp16Weight(w, out_dtype=torch.float32)(x.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("make", [Fp16Weight, Int8Weight, Int4Weight], ids=["fp16", "int8", "int4"])
def test_a_row_does_not_depend_on_the_rows_beside_it(make):
    w = _weight(64, 128)
    layer = make(w)
    x = torch.randn(33, 128)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(33)])
    if make is Fp16Weight:
        # fbgemm's fp16 kernel is chosen by the number of rows, and on some CPUs (AVX2 here) the
        # kernels sum in different orders: a row is then equal to float32 rounding, not bit for bit
        assert (layer(x) - alone).abs().max() <= 1e-5 * alone.abs().max()
    else:
        assert torch.equal(layer(x), alone)
    assert layer(x.view(3, 11, 128)).shape == (3, 11, 64)
    shuffled = torch.randperm(33)
    assert torch.allclose(layer(x[shuffled]), alone[shuffled], rtol=0, atol=1e-5 * float(alone.abs().max()))


def test_bfloat16_projections_are_packed_on_the_cpu():
    w = _weight(512, 256).bfloat16()
    packed = PackedWeight(w)
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bfloat16 oneDNN kernels")
    assert packed.packed is not None
    x = torch.randn(7, 256).bfloat16()
    assert _rel_err(packed(x), x.float() @ w.float().T) < 1e-2


# ---- whole models --------------------------------------------------------------------------------


def test_check_mode_and_load_engine_reject_unknown_modes(make_engine):
    assert check_mode(None) is None and check_mode("none") is None and check_mode("int4") == "int4"
    for bad in ("int3", "q4_0", "bf16", ""):
        with pytest.raises(ValueError, match="unknown quant"):
            check_mode(bad)
    with pytest.raises(ValueError, match="unknown quant 'int2'"):
        make_engine("tiny-llama", quant="int2")


def test_quant_runs_on_the_cpu_only():
    from engine import check_quant

    assert check_quant("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="CPU only"):
        check_quant("int8", "cuda")


@pytest.mark.parametrize("mode", ["fp16", "int8", "int4"])
def test_quantize_replaces_every_projection_and_keeps_the_state_dict(make_engine, mode):
    engine = make_engine("tiny-llama")
    model = engine.runner.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_(model, mode)
    assert model.quant == mode
    for block in model.model.layers:
        att, mlp = block.self_attn, block.mlp
        for fused in (att._qkv, mlp._gate_up):  # Llama's fused weights are what runs
            assert not isinstance(fused, PackedWeight)
        for proj in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
            assert proj._packed is None  # slices of the fused weights
        for proj in (att.o_proj, mlp.down_proj):
            assert not isinstance(proj._packed, PackedWeight) and proj._packed is not None
    head = model.lm_head._packed
    assert isinstance(head, Fp16Weight) and head.out_dtype == torch.float32
    assert 0 < quantized_bytes(model) <= 2 * sum(p.numel() for p in model.parameters())  # <= 2 bytes a weight
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, mode)
    assert quantize_(model, None) is model


def _grid(n: int, k: int, seed: int = 0) -> Int4Grid:
    """Codes that need not span 0..15 in a group (as a GGUF's do not), bfloat16 scales and offsets."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(2, 14, (n, k), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(n, k // INT4_GROUP, generator=gen) * 0.1 + 0.01).bfloat16().float()
    offset = (torch.randn(n, k // INT4_GROUP, generator=gen) * 0.01).bfloat16().float()
    return Int4Grid(codes, scale, offset)


def _dense(grid: Int4Grid) -> torch.Tensor:
    n, k = grid.codes.shape
    groups = (grid.codes.float() - 8).view(n, k // INT4_GROUP, INT4_GROUP)
    return (groups * grid.scale[..., None] + grid.offset[..., None]).view(n, k)


def test_int4_from_a_grid_computes_with_that_grid_where_quantizing_again_would_not():
    grid = _grid(32, 2 * INT4_GROUP)
    x = torch.randn(3, 2 * INT4_GROUP).bfloat16().float()
    ref = x @ _dense(grid).T
    exact = _rel_err(Int4Weight.from_grid(grid)(x), ref)
    assert exact < 4e-3  # bfloat16 rounding of the output only
    assert _rel_err(Int4Weight(_dense(grid))(x), ref) > 2 * exact  # a new grid from each group's min and max


def test_quantize_packs_the_grids_it_is_given_fused_weights_included(make_engine):
    model = make_engine("tiny-llama").runner.model
    grids = {
        name: _grid(*p.shape, seed=i)
        for i, (name, p) in enumerate(model.named_parameters())
        if name.endswith("proj.weight") and can_int4(p)
    }
    quantize_(model, "int4", grids)
    block, x = model.model.layers[0], torch.randn(2, model.args.hidden_size).bfloat16().float()
    qkv = torch.cat([_dense(grids[f"model.layers.0.self_attn.{p}_proj.weight"]) for p in "qkv"])
    assert _rel_err(block.self_attn._qkv(x), x @ qkv.T) < 4e-3
    out = grids["model.layers.0.self_attn.o_proj.weight"]
    h = torch.randn(2, out.codes.shape[1]).bfloat16().float()
    assert _rel_err(block.self_attn.o_proj(h), h @ _dense(out).T) < 4e-3


@pytest.mark.smollm2
def test_the_int4_grids_of_the_gguf_are_its_weights():
    from engine.gguf_loader import read_gguf, read_int4_grids, smollm2_path

    grids = read_int4_grids(smollm2_path())
    assert len(grids) == 7 * 30  # every projection of the 30 layers is Q4_1
    _, state, _ = read_gguf(smollm2_path(), keep=lambda name: name.startswith(("model.layers.0.", "model.embed")))
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):  # q and k: rows un-permuted
        weight = state[f"model.layers.0.{name}.weight"]
        assert torch.allclose(_dense(grids[f"model.layers.0.{name}.weight"]), weight, atol=1e-5 * weight.abs().max())


def test_int4_falls_back_to_int8_where_the_kernel_cannot_go(make_engine):
    model = quantize_(make_engine("tiny-llama").runner.model, "int4")
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, (Int4Weight, Int8Weight)):
                assert isinstance(value, Int4Weight) == can_int4(torch.empty(value.shape))


@pytest.mark.parametrize("mode", ["fp16", "int8", "int4"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-t5"])
def test_quantized_engines_generate_and_batch_without_changing_a_request(make_engine, name, mode):
    engine = make_engine(name, quant=mode)
    prompts = [b"The oracle says: ", b"a", b"quantized weights, longer prompt here"]
    alone = [
        run_to_end(engine, [req(f"a{i}", p, max_tokens=8, ignore_eos=True)]).tokens[f"a{i}"]
        for i, p in enumerate(prompts)
    ]
    together = run_to_end(engine, [req(f"b{i}", p, max_tokens=8, ignore_eos=True) for i, p in enumerate(prompts)])
    assert [together.tokens[f"b{i}"] for i in range(len(prompts))] == alone
    assert all(len(t) == 8 for t in alone)


def test_bfloat16_cpu_engine_returns_float32_logits(make_engine):
    engine = make_engine("tiny-llama", dtype="bfloat16")
    assert isinstance(engine.runner.model.lm_head._packed, Fp16Weight)
    logits = engine.runner.prefill([list(b"hello")])
    engine.runner.remove(0)
    assert logits.dtype == torch.float32 and len(set(logits[0].tolist())) > 200  # no bfloat16 ties


# ---- SmolLM2 against float32 ----------------------------------------------------------------------

# Fixed texts (prose, instructions, code, a letter, a list, a dialogue, SQL): ~1300 tokens.
TEXTS = (
    "The river starts high in the mountains, where snow melts in late spring and runs down through narrow "
    "valleys of pine and granite. By the time it reaches the plain it is wide and slow, and the towns along "
    "its banks have depended on it for centuries: for water, for fish, for moving timber and grain to the "
    "coast. Floods were common until the dams were built, and older residents still remember the spring "
    "when the water reached the steps of the church in the main square.",
    "To make a simple loaf of bread, mix 500 grams of flour with 10 grams of salt and 7 grams of dried "
    "yeast. Add 350 millilitres of warm water and stir until no dry flour remains. Knead the dough for ten "
    "minutes, until it is smooth and elastic, then cover it and leave it to rise for an hour. Shape it, let "
    "it rise again for thirty minutes, and bake it at 220 degrees for about thirty-five minutes.",
    'def fibonacci(n):\n    """Return the first n Fibonacci numbers."""\n    numbers = [0, 1]\n'
    "    while len(numbers) < n:\n        numbers.append(numbers[-1] + numbers[-2])\n    return numbers[:n]\n\n\n"
    'if __name__ == "__main__":\n    for i, value in enumerate(fibonacci(10)):\n        print(i, value)\n',
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical "
    "energy. Inside the chloroplasts, chlorophyll absorbs mostly red and blue light. That energy splits "
    "water molecules, releasing oxygen, and drives the reactions that fix carbon dioxide from the air into "
    "sugars. Nearly all life on Earth depends on this process, directly or indirectly, for food and for "
    "the oxygen in the atmosphere.",
    "Dear Ms. Alvarez,\n\nThank you for your letter of March 3rd. I am pleased to confirm that the meeting "
    "will take place on Thursday at 10 a.m. in the conference room on the second floor. Please bring the "
    "revised budget and the list of suppliers we discussed. If the time does not suit you, let me know and "
    "we will find another date.\n\nKind regards,\nJonathan Reed",
    "In 1969, the Apollo 11 mission landed the first humans on the Moon. Neil Armstrong and Buzz Aldrin "
    "spent about two and a half hours walking on the surface, collecting rock samples and setting up "
    "experiments, while Michael Collins orbited above in the command module. The mission returned safely "
    "to Earth on July 24, splashing down in the Pacific Ocean.",
    "The committee met on Tuesday to review the proposal for a new public library. Supporters argued that "
    "the current building is too small, has no space for computers and cannot be made accessible to "
    "wheelchair users without major work. Opponents worried about the cost, estimated at twelve million, "
    "and asked whether the money would be better spent on longer opening hours and more staff. After two "
    "hours of discussion the committee agreed to ask the architects for a cheaper design.",
    "User: How do I reverse a list in Python?\nAssistant: You can reverse a list in place with the "
    "reverse() method, for example numbers.reverse(). If you want a new list and want to keep the original "
    "unchanged, use slicing: reversed_numbers = numbers[::-1]. The built-in reversed() function returns an "
    "iterator, which is useful in loops: for item in reversed(numbers): print(item).",
    "Shopping list for the weekend:\n- two litres of milk\n- a dozen eggs\n- fresh spinach and tomatoes\n"
    "- rice, pasta and a jar of tomato sauce\n- coffee beans\n- apples, bananas and oranges\n- dish soap\n"
    "- batteries for the kitchen clock\nRemember to check whether the pharmacy is open on Sunday.",
    "The old lighthouse keeper climbed the spiral staircase every evening at dusk. There were one hundred "
    "and twelve steps, and he knew each of them by the sound it made under his boots. At the top he "
    "trimmed the wick, polished the great lens and lit the lamp, then sat by the window with a cup of tea "
    "and watched the beam sweep across the dark water, looking for the lights of ships coming home.",
    "A computer's memory hierarchy trades speed for size. Registers are the fastest and smallest, followed "
    "by several levels of cache, then main memory, and finally storage such as solid state drives. Programs "
    "run faster when the data they use is close together in memory, because each cache line brings in "
    "neighbouring bytes, and the processor can predict and prefetch regular access patterns.",
    "The recipe for the soup is simple. Chop one onion, two carrots and two sticks of celery, and fry them "
    "gently in olive oil until soft. Add a tin of chopped tomatoes, a litre of vegetable stock and a "
    "handful of red lentils. Simmer for twenty-five minutes, season with salt, pepper and a little cumin, "
    "and blend until smooth. Serve with crusty bread.",
    "Water boils at 100 degrees Celsius at sea level, but at lower temperatures at high altitude, because "
    "the air pressure is lower. On the summit of a mountain 5000 metres high, water boils at about 83 "
    "degrees. That is why cooking pasta or boiling an egg takes longer in the mountains, and why climbers "
    "often use pressure cookers.",
    "SELECT customers.name, COUNT(orders.id) AS order_count\nFROM customers\nJOIN orders ON orders.customer_id "
    "= customers.id\nWHERE orders.created_at >= '2024-01-01'\nGROUP BY customers.name\nHAVING COUNT(orders.id) "
    "> 5\nORDER BY order_count DESC;\n",
    "The train was late again. Maria looked at her watch, then at the board, which now said twenty minutes. "
    "She had an interview at nine, and if the train did not come soon she would have to take a taxi, which "
    "she could not really afford. A man next to her sighed and folded his newspaper. Somewhere down the "
    "line a horn sounded, and everyone on the platform turned to look.",
    "Exercise is good for the heart, the lungs and the mind. Adults are advised to do at least 150 minutes "
    "of moderate activity, such as brisk walking or cycling, every week, and to include exercises that "
    "strengthen the muscles on two or more days. Even short walks help, and breaking up long periods of "
    "sitting is better than sitting all day and exercising once.",
)

AGREEMENT_GOAL = 0.99  # top-1 agreement with float32, every position of every text
PERPLEXITY_TOLERANCE = 0.02  # perplexity on the texts within 2 % of float32's
# What each choice reaches (measured: see docs/engine.md). Only fp16 meets the agreement goal: the
# int8/int4 kernels and a bfloat16 model round every projection's input and output to bfloat16
# (8 significant bits), and ~5 % of these positions have their top two float32 logits within 0.1.
AGREEMENT_FLOOR = {"fp16": AGREEMENT_GOAL, "bfloat16": 0.98, "int4": 0.985, "int8": 0.96, "default": 0.985}
CHOICES = {
    "fp16": dict(quant="fp16"),
    "bfloat16": dict(dtype="bfloat16", quant="none"),
    "int8": dict(quant="int8"),
    "int4": dict(quant="int4"),
    "default": dict(),
}  # default: the GGUF's own Q4_1, as int4


def teacher_forced_logits(engine, ids: list[int]) -> torch.Tensor:
    """Logits at every position of ``ids`` (T, V) float32, in one prefill on a scratch cache."""
    model = engine.runner.model
    layers, kv_heads, head_dim = model.cache_geometry()
    cache = KVCache(
        layers, kv_heads, head_dim, dtype=engine.runner.cache.dtype, device=torch.device("cpu"), max_context=len(ids)
    )
    batch = Batch.prefill(cache, [ids], torch.device("cpu"))
    batch.logit_rows = None  # every position, not just the last
    with torch.inference_mode():
        return model(batch).float()


def agreement_and_perplexity(
    ref: list[torch.Tensor], got: list[torch.Tensor], ids: list[list[int]]
) -> tuple[float, float, float]:
    """(top-1 agreement, float32 perplexity, perplexity) over the texts."""
    same = total = 0
    nll_ref = nll_got = 0.0
    for r, g, t in zip(ref, got, ids):
        same += int((r.argmax(-1) == g.argmax(-1)).sum())
        total += len(t)
        target = torch.tensor(t[1:])
        nll_ref += torch.nn.functional.cross_entropy(r[:-1], target, reduction="sum").item()
        nll_got += torch.nn.functional.cross_entropy(g[:-1], target, reduction="sum").item()
    n = sum(len(t) - 1 for t in ids)
    return same / total, math.exp(nll_ref / n), math.exp(nll_got / n)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    ids = [smollm2.tokenizer.encode(t) for t in TEXTS]
    return ids, [teacher_forced_logits(smollm2, t) for t in ids]


@pytest.mark.smollm2
@pytest.mark.parametrize("choice", list(CHOICES))
def test_smollm2_choice_agrees_with_float32(smollm2_reference, choice):
    ids, ref = smollm2_reference
    engine = load_engine("smollm2", device="cpu", **CHOICES[choice])
    got = [teacher_forced_logits(engine, t) for t in ids]
    agreement, ppl_ref, ppl = agreement_and_perplexity(ref, got, ids)
    held = quantized_bytes(engine.runner.model)
    print(
        f"{choice}: top-1 agreement with float32 {100 * agreement:.2f} % of {sum(map(len, ids))} positions, "
        f"perplexity {ppl:.3f} vs {ppl_ref:.3f} ({100 * (ppl / ppl_ref - 1):+.2f} %), "
        f"quantized copies {held / 1e6:.0f} MB"
    )
    assert abs(ppl / ppl_ref - 1) <= PERPLEXITY_TOLERANCE
    assert agreement >= AGREEMENT_FLOOR[choice]
    # and it still generates through the engine's own loop
    out = run_to_end(engine, [req("r", ids[0][:20], max_tokens=8, ignore_eos=True)])
    assert len(out.tokens["r"]) == 8


# ---- command line ---------------------------------------------------------------------------------


def test_generate_and_bench_take_quant(models_dir, monkeypatch, capsys):
    from services.cli import main

    monkeypatch.setenv("EXEGPT_MODELS_DIR", str(models_dir))
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-llama",
                "--prompt",
                "hi",
                "--max-tokens",
                "3",
                "--ignore-eos",
                "--device",
                "cpu",
                "--threads",
                "1",
                "--quant",
                "int4",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "bench",
                "engine",
                "--model",
                "tiny-llama",
                "--batch-sizes",
                "2",
                "--prompt-len",
                "6",
                "--new-tokens",
                "4",
                "--repeats",
                "1",
                "--device",
                "cpu",
                "--threads",
                "1",
                "--quant",
                "int8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "quant int8" in out
    for argv in (
        ["generate", "--model", "tiny-llama", "--prompt", "hi", "--quant", "int3", "--device", "cpu"],
        ["bench", "engine", "--model", "tiny-llama", "--quant", "q4", "--device", "cpu"],
        ["bench", "engine", "--model", "tiny-llama", "--llamacpp", "--device", "cpu"],
    ):
        assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "unknown quant 'int3'" in err and "unknown quant 'q4'" in err and "runs a GGUF model" in err


@pytest.mark.smollm2
def test_bench_against_llamacpp(capsys):
    pytest.importorskip("llama_cpp")
    from services.cli import main

    assert (
        main(
            [
                "bench",
                "engine",
                "--llamacpp",
                "--batch-sizes",
                "1,2",
                "--prompt-len",
                "8",
                "--new-tokens",
                "4",
                "--repeats",
                "1",
                "--threads",
                "1",
                "--quant",
                "int4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("1", "prefill"), ("1", "decode"), ("2", "prefill"), ("2", "decode")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    assert "llama-cpp-python" in out


@pytest.mark.smollm2
def test_a_gguf_type_that_cannot_be_read_is_named(monkeypatch):
    import gguf.quants

    from engine.gguf_loader import read_gguf, smollm2_path

    def dequantize(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf.quants, "dequantize", dequantize)
    with pytest.raises(ValueError, match=r"tensor \S+ is stored as (F32|Q4_1|Q8_0)"):
        read_gguf(smollm2_path())
