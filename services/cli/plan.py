"""`exegpt plan`: search the schedule with the most throughput under a latency bound."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from typing import Any

from common.cli import CliError
from optimizer.schedule import describe
from services.scheduler.planning import POLICY_SETS, cluster_named, model_shape, profiled_dtype_bytes

MAX_WARNINGS = 10  # noise and range warnings printed; the rest are counted


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="pick the execution schedule for a model, devices, workload and bound")
    p.add_argument(
        "--profile",
        required=True,
        nargs="+",
        metavar="FILE",
        help="layer profile JSONL (split and/or whole-layer rows; several files merge)",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a paper model (opt-13b, gpt3-175b, t5-11b, ...) or one of ours (smollm2, tiny-llama, "
        "tiny-opt, tiny-t5, a folder or .gguf: shape read from the model); the profile needs its rows",
    )
    p.add_argument("--devices", required=True, type=int, help="number of devices (worker processes on a CPU machine)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", choices=("S", "T", "G", "C1", "C2"), help="the paper's synthetic task")
    src.add_argument("--lengths", metavar="FILE", help="CSV of timestamp,input,output or input,output")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="--task lengths (mean, std, maximum) times this, e.g. 0.25 on a CPU (default 1)",
    )
    p.add_argument("--max-input", type=int, default=0, help="clip --lengths inputs to this (0: no clip)")
    p.add_argument("--max-output", type=int, default=0, help="clip --lengths outputs to this (0: no clip)")
    p.add_argument(
        "--latency-bound",
        required=True,
        type=_bound,
        metavar="SECONDS",
        help="bound on generating a 99th-percentile-length output; 'inf' for none",
    )
    p.add_argument(
        "--policy",
        choices=sorted(POLICY_SETS),
        default="any",
        help="any (default): ExeGPT's policies, the two baselines and mixed steps (chunked prefill), "
        "so the plan is never one the model rates below static or continuous batching; all: "
        "ExeGPT's only (RRA, WAA-C, WAA-M)",
    )
    p.add_argument(
        "--cluster",
        default="h200-nvlink-ib",
        help="cluster preset (h200-nvlink-ib, "
        "a100-80g-nvlink-ib, a40-pcie) or a cluster JSON file (`exegpt profile --cluster-out`)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        metavar="N",
        help="largest batch (B_E, B_D) a worker may run, e.g. what the profile measured "
        "(default: the search space's own limits)",
    )
    p.add_argument("--exhaustive", action="store_true", help="search every schedule (the reference)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="simulate the pick under saturated load with p99-length probes and, while it overruns "
        "the bound there, search again with a tighter bound (for a plan that will run)",
    )
    load = p.add_mutually_exclusive_group()
    load.add_argument(
        "--rate",
        type=_positive,
        metavar="REQ_PER_S",
        help="plan for requests arriving at this rate: the schedule with the most throughput that keeps "
        ">= 99%% of them within the bound, checked in the simulator with these arrivals",
    )
    load.add_argument(
        "--trace", metavar="FILE", help="as --rate, with the arrivals (and lengths) of a timestamp,input,output trace"
    )
    p.add_argument(
        "--burstiness",
        type=_positive,
        default=1.0,
        metavar="CV",
        help="with --rate: coefficient of variation of the gaps between arrivals (1: Poisson, default)",
    )
    p.add_argument(
        "--requests",
        type=int,
        default=600,
        metavar="N",
        help="with --rate or --trace: requests simulated (default 600; a trace's first N)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _bound(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"latency bound must be > 0 seconds, got {text!r}")
    return value


def _scenario(args):
    from optimizer.analytic import Scenario
    from optimizer.io import load_profile, load_workload
    from optimizer.lengths import scaled_task

    if args.devices < 1:
        raise CliError(f"--devices must be >= 1, got {args.devices}")
    try:
        cluster = cluster_named(args.cluster)
        if cluster.device_count and args.devices > cluster.device_count:
            raise CliError(
                f"cluster {cluster.name!r} ({args.cluster}) has {cluster.device_count} devices, "
                f"--devices asks for {args.devices}"
            )
        profile = load_profile(*args.profile)
        _check_profiled(args, profile)
        model = model_shape(args.model, profiled_dtype_bytes(profile))
        workload = (
            scaled_task(args.task, args.scale)
            if args.task
            else load_workload(args.lengths, args.max_input, args.max_output)
        )
        sc = Scenario(model, profile, cluster, workload, args.devices)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    _warn(profile.warnings)
    _check_range(args, sc)
    return sc


def _check_profiled(args, profile) -> None:
    """Refuse a model the profile has no rows for, naming the models it has rows for (the only
    ones this profile can plan)."""
    models = profile.models()
    if args.model in models:
        return
    files = ", ".join(args.profile)
    has = f"it has rows for {', '.join(models)}" if models else "it has no model rows"
    raise CliError(
        f"the profile ({files}) has no rows for model {args.model!r}; {has} (`exegpt profile "
        f"--model M --out FILE` times one of our models on this machine)"
    )


def _warn(lines) -> None:
    for line in lines[:MAX_WARNINGS]:
        print(f"exegpt plan: warning: {line}", file=sys.stderr)
    if len(lines) > MAX_WARNINGS:
        print(f"exegpt plan: warning: ... and {len(lines) - MAX_WARNINGS} more", file=sys.stderr)


def _check_range(args, sc) -> None:
    """Refuse a workload whose 99th-percentile prompt or context (prompt + output) lies far beyond
    the longest one profiled; warn when it lies a little beyond."""
    from optimizer.profile import FAR_EXTRAPOLATION, range_gaps

    q_in, q_out = sc.workload.input.quantile(0.99), sc.workload.output.quantile(0.99)
    gaps = range_gaps(sc.profile.coverage(sc.model.name, 1), q_in, q_in + q_out)
    workload = f"task {args.task}" if args.task else str(args.lengths)
    for gap in gaps:
        what = (
            f"{workload}'s 99th-percentile {gap.axis} is {gap.needed:g} tokens, the profile of {sc.model.name} "
            f"reaches {gap.profiled:g}"
        )
        if gap.far:
            clip = "" if args.task else " (or clip the workload with --max-input/--max-output)"
            raise CliError(
                f"{what} (more than {FAR_EXTRAPOLATION:g}x is not extrapolated): profile longer "
                f"lengths with `exegpt profile --max-len {math.ceil(gap.needed)}`{clip}"
            )
        _warn([f"{what}; extrapolating"])


def batch_warnings(sc, schedule) -> list[str]:
    """Warnings for a plan whose step batch or step tokens lie far beyond what the profile measured
    at the schedule's TP degree (extrapolated linearly)."""
    from optimizer.profile import FAR_EXTRAPOLATION, batch_gaps
    from optimizer.simulator import worker_layouts

    s = schedule
    batch = math.ceil(s.decode_batch / s.decode_microbatches)
    tokens = s.encode_batch * max(s.mean_input_len, 1.0)
    out = []
    for tp in sorted({stage.tp for layout in worker_layouts(sc, s) for stage in layout.stages}):
        for gap in batch_gaps(sc.profile.coverage(sc.model.name, tp), batch, tokens):
            fix = (
                f"profile larger batches, or cap the plan with --max-batch {math.floor(gap.profiled)}"
                if gap.axis == "decode batch"
                else "profile more tokens per step"
            )
            out.append(
                f"the plan runs {gap.needed:.0f} {'sequences' if gap.axis == 'decode batch' else 'tokens'} "
                f"in a step, "
                f"more than {FAR_EXTRAPOLATION:g}x the largest {gap.axis} the profile of {sc.model.name} "
                f"tp={tp} measured ({gap.profiled:g}); its times there are extrapolated ({fix})"
            )
    return out


