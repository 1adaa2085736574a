"""The schedules benchmark's own logic (the run itself takes minutes on SmolLM2: a benchmark)."""

import math

from optimizer.lengths import scaled_task
from optimizer.schedule import Schedule
from optimizer.verify import outstanding as concurrency
from optimizer.verify import requests_for
from services.bench.schedules import Load, Measured, bounds_from, rows_for, sweep_schedule


def test_the_closed_loop_fills_every_decode_slot():
    assert concurrency(sweep_schedule("continuous", 16)) == 32
    waa = Schedule(
        "waa-c", encode_batch=3, decode_batch=10, num_devices=2, encoder_devices=1, decoder_devices=1, worker_devices=1
    )
    assert (
        concurrency(waa) == 10
        and requests_for(waa, 200) == 200
        and requests_for(sweep_schedule("static", 32), 200) == 256
    )


def test_one_request_in_ten_is_a_probe_at_the_99th_percentile_lengths():
    workload = scaled_task("S", 0.25)
    load = Load.draw(workload, 100, seed=1, tag="S")
    assert len(load.probes) == 10 and len(set(load.ids)) == 100
    for rid, i, o in zip(load.ids, load.input_lens, load.output_lens):
        if rid in load.probes:
            assert (i, o) == (workload.input.quantile(0.99), workload.output.quantile(0.99))
    again = load.first(30).renamed(2)
    assert len(again.ids) == 30 and len(again.probes) == 3 and not set(again.ids) & set(load.ids)


def measured(throughput, latency):
    return Measured([throughput], [latency])


def test_bounds_come_from_static_latencies_and_each_baseline_is_its_best_setting_within_them():
    static = {("static", b): measured(t, lat) for b, t, lat in ((2, 3.0, 1.0), (4, 4.0, 2.0), (8, 5.0, 4.0))}
    bounds = bounds_from(static, ("p10", "p70", "inf"))
    assert [label for label, _ in bounds] == ["p10", "p70", "inf"] and bounds[0][1] == 1.2 and math.isinf(bounds[2][1])
    results = dict(static) | {("continuous", 8): measured(6.0, 3.0)}
    exe = Schedule("rra", worker_devices=1, num_devices=2)
    product = Schedule("mixed", worker_devices=1, num_devices=2)
    results[("exegpt", exe)] = measured(7.0, 1.1)
    results[("product", product)] = measured(7.5, 1.0)
    settings = {key: sweep_schedule(key[0], key[1]) for key in results if key[0] not in ("exegpt", "product")}
    rows = rows_for("S", bounds, {"p10": (exe, product), "p70": (exe, product), "inf": (exe, None)}, settings, results)
    tight = {r.system: r for r in rows if r.bound_label == "p10"}
    assert set(tight) == {"exegpt", "product", "static"}  # continuous does not meet 1.2 s
    assert {r.system for r in rows if r.bound_label == "inf"} == {"exegpt", "static", "continuous"}
    assert tight["static"].schedule.encode_batch == 2 and tight["exegpt"].meets_bound
    loose = {r.system: r.schedule.encode_batch for r in rows if r.bound_label == "inf"}
    assert loose["static"] == 8 and loose["continuous"] == 8
    assert set(rows[0].as_json()) == {
        "task",
        "bound_s",
        "system",
        "schedule",
        "measured_throughput",
        "predicted_throughput",
        "measured_latency_s",
        "predicted_latency_s",
        "meets_bound",
    }
