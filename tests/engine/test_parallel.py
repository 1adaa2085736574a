"""A model over a group of processes (torch.distributed, gloo, loopback): tensor parallelism,
pipeline stages and both, against one process on the same weights.

Each group test starts real follower processes (``engine.parallel.follower``); this process is
rank 0."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from engine import load_engine
from engine.api import EngineBroken, GenerationRequest, SamplingParams
from engine.kv_cache import KVCache
from engine.loading import build_model, load_state
from engine.parallel import GroupShape
from engine.parallel.group import load_group_engine
from engine.parallel.shape import split, weighted_split
from engine.parallel.shard import RowParallel, shard_tp
from engine.runners import greedy_logits

TOL = 1e-4
TINY = ("tiny-llama", "tiny-opt", "tiny-t5")
SHAPES = {
    "tp2": GroupShape((2,)),
    "pp2": GroupShape((1, 1)),
    "pp2-m2": GroupShape((1, 1), microbatches=2),
    "tp2,1+pp2": GroupShape((2, 1)),
}


@pytest.fixture
def group(request):
    """load_group_engine(...) whose followers are always stopped."""
    engines = []

    def start(model: str, shape: GroupShape, **kw):
        engine = load_group_engine(model, shape, device="cpu", num_threads=1, **kw)
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        engine.runner.close()


# ---- shapes, no processes ----------------------------------------------------------------------


def test_split_covers_the_range_in_near_equal_contiguous_pieces():
    assert [list(split(9, 2, i)) for i in range(2)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8]]
    assert [len(split(3, 2, i)) for i in range(2)] == [2, 1]  # SmolLM2's kv heads over TP=2
    assert weighted_split(30, (2, 1)) == (20, 10)
    assert weighted_split(2, (1, 1, 1)) in ((1, 1, 0), (1, 0, 1), (0, 1, 1))


def test_group_shape_parses_the_flags_and_places_ranks():
    shape = GroupShape.parse("2,1", 2)
    assert (shape.tp, shape.pp, shape.world) == ((2, 1), 2, 3)
    assert [shape.place(r) for r in range(3)] == [(0, 0), (0, 1), (1, 0)]
    assert shape.stage_layers(30) == (range(0, 20), range(20, 30))
    assert GroupShape.parse("2", 2).tp == (2, 2)
    assert GroupShape.parse("1", 2, "3,1").stage_layers(4) == (range(0, 3), range(3, 4))
    with pytest.raises(ValueError, match="add up"):
        GroupShape.parse("1", 2, "3,3").stage_layers(4)
    with pytest.raises(ValueError, match="stages"):
        GroupShape.parse("2,1,1", 2)
    with pytest.raises(ValueError):
        GroupShape.parse("0", 1)


@pytest.mark.parametrize("model", TINY)
def test_each_tp_rank_holds_its_share_of_the_sharded_weights_and_kv_heads(model, tmp_path):
    from engine import read_checkpoint

    model_type, config, state, _ = read_checkpoint(model, tmp_path)
    full = load_state(build_model(model_type, config), state, torch.float32, torch.device("cpu"))
    counts = []
    for rank in range(2):
        part = load_state(
            build_model(model_type, config),
            state,
            torch.float32,
            torch.device("cpu"),
            prepare=lambda m, r=rank: shard_tp(m, 2, r, None),
        )
        sharded = {n: p.numel() for n, p in part.named_parameters() if _is_sharded(n)}
        counts.append(sharded)
        assert part.local_kv_heads * 2 == full.cache_geometry()[1]
        _, _, d = full.cache_geometry()
        cache = KVCache(1, part.local_kv_heads, d, dtype=torch.float32, device=torch.device("cpu"), max_context=64)
        whole = KVCache(1, full.cache_geometry()[1], d, dtype=torch.float32, device=torch.device("cpu"), max_context=64)
        assert cache.bytes_per_position * 2 == whole.bytes_per_position
        assert any(isinstance(m, RowParallel) for m in part.modules())
    expected = {n: p.numel() for n, p in full.named_parameters() if _is_sharded(n)}
    assert expected and counts[0].keys() == expected.keys()
    for name, numel in expected.items():
        assert counts[0][name] + counts[1][name] == numel and counts[0][name] * 2 == numel, name


def _is_sharded(name: str) -> bool:
    """Projections into or out of heads and FFN units (not norms, embeddings or the LM head)."""
    leaf = name.rsplit(".", 2)
    return name.endswith("weight") and leaf[-2] in {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "out_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "fc1",
        "fc2",
        "q",
        "k",
        "v",
        "o",
        "wi",
        "wi_0",
        "wi_1",
        "wo",
    }


# ---- groups of processes -----------------------------------------------------------------------


def drive(runner, script) -> list[torch.Tensor]:
    """Run the same calls on a runner: prefill, decode (all or some slots), padding, swaps, removes."""
    out = []
    with torch.inference_mode():
        for op, *args in script:
            result = getattr(runner, op)(*args)
            if isinstance(result, torch.Tensor):
                out.append(result.clone())
    return out


SCRIPT = [
    ("step", [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]], [[], []], [], 0),  # two prompts of different lengths
    ("step", [], [], [40, 41], 0),  # decode both
    ("step", [[30, 31, 32, 33]], [[]], [42, 43], 2),  # a mixed step with padding rows
    ("swap", [(0, 2)]),
    ("step", [], [], [44, 45], 0),  # a subset decode (slots 0 and 1)
    ("remove", 1),
    ("step", [[7, 8]], [[9]], [46, 47], 0),  # a resumed request joins
    ("step", [], [], [48, 49, 50], 1),
]


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_a_group_gives_the_logits_of_one_process(model, shape, group, tmp_path):
    """In float64, so that a wrong result cannot hide in float32's summation-order noise (a TP sum
    adds in another order; the tiny models' ReLUs and near-ties can amplify that past 1e-4)."""
    one = load_engine(model, device="cpu", dtype="float64", models_dir=tmp_path)
    many = group(model, SHAPES[shape], dtype="float64", models_dir=tmp_path)
    ref, got = drive(one.runner, SCRIPT), drive(many.runner, SCRIPT)
    assert len(ref) == len(got) == 6
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < TOL


