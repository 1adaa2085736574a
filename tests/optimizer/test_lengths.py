import numpy as np
import pytest

from optimizer.lengths import TASKS, LengthDistribution, Workload, parse_length_csv, workload_from_trace

# The ExeGPT paper's 99th-percentile output lengths (ours are of the discretised,
# truncated normal; the paper's come from its own sampling).
PAPER_P99 = {"S": 63, "T": 292, "G": 417, "C1": 137, "C2": 579}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_match_the_paper_within_a_few_percent(task):
    out = TASKS[task].output
    assert out.quantile(0.99) == pytest.approx(PAPER_P99[task], rel=0.04)
    assert 1 <= out.values[0] and out.maximum <= {"S": 80, "T": 320, "G": 480, "C1": 160, "C2": 640}[task]


def test_sampling_follows_the_distribution_and_the_generator():
    dist = TASKS["T"].output
    a = dist.sample(np.random.default_rng(7), 20000)
    b = dist.sample(np.random.default_rng(7), 20000)
    assert np.array_equal(a, b)
    assert a.mean() == pytest.approx(dist.mean, rel=0.02)
    assert np.quantile(a, 0.99) == pytest.approx(dist.quantile(0.99), rel=0.03)


def test_expected_max_grows_from_the_mean_to_the_maximum():
    dist = LengthDistribution.from_samples([1, 2, 3, 10])
    em = dist.expected_max(np.array([1, 2, 50]))
    assert em[0] == pytest.approx(4.0)
    assert em[0] < em[1] < em[2] <= 10


def test_trace_csv_parses_to_an_empirical_workload(trace_text):
    rows = parse_length_csv(trace_text)
    assert len(rows) == 19366
    assert rows[0].arrival_s == 0.0 and 3000 < rows[-1].arrival_s < 3600
    wl = workload_from_trace("azure", rows)
    assert wl.input.mean == pytest.approx(1155, rel=0.01)
    assert wl.output.quantile(0.99) == pytest.approx(601, rel=0.02)
    ins, outs = wl.sample(np.random.default_rng(0), 5)
    assert all((i, o) in set(wl.pairs) for i, o in zip(ins, outs))


def test_plain_two_column_csv_is_accepted():
    rows = parse_length_csv("input,output\n10,5\n20,7\n")
    assert [(r.input_len, r.output_len) for r in rows] == [(10, 5), (20, 7)]


@pytest.mark.parametrize("text", ["", "a,b\n", "1,2,3,4\n", "x,10,5\n"])
def test_bad_length_files_rejected(text):
    with pytest.raises(ValueError):
        parse_length_csv(text)


@pytest.mark.parametrize(
    "build",
    [
        lambda: LengthDistribution.from_samples([]),
        lambda: LengthDistribution.from_samples([0, 3]),
        lambda: LengthDistribution.truncated_normal(10, 0, 20),
        lambda: LengthDistribution((2, 1), (0.5, 0.5)),
        lambda: Workload.from_pairs("w", [1, 2], [3]),
    ],
)
def test_bad_distributions_rejected(build):
    with pytest.raises(ValueError):
        build()


def test_a_scaled_task_shrinks_every_length_by_the_factor():
    from optimizer.lengths import TASKS, scaled_task

    quarter = scaled_task("S", 0.25)
    assert quarter.input.maximum == 128 and quarter.output.maximum == 20
    assert quarter.input.mean == pytest.approx(TASKS["S"].input.mean / 4, rel=0.02)
    assert quarter.output.mean == pytest.approx(TASKS["S"].output.mean / 4, rel=0.05)
    assert scaled_task("G", 1) is TASKS["G"]
    for name, scale in (("X", 0.5), ("S", 0)):
        with pytest.raises(ValueError):
            scaled_task(name, scale)
