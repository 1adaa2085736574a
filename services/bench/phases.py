"""`exegpt bench adapt --phases`: open-loop traffic that changes in phases, against four meshes.

A mesh of separate processes over RabbitMQ + Redis (a scheduler and two SmolLM2 workers, one
pinned to each core; this process is the client, through the gateway's core). The traffic, the
same arrival trace (same seed) for every system, runs in five phases under a TTFT + TPOT SLO:

====================  =====  =================================  ===========
phase                 task   rate                               arrivals
====================  =====  =================================  ===========
``light-S``           S      0.3 x task S's capacity            Poisson
``heavy-S``           S      0.9 x task S's capacity            Poisson
``T``                 T      0.6 x task T's capacity            Poisson
``T-bursty``          T      0.6 x task T's capacity            gamma, CV 3
``light-S-again``     S      0.3 x task S's capacity            Poisson
====================  =====  =================================  ===========

A task's *capacity* is the highest rate any candidate schedule sustains with 99 % of requests
meeting the SLO in the calibrated simulator. The SLO: TTFT p99 within ``TTFT_OVER_PREFILL`` times
the calibrated prefill of a p99 prompt of task T plus ``TTFT_SLACK_S``, and TPOT p99 within
``TPOT_OVER_STEP`` times the calibrated decode step of ``TPOT_BATCH`` rows (or ``--ttft``/``--tpot``).

Before the systems run, a calibration run (as ``bench schedules``': continuous, mixed and WAA-C at
the largest batch, static at a quarter of it) on task S and on task T; the workers' step records
fit the calibrated cost model that sets the capacities, the SLO, the first phase's plan and the
best fixed schedule, and that the adaptive scheduler starts from (its store holds it).

The systems:

- ``adaptive``: the scheduler plans for the arrivals it counts (``plan_for = arrivals``) and
  keeps calibrating;
- ``fixed_first``: the schedule the planner picks for the first phase, pinned throughout;
- ``default``: continuous batching, 32 per worker (what a user of a vLLM-like server starts with);
- ``best_fixed``: the one schedule, among the candidates the planner weighs for each phase, that
  the calibrated simulator rates best over the whole trace (the most requests meeting the SLO):
  the best a fixed schedule could do in hindsight.

Per phase (requests by arrival within the phase) and over all: goodput (requests meeting the
SLO per second), attainment (their share of the requests sent; a failed request, 504 at its
deadline ``DRAIN_S`` after it was sent included, misses), p99 TTFT and TPOT of the
answered ones (the workers' stamps: arrival at the gateway to the first token; then per output
token), lost (accepted, neither answered nor failed), duplicated (more than one finish record), and
for ``adaptive`` how long after each phase change the scheduler's first search came (from its
state record; null for the others).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from services.bench.schedules import MODEL, purge_namespace
from services.schedules import planned

SYSTEMS = ("adaptive", "fixed_first", "default", "best_fixed")
KEYS = (
    "system",
    "phase",
    "goodput_rps",
    "attainment",
    "ttft_p99_s",
    "tpot_p99_s",
    "lost",
    "duplicated",
    "replan_lag_s",
)
TTFT_OVER_PREFILL, TTFT_SLACK_S = 4.0, 0.5
TPOT_OVER_STEP, TPOT_BATCH = 2.0, 16
DRAIN_S = 30.0  # a request's deadline is this long after it is sent: later, the gateway answers 504
ANSWER_GRACE_S = 10.0  # an answer (or the 504) not here this long after the deadline: lost
# a calibration run sends each schedule, on each task, this many requests at least and this many
# times its closed loop (its request slots): enough steps of every batch size it runs, from the
# ramp to the drain; --quick halves the first. Not the second: a single wave is sent at once and
# drains, so continuous batching never admits a prompt beside running decodes and the run has
# none of the fused prefill-and-decode steps that open-loop traffic is made of (seen: 13 mixed
# steps in 504, all but two the mixed policy's 250-token chunks; continuous batching's small fused
# steps then ran 14-26 % over the calibrated model)
CALIBRATION_REQUESTS, CALIBRATION_WAVES = 60, 2


@dataclass(frozen=True)
class Phase:
    name: str
    task: str
    share: float  # of the task's capacity
    cv: float
    seconds: float
    rate: float = 0.0


@dataclass
class Sent:
    request_id: str
    phase: str
    at: float  # since the start of traffic
    input_len: int
    output_len: int
    done: bool = False
    error: str = ""


@dataclass(frozen=True)
class Setup:
    profile: Path
    cluster: Path
    scale: float
    phases: tuple[Phase, ...]
    ttft_s: float
    tpot_s: float
    schedules: dict  # system -> the schedule it pins (adaptive: None)
    calibration: bytes  # the calibration run's model, msgpack (seeds the adaptive scheduler)


@dataclass
class Result:
    system: str
    run: int
    sent: list[Sent]
    records: dict = field(default_factory=dict)  # request id -> LengthSample
    duplicated: int = 0
    searches: list[tuple[float, str, str]] = field(default_factory=list)  # (since start, reason, outcome)


def phases_of(args: argparse.Namespace) -> tuple[Phase, ...]:
    seconds = args.phase_s or (15.0 if args.quick else 60.0)
    return (
        Phase("light-S", "S", 0.3, 1.0, seconds),
        Phase("heavy-S", "S", 0.9, 1.0, seconds),
        Phase("T", "T", 0.6, 1.0, seconds),
        Phase("T-bursty", "T", 0.6, 3.0, seconds),
        Phase("light-S-again", "S", 0.3, 1.0, seconds),
    )


# --- 1. calibrate, size the phases, choose the fixed schedules ------------------------------------


def prepare(args: argparse.Namespace, tmp: Path) -> Setup:
    from services.bench.adapt import profile_and_cluster

    profile, cluster = profile_and_cluster(args, tmp)
    calibration = asyncio.run(calibration_run(args, profile, cluster))
    return sized(args, profile, cluster, calibration)


async def calibration_run(args: argparse.Namespace, profile: Path, cluster: Path) -> bytes:
    """The calibration schedules (``schedules.calibration_schedules``) on task S and task T on a
    mesh of these processes; the workers' step records fit the calibrated cost model (returned as
    the scheduler stores it)."""
    import msgpack

    from common.config import MeshConfig
    from optimizer.calibration import Calibration
    from optimizer.lengths import scaled_task
    from optimizer.verify import outstanding
    from services.bench.schedules import Bench, Load, Processes, calibration_schedules, niced_services, scenario
    from services.scheduler.calibrate import observe

    config = MeshConfig(
        namespace=f"bench-cal-{uuid.uuid4().hex[:8]}",
        amqp_url=args.amqp_url,
        redis_url=args.redis_url,
        model=MODEL,
        device="cpu",
        threads=1,
        max_decode_batch=args.max_batch,
        max_encode_batch=args.max_batch,
        heartbeat_s=1.0,
        heartbeat_timeout_s=10.0,
        request_timeout_s=600.0,
    )
    procs = Processes(config)
    model = Calibration(half_life_s=3600.0)
    sent, started = 0, time.monotonic()
    try:
        with niced_services():
            await asyncio.to_thread(procs.start)
            async with AsyncExitStack() as stack:
                bench = Bench(config, stack)
                await bench.start()
                bench.step_costs = []
                schedules = calibration_schedules(args.max_batch)
                count = calibration_counts(schedules, args.quick)
                for i, task in enumerate(("S", "T")):
                    load = Load.draw(
                        scaled_task(task, args.scale), max(count.values()), args.seed + 100 + i, f"cal{task}"
                    )
                    for schedule in schedules:
                        await bench.pin(schedule)
                        bench.runs += 1
                        await bench.closed_loop(load.first(count[schedule]).renamed(bench.runs), outstanding(schedule))
                        sent += count[schedule]
                await asyncio.sleep(1.5 * config.heartbeat_s)  # the last heartbeats carry the last steps
                sc = scenario(profile, cluster, scaled_task("S", args.scale))
                taken = await asyncio.to_thread(observe, model, sc.timer(sc.layout(1, 1, 0)), bench.step_costs)
    finally:
        procs.close()
        await purge_namespace(config)
    print(
        f"calibration run: {sent} requests on tasks S and T, {taken} step records, {time.monotonic() - started:.0f} s",
        flush=True,
    )
    return msgpack.packb(model.to_plain())


def calibration_counts(schedules, quick: bool) -> dict:
    """Requests a calibration run sends each schedule on each task (``CALIBRATION_WAVES``)."""
    from optimizer.verify import outstanding

    least = CALIBRATION_REQUESTS // 2 if quick else CALIBRATION_REQUESTS
    return {s: max(least, math.ceil(CALIBRATION_WAVES * outstanding(s))) for s in schedules}


def sized(args: argparse.Namespace, profile: Path, cluster: Path, calibration: bytes) -> Setup:
    """Capacities, rates, the SLO and the fixed systems' schedules, on the calibrated model."""
    import msgpack

    from optimizer.calibration import Calibration
    from optimizer.lengths import scaled_task
    from optimizer.profile import StepShape
    from optimizer.schedule import Schedule, describe
    from optimizer.slo import Slo
    from optimizer.traffic import Forecast, candidates, sustained
    from services.bench.schedules import scenario
    from services.scheduler.calibrate import points

    model = Calibration.from_plain(msgpack.unpackb(calibration, raw=False))
    table = model.table(time.time())
    print("calibration: " + ", ".join(f"{p.kind} ~{p.tokens:.0f} tok x{p.factor:.2f}" for p in points(table)))
    workloads = {t: scaled_task(t, args.scale) for t in ("S", "T")}
    sc = {t: scenario(profile, cluster, w, table) for t, w in workloads.items()}
    timer = sc["T"].timer(sc["T"].layout(1, 1, 0))
    t_in = workloads["T"].input.quantile(0.99)
    prefill = float(timer.encode_s(StepShape(prefill_seqs=1.0, prefill_tokens=float(t_in), prefill_seq=float(t_in))))
    step = float(timer.iteration_s(StepShape(decode_seqs=float(TPOT_BATCH), decode_ctx=float(t_in)), 1))
    ttft = args.ttft or round(TTFT_OVER_PREFILL * prefill + TTFT_SLACK_S, 2)
    tpot = args.tpot or round(TPOT_OVER_STEP * step, 4)
    slo = Slo(ttft_s=ttft, tpot_s=tpot)
    space = mesh_space(args.max_batch)
    found = {t: candidates(sc[t], space=space)[0] for t in ("S", "T")}
    capacity = {}
    for t in ("S", "T"):
        top = max(c for _, c in found[t])
        capacity[t] = max(sustained(sc[t], s, slo, Forecast(top, 1.0), args.seed, steps=6) for s, _ in found[t])
    phases = tuple(replace(p, rate=round(p.share * capacity[p.task], 2)) for p in phases_of(args))
    print(
        f"SLO: TTFT p99 <= {ttft:g} s, TPOT p99 <= {tpot * 1e3:.3g} ms (calibrated prefill of a p99 T prompt "
        f"{prefill:.3g} s, decode step of {TPOT_BATCH} rows {step * 1e3:.3g} ms); lengths x{args.scale:g}"
    )
    print(
        f"capacity (calibrated simulator, 99 % within the SLO): task S {capacity['S']:.2f} req/s, "
        f"task T {capacity['T']:.2f} req/s"
    )
    for p in phases:
        print(
            f"  phase {p.name:14s} task {p.task}  {p.rate:g} req/s ({p.share:g} x capacity), CV {p.cv:g}, "
            f"{p.seconds:g} s"
        )
    first = plan_first(sc["S"], slo, phases[0], space, args.seed)
    trace = requests_of(trace_of(args, phases), workloads)
    pool = {s for t in ("S", "T") for s, _ in found[t]} | {first}
    best = best_in_hindsight(sc["S"], slo, trace, pool)
    default = Schedule(
        "continuous", encode_batch=32, decode_batch=32, num_devices=2, decoder_devices=2, worker_devices=1
    )
    schedules = {"adaptive": None, "fixed_first": first, "default": default, "best_fixed": best}
    for name, s in schedules.items():
        if s is not None:
            print(f"  {name:12s} {describe(s)}")
    return Setup(profile, cluster, args.scale, phases, ttft, tpot, schedules, calibration)


