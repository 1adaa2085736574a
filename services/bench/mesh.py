"""`exegpt bench mesh`: what the mesh costs, measured against the embedded server and the engine.

1. On the main model (SmolLM2): single-request latency (median of sequential requests) and the
   output tokens/s of N concurrent requests, through the embedded server (`exegpt serve`, one
   process) and through the mesh (`exegpt up`: separate processes over RabbitMQ and Redis), both
   running at once and measured in alternating rounds.
2. On a tiny model: the same request on the engine called in-process (prefill + decode steps),
   through the embedded server and through the mesh, back to back in each round; the per-round
   difference (server minus engine) at p50 and p99 is the overhead per request. Requests go
   through a lean HTTP/1.1 client (so the client library's own cost is not counted) and, beside
   it, through httpx; a ``GET /health`` round trip shows how much is the HTTP exchange alone.
Every request is forced to the same length (``ignore_eos``), so runs compare like for like.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common.names import Names
from services.run.children import REPO_ROOT, ChildProcess, child_env

PROMPT = "The quick brown fox jumps over the lazy dog while the mesh measures itself. " * 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="main model (default smollm2)")
    parser.add_argument("--tiny-model", default="tiny-llama", help="model for the overhead rows")
    parser.add_argument("--max-tokens", type=int, default=32, help="forced output tokens per request")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent requests for throughput")
    parser.add_argument("--latency-requests", type=int, default=5, help="sequential requests for latency")
    parser.add_argument("--overhead-requests", type=int, default=100, help="sequential tiny requests")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds on the main model")
    parser.add_argument(
        "--only",
        choices=("all", "main", "overhead"),
        default="all",
        help="main: the main-model rows; overhead: the tiny-model rows",
    )
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")


@dataclass
class Server:
    child: ChildProcess
    url: str
    namespace: str | None = None  # a mesh's: its queues and keys are deleted when it stops
    amqp_url: str | None = None
    redis_url: str | None = None

    def stop(self) -> None:
        self.child.stop(60)
        if self.namespace is not None:
            asyncio.run(self._purge())

    async def _purge(self) -> None:
        from common.config import MeshConfig
        from common.names import Names
        from common.transport.connect import LocalHub, purge

        config = MeshConfig(namespace=self.namespace, amqp_url=self.amqp_url, redis_url=self.redis_url)
        await purge(config, Names(config.namespace), LocalHub())


def start(args: list[str], ready_prefix: str, threads: int, *, root: Path = REPO_ROOT) -> Server:
    """``exegpt ARGS`` from the checkout at ``root``, once it prints ``ready_prefix``."""
    env = child_env({"EXEGPT_THREADS": str(threads), "EXEGPT_DEVICE": "cpu"}, root=root)
    child = ChildProcess([sys.executable, "-m", "services.cli", *args, "--port", "0"], env=env, cwd=root, label=args[0])
    try:
        return Server(child, child.wait_line(ready_prefix).split()[-1])
    except BaseException:
        child.kill()
        raise


def embedded(model: str, threads: int) -> Server:
    return start(["serve", "--model", model], "ready gateway", threads)


def mesh(model: str, a: argparse.Namespace) -> Server:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    server = start(
        [
            "up",
            "--model",
            model,
            "--amqp-url",
            a.amqp_url,
            "--redis-url",
            a.redis_url,
            "--namespace",
            namespace,
            "--workers",
            "1",
        ],
        "ready mesh",
        a.threads,
    )
    server.namespace, server.amqp_url, server.redis_url = namespace, a.amqp_url, a.redis_url
    return server


async def one(client, model: str, max_tokens: int) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    response = await client.post("/v1/completions", json=body)
    response.raise_for_status()
    assert response.json()["usage"]["completion_tokens"] == max_tokens
    return time.perf_counter() - t0


async def latencies(url: str, model: str, max_tokens: int, n: int) -> list[float]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one(client, model, max_tokens)  # warm-up
        return [await one(client, model, max_tokens) for _ in range(n)]


async def throughput(url: str, model: str, max_tokens: int, concurrency: int) -> float:
    import httpx

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one(client, model, 2)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, model, max_tokens) for _ in range(concurrency)))
        return concurrency * max_tokens / (time.perf_counter() - t0)


class EngineCaller:
    """The same request on the engine in this process, no mesh: prefill, then decode to the end."""

    def __init__(self, model: str, a: argparse.Namespace) -> None:
        from engine import load_engine
        from engine.api import SamplingParams

        self.engine = load_engine(model, device="cpu", num_threads=a.threads)
        self.params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
        self.count = 0

    def __call__(self) -> float:
        from engine.api import GenerationRequest

        self.count += 1
        t0 = time.perf_counter()
        ids = tuple(self.engine.tokenizer.encode(PROMPT))
        self.engine.prefill([GenerationRequest(f"r{self.count}", ids, self.params)])
        while self.engine.running():
            self.engine.decode_step()
        return time.perf_counter() - t0


class LeanResponse:
    def __init__(self, status: int, body: bytes) -> None:
        self.status_code, self.content = status, body

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}: {self.content[:200]!r}")

    def json(self) -> Any:
        return json.loads(self.content)


class LeanClient:
    """A minimal HTTP/1.1 keep-alive client: one connection, bodies with Content-Length.

    The overhead rows measure the servers, so the client should cost next to nothing; a full
    client library costs ~1–2 ms a request on a small machine (shown beside it, through httpx)."""

    def __init__(self, base_url: str) -> None:
        address = urlsplit(base_url)
        self.host, self.port = address.hostname or "127.0.0.1", address.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, json: Any) -> LeanResponse:
        return await self._request("POST", path, _json_bytes(json))

    async def get(self, path: str) -> LeanResponse:
        return await self._request("GET", path, b"")

    async def _request(self, method: str, path: str, body: bytes) -> LeanResponse:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        self._writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        content = await self._reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            await self.aclose()
        return LeanResponse(int(head[0].split()[1]), content)

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._reader = self._writer = None


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def health(client) -> float:
    t0 = time.perf_counter()
    (await client.get("/health")).raise_for_status()
    return time.perf_counter() - t0


async def interleaved(
    call_engine: EngineCaller, urls: dict[str, str], model: str, a: argparse.Namespace
) -> dict[str, list[float]]:
    """Per round: the engine, then each server, back to back, so that load hits all alike.

    Returns, per ``server/measure``: the added latency of each round (server minus the engine of
    the same round) through the lean client (``lean``) and through httpx (``httpx``), and the
    bare HTTP round trip (``http``: ``GET /health``, the floor any request through it pays)."""
    import httpx

    lean = {label: LeanClient(url) for label, url in urls.items()}
    full = {label: httpx.AsyncClient(base_url=url, timeout=600) for label, url in urls.items()}
    out: dict[str, list[float]] = {f"{label}/{m}": [] for label in urls for m in ("lean", "httpx", "http")}
    try:
        for label in urls:
            await one(lean[label], model, a.max_tokens)  # warm-up
            await one(full[label], model, a.max_tokens)
        call_engine()
        for _ in range(a.overhead_requests):
            base = call_engine()
            for label in urls:
                out[f"{label}/lean"].append(await one(lean[label], model, a.max_tokens) - base)
                out[f"{label}/httpx"].append(await one(full[label], model, a.max_tokens) - base)
                out[f"{label}/http"].append(await health(lean[label]))
    finally:
        for label in urls:
            await lean[label].aclose()
            await full[label].aclose()
    return out


PROBE_ROUNDS = 200
PROBE_GAP_S = 0.02  # idle between probes, as between sequential requests (pacing, not waiting)


def broker_hop(a: argparse.Namespace) -> list[float]:
    """One bare RabbitMQ hop between two processes, through the mesh's own bus adapter
    (persistent, confirmed): half of each ping-pong round trip with another process."""
    names = Names(f"probe{uuid.uuid4().hex[:8]}")
    pong = ChildProcess(
        [sys.executable, "-m", "services.bench.mesh", "pong", a.amqp_url, names.namespace],
        env=child_env({}),
        label="pong",
    )
    try:
        pong.wait_line("ready", 60)
        return asyncio.run(ping(a.amqp_url, names))
    finally:
        pong.kill()


async def ping(amqp_url: str, names: Names) -> list[float]:
    from common.transport.rabbit import RabbitBus

    bus = await RabbitBus.connect(amqp_url, dead_exchange=names.dead_exchange, dead_queue=names.dead_queue)
    try:
        await bus.declare_queue(names.probe_queue("ping"), exclusive=True)
        replies = aiter(await bus.consume(names.probe_queue("ping"), prefetch=10, auto_ack=True))
        hops = []
        for _ in range(PROBE_ROUNDS):
            t0 = time.perf_counter()
            await bus.publish(names.probe_queue("pong"), b"x" * 200)
            await asyncio.wait_for(anext(replies), 30)
            hops.append((time.perf_counter() - t0) / 2)
            await asyncio.sleep(PROBE_GAP_S)
        await bus.publish(names.probe_queue("pong"), b"stop")
    finally:
        await bus.delete(queues=[names.dead_queue], exchanges=[names.dead_exchange])
        await bus.close()
    return hops


async def pong_main(amqp_url: str, namespace: str) -> None:
    """The other side of ``broker_hop``: send every ping straight back."""
    from common.transport.rabbit import RabbitBus

    names = Names(namespace)
    bus = await RabbitBus.connect(amqp_url, dead_exchange=names.dead_exchange, dead_queue=names.dead_queue)
    await bus.declare_queue(names.probe_queue("pong"), exclusive=True)
    pings = await bus.consume(names.probe_queue("pong"), prefetch=10, auto_ack=True)
    print("ready", flush=True)
    async for delivery in pings:
        if delivery.body == b"stop":
            break
        await bus.publish(names.probe_queue("ping"), delivery.body)
    await bus.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(a: argparse.Namespace) -> int:
    rows: list[tuple[str, str]] = []
    if a.only in ("all", "main"):
        rows += main_rows(a)
    if a.only in ("all", "overhead"):
        rows += overhead_rows(a)
    print_table(rows, a)
    return 0


def main_rows(a: argparse.Namespace) -> list[tuple[str, str]]:
    """Both servers up at once, measured in alternating rounds so that load drifts hit both."""
    servers = {"embedded": embedded(a.model, a.threads), "mesh": mesh(a.model, a)}
    lat: dict[str, list[float]] = {label: [] for label in servers}
    tps: dict[str, list[float]] = {label: [] for label in servers}
    try:
        for _ in range(a.rounds):
            for label, server in servers.items():
                lat[label] += asyncio.run(latencies(server.url, a.model, a.max_tokens, a.latency_requests))
                tps[label].append(asyncio.run(throughput(server.url, a.model, a.max_tokens, a.concurrency)))
    finally:
        for server in servers.values():
            server.stop()
    ratios = [m / e for m, e in zip(tps["mesh"], tps["embedded"])]
    med = statistics.median
    return [
        *((f"{a.model}: single request latency, {label}", f"{med(v) * 1000:.0f} ms") for label, v in lat.items()),
        *((f"{a.model}: {a.concurrency} concurrent, {label}", f"{med(v):.1f} tok/s") for label, v in tps.items()),
        (
            f"{a.model}: throughput mesh/embedded (median of rounds)",
            f"{med(ratios):.3f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)})",
        ),
        (f"{a.model}: latency mesh/embedded", f"{med(lat['mesh']) / med(lat['embedded']):.3f}"),
    ]


def overhead_rows(a: argparse.Namespace) -> list[tuple[str, str]]:
    servers = {"embedded": embedded(a.tiny_model, a.threads), "mesh": mesh(a.tiny_model, a)}
    try:
        caller = EngineCaller(a.tiny_model, a)
        urls = {label: server.url for label, server in servers.items()}
        out = asyncio.run(interleaved(caller, urls, a.tiny_model, a))
    finally:
        for server in servers.values():
            server.stop()
    out["broker/hop"] = broker_hop(a)

    def ms(key: str, q: float) -> str:
        return f"{pct(out[key], q) * 1000:.2f} ms"

    return [
        *(
            (f"{a.tiny_model}: added latency per request vs engine, {label}, p{int(q * 100)}", ms(f"{label}/lean", q))
            for label in servers
            for q in (0.5, 0.99)
        ),
        *(
            (f"  same through httpx, {label}, p50 / p99", f"{ms(f'{label}/httpx', 0.5)} / {ms(f'{label}/httpx', 0.99)}")
            for label in servers
        ),
        *((f"  HTTP alone (GET /health round trip), {label}, p50", ms(f"{label}/http", 0.5)) for label in servers),
        ("  one RabbitMQ hop alone, process to process, p50 (a request makes 3)", ms("broker/hop", 0.5)),
    ]


def print_table(rows: list[tuple[str, str]], a: argparse.Namespace) -> None:
    width = max(len(r[0]) for r in rows)
    print(
        f"\nexegpt bench mesh  (max_tokens={a.max_tokens}, threads/engine={a.threads}, "
        f"mesh = one worker process, RabbitMQ + Redis)"
    )
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  {'-' * 30}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__" and sys.argv[1:2] == ["pong"]:
    from services.run.runner import run_loop

    run_loop(pong_main(sys.argv[2], sys.argv[3]))  # the loop the services run on
