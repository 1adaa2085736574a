"""`exegpt plan`: the schedule printed, one-line errors for bad input."""

import json
from pathlib import Path

import pytest

from services.cli import main
from tests.brokers import need

SHARED = Path(__file__).resolve().parents[2] / "../shared"  # beside the repository
PROFILES, TRACES = SHARED / "profiles", SHARED / "traces"

SPLIT = str(PROFILES / "h200-reference-split.jsonl")


@pytest.fixture(autouse=True)
def _needs_shared():
    need(PROFILES.exists(), f"shared profiles not present at {PROFILES}")


def _plan(*extra):
    return main(["plan", "--profile", SPLIT, "--model", "opt-13b", "--devices", "4", *extra])


def test_plan_prints_schedule_figures_and_search_time(capsys):
    assert _plan("--task", "S", "--latency-bound", "3.1") == 0
    out = capsys.readouterr().out
    assert out.startswith("schedule:") and "seq/s" in out and "branch-and-bound" in out


def test_plan_json_meets_the_bound_and_names_the_schedule(capsys):
    assert _plan("--task", "C1", "--latency-bound", "1.0", "--policy", "rra", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schedule"]["policy"] == "rra"
    assert doc["predicted"]["latency_p99_s"] <= 1.0
    assert doc["search"]["seconds"] >= 0 and doc["latency_bound_s"] == 1.0


def test_a_verified_plan_meets_its_bound_in_simulation(capsys):
    assert _plan("--task", "S", "--latency-bound", "0.5", "--verify", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["simulated"]["p99_length_latency_s"] <= 0.5 and doc["simulated"]["throughput_seq_s"] > 0
    assert doc["search"]["searches"] > 1 and doc["search"]["searched_bound_s"] < 0.5
    assert _plan("--task", "S", "--latency-bound", "0.5", "--verify") == 0
    assert "simulated:" in capsys.readouterr().out


def test_exhaustive_and_unbounded_plans(capsys):
    assert _plan("--task", "T", "--latency-bound", "inf", "--policy", "waa", "--exhaustive", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schedule"]["policy"] in ("waa-c", "waa-m") and doc["search"]["method"] == "exhaustive"
    assert doc["latency_bound_s"] is None


def test_plan_from_a_trace_file(capsys):
    assert (
        _plan("--lengths", str(TRACES / "azure-llm-2023-conv.csv"), "--max-input", "2048", "--latency-bound", "30") == 0
    )
    assert "seq/s" in capsys.readouterr().out


def test_lengths_far_beyond_the_profile_are_refused_naming_the_flag(capsys):
    # the trace's 99th-percentile prompt (4142 tokens) is twice the longest profiled one (2048)
    assert _plan("--lengths", str(TRACES / "azure-llm-2023-conv.csv"), "--latency-bound", "30") == 2
    err = capsys.readouterr().err.strip()
    assert "exegpt profile --max-len 4142" in err and "--max-input" in err and len(err.splitlines()) == 1


def test_lengths_a_little_beyond_the_profile_warn(capsys):
    assert (
        _plan("--lengths", str(TRACES / "azure-llm-2023-conv.csv"), "--max-input", "2400", "--latency-bound", "30") == 0
    )
    captured = capsys.readouterr()
    assert "seq/s" in captured.out and "warning:" in captured.err and "extrapolating" in captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [
                "--profile",
                "/no/such/file",
                "--model",
                "opt-13b",
                "--devices",
                "4",
                "--task",
                "S",
                "--latency-bound",
                "3",
            ],
            "cannot read /no/such/file",
        ),
        (
            ["--profile", SPLIT, "--model", "llama", "--devices", "4", "--task", "S", "--latency-bound", "3"],
            "no rows for model 'llama'",
        ),
        (
            ["--profile", SPLIT, "--model", "gpt3-39b", "--devices", "4", "--task", "S", "--latency-bound", "3"],
            "no rows for model 'gpt3-39b'",
        ),
        (
            ["--profile", SPLIT, "--model", "opt-13b", "--devices", "0", "--task", "S", "--latency-bound", "3"],
            "--devices must be >= 1",
        ),
        (
            ["--profile", SPLIT, "--model", "opt-13b", "--devices", "4", "--task", "S", "--latency-bound", "0.001"],
            "meets the 0.001 s latency bound",
        ),
        (
            [
                "--profile",
                str(TRACES / "azure-llm-2023-conv.csv"),
                "--model",
                "opt-13b",
                "--devices",
                "4",
                "--task",
                "S",
                "--latency-bound",
                "3",
            ],
            "not JSON",
        ),
        (
            ["--profile", SPLIT, "--model", "opt-13b", "--devices", "4", "--lengths", SPLIT, "--latency-bound", "3"],
            "expected 'timestamp,input,output'",
        ),
    ],
)
def test_bad_inputs_give_one_line_errors(capsys, args, message):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("bound", ["-1", "0", "nan", "soon"])
def test_bad_latency_bounds_rejected_by_the_parser(capsys, bound):
    with pytest.raises(SystemExit) as exc:
        _plan("--task", "S", "--latency-bound", bound)
    assert exc.value.code == 2 and "latency" in capsys.readouterr().err