def mesh_space(max_batch: int):
    from optimizer.search import SearchSpace

    return replace(SearchSpace().capped(max_batch), microbatches=(1,), encode_microbatches=(1,))


def plan_first(sc, slo, phase: Phase, space, seed: int):
    from optimizer.traffic import Forecast, plan_for_traffic

    plan = plan_for_traffic(sc, slo, Forecast(phase.rate, phase.cv), space=space, seed=seed)
    best = None if plan is None else plan.best
    if best is None:
        raise ValueError(f"no schedule carries the first phase ({phase.rate:g} requests/s)")
    return best.schedule


def best_in_hindsight(sc, slo, trace, pool):
    """The schedule of ``pool`` with the most requests meeting the SLO over the whole trace."""
    from optimizer.simulator import simulate
    from optimizer.slo import figures

    rated = {s: figures(simulate(sc, s, trace).records, slo).attainment for s in pool}
    return max(rated, key=lambda s: (rated[s], -s.decode_batch))


def trace_of(args: argparse.Namespace, phases: tuple[Phase, ...]) -> list[Sent]:
    """The arrivals of every phase back to back (one seed: every system gets the same)."""
    from loadgen.arrivals import gamma_arrivals
    from optimizer.lengths import scaled_task

    rng = np.random.default_rng(args.seed)
    sent: list[Sent] = []
    start = 0.0
    for p in phases:
        workload = scaled_task(p.task, args.scale)
        gaps = gamma_arrivals(p.rate, 1.0 / p.cv**2, int(p.rate * p.seconds * 2) + 10, rng)
        for at in gaps[gaps < p.seconds]:
            ins, outs = workload.sample(rng, 1)
            sent.append(Sent(f"ph-{len(sent):05d}", p.name, start + float(at), int(ins[0]), int(outs[0])))
        start += p.seconds
    return sent