def run(args: argparse.Namespace) -> int:
    from optimizer.search import SearchSpace, branch_and_bound, exhaustive
    from optimizer.verify import verified_search

    sc = _scenario(args)
    if args.max_batch is not None and args.max_batch < 1:
        raise CliError(f"--max-batch must be >= 1, got {args.max_batch}")
    space = SearchSpace() if args.max_batch is None else SearchSpace().capped(args.max_batch)
    if getattr(args, "rate", None) or getattr(args, "trace", None):
        return _run_queueing(args, sc, space)
    search = exhaustive if args.exhaustive else branch_and_bound
    start = time.perf_counter()
    verified = None
    if args.verify:
        verified = verified_search(sc, args.latency_bound, POLICY_SETS[args.policy], space, search=search)
        result = replace(verified.last, best=verified.best, evaluations=verified.evaluations)
    else:
        result = search(sc, args.latency_bound, POLICY_SETS[args.policy], space)
    elapsed = time.perf_counter() - start
    if result.best is None:
        simulated = f" when simulated (searched down to a {verified.searched_bound_s:.3g} s bound)" if verified else ""
        raise CliError(
            f"no schedule (policy {args.policy}) of {args.model} on {args.devices} devices "
            f"meets the {args.latency_bound:g} s latency bound{simulated} and fits in memory"
        )
    _warn(batch_warnings(sc, result.best.schedule))
    if result.best.schedule.split and sc.cluster.handoff_note:
        _warn([sc.cluster.handoff_note])
    method = "exhaustive" if args.exhaustive else "branch-and-bound"
    print(
        json.dumps(_as_json(result, elapsed, method, args.latency_bound, verified), indent=2)
        if args.json
        else _as_text(result, elapsed, method, args.latency_bound, verified)
    )
    return 0