def test_a_tp2_handoff_continues_identically_on_one_process(group, tmp_path):
    """Hand-offs carry every layer and head: a TP=2 group's export imports on one process, and back."""
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompt = tuple(range(10, 40))
    one = load_engine("tiny-llama", device="cpu", models_dir=tmp_path)
    solo = one.prefill([GenerationRequest("r", prompt, params)])
    while one.running():
        solo += one.decode_step()
    many = group("tiny-llama", GroupShape((2,)), models_dir=tmp_path)
    moved = many.prefill([GenerationRequest("r", prompt, params)])
    for _ in range(5):
        moved += many.decode_step()
    one.import_request(many.export_request("r"))  # TP=2 -> TP=1
    for _ in range(5):
        moved += one.decode_step()
    many.import_request(one.export_request("r"))  # TP=1 -> TP=2
    while many.running():
        moved += many.decode_step()
    assert [e.token_id for e in moved] == [e.token_id for e in solo]


def test_a_group_undoes_a_step_that_failed_after_its_forward_pass(group, tmp_path, monkeypatch):
    """Every rank forgets the new request's slot and the decoded rows' position (``rollback``):
    the step taken again gives the tokens of one process."""
    import engine.engine as engine_module

    params = SamplingParams(max_tokens=12, ignore_eos=True)
    first, second = GenerationRequest("a", tuple(range(5, 25)), params), GenerationRequest("b", (3, 4, 5), params)
    one = load_engine("tiny-llama", device="cpu", models_dir=tmp_path)
    expected = one.prefill([first]) + one.step([second], ["a"])
    while one.running():
        expected += one.decode_step()
    many = group("tiny-llama", GroupShape((2,)), models_dir=tmp_path)
    got = many.prefill([first])

    def fault(*_):
        raise RuntimeError("sampler fault")

    with monkeypatch.context() as patch:
        patch.setattr(engine_module, "sample", fault)
        with pytest.raises(RuntimeError, match="sampler fault"):
            many.step([second], ["a"])
    assert many.running() == ["a"]
    got += many.step([second], ["a"])
    while many.running():
        got += many.decode_step()
    key = lambda e: (e.request_id, e.index)  # noqa: E731
    assert sorted((key(e), e.token_id) for e in got) == sorted((key(e), e.token_id) for e in expected)


