"""`exegpt bench schedules`: the schedules the planner picks against static and continuous
batching, measured side by side on this machine's two workers, each with the simulator's
prediction beside it.

One run:

1. Profile under the run's own contention: two `exegpt profile` processes at once, each pinned to
   a core with one torch thread; the first also measures the hand-off link. Its profile (its hash
   is printed) and cluster description are what the plans and predictions use.
2. A mesh of two worker processes (one torch thread each, pinned to a core each) and a scheduler
   over RabbitMQ + Redis. This process is the client: it submits through the gateway's core
   (no HTTP), niced, as are the scheduler, RabbitMQ and Redis while the run lasts.
3. Per task (the paper's lengths times ``--scale``): first a **calibration run**
   (``calibration_schedules``: continuous batching, the mixed policy and WAA-C at the largest
   batch, then static batching at a quarter of it, ``--calibration-requests`` requests each, the
   same load): the workers' step records (the sample their heartbeats carry)
   fit the calibrated cost model (``optimizer.calibration``) as the scheduler fits it, and every
   plan and prediction of the task uses it (``--no-calibration``: the profile as measured). Then
   a static batching sweep and a continuous batching sweep, each setting under saturated
   closed-loop load (as many requests outstanding as the schedule has decode slots), every length
   forced (``ignore_eos``), one request in ten a probe at the task's 99th-percentile input and
   output length. The bounds are the 10th, 30th and 70th percentiles of the static sweep's
   measured p99-length latencies, and none. For each bound the planner picks, in the simulator,
   ExeGPT's best (RRA, WAA-C, WAA-M: the paper's claim, ``exegpt`` rows) and the product's (every
   policy, what `exegpt plan --policy any` and the scheduler run: ``product`` rows); both are
   measured too.
4. Per bound: those two, and the best static and continuous settings of the sweeps that meet the
   bound (measured). Throughput is completions per second over the middle 60 % of the
   completions; the p99-length latency is the median of the probes' (arrival at the encode queue
   to last token) in that window. ``optimizer.simulator.load_figures`` computes both, on the
   measured time line (workers' ``LengthSample`` records) and on the simulated one (the same
   requests, the same closed loop, the calibrated step times).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from services.run import children

if TYPE_CHECKING:
    from optimizer.schedule import Policy, Schedule

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "smollm2"
TASKS = ("S", "T", "G", "C1", "C2")
PERCENTILES = (10, 30, 70)
NICE = 10  # the client, the scheduler, RabbitMQ and Redis, while the run lasts
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Plan:
    """The settings one task runs, and how."""

    task: str
    scale: float
    static: tuple[int, ...]  # batch sizes of the static sweep
    continuous: tuple[int, ...]  # decode batches of the continuous sweep
    bounds: tuple[str, ...]  # which bounds get a row: p10, p30, p70, inf
    requests: int
    repeats: int
    max_batch: int
    verify: bool = True  # the plan checked in the simulator (exegpt plan --verify)
    calibration_requests: int = 120  # per setting of the calibration run (0: none, the raw profile)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="task S only, the tightest bound and none, short sweeps, one repetition (~3 min)",
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--scale", type=float, default=0.25, help="the tasks' lengths times this (default 0.25)")
    parser.add_argument("--requests", type=int, default=200, help="requests per setting (at least)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of every setting")
    parser.add_argument("--max-batch", type=int, default=32, help="largest B_E / B_D a worker runs")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="reuse this profile (its -cluster.json beside it) instead of profiling first",
    )
    parser.add_argument(
        "--calibration-requests",
        type=int,
        default=None,
        help="requests per setting of the calibration run (default 120; --quick 80)",
    )
    parser.add_argument(
        "--no-calibration", action="store_true", help="plan and predict on the profile as measured (no calibration run)"
    )
    parser.add_argument(
        "--unverified", action="store_true", help="run the search's pick as is (exegpt plan without --verify)"
    )
    parser.add_argument(
        "--keep-profile",
        metavar="DIR",
        default=None,
        help="copy the profile and cluster this run measured into DIR (for --profile later)",
    )
    parser.add_argument("--amqp-url", default=os.environ.get("EXEGPT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--redis-url", default=os.environ.get("EXEGPT_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--seed", type=int, default=0)


def plans_for(args: argparse.Namespace) -> list[Plan]:
    given = getattr(args, "calibration_requests", None)
    calibration = 0 if getattr(args, "no_calibration", False) else (given or (80 if args.quick else 120))
    if args.quick:
        return [
            Plan(
                "S",
                args.scale,
                (4, 16),
                (8, 32),
                ("p10", "inf"),
                min(args.requests, 120),
                1,
                args.max_batch,
                not args.unverified,
                calibration,
            )
        ]
    return [
        Plan(
            t,
            args.scale,
            (4, 8, 16, 32),
            (4, 8, 16, 32),
            ("p10", "p30", "p70", "inf"),
            args.requests,
            args.repeats,
            args.max_batch,
            not args.unverified,
            calibration,
        )
        for t in args.tasks
    ]


def run(args: argparse.Namespace) -> int:
    from common.cli import CliError

    cores = os.cpu_count()
    if cores is None or cores < 2:
        raise CliError("bench schedules pins two workers to two cores; this machine has fewer")
    plans = plans_for(args)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)  # stopped: the processes it started stop too
    with tempfile.TemporaryDirectory(prefix="exegpt-bench-") as tmp:
        profile = args.profile or profile_here(Path(tmp), plans, args)
        cluster = profile.with_name(f"{profile.stem}-cluster.json")
        digest = hashlib.sha256(profile.read_bytes()).hexdigest()[:16]
        print(f"profile {profile} sha256 {digest}; cluster {cluster}", flush=True)
        if args.keep_profile:
            kept = Path(args.keep_profile)
            kept.mkdir(parents=True, exist_ok=True)
            for f in (profile, cluster):
                shutil.copy(f, kept / f.name)
            print(f"profile and cluster kept in {kept}", flush=True)
        rows = asyncio.run(bench(args, plans, profile, cluster, lambda done: progress(done, digest, args)))
    print_rows(rows, digest, args.scale)
    print(f"\nwall time {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_json() for r in rows], indent=1))
    return 0


def progress(rows: list[Row], digest: str, args: argparse.Namespace) -> None:
    """After each task: its table, and the JSON so far (a long run stopped early keeps what it measured)."""
    if rows:
        print_rows([r for r in rows if r.task == rows[-1].task], digest, args.scale)
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_json() for r in rows], indent=1))


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


# --- 1. profile, under the run's own contention ------------------------------------------------------


class TaskAtScale(Protocol):
    """What a profile needs to know of a run: its task and length scale."""

    @property
    def task(self) -> str: ...

    @property
    def scale(self) -> float: ...


def profile_here(
    folder: Path, plans: Sequence[TaskAtScale], args: argparse.Namespace, repeats: int | None = None
) -> Path:
    """Two profiles at once, one per core (both cores busy, as in the run); the first is used.
    ``repeats``: timings per point (None: `exegpt profile`'s default)."""
    from optimizer.lengths import scaled_task

    longest = max(w.input.maximum + w.output.maximum for w in (scaled_task(p.task, p.scale) for p in plans))
    procs = []
    for core in (0, 1):
        out = folder / f"core{core}.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "services.cli",
            "profile",
            "--model",
            MODEL,
            "--out",
            str(out),
            "--threads",
            "1",
            "--max-len",
            str(longest),
            "--max-batch",
            str(2 * args.max_batch),
            "--no-collectives",
        ]  # its workers are single processes: no TP all-reduce to cost
        if core == 0:
            cmd += ["--amqp-url", args.amqp_url, "--redis-url", args.redis_url]
        if repeats is not None:
            cmd += ["--repeats", str(repeats)]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=child_env({}),
                preexec_fn=pin(core),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        from common.cli import CliError

        raise CliError("profiling failed:\n" + "\n".join(outputs))
    print(outputs[0].strip().splitlines()[-1], flush=True)
    return folder / "core0.jsonl"


