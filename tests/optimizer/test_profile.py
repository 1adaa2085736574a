import json
import re

import numpy as np
import pytest

from optimizer.profile import ProfileError, StepShape, parse_profile


def _shape(row):
    if row["phase"] in ("prefill", "encode"):
        return StepShape(prefill_seqs=row["batch"], prefill_tokens=row["batch"] * row["seq"], prefill_seq=row["seq"])
    return StepShape(decode_seqs=row["batch"], decode_ctx=row["ctx"], enc_seq=row.get("enc_seq", 0))


def test_reference_profiles_load_every_model_and_tp(split_text, layers_text):
    prof = parse_profile(split_text, layers_text)
    assert prof.models() == ["gpt3-175b", "opt-1.3b", "opt-13b", "opt-66b", "t5-11b"]
    assert all(prof.tp_degrees(m) == [1, 2, 4, 8] for m in prof.models())
    assert prof.probe("gemm_bf16_8192")["tflops"] > 100


def test_split_parts_sum_to_the_measured_whole_layer(split_text, layers_text):
    split = parse_profile(split_text)
    errors = []
    for line in layers_text.splitlines():
        row = json.loads(line)
        if "model" in row:
            predicted = split.layer_times(row["model"], row["tp"]).step_s(_shape(row))
            errors.append(abs(float(predicted) / (row["ms"] * 1e-3) - 1))
    assert len(errors) > 500
    assert np.median(errors) < 0.06
    assert max(errors) < 0.25


def test_whole_layer_profile_alone_serves_steps(layers_text):
    prof = parse_profile(layers_text)
    times = prof.layer_times("opt-13b", 1)
    assert float(times.step_s(StepShape(decode_seqs=128, decode_ctx=1024))) == pytest.approx(0.795e-3, rel=0.01)
    t5 = prof.layer_times("t5-11b", 2)
    short, long = (float(t5.step_s(StepShape(decode_seqs=32, decode_ctx=64, enc_seq=e))) for e in (512, 2048))
    assert short < long


def test_step_times_grow_with_batch_and_context(profile):
    times = profile.layer_times("opt-13b", 1)
    batch = times.step_s(StepShape(decode_seqs=np.arange(1, 600, 7.0), decode_ctx=700))
    ctx = times.step_s(StepShape(decode_seqs=64, decode_ctx=np.arange(10, 9000, 50.0)))
    assert np.all(np.diff(batch) >= 0) and np.all(np.diff(ctx) >= 0)
    assert float(times.step_s(StepShape())) == 0.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no model rows"),
        ("not json", "line 1: not JSON"),
        ('{"model": "m", "tp": 0, "part": "rest", "tokens": 1, "ms": 1}', "'tp'"),
        ('{"model": "m", "tp": 1, "part": "rest", "tokens": -1, "ms": 1}', "'tokens'"),
        ('{"model": "m", "tp": 1, "part": "rest", "tokens": 1, "ms": 1}', "lacks"),
        ('{"model": "m", "tp": 1, "phase": "train", "batch": 1, "seq": 1, "ms": 1}', "phase"),
    ],
)
def test_bad_profiles_rejected_with_a_reason(text, message):
    with pytest.raises(ProfileError, match=message):
        parse_profile(text)


def test_unknown_model_is_named_in_the_error(profile):
    with pytest.raises(ValueError, match="no rows for model 'llama'"):
        profile.layer_times("llama", 1)


def _rows(model="m", noisy=False):
    """A small but complete split profile; ``noisy`` puts one decode cell 40 % below its neighbour."""
    rows = [{"model": model, "tp": 1, "part": "rest", "tokens": n, "ms": 0.1 * n} for n in (1, 4, 16)]
    rows += [
        {"model": model, "tp": 1, "part": "attn_prefill", "batch": b, "seq": s, "ms": 0.01 * b * s}
        for b in (1, 4)
        for s in (16, 64)
    ]
    rows += [
        {"model": model, "tp": 1, "part": "attn_decode", "batch": b, "ctx": c, "ms": 0.001 * b * c}
        for b in (1, 4)
        for c in (16, 64)
    ]
    if noisy:
        rows[-1]["ms"] = 0.6 * rows[-2]["ms"]  # batch 4: ctx 64 below ctx 16
    return rows


def _text(rows):
    return "\n".join(json.dumps(r) for r in rows)


def test_noisy_rows_are_smoothed_and_named_in_a_warning():
    prof = parse_profile(_text(_rows(noisy=True)))
    assert prof.warnings == (
        "m tp=1 attn_decode batch=4 ctx=64: 0.0384 ms is 40% below 0.064 ms at batch=4 ctx=16; raised to it",
    )
    times = prof.layer_times("m", 1)
    assert times.attn_decode(4, 64) == pytest.approx(0.064)
    assert parse_profile(_text(_rows())).warnings == ()


