"""`exegpt bench faults`: a mesh under load meets one fault at a time; what its clients saw.

The mesh is `exegpt up` (scheduler, workers, gateway as separate processes, restarted by the
launcher when they die) on a RabbitMQ node and a Redis of its own (``services.run.private``):
started here on free loopback ports, with their own names, configuration and data folders, never
the shared 127.0.0.1:5672 and :6379 ones (those may serve other meshes, and a fault must not reach
them).

Each scenario runs on the same mesh, one after another:

1. steady load: ``--clients`` closed-loop clients (send a completion, wait for it, send the next)
   for ``--baseline-s``; the median of its seconds' completions is the scenario's *before*;
2. the fault (below); the load goes on through it;
3. the load goes on until the throughput is back (a ``RECOVERY_WINDOW_S`` window with at least
   90 % of *before*), or ``--observe-s`` after the fault ended; then the clients stop and every
   request they sent is waited for (bounded by the request deadline);
4. the mesh's gateway must answer ``/health/ready`` and every process of it must be running.

Faults: ``kill-worker`` (SIGKILL one worker process; the launcher restarts it), ``redis-3s`` and
``redis-30s`` (Redis killed, started again on the same data after that long), ``broker-10s`` and
``broker-30s`` (RabbitMQ's application stopped: connections closed, the port refusing, then
started again), ``poison`` (random bytes into every queue and fanout exchange of the mesh, and a
work message whose reply queue no broker can route), ``overload`` (10 x the clients for
``--baseline-s``), ``abandon`` (100 clients that send a long completion and leave after 0.2 s),
``too-large`` (a request whose prompt + max_tokens no worker's KV cache can hold, which must be
a 400 at once), ``store-flush`` (FLUSHALL on Redis while a Batch API batch runs and another has
finished: every batch must still answer, the finished one as before, the running one to its end,
each line once with its reference text), ``slowloris`` (1,000 connections that send their headers
a byte a second, from four loopback addresses, for 15 s: the normal clients' p99 latency within
10 % of before, the gateway's descriptors back once the header timeout closed them).

What a client counts (one row per scenario):
- *sent*: requests the clients started; *completed*: answered 200 with the expected text (the
  reference: the same prompt's answer before any fault; greedy decoding is deterministic);
- *refused*: a 429 or 503 with ``Retry-After``: the client waits as told and sends again (as
  OpenAI's clients do), so a refused request that then completes counts as completed;
- *failed*: an error answer in the OpenAI shape (a clear error) after it was accepted;
- *unclear*: anything else (a connection reset, a 5xx without the error shape);
- *hung*: no answer within the request deadline plus ``HUNG_MARGIN_S``;
- *wrong*: a 200 whose text differs from the reference (duplicated or lost tokens);
- *recovery_s*: from the end of the fault until the throughput is back (None: not within
  ``--observe-s``);
- *up*: the mesh answered ready afterwards, every process running.

Goals: 0 hung, 0 wrong, 0 unclear, >= 99 % completed where the outage is shorter than the
request deadline, the mesh up after every scenario, recovery <= 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import random
import re
import secrets
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from common.config import MeshConfig
from common.messages import codec
from common.messages.work import EncodeWork, Sampling
from common.names import Names
from common.transport.connect import LocalHub, open_bus
from services.run.children import ChildFailed, ChildProcess
from services.run.private import PrivateServices, SetupError, available

MODEL = "tiny-llama"
MAX_TOKENS = 16
RECOVERY_WINDOW_S = 4.0  # throughput is back when a window this long has >= 90 % of before
RECOVERED_SHARE = 0.9
HUNG_MARGIN_S = 15.0  # past the request deadline with no answer: hung
REQUEST_TIMEOUT_S = 60.0  # the mesh's request deadline (every outage here is shorter)
# ~1,990 tokens of tiny-llama KV per worker: one of gateway-kill's long requests fits, and a
# 2,000-token prompt (within the model's 2,048-token context) never does
KV_CACHE_GB = 0.0019
TOO_LARGE_PROMPT = 2000
STARTUP_TIMEOUT_S = 180.0
PROMPTS = (
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colors are",
    "In 1969, the first humans",
    "A recipe for pancakes:",
    "Rabbits and redis walk into a bar;",
    "The quick brown fox",
    "To be or not to be",
    "Water boils at",
    "The mesh survived because",
    "Seven plus five equals",
)
ALL = (
    "kill-worker",
    "redis-3s",
    "broker-10s",
    "poison",
    "overload",
    "abandon",
    "too-large",
    "topology-loss",
    "gateway-kill",
    "hung-worker",
    "paused-worker",
    "store-flush",
    "slowloris",
)
LONG = ("redis-30s", "broker-30s")


OPS_LINE = re.compile(r"^\[(\S+)\] .*/metrics and /health/\* at (http://\S+)")


# ==== the mesh: `exegpt up` on the private services =============================================


class Mesh:
    """`exegpt up` as a child process; its output is kept, its children found through /proc."""

    def __init__(
        self,
        services: PrivateServices,
        *,
        workers: int = 2,
        namespace: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.services, self.workers = services, workers
        self.namespace = namespace or f"faults{secrets.token_hex(3)}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EXEGPT_")}
        self.env.update(
            {
                "EXEGPT_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
                "EXEGPT_KV_CACHE_GB": str(KV_CACHE_GB),
                "EXEGPT_BATCH_DIR": str(services.dir / "batches"),
                "EXEGPT_HEARTBEAT_S": "0.5",
                "EXEGPT_HEARTBEAT_TIMEOUT_S": "3",
                "PYTHONUNBUFFERED": "1",
                **(env or {}),
            }
        )
        self.child: ChildProcess | None = None
        self.url = ""

    def start(self) -> str:
        cmd = [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--model",
            MODEL,
            "--workers",
            str(self.workers),
            "--port",
            "0",
            "--threads",
            "1",
            "--amqp-url",
            self.services.amqp_url,
            "--redis-url",
            self.services.redis_url,
            "--namespace",
            self.namespace,
        ]
        self.child = ChildProcess(cmd, env=self.env, label="exegpt up")
        try:
            self.url = self.child.wait_line("ready mesh ", STARTUP_TIMEOUT_S).split()[-1]
        except ChildFailed as exc:
            raise SetupError(str(exc)) from None
        return self.url

    @property
    def output(self) -> list[str]:
        """Every line `exegpt up` printed so far (its children's, labelled)."""
        return [] if self.child is None else self.child.output

    def tail(self, n: int = 40) -> str:
        return "" if self.child is None else self.child.tail(n)

    def children(self) -> dict[int, str]:
        """pid -> command line of each process `exegpt up` runs now."""
        assert self.child is not None
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == self.child.pid:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError, IndexError):
                continue
        return found

    def worker_ops_urls(self) -> dict[str, str]:
        """Each worker's operations port (the latest one its label announced: a restarted worker
        has a new one)."""
        urls = {}
        for line in self.output:
            match = OPS_LINE.match(line)
            if match and match.group(1).startswith("worker-"):
                urls[match.group(1)] = match.group(2)
        return urls

    def role_pids(self, role: str) -> list[int]:
        """The processes of ``role``, oldest first: a gateway's spare (started once the gateway
        serves, woken when it dies) comes after the gateway it stands in for."""
        return sorted((pid for pid, cmd in self.children().items() if f"services.cli {role}" in cmd), key=started_at)

    def running(self) -> bool:
        """`exegpt up` and every process it should run are alive."""
        if self.child is None or not self.child.running():
            return False
        return (
            len(self.role_pids("worker")) == self.workers
            and len(self.role_pids("gateway")) in (1, 2)
            and len(self.role_pids("scheduler")) == 1
        )

    def close(self) -> None:
        if self.child is not None:
            self.child.stop(60)


