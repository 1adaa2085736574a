"""`exegpt batch`: submit jobs to the durable batch queue, follow them, run job consumers.

    exegpt batch submit requests.jsonl --wait      # one job per line (completion or chat body)
    exegpt batch submit --count 1000 --task S --wait
    exegpt batch status BATCH_ID
    exegpt batch results BATCH_ID --out results.jsonl
    exegpt batch cancel BATCH_ID
    exegpt batch worker --executor local --model tiny-llama

Every subcommand needs the broker and the store: --amqp-url/--redis-url or EXEGPT_AMQP_URL and
EXEGPT_REDIS_URL (an in-memory queue would not outlive the command).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.cli import CliError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--amqp-url", help="RabbitMQ URL (default: EXEGPT_AMQP_URL)")
    p.add_argument("--redis-url", help="Redis URL (default: EXEGPT_REDIS_URL)")
    p.add_argument("--namespace", help="mesh namespace (default: EXEGPT_NAMESPACE or exegpt)")
    p.add_argument(
        "--batch-dir",
        help="folder of batch records and results, shared with the gateways "
        "(default: EXEGPT_BATCH_DIR or ~/.local/share/exegpt/batches)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "batch",
        help="batch jobs over the durable queue",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = parser.add_subparsers(dest="batch_command", metavar="SUBCOMMAND")
    cmds.required = True

    p = cmds.add_parser("submit", help="submit a JSONL file of requests, or N synthetic ones")
    _common(p)
    p.add_argument("file", nargs="?", type=Path, help="JSONL: completion/chat bodies or Batch API lines")
    p.add_argument("--count", type=int, help="N synthetic completion jobs instead of a file")
    p.add_argument("--task", default="S", help="lengths of synthetic jobs: S|T|G|C1|C2")
    p.add_argument("--input-tokens", type=int, help="fixed prompt length of synthetic jobs")
    p.add_argument("--output-tokens", type=int, help="fixed output length of synthetic jobs")
    p.add_argument("--max-input-tokens", type=int, help="cap synthetic prompt lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model for lines without one (default: the mesh's model)")
    p.add_argument("--batch-id", help="idempotent resubmission under a known id")
    p.add_argument("--wait", action="store_true", help="wait for every result and time the batch")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="how long --wait waits")
    p.set_defaults(func=_run(_submit))

    for name, helptext, fn in (
        ("status", "counts of a batch's results", _status),
        ("cancel", "jobs not yet started finish as cancelled", _cancel),
    ):
        p = cmds.add_parser(name, help=helptext)
        _common(p)
        p.add_argument("batch_id")
        p.set_defaults(func=_run(fn))

    p = cmds.add_parser("results", help="a batch's results as JSONL, in job order")
    _common(p)
    p.add_argument("batch_id")
    p.add_argument("--out", type=Path, help="file to write (default: stdout)")
    p.set_defaults(func=_run(_results))

    p = cmds.add_parser("worker", help="consume jobs until SIGINT/SIGTERM")
    _common(p)
    p.add_argument(
        "--executor",
        choices=("mesh", "local", "echo"),
        default="mesh",
        help="mesh: through the mesh's workers (default); local: through a worker of "
        "this process (one engine, the same worker code); echo: no model (queue tests)",
    )
    p.add_argument("--model", help="model for --executor local (default: the mesh's model)")
    p.add_argument("--device", help="engine device: auto, cpu or cuda")
    p.add_argument("--max-inflight", type=int, default=16, help="jobs held at once (prefetch)")
    p.add_argument("--max-batch", type=int, default=32, help="--executor local: the worker's decode batch")
    p.add_argument(
        "--yield-depth",
        type=int,
        default=0,
        help="with --executor mesh: start a job only while the encode queue holds at "
        "most this many interactive requests; -1: never wait",
    )
    p.add_argument("--echo-delay-ms", type=float, default=0.0, help="simulated model time per job")
    p.add_argument("--worker-id", help="name in results (default: batch-HOST-PID)")
    p.set_defaults(func=_run(_worker))


def _run(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        return asyncio.run(fn(args, _config(args)))

    return run


def _config(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from common.config import MeshConfig

    overrides = {
        k: v
        for k, v in (
            ("amqp_url", args.amqp_url),
            ("redis_url", args.redis_url),
            ("namespace", args.namespace),
            ("batch_dir", args.batch_dir),
        )
        if v
    }
    if getattr(args, "device", None):
        overrides["device"] = args.device
    try:
        config = MeshConfig(**overrides)
    except ValidationError as exc:
        raise CliError(str(exc).splitlines()[-1] if str(exc) else "bad configuration") from None
    if not config.distributed:
        raise CliError("batch jobs need --amqp-url and --redis-url (or EXEGPT_AMQP_URL/EXEGPT_REDIS_URL)")
    return config


class _Conn:
    """The bus and store of one command, closed on exit."""

    def __init__(self, config: Any) -> None:
        self.config = config

    async def __aenter__(self) -> _Conn:
        from common.names import Names
        from common.transport.batchdir import BatchDir
        from common.transport.connect import LocalHub, open_bus, open_store

        self.names = Names(self.config.namespace)
        self.data = BatchDir(self.config.batch_dir, self.config.namespace)
        try:
            self.bus = await open_bus(self.config, self.names, LocalHub())
            store = await open_store(self.config)
            assert store is not None  # the configuration is distributed (checked when it was read)
            self.store = store
        except (OSError, ConnectionError) as exc:
            raise CliError(f"cannot reach the broker or the store: {exc}") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.bus.close()
        await self.store.close()


def _file_jobs(path: Path, model: str, limit: int) -> list[Any]:
    from services.batch.requests import InvalidRequest, parse_plain_line

    if not path.exists():
        raise CliError(f"no such file: {path}")
    parsed = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            parsed.append(parse_plain_line(line, model, limit))
        except InvalidRequest as exc:
            raise CliError(f"{path}:{n}: {exc}") from None
    if not parsed:
        raise CliError(f"{path}: no requests")
    return parsed


def _synthetic_specs(args: argparse.Namespace) -> Any:
    from loadgen.workload import WorkloadSpec, build_workload

    try:
        spec = WorkloadSpec(
            num_requests=args.count,
            seed=args.seed,
            arrival="constant",
            rate_per_s=1.0,
            task=args.task,
            fixed_input_tokens=args.input_tokens,
            fixed_output_tokens=args.output_tokens,
            max_input_tokens=args.max_input_tokens,
        )
        return build_workload(spec).specs
    except ValueError as exc:
        raise CliError(str(exc)) from None


async def _submit(args: argparse.Namespace, config: Any) -> int:
    from common.jobs import JobProducer, job_id, new_batch_id
    from loadgen.batch_target import jobs_from_specs, run_batch

    if (args.file is None) == (args.count is None):
        raise CliError("give a FILE or --count N")
    if args.count is not None and args.count < 1:
        raise CliError("--count must be >= 1")
    model = args.model or config.model
    batch_id = args.batch_id or new_batch_id()
    async with _Conn(config) as conn:
        if args.count is not None and args.wait:
            summary = await run_batch(
                conn.bus, conn.data, conn.names, _synthetic_specs(args), model, args.timeout_s, batch_id
            )
            print(json.dumps(asdict(summary), indent=1))
            return 0 if summary.missing == 0 else 1
        reply = conn.names.reply_queue(batch_id) if args.wait else None
        if args.count is not None:
            jobs = jobs_from_specs(batch_id, _synthetic_specs(args), model, reply)
        else:
            jobs = [
                p.job(job_id(batch_id, i), batch_id, reply)
                for i, p in enumerate(_file_jobs(args.file, model, config.max_tokens_limit))
            ]
        producer = JobProducer(conn.bus, conn.data, conn.names)
        await producer.submit(batch_id, jobs, reply_to=reply)
        print(batch_id)
        if reply is not None:  # --wait
            from common.jobs import collect_replies

            try:
                seen, _ = await collect_replies(conn.bus, reply, {j.job_id for j in jobs}, args.timeout_s)
            finally:
                await conn.bus.delete(queues=[reply], exchanges=[])
            status = await producer.status(batch_id)
            print(json.dumps(asdict(status) | {"done": status.done}))
            return 0 if len(seen) == len(jobs) else 1
    return 0


async def _status(args: argparse.Namespace, config: Any) -> int:
    from common.jobs import JobProducer, UnknownBatch

    async with _Conn(config) as conn:
        try:
            status = await JobProducer(conn.bus, conn.data, conn.names).status(args.batch_id)
        except UnknownBatch:
            raise CliError(f"no batch {args.batch_id}") from None
    print(json.dumps(asdict(status) | {"done": status.done}))
    return 0


async def _cancel(args: argparse.Namespace, config: Any) -> int:
    from common.jobs import JobProducer, UnknownBatch

    async with _Conn(config) as conn:
        try:
            await JobProducer(conn.bus, conn.data, conn.names).cancel(args.batch_id)
        except UnknownBatch:
            raise CliError(f"no batch {args.batch_id}") from None
    print(f"{args.batch_id}: cancel requested")
    return 0


async def _results(args: argparse.Namespace, config: Any) -> int:
    from common.jobs import JobProducer, UnknownBatch, job_id

    async with _Conn(config) as conn:
        try:
            results = await JobProducer(conn.bus, conn.data, conn.names).results(args.batch_id)
        except UnknownBatch:
            raise CliError(f"no batch {args.batch_id}") from None
    lines = [
        json.dumps(asdict(r) if r is not None else {"job_id": job_id(args.batch_id, i), "status": "pending"})
        for i, r in enumerate(results)
    ]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


async def _load_runner(args: argparse.Namespace, config: Any) -> Any:
    """The engine on its runner, loaded on the runner's thread."""
    from services.hosting.engines import EngineRunner, load_engine

    model_config = config.model_copy(update={"model": args.model or config.model})
    try:
        return await EngineRunner.loaded(lambda: load_engine(model_config))
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise CliError(f"cannot load model {model_config.model!r}: {exc}") from None