def _as_json(result, elapsed: float, method: str, bound: float, verified=None) -> dict:
    search: dict[str, Any] = {
        "method": method,
        "seconds": elapsed,
        "evaluations": result.evaluations,
        "families": result.families,
        "families_pruned": result.families_pruned,
    }
    out: dict[str, Any] = {
        "schedule": asdict(result.best.schedule),
        "predicted": asdict(result.best.figures),
        "latency_bound_s": None if math.isinf(bound) else bound,
        "search": search,
    }
    if verified is not None:
        out["simulated"] = {
            "throughput_seq_s": verified.simulated.throughput_seq_s,
            "p99_length_latency_s": verified.simulated.p99_length_latency_s,
        }
        search |= {"searches": verified.searches, "searched_bound_s": _finite(verified.searched_bound_s)}
    return out


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value


def _bound_text(bound: float) -> str:
    return "no bound" if math.isinf(bound) else f"bound {bound:g} s"


def _as_text(result, elapsed: float, method: str, bound: float, verified=None) -> str:
    f = result.best.figures
    lines = []
    if verified is not None:
        sim = verified.simulated
        tightened = (
            ""
            if verified.searches == 1
            else f"; {verified.searches} searches, the last under a {verified.searched_bound_s:.3g} s bound"
        )
        lines.append(
            f"simulated: {sim.throughput_seq_s:.1f} seq/s  "
            f"p99-length latency {sim.p99_length_latency_s:.3f} s "
            f"(saturated closed loop, p99-length probes{tightened})"
        )
    return "\n".join(
        [
            f"schedule:  {describe(result.best.schedule)}",
            f"predicted: {f.throughput_seq_s:.1f} seq/s  {f.throughput_tok_s:.0f} tok/s  "
            f"p99-length latency {f.latency_p99_s:.3f} s ({_bound_text(bound)})  TTFT {f.ttft_s * 1e3:.1f} ms  "
            f"TPOT {f.tpot_s * 1e3:.1f} ms  decode batch {f.decode_batch:.1f}  "
            f"memory {f.memory_per_device_bytes / 1e9:.1f} GB/device",
            *lines,
            f"search:    {method}, {result.evaluations} schedules evaluated, "
            f"{result.families_pruned}/{result.families} families pruned, {elapsed:.3f} s",
        ]
    )