def started_at(pid: int) -> int:
    """When the process started (clock ticks since boot; 0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


# ==== the clients ===============================================================================


@dataclass
class Record:
    sent_at: float
    prompt: str
    outcome: str = "pending"  # completed, failed, unclear, hung, wrong
    ended_at: float | None = None
    refusals: int = 0
    detail: str = ""
    text: str = ""


def is_error_body(response: httpx.Response) -> bool:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and bool(error.get("message"))


class Clients:
    """Closed-loop clients against one gateway, keeping a record per request."""

    def __init__(
        self, url: str, reference: dict[str, str], *, max_tokens: int = MAX_TOKENS, ignore_eos: bool = False
    ) -> None:
        self.url, self.reference, self.max_tokens, self.ignore_eos = url, reference, max_tokens, ignore_eos
        self.records: list[Record] = []
        self.stop = asyncio.Event()
        self.client = httpx.AsyncClient(
            base_url=url,
            timeout=REQUEST_TIMEOUT_S + HUNG_MARGIN_S,
            limits=httpx.Limits(max_connections=2000, max_keepalive_connections=200),
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def one(self, prompt: str, record: Record | None = None) -> Record:
        """One request until it is answered (a 429/503 with Retry-After is sent again after the
        wait, within the request deadline)."""
        record = record or Record(time.monotonic(), prompt)
        self.records.append(record)
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": self.ignore_eos,
        }
        give_up = record.sent_at + REQUEST_TIMEOUT_S + HUNG_MARGIN_S
        while True:
            try:
                response = await self.client.post(
                    "/v1/completions", json=body, timeout=max(give_up - time.monotonic(), 0.1)
                )
            except httpx.TimeoutException:
                record.outcome, record.detail = "hung", "no answer within the deadline"
                break
            except httpx.HTTPError as exc:
                record.outcome, record.detail = "unclear", f"{type(exc).__name__}: {exc}"
                break
            retry_after = response.headers.get("Retry-After")
            if response.status_code in (429, 503) and retry_after is not None and is_error_body(response):
                record.refusals += 1
                wait = float(retry_after)
                if time.monotonic() + wait > record.sent_at + REQUEST_TIMEOUT_S:
                    record.outcome, record.detail = "failed", f"refused until the deadline: {response.status_code}"
                    break
                await asyncio.sleep(wait)  # as the server asked; it is the client's pacing, not a sync
                continue
            if response.status_code == 200:
                text = record.text = response.json()["choices"][0]["text"]
                expected = self.reference.get(prompt)
                record.outcome = "completed" if expected is None or text == expected else "wrong"
                if record.outcome == "wrong":
                    record.detail = f"{text!r} != {expected!r}"
            elif is_error_body(response):
                record.outcome, record.detail = (
                    "failed",
                    f"{response.status_code}: {response.json()['error']['message']}",
                )
            else:
                record.outcome, record.detail = "unclear", f"{response.status_code}: {response.text[:200]}"
            break
        record.ended_at = time.monotonic()
        return record

    async def loop(self, seed: int, stop: asyncio.Event | None = None) -> None:
        """Requests one after another until ``stop`` (default: the clients' own) is set; the
        request in flight then is still answered."""
        rng, stop = random.Random(seed), stop or self.stop
        while not stop.is_set() and not self.stop.is_set():
            await self.one(rng.choice(PROMPTS))

    def steady_rate(self, start: float, end: float) -> float:
        """Completions per second over [start, end): the median of its whole seconds (a second
        that happens to catch a burst of answers does not raise the bar)."""
        seconds = [self.completions_between(start + i, start + i + 1) for i in range(int(end - start))]
        return float(statistics.median(seconds)) if seconds else 0.0

    def completions_between(self, start: float, end: float) -> int:
        return sum(
            1 for r in self.records if r.outcome == "completed" and r.ended_at is not None and start <= r.ended_at < end
        )


async def reference_outputs(url: str) -> dict[str, str]:
    """Each prompt's answer on the healthy mesh (greedy: what every later answer must equal)."""
    clients = Clients(url, {})
    try:
        records = await asyncio.gather(*(clients.one(p) for p in PROMPTS))
        if any(r.outcome != "completed" for r in records):
            raise SetupError(f"the healthy mesh failed requests: {[r.detail for r in records if r.detail]}")
        return {r.prompt: r.text for r in records}
    finally:
        await clients.close()


# ==== scenarios =================================================================================


@dataclass
class Outcome:
    scenario: str
    sent: int = 0
    completed: int = 0
    refused: int = 0  # requests refused at least once (429/503 with Retry-After) before their end
    failed: int = 0
    unclear: int = 0
    hung: int = 0
    wrong: int = 0
    before_per_s: float = 0.0
    recovery_s: float | None = None
    up: bool = False
    outage_s: float = 0.0
    extra: dict = field(default_factory=dict)
    details: list[str] = field(default_factory=list)

    @property
    def completed_share(self) -> float:
        return self.completed / self.sent if self.sent else 0.0

    def goals_met(self) -> list[str]:
        """What this scenario missed of the goals (empty: all met)."""
        if self.scenario == "gateway-kill":
            return self._gateway_goals()
        missed = {"store-flush": self._batch_goals, "slowloris": self._slowloris_goals}.get(self.scenario, list)()
        if self.hung:
            missed.append(f"{self.hung} hung")
        if self.wrong:
            missed.append(f"{self.wrong} wrong")
        if self.unclear:
            missed.append(f"{self.unclear} unclear")
        if not self.up:
            missed.append(f"mesh not up ({self.extra.get('up_detail')})")
        if self.outage_s < REQUEST_TIMEOUT_S and self.completed_share < 0.99:
            missed.append(f"completed {100 * self.completed_share:.1f} % < 99 %")
        if self.recovery_s is None or self.recovery_s > 10:
            missed.append(
                f"recovery {self.recovery_s} s > 10 s (before: {self.before_per_s:.1f}/s, the median of "
                f"{self.extra.get('per_s_before')}; after, per second: {self.extra.get('per_s_after')})"
            )
        return missed

    def _batch_goals(self) -> list[str]:
        missed = []
        if not self.extra.get("finished_same"):
            missed.append("the finished batch does not answer as before the flush")
        running = self.extra.get("running", {})
        if running.get("status") != "completed" or running.get("lines") != running.get("total"):
            missed.append(f"the running batch did not finish with every line: {running}")
        if running.get("wrong") or running.get("repeated"):
            missed.append(
                f"the running batch has {running.get('wrong')} wrong and {running.get('repeated')} repeated lines"
            )
        if not self.extra.get("listed"):
            missed.append("the batches are not listed after the flush")
        return missed

    def _slowloris_goals(self) -> list[str]:
        x, missed = self.extra, []
        if x.get("p99_ratio") is None or x["p99_ratio"] > SLOWLORIS_P99_RATIO:
            missed.append(
                f"normal clients' p99 {x.get('p99_during_ms')} ms against {x.get('p99_before_ms')} ms "
                f"before (ratio {x.get('p99_ratio')} > {SLOWLORIS_P99_RATIO})"
            )
        if x.get("closed_by_gateway", 0) < x.get("connections", 1):
            missed.append(f"the gateway closed {x.get('closed_by_gateway')} slow connections of {x.get('connections')}")
        if x.get("fds_after") is None or x["fds_after"] > x["fds_before"] + SLOWLORIS_FD_MARGIN:
            missed.append(f"gateway descriptors {x.get('fds_after')} after, {x.get('fds_before')} before")
        return missed

    def _gateway_goals(self) -> list[str]:
        stopped, served = self.extra.get("stopped_s"), self.extra.get("served_s")
        missed = [] if self.up else [f"mesh not up ({self.extra.get('up_detail')})"]
        if stopped is None or stopped >= DEAD_GATEWAY_STOP_S:
            missed.append(f"work for the dead gateway ran {stopped} s >= {DEAD_GATEWAY_STOP_S:g} s")
        if self.extra.get("quiet_samples", 0) < 3 or self.extra.get("trickle_tokens", 0) > PROBE_TOKENS:
            missed.append(
                f"no stop seen: {self.extra.get('quiet_samples')} quiet intervals after it, "
                f"{self.extra.get('trickle_tokens')} tokens in them"
            )
        if served is None or served >= GATEWAY_BACK_S:
            missed.append(f"the new gateway served after {served} s >= {GATEWAY_BACK_S:g} s")
        return missed


@dataclass
class Settings:
    clients: int = 4
    baseline_s: float = 5.0
    observe_s: float = 30.0
    # a window back at this share of the rate before counts as recovered; the tests' short
    # baseline on a shared two-core machine swings by more than 10 % between seconds
    recovered_share: float = RECOVERED_SHARE


class Harness:
    def __init__(self, services: PrivateServices, mesh: Mesh, settings: Settings) -> None:
        self.services, self.mesh, self.settings = services, mesh, settings
        self.reference: dict[str, str] = {}
        self.last_not_ready: str | None = None  # the last /health/ready answer that was not 200

    async def prepare(self) -> None:
        self.reference = await reference_outputs(self.mesh.url)

    async def up(self, extra: dict) -> bool:
        """The mesh ready and every process of it running; when not, ``extra["up_detail"]`` says
        what was missing (readiness, the count of each role's processes, `exegpt up` itself)."""
        ready = await self.ready(30)
        if ready and self.mesh.running():
            return True
        launcher = self.mesh.child is not None and self.mesh.child.running()
        extra["up_detail"] = {
            "ready": ready if ready else self.last_not_ready,
            "launcher": launcher,
            **{role: len(self.mesh.role_pids(role)) for role in ("worker", "gateway", "scheduler")},
        }
        return False

    async def ready(self, timeout_s: float = 60) -> bool:
        """Whether ``/health/ready`` said 200 within ``timeout_s``; if not, ``last_not_ready`` keeps
        its last answer (the checks that failed) or the error."""
        async with httpx.AsyncClient(base_url=self.mesh.url, timeout=5) as client:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:
                    response = await client.get("/health/ready")
                    if response.status_code == 200:
                        return True
                    self.last_not_ready = response.text
                except httpx.HTTPError as exc:
                    self.last_not_ready = repr(exc)
                await asyncio.sleep(0.5)
        return False

    async def run(self, name: str) -> Outcome:
        if name == "gateway-kill":  # its clients' gateway dies: measured apart (``gateway_kill``)
            return await self.run_gateway_kill()
        fault, outage_s = FAULTS[name]
        clients = Clients(self.mesh.url, self.reference)
        outcome = Outcome(name, outage_s=outage_s)
        loops = [asyncio.create_task(clients.loop(seed)) for seed in range(self.settings.clients)]
        try:
            start = time.monotonic()
            await asyncio.sleep(self.settings.baseline_s)  # the steady load runs meanwhile
            fault_start = time.monotonic()
            outcome.before_per_s = clients.steady_rate(start, fault_start)
            per_s_before = per_second(clients, start, fault_start)
            outcome.extra = await fault(self, clients) or {}
            if quiet := outcome.extra.get("per_s_quiet"):  # a fault that waits first: its nearer, longer window
                outcome.before_per_s, per_s_before = float(statistics.median(quiet)), quiet
            outcome.extra["per_s_before"] = per_s_before
            fault_end = time.monotonic()
            tokens = await self.worker_tokens()
            outcome.recovery_s = await self._recovery(clients, outcome.before_per_s, fault_end)
            after = await self.worker_tokens()
            outcome.extra["tokens_per_worker_after"] = {w: after[w] - tokens.get(w, 0) for w in sorted(after)}
            outcome.extra["per_s_after"] = [
                clients.completions_between(fault_end + i, fault_end + i + 1)
                for i in range(math.ceil(time.monotonic() - fault_end))
            ]
        finally:
            clients.stop.set()
            await asyncio.gather(*loops, return_exceptions=True)
            await clients.close()
        outcome.up = await self.up(outcome.extra)
        outcome.sent = len(clients.records)  # (the abandoning clients and the too-large request are not these)
        outcome.extra["longest_s"] = round(
            max((r.ended_at - r.sent_at for r in clients.records if r.ended_at is not None), default=0.0), 2
        )
        for r in clients.records:
            setattr(outcome, r.outcome, getattr(outcome, r.outcome) + 1)
            outcome.refused += r.refusals > 0
            if r.detail and r.outcome != "completed" and len(outcome.details) < 10:
                outcome.details.append(f"{r.outcome}: {r.detail}")
        return outcome

    async def run_gateway_kill(self) -> Outcome:
        """The gateway-kill row: its recovery is the new gateway's first answer."""
        extra = await gateway_kill(self)
        return Outcome("gateway-kill", recovery_s=extra["served_s"], extra=extra, up=await self.up(extra))

    async def worker_tokens(self) -> dict[str, int]:
        """Tokens each worker generated so far (its ``exegpt_worker_generated_tokens_total``);
        a worker that does not answer is left out."""
        counts = {}
        async with httpx.AsyncClient(timeout=5) as client:
            for label, url in self.mesh.worker_ops_urls().items():
                try:
                    text = (await client.get(f"{url}/metrics")).text
                except httpx.HTTPError:
                    continue
                for line in text.splitlines():
                    if line.startswith("exegpt_worker_generated_tokens_total"):
                        counts[label] = int(float(line.split()[-1]))
        return counts

    async def _recovery(self, clients: Clients, before: float, fault_end: float) -> float | None:
        """Seconds from ``fault_end`` until a window of RECOVERY_WINDOW_S holds ``recovered_share``
        (90 % by default) of ``before`` completions per second (None: not within ``observe_s``)."""
        want = self.settings.recovered_share * before * RECOVERY_WINDOW_S
        step = 0.25
        t = fault_end
        while t - fault_end <= self.settings.observe_s:
            while time.monotonic() < t + RECOVERY_WINDOW_S:
                await asyncio.sleep(step)  # the window must have passed before it can be counted
            if clients.completions_between(t, t + RECOVERY_WINDOW_S) >= want:
                return round(t - fault_end, 2)
            t += step
        return None


ABANDON_PREFIX = "Tell a very long story about"


async def kill_worker(h: Harness, _: Clients) -> dict:
    pids = h.mesh.role_pids("worker")
    if not pids:
        raise SetupError("no worker process to kill")
    os.kill(pids[0], signal.SIGKILL)
    return {"killed_pid": pids[0]}


def redis_down(seconds: float) -> Callable[[Harness, Clients], Awaitable[dict]]:
    async def fault(h: Harness, _: Clients) -> dict:
        h.services.kill_redis()
        await asyncio.sleep(seconds)  # the outage itself
        await asyncio.to_thread(h.services.start_redis)
        return {}

    return fault


def broker_down(seconds: float) -> Callable[[Harness, Clients], Awaitable[dict]]:
    async def fault(h: Harness, _: Clients) -> dict:
        began = time.monotonic()
        await asyncio.to_thread(h.services.stop_broker)
        await asyncio.sleep(max(seconds - (time.monotonic() - began), 0))  # the outage itself
        await asyncio.to_thread(h.services.start_broker)
        return {}

    return fault


async def poison(h: Harness, _: Clients) -> dict:
    """Random bytes into every queue and fanout of the mesh's namespace; work whose reply queue
    no broker routes; then the dead queue must hold the work-queue ones."""
    names = Names(h.mesh.namespace)
    queues = [q for q in await asyncio.to_thread(h.services.queues, h.mesh.namespace) if q != names.dead_queue]
    exchanges = [e for e in await asyncio.to_thread(h.services.exchanges, h.mesh.namespace) if e != names.dead_exchange]
    config = MeshConfig(namespace=h.mesh.namespace, amqp_url=h.services.amqp_url, redis_url=h.services.redis_url)
    bus = await open_bus(config, names, LocalHub())
    try:
        for queue in queues:
            await bus.publish(queue, os.urandom(64))
        for exchange in exchanges:
            await bus.broadcast(exchange, os.urandom(64))
        bad_reply = EncodeWork("poison-reply", MODEL, (1, 2, 3), Sampling(4), "x" * 300, time.time(), True)
        await bus.publish(names.encode_queue, codec.encode(bad_reply))
    finally:
        await bus.close()
    want = len([q for q in queues if q in (names.encode_queue, names.handoff_queue)]) + 1
    dead = await asyncio.to_thread(h.services.depth, names.dead_queue)
    deadline = time.monotonic() + 10
    while dead < want and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # polling the broker's count (rabbitmqctl) until the workers dead-letter them
        dead = await asyncio.to_thread(h.services.depth, names.dead_queue)
    return {"queues": len(queues), "exchanges": len(exchanges), "dead_letters": dead, "dead_letters_expected": want}


RESUME_BOUND_S = 5.0  # completions resume this soon after a queue is deleted


async def topology_loss(h: Harness, clients: Clients) -> dict:
    """An operator deletes the encode queue, then the gateway's events queue (`rabbitmqctl
    delete_queue`), under the steady load. Each is declared again, the requests it held are
    published again by the gateway, and completions resume: seconds from each deletion to the
    first completion after it, and whether ``/health/ready`` said 503 in between (sampled)."""
    names = Names(h.mesh.namespace)
    events = await asyncio.to_thread(h.services.queues, names.events_queue("gateway"))
    if not events:
        raise SetupError("no gateway events queue to delete")
    resumed, not_ready = {}, {}
    for kind, queue in (("encode", names.encode_queue), ("events", events[0])):
        deleted_at = time.monotonic()
        sampler = asyncio.create_task(ready_503_seen(h.mesh.url, RESUME_BOUND_S))
        await asyncio.to_thread(h.services.ctl, "delete_queue", queue)
        resumed[kind] = await first_completion_after(clients, deleted_at, RESUME_BOUND_S * 4)
        not_ready[kind] = await sampler
    republished = sum(int(m.group(1)) for m in map(REPUBLISHED_LINE.search, h.mesh.output) if m)
    return {
        "resumed_s": resumed,
        "ready_503_seen": not_ready,
        "republished": republished,
        "queues_back": all(q in h.services.queues(h.mesh.namespace) for q in (names.encode_queue, events[0])),
    }


REPUBLISHED_LINE = re.compile(r"topology restored; (\d+) pending requests published again")


async def first_completion_after(clients: Clients, since: float, timeout_s: float) -> float | None:
    """Seconds from ``since`` to the first request completed after it (None: none in time)."""
    deadline = since + timeout_s
    while time.monotonic() < deadline:
        ends = [r.ended_at for r in clients.records if r.outcome == "completed" and r.ended_at and r.ended_at > since]
        if ends:
            return round(min(ends) - since, 2)
        await asyncio.sleep(0.1)  # polling the clients' records: no event marks a completion
    return None


async def ready_503_seen(url: str, for_s: float) -> bool:
    """Whether ``/health/ready`` answered 503 at least once in the next ``for_s`` (sampled)."""
    seen, deadline = False, time.monotonic() + for_s
    async with httpx.AsyncClient(base_url=url, timeout=2) as client:
        while time.monotonic() < deadline and not seen:
            try:
                seen = (await client.get("/health/ready")).status_code == 503
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)  # sampling the probe
    return seen


