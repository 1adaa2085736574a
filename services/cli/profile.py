"""`exegpt profile`: time one layer of the engine here, and describe this machine's devices and
links, in the files `exegpt plan` reads (profile JSONL and cluster JSON)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Not measured by default: what the plan assumes for these paths unless told otherwise.
LOOPBACK = ("loopback", 1e9, 1e-4, "default, not measured: torch.distributed (gloo) between worker processes "
            "on this machine, conservative")
HANDOFF = ("redis+rabbitmq", 100e6, 2e-3, "default, not measured (give --amqp-url and --redis-url to measure): "
           "a Redis payload write + read and one RabbitMQ hop on loopback, conservative")
MAX_WARNINGS = 10  # noise warnings printed; the rest are counted


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="time one layer of a model (attention and the rest) and describe this machine")
    p.add_argument("--model", default="smollm2", help="smollm2, tiny-llama, tiny-opt, tiny-t5, a model folder or .gguf")
    p.add_argument("--out", required=True, type=Path, help="split rows (rest / attn_prefill / attn_decode)")
    p.add_argument("--layers-out", type=Path, default=None,
                   help="whole-layer rows (default: OUT with -layers before the suffix)")
    p.add_argument("--cluster-out", type=Path, default=None,
                   help="this machine as a cluster JSON for `exegpt plan --cluster` (default: OUT with -cluster.json)")
    p.add_argument("--max-batch", type=_positive, default=64, help="largest batch profiled (default 64)")
    p.add_argument("--max-len", type=_positive, default=1024,
                   help="longest prompt and decode context profiled (default 1024, capped by the model's context)")
    p.add_argument("--max-tokens", type=_positive, default=4096,
                   help="tokens per cell for whole-layer and rest-of-layer cells; attention cells go 16x further "
                        "(default 4096)")
    p.add_argument("--repeats", type=_positive, default=10,
                   help="timed calls per cell, fewer once a cell has taken 0.5 s; the median counts")
    p.add_argument("--quick", action="store_true", help="two points per axis, for a smoke test (seconds)")
    p.add_argument("--devices", type=_positive, default=2, help="worker processes this machine runs (default 2)")
    p.add_argument("--device-memory", type=float, default=None, metavar="BYTES",
                   help="memory budget of one worker process (default: RAM / --devices)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch threads per worker, used while profiling (default: CPU cores / --devices)")
    p.add_argument("--amqp-url", default=None, help="measure the KV hand-off path through this RabbitMQ ...")
    p.add_argument("--redis-url", default=None, help="... and this Redis (both or neither)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=run)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _sibling(out: Path, suffix: str) -> Path:
    return out.with_name(f"{out.stem}{suffix}")


def run(args: argparse.Namespace) -> int:
    from services.cli import CliError

    if (args.amqp_url is None) != (args.redis_url is None):
        raise CliError("give both --amqp-url and --redis-url to measure the hand-off path, or neither")
    if args.device_memory is not None and not args.device_memory > 0:
        raise CliError(f"--device-memory must be > 0 bytes, got {args.device_memory!r}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.devices)
    start = time.perf_counter()
    try:
        engine, split, layers, warnings = _profile(args, threads)
        cluster = _cluster(args, threads, engine.device)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    _write(args, engine, split, layers, cluster)
    _warn(warnings)
    print(f"profiled {args.model} ({len(split)} split and {len(layers)} layer rows, {threads} thread(s)) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def _profile(args: argparse.Namespace, threads: int):
    """(engine, split rows, layer rows, noise warnings): measured, then smoothed by the noise rule."""
    from engine import load_engine
    from engine.profiler import build_grid, profile_rows, quick_grid
    from optimizer.profile import smooth_rows

    engine = load_engine(args.model, device=args.device, dtype=args.dtype, num_threads=threads)
    max_len = min(args.max_len, engine.max_context - 1)  # a decode step needs one position beyond its context
    if max_len < args.max_len:
        print(f"exegpt profile: note: --max-len {args.max_len} capped at {max_len} ({args.model}'s context is "
              f"{engine.max_context})", file=sys.stderr)
    grid = quick_grid(max_len) if args.quick else build_grid(args.max_batch, max_len, args.max_tokens)
    split, layers = profile_rows(engine, args.model, grid, repeats=args.repeats)
    split_s, layers_s = smooth_rows(split), smooth_rows(layers)
    return engine, split_s.rows, layers_s.rows, split_s.warnings + layers_s.warnings


def _cluster(args: argparse.Namespace, threads: int, device: str):
    from optimizer.cluster import Cluster, Link

    loopback = Link(*LOOPBACK)
    handoff = _measured_handoff(args) if args.amqp_url else Link(*HANDOFF)
    memory = args.device_memory or _device_memory(device) / (1 if device.startswith("cuda") else args.devices)
    name = f"{'cuda' if device.startswith('cuda') else 'cpu'}-{args.devices}x{threads}t"
    notes = (f"written by exegpt profile: {args.devices} worker process(es) on this machine, {threads} torch "
             f"thread(s) each, memory {'as given' if args.device_memory else 'RAM / devices'}")
    return Cluster(name, memory, args.devices, loopback, loopback, handoff=handoff,
                   device_threads=0 if device.startswith("cuda") else threads, device_count=args.devices, notes=notes)


def _device_memory(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _measured_handoff(args: argparse.Namespace):
    import asyncio

    from common.transport.probe import measure_handoff
    from optimizer.cluster import Link
    from services.cli import CliError

    try:
        probe = asyncio.run(measure_handoff(args.amqp_url, args.redis_url))
    except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
        raise CliError(f"cannot measure the hand-off path ({args.amqp_url}, {args.redis_url}): {exc}") from exc
    return Link("redis+rabbitmq", probe.bandwidth_Bps, probe.latency_s, probe.describe())


def _write(args: argparse.Namespace, engine, split: list[dict], layers: list[dict], cluster) -> None:
    from engine.profiler import header, write_jsonl
    from optimizer.cluster import cluster_to_dict

    layers_out = args.layers_out or _sibling(args.out, f"-layers{args.out.suffix or '.jsonl'}")
    cluster_out = args.cluster_out or _sibling(args.out, "-cluster.json")
    head = header(engine)
    write_jsonl(args.out, {**head, "kind": "split: attention-only and rest-of-layer"}, split)
    write_jsonl(layers_out, head, layers)
    cluster_out.parent.mkdir(parents=True, exist_ok=True)
    cluster_out.write_text(json.dumps(cluster_to_dict(cluster), indent=2) + "\n")
    print(f"wrote {len(split)} split rows to {args.out}, {len(layers)} layer rows to {layers_out}, "
          f"cluster {cluster.name!r} to {cluster_out}")


def _warn(warnings: tuple[str, ...]) -> None:
    for line in warnings[:MAX_WARNINGS]:
        print(f"exegpt profile: warning: {line}", file=sys.stderr)
    if len(warnings) > MAX_WARNINGS:
        print(f"exegpt profile: warning: ... and {len(warnings) - MAX_WARNINGS} more rows below an earlier one",
              file=sys.stderr)
