"""`exegpt bench optimizer`: the product's pick (the best schedule over ExeGPT's policies and the
baselines, checked in the simulator), the best paper policy (RRA/WAA), static and continuous batching
under the same check, and the search vs the exhaustive reference, over the paper's tasks and
latency bounds.

Bounds per scenario: the 10th, 30th and 70th percentile of static batching's latencies over its
batch sizes (powers of two that fit, at FasterTransformer's usual layout: TP inside a node,
pipeline across nodes), and no bound.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_PROFILE = Path(__file__).resolve().parents[2] / ".." / "shared" / "profiles" / "h200-reference-split.jsonl"
SCENARIOS = (("opt-13b", 4), ("gpt3-175b", 16))
EXTRA_SCENARIOS = ("opt-66b:8:S", "t5-11b:8:S")  # beside the ten reference ones: task S only
TASK_IDS = ("S", "T", "G", "C1", "C2")
PERCENTILES = (10, 30, 70)
SUSTAINED_BOUNDS = ("p10", "p30")  # --sustained: the bounds the paper-vs-continuous goal is set at


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=str(DEFAULT_PROFILE), help="split or whole-layer profile JSONL")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=[f"{m}:{n}" for m, n in SCENARIOS] + list(EXTRA_SCENARIOS),
        metavar="MODEL:DEVICES[:TASK,...]",
        help="scenarios; a third part names the tasks for that one (default: --tasks)",
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASK_IDS), choices=TASK_IDS)
    parser.add_argument("--no-exhaustive", action="store_true", help="skip the exhaustive reference")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip re-running each chosen schedule in the event-driven simulator"
    )
    parser.add_argument(
        "--sustained",
        action="store_true",
        help="also, at the p10 and p30 bounds, the highest Poisson arrival rate at which the "
        "best paper policy's and continuous batching's checked picks keep 99%% of requests "
        "within the bound in the simulator (slow: about 14 simulations per pick, each of "
        "at least 40 bounds' worth of arrivals)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument(
        "--traffic",
        action="store_true",
        help="instead: how long the scheduler's search for a forecast takes (plan_for_traffic, "
        "OPT-13B on two devices, task T x0.1), its simulations sharing their step times "
        "against each computing its own, interleaved",
    )
    parser.add_argument("--repeats", type=int, default=3, help="--traffic: timings of each case (default 3)")


ROW_KEYS = (
    "model",
    "devices",
    "task",
    "bound_s",
    "policy",
    "schedule",
    "throughput",
    "best_paper_policy_throughput",
    "static_throughput",
    "continuous_throughput",
    "exhaustive_throughput",
    "search_s",
    "simulated_throughput",
    "simulated_latency_s",
    "simulated_fits_memory",
)


@dataclass(frozen=True)
class Row:
    """One scenario and bound. ``throughput``: the product's pick (the best simulator-checked
    schedule over every family, baselines included); ``best_paper_policy_throughput``: the best
    checked RRA/WAA schedule; the baselines checked the same way; ``exhaustive_throughput``: the
    exhaustive search over the pick's policy set at the bound its search ran under (the
    branch-and-bound answer there is ``throughput``); ``search_s``: the product's first search
    (the fast path; the simulator checks are timed apart, ``check_s``). Throughputs are predicted
    seq/s (0: nothing meets the bound); ``simulated_*``: the pick in the event-driven simulator
    (saturated closed loop with p99-length probes)."""

    model: str
    devices: int
    task: str
    bound_label: str
    bound: float
    policy: str
    schedule: str
    throughput: float
    best_paper_policy_throughput: float
    static_throughput: float
    continuous_throughput: float
    exhaustive_throughput: float
    search_s: float
    simulated_throughput: float
    simulated_latency_s: float
    simulated_fits_memory: bool | None
    check_s: float  # the simulator checks (and re-searches) of the four policy sets
    space: int  # schedules in the product's space
    paper_sustained: float = math.nan  # --sustained: req/s the best paper pick keeps 99 % within the bound at
    continuous_sustained: float = math.nan  # the same for continuous batching's pick

    def as_json(self) -> dict:
        out = {k: getattr(self, k) for k in ROW_KEYS if k != "bound_s"}
        out["bound_s"] = None if math.isinf(self.bound) else self.bound
        out = {k: out[k] for k in ROW_KEYS}
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}

    @property
    def gap(self) -> float:
        ex = self.exhaustive_throughput
        return (ex - self.throughput) / ex if ex and math.isfinite(ex) and ex > 0 else math.nan


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


def _thr(verified) -> float:
    return verified.best.figures.throughput_seq_s if verified.best is not None else 0.0


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def simulated(sc, schedule):
    """The schedule in the event-driven simulator, as the check ran it: saturated closed loop,
    one request in ten a probe at the 99th-percentile lengths. (throughput, p99-length latency,
    fits in memory)."""
    from optimizer.verify import ProbeLoad, requests_for, run_figures, simulate_load

    load = ProbeLoad.draw(sc.workload, requests_for(schedule), 0)
    sim = simulate_load(sc, schedule, load)
    fig = run_figures(sim, load, schedule)
    return fig.throughput_seq_s, fig.p99_length_latency_s, bool(sim.fits_memory)


def sustained(sc, verified, bound: float) -> float:
    """The Poisson rate at which a checked pick keeps 99 % of requests within ``bound``; the
    bisection is capped at 1.5 times the search's predicted saturated throughput."""
    from optimizer.queueing import sustained_rate

    cand = verified.best
    if cand is None or math.isinf(bound):
        return math.nan
    return sustained_rate(sc, cand.schedule, bound, 1.5 * cand.figures.throughput_seq_s)


