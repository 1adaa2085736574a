"""`exegpt bench adapt`: the traffic switches from task S to task T; does the scheduler follow?

A mesh of separate processes over RabbitMQ + Redis (a scheduler and two workers, one pinned to
each core; this process is the client, through the gateway's core). Open-loop arrivals at one
rate: task S requests for ``--before-s`` seconds, then task T requests for ``--after-s``. Two
meshes see the same traffic:

- **adaptive**: the scheduler plans on the deployment's profile from the prior (task S), learns
  from finished requests, and re-plans when the drift test fires;
- **fixed**: the scheduler pins the schedule the adaptive one starts with (the same plan on the
  same prior) and keeps it.

Runs alternate adaptive, fixed, adaptive, fixed, ... (``--pairs``, a fresh namespace and fresh
processes each). Per run: when the re-plan came after the shift (the first ScheduleUpdate with a
new schedule, as heard on the control exchange), how many T requests were sent until then, and
for requests sent before the shift (after a warm-up) and after it (from ``SETTLE_S`` after the
shift, the same window in both runs): the share that finished within the latency bound
(attainment) and completions per second. Lost = accepted and never answered; duplicated = a
request with more than one finish record.

The bound and the rate are chosen from the profile unless given: the bound is
``BOUND_OVER_QUICKEST`` times the least p99-length latency any schedule reaches on task T (so both
tasks have schedules that meet it), the rate ``RATE_SHARE`` of the simulated throughput of the
T plan under that bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from services.bench.schedules import MODEL, Processes, niced_services, pin, profile_here, purge_namespace
from services.schedules import planned, wire_schedule

if TYPE_CHECKING:
    from optimizer.schedule import Schedule

WARMUP_S = 5.0  # requests sent this early are left out of "before"
SETTLE_S = 10.0  # "after" starts this long after the shift, in both runs (the re-plan goal)
BOUND_OVER_QUICKEST = 1.6
RATE_SHARE = 0.6
QUICK_PROFILE_REPEATS = 3  # --quick profiles with fewer timings per point (about 20 s instead of 45)
DRAIN_S = 30.0  # after the last arrival, how long to wait for answers before counting the rest lost
KEYS = (
    "shift_at_s",
    "replanned_at_s",
    "requests_until_replan",
    "lost",
    "duplicated",
    "attainment_before",
    "attainment_after_adaptive",
    "attainment_after_fixed",
    "throughput_after_adaptive",
    "throughput_after_fixed",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="one pair, 20 s of S then 25 s of T, a shorter profile (under 3 minutes)"
    )
    parser.add_argument("--pairs", type=int, default=3, help="adaptive/fixed pairs, interleaved (default 3)")
    parser.add_argument("--before-s", type=float, default=40.0, help="seconds of task S traffic (default 40)")
    parser.add_argument("--after-s", type=float, default=60.0, help="seconds of task T traffic (default 60)")
    parser.add_argument(
        "--scale",
        type=float,
        default=0.125,
        help="the tasks' lengths times this (default 0.125: a task T request takes about 1-2 s here)",
    )
    parser.add_argument("--rate", type=float, default=None, help="requests/s (default: from the profile)")
    parser.add_argument(
        "--latency-bound",
        type=float,
        default=None,
        help="seconds for a 99th-percentile-length output (default: from the profile)",
    )
    parser.add_argument(
        "--cv",
        type=float,
        default=1.0,
        help="coefficient of variation of the gaps between arrivals: 1 Poisson, 3 bursty (gamma)",
    )
    parser.add_argument("--max-batch", type=int, default=32, help="largest B_E / B_D a worker runs")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="reuse this profile (its -cluster.json beside it) instead of profiling first",
    )
    parser.add_argument("--keep-profile", metavar="DIR", default=None, help="copy the measured profile here")
    parser.add_argument("--amqp-url", default=os.environ.get("EXEGPT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--redis-url", default=os.environ.get("EXEGPT_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--json", metavar="FILE", help="write the summary object (the keys the issue names)")
    parser.add_argument("--seed", type=int, default=0)
    phases = parser.add_argument_group(
        "--phases: traffic in five phases against four meshes (services/bench/phases.py)"
    )
    phases.add_argument(
        "--phases",
        action="store_true",
        help="light S, heavy S, T, bursty T, light S again; adaptive vs fixed_first vs default vs "
        "best_fixed under a TTFT + TPOT SLO (--quick: 15 s phases, one run)",
    )
    phases.add_argument(
        "--runs", type=int, default=None, help="--phases: runs of the four systems (default 3; --quick 1)"
    )
    phases.add_argument(
        "--phase-s", type=float, default=None, help="--phases: seconds per phase (default 60; --quick 15)"
    )
    phases.add_argument(
        "--ttft", type=float, default=None, help="--phases: TTFT p99 bound, s (default: from the profile)"
    )
    phases.add_argument(
        "--tpot", type=float, default=None, help="--phases: TPOT p99 bound, s (default: from the profile)"
    )


@dataclass(frozen=True)
class Setup:
    profile: Path
    cluster: Path
    bound: float
    rate: float
    first: Schedule  # the schedule both kinds of run start with (the plan on the prior)
    scale: float


@dataclass
class Sent:
    request_id: str
    task: str
    at: float  # since the start of traffic
    input_len: int
    output_len: int
    done_at: float = math.nan
    error: str = ""


@dataclass
class Run:
    kind: str  # "adaptive" | "fixed"
    pair: int
    shift_at_s: float
    sent: list[Sent] = field(default_factory=list)
    updates: list[tuple[float, int, object]] = field(default_factory=list)  # (time since start, version, schedule)
    searches: list[tuple[float, str, str]] = field(default_factory=list)  # (time since start, reason, outcome)
    duplicated: int = 0
    replanned_at_s: float = math.nan
    requests_until_replan: int = 0
    after_schedule: str = ""

    def window(self, task: str, start: float, end: float) -> list[Sent]:
        return [s for s in self.sent if s.task == task and start <= s.at < end]

    def attainment(self, task: str, start: float, end: float, bound: float) -> float:
        sent = self.window(task, start, end)
        ok = sum(1 for s in sent if not s.error and s.done_at - s.at <= bound)
        return ok / len(sent) if sent else math.nan

    def throughput(self, task: str, start: float, end: float) -> float:
        done = [s for s in self.sent if s.task == task and start <= s.done_at < end]
        return len(done) / (end - start) if end > start else math.nan

    def latency_p99(self, task: str, start: float, end: float) -> float:
        done = [s.done_at - s.at for s in self.window(task, start, end) if math.isfinite(s.done_at)]
        return float(np.percentile(done, 99)) if done else math.nan

    @property
    def lost(self) -> int:
        return sum(1 for s in self.sent if not s.error and not math.isfinite(s.done_at))

    @property
    def failed(self) -> int:
        return sum(1 for s in self.sent if s.error)


def run(args: argparse.Namespace) -> int:
    from common.cli import CliError

    cores = os.cpu_count()
    if cores is None or cores < 2:
        raise CliError("bench adapt pins two workers to two cores; this machine has fewer")
    if getattr(args, "phases", False):
        from services.bench import phases

        args.runs = args.runs or (1 if args.quick else 3)
        signal.signal(signal.SIGTERM, _interrupt)
        return phases.run(args)
    if args.quick:
        args.pairs, args.before_s, args.after_s = 1, 20.0, 25.0
    if args.pairs < 1 or args.before_s <= WARMUP_S or args.after_s <= SETTLE_S:
        raise CliError(f"need --pairs >= 1, --before-s > {WARMUP_S:g} and --after-s > {SETTLE_S:g}")
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="exegpt-adapt-") as tmp:
        setup = prepare(args, Path(tmp))
        runs = asyncio.run(bench(args, setup))
    summary = summarize(runs, setup, args)
    print(f"\nwall time {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


# --- 1. profile, bound, rate ------------------------------------------------------------------------


@dataclass(frozen=True)
class _ProfilePlan:  # what profile_here needs to know of a run
    task: str
    scale: float


def profile_and_cluster(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path]:
    """``--profile``, or a profile of tasks S and T made here (kept in ``--keep-profile``), and its cluster."""
    import shutil

    profile = args.profile or profile_here(
        tmp,
        [_ProfilePlan("S", args.scale), _ProfilePlan("T", args.scale)],
        args,
        repeats=QUICK_PROFILE_REPEATS if args.quick else None,
    )
    cluster = profile.with_name(f"{profile.stem}-cluster.json")
    if args.keep_profile:
        Path(args.keep_profile).mkdir(parents=True, exist_ok=True)
        for f in (profile, cluster):
            shutil.copy(f, Path(args.keep_profile) / f.name)
    return profile, cluster


def prepare(args: argparse.Namespace, tmp: Path) -> Setup:
    from common.config import MeshConfig
    from optimizer.lengths import scaled_task
    from optimizer.schedule import describe
    from services.scheduler.planning import Planner

    profile, cluster = profile_and_cluster(args, tmp)
    planner = Planner(MeshConfig(profile=str(profile), cluster=str(cluster), max_plan_batch=args.max_batch))
    s, t = scaled_task("S", args.scale), scaled_task("T", args.scale)
    from optimizer.search import least_latency

    quickest = least_latency(planner.scenario(t, 2), planner.policies, planner.space).best
    if quickest is None:
        from common.cli import CliError

        raise CliError("no schedule fits task T on two workers")
    _, quickest_s = planner.evaluate(quickest.schedule, t, 2)
    bound = args.latency_bound or round(BOUND_OVER_QUICKEST * quickest_s, 2)
    plan_s, plan_t = planner.plan(s, 2, bound), planner.plan(t, 2, bound)
    s_on_t = planner.evaluate(plan_s.schedule, t, 2)
    rate = args.rate or round(RATE_SHARE * plan_t.throughput_seq_s, 2)
    print(f"profile {profile}; lengths x{args.scale:g}; two workers x one thread; {MODEL}")
    bound_why = "given" if args.latency_bound else f"{BOUND_OVER_QUICKEST:g} x the least on T, {quickest_s:.3g} s"
    rate_why = "given" if args.rate else f"{RATE_SHARE:g} x the T plan"
    print(f"latency bound {bound:g} s ({bound_why}); rate {rate:g} req/s ({rate_why}); arrivals CV {args.cv:g}")
    for name, plan in (("S plan", plan_s), ("T plan", plan_t)):
        print(
            f"  {name}: {describe(plan.schedule)}  simulated {plan.throughput_seq_s:.2f} seq/s, "
            f"{plan.latency_s:.2f} s{'' if plan.meets_bound else ' (misses the bound)'}"
        )
    print(f"  S plan on T: simulated {s_on_t[0]:.2f} seq/s, {s_on_t[1]:.2f} s")
    return Setup(profile, cluster, bound, rate, plan_s.schedule, args.scale)


# --- 2. the runs ------------------------------------------------------------------------------------


class Mesh(Processes):
    """Two workers, one pinned to each core, and a scheduler on either core at normal priority:
    how fast it reacts is what is measured, so it is not niced (its searches run on a thread of
    their own at ``search_nice``; a search takes 0.4-3 s of CPU, and what it takes from the
    workers is part of what adaptivity costs here)."""

    def start(self) -> None:
        self._spawn(["scheduler"], _no_setup).wait_line("ready ")
        for proc in [self._spawn(["worker"], pin(core)) for core in (0, 1)]:
            proc.wait_line("ready ")


def _no_setup() -> None:
    from services.bench.schedules import die_with_parent

    die_with_parent()


def traffic(args: argparse.Namespace, setup: Setup, seed: int) -> list[Sent]:
    """The S-then-T requests of one pair (both runs of a pair get the same)."""
    from loadgen.arrivals import gamma_arrivals
    from optimizer.lengths import scaled_task

    rng = np.random.default_rng(seed)
    total = args.before_s + args.after_s
    count = int(setup.rate * total * 1.5) + 10
    offsets = gamma_arrivals(setup.rate, 1.0 / args.cv**2, count, rng)
    offsets = offsets[offsets < total]
    sent = []
    tasks = {"S": scaled_task("S", setup.scale), "T": scaled_task("T", setup.scale)}
    for i, at in enumerate(offsets):
        task = "S" if at < args.before_s else "T"
        ins, outs = tasks[task].sample(rng, 1)
        sent.append(Sent(f"adapt-{seed}-{i:05d}", task, float(at), int(ins[0]), int(outs[0])))
    return sent


def mesh_config(args: argparse.Namespace, setup: Setup, kind: str):
    from dataclasses import asdict as fields_of

    from common.config import MeshConfig

    common = dict(
        namespace=f"bench-adapt-{uuid.uuid4().hex[:8]}",
        amqp_url=args.amqp_url,
        redis_url=args.redis_url,
        model=MODEL,
        threads=1,
        max_encode_batch=args.max_batch,
        max_decode_batch=args.max_batch,
        heartbeat_s=1.0,
        heartbeat_timeout_s=4.0,
        latency_bound_s=setup.bound,
    )
    if kind == "fixed":
        return MeshConfig(**common, schedule=json.dumps(fields_of(setup.first)))
    return MeshConfig(
        **common,
        profile=str(setup.profile),
        cluster=str(setup.cluster),
        prior="S",
        prior_scale=setup.scale,
        max_plan_batch=args.max_batch,
    )


async def bench(args: argparse.Namespace, setup: Setup) -> list[Run]:
    runs = []
    with niced_services():
        for pair in range(args.pairs):
            sent = traffic(args, setup, args.seed + pair)
            for kind in ("adaptive", "fixed"):
                run_ = await one_run(args, setup, kind, pair, [Sent(**asdict(s)) for s in sent])
                runs.append(run_)
                print(row(run_, setup, args), flush=True)
    return runs


async def one_run(args: argparse.Namespace, setup: Setup, kind: str, pair: int, sent: list[Sent]) -> Run:
    from common.messages import codec
    from common.messages.control import ScheduleUpdate
    from common.messages.work import Sampling
    from common.names import Names
    from common.scheduling import current_schedule, recent_lengths

    config = mesh_config(args, setup, kind)
    names = Names(config.namespace)
    result = Run(kind, pair, args.before_s, sent)
    procs = Mesh(config)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(purge_namespace, config)
        stack.callback(procs.close)
        await asyncio.to_thread(procs.start)
        transports, gateway = await client_of(config, names, stack)
        await transports.bus.declare_fanout(names.control_exchange)
        control = await transports.bus.subscribe(
            names.control_exchange, names.control_queue(f"bench-{uuid.uuid4().hex[:6]}")
        )
        t0 = [math.inf]

        async def listen() -> None:
            async for delivery in control:
                try:
                    update = codec.decode(delivery.body, ScheduleUpdate)
                except codec.DecodeError:
                    continue
                finally:
                    await delivery.ack()
                result.updates.append((time.monotonic() - t0[0], update.version, planned(update.schedule)))

        listening = asyncio.create_task(listen())
        stack.callback(listening.cancel)

        def searched(state) -> None:
            result.searches.append((time.monotonic() - t0[0], state.last_replan_reason, state.last_outcome))

        watching = asyncio.create_task(watch_searches(transports.store, names, searched))
        stack.callback(watching.cancel)
        # the run starts once both workers run the first plan (a version whose allocation holds both)
        async with asyncio.timeout(120):
            while True:
                update = await current_schedule(transports.store, names)
                if update is not None and len(update.allocation) >= 2 and update.schedule == wire_schedule(setup.first):
                    break
                await asyncio.sleep(0.2)  # polling the store for the mesh to come up; bounded by the timeout
        t0[0] = time.monotonic()

        async def send(s: Sent) -> None:
            await asyncio.sleep(max(s.at - (time.monotonic() - t0[0]), 0))
            prompt = [100 + (7 * k + 13 * len(s.request_id)) % 20_000 for k in range(s.input_len)]
            try:
                pending = await gateway.submit(
                    prompt,
                    Sampling(s.output_len, ignore_eos=True),
                    request_id=s.request_id,
                    stream=False,
                    timeout_s=args.before_s + args.after_s + DRAIN_S,
                )
            except Exception as exc:  # not accepted: not lost, but counted
                s.error = f"submit: {exc}"
                return
            try:
                async for _ in pending.tokens():
                    pass
                s.done_at = time.monotonic() - t0[0]
            except Exception as exc:
                s.error = str(exc) or type(exc).__name__

        deadline = args.before_s + args.after_s + DRAIN_S
        tasks = [asyncio.create_task(send(s)) for s in sent]
        done, pending_tasks = await asyncio.wait(tasks, timeout=deadline + 5)
        for task in pending_tasks:
            task.cancel()
        records = await recent_lengths(transports.store, names, 4 * len(sent) + 100)
        counts = Counter(r.request_id for r in records)
        result.duplicated = sum(1 for c in counts.values() if c > 1)
    changed = [(at, v, sch) for at, v, sch in result.updates if at >= result.shift_at_s and sch != setup.first]
    if changed:
        result.replanned_at_s = changed[0][0]
        result.after_schedule = describe_short(changed[-1][2])
        result.requests_until_replan = sum(1 for s in sent if s.task == "T" and s.at < result.replanned_at_s)
    return result


async def client_of(config, names, stack: AsyncExitStack):
    """This process's transports and a gateway core (its requests' client), closed with ``stack``."""
    from common.transport.connect import LocalHub, open_transports
    from services.front.core import Gateway

    transports = await open_transports(config, names, LocalHub())
    stack.push_async_callback(transports.close)
    gateway = Gateway(config, await open_transports(config, names, LocalHub()), MODEL)
    await gateway.start()
    stack.push_async_callback(gateway.close)
    return transports, gateway


async def watch_searches(store, names, searched) -> None:
    """Call ``searched(state)`` for each new search the scheduler's state record tells of."""
    from common.messages import codec
    from common.messages.status import SchedulerState

    seen = 0
    while True:
        data = await store.get(names.scheduler_state)
        if data is not None:
            state = codec.decode(data, SchedulerState)
            if state.replans > seen:
                seen = state.replans
                searched(state)
        await asyncio.sleep(0.25)  # a poll of the store, not a synchronisation