def requests_of(sent: list[Sent], workloads):
    from optimizer.simulator import SimRequest

    return tuple(SimRequest(s.request_id, s.input_len, s.output_len, s.at) for s in sent)


# --- 2. one system on the trace -----------------------------------------------------------------


def config_for(args: argparse.Namespace, setup: Setup, system: str):
    from common.config import MeshConfig

    common = dict(
        namespace=f"bench-ph-{uuid.uuid4().hex[:8]}",
        amqp_url=args.amqp_url,
        redis_url=args.redis_url,
        model=MODEL,
        threads=1,
        max_encode_batch=args.max_batch,
        max_decode_batch=args.max_batch,
        heartbeat_s=1.0,
        heartbeat_timeout_s=10.0,
        slo_ttft_s=setup.ttft_s,
        slo_tpot_s=setup.tpot_s,
        request_timeout_s=DRAIN_S,
    )
    schedule = setup.schedules[system]
    if schedule is not None:
        return MeshConfig(**common, schedule=json.dumps(asdict(schedule)))
    return MeshConfig(
        **common,
        profile=str(setup.profile),
        cluster=str(setup.cluster),
        prior="S",
        prior_scale=setup.scale,
        max_plan_batch=args.max_batch,
        plan_for="arrivals",
    )


async def one_system(args: argparse.Namespace, setup: Setup, system: str, run: int, sent: list[Sent]) -> Result:
    from common.messages.work import Sampling
    from common.names import Names
    from common.scheduling import current_schedule, recent_lengths
    from common.transport.connect import LocalHub, open_transports
    from optimizer.schedule import describe
    from services.bench.adapt import Mesh, client_of, watch_searches

    config = config_for(args, setup, system)
    names = Names(config.namespace)
    result = Result(system, run, sent)
    procs = Mesh(config)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(purge_namespace, config)
        stack.callback(procs.close)
        seed = await open_transports(config, names, LocalHub())
        await seed.store.set(names.calibration, setup.calibration)  # the adaptive scheduler starts calibrated
        await seed.close()
        await asyncio.to_thread(procs.start)
        transports, gateway = await client_of(config, names, stack)
        t0 = [math.inf, math.inf]  # (monotonic, wall) at the start of traffic

        def searched(state) -> None:
            runs = next((c.schedule for c in state.candidates if c.chosen), None)
            outcome = (
                f"[{state.last_search_s:.1f} s search] "
                + state.last_outcome
                + (f" -> runs {describe(planned(runs))}" if runs is not None else "")
            )
            result.searches.append((state.last_replan_at - t0[1], state.last_replan_reason, outcome))

        watching = asyncio.create_task(watch_searches(transports.store, names, searched))
        stack.callback(watching.cancel)
        async with asyncio.timeout(180):
            while True:  # until both workers run a schedule (the allocation holds both)
                update = await current_schedule(transports.store, names)
                if update is not None and len(update.allocation) >= 2:
                    break
                await asyncio.sleep(0.2)  # polling the store for the mesh to come up; bounded by the timeout
        t0[0], t0[1] = time.monotonic(), time.time()
        total = sum(p.seconds for p in setup.phases)

        async def send(s: Sent) -> None:
            await asyncio.sleep(max(s.at - (time.monotonic() - t0[0]), 0))  # the trace's own timing
            prompt = [100 + (7 * k + 13 * len(s.request_id)) % 20_000 for k in range(s.input_len)]
            try:
                pending = await gateway.submit(
                    prompt,
                    Sampling(s.output_len, ignore_eos=True),
                    request_id=f"{config.namespace}-{s.request_id}",
                    stream=False,
                )
            except Exception as exc:  # not accepted: not lost, but it misses the SLO
                s.error = f"submit: {exc}"
                return
            try:  # the gateway answers 504 at the request's deadline (request_timeout_s): failed, not lost
                async for _ in pending.tokens():
                    pass
                s.done = True
            except Exception as exc:
                s.error = str(exc) or type(exc).__name__

        tasks = [asyncio.create_task(send(s)) for s in sent]
        _, late = await asyncio.wait(tasks, timeout=total + DRAIN_S + 2 * ANSWER_GRACE_S)
        for task in late:
            task.cancel()
        print(
            f"  {system} run {run + 1}: traffic over, {sum(s.done for s in sent)} answered, {len(late)} left "
            f"waiting ({time.monotonic() - t0[0]:.0f} s); closing the mesh",
            flush=True,
        )
        records = await recent_lengths(transports.store, names, 4 * len(sent) + 100)
        counts = Counter(r.request_id for r in records)
        result.duplicated = sum(1 for c in counts.values() if c > 1)
        prefix = f"{config.namespace}-"
        result.records = {r.request_id[len(prefix) :]: r for r in records if r.request_id.startswith(prefix)}
    return result


