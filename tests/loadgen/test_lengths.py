from pathlib import Path

import numpy as np
import pytest

from loadgen.lengths import TASKS, fixed_lengths, load_lengths_file, scale_lengths, task_lengths
from loadgen.trace import load_trace
from tests.brokers import need

TRACE = Path(__file__).resolve().parents[2] / ".." / "shared" / "traces" / "azure-llm-2023-conv.csv"


@pytest.mark.parametrize("task", list(TASKS))
def test_task_lengths_are_truncated_normals(task):
    spec = TASKS[task]
    lengths = task_lengths(task, 20_000, np.random.default_rng(5))
    for values, dist in ((lengths.input_tokens, spec.input), (lengths.output_tokens, spec.output)):
        assert values.min() >= 1 and values.max() <= dist.max_tokens
        # the truncated mean lies between the untruncated mean shifted by the cuts; close to it
        assert abs(values.mean() - dist.mean) < 0.25 * dist.std + 2


def test_task_s_output_p99_matches_the_paper():
    out = task_lengths("S", 50_000, np.random.default_rng(6)).output_tokens
    assert np.percentile(out, 99) == pytest.approx(63, abs=2)  # the ExeGPT paper: S output p99 63


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="C2"):
        task_lengths("X", 3, np.random.default_rng(0))


def test_scale_rounds_keeps_at_least_one_and_caps():
    scaled = scale_lengths(fixed_lengths(10, 3, 2), 0.1, max_input=0 + 1)
    assert scaled.input_tokens.tolist() == [1, 1] and scaled.output_tokens.tolist() == [1, 1]
    doubled = scale_lengths(fixed_lengths(10, 3, 1), 2.0, max_input=15)
    assert doubled.input_tokens.tolist() == [15] and doubled.output_tokens.tolist() == [6]


def test_lengths_file_csv_and_jsonl(tmp_path):
    (tmp_path / "l.csv").write_text("input_tokens,output_tokens\n5,7\n9,2\n")
    (tmp_path / "l.jsonl").write_text('{"input_tokens": 3, "output_tokens": 4}\n')
    csv_lengths = load_lengths_file(tmp_path / "l.csv")
    assert csv_lengths.input_tokens.tolist() == [5, 9] and csv_lengths.output_tokens.tolist() == [7, 2]
    assert load_lengths_file(tmp_path / "l.jsonl").output_tokens.tolist() == [4]


def test_trace_parses_azure_timestamps(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.5000000,374,44\n"
        "2023-11-16 18:15:48.2500000,0,109\n"
    )
    trace = load_trace(f)
    np.testing.assert_allclose(trace.timestamps_s, [0.0, 1.75])
    assert trace.lengths.input_tokens.tolist() == [374, 1]  # zero-length prompt sent as one token


def test_real_trace_head():
    need(TRACE.exists(), f"shared trace not present at {TRACE}")
    trace = load_trace(TRACE, limit=2000)
    assert len(trace) == 2000
    rate = (len(trace) - 1) / trace.timestamps_s[-1]
    assert 2.0 < rate < 12.0  # README: mean 5.5 requests/s over the whole hour
    assert np.all(np.diff(trace.timestamps_s) >= 0)


def test_fit_context_caps_prompt_plus_output():
    from loadgen.lengths import Lengths, fit_context

    lengths = Lengths(np.array([10, 500, 3, 900]), np.array([5, 40, 300, 20]))
    fitted = fit_context(lengths, 100)
    assert list(fitted.input_tokens) == [10, 60, 1, 80]
    assert list(fitted.output_tokens) == [5, 40, 99, 20]
    assert all(fitted.input_tokens + fitted.output_tokens <= 100)
    with pytest.raises(ValueError):
        fit_context(lengths, 1)