def bench_row(
    sc, task: str, label: str, bound: float, with_exhaustive: bool, verify: bool, with_sustained: bool = False
) -> Row:
    from optimizer.schedule import describe
    from optimizer.search import BASELINES, PRODUCT_POLICIES, SEARCH_POLICIES, branch_and_bound, exhaustive, space_size
    from optimizer.verify import verified_pick

    _, t_search = _timed(branch_and_bound, sc, bound, PRODUCT_POLICIES)
    groups = (PRODUCT_POLICIES, SEARCH_POLICIES) + tuple((p,) for p in BASELINES)
    if verify:
        pick, t_check = _timed(verified_pick, sc, bound, groups=groups)
        best, by = (
            pick.best,
            {
                g[-1] if len(g) == 1 else ("paper" if g == SEARCH_POLICIES else "product"): v
                for g, v in pick.by_group.items()
            },
        )
        policies, searched = pick.policies, best.searched_bound_s
        paper, st, co = _thr(by["paper"]), _thr(by["static"]), _thr(by["continuous"])
        cand = best.best
    else:
        t_check, policies, searched = math.nan, PRODUCT_POLICIES, bound
        cand = branch_and_bound(sc, bound, PRODUCT_POLICIES).best
        paper, st, co = (_best(branch_and_bound(sc, bound, g)) for g in (SEARCH_POLICIES, ("static",), ("continuous",)))
    ex = _best(exhaustive(sc, searched, policies)) if with_exhaustive else math.nan
    sim_thr, sim_lat, sim_fits = simulated(sc, cand.schedule) if (verify and cand) else (math.nan, math.nan, None)
    paper_rate, continuous_rate = (
        (sustained(sc, by["paper"], bound), sustained(sc, by["continuous"], bound))
        if (verify and with_sustained and label in SUSTAINED_BOUNDS)
        else (math.nan, math.nan)
    )
    return Row(
        sc.model.name,
        sc.devices,
        task,
        label,
        bound,
        cand.schedule.policy if cand else "-",
        describe(cand.schedule) if cand else "-",
        cand.figures.throughput_seq_s if cand else 0.0,
        paper,
        st,
        co,
        ex,
        t_search,
        sim_thr,
        sim_lat,
        sim_fits,
        t_check,
        space_size(sc, PRODUCT_POLICIES),
        paper_rate,
        continuous_rate,
    )


def _best(result) -> float:
    return result.best.figures.throughput_seq_s if result.best else 0.0


