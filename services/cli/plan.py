"""`exegpt plan`: search the schedule with the most throughput under a latency bound."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict

from services.cli import CliError

POLICY_SETS = {"rra": ("rra",), "waa": ("waa-c", "waa-m"), "all": ("rra", "waa-c", "waa-m"),
               "static": ("static",), "continuous": ("continuous",)}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="pick the execution schedule for a model, devices, workload and bound")
    p.add_argument("--profile", required=True, nargs="+", metavar="FILE",
                   help="layer profile JSONL (split and/or whole-layer rows; several files merge)")
    p.add_argument("--model", required=True, help="model name, e.g. opt-13b (must be in the profile)")
    p.add_argument("--devices", required=True, type=int, help="number of devices")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", choices=("S", "T", "G", "C1", "C2"), help="the paper's synthetic task")
    src.add_argument("--lengths", metavar="FILE", help="CSV of timestamp,input,output or input,output")
    p.add_argument("--max-input", type=int, default=0, help="clip --lengths inputs to this (0: no clip)")
    p.add_argument("--max-output", type=int, default=0, help="clip --lengths outputs to this (0: no clip)")
    p.add_argument("--latency-bound", required=True, type=_bound, metavar="SECONDS",
                   help="bound on generating a 99th-percentile-length output; 'inf' for none")
    p.add_argument("--policy", choices=sorted(POLICY_SETS), default="all")
    p.add_argument("--cluster", default="h200-nvlink-ib", help="cluster preset (h200-nvlink-ib, "
                   "a100-80g-nvlink-ib, a40-pcie)")
    p.add_argument("--exhaustive", action="store_true", help="search every schedule (the reference)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


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
    from optimizer.cluster import CLUSTERS
    from optimizer.io import load_profile, load_workload
    from optimizer.lengths import TASKS
    from optimizer.model import model_by_name

    if args.devices < 1:
        raise CliError(f"--devices must be >= 1, got {args.devices}")
    if args.cluster not in CLUSTERS:
        raise CliError(f"unknown cluster {args.cluster!r}; known: {', '.join(sorted(CLUSTERS))}")
    try:
        model = model_by_name(args.model)
        profile = load_profile(*args.profile)
        workload = TASKS[args.task] if args.task else load_workload(args.lengths, args.max_input, args.max_output)
        return Scenario(model, profile, CLUSTERS[args.cluster], workload, args.devices)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from optimizer.search import branch_and_bound, exhaustive

    sc = _scenario(args)
    search = exhaustive if args.exhaustive else branch_and_bound
    start = time.perf_counter()
    result = search(sc, args.latency_bound, POLICY_SETS[args.policy])
    elapsed = time.perf_counter() - start
    if result.best is None:
        raise CliError(f"no schedule (policy {args.policy}) of {args.model} on {args.devices} devices "
                       f"meets the {args.latency_bound:g} s latency bound and fits in memory")
    method = "exhaustive" if args.exhaustive else "branch-and-bound"
    print(json.dumps(_as_json(result, elapsed, method, args.latency_bound), indent=2) if args.json
          else _as_text(result, elapsed, method, args.latency_bound))
    return 0


def _as_json(result, elapsed: float, method: str, bound: float) -> dict:
    return {"schedule": asdict(result.best.schedule), "predicted": asdict(result.best.figures),
            "latency_bound_s": None if math.isinf(bound) else bound,
            "search": {"method": method, "seconds": elapsed, "evaluations": result.evaluations,
                       "families": result.families, "families_pruned": result.families_pruned}}


def describe(schedule) -> str:
    s = schedule
    parts = [s.policy, f"B_E={s.encode_batch}", f"B_D={s.decode_batch}", f"micro-batches={s.decode_microbatches}"]
    if s.policy == "rra":
        parts.append(f"N_D={s.decode_iters_per_encode}")
    if s.policy.startswith("waa"):
        parts.append(f"TP={s.tp_degree} encoders/decoders={s.encoder_devices}/{s.decoder_devices}")
    elif s.tp_degree > 1:
        parts.append(f"TP={s.tp_degree} on {s.tp_stages} stage(s)")
    else:
        parts.append("TP=1")
    return "  ".join(parts)


def _bound_text(bound: float) -> str:
    return "no bound" if math.isinf(bound) else f"bound {bound:g} s"


def _as_text(result, elapsed: float, method: str, bound: float) -> str:
    f = result.best.figures
    return "\n".join([
        f"schedule:  {describe(result.best.schedule)}",
        f"predicted: {f.throughput_seq_s:.1f} seq/s  {f.throughput_tok_s:.0f} tok/s  "
        f"p99-length latency {f.latency_p99_s:.3f} s ({_bound_text(bound)})  TTFT {f.ttft_s * 1e3:.1f} ms  "
        f"TPOT {f.tpot_s * 1e3:.1f} ms  decode batch {f.decode_batch:.1f}  "
        f"memory {f.memory_per_device_bytes / 1e9:.1f} GB/device",
        f"search:    {method}, {result.evaluations} schedules evaluated, "
        f"{result.families_pruned}/{result.families} families pruned, {elapsed:.3f} s",
    ])