async def _mesh_executor(args: argparse.Namespace, config: Any, stack: Any) -> Any:
    """Jobs submitted like REST requests: to the mesh's workers, or (``local``) to a worker and
    scheduler of this process over the in-memory bus, running the schedule of one worker."""
    from common.names import Names
    from common.transport.connect import LocalHub, open_transports
    from optimizer.schedule import Schedule
    from services.batch.mesh_executor import MeshExecutor
    from services.front.core import Gateway
    from services.gateway import ServedModel
    from services.run.embedded import local_workers

    hub = LocalHub()
    if args.executor == "local":
        schedule = Schedule(
            "continuous", encode_batch=min(8, args.max_batch), decode_batch=args.max_batch, worker_devices=1
        )
        config = config.model_copy(
            update={
                "amqp_url": None,
                "redis_url": None,
                "model": args.model or config.model,
                "schedule": json.dumps(asdict(schedule)),
            }
        )
        runner = await _load_runner(args, config)
        model = ServedModel(config.model, runner.engine.tokenizer, runner.engine.max_context)
        await stack.enter_async_context(local_workers(config, hub, runners=[runner]))
    else:
        model = _load_served_model(args, config)
    gateway = Gateway(config, await open_transports(config, Names(config.namespace), hub), model.name)
    await gateway.start()
    stack.push_async_callback(gateway.close)
    return MeshExecutor(gateway, model, config.request_timeout_s)