def _fmt(x: float, spec: str = "8.2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'model':<10} {'N':>2} {'task':<4} {'bound':<5} {'bound s':>8} {'seq/s':>8} {'paper':>8} "
        f"{'static':>8} {'cont':>8} {'exh':>8} {'gap %':>6} {'search s':>8} {'check s':>7} {'sim seq/s':>9} "
        f"{'sim lat':>8} {'fits':>4}  schedule"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        bound = "inf" if math.isinf(r.bound) else f"{r.bound:8.3f}"
        print(
            f"{r.model:<10} {r.devices:>2} {r.task:<4} {r.bound_label:<5} {bound:>8} {r.throughput:8.2f} "
            f"{r.best_paper_policy_throughput:8.2f} {r.static_throughput:8.2f} {r.continuous_throughput:8.2f} "
            f"{_fmt(r.exhaustive_throughput)} {_fmt(r.gap * 100, '6.2f')} {r.search_s:8.3f} "
            f"{_fmt(r.check_s, '7.1f')} {_fmt(r.simulated_throughput, '9.2f')} {_fmt(r.simulated_latency_s, '8.3f')} "
            f"{'yes' if r.simulated_fits_memory else ('-' if r.simulated_fits_memory is None else 'NO'):>4}  "
            f"{r.schedule}"
        )


def _finite(values) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _geomean(values) -> float:
    v = [x for x in values if math.isfinite(x) and x > 0]
    return math.exp(statistics.fmean(math.log(x) for x in v)) if v else math.nan


def print_summary(rows: list[Row]) -> None:
    print()
    sizes = sorted({(r.model, r.devices, r.task, r.space) for r in rows})
    print(
        "space (schedules in the product's space, per scenario): "
        + ", ".join(f"{m}:{n} {t} {s:,}" for m, n, t, s in sizes)
    )
    searches = [r.search_s for r in rows]
    gaps = _finite([r.gap for r in rows])
    print(
        f"search: median {statistics.median(searches):.3f} s, max {max(searches):.3f} s; "
        f"gap to exhaustive: max {max(gaps, default=math.nan) * 100:.2f} % over {len(gaps)} rows"
    )
    checks = _finite([r.check_s for r in rows])
    if checks:
        print(
            f"simulator checks (4 policy sets, re-searches included): median {statistics.median(checks):.1f} s, "
            f"max {max(checks):.1f} s"
        )
    checked = [r for r in rows if r.simulated_fits_memory is not None]
    bounded = [r for r in checked if math.isfinite(r.bound) and r.throughput > 0]
    over = [r for r in bounded if not (r.simulated_latency_s <= r.bound)]
    unfit = [r for r in checked if r.simulated_fits_memory is False]
    if checked:
        print(
            f"simulated: {len(bounded) - len(over)}/{len(bounded)} picks with a finite bound meet it"
            + (f" (max simulated/bound {max(r.simulated_latency_s / r.bound for r in over):.3f})" if over else "")
            + f"; {len(checked) - len(unfit)}/{len(checked)} fit in memory"
        )
    else:
        print("simulated: not run (--no-verify; the picks are the searches' own, unchecked)")
    below = [r for r in rows if r.throughput + 1e-9 < max(r.static_throughput, r.continuous_throughput)]
    print(f"throughput >= static and >= continuous: {len(rows) - len(below)}/{len(rows)} rows")
    for label in ("p10", "p30", "p70", "inf"):
        sel = [r for r in rows if r.bound_label == label]
        if not sel:
            continue
        vs_s = _geomean(_ratio(r.best_paper_policy_throughput, r.static_throughput) for r in sel)
        vs_c = _geomean(_ratio(r.best_paper_policy_throughput, r.continuous_throughput) for r in sel)
        below_c = sum(r.best_paper_policy_throughput + 1e-9 < r.continuous_throughput for r in sel)
        print(
            f"bound {label:<4}: best paper policy / static geomean {vs_s:.2f}x, / continuous geomean "
            f"{vs_c:.2f}x ({below_c} of {len(sel)} rows below continuous); product / continuous geomean "
            f"{_geomean(_ratio(r.throughput, r.continuous_throughput) for r in sel):.2f}x"
        )
    print_sustained(rows)


def print_sustained(rows: list[Row]) -> None:
    """``--sustained``: the best paper policy against continuous batching with requests arriving
    (Poisson) rather than at saturation."""
    sel = [r for r in rows if math.isfinite(r.paper_sustained) or math.isfinite(r.continuous_sustained)]
    if not sel:
        return
    print()
    print(
        "sustained req/s: the highest Poisson rate at which the checked pick keeps 99 % of requests within "
        "the bound in the simulator (two draws, each of at least 400 requests and 40 bounds of arrivals)"
    )
    print(
        f"{'model':<10} {'N':>2} {'task':<4} {'bound':<5} {'paper seq/s':>11} {'paper req/s':>11} "
        f"{'cont seq/s':>10} {'cont req/s':>10} {'paper/cont':>10}"
    )
    for r in sel:
        print(
            f"{r.model:<10} {r.devices:>2} {r.task:<4} {r.bound_label:<5} {r.best_paper_policy_throughput:11.2f} "
            f"{_fmt(r.paper_sustained, '11.2f')} {r.continuous_throughput:10.2f} "
            f"{_fmt(r.continuous_sustained, '10.2f')} "
            f"{_fmt(_ratio(r.paper_sustained, r.continuous_sustained), '10.2f')}"
        )
    for label in SUSTAINED_BOUNDS:
        ratios = [_ratio(r.paper_sustained, r.continuous_sustained) for r in sel if r.bound_label == label]
        if ratios:
            print(
                f"bound {label}: sustained best paper policy / continuous geomean {_geomean(ratios):.2f}x "
                f"({sum(x < 1 for x in ratios)} of {len(ratios)} rows below continuous)"
            )


def _scenario(profile, spec: str, task: str):
    from common.cli import CliError
    from optimizer.analytic import Scenario
    from optimizer.cluster import H200_CLUSTER
    from optimizer.lengths import TASKS
    from optimizer.model import model_by_name

    name, _, devices = spec.partition(":")
    devices = devices.partition(":")[0]
    if not devices.isdigit():
        raise CliError(f"scenario {spec!r}: expected MODEL:DEVICES, e.g. opt-13b:4")
    try:
        return Scenario(model_by_name(name), profile, H200_CLUSTER, TASKS[task], int(devices))
    except ValueError as exc:
        raise CliError(f"scenario {spec!r}: {exc}") from None


def print_case_study(profile) -> None:
    """The paper's case study (OPT-13B, task S, 4 GPUs, bounds 3.1 s and none)."""
    from optimizer.schedule import describe
    from optimizer.search import branch_and_bound

    sc = _scenario(profile, "opt-13b:4", "S")
    print("\ncase study (paper, A100: 3.1 s -> WAA B_E=4 TP=2 22.4 seq/s; inf -> RRA B_E=49 N_D=7 TP=4 26.2 seq/s)")
    for bound in (3.1, math.inf):
        for policies in (("rra",), ("waa-c", "waa-m")):
            r = branch_and_bound(sc, bound, policies)
            if r.best:
                f = r.best.figures
                print(
                    f"  bound {bound:g}: {describe(r.best.schedule):<70} {f.throughput_seq_s:7.1f} seq/s  "
                    f"latency {f.latency_p99_s:.2f} s"
                )


def run(args: argparse.Namespace) -> int:
    from common.cli import CliError
    from optimizer.io import load_profile

    if args.sustained and args.no_verify:
        raise CliError("--sustained rates the simulator-checked picks: drop --no-verify")
    try:
        profile = load_profile(args.profile)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.traffic:
        return traffic_timings(profile, Path(args.profile), max(args.repeats, 1))
    rows = []
    for spec in args.scenarios:
        parts = spec.split(":")
        tasks = [t for t in args.tasks if len(parts) < 3 or t in parts[2].split(",")]
        for task in tasks:
            sc = _scenario(profile, spec, task)
            for label, bound in static_bounds(sc):
                row = bench_row(sc, task, label, bound, not args.no_exhaustive, not args.no_verify, args.sustained)
                rows.append(row)
                print(
                    f"{row.model}:{row.devices} {task} {label}: {row.throughput:.2f} seq/s  {row.schedule}  "
                    f"(search {row.search_s:.2f} s, check {row.check_s:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                if args.json:
                    Path(args.json).write_text(json.dumps([r.as_json() for r in rows], indent=1))
    print_table(rows)
    print_summary(rows)
    print_case_study(profile)
    return 0


TRAFFIC_CASES = ((0.3, 1.0), (0.9, 1.0), (0.9, 3.0), (1.5, 1.0))  # forecast (x the top capacity, CV)


def traffic_timings(profile, path: Path, repeats: int, scale: float = 0.125) -> int:
    """Seconds ``plan_for_traffic`` takes per forecast, with the scenario's simulations sharing
    their step times (what the scheduler runs) and with every step time computed afresh (the
    same search otherwise: its pick is checked equal). On a profile ``exegpt profile`` measured
    (its cluster file beside it): its model on two workers, task T x ``scale``, batches up to 32
    (what ``bench adapt --phases`` plans); else OPT-13B on two H200s, task T x 0.1."""

    from optimizer.analytic import Scenario
    from optimizer.cluster import H200_CLUSTER
    from optimizer.lengths import scaled_task
    from optimizer.model import MODELS
    from optimizer.search import SearchSpace
    from optimizer.slo import Slo
    from optimizer.traffic import Forecast, candidates, plan_for_traffic

    class Forgetful(dict):
        def __setitem__(self, key, value) -> None:  # keeps nothing: every step time computed afresh
            pass

    class Unshared(Scenario):
        def memo(self, key) -> dict:
            return Forgetful()

    beside = path.with_name(f"{path.stem}-cluster.json")
    if beside.exists():
        from optimizer.io import load_cluster
        from services.bench.phases import mesh_space
        from services.scheduler.planning import model_shape

        name = profile.models()[0]
        base = Scenario(model_shape(name, 4), profile, load_cluster(beside), scaled_task("T", scale), 2)
        space, slo, what = mesh_space(32), Slo(ttft_s=1.0, tpot_s=0.16), f"{name} on 2 workers, task T x{scale:g}"
    else:
        base = Scenario(MODELS["opt-13b"], profile, H200_CLUSTER, scaled_task("T", 0.1), 2)
        space, slo, what = SearchSpace().capped(32), Slo(e2e_s=0.5), "OPT-13B on 2, task T x0.1"
    top = max(c for _, c in candidates(base, space=space)[0])
    print(
        f"plan_for_traffic, {what}, SLO {slo.describe()}; top capacity {top:.1f} requests/s; "
        f"{repeats} timings each, median [min-max]"
    )
    print(f"{'forecast':>22} {'shared':>22} {'afresh':>22} {'afresh / shared':>16}")
    for share, cv in TRAFFIC_CASES:
        fc = Forecast(share * top, cv)
        times: dict[str, list[float]] = {"shared": [], "afresh": []}
        picks = set()
        for _ in range(repeats):
            for name, cls in (("shared", Scenario), ("afresh", Unshared)):
                sc = cls(**{f: getattr(base, f) for f in base.__dataclass_fields__})
                start = time.perf_counter()
                plan = plan_for_traffic(sc, slo, fc, space=space)
                times[name].append(time.perf_counter() - start)
                picks.add(None if plan is None or plan.best is None else plan.best.schedule)
        if len(picks) != 1:
            raise RuntimeError(f"the two searches picked differently at {fc}")
        cells = [f"{statistics.median(t):.2f} [{min(t):.2f}-{max(t):.2f}] s" for t in times.values()]
        ratio = statistics.median(times["afresh"]) / statistics.median(times["shared"])
        label = f"{fc.rate_per_s:.1f}/s ({share:g}x), CV {cv:g}"
        print(f"{label:>22} {cells[0]:>22} {cells[1]:>22} {ratio:>15.2f}x")
    return 0
