"""`exegpt profile`: time one layer of the engine here and write profile JSONL for the optimizer."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="time one layer of a model (attention and the rest) to JSONL")
    p.add_argument("--model", default="smollm2", help="smollm2, tiny-llama, tiny-opt or a decoder-only folder")
    p.add_argument("--out", required=True, type=Path, help="split rows (rest / attn_prefill / attn_decode)")
    p.add_argument("--layers-out", type=Path, default=None,
                   help="whole-layer rows (default: OUT with -layers before the suffix)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per cell; the median counts")
    p.add_argument("--quick", action="store_true", help="a three-cell grid, for a smoke test")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine import load_engine
    from engine.profiler import QUICK_GRID, Grid, header, profile_rows, write_jsonl
    from services.cli import CliError

    try:
        engine = load_engine(args.model, device=args.device, dtype=args.dtype, num_threads=args.threads)
        grid = QUICK_GRID if args.quick else Grid()
        split, layers = profile_rows(engine, args.model, grid, repeats=args.repeats)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    layers_out = args.layers_out or args.out.with_name(f"{args.out.stem}-layers{args.out.suffix or '.jsonl'}")
    head = header(engine)
    write_jsonl(args.out, {**head, "kind": "split: attention-only and rest-of-layer"}, split)
    write_jsonl(layers_out, head, layers)
    print(f"wrote {len(split)} split rows to {args.out} and {len(layers)} layer rows to {layers_out}")
    return 0