# --- 3. figures ---------------------------------------------------------------------------------


def figures_of(r: Result, setup: Setup, phase: str | None) -> dict:
    """One (system, phase) object (``phase`` None: over all)."""
    sent = [s for s in r.sent if phase is None or s.phase == phase]
    seconds = sum(p.seconds for p in setup.phases if phase is None or p.name == phase)
    ttft, tpot, good = [], [], 0
    for s in sent:
        rec = r.records.get(s.request_id)
        if rec is None or s.error or not rec.first_token_at:
            continue
        t1 = rec.first_token_at - rec.submitted_at
        t2 = (rec.finished_at - rec.first_token_at) / (rec.output_len - 1) if rec.output_len > 1 else 0.0
        ttft.append(t1)
        tpot.append(t2)
        good += t1 <= setup.ttft_s and t2 <= setup.tpot_s
    lag = replan_lag(r, setup, phase) if r.system == "adaptive" and phase is not None else None
    p99 = lambda xs: float(np.percentile(xs, 99)) if xs else None  # noqa: E731
    out = {
        "system": r.system,
        "phase": phase or "all",
        "goodput_rps": good / seconds if seconds else None,
        "attainment": good / len(sent) if sent else None,
        "ttft_p99_s": p99(ttft),
        "tpot_p99_s": p99(tpot),
        "lost": sum(1 for s in sent if not s.error and not s.done),
        "duplicated": r.duplicated if phase is None else 0,
        "replan_lag_s": lag,
    }
    assert tuple(out) == KEYS
    return out


