"""`exegpt bench optimizer`: ExeGPT's schedules vs static and continuous batching, and the search
vs the exhaustive reference, over the paper's tasks and latency bounds (predicted figures).

Bounds per scenario: the 10th, 30th and 70th percentile of static batching's latencies over its
batch sizes (powers of two that fit, at FasterTransformer's usual layout: TP inside a node,
pipeline across nodes), and no bound.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_PROFILE = Path(__file__).resolve().parents[1] / ".." / "shared" / "profiles" / "h200-reference-split.jsonl"
SCENARIOS = (("opt-13b", 4), ("gpt3-175b", 16))
TASK_IDS = ("S", "T", "G", "C1", "C2")
PERCENTILES = (10, 30, 70)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=str(DEFAULT_PROFILE), help="split or whole-layer profile JSONL")
    parser.add_argument("--scenarios", nargs="+", default=[f"{m}:{n}" for m, n in SCENARIOS],
                        metavar="MODEL:DEVICES")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_IDS), choices=TASK_IDS)
    parser.add_argument("--no-exhaustive", action="store_true", help="skip the exhaustive reference")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip re-running each chosen schedule in the event-driven simulator")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


@dataclass(frozen=True)
class Row:
    model: str
    devices: int
    task: str
    bound_label: str
    bound_s: float
    schedule: str
    exegpt_seq_s: float
    static_seq_s: float
    continuous_seq_s: float
    search_s: float
    exhaustive_s: float
    gap: float  # (exhaustive - branch and bound) / exhaustive
    sim_ratio: float  # event-driven simulation's throughput / the analytic prediction
    sim_latency_s: float  # simulated latency of >= p99-length outputs (service time)

    @property
    def vs_static(self) -> float:
        return _ratio(self.exegpt_seq_s, self.static_seq_s)

    @property
    def vs_continuous(self) -> float:
        return _ratio(self.exegpt_seq_s, self.continuous_seq_s)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf if a > 0 else math.nan


def static_bounds(sc) -> list[tuple[str, float]]:
    """Percentiles of static batching's latency over its batch sizes, plus no bound."""
    from optimizer import analytic

    k = max([t for t in sc.tp_degrees() if t <= sc.cluster.devices_per_node] or [1])
    layout = sc.layout(sc.devices, k, sc.devices // k)
    sizes = 2 ** np.arange(0, 10)
    pred = analytic.static(sc, analytic.WorkloadStats(sc.workload), layout, sizes, 1)
    lat = pred.latency_p99_s[pred.feasible]
    if len(lat) == 0:
        return [("inf", math.inf)]
    return [(f"p{q}", float(np.percentile(lat, q))) for q in PERCENTILES] + [("inf", math.inf)]


def _best(result) -> float:
    return result.best.figures.throughput_seq_s if result.best else 0.0


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def simulated(sc, candidate) -> tuple[float, float]:
    """The schedule run through the policies in the event-driven simulator (saturated, enough
    requests for several batch turnovers): its throughput over the analytic prediction, and its
    p99-length latency."""
    from optimizer.simulator import requests_from_workload, simulate

    n = int(min(max(600, 6 * candidate.figures.decode_batch_peak), 6000))
    reqs = requests_from_workload(sc, np.random.default_rng(0), n)
    sim = simulate(sc, candidate.schedule, reqs)
    return sim.throughput_seq_s / candidate.figures.throughput_seq_s, sim.latency_p99_len_s


def bench_row(sc, task: str, label: str, bound: float, with_exhaustive: bool, verify: bool) -> Row:
    from optimizer.search import SEARCH_POLICIES, branch_and_bound, exhaustive
    from services.cli.plan import describe

    bb, t_bb = _timed(branch_and_bound, sc, bound, SEARCH_POLICIES)
    ex, t_ex = _timed(exhaustive, sc, bound, SEARCH_POLICIES) if with_exhaustive else (None, math.nan)
    static = branch_and_bound(sc, bound, ("static",))
    cont = branch_and_bound(sc, bound, ("continuous",))
    gap = (_best(ex) - _best(bb)) / _best(ex) if ex and _best(ex) > 0 else (0.0 if ex else math.nan)
    return Row(sc.model.name, sc.devices, task, label, bound, describe(bb.best.schedule) if bb.best else "-",
               _best(bb), _best(static), _best(cont), t_bb, t_ex, gap,
               *(simulated(sc, bb.best) if (verify and bb.best) else (math.nan, math.nan)))


def _fmt_ratio(x: float) -> str:
    return "  -  " if math.isnan(x) else ("  inf" if math.isinf(x) else f"{x:5.2f}")


def _fmt_pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 100:.2f}"