def test_profiler_and_loader_apply_the_same_noise_rule():
    from optimizer.profile import smooth_rows

    smoothed = smooth_rows(_rows(noisy=True))
    assert smoothed.warnings == parse_profile(_text(_rows(noisy=True))).warnings
    assert smoothed.rows[-1]["ms"] == pytest.approx(0.064) and smoothed.rows[-1]["ms_raw"] == pytest.approx(0.0384)
    assert "ms_raw" not in smoothed.rows[0]
    reloaded = parse_profile(_text(smoothed.rows))
    assert reloaded.warnings == ()  # written rows are already smooth: loading them changes nothing
    assert reloaded.split == parse_profile(_text(_rows(noisy=True))).split


@pytest.mark.parametrize(
    "drop, message",
    [
        (lambda r: r["part"] == "rest" and r["tokens"] > 1, "rest has 1 tokens value (1); need at least 2"),
        (
            lambda r: r.get("batch") == 4 and r["part"] == "attn_decode",
            "attn_decode has 1 batch size (1); need at least 2",
        ),
        (lambda r: r.get("batch") == 4 and r.get("seq") == 64, "attn_prefill at batch=4 has 1 seq value (16)"),
    ],
)
def test_too_sparse_profiles_are_rejected_saying_what_is_missing(drop, message):
    with pytest.raises(ProfileError, match=re.escape(message)):
        parse_profile(_text([r for r in _rows() if not drop(r)]))


def test_a_single_row_whole_layer_profile_is_rejected():
    rows = [
        {"model": "m", "tp": 1, "phase": "prefill", "batch": 1, "seq": 16, "ms": 1.0},
        {"model": "m", "tp": 1, "phase": "decode", "batch": 1, "ctx": 16, "ms": 1.0},
    ]
    with pytest.raises(ProfileError, match="prefill has 1 batch size"):
        parse_profile(_text(rows))


def test_coverage_and_range_gaps():
    from optimizer.profile import Coverage, range_gaps

    cov = parse_profile(_text(_rows())).coverage("m")
    assert cov == Coverage(batch=4, prompt_len=64, context=64, tokens=16, decode_batch=4)
    assert range_gaps(cov, 64, 64) == ()
    (near,) = range_gaps(cov, 70, 10)
    assert near.axis == "prompt length" and not near.far
    gaps = range_gaps(cov, 10, 81)
    assert [(g.axis, g.needed, g.profiled, g.far) for g in gaps] == [("context", 81, 64, True)]


def test_step_rows_add_the_engines_own_work_to_every_step_of_the_last_stage():
    """``part: step`` rows (the LM head, sampling, the engine's bookkeeping) cost each step by the
    rows that get logits, once per step, on the pipeline's last stage; a profile without them
    (the reference files) charges nothing."""
    from optimizer.analytic import Scenario
    from optimizer.cluster import H200_CLUSTER
    from optimizer.lengths import TASKS
    from optimizer.model import MODELS

    rows = [{"model": "opt-1.3b", "tp": 1, "part": "rest", "tokens": t, "ms": 0.01 * t} for t in (1, 1024)]
    rows += [
        {"model": "opt-1.3b", "tp": 1, "part": p, "batch": b, axis: n, "ms": 0.001 * b * n}
        for p, axis in (("attn_prefill", "seq"), ("attn_decode", "ctx"))
        for b in (1, 64)
        for n in (16, 2048)
    ]
    steps = [{"model": "opt-1.3b", "tp": 1, "part": "step", "rows": r, "ms": ms} for r, ms in ((1, 5.0), (64, 12.0))]
    text = lambda rs: "\n".join(json.dumps(r) for r in rs)  # noqa: E731
    without, with_steps = parse_profile(text(rows)), parse_profile(text(rows + steps))
    assert without.step_s("opt-1.3b") is None and with_steps.step_s("opt-1.3b")(1.0) == pytest.approx(0.005)
    shape = StepShape(decode_seqs=32.0, decode_ctx=100.0)
    for devices in (1, 4):
        base = Scenario(MODELS["opt-1.3b"], without, H200_CLUSTER, TASKS["S"], devices)
        more = Scenario(MODELS["opt-1.3b"], with_steps, H200_CLUSTER, TASKS["S"], devices)
        layout = base.layout(devices, 1, 0)
        added = float(more.timer(layout).path_s(shape) - base.timer(layout).path_s(shape))
        assert added == pytest.approx(with_steps.step_s("opt-1.3b")(32.0))  # once, whatever the depth


def test_batch_gaps_name_what_lies_far_past_the_grid():
    from optimizer.profile import batch_gaps

    cov = parse_profile(_text(_rows())).coverage("m")
    assert batch_gaps(cov, 5, 20) == ()  # within 1.25x: extrapolated quietly
    gaps = batch_gaps(cov, 6, 21)
    assert [(g.axis, g.needed, g.profiled) for g in gaps] == [("decode batch", 6, 4), ("step tokens", 21, 16)]
