import json

import numpy as np
import pytest

from optimizer.profile import ProfileError, StepShape, parse_profile


def _shape(row):
    if row["phase"] in ("prefill", "encode"):
        return StepShape(prefill_seqs=row["batch"], prefill_tokens=row["batch"] * row["seq"],
                         prefill_seq=row["seq"])
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


@pytest.mark.parametrize("text, message", [
    ("", "no model rows"),
    ("not json", "line 1: not JSON"),
    ('{"model": "m", "tp": 0, "part": "rest", "tokens": 1, "ms": 1}', "'tp'"),
    ('{"model": "m", "tp": 1, "part": "rest", "tokens": -1, "ms": 1}', "'tokens'"),
    ('{"model": "m", "tp": 1, "part": "rest", "tokens": 1, "ms": 1}', "lacks"),
    ('{"model": "m", "tp": 1, "phase": "train", "batch": 1, "seq": 1, "ms": 1}', "phase"),
])
def test_bad_profiles_rejected_with_a_reason(text, message):
    with pytest.raises(ProfileError, match=message):
        parse_profile(text)


def test_unknown_model_is_named_in_the_error(profile):
    with pytest.raises(ValueError, match="no rows for model 'llama'"):
        profile.layer_times("llama", 1)