STALL_BOUND_S = 10.0  # a hung worker stalls no request longer than this


def hung_worker(seconds: float) -> Callable[[Harness, Clients], Awaitable[dict]]:
    """SIGSTOP one worker for ``seconds`` under the steady load, then SIGCONT: a pause shorter
    than the liveness timeout resumes (what it held is answered once all the same); a longer
    one has `exegpt up` kill it (the broker hands its work to the other worker) and start
    another. ``replaced_s``: seconds from the stop until its process was gone (None: it resumed)."""

    async def fault(h: Harness, _: Clients) -> dict:
        pid = h.mesh.role_pids("worker")[0]
        stopped = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        replaced_s = None
        try:
            while time.monotonic() < stopped + seconds:
                if pid not in h.mesh.role_pids("worker"):
                    replaced_s = round(time.monotonic() - stopped, 2)
                    break  # killed: the rest of the pause has nothing left to stop
                await asyncio.sleep(0.2)  # polling /proc: the launcher's kill has no event here
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        return {"pid": pid, "replaced_s": replaced_s}

    return fault


DEAD_GATEWAY_STOP_S = 3.0  # workers stop generating for a killed gateway within this
GATEWAY_BACK_S = 5.0  # the gateway `exegpt up` starts again serves within this of the kill
# long requests (EOS ignored), one per worker, so that work is still running when the grace for
# a missing events queue (services.worker.exits.EVENTS_GRACE_S) has passed (tiny-llama generates
# ~500 tokens a second here): what is measured is the workers dropping it, not its end
KILL_TOKENS = 1900
KILL_AFTER_TOKENS = 200  # the gateway dies once the long requests have generated this many