def pin(core: int, nice: int = 0):
    def child() -> None:
        os.sched_setaffinity(0, {core})
        if nice:
            os.nice(nice)
        die_with_parent()

    return child


def die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the benchmark process dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_env(extra: dict[str, str]) -> dict[str, str]:
    return children.child_env({**extra, "OMP_NUM_THREADS": "1"})


# --- 2. the mesh ---------------------------------------------------------------------------------------


class Processes:
    """The scheduler (niced) and two workers (one pinned to each core), as separate processes."""

    def __init__(self, config) -> None:
        env = {f"EXEGPT_{k.upper()}": str(v) for k, v in config.model_dump().items() if v is not None}
        self.env = child_env(env)
        self.procs: list[children.ChildProcess] = []

    def start(self) -> None:
        self._spawn(["scheduler"], pin(0, NICE)).wait_line("ready ")
        for proc in [self._spawn(["worker"], pin(core)) for core in (0, 1)]:
            proc.wait_line("ready ")

    def _spawn(self, args: list[str], setup) -> children.ChildProcess:
        proc = children.ChildProcess.cli(*args, env=self.env, preexec_fn=setup)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        children.stop_all(self.procs, timeout_s=60)


@contextmanager
def niced_services(names: tuple[str, ...] = ("beam.smp", "redis-server")) -> Iterator[list[tuple[int, str]]]:
    """RabbitMQ and Redis at a lower priority while the run lasts (restored afterwards)."""
    changed: list[tuple[int, int, str]] = []
    for name in names:
        found = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
        for pid in map(int, found):
            try:
                before = os.getpriority(os.PRIO_PROCESS, pid)
                os.setpriority(os.PRIO_PROCESS, pid, NICE)
                changed.append((pid, before, name))
            except OSError:
                pass
    try:
        yield [(pid, name) for pid, _, name in changed]
    finally:
        for pid, before, _ in changed:
            try:
                os.setpriority(os.PRIO_PROCESS, pid, before)
            except OSError:
                pass


