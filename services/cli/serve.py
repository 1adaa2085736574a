"""`exegpt serve | gateway | worker | scheduler | up`: run the mesh.

``serve`` runs every service in one process (in-memory bus and store unless URLs are given);
the others run one service each and need ``--amqp-url`` and ``--redis-url`` (or ``EXEGPT_*``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import CliError

ROLES = {
    "serve": "all services in one process (embedded default; OpenAI-compatible API)",
    "gateway": "the REST gateway alone (needs a broker and Redis)",
    "worker": "one worker; the schedule gives it its role (needs a broker and Redis)",
    "scheduler": "the scheduler service (needs a broker and Redis)",
    "up": "a local mesh of separate processes: scheduler, workers, gateway",
}

# flag -> MeshConfig field; a flag left out falls back to EXEGPT_<FIELD> and then the default.
FLAGS = {
    "--model": ("model", str, "model name or folder (default smollm2)"),
    "--host": ("host", str, "gateway bind address (default 127.0.0.1)"),
    "--port": ("port", int, "gateway port (default 8000)"),
    "--ops-host": ("ops_host", str, "worker/scheduler: bind address of /metrics and /health/* (default 127.0.0.1)"),
    "--ops-port": ("ops_port", int, "worker/scheduler: port of /metrics and /health/* (default 0: a free one)"),
    "--amqp-url": ("amqp_url", str, "RabbitMQ URL, e.g. amqp://guest:guest@127.0.0.1:5672/"),
    "--redis-url": ("redis_url", str, "Redis URL, e.g. redis://127.0.0.1:6379/0"),
    "--namespace": ("namespace", str, "prefix of every queue, exchange and key (default exegpt)"),
    "--batch-dir": (
        "batch_dir",
        str,
        "folder of Batch API files, records and results, shared by every "
        "gateway and batch worker (default ~/.local/share/exegpt/batches)",
    ),
    "--device": ("device", str, "engine device: auto, cpu, cuda"),
    "--threads": ("threads", int, "torch threads per engine"),
    "--dtype": ("dtype", str, "engine dtype: float32 (CPU default), bfloat16, float16"),
    "--quant": (
        "quant",
        str,
        "weight-only quantization on the CPU: fp16, int8, int4, none (default: a Q4_0/Q4_1 "
        "GGUF as int4 on its own codes, else none; docs/engine.md)",
    ),
    "--tp": ("tp", str, "tensor-parallel degree of this worker's process group, or one per stage (2,1)"),
    "--pp": ("pp", int, "pipeline stages of this worker's process group"),
    "--stage-layers": ("stage_layers", str, "layers per pipeline stage, e.g. 20,10 (default: by TP degree)"),
    "--pp-microbatches": ("pp_microbatches", int, "decode micro-batches per step through the pipeline stages"),
    "--master-addr": ("master_addr", str, "rank 0's address, for a worker group spanning hosts"),
    "--master-port": ("master_port", int, "rank 0's port, for a worker group spanning hosts"),
    "--rank": ("rank", int, "this process's rank in a multi-host worker group (0 drives it)"),
    "--kv-cache-gb": (
        "kv_cache_gb",
        float,
        "KV-cache budget of one worker in GiB (default: half the free "
        "memory, shared among `up`'s workers; 90 %% of free GPU memory)",
    ),
    "--kv-transport": (
        "kv_transport",
        str,
        "how KV caches cross processes under WAA: nixl (default; "
        "decoders read encoders' memory) or redis (the payload through Redis)",
    ),
    "--max-encode-batch": ("max_encode_batch", int, "upper bound on B_E"),
    "--max-decode-batch": ("max_decode_batch", int, "upper bound on B_D"),
    "--schedule": ("schedule", str, "schedule the scheduler pins: JSON of Schedule fields, or a file"),
    "--worker-id": ("worker_id", str, "name of this process in events and metadata"),
    "--otlp-endpoint": (
        "otlp_endpoint",
        str,
        "with --tracing: OTLP/HTTP collector for the spans, e.g. http://127.0.0.1:4318 (default: JSON lines on stderr)",
    ),
    "--api-keys-file": (
        "api_keys_file",
        str,
        "keys file: `<sha256 hex> <owner> <user|admin>` a line (keys themselves: EXEGPT_API_KEYS, EXEGPT_ADMIN_KEYS)",
    ),
}
GATEWAY_ROLES = ("serve", "gateway", "up")


def register(sub: argparse._SubParsersAction) -> None:
    for role, help_text in ROLES.items():
        parser = sub.add_parser(role, help=help_text, description=help_text)
        for flag, (field, kind, text) in FLAGS.items():
            parser.add_argument(flag, dest=field, type=kind, default=None, help=text)
        parser.add_argument(
            "--tracing",
            dest="tracing",
            action="store_true",
            default=None,
            help="trace requests across services with OpenTelemetry (exegpt[tracing])",
        )
        if role in GATEWAY_ROLES:
            parser.add_argument(
                "--insecure",
                dest="insecure",
                action="store_true",
                default=None,
                help="serve without API keys on a non-loopback --host",
            )
        if role == "gateway":
            parser.add_argument(
                "--standby",
                action="store_true",
                default=False,
                help="start as a spare: load everything, then wait for a line on stdin "
                "before listening (`exegpt up` keeps one to replace a gateway that dies)",
            )
        if role == "up":
            parser.add_argument("--workers", type=int, default=2, help="worker processes")
            parser.add_argument("--spec", type=Path, default=None, help="process spec (deploy/processes.toml)")
        parser.set_defaults(func=run, role=role)


def build_config(args: argparse.Namespace):
    from pydantic import ValidationError

    from common.config import MeshConfig

    fields = [field for field, _, _ in FLAGS.values()] + ["insecure", "tracing"]
    overrides = {field: getattr(args, field) for field in fields if getattr(args, field, None) is not None}
    try:
        return MeshConfig(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise CliError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def configure_logging() -> None:
    """Log lines to stderr: the product's own (per-request lines, worker groups) from INFO up, the
    libraries' from WARNING up."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("services", "engine", "common"):
        logging.getLogger(name).setLevel(logging.INFO)


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    configure_logging()
    if config.tracing:
        start_tracing(config, args.role)
    if config.rank > 0:  # a follower rank of a multi-host worker group: no broker, no gateway
        if args.role != "worker":
            raise CliError(f"--rank applies to `exegpt worker`, not `{args.role}`")
        return _follow(config)
    if config.schedule:
        from services.schedules import parse_schedule

        try:
            parse_schedule(config.schedule)
        except (OSError, ValueError) as exc:
            raise CliError(f"--schedule: {exc}") from None
    if args.role in ("serve", "scheduler", "up") and (config.profile or config.prior):
        from services.scheduler.planning import Planner, prior_workload

        try:  # what the scheduler plans on: a bad file stops it here, not in the running mesh
            if config.profile:
                Planner(config)
            if config.prior:
                prior_workload(config.prior, config.prior_scale)
        except (OSError, ValueError) as exc:
            raise CliError(f"scheduler planning: {exc}") from None
    if args.role in GATEWAY_ROLES:
        from services.gateway.keys import check_exposure, load_keys

        try:
            check_exposure(config, load_keys(config))
        except ValueError as exc:
            raise CliError(str(exc)) from None
    if args.role not in ("serve",) and not config.distributed:
        raise CliError(
            f"`{args.role}` needs --amqp-url and --redis-url (or EXEGPT_AMQP_URL and "
            "EXEGPT_REDIS_URL); `exegpt serve` runs everything in one process"
        )
    if args.role == "up":
        return _up(config, args)
    from services.run.runner import main_for

    try:
        return main_for(args.role, config, standby=getattr(args, "standby", False))
    except ValueError as exc:  # the engine names a bad model or device this way
        raise CliError(str(exc)) from None