async def gateway_kill(h: Harness) -> dict:
    """SIGKILL the gateway while long requests run, once its spare waits: seconds until the
    workers' generated-token counters stop advancing (its events queue went with its connection:
    they drop its work) and the tokens generated meanwhile (``dead_work``); seconds until the
    gateway `exegpt up` starts again prints its ready line and answers a completion (a new URL:
    the harness follows it)."""
    spare = await spare_waiting(h.mesh, timeout_s=60)  # first: the long requests then start fresh
    clients = Clients(h.mesh.url, {}, max_tokens=KILL_TOKENS, ignore_eos=True)
    loops = [asyncio.create_task(clients.loop(seed)) for seed in range(h.mesh.workers)]
    try:
        before, deadline = sum((await h.worker_tokens()).values()), time.monotonic() + 60
        while sum((await h.worker_tokens()).values()) < before + KILL_AFTER_TOKENS:
            if time.monotonic() > deadline:
                raise SetupError("the long requests did not run")
            await asyncio.sleep(0.1)  # polling the workers' counters until the long requests run
        gateways = gateway_urls(h.mesh)
        os.kill(h.mesh.role_pids("gateway")[0], signal.SIGKILL)
        killed = time.monotonic()
        clients.stop.set()
    finally:
        await asyncio.gather(*loops, return_exceptions=True)
        await clients.close()
    samples: list[tuple[float, int]] = []
    sampler = asyncio.create_task(sample_tokens(h, samples))
    try:
        h.mesh.url = await new_gateway_url(h.mesh, len(gateways), timeout_s=60)
        ready_s = round(time.monotonic() - killed, 2)
        served_s = await first_answer(h.mesh.url, killed, timeout_s=60)
        await asyncio.sleep(max(killed + STOP_WINDOW_S - time.monotonic(), 0))  # the counters' window
    finally:
        sampler.cancel()
    return {"spare_waiting": spare, **dead_work(samples, killed), "ready_s": ready_s, "served_s": served_s}


