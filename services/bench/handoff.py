"""`exegpt bench handoff`: the KV hand-off between two worker processes, NIXL against Redis.

Per transport, two processes like a WAA encoder and decoder, over RabbitMQ + Redis in a
throw-away namespace (deleted afterwards): the encoder puts a hand-off with the mesh's KV
transport (``open_kv``: NIXL staging + descriptor, or the Redis payload) and publishes a
``KvReady`` on the hand-off queue; the decoder takes it, reads the KV (``get``), drops it, acks,
and tells the encoder when the bytes were in its memory. One hand-off at a time.

Sizes: SmolLM2-135M's KV cache (30 layers x 2 x 3 KV heads x 64 x float32: 46,080 bytes a prompt
token) at ``--tokens`` prompt tokens, and raw payloads of ``--mib`` MiB. Per (transport, size),
after one untimed warm-up, ``--runs`` hand-offs:

- latency: from the encoder's ``put`` to the KV bytes in the decoder's memory (same host: one
  clock), p50 and p99; bandwidth: bytes / p50;
- copies of the KV bytes end to end on CPU, from the engine's cache to the other engine's cache
  (``COPIES``). The encoder here does what a worker's engine does: it exports into the buffer the
  transport gives (NIXL: a staging block) or to bytes (Redis);
- redis_peak_bytes: Redis memory of the namespace's keys while a hand-off of that size waits to be
  read (MEMORY USAGE, on one more hand-off, untimed);
- peak RSS of the encoder and the decoder process (each transport has its own two).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from common.config import MeshConfig
from common.messages import codec
from common.messages.handoff import KvReady
from common.names import Names
from common.transport.connect import LocalHub, open_transports, purge
from common.transport.nixl_kv import NixlUnavailable, load_nixl
from engine.api import KVHandoff, SamplingParams
from services.hosting.handoffs import engine_handoff, kv_payload

SMOLLM2_KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4
COPIES = {
    "nixl": 3,  # the export into a staging block, the NIXL read into the decoder's inbox, the import into its cache
    "redis": 8,  # contiguous, tobytes, msgpack, into Redis, out of it, msgpack, bytearray, into the cache
}
TIMEOUT_S = 120.0
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class Row:
    transport: str
    label: str
    bytes: int
    runs: int
    latency_p50_s: float
    latency_p99_s: float
    bandwidth_bytes_s: float
    copies: int
    redis_peak_bytes: int
    encoder_peak_rss_bytes: int
    decoder_peak_rss_bytes: int


def sizes(tokens: list[int], mib: list[int]) -> list[tuple[str, int]]:
    return [(f"smollm2 {t} tokens", t * SMOLLM2_KV_BYTES_PER_TOKEN) for t in tokens] + [
        (f"raw {m} MiB", m << 20) for m in mib
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _config(transport: str, namespace: str, amqp_url: str, redis_url: str, staging_mb: int) -> MeshConfig:
    return MeshConfig(
        namespace=namespace,
        amqp_url=amqp_url,
        redis_url=redis_url,
        kv_transport=transport,
        kv_staging_mb=staging_mb,
        kv_read_timeout_s=TIMEOUT_S,
    )


# ---- the decoder process ------------------------------------------------------------------------
def decoder_main(config: MeshConfig, peer: Connection) -> None:
    asyncio.run(_decode(config, peer))


async def _decode(config: MeshConfig, peer: Connection) -> None:
    names = Names(config.namespace)
    t = await open_transports(config, names, LocalHub(), kv=True)
    try:
        await t.bus.declare_queue(names.handoff_queue)
        subscription = await t.bus.consume(names.handoff_queue, prefetch=1)
        peer.send("ready")
        async for delivery in subscription:
            ready = codec.decode(delivery.body, KvReady)
            if ready.kv_ref == "":
                await delivery.ack()
                break
            payload = await t.kv.get(ready.kv_ref)
            handoff = None if payload is None else engine_handoff(payload)  # as a worker imports it
            arrived = time.time()
            await t.kv.drop(ready.kv_ref)
            await delivery.ack()
            peer.send((ready.request_id, arrived, -1 if handoff is None else len(handoff.kv)))
        peer.send(peak_rss_bytes())
    finally:
        await t.close()


# ---- the encoder process ------------------------------------------------------------------------
def encoder_main(
    config: MeshConfig, peer: Connection, results: Connection, plan: list[tuple[str, int]], runs: int
) -> None:
    results.send(asyncio.run(_encode(config, peer, plan, runs)))


async def _encode(config: MeshConfig, peer: Connection, plan: list[tuple[str, int]], runs: int) -> list[Row]:
    names = Names(config.namespace)
    t = await open_transports(config, names, LocalHub(), kv=True)
    rows = []
    try:
        await _recv(peer)  # the decoder consumes
        for label, nbytes in plan:
            kv = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
            times, held = [], 0
            for i in range(runs + 2):  # one warm-up, the timed runs, one that measures Redis
                handoff = _handoff(f"{label}-{i}", _exported(kv, t.kv.export_buffer(nbytes)))
                start = time.time()
                ref = await t.kv.put(kv_payload(handoff), producer="bench-encoder", ttl_s=TIMEOUT_S)
                if i == runs + 1:
                    held = await t.store.bytes_prefix(names.key_prefix)
                ready = KvReady(handoff.request_id, "bench-encoder", "", ref, 1, 0, start)
                await t.bus.publish(names.handoff_queue, codec.encode(ready))
                rid, arrived, got = await _recv(peer)
                if (rid, got) != (handoff.request_id, nbytes):
                    raise RuntimeError(f"{config.kv_transport}: hand-off {handoff.request_id} read {got} bytes")
                if 1 <= i <= runs:
                    times.append(arrived - start)
            p50 = statistics.median(times)
            rows.append(
                Row(
                    config.kv_transport,
                    label,
                    nbytes,
                    runs,
                    p50,
                    percentile(times, 99),
                    nbytes / p50,
                    COPIES[config.kv_transport],
                    held,
                    peak_rss_bytes(),
                    0,
                )
            )
            print(f"  {config.kv_transport:5} {label:20} p50 {p50 * 1e3:9.2f} ms", flush=True)
        await t.bus.publish(names.handoff_queue, codec.encode(KvReady("stop", "bench-encoder", "", "", 0, 0, 0.0)))
        decoder_rss = await _recv(peer)
        return [Row(**{**asdict(r), "decoder_peak_rss_bytes": decoder_rss}) for r in rows]
    finally:
        await t.close()


def _exported(kv: bytes, buffer: np.ndarray | None) -> bytes | np.ndarray:
    """What the engine's export gives: the KV copied into the transport's buffer, or bytes."""
    if buffer is None:
        return kv
    buffer[:] = np.frombuffer(kv, dtype=np.uint8)
    return buffer


def _handoff(request_id: str, kv: bytes | np.ndarray) -> KVHandoff:
    return KVHandoff(
        request_id,
        "smollm2",
        SamplingParams(max_tokens=16),
        (1, 2, 3),
        (4,),
        "",
        b"",
        "float32",
        (1, len(kv)),
        "raw",
        kv,
    )


async def _recv(peer: Connection):
    if not await asyncio.to_thread(peer.poll, TIMEOUT_S):
        raise TimeoutError(f"no answer from the other process in {TIMEOUT_S:g} s")
    return peer.recv()


# ---- the run ------------------------------------------------------------------------------------
def measure(transport: str, plan: list[tuple[str, int]], runs: int, amqp_url: str, redis_url: str) -> list[Row]:
    """Both processes of one transport, in a namespace of their own, deleted afterwards."""
    staging_mb = (max(n for _, n in plan) >> 20) + 8
    config = _config(transport, f"bench-handoff-{uuid.uuid4().hex[:8]}", amqp_url, redis_url, staging_mb)
    spawn = multiprocessing.get_context("spawn")
    enc_end, dec_end = spawn.Pipe()
    results, result_end = spawn.Pipe(duplex=False)
    decoder = spawn.Process(target=decoder_main, args=(config, dec_end), daemon=True)
    encoder = spawn.Process(target=encoder_main, args=(config, enc_end, result_end, plan, runs), daemon=True)
    decoder.start()
    encoder.start()
    try:
        if not results.poll(TIMEOUT_S * (len(plan) + 1)):
            raise TimeoutError(f"{transport}: no results")
        return results.recv()
    finally:
        for process in (encoder, decoder):
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
        asyncio.run(purge(config, Names(config.namespace), LocalHub()))


LINK_SIZES = (1 << 20, 64 << 20)  # the line through a small and a large KV cache
LINK_RUNS = 3


def nixl_link(
    amqp_url: str, redis_url: str, *, sizes_bytes: tuple[int, ...] = LINK_SIZES, runs: int = LINK_RUNS
) -> tuple[str, float, float, str]:
    """The NIXL hand-off path between two worker processes as the optimizer's link (kind,
    bandwidth B/s, latency s, how it was measured): the line seconds = latency + bytes / bandwidth
    through the p50 of the smallest and the largest payload (NixlUnavailable where NIXL cannot load)."""
    from common.transport.probe import fit_line

    load_nixl()
    rows = measure("nixl", [(f"raw {n / (1 << 20):g} MiB", n) for n in sizes_bytes], runs, amqp_url, redis_url)
    points = tuple((r.bytes, r.latency_p50_s) for r in rows)
    latency, bandwidth = fit_line(points)
    medians = ", ".join(f"{n / (1 << 20):g} MiB {t * 1e3:.1f} ms" for n, t in points)
    return (
        "nixl",
        bandwidth,
        latency,
        f"measured: NIXL read between two worker processes over RabbitMQ + Redis, "
        f"p50 of {runs} ({medians}), fitted to {latency * 1e3:.2f} ms + bytes / {bandwidth / 1e6:.0f} MB/s",
    )


def table(rows: list[Row]) -> str:
    lines = [
        f"{'transport':9} {'size':20} {'bytes':>11} {'p50 ms':>9} {'p99 ms':>9} {'MB/s':>8} {'copies':>6} "
        f"{'redis KB':>9} {'enc RSS MB':>10} {'dec RSS MB':>10}"
    ]
    for r in rows:
        lines.append(
            f"{r.transport:9} {r.label:20} {r.bytes:11d} {r.latency_p50_s * 1e3:9.2f} "
            f"{r.latency_p99_s * 1e3:9.2f} {r.bandwidth_bytes_s / 1e6:8.0f} {r.copies:6d} "
            f"{r.redis_peak_bytes / 1e3:9.1f} {r.encoder_peak_rss_bytes / 1e6:10.0f} "
            f"{r.decoder_peak_rss_bytes / 1e6:10.0f}"
        )
    lines.append("  copies: of the KV bytes end to end on CPU, the engines' export and import included")
    by = {(r.transport, r.bytes): r for r in rows}
    for r in rows:
        if r.transport == "nixl" and ("redis", r.bytes) in by:
            lines.append(
                f"  {r.label}: NIXL {r.bandwidth_bytes_s / by['redis', r.bytes].bandwidth_bytes_s:.1f}x "
                "the Redis path's bandwidth"
            )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="64,512,2048", help="SmolLM2-shaped KV caches of these prompt lengths")
    parser.add_argument("--mib", default="1,16,64,256", help="raw payloads of these sizes (MiB)")
    parser.add_argument("--runs", type=int, default=3, help="timed hand-offs per transport and size")
    parser.add_argument("--transports", default="nixl,redis")
    parser.add_argument("--amqp-url", default=os.environ.get("EXEGPT_AMQP_URL", AMQP_URL))
    parser.add_argument("--redis-url", default=os.environ.get("EXEGPT_REDIS_URL", REDIS_URL))
    parser.add_argument("--json", type=Path, help="write one object per (transport, size) here (a JSON list)")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run(args: argparse.Namespace) -> int:
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if unknown := [t for t in transports if t not in COPIES]:
        print(f"exegpt bench handoff: unknown transports {unknown}; known: nixl, redis", file=sys.stderr)
        return 2
    if "nixl" in transports:
        try:
            load_nixl()
        except NixlUnavailable as exc:
            print(f"exegpt bench handoff: {exc}", file=sys.stderr)
            return 2
    plan = sizes(_ints(args.tokens), _ints(args.mib))
    if not plan or args.runs < 1:
        print("exegpt bench handoff: no sizes, or --runs below 1", file=sys.stderr)
        return 2
    print(
        f"handoff: {', '.join(transports)}; {len(plan)} sizes x {args.runs} runs; two processes over RabbitMQ + Redis",
        flush=True,
    )
    rows = [
        row for transport in transports for row in measure(transport, plan, args.runs, args.amqp_url, args.redis_url)
    ]
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 0