def _load_served_model(args: argparse.Namespace, config: Any) -> Any:
    """Tokenizer and context of the model, for a front end that never runs it (no weights loaded)."""
    from services.gateway import load_served_model

    model_config = config.model_copy(update={"model": args.model or config.model})
    try:
        return load_served_model(model_config)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise CliError(f"cannot load model {model_config.model!r}: {exc}") from None


async def _worker(args: argparse.Namespace, config: Any) -> int:
    from contextlib import AsyncExitStack

    from common.names import Names
    from common.transport.batchdir import BatchDir
    from common.transport.connect import LocalHub, open_transports
    from services.batch.consumer import Admission, ConsumerConfig, JobConsumer, QueueDepthAdmission
    from services.batch.executor import EchoExecutor

    worker_id = args.worker_id or f"batch-{socket.gethostname()}-{os.getpid()}"
    names = Names(config.namespace)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    transports = await open_transports(config, names, LocalHub())
    admission: Admission = Admission()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(transports.close)
        if args.executor == "echo":
            executor: Any = EchoExecutor(args.echo_delay_ms / 1000.0)
        else:
            executor = await _mesh_executor(args, config, stack)
            if args.executor == "mesh" and args.yield_depth >= 0:
                admission = QueueDepthAdmission(
                    transports.bus, names.encode_queue, args.yield_depth, own_waiting=executor.waiting
                )
        consumer = JobConsumer(
            transports.bus,
            BatchDir(config.batch_dir, config.namespace),
            names,
            executor,
            ConsumerConfig(worker_id, args.max_inflight, config.drain_timeout_s),
            admission,
        )
        print(f"{worker_id}: consuming {names.jobs_queue}", flush=True)
        await consumer.run(stop)
    print(f"{worker_id}: stopped; {asdict(consumer.stats)}", flush=True)
    return 0