STOP_WINDOW_S = DEAD_GATEWAY_STOP_S + 1.0  # the workers' counters are sampled this long after the kill
PROBE_TOKENS = 4  # what the new gateway's first request (``first_answer``) may generate


def dead_work(samples: list[tuple[float, int]], killed: float) -> dict:
    """When the workers stopped generating for the dead gateway, from their token counters sampled
    after the kill: the last interval that grew by more than the new gateway's probe can
    (``PROBE_TOKENS``; the dead gateway's 4 long streams grow them by tens each interval).
    ``quiet_samples``: intervals after it; ``trickle_tokens``: what they grew by in all (the
    probe's, at most PROBE_TOKENS, if the work really stopped)."""
    steps = [(t, m - n) for (t, n), (_, m) in zip(samples, samples[1:])]
    busy = [i for i, (_, grown) in enumerate(steps) if grown > PROBE_TOKENS]
    last = busy[-1] if busy else -1
    return {
        "stopped_s": round((steps[last][0] if busy else killed) - killed, 2),
        "tokens_after_kill": sum(grown for _, grown in steps[: last + 1]),
        "quiet_samples": len(steps) - last - 1,
        "trickle_tokens": sum(grown for _, grown in steps[last + 1 :]),
    }


async def spare_waiting(mesh: Mesh, timeout_s: float) -> bool:
    """Whether the gateway's spare says it waits (within ``timeout_s``): the restart measured is
    the one a gateway that dies after its first seconds gets."""
    deadline = time.monotonic() + timeout_s

    def waiting() -> bool:  # a spare per restart so far, and one more
        lines = list(mesh.output)
        spares = sum(line.startswith("[gateway-0-standby] standby gateway") for line in lines)
        return spares > sum(line.startswith("exegpt up: gateway-0 exited") for line in lines)

    while not waiting():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)  # polling the launcher's output for the spare's line
    return True