def print_table(rows: list[Row]) -> None:
    head = (f"{'model':<10} {'N':>2} {'task':<4} {'bound':<5} {'bound s':>8} {'ExeGPT seq/s':>12} "
            f"{'xstatic':>7} {'xcont':>6} {'search s':>8} {'exh s':>6} {'gap %':>6} {'sim/model':>9} {'sim lat s':>9}  schedule")
    print(head)
    print("-" * len(head))
    for r in rows:
        bound = "inf" if math.isinf(r.bound_s) else f"{r.bound_s:8.2f}"
        print(f"{r.model:<10} {r.devices:>2} {r.task:<4} {r.bound_label:<5} {bound:>8} {r.exegpt_seq_s:12.2f} "
              f"{_fmt_ratio(r.vs_static):>7} {_fmt_ratio(r.vs_continuous):>6} {r.search_s:8.3f} "
              f"{r.exhaustive_s:6.2f} {_fmt_pct(r.gap):>6} {r.sim_ratio:9.3f} {r.sim_latency_s:9.2f}  {r.schedule}")


def _finite(values) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def print_summary(rows: list[Row]) -> None:
    print()
    print(f"median search {statistics.median(r.search_s for r in rows):.3f} s, "
          f"max {max(r.search_s for r in rows):.3f} s; max gap to exhaustive "
          f"{max(_finite([r.gap for r in rows]) or [math.nan]) * 100:.2f} %")
    sims = _finite([r.sim_ratio for r in rows])
    if sims:
        print(f"event-driven simulation / analytic throughput: {min(sims):.3f} .. {max(sims):.3f} "
              f"(median {statistics.median(sims):.3f})")
    for label in ("p10", "p30", "p70", "inf"):
        sel = [r for r in rows if r.bound_label == label]
        vs_s, vs_c = _finite([r.vs_static for r in sel]), _finite([r.vs_continuous for r in sel])
        if sel:
            print(f"bound {label:<4}: ExeGPT / static mean {statistics.fmean(vs_s) if vs_s else math.nan:.2f}x "
                  f"(max {max(vs_s, default=math.nan):.2f}x), / continuous mean "
                  f"{statistics.fmean(vs_c) if vs_c else math.nan:.2f}x over {len(sel)} scenarios")


def _scenario(profile, spec: str, task: str):
    from optimizer.analytic import Scenario
    from optimizer.cluster import H200_CLUSTER
    from optimizer.lengths import TASKS
    from optimizer.model import model_by_name
    from services.cli import CliError

    name, _, devices = spec.partition(":")
    if not devices.isdigit():
        raise CliError(f"scenario {spec!r}: expected MODEL:DEVICES, e.g. opt-13b:4")
    try:
        return Scenario(model_by_name(name), profile, H200_CLUSTER, TASKS[task], int(devices))
    except ValueError as exc:
        raise CliError(f"scenario {spec!r}: {exc}") from None


def print_case_study(profile) -> None:
    """The paper's case study (OPT-13B, task S, 4 GPUs, bounds 3.1 s and none)."""
    from optimizer.search import branch_and_bound
    from services.cli.plan import describe

    sc = _scenario(profile, "opt-13b:4", "S")
    print("\ncase study (paper, A100: 3.1 s -> WAA B_E=4 TP=2 22.4 seq/s; inf -> RRA B_E=49 N_D=7 TP=4 26.2 seq/s)")
    for bound in (3.1, math.inf):
        for policies in (("rra",), ("waa-c", "waa-m")):
            r = branch_and_bound(sc, bound, policies)
            if r.best:
                f = r.best.figures
                print(f"  bound {bound:g}: {describe(r.best.schedule):<70} {f.throughput_seq_s:7.1f} seq/s  "
                      f"latency {f.latency_p99_s:.2f} s")


def run(args: argparse.Namespace) -> int:
    from optimizer.io import load_profile
    from services.cli import CliError

    try:
        profile = load_profile(args.profile)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    rows = []
    for spec in args.scenarios:
        for task in args.tasks:
            sc = _scenario(profile, spec, task)
            for label, bound in static_bounds(sc):
                rows.append(bench_row(sc, task, label, bound, not args.no_exhaustive, not args.no_verify))
    print_table(rows)
    print_summary(rows)
    print_case_study(profile)
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0