def test_a_dead_rank_breaks_the_group_with_a_clear_error(group, tmp_path):
    many = group("tiny-llama", GroupShape((2,)), models_dir=tmp_path)
    many.prefill([GenerationRequest("r", (1, 2, 3), SamplingParams(max_tokens=50, ignore_eos=True))])
    follower = many.runner.processes[0]
    os.kill(follower.pid, signal.SIGKILL)
    follower.wait(10)
    with pytest.raises(EngineBroken, match="tp=2"):
        for _ in range(20):
            many.decode_step()
    with pytest.raises(EngineBroken, match="failed earlier"):
        many.decode_step()


@pytest.mark.smollm2
@pytest.mark.parametrize("shape", [GroupShape((2,)), GroupShape((1, 1))], ids=["tp2", "pp2"])
def test_smollm2_over_two_processes_gives_the_same_32_greedy_tokens(shape, group):
    prompt = list(range(100, 140))
    one = load_engine("smollm2", device="cpu", num_threads=1, quant="none")  # as the group loads it
    tokens, _ = greedy_logits(one.runner, prompt, 32)
    del one
    many = group("smollm2", shape)
    assert greedy_logits(many.runner, prompt, 32)[0] == tokens


def test_a_rank_started_by_hand_joins_rank_0_as_torchrun_would(group, tmp_path):
    """`exegpt worker --rank 1 --master-addr A --master-port P`: the multi-host form, on loopback."""
    import subprocess
    import sys

    from engine.parallel.procs import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXEGPT_")}
    env["EXEGPT_MODELS_DIR"] = str(tmp_path)
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "worker",
            "--model",
            "tiny-opt",
            "--tp",
            "2",
            "--rank",
            "1",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "--device",
            "cpu",
            "--threads",
            "1",
        ],
        env=env,
    )
    try:
        many = group("tiny-opt", GroupShape((2,)), models_dir=tmp_path, master_addr="127.0.0.1", master_port=port)
        one = load_engine("tiny-opt", device="cpu", models_dir=tmp_path)
        assert greedy_logits(many.runner, [5, 6, 7], 8)[0] == greedy_logits(one.runner, [5, 6, 7], 8)[0]
        many.runner.close()
        assert follower.wait(30) == 0
    finally:
        if follower.poll() is None:
            follower.kill()


@pytest.mark.smollm2
def test_a_quantized_group_runs_its_own_shards_quantized(group):
    """--quant in a group: each rank quantizes the projections it holds."""
    prompt = list(range(100, 140))
    one = load_engine("smollm2", device="cpu", num_threads=1, quant="int8")
    _, expected = greedy_logits(one.runner, prompt, 4)
    del one
    many = group("smollm2", GroupShape((1, 1)), quant="int8")
    _, got = greedy_logits(many.runner, prompt, 4)
    assert (got - expected).abs().max().item() < 1e-3  # a pipeline splits no projection


def test_a_stage_reads_only_its_own_layers():
    from engine.parallel.shard import stage_filter

    keep = stage_filter({"layers": range(2, 4)})
    assert keep("model.embed_tokens.weight") and keep("lm_head.weight") and keep("model.norm.weight")
    assert keep("model.layers.2.self_attn.q_proj.weight") and keep("model.decoder.layers.3.fc1.bias")
    assert not keep("model.layers.1.mlp.up_proj.weight") and not keep("model.layers.12.mlp.up_proj.weight")
    assert not keep("transformer.h.0.attn.c_attn.weight") and keep("transformer.h.3.ln_1.weight")  # GPT-2 names
    t5 = stage_filter({"encoder": range(2, 3), "decoder": range(2, 3)})
    assert keep("shared.weight") and t5("decoder.block.2.layer.1.EncDecAttention.q.weight")
    assert not t5("encoder.block.0.layer.1.DenseReluDense.wi.weight")
    assert t5("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")  # every stage uses it


def test_each_pipeline_stage_holds_only_its_layers(group, tmp_path):
    one = load_engine("tiny-llama", device="cpu", models_dir=tmp_path)
    many = group("tiny-llama", GroupShape((1, 1), layers=(3, 1)), models_dir=tmp_path)
    layers = many.runner.stage.model.model.layers
    assert [type(m).__name__ for m in layers] == ["Block", "Block", "Block", "Identity"]
    assert many.runner.stage.cache.geometry[0] == 3
    ours = sum(p.numel() for p in layers.parameters())
    assert ours * 4 == sum(p.numel() for p in one.runner.model.model.layers.parameters()) * 3