def gateway_urls(mesh: Mesh) -> list[str]:
    return [line.split()[-1] for line in list(mesh.output) if line.startswith("[gateway-0] ready gateway ")]


async def new_gateway_url(mesh: Mesh, known: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while len(urls := gateway_urls(mesh)) <= known:
        if time.monotonic() > deadline:
            raise SetupError(f"no gateway started again within {timeout_s:g} s:\n{mesh.tail()}")
        await asyncio.sleep(0.05)  # polling the launcher's output for the new ready line
    return urls[-1]


async def sample_tokens(h: Harness, samples: list[tuple[float, int]]) -> None:
    """Append (time, tokens the workers generated so far) every 0.1 s until cancelled."""
    while True:
        samples.append((time.monotonic(), sum((await h.worker_tokens()).values())))
        await asyncio.sleep(0.1)  # sampling the workers' counters


async def first_answer(url: str, since: float, timeout_s: float) -> float | None:
    """Seconds from ``since`` until ``url`` answers a completion with 200 (None: not in time)."""
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        while time.monotonic() < since + timeout_s:
            try:
                if (await client.post("/v1/completions", json=body)).status_code == 200:
                    return round(time.monotonic() - since, 2)
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)  # polling until the new gateway serves
    return None


async def overload(h: Harness, clients: Clients) -> dict:
    """Ten times the clients for ``baseline_s``; then back to the steady load."""
    burst_over = asyncio.Event()
    extra = [asyncio.create_task(clients.loop(1000 + i, burst_over)) for i in range(9 * h.settings.clients)]
    await asyncio.sleep(h.settings.baseline_s)  # the burst lasts this long
    burst_over.set()
    await asyncio.gather(*extra)  # each extra client's last request answered
    return {"clients": 10 * h.settings.clients}


async def abandon(h: Harness, clients: Clients) -> dict:
    """100 clients each send a long completion and leave after 0.2 s; the gateway must drop
    them (in flight back to where it was) and the workers must stop running them."""

    async def leave(i: int) -> None:
        body = {"model": MODEL, "prompt": f"{ABANDON_PREFIX} {i}", "max_tokens": 400, "temperature": 0}
        try:
            await clients.client.post("/v1/completions", json=body, timeout=0.2)
        except httpx.TimeoutException:
            pass  # the client left

    await asyncio.gather(*(leave(i) for i in range(100)))
    in_flight = await gateway_in_flight(clients.client)
    deadline = time.monotonic() + 10
    while in_flight > h.settings.clients and time.monotonic() < deadline:
        await asyncio.sleep(0.2)  # polling the gateway's gauge until it has dropped them
        in_flight = await gateway_in_flight(clients.client)
    return {"abandoned": 100, "in_flight_after": in_flight}


async def gateway_in_flight(client: httpx.AsyncClient) -> int:
    """The gateway's ``exegpt_requests_in_flight`` gauge."""
    for line in (await client.get("/metrics")).text.splitlines():
        if line.startswith("exegpt_requests_in_flight"):
            return int(float(line.split()[-1]))
    raise SetupError("the gateway exports no exegpt_requests_in_flight")


async def too_large(h: Harness, clients: Clients) -> dict:
    """A prompt + max_tokens no worker's KV cache holds: a 400 that says so, at once."""
    body = {"model": MODEL, "prompt": [7] * TOO_LARGE_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    began = time.monotonic()
    response = await clients.client.post("/v1/completions", json=body)
    took = time.monotonic() - began
    message = response.json().get("error", {}).get("message", "") if is_error_body(response) else response.text
    return {"status": response.status_code, "seconds": round(took, 2), "message": message[:160]}


FLUSH_FINISHED_LINES, FLUSH_RUNNING_LINES = 8, 32
BATCH_TIMEOUT_S = 90.0  # a batch of FLUSH_RUNNING_LINES beside the steady load ends well within this


async def store_flush(h: Harness, clients: Clients) -> dict:
    """FLUSHALL on the mesh's Redis while one Batch API batch runs and another has finished.
    The batch folder keeps files, records and results; the store only an index, rebuilt. After
    the flush: the finished batch, its files and the listing answer as before; the running batch
    ends with each line once, with its prompt's reference text."""
    api = clients.client
    finished = await submit_batch(api, FLUSH_FINISHED_LINES)
    finished = await batch_done(api, finished["id"], BATCH_TIMEOUT_S)
    before = await batch_view(api, finished)
    running = await submit_batch(api, FLUSH_RUNNING_LINES)
    await batch_progress(api, running["id"], 1, BATCH_TIMEOUT_S)  # some of its lines are done
    flushed = await asyncio.to_thread(h.services.flush_redis)
    after = await batch_view(api, await batch_done(api, finished["id"], 10))
    running = await batch_done(api, running["id"], BATCH_TIMEOUT_S)
    output = (await api.get(f"/v1/files/{running['output_file_id']}/content")).text.splitlines()
    lines = [json.loads(line) for line in output]
    texts = {line["custom_id"]: line["response"]["body"]["choices"][0]["text"] for line in lines}
    wrong = sum(1 for custom_id, text in texts.items() if text != h.reference[batch_prompt(custom_id)])
    listed = {b["id"] for b in (await api.get("/v1/batches", params={"limit": 100})).json()["data"]}
    return {
        "flushed": flushed,
        "finished_same": after == before,
        "running": {
            "status": running["status"],
            "total": running["request_counts"]["total"],
            "lines": len(texts),
            "repeated": len(lines) - len(texts),
            "wrong": wrong,
        },
        "listed": {finished["id"], running["id"]} <= listed,
    }


def batch_prompt(custom_id: str) -> str:
    return PROMPTS[int(custom_id.rsplit("-", 1)[1]) % len(PROMPTS)]


async def submit_batch(api: httpx.AsyncClient, lines: int) -> dict:
    """A Batch API batch of ``lines`` greedy completions of the reference prompts."""
    tag = secrets.token_hex(3)
    body = "".join(
        json.dumps(
            {
                "custom_id": f"{tag}-{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {
                    "model": MODEL,
                    "prompt": batch_prompt(f"{tag}-{i}"),
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                },
            }
        )
        + "\n"
        for i in range(lines)
    )
    file = await api.post(
        "/v1/files", data={"purpose": "batch"}, files={"file": ("lines.jsonl", body.encode(), "application/jsonl")}
    )
    file.raise_for_status()
    batch = await api.post("/v1/batches", json={"input_file_id": file.json()["id"], "endpoint": "/v1/completions"})
    batch.raise_for_status()
    return batch.json()