def replan_lag(r: Result, setup: Setup, phase: str) -> float | None:
    """Seconds from the phase's start to the scheduler's first search in it (None: none, or the first phase)."""
    starts = np.cumsum([0.0] + [p.seconds for p in setup.phases])
    index = [p.name for p in setup.phases].index(phase)
    if index == 0:
        return None
    begin, end = starts[index], starts[index + 1]
    inside = [at - begin for at, _, _ in r.searches if begin <= at < end]
    return round(min(inside), 2) if inside else None


def print_table(objects: list[dict], setup: Setup) -> None:
    print(
        f"\nSLO TTFT p99 <= {setup.ttft_s:g} s, TPOT p99 <= {setup.tpot_s * 1e3:.3g} ms; median [min-max] over the runs"
    )
    head = (
        f"{'system':12s} {'phase':14s} {'goodput/s':>16s} {'attainment':>18s} {'TTFT p99':>16s} "
        f"{'TPOT p99 ms':>18s} {'lost':>5s} {'dup':>4s} {'replan s':>9s}"
    )
    print(head)
    print("-" * len(head))
    for system in SYSTEMS:
        for phase in [p.name for p in setup.phases] + ["all"]:
            rows = [o for o in objects if o["system"] == system and o["phase"] == phase]
            if not rows:
                continue

            def cell(key: str, scale: float = 1.0, fmt: str = ".3g", *, rows: list[dict] = rows) -> str:
                xs = [o[key] * scale for o in rows if o[key] is not None]
                if not xs:
                    return "-"
                return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}-{max(xs):{fmt}}]"

            lost = sum(o["lost"] for o in rows)
            dup = sum(o["duplicated"] for o in rows)
            print(
                f"{system:12s} {phase:14s} {cell('goodput_rps'):>16s} {cell('attainment'):>18s} "
                f"{cell('ttft_p99_s'):>16s} {cell('tpot_p99_s', 1e3):>18s} {lost:>5d} {dup:>4d} "
                f"{cell('replan_lag_s'):>9s}"
            )
    overall = {s: [o["goodput_rps"] for o in objects if o["system"] == s and o["phase"] == "all"] for s in SYSTEMS}
    if all(overall.values()):
        ada = statistics.median(overall["adaptive"])
        ratios = ", ".join(
            f"x{ada / statistics.median(overall[s]):.2f} vs {s}"
            for s in SYSTEMS[1:]
            if statistics.median(overall[s]) > 0
        )
        print(f"adaptive overall goodput {ada:.3g} req/s: {ratios}")


