"""`exegpt bench parallel`: a model over a process group (TP, PP) against one process, same run.

Each configuration serves the same requests: ``--batch-sizes`` prompts of ``--prompt-len`` tokens
prefilled in one step, then ``--new-tokens`` decode steps of the whole batch (greedy, EOS ignored),
after one untimed prefill and decode step of the same batch (a fresh process's first calls cost
more).
Prefill and decode tokens/s are the best of ``--repeats`` runs; configurations take turns within
each repeat, so a noisy neighbour hits them alike. The baselines are one process with one torch
thread (the group's processes have one each) and one process with as many threads as the group
has processes (the same cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

CONFIGS = {  # name -> (tp, pp, decode micro-batches per step)
    "tp2": ("2", 1, 1),
    "pp2": ("1", 2, 1),
    "pp2-m2": ("1", 2, 2),
    "pp2-m4": ("1", 2, 4),
    "tp2,1+pp2": ("2,1", 2, 1),
}


def shape_of(name: str):
    from engine.parallel import GroupShape

    tp, pp, micro = CONFIGS[name]
    return replace(GroupShape.parse(tp, pp), microbatches=micro)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2")
    p.add_argument("--configs", default="tp2,pp2", help=f"comma-separated, of {', '.join(CONFIGS)} (default tp2,pp2)")
    p.add_argument("--batch-sizes", default="1,8", help="requests decoded together (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)


def run(args: argparse.Namespace) -> int:
    import torch

    from engine import load_engine
    from engine.api import GenerationRequest, SamplingParams
    from engine.parallel.group import load_group_engine

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"exegpt bench parallel: unknown config {unknown[0]!r} (known: {', '.join(CONFIGS)})", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batch_sizes.split(",")]
    engines: dict[str, int | str] = {"1 process, 1 thread": 1}  # one process's threads, or a group's config
    widest = max(shape_of(n).world for n in names) if names else 1
    if widest > 1:
        engines[f"1 process, {widest} threads"] = widest
    for n in names:
        engines[n] = n
    one = load_engine(args.model, device="cpu")
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for _ in range(args.repeats):  # a process holds one group at a time: each repeat starts them again
        for label, what in engines.items():
            if isinstance(what, str):
                engine = load_group_engine(args.model, shape_of(what), device="cpu", num_threads=1)
            else:
                engine = one
            torch.set_num_threads(what if isinstance(what, int) else 1)
            try:
                for b in batches:
                    prompts = [
                        GenerationRequest(
                            f"r{i}", tuple((7 * i + j) % 200 + 10 for j in range(args.prompt_len)), params
                        )
                        for i in range(b)
                    ]
                    engine.prefill(prompts)  # warm-up: first calls of a fresh process cost more
                    engine.decode_step()
                    for r in prompts:
                        engine.abort(r.request_id)
                    t0 = time.perf_counter()
                    engine.prefill(prompts)
                    t1 = time.perf_counter()
                    steps = 0
                    while engine.running():
                        engine.decode_step()
                        steps += 1
                    t2 = time.perf_counter()
                    pre, dec = b * args.prompt_len / (t1 - t0), b * steps / (t2 - t1)
                    old = best.get((label, b), (0.0, 0.0))
                    best[(label, b)] = (max(old[0], pre), max(old[1], dec))
            finally:
                if isinstance(what, str):
                    engine.runner.close()
    base = "1 process, 1 thread"
    print(
        f"{args.model}: prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, best of {args.repeats}; "
        f"ratios against {base}"
    )
    print(f"{'configuration':<22} {'batch':>5} {'prefill tok/s':>14} {'ratio':>6} {'decode tok/s':>13} {'ratio':>6}")
    for b in batches:
        p0, d0 = best[(base, b)]
        for label in engines:
            p, d = best[(label, b)]
            print(f"{label:<22} {b:>5} {p:>14.1f} {p / p0:>6.2f} {d:>13.1f} {d / d0:>6.2f}")
    return 0