async def batch_progress(api: httpx.AsyncClient, batch_id: str, lines: int, timeout_s: float) -> dict:
    """The batch once at least ``lines`` of it are done (completed or failed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = await api.get(f"/v1/batches/{batch_id}")
        if response.status_code == 200:
            batch = response.json()
            counts = batch["request_counts"]
            if counts["completed"] + counts["failed"] >= lines or batch["status"] != "in_progress":
                return batch
        if time.monotonic() > deadline:
            raise SetupError(f"batch {batch_id}: {lines} lines not done in {timeout_s:g} s: {response.text[:300]}")
        await asyncio.sleep(0.2)  # polling the Batch API, as its clients do


async def batch_done(api: httpx.AsyncClient, batch_id: str, timeout_s: float) -> dict:
    return await batch_progress(api, batch_id, 1 << 30, timeout_s)


async def batch_view(api: httpx.AsyncClient, batch: dict) -> dict:
    """What a client reads of a finished batch: its object, its input file, its output."""
    return {
        "batch": batch,
        "input": (await api.get(f"/v1/files/{batch['input_file_id']}/content")).text,
        "file": (await api.get(f"/v1/files/{batch['input_file_id']}")).json(),
        "output": (await api.get(f"/v1/files/{batch['output_file_id']}/content")).text,
    }


SLOWLORIS_CONNECTIONS = 1000
SLOWLORIS_SOURCES = 4  # loopback addresses they come from: 250 each, under the per-client cap (256)
SLOWLORIS_S = 15.0  # longer than the header timeout (10 s): each is closed by the gateway at least once
SLOWLORIS_RAMP_S = 2.0  # the normal clients' latencies count from this long after the attack began
SLOWLORIS_P99_RATIO = 1.10
ATTACKER_NICE = 10  # an attacker is not on the gateway's host: here it shares its cores, so it yields them
SLOWLORIS_FD_MARGIN = 16  # the gateway's descriptors after the attack, over those before it
SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Slow: "


def slowloris(connections: int) -> Callable[[Harness, Clients], Awaitable[dict]]:
    """``connections`` clients that open a request and send its headers a byte a second, never
    finishing them, opening another when the gateway closes theirs; the steady clients go on.
    Their p99 latency over the attack (after a ramp) against a window as long without it, just
    before (that window's completions per second are also the reference for the throughput's
    return: nearer and longer than the baseline); the gateway's open descriptors before, at most
    during, and once the header timeout has closed the slow ones."""

    async def fault(h: Harness, clients: Clients) -> dict:
        url = urlsplit(h.mesh.url)
        pid = h.mesh.role_pids("gateway")[0]
        fds_before = fd_count(pid)
        quiet = time.monotonic()
        await asyncio.sleep(SLOWLORIS_S)  # a window as long as the attack's, without it, to compare with
        began = time.monotonic()
        before = latencies(clients, quiet + SLOWLORIS_RAMP_S, began)
        fds = [fds_before]
        sampler = asyncio.create_task(sample_fds(pid, fds))
        counts = await attack(url.hostname or "127.0.0.1", url.port or 80, connections, SLOWLORIS_S)
        ended = time.monotonic()
        sampler.cancel()
        during = latencies(clients, began + SLOWLORIS_RAMP_S, began + SLOWLORIS_S)  # as long as the quiet window
        fds_after = await settled_fds(pid, fds_before)
        p99_before, p99_during = percentile(before, 0.99), percentile(during, 0.99)
        return {
            "per_s_quiet": per_second(clients, quiet, began),  # the reference for the throughput's return
            "connections": connections,
            "opened": counts["opened"],
            "closed_by_gateway": counts["closed"],
            "refused": counts["refused"],
            "fds_before": fds_before,
            "fds_max": max(fds),
            "fds_after": fds_after,
            "p99_before_ms": round(1000 * p99_before, 1),
            "p99_during_ms": round(1000 * p99_during, 1),
            "p50_before_ms": round(1000 * percentile(before, 0.5), 1),
            "p50_during_ms": round(1000 * percentile(during, 0.5), 1),
            "samples": [len(before), len(during)],
            "p99_ratio": round(p99_during / p99_before, 3) if before and during else None,
            "per_s_attack": per_second(clients, began, ended),
        }

    return fault


def per_second(clients: Clients, start: float, end: float) -> list[int]:
    """Completions in each whole second from ``start`` to ``end``."""
    return [clients.completions_between(start + i, start + i + 1) for i in range(int(end - start))]


async def attack(host: str, port: int, connections: int, seconds: float) -> dict:
    """The slow clients, in a process of their own (their event loop is not the normal
    clients'), for ``seconds``: what the gateway did to their connections."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_attack_process, args=(host, port, connections, seconds, results))
    process.start()
    try:
        return await asyncio.to_thread(results.get, True, seconds + 60)
    finally:
        await asyncio.to_thread(process.join, 10)


def _attack_process(host: str, port: int, connections: int, seconds: float, results: Any) -> None:
    os.nice(ATTACKER_NICE)

    async def run() -> dict:
        stop, counts = asyncio.Event(), {"opened": 0, "closed": 0, "refused": 0}
        held: set[asyncio.StreamWriter] = set()
        tasks = [
            asyncio.create_task(slow_client(host, port, f"127.0.1.{1 + i % SLOWLORIS_SOURCES}", stop, counts, held))
            for i in range(connections)
        ]
        deadline = time.monotonic() + seconds  # the attack lasts this long
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(1.0, left))  # a byte a second on every connection held
            for writer in list(held):
                writer.write(b"a")
        stop.set()
        for writer in list(held):
            writer.close()  # each client's read then ends, and it stops
        await asyncio.gather(*tasks)
        return counts

    results.put(asyncio.run(run()))


