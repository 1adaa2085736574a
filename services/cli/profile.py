"""`exegpt profile`: time one layer of the engine here, and describe this machine's devices and
links, in the files `exegpt plan` reads (profile JSONL and cluster JSON)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common.config import MeshConfig

# What the plan assumes for these paths when they are not measured.
LOOPBACK = (
    "loopback",
    1e9,
    1e-4,
    "default, not measured: torch.distributed (gloo) between worker processes on this machine, conservative",
)
HANDOFF = (
    "redis+rabbitmq",
    100e6,
    2e-3,
    "default, not measured (give --amqp-url and --redis-url to measure): "
    "a Redis payload write + read and one RabbitMQ hop on loopback, conservative",
)
MAX_WARNINGS = 10  # noise warnings printed; the rest are counted


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="time one layer of a model (attention and the rest) and describe this machine")
    p.add_argument("--model", default="smollm2", help="smollm2, tiny-llama, tiny-opt, tiny-t5, a model folder or .gguf")
    p.add_argument("--out", required=True, type=Path, help="split rows (rest / attn_prefill / attn_decode)")
    p.add_argument(
        "--layers-out", type=Path, default=None, help="whole-layer rows (default: OUT with -layers before the suffix)"
    )
    p.add_argument(
        "--cluster-out",
        type=Path,
        default=None,
        help="this machine as a cluster JSON for `exegpt plan --cluster` (default: OUT with -cluster.json)",
    )
    p.add_argument("--max-batch", type=_positive, default=64, help="largest batch profiled (default 64)")
    p.add_argument(
        "--max-len",
        type=_positive,
        default=1024,
        help="longest prompt and decode context profiled (default 1024, capped by the model's context)",
    )
    p.add_argument(
        "--max-tokens",
        type=_positive,
        default=4096,
        help="tokens per cell for whole-layer and rest-of-layer cells; attention cells go 16x further (default 4096)",
    )
    p.add_argument(
        "--repeats",
        type=_positive,
        default=10,
        help="timed calls per cell, fewer once a cell has taken 0.5 s; the median counts",
    )
    p.add_argument("--quick", action="store_true", help="two points per axis, for a smoke test (seconds)")
    p.add_argument(
        "--tp-degrees",
        type=_degrees,
        default=(1,),
        metavar="1,2",
        help="tensor-parallel degrees to profile (default 1; 1 is always included): rows at tp=k "
        "are one rank's share of a layer, collectives excluded",
    )
    links = p.add_mutually_exclusive_group()
    links.add_argument(
        "--measure-links",
        action="store_true",
        help="measure all-reduce and send/recv between worker processes (default: unless --quick, "
        "or when --tp-degrees names a degree above 1)",
    )
    links.add_argument(
        "--no-collectives", action="store_true", help="do not measure them; write the documented default link"
    )
    p.add_argument("--devices", type=_positive, default=2, help="worker processes this machine runs (default 2)")
    p.add_argument(
        "--device-memory",
        type=float,
        default=None,
        metavar="BYTES",
        help="memory budget of one worker process (default: RAM / --devices)",
    )
    p.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch threads per worker, used while profiling (default: CPU cores / --devices)",
    )
    p.add_argument("--amqp-url", default=None, help="measure the KV hand-off path through this RabbitMQ ...")
    p.add_argument("--redis-url", default=None, help="... and this Redis (both or neither)")
    p.add_argument(
        "--kv-transport",
        choices=("nixl", "redis"),
        default=MeshConfig.model_fields["kv_transport"].default,
        help="the hand-off path to measure, as the mesh's kv_transport: nixl (two worker processes, "
        "a NIXL read) or redis (the payload through Redis); default: the mesh's default",
    )
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


def _degrees(text: str) -> tuple[int, ...]:
    try:
        degrees = {int(t) for t in text.split(",") if t.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if any(k < 1 for k in degrees):
        raise argparse.ArgumentTypeError(f"degrees must be >= 1, got {text!r}")
    return tuple(sorted(degrees | {1}))


def _measures_links(args: argparse.Namespace) -> bool:
    """Measured unless told not to: a full profile (minutes) pays a few seconds for it, a quick one
    only when asked or when it profiles TP degrees (whose all-reduces the link prices)."""
    if args.no_collectives:
        return False
    return args.measure_links or not args.quick or max(args.tp_degrees) > 1


def _sibling(out: Path, suffix: str) -> Path:
    return out.with_name(f"{out.stem}{suffix}")


def run(args: argparse.Namespace) -> int:
    from common.cli import CliError

    if (args.amqp_url is None) != (args.redis_url is None):
        raise CliError("give both --amqp-url and --redis-url to measure the hand-off path, or neither")
    if args.device_memory is not None and not args.device_memory > 0:
        raise CliError(f"--device-memory must be > 0 bytes, got {args.device_memory!r}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.devices)
    start = time.perf_counter()
    try:
        engine, split, layers, warnings = _profile(args, threads)
        collectives = _measured_collectives(engine.device) if _measures_links(args) else None
        cluster = _cluster(args, threads, engine.device, collectives)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    _write(args, engine, split, layers, cluster)
    if collectives is not None:
        _print_collectives(collectives, cluster.intra_node)
    _warn(warnings)
    tp = ",".join(map(str, args.tp_degrees))
    print(
        f"profiled {args.model} ({len(split)} split and {len(layers)} layer rows, tp {tp}, {threads} thread(s)) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _profile(args: argparse.Namespace, threads: int):
    """(engine, split rows, layer rows, noise warnings): measured, then smoothed by the noise rule."""
    from engine import load_engine
    from engine.profiler import build_grid, profile_rows, quick_grid
    from optimizer.profile import smooth_rows

    engine = load_engine(args.model, device=args.device, dtype=args.dtype, num_threads=threads)
    max_len = min(args.max_len, engine.max_context - 1)  # a decode step needs one position beyond its context
    if max_len < args.max_len:
        print(
            f"exegpt profile: note: --max-len {args.max_len} capped at {max_len} ({args.model}'s context is "
            f"{engine.max_context})",
            file=sys.stderr,
        )
    grid = quick_grid(max_len) if args.quick else build_grid(args.max_batch, max_len, args.max_tokens)
    split, layers = profile_rows(engine, args.model, grid, repeats=args.repeats, tp_degrees=args.tp_degrees)
    split_s, layers_s = smooth_rows(split), smooth_rows(layers)
    return engine, split_s.rows, layers_s.rows, split_s.warnings + layers_s.warnings


def _cluster(args: argparse.Namespace, threads: int, device: str, collectives=None):
    from optimizer.cluster import Cluster, Link

    loopback = Link(*LOOPBACK) if collectives is None else measured_link(collectives)
    handoff = _measured_handoff(args) if args.amqp_url else Link(*HANDOFF)
    memory = args.device_memory or _device_memory(device) / (1 if device.startswith("cuda") else args.devices)
    name = f"{'cuda' if device.startswith('cuda') else 'cpu'}-{args.devices}x{threads}t"
    notes = (
        f"written by exegpt profile: {args.devices} worker process(es) on this machine, {threads} torch "
        f"thread(s) each, memory {'as given' if args.device_memory else 'RAM / devices'}"
    )
    return Cluster(
        name,
        memory,
        args.devices,
        loopback,
        loopback,
        handoff=handoff,
        device_threads=0 if device.startswith("cuda") else threads,
        device_count=args.devices,
        notes=notes,
    )


def _measured_collectives(device: str):
    from common.cli import CliError
    from engine.parallel.collectives import measure

    if device.startswith("cuda"):
        print(
            "exegpt profile: note: the link is measured between CPU processes (gloo); NCCL between GPUs is "
            "not measured",
            file=sys.stderr,
        )
    try:
        return measure()
    except (OSError, RuntimeError) as exc:
        raise CliError(
            f"cannot measure the collectives between worker processes: {exc} (--no-collectives writes the default link)"
        ) from exc


def measured_link(times):
    """The link kind between worker processes, from ``engine.parallel.collectives`` times: fitted so
    that the optimizer's all-reduce over two ranks (``allreduce_s``: 2 x latency + bytes / bandwidth)
    matches the measured all-reduce, since tensor parallelism pays two all-reduces per layer and step
    and a pipeline only one message per stage. ``source`` says what was measured and how well the
    same link predicts a send/recv message (``p2p_s``)."""
    from optimizer.cluster import Link, allreduce_s, p2p_s

    fit = times.allreduce_fit()
    link = Link("loopback", fit.bandwidth_Bps, fit.latency_s / 2)
    ar = [s.allreduce_s / allreduce_s(link, s.nbytes, 2) for s in times.sizes]
    p2p = [s.p2p_s / p2p_s(link, s.nbytes) for s in times.sizes]
    own = times.p2p_fit()
    source = (
        f"measured by exegpt profile: {times.describe()}; fitted to the all-reduce (2 x latency + bytes / "
        f"bandwidth over 2 ranks): measured / modelled {min(ar):.2f}-{max(ar):.2f}; send/recv measured / "
        f"modelled {min(p2p):.2f}-{max(p2p):.2f} (send/recv alone fits {own.latency_s * 1e6:.0f} us, "
        f"{own.bandwidth_Bps / 1e9:.2f} GB/s)"
    )
    return Link(link.name, link.bandwidth_Bps, link.latency_s, source)


def _print_collectives(times, link) -> None:
    from engine.parallel.collectives import size_text
    from optimizer.cluster import allreduce_s, p2p_s

    print(
        f"collectives ({times.describe()}, {times.wall_s:.1f} s); link written: latency "
        f"{link.latency_s * 1e6:.1f} us, bandwidth {link.bandwidth_Bps / 1e9:.2f} GB/s"
    )
    print(
        f"{'bytes':>9} {'all-reduce':>11} {'modelled':>9} {'ratio':>6} {'send/recv':>10} {'modelled':>9} "
        f"{'ratio':>6}  (us, medians)"
    )
    for s in times.sizes:
        ar, pp = allreduce_s(link, s.nbytes, 2), p2p_s(link, s.nbytes)
        print(
            f"{size_text(s.nbytes):>9} {s.allreduce_s * 1e6:>11.1f} {ar * 1e6:>9.1f} {s.allreduce_s / ar:>6.2f} "
            f"{s.p2p_s * 1e6:>10.1f} {pp * 1e6:>9.1f} {s.p2p_s / pp:>6.2f}"
        )


def _device_memory(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _measured_handoff(args: argparse.Namespace):
    import asyncio

    from common.cli import CliError
    from common.transport.probe import measure_handoff
    from optimizer.cluster import Link

    try:
        if args.kv_transport == "nixl":
            from common.transport.nixl_kv import NixlUnavailable
            from services.bench.handoff import nixl_link

            try:
                return Link(*nixl_link(args.amqp_url, args.redis_url))
            except NixlUnavailable as exc:
                raise CliError(f"{exc} (exegpt profile --kv-transport redis measures the Redis path)") from exc
        probe = asyncio.run(measure_handoff(args.amqp_url, args.redis_url))
    except (TimeoutError, OSError, ConnectionError) as exc:
        raise CliError(f"cannot measure the hand-off path ({args.amqp_url}, {args.redis_url}): {exc}") from exc
    return Link("redis+rabbitmq", probe.bandwidth_Bps, probe.latency_s, probe.describe())


def _write(args: argparse.Namespace, engine, split: list[dict], layers: list[dict], cluster) -> None:
    from engine.profiler import header, write_jsonl
    from optimizer.cluster import cluster_to_dict

    layers_out = args.layers_out or _sibling(args.out, f"-layers{args.out.suffix or '.jsonl'}")
    cluster_out = args.cluster_out or _sibling(args.out, "-cluster.json")
    head = {**header(engine), "tp_degrees": list(args.tp_degrees)}
    write_jsonl(args.out, {**head, "kind": "split: attention-only and rest-of-layer"}, split)
    write_jsonl(layers_out, head, layers)
    cluster_out.parent.mkdir(parents=True, exist_ok=True)
    cluster_out.write_text(json.dumps(cluster_to_dict(cluster), indent=2) + "\n")
    print(
        f"wrote {len(split)} split rows to {args.out}, {len(layers)} layer rows to {layers_out}, "
        f"cluster {cluster.name!r} to {cluster_out}"
    )


def _warn(warnings: tuple[str, ...]) -> None:
    for line in warnings[:MAX_WARNINGS]:
        print(f"exegpt profile: warning: {line}", file=sys.stderr)
    if len(warnings) > MAX_WARNINGS:
        print(
            f"exegpt profile: warning: ... and {len(warnings) - MAX_WARNINGS} more rows below an earlier one",
            file=sys.stderr,
        )