def describe_short(schedule) -> str:
    from optimizer.schedule import describe

    return describe(schedule)


# --- 3. the table -----------------------------------------------------------------------------------


def figures(r: Run, bound: float, args: argparse.Namespace) -> dict:
    end = args.before_s + args.after_s
    after = r.shift_at_s + SETTLE_S
    return {
        "attainment_before": r.attainment("S", WARMUP_S, r.shift_at_s, bound),
        "attainment_after": r.attainment("T", after, end, bound),
        "throughput_after": r.throughput("T", after, end),
        "p99_after": r.latency_p99("T", after, end),
        "throughput_before": r.throughput("S", WARMUP_S, r.shift_at_s),
    }


def row(r: Run, setup: Setup, args: argparse.Namespace) -> str:
    f = figures(r, setup.bound, args)
    replan = (
        (
            f"re-planned at +{r.replanned_at_s - r.shift_at_s:.1f} s after {r.requests_until_replan} T requests "
            f"-> {r.after_schedule}"
        )
        if math.isfinite(r.replanned_at_s)
        else "no re-plan"
    )
    searches = "".join(
        f"\n    search at {at - r.shift_at_s:+.1f} s ({reason}): {outcome}"
        for at, reason, outcome in r.searches
        if at >= 0
    )
    return (
        f"pair {r.pair} {r.kind:8s}: sent {len(r.sent)}, lost {r.lost}, failed {r.failed}, duplicated "
        f"{r.duplicated}; before: attainment {f['attainment_before']:.3f}, {f['throughput_before']:.2f} seq/s; "
        f"after: attainment {f['attainment_after']:.3f}, {f['throughput_after']:.2f} seq/s, "
        f"p99 e2e {f['p99_after']:.2f} s; {replan}{searches}"
    )