def start_tracing(config, role: str) -> None:
    """Tracing on: this process's tracer provider (service ``exegpt-<role>``), or a one-line error
    when OpenTelemetry is missing. ``up`` only checks: its processes trace themselves."""
    from common import tracing

    try:
        if role == "up":
            tracing.check_installed(config)
        else:
            tracing.start_tracing(config, role)
    except tracing.TracingUnavailable as exc:
        raise CliError(str(exc)) from None


def _follow(config) -> int:
    """A follower rank of a worker group whose rank 0 runs elsewhere: it only computes."""
    if config.master_addr is None or config.master_port is None:
        raise CliError("--rank > 0 needs --master-addr and --master-port (rank 0's)")
    from engine.parallel.group import follow
    from services.hosting.engines import group_shape

    try:
        return follow(
            config.model,
            group_shape(config),
            config.rank,
            addr=config.master_addr,
            port=config.master_port,
            device=config.device,
            num_threads=config.threads,
            dtype=config.dtype,
            quant=config.quant,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _up(config, args: argparse.Namespace) -> int:
    from services.run.launcher import DEFAULT_SPEC, run_up

    spec = args.spec or DEFAULT_SPEC
    if not spec.is_file():
        raise CliError(f"no process spec at {spec}")
    if args.workers < 1:
        raise CliError("--workers must be >= 1")
    return run_up(config, spec, args.workers)