def _run_queueing(args, sc, space) -> int:
    """``--rate`` / ``--trace``: the schedule with the most throughput that keeps >= 99 % of the
    requests within the bound at that arrival process, checked in the simulator."""
    import numpy as np

    from optimizer.queueing import (
        TARGET,
        QueueingPlan,
        arrival_times,
        candidates,
        check,
        offered_rate,
        requests_at,
        requests_from_trace,
    )
    from optimizer.search import branch_and_bound, exhaustive

    if args.requests < 10:
        raise CliError(f"--requests must be >= 10, got {args.requests}")
    policies = POLICY_SETS[args.policy]
    if args.trace:
        from optimizer.io import load_trace

        try:
            requests = requests_from_trace(load_trace(args.trace), args.requests, args.max_input, args.max_output)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        arrivals = f"trace {args.trace} ({len(requests)} requests)"
    else:
        times = arrival_times(np.random.default_rng(0), args.requests, args.rate, args.burstiness)
        requests = requests_at(sc.workload, times)
        arrivals = f"{args.rate:g} req/s, burstiness (CV) {args.burstiness:g}, {len(requests)} requests"
    search = exhaustive if args.exhaustive else branch_and_bound
    rate = offered_rate(requests)
    start = time.perf_counter()
    ranked, searches, evaluations = candidates(sc, args.latency_bound, rate, policies, space, search=search)
    search_s = time.perf_counter() - start
    best, share, sim, checked = check(sc, args.latency_bound, requests, ranked)
    check_s = time.perf_counter() - start - search_s
    plan = QueueingPlan(best, share, sim, rate, len(ranked), checked, searches, evaluations)
    elapsed = search_s + check_s
    if plan.best is None:
        last = "" if math.isnan(plan.share_within) else f" (last: {plan.share_within:.1%} within)"
        raise CliError(
            f"no schedule (policy {args.policy}) keeps {TARGET:.0%} of requests within the "
            f"{args.latency_bound:g} s bound at {arrivals}: {plan.candidates} candidates with enough "
            f"capacity, {plan.checked} simulated{last}"
        )
    _warn(batch_warnings(sc, plan.best.schedule))
    f, sim = plan.best.figures, plan.simulated
    assert sim is not None  # the pick was simulated
    doc = {
        "schedule": asdict(plan.best.schedule),
        "predicted": asdict(f),
        "latency_bound_s": None if math.isinf(args.latency_bound) else args.latency_bound,
        "arrivals": {
            "rate_per_s": plan.rate_per_s,
            "requests": len(requests),
            "burstiness_cv": None if args.trace else args.burstiness,
            "trace": args.trace,
        },
        "simulated": {
            "share_within_bound": plan.share_within,
            "throughput_seq_s": sim.throughput_seq_s,
            "e2e_s": sim.e2e_s,
            "fits_memory": sim.fits_memory,
        },
        "search": {
            "seconds": elapsed - check_s,
            "searches": plan.searches,
            "evaluations": plan.evaluations,
            "candidates": plan.candidates,
        },
        "check": {"seconds": check_s, "simulated_candidates": plan.checked},
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(
        "\n".join(
            [
                f"schedule:  {describe(plan.best.schedule)}",
                f"predicted: {f.throughput_seq_s:.1f} seq/s capacity  p99-length latency {f.latency_p99_s:.3f} s "
                f"(saturated; {_bound_text(args.latency_bound)})",
                f"simulated: {plan.share_within:.1%} of requests within the bound at {arrivals} "
                f"(e2e p50 {sim.e2e_s['p50']:.3f} s, p99 {sim.e2e_s['p99']:.3f} s); {sim.throughput_seq_s:.1f} seq/s",
                f"search:    {plan.searches} searches, {plan.evaluations} schedules evaluated, "
                f"{plan.candidates} candidates with enough capacity, {elapsed - check_s:.3f} s",
                f"check:     {plan.checked} candidate(s) simulated with these arrivals, {check_s:.3f} s",
            ]
        )
    )
    return 0