async def slow_client(
    host: str, port: int, source: str, stop: asyncio.Event, counts: dict, held: set[asyncio.StreamWriter]
) -> None:
    """One slow-header connection after another until ``stop``; counts what the gateway did. The
    bytes are written by the attack's one ticker (a timer per connection would cost the shared
    host more CPU than the gateway spends on them)."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        except OSError:
            counts["refused"] += 1
            continue
        if stop.is_set():  # connected after the attack's end: the ticker has closed the others
            writer.close()
            break
        counts["opened"] += 1
        writer.write(SLOW_HEAD)
        held.add(writer)
        try:
            answer = await reader.read(4096)  # until the gateway answers or closes (or the attack ends)
        except OSError:
            answer = b""
        held.discard(writer)
        writer.close()
        if not stop.is_set():
            counts["closed" if b" 408 " in answer or not answer else "refused"] += 1


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def sample_fds(pid: int, samples: list[int]) -> None:
    while True:
        samples.append(fd_count(pid))
        await asyncio.sleep(0.25)  # sampling the gateway's descriptors


async def settled_fds(pid: int, before: int, timeout_s: float = 15.0) -> int:
    """The gateway's descriptors once back within the margin of ``before`` (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while (now := fd_count(pid)) > before + SLOWLORIS_FD_MARGIN and time.monotonic() < deadline:
        await asyncio.sleep(0.25)  # polling /proc until the gateway has closed them
    return now


def latencies(clients: Clients, start: float, end: float) -> list[float]:
    """Seconds each request sent and answered within [start, end) took."""
    return [
        r.ended_at - r.sent_at
        for r in clients.records
        if r.outcome == "completed" and r.ended_at is not None and start <= r.sent_at and r.ended_at < end
    ]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


FAULTS: dict[str, tuple[Callable[[Harness, Clients], Awaitable[dict]], float]] = {
    "kill-worker": (kill_worker, 0.0),
    "redis-3s": (redis_down(3), 3.0),
    "redis-30s": (redis_down(30), 30.0),
    "broker-10s": (broker_down(10), 10.0),
    "broker-30s": (broker_down(30), 30.0),
    "poison": (poison, 0.0),
    "overload": (overload, 0.0),
    "abandon": (abandon, 0.0),
    "too-large": (too_large, 0.0),
    "topology-loss": (topology_loss, 0.0),
    "hung-worker": (hung_worker(40), 0.0),
    "paused-worker": (hung_worker(2), 0.0),
    "store-flush": (store_flush, 0.0),
    "slowloris": (slowloris(SLOWLORIS_CONNECTIONS), 0.0),
}


# ==== the command ================================================================================


async def run_scenarios(
    names: list[str],
    settings: Settings,
    *,
    workers: int = 2,
    on_outcome: Callable[[Outcome], None] | None = None,
    mesh_log: Path | None = None,
) -> list[Outcome]:
    services = PrivateServices()
    mesh: Mesh | None = None
    try:
        await asyncio.to_thread(services.start)
        mesh = Mesh(services, workers=workers)
        await asyncio.to_thread(mesh.start)
        harness = Harness(services, mesh, settings)
        await harness.prepare()
        outcomes = []
        for name in names:
            outcome = await harness.run(name)
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
            if not outcome.up:
                break  # the rest would measure a broken mesh
        return outcomes
    finally:
        if mesh is not None:
            mesh.close()
            if mesh_log is not None:
                mesh_log.write_text("".join(mesh.output))
        services.close()


COLUMNS = (
    "scenario",
    "sent",
    "completed",
    "refused",
    "failed",
    "unclear",
    "hung",
    "wrong",
    "before/s",
    "recovery_s",
    "up",
)


def row(o: Outcome) -> list[str]:
    recovery = "-" if o.recovery_s is None else f"{o.recovery_s:.1f}"
    return [
        o.scenario,
        str(o.sent),
        f"{o.completed} ({100 * o.completed_share:.1f}%)",
        str(o.refused),
        str(o.failed),
        str(o.unclear),
        str(o.hung),
        str(o.wrong),
        f"{o.before_per_s:.1f}",
        recovery,
        "yes" if o.up else "NO",
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenarios",
        default=",".join(ALL + LONG),
        help=f"comma-separated, in order (default all: {','.join(ALL + LONG)})",
    )
    parser.add_argument("--clients", type=int, default=Settings.clients, help="steady closed-loop clients")
    parser.add_argument(
        "--baseline-s",
        type=float,
        default=Settings.baseline_s,
        help="steady load before each fault (its throughput is the one to recover)",
    )
    parser.add_argument(
        "--observe-s",
        type=float,
        default=Settings.observe_s,
        help="how long after a fault the throughput may take to come back",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every outcome here")
    parser.add_argument("--mesh-log", type=Path, help="write the mesh's output (every process's) here")


def run(args: argparse.Namespace) -> int:
    why = available()
    if why is not None:
        print(f"exegpt bench faults: {why}", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL + LONG]
    if unknown:
        print(f"exegpt bench faults: unknown scenarios {unknown}; known: {', '.join(ALL + LONG)}", file=sys.stderr)
        return 2
    settings = Settings(args.clients, args.baseline_s, args.observe_s)
    print(
        f"faults: {len(names)} scenarios, {args.workers} workers, {settings.clients} clients, "
        f"request deadline {REQUEST_TIMEOUT_S:g} s; private RabbitMQ and Redis on loopback",
        flush=True,
    )
    print(" | ".join(COLUMNS), flush=True)

    def stopped(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")  # the private services and the mesh are stopped on the way out

    signal.signal(signal.SIGTERM, stopped)
    outcomes = asyncio.run(
        run_scenarios(
            names,
            settings,
            workers=args.workers,
            mesh_log=args.mesh_log,
            on_outcome=lambda o: print(" | ".join(row(o)), flush=True),
        )
    )
    missed = {o.scenario: o.goals_met() for o in outcomes}
    for o in outcomes:
        if o.extra:
            print(f"  {o.scenario}: {json.dumps(o.extra)}")
        for line in o.details:
            print(f"  {o.scenario}: {line}")
    for name, what in missed.items():
        print(f"{name}: {'goals met' if not what else 'MISSED: ' + ', '.join(what)}")
    if args.json:
        args.json.write_text(
            json.dumps([{**asdict(o), "completed_share": o.completed_share} for o in outcomes], indent=1)
        )
    return 0 if len(outcomes) == len(names) and not any(missed.values()) else 1