def summarize(runs: list[Run], setup: Setup, args: argparse.Namespace) -> dict:
    adaptive = [r for r in runs if r.kind == "adaptive"]
    fixed = [r for r in runs if r.kind == "fixed"]
    fa = [figures(r, setup.bound, args) for r in adaptive]
    ff = [figures(r, setup.bound, args) for r in fixed]
    med = lambda xs: statistics.median(xs) if xs else math.nan  # noqa: E731
    spread = lambda xs: f"{med(xs):.3g} [{min(xs):.3g}-{max(xs):.3g}]" if xs else "n/a"  # noqa: E731
    replanned = [r.replanned_at_s for r in adaptive if math.isfinite(r.replanned_at_s)]
    summary = {
        "shift_at_s": args.before_s,
        "replanned_at_s": med(replanned) if len(replanned) == len(adaptive) else None,
        "requests_until_replan": med([r.requests_until_replan for r in adaptive if math.isfinite(r.replanned_at_s)]),
        "lost": sum(r.lost for r in runs),
        "duplicated": sum(r.duplicated for r in runs),
        "attainment_before": med([f["attainment_before"] for f in fa + ff]),
        "attainment_after_adaptive": med([f["attainment_after"] for f in fa]),
        "attainment_after_fixed": med([f["attainment_after"] for f in ff]),
        "throughput_after_adaptive": med([f["throughput_after"] for f in fa]),
        "throughput_after_fixed": med([f["throughput_after"] for f in ff]),
    }
    assert tuple(summary) == KEYS
    summary = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}  # JSON
    print(
        f"\nS then T at {setup.rate:g} req/s (CV {args.cv:g}), bound {setup.bound:g} s, lengths x{setup.scale:g}, "
        f"{args.pairs} pair(s); median [min-max] over the pairs"
    )
    print(
        f"  re-planned after the shift:   {spread([x - args.before_s for x in replanned])} s, "
        f"{spread([r.requests_until_replan for r in adaptive])} T requests ({len(replanned)}/{len(adaptive)} runs)"
    )
    print(
        f"  lost / failed / duplicated:   {summary['lost']} / {sum(r.failed for r in runs)} / {summary['duplicated']}"
    )
    print(
        f"  attainment before (S):        adaptive {spread([f['attainment_before'] for f in fa])}  "
        f"fixed {spread([f['attainment_before'] for f in ff])}"
    )
    print(
        f"  attainment after (T):         adaptive {spread([f['attainment_after'] for f in fa])}  "
        f"fixed {spread([f['attainment_after'] for f in ff])}"
    )
    print(
        f"  throughput after (T, seq/s):  adaptive {spread([f['throughput_after'] for f in fa])}  "
        f"fixed {spread([f['throughput_after'] for f in ff])}"
    )
    print(
        f"  p99 e2e after (T, s):         adaptive {spread([f['p99_after'] for f in fa])}  "
        f"fixed {spread([f['p99_after'] for f in ff])}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="exegpt bench adapt", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