def run(args: argparse.Namespace) -> int:
    import tempfile

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="exegpt-phases-") as tmp:
        setup = prepare(args, Path(tmp))
        objects = asyncio.run(bench(args, setup))
    print_table(objects, setup)
    print(f"\nwall time {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(objects, indent=1))
    return 0


def dump_tasks() -> None:
    """SIGUSR1: where every task of the run waits (a run that stalls can be read without stopping it)."""
    import sys

    for task in asyncio.all_tasks():
        task.print_stack(limit=8, file=sys.stderr)
    sys.stderr.flush()


async def bench(args: argparse.Namespace, setup: Setup) -> list[dict]:
    import signal

    from services.bench.schedules import niced_services

    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, dump_tasks)
    objects = []
    trace = trace_of(args, setup.phases)
    print(f"trace: {len(trace)} requests over {sum(p.seconds for p in setup.phases):g} s, seed {args.seed}", flush=True)
    with niced_services():
        for run_index in range(args.runs):
            for system in SYSTEMS:
                r = await one_system(args, setup, system, run_index, [replace(s) for s in trace])
                per = [figures_of(r, setup, p.name) for p in setup.phases] + [figures_of(r, setup, None)]
                objects += per
                whole = per[-1]
                searches = "; ".join(f"{at:+.1f} s {reason}: {outcome}" for at, reason, outcome in r.searches)
                print(
                    f"run {run_index} {system:12s}: goodput {whole['goodput_rps']:.3g}/s, attainment "
                    f"{whole['attainment']:.3f}, lost {whole['lost']}, duplicated {whole['duplicated']}"
                    + (f"\n    searches: {searches}" if searches else ""),
                    flush=True,
                )
                if args.json:  # what is measured so far survives a stopped run
                    Path(args.json).write_text(json.dumps(objects, indent=1))
    return objects