def test_task_and_lengths_are_exclusive_and_one_is_required(capsys):
    with pytest.raises(SystemExit):
        _plan("--latency-bound", "3")
    with pytest.raises(SystemExit):
        _plan("--task", "S", "--lengths", "x.csv", "--latency-bound", "3")


def test_a_plan_far_past_the_profiled_batches_is_kept_with_a_warning(tmp_path, capsys):
    """A profile of batches 1-2 and 16 tokens per step: the plan extrapolates far past it."""
    rows = [{"model": "opt-13b", "tp": 1, "part": "rest", "tokens": t, "ms": 0.05 + 0.001 * t} for t in (1, 16)]
    rows += [
        {"model": "opt-13b", "tp": 1, "part": p, "batch": b, axis: n, "ms": 1e-4 * b * n}
        for p, axis, top in (("attn_prefill", "seq", 2048), ("attn_decode", "ctx", 4096))
        for b in (1, 2)
        for n in (16, top)
    ]
    path = tmp_path / "sparse.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    code = main(
        [
            "plan",
            "--profile",
            str(path),
            "--model",
            "opt-13b",
            "--devices",
            "1",
            "--task",
            "S",
            "--latency-bound",
            "inf",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    assert "largest decode batch the profile of opt-13b tp=1 measured (2)" in err and "--max-batch 2" in err
    assert "largest step tokens the profile of opt-13b tp=1 measured (16)" in err


def test_a_plan_within_the_profile_has_no_batch_warning(capsys):
    assert _plan("--task", "S", "--latency-bound", "1.0") == 0
    assert "extrapolated" not in capsys.readouterr().err


def test_plan_into_a_closed_pipe_exits_quietly():
    """`exegpt plan --json | head`: the reader goes away; no traceback, the SIGPIPE status."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has already gone
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.cli",
                "plan",
                "--profile",
                SPLIT,
                "--model",
                "opt-13b",
                "--devices",
                "4",
                "--task",
                "S",
                "--latency-bound",
                "3.1",
                "--json",
            ],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parents[2],
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("model", ["llama", "gpt3-39b", "smollm2"])
def test_a_model_the_profile_lacks_names_only_the_profiled_models(capsys, model):
    assert _plan_model(model) == 2
    err = capsys.readouterr().err.strip()
    assert f"no rows for model {model!r}" in err and len(err.splitlines()) == 1
    listed = err.split("it has rows for ", 1)[1].split(" (", 1)[0].split(", ")
    assert listed == ["gpt3-175b", "opt-1.3b", "opt-13b", "opt-66b", "t5-11b"]  # the reference profile's


def _plan_model(model):
    return main(["plan", "--profile", SPLIT, "--model", model, "--devices", "4", "--task", "S", "--latency-bound", "3"])


def test_the_readme_plan_row_runs_as_written(capsys, monkeypatch):
    import re
    import shlex

    root = Path(__file__).resolve().parents[2]
    row = next(line for line in (root / "README.md").read_text().splitlines() if line.startswith("| `exegpt plan"))
    command = shlex.split(re.match(r"\| `([^`]*)`", row).group(1))
    monkeypatch.chdir(root)  # its paths are relative to the repository
    assert command[0] == "exegpt" and main(command[1:]) == 0
    assert capsys.readouterr().out.startswith("schedule:")


def test_plan_at_a_rate_reports_the_share_within_the_bound_and_both_timings(capsys):
    assert (
        _plan(
            "--task",
            "S",
            "--latency-bound",
            "0.6",
            "--rate",
            "30",
            "--burstiness",
            "1.5",
            "--requests",
            "200",
            "--max-batch",
            "64",
            "--json",
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["simulated"]["share_within_bound"] >= 0.99
    assert doc["predicted"]["throughput_seq_s"] > doc["arrivals"]["rate_per_s"]
    assert doc["search"]["seconds"] > 0 and doc["check"]["seconds"] > 0 and doc["check"]["simulated_candidates"] >= 1
    assert doc["arrivals"]["burstiness_cv"] == 1.5


def test_plan_with_a_trace_replays_its_arrivals(capsys):
    need((TRACES / "azure-llm-2023-conv.csv").exists(), f"trace not present in {TRACES}")
    trace = str(TRACES / "azure-llm-2023-conv.csv")
    code = _plan(
        "--lengths",
        trace,
        "--max-input",
        "2048",
        "--max-output",
        "512",
        "--latency-bound",
        "20",
        "--trace",
        trace,
        "--requests",
        "150",
        "--max-batch",
        "64",
        "--json",
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["arrivals"]["trace"] == trace and doc["arrivals"]["requests"] == 150
    assert doc["simulated"]["share_within_bound"] >= 0.99