# --- 3. load and figures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """The requests of one setting, in the order the closed loop sends them."""

    ids: tuple[str, ...]
    input_lens: tuple[int, ...]
    output_lens: tuple[int, ...]
    probes: frozenset[str]

    @staticmethod
    def draw(workload, n: int, seed: int, tag: str) -> Load:
        from optimizer.verify import ProbeLoad

        drawn = ProbeLoad.draw(workload, n, seed, tag)
        return Load(
            tuple(r.request_id for r in drawn.requests),
            tuple(r.input_len for r in drawn.requests),
            tuple(r.output_len for r in drawn.requests),
            drawn.probes,
        )

    def simulated(self):
        from optimizer.simulator import SimRequest

        return tuple(SimRequest(i, a, b) for i, a, b in zip(self.ids, self.input_lens, self.output_lens))

    def renamed(self, run: int) -> Load:
        """The same requests under ids of their own (every run's requests finish once each)."""
        name = lambda i: f"{i}-r{run}"  # noqa: E731
        return Load(tuple(map(name, self.ids)), self.input_lens, self.output_lens, frozenset(map(name, self.probes)))

    def first(self, n: int) -> Load:
        ids = self.ids[:n]
        return Load(ids, self.input_lens[:n], self.output_lens[:n], self.probes & frozenset(ids))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` (Linux /proc; processes gone count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Measured:
    throughputs: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    predicted: tuple[float, float] = (math.nan, math.nan)
    per_worker: list[int] = field(default_factory=list)  # requests each worker finished, last run
    busy: list[float] = field(default_factory=list)  # each worker's engine time / wall time, last run
    others: float = math.nan  # cores the broker, Redis, client and scheduler used, last run
    phases: tuple[float, float] = (math.nan, math.nan)  # mean queue wait, mean service (s), last run
    sim_phases: tuple[float, float] = (math.nan, math.nan)  # the same, simulated

    @property
    def throughput(self) -> float:
        return statistics.median(self.throughputs)

    @property
    def latency(self) -> float:
        return statistics.median(self.latencies)


class Bench:
    """The client: pins schedules at the scheduler, drives closed-loop load through the gateway's
    core, reads the workers' finish records."""

    def __init__(self, config, stack: AsyncExitStack) -> None:
        self.config, self.stack = config, stack
        self.versions: dict[str, int] = {}  # worker id -> the schedule version it last reported
        self.engine: dict[str, tuple[float, float]] = {}  # worker id -> (report time, engine seconds)
        self.heard = asyncio.Event()
        self.runs = 0
        self.requests = 0  # at least this many per setting
        self.others: list[int] = []  # the processes that share the workers' cores: broker, Redis, ...
        self.step_costs: list | None = None  # while a calibration run lasts: the workers' step records

    async def start(self) -> None:
        from common.names import Names
        from common.transport.connect import LocalHub, open_transports
        from services.front.core import Gateway

        self.names = Names(self.config.namespace)
        self.transports = await open_transports(self.config, self.names, LocalHub())
        self.stack.push_async_callback(self.transports.close)
        self.gateway = Gateway(self.config, await open_transports(self.config, self.names, LocalHub()), MODEL)
        await self.gateway.start()
        self.stack.push_async_callback(self.gateway.close)
        statuses = await self.transports.bus.subscribe(self.names.status_exchange, self.names.status_queue("bench"))
        listening = asyncio.create_task(self._listen(statuses))
        self.stack.callback(listening.cancel)

    async def _listen(self, statuses) -> None:
        from common.messages import codec
        from common.messages.status import WorkerStatus

        async for delivery in statuses:
            status = codec.decode(delivery.body, WorkerStatus)
            await delivery.ack()
            self.versions[status.worker_id] = status.schedule_version
            self.engine[status.worker_id] = (status.at, status.engine_s)
            if self.step_costs is not None:
                self.step_costs.extend(status.step_costs)
            self.heard.set()

    def busy(self, before: dict) -> list[float]:
        """Each worker's engine time over wall time since ``before`` (a copy of ``engine``)."""
        return sorted(
            (e1 - before[w][1]) / (at1 - before[w][0])
            for w, (at1, e1) in self.engine.items()
            if w in before and at1 > before[w][0]
        )

    async def pin(self, schedule) -> None:
        """Run ``schedule`` and wait until both workers applied it (their status reports say so)."""
        from common.scheduling import current_schedule, request_schedule
        from services.schedules import wire_schedule

        wanted = wire_schedule(schedule)
        await request_schedule(self.transports.bus, self.names, wanted)
        async with asyncio.timeout(READY_TIMEOUT_S):
            while True:
                update = await current_schedule(self.transports.store, self.names)
                applied = 0 if update is None else sum(v >= update.version for v in self.versions.values())
                if update is not None and update.schedule == wanted and applied >= 2:
                    return
                self.heard.clear()
                await self.heard.wait()

    async def closed_loop(self, load: Load, outstanding: int) -> list:
        """Send ``load`` keeping ``outstanding`` requests in flight; the workers' finish records."""
        from common.messages.work import Sampling

        queue = iter(range(len(load.ids)))

        async def client() -> None:
            for i in queue:
                prompt = [100 + (7 * i + 13 * k) % 20_000 for k in range(load.input_lens[i])]
                pending = await self.gateway.submit(
                    prompt, Sampling(load.output_lens[i], ignore_eos=True), request_id=load.ids[i], stream=False
                )
                async for _ in pending.tokens():
                    pass

        await asyncio.gather(*(client() for _ in range(min(outstanding, len(load.ids)))))
        return await self.records(set(load.ids))

    async def records(self, ids: set[str]) -> list:
        from common.scheduling import recent_lengths

        samples = await recent_lengths(self.transports.store, self.names, 2 * len(ids))
        return [s for s in samples if s.request_id in ids]


async def measure(bench: Bench, schedule, load: Load, into: Measured) -> None:
    from optimizer.simulator import Completion, load_figures
    from optimizer.verify import outstanding, requests_for

    await bench.pin(schedule)
    bench.runs += 1
    load = load.first(requests_for(schedule, bench.requests)).renamed(bench.runs)
    before, cpu, wall = dict(bench.engine), cpu_seconds(bench.others), time.monotonic()
    records = await bench.closed_loop(load, outstanding(schedule))
    into.busy = bench.busy(before)
    into.others = (cpu_seconds(bench.others) - cpu) / (time.monotonic() - wall)
    figures = load_figures(
        [Completion(r.request_id, r.submitted_at, r.finished_at) for r in records], load.probes, outstanding(schedule)
    )
    into.throughputs.append(figures.throughput_seq_s)
    into.latencies.append(figures.p99_length_latency_s)
    into.per_worker = sorted(Counter(r.worker for r in records).values())
    stamped = [r for r in records if r.encode_start_at]  # a WAA decoder's record has no encode start
    if stamped:
        into.phases = (
            statistics.mean(r.encode_start_at - r.submitted_at for r in stamped),
            statistics.mean(r.finished_at - r.encode_start_at for r in stamped),
        )


def predict(sc, schedule, load: Load, into: Measured | None = None) -> tuple[float, float]:
    """Simulated throughput and p99-length latency of ``load``; ``into`` also gets the simulated
    mean queue wait and service time (how a prediction error splits)."""
    from optimizer.verify import ProbeLoad, run_figures, simulate_load

    probe_load = ProbeLoad(load.simulated(), load.probes)
    sim = simulate_load(sc, schedule, probe_load)
    figures = run_figures(sim, probe_load, schedule)
    if into is not None:
        into.sim_phases = (
            statistics.mean(r.encode_start_s - r.arrival_s for r in sim.records),
            statistics.mean(r.finish_s - r.encode_start_s for r in sim.records),
        )
    return figures.throughput_seq_s, figures.p99_length_latency_s


# --- 4. per task: sweeps, bounds, plans, rows ----------------------------------------------------------


@dataclass(frozen=True)
class Row:
    task: str
    bound_label: str
    bound_s: float
    system: str
    schedule: Schedule
    measured: Measured

    @property
    def meets_bound(self) -> bool:
        return self.measured.latency <= self.bound_s

    def as_json(self) -> dict:
        m = self.measured
        return {
            "task": self.task,
            "bound_s": None if math.isinf(self.bound_s) else self.bound_s,
            "system": self.system,
            "schedule": asdict(self.schedule),
            "measured_throughput": m.throughput,
            "predicted_throughput": m.predicted[0],
            "measured_latency_s": m.latency,
            "predicted_latency_s": m.predicted[1],
            "meets_bound": self.meets_bound,
        }


def scenario(profile: Path, cluster: Path, workload, calibration=None):
    from optimizer.analytic import Scenario
    from optimizer.io import load_cluster, load_profile
    from services.scheduler.planning import model_shape

    return Scenario(
        model_shape(MODEL, 4), load_profile(profile), load_cluster(cluster), workload, 2, calibration=calibration
    )


async def calibrate(bench: Bench, plan: Plan, sc, load: Load):
    """The calibration run: ``calibration_schedules``, ``plan.calibration_requests`` requests
    each; the workers' step records fit the calibrated
    cost model against ``sc``'s raw profile. Returns the frozen table (None: no calibration)."""
    from optimizer.calibration import Calibration
    from services.scheduler.calibrate import observe, points

    if plan.calibration_requests <= 0:
        return None
    started, bench.step_costs = time.monotonic(), []
    settings = calibration_schedules(plan.max_batch)
    saved, bench.requests = bench.requests, plan.calibration_requests
    try:
        for schedule in settings:
            await measure(bench, schedule, load, Measured())
        await asyncio.sleep(1.5 * bench.config.heartbeat_s)  # the last heartbeats carry the last steps
    finally:
        costs, bench.step_costs, bench.requests = bench.step_costs, None, saved
    model = Calibration(half_life_s=3600.0)  # one run's records, all of them equally
    # off the event loop (as every search and simulation here): a loop held past the broker's
    # heartbeat timeout loses its connection
    taken = await asyncio.to_thread(observe, model, sc.timer(sc.layout(1, 1, 0)), costs)
    table = model.table(time.time())
    factors = ", ".join(f"{p.kind} ~{p.tokens:.0f} tok x{p.factor:.2f}" for p in points(table))
    print(
        f"  {plan.task} calibration run: {len(settings) * plan.calibration_requests} requests, {taken} step records, "
        f"{time.monotonic() - started:.0f} s: {factors or 'none'}",
        file=sys.stderr,
        flush=True,
    )
    return table


def calibration_schedules(max_batch: int) -> tuple:
    """What a calibration run runs, so that every kind of step the search may pick is in its
    records: continuous batching at the largest batch (prefills fused with decodes, of every
    size), the mixed policy at it (fused chunked steps), WAA-C with one encoder and one decoder
    (hand-offs exported and imported around the steps) and static batching at a quarter of it
    (prefill-only and decode-only steps)."""
    from optimizer.schedule import Schedule

    return (
        sweep_schedule("continuous", max_batch),
        Schedule(
            "mixed",
            encode_batch=max_batch,
            decode_batch=max_batch,
            chunk_tokens=8 * max_batch,
            num_devices=2,
            decoder_devices=2,
            worker_devices=1,
        ),
        Schedule(
            "waa-c",
            encode_batch=max(max_batch // 8, 1),
            decode_batch=max_batch,
            num_devices=2,
            encoder_devices=1,
            decoder_devices=1,
            worker_devices=1,
        ),
        sweep_schedule("static", max(max_batch // 4, 1)),
    )


def sweep_schedule(policy: Policy, batch: int) -> Schedule:
    from optimizer.schedule import Schedule

    return Schedule(policy, encode_batch=batch, decode_batch=batch, num_devices=2, decoder_devices=2, worker_devices=1)


def bounds_from(static: dict, labels: tuple[str, ...]) -> list[tuple[str, float]]:
    import numpy as np

    latencies = [m.latency for m in static.values() if math.isfinite(m.latency)]
    out = []
    for q in PERCENTILES:
        if f"p{q}" in labels and latencies:
            out.append((f"p{q}", float(np.percentile(latencies, q))))
    return out + ([("inf", math.inf)] if "inf" in labels else [])


def exegpt_plan(sc, bound: float, max_batch: int, verify: bool = True):
    """What ``exegpt plan --verify --max-batch N`` picks, in the space workers run (no
    micro-batches): ExeGPT's policies (RRA, WAA-C, WAA-M), the claim under test, and the
    product's (every policy: what `exegpt plan --policy any` and the scheduler pick), both checked
    in the simulator (``verify=False``: the search's picks as they are). Returns (ExeGPT's, the
    product's); None where nothing fits."""
    from dataclasses import replace

    from optimizer.schedule import describe
    from optimizer.search import SEARCH_POLICIES, SearchSpace, branch_and_bound
    from optimizer.verify import verified_search
    from services.scheduler.planning import POLICY_SETS

    space = replace(SearchSpace().capped(max_batch), microbatches=(1,), encode_microbatches=(1,))

    def pick(policies):
        if verify:
            return verified_search(sc, bound, policies, space).best
        return branch_and_bound(sc, bound, policies, space).best

    best, anything = pick(SEARCH_POLICIES), pick(POLICY_SETS["any"])
    print(
        f"  plan for bound {bound:.2f} s{' (verified)' if verify else ''}: "
        f"{describe(best.schedule) if best else '-'}; "
        f"product (every policy): {describe(anything.schedule) if anything else '-'}",
        file=sys.stderr,
        flush=True,
    )
    return tuple(None if c is None else c.schedule for c in (best, anything))


async def bench_task(bench: Bench, plan: Plan, profile: Path, cluster: Path, seed: int) -> list[Row]:
    from optimizer.lengths import scaled_task

    workload = scaled_task(plan.task, plan.scale)
    load = Load.draw(workload, max(plan.requests, 4 * 2 * plan.max_batch + 4 * plan.max_batch), seed, plan.task)
    table = await calibrate(bench, plan, scenario(profile, cluster, workload), load)
    sc = scenario(profile, cluster, workload, table)
    settings = {("static", b): sweep_schedule("static", b) for b in plan.static}
    settings |= {("continuous", b): sweep_schedule("continuous", b) for b in plan.continuous}
    results = {key: Measured() for key in settings}
    bench.requests = plan.requests
    await run_settings(bench, settings, results, load, sc, plan.task)
    static = {key: m for key, m in results.items() if key[0] == "static"}
    bounds = bounds_from(static, plan.bounds)
    chosen = {
        label: await asyncio.to_thread(exegpt_plan, sc, bound, plan.max_batch, plan.verify) for label, bound in bounds
    }
    picks = [(system, s) for pair in chosen.values() for system, s in zip(("exegpt", "product"), pair)]
    planned = {key: key[1] for key in dict.fromkeys(p for p in picks if p[1] is not None)}
    results |= {key: Measured() for key in planned}
    await run_settings(bench, planned, results, load, sc, plan.task)
    for rep in range(1, plan.repeats):  # the other repetitions, every setting again, order rotated
        everything = settings | planned
        order = list(everything)[rep:] + list(everything)[:rep]
        await run_settings(bench, {k: everything[k] for k in order}, results, load, sc, plan.task, rep)
    return rows_for(plan.task, bounds, chosen, settings, results)


async def run_settings(bench, settings: dict, results: dict, load: Load, sc, task: str, rep: int = 0) -> None:
    from optimizer.schedule import describe
    from optimizer.verify import requests_for

    for key, schedule in settings.items():
        started = time.monotonic()
        await measure(bench, schedule, load, results[key])
        if rep == 0:
            first = load.first(requests_for(schedule, bench.requests))
            results[key].predicted = await asyncio.to_thread(predict, sc, schedule, first, results[key])
        m = results[key]
        print(
            f"  {task} rep {rep + 1} {key[0]:<10} {describe(schedule):<58} {m.throughputs[-1]:6.2f} seq/s "
            f"latency {m.latencies[-1]:6.2f} s  predicted {m.predicted[0]:6.2f} / {m.predicted[1]:6.2f}  "
            f"per worker {m.per_worker} busy {' '.join(f'{b:.2f}' for b in m.busy)} others {m.others:.2f} cores  "
            f"wait {m.phases[0]:.2f}/{m.sim_phases[0]:.2f} s service {m.phases[1]:.2f}/{m.sim_phases[1]:.2f} s  "
            f"({time.monotonic() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )


def rows_for(task: str, bounds, chosen: dict, settings: dict, results: dict) -> list[Row]:
    rows = []
    for label, bound in bounds:
        for system, schedule in zip(("exegpt", "product"), chosen[label]):
            if schedule is not None:
                rows.append(Row(task, label, bound, system, schedule, results[(system, schedule)]))
        for system in ("static", "continuous"):
            meeting = [(m.throughput, key) for key, m in results.items() if key[0] == system and m.latency <= bound]
            if meeting:
                key = max(meeting)[1]
                rows.append(Row(task, label, bound, system, settings[key], results[key]))
    return rows


async def bench(
    args: argparse.Namespace, plans: list[Plan], profile: Path, cluster: Path, task_done=lambda rows: None
) -> list[Row]:
    from common.config import MeshConfig

    config = MeshConfig(
        namespace=f"bench{uuid.uuid4().hex[:8]}",
        amqp_url=args.amqp_url,
        redis_url=args.redis_url,
        model=MODEL,
        device="cpu",
        threads=1,
        max_decode_batch=args.max_batch,
        max_encode_batch=args.max_batch,
        request_timeout_s=1800.0,
        heartbeat_s=1.0,
        heartbeat_timeout_s=10.0,
    )
    procs = Processes(config)
    rows: list[Row] = []
    try:
        with niced_services() as niced:
            procs.start()  # before this process lowers its own priority: the workers keep theirs
            os.nice(NICE)
            print(
                f"niced: {', '.join(f'{name} ({pid})' for pid, name in niced) or 'nothing (not permitted)'}, "
                "this client and the scheduler; workers pinned to cores 0 and 1",
                flush=True,
            )
            async with AsyncExitStack() as stack:
                client = Bench(config, stack)
                await client.start()
                client.others = [pid for pid, _ in niced] + [os.getpid(), procs.procs[0].pid]
                for i, plan in enumerate(plans):
                    rows += await bench_task(client, plan, profile, cluster, args.seed + i)
                    task_done(rows)
    finally:
        procs.close()
        await purge_namespace(config)
    return rows


async def purge_namespace(config) -> None:
    from common.names import Names
    from common.transport.connect import LocalHub, purge

    await purge(config, Names(config.namespace), LocalHub())


# --- the table ---------------------------------------------------------------------------------------


def _err(measured: float, predicted: float) -> str:
    if not (math.isfinite(measured) and math.isfinite(predicted)) or measured == 0:
        return "   -  "
    return f"{(predicted - measured) / measured * 100:+5.1f}%"


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}..{max(values):.2f}" if len(values) > 1 else "-"


def print_rows(rows: list[Row], digest: str, scale: float) -> None:
    from optimizer.schedule import describe

    print(
        f"\nSmolLM2-135M, 2 workers x 1 thread; lengths x{scale:g}; profile {digest}; "
        "measured = median over repetitions (spread min..max); error = (predicted - measured) / measured"
    )
    head = (
        f"{'task':<4} {'bound':<5} {'bound s':>7} {'system':<10} {'seq/s':>6} {'spread':>11} {'pred':>6} "
        f"{'err':>6} {'lat s':>6} {'spread':>11} {'pred':>6} {'err':>6} {'ok':>3}  schedule"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        m = r.measured
        bound = "inf" if math.isinf(r.bound_s) else f"{r.bound_s:7.2f}"
        print(
            f"{r.task:<4} {r.bound_label:<5} {bound:>7} {r.system:<10} {m.throughput:6.2f} "
            f"{_spread(m.throughputs):>11} {m.predicted[0]:6.2f} {_err(m.throughput, m.predicted[0])} "
            f"{m.latency:6.2f} {_spread(m.latencies):>11} "
            f"{m.predicted[1]:6.2f} {_err(m.latency, m.predicted[1])} {'yes' if r.meets_bound else 'no':>3}  "
            f"{describe(r.schedule)}"
        )
    print_summary(rows)


def print_summary(rows: list[Row]) -> None:
    print()
    keys = dict.fromkeys((r.task, r.bound_label) for r in rows)
    errors = [
        abs(v)
        for r in rows
        for v in (
            (r.measured.predicted[0] - r.measured.throughput) / r.measured.throughput,
            (r.measured.predicted[1] - r.measured.latency) / r.measured.latency,
        )
        if math.isfinite(v)
    ]
    for task, label in keys:
        got = {r.system: r for r in rows if (r.task, r.bound_label) == (task, label)}
        for system, name in (("exegpt", "ExeGPT"), ("product", "product")):
            exe = got.get(system)
            if exe is None:
                continue
            ratios = [
                f"x{exe.measured.throughput / got[s].measured.throughput:.2f} vs {s}"
                for s in ("static", "continuous")
                if s in got and got[s].measured.throughput > 0
            ]
            print(
                f"{task} {label}: {name} {exe.measured.throughput:.2f} seq/s, "
                f"{', '.join(ratios) or 'no baseline meets the bound'}"
                f"; meets its bound when measured: {'yes' if exe.meets_bound else 'no'}"
            )
    for task, label in keys:
        got = {r.system: r for r in rows if (r.task, r.bound_label) == (task, label)}
        baselines = [got[s] for s in ("static", "continuous") if s in got]
        if "product" in got and baselines:
            best = max(baselines, key=lambda r: r.measured.throughput)
            print(
                f"{task} {label}: product / best baseline within the bound ({best.system}): "
                f"x{got['product'].measured.throughput / best.measured.throughput:.2f}"
            )
    if errors:
        print(
            f"prediction error: median {statistics.median(errors) * 100:.1f} %, max {max(errors) * 100:.1f} % "
            f"over {len(errors)} figures"
        )
